// Command tokenctl is the operators' client for tokend: it fetches tokens and
// lists, inspects, refreshes and evicts the daemon's cache entries over its
// Unix socket. It never prints a token except from "tokenctl get".
package main

import (
	"context"
	"os"
)

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr, os.Getenv))
}
