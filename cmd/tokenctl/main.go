// Command tokenctl is the operators' client for tokend: it fetches tokens and
// lists, inspects, refreshes and evicts the daemon's cache entries over its
// Unix socket. It never prints a token except from "tokenctl get".
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// Ctrl-C cancels the command: "watch" stops cleanly, others say so.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv)
	stop()
	os.Exit(code)
}
