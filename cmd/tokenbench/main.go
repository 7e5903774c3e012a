// Command tokenbench measures tokend against the floor of its transport: it
// builds and runs the real daemon and a bare gRPC server on Unix sockets,
// drives both with the same client, and prints a table and a JSON summary.
// See the "Performance" section of README.md.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
