package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

// defaultSocket is where the packaged systemd units put tokend's socket.
const defaultSocket = "/run/tokend/tokend.sock"

// Exit codes.
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

// cli carries everything a tokenctl invocation touches outside itself, so
// tests can swap the writers, the environment and the clock.
type cli struct {
	stdout io.Writer
	stderr io.Writer
	getenv func(string) string
	// now is the clock for relative times ("in 41m12s", "3m ago"); timestamps
	// are printed in the location of the times it returns.
	now func() time.Time
	// wait, when set, replaces the timer between watch's polls; it returns
	// ctx's error once ctx is done.
	wait func(ctx context.Context, d time.Duration) error
}

// options are the persistent flags, shared by every command.
type options struct {
	socket  string
	output  string
	timeout time.Duration
}

func (o *options) json() bool { return o.output == "json" }

// usageError marks a mistake in the command line: it exits 2 and points at --help.
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

func usagef(format string, a ...any) error {
	return &usageError{err: fmt.Errorf(format, a...)}
}

// run executes tokenctl with args (without the program name) and returns the
// process exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	c := &cli{stdout: stdout, stderr: stderr, getenv: getenv, now: time.Now}
	return c.run(ctx, args)
}

func (c *cli) run(ctx context.Context, args []string) int {
	root := c.newRootCmd()
	root.SetArgs(args)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return exitOK
	}
	if ue, ok := errors.AsType[*usageError](err); ok {
		path := "tokenctl"
		if cmd != nil {
			path = cmd.CommandPath()
		}
		fmt.Fprintf(c.stderr, "tokenctl: %v\nRun '%s --help' for usage.\n", ue, path)
		return exitUsage
	}
	fmt.Fprintf(c.stderr, "tokenctl: %v\n", err)
	return exitFailure
}

func (c *cli) newRootCmd() *cobra.Command {
	opts := &options{}
	root := &cobra.Command{
		Use:   "tokenctl",
		Short: "Operate tokend, the local cache of Whop access tokens",
		Long: `tokenctl talks to tokend over its Unix socket. "get" fetches a token the way
services do; the other commands inspect and manage the daemon's cache and never
print a token.

KEY arguments accept any unambiguous prefix of a key id shown by "tokenctl list".`,
		SilenceUsage:               true,
		SilenceErrors:              true,
		SuggestionsMinimumDistance: 2,
		// Unknown commands reach RunE, which reports them as usage errors
		// (cobra's own check returns an untyped error).
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return cmd.Help()
			}
			return unknownCommand(cmd, args[0])
		},
		PersistentPreRunE: func(*cobra.Command, []string) error {
			switch opts.output {
			case "table", "json":
			default:
				return usagef("invalid --output %q: use table or json", opts.output)
			}
			if opts.timeout <= 0 {
				return usagef("invalid --timeout %v: must be positive, such as 10s", opts.timeout)
			}
			if opts.socket == "" {
				return usagef("--socket is empty: pass the daemon's socket path")
			}
			return nil
		},
	}
	root.SetOut(c.stdout)
	root.SetErr(c.stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return &usageError{err: err}
	})

	socket := c.getenv("TOKEND_SOCKET")
	if socket == "" {
		socket = defaultSocket
	}
	pf := root.PersistentFlags()
	pf.StringVar(&opts.socket, "socket", socket, "tokend's Unix socket (env TOKEND_SOCKET)")
	pf.StringVarP(&opts.output, "output", "o", "table", "output format: table or json")
	pf.DurationVar(&opts.timeout, "timeout", 10*time.Second, "how long each command waits for the daemon")

	root.AddCommand(
		c.newGetCmd(opts),
		c.newListCmd(opts),
		c.newInspectCmd(opts),
		c.newEvictCmd(opts),
		c.newRefreshCmd(opts),
		c.newStatusCmd(opts),
		c.newWatchCmd(opts),
		c.newPolicyCmd(opts),
	)
	return root
}

func unknownCommand(root *cobra.Command, name string) error {
	msg := fmt.Sprintf("unknown command %q for %q", name, root.CommandPath())
	if s := root.SuggestionsFor(name); len(s) > 0 {
		for i := range s {
			s[i] = strconv.Quote(s[i])
		}
		msg += "; did you mean " + strings.Join(s, " or ") + "?"
	}
	return &usageError{err: errors.New(msg)}
}

// noArgs and keyArg replace cobra's argument checks so that their failures
// are usage errors.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usagef("%s takes no arguments, got %q", cmd.Name(), args)
	}
	return nil
}

func keyArg(cmd *cobra.Command, args []string) error {
	switch len(args) {
	case 1:
		if args[0] == "" {
			return usagef("%s needs a non-empty KEY", cmd.Name())
		}
		return nil
	case 0:
		return usagef("%s needs a KEY: a key id, or a unique prefix of one, from 'tokenctl list'", cmd.Name())
	default:
		return usagef("%s takes one KEY, got %d arguments", cmd.Name(), len(args))
	}
}
