package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// daemon is a client connection to tokend's socket. It remembers why the last
// dial failed, because gRPC only reports Unavailable and the cause is what
// tells an operator what to do.
type daemon struct {
	socket string
	conn   *grpc.ClientConn

	mu      sync.Mutex
	dialErr error // last dial failure; nil after a successful dial
}

func dialDaemon(socket string) (*daemon, error) {
	abs, err := filepath.Abs(socket)
	if err != nil {
		return nil, fmt.Errorf("resolve socket path %q: %w", socket, err)
	}
	d := &daemon{socket: abs}
	// A custom dialer instead of a "unix://" target: any path works, relative
	// or with characters a URL would mangle, and we see the dial error.
	conn, err := grpc.NewClient("passthrough:///tokend",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(d.dial),
	)
	if err != nil {
		return nil, fmt.Errorf("set up client for %s: %w", abs, err)
	}
	d.conn = conn
	return d, nil
}

func (d *daemon) dial(ctx context.Context, _ string) (net.Conn, error) {
	var nd net.Dialer
	conn, err := nd.DialContext(ctx, "unix", d.socket)
	d.mu.Lock()
	d.dialErr = err
	d.mu.Unlock()
	return conn, err
}

func (d *daemon) lastDialErr() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.dialErr
}

func (d *daemon) Close() error { return d.conn.Close() }

// withDaemon connects to the socket in opts and runs fn under the command's
// timeout, turning gRPC errors into messages that say what to do.
func (c *cli) withDaemon(ctx context.Context, opts *options, fn func(ctx context.Context, d *daemon) error) error {
	d, err := dialDaemon(opts.socket)
	if err != nil {
		return err
	}
	defer d.Close()
	ctx, cancel := context.WithTimeout(ctx, opts.timeout)
	defer cancel()
	err = fn(ctx, d)
	if err == nil {
		return nil
	}
	return d.explain(err, ctx.Err() != nil, opts.timeout)
}

// explain rewrites an RPC error for the operator. timedOut says whether our
// own deadline expired, as opposed to the daemon reporting one.
func (d *daemon) explain(err error, timedOut bool, timeout time.Duration) error {
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	if st.Code() == codes.Unavailable || st.Code() == codes.DeadlineExceeded {
		if derr := d.lastDialErr(); derr != nil {
			return d.unreachable(derr)
		}
	}
	if st.Code() == codes.DeadlineExceeded && timedOut {
		return fmt.Errorf("no answer from tokend on %s within %v; raise --timeout, or check the daemon's logs", d.socket, timeout)
	}
	if st.Code() == codes.Canceled {
		return errors.New("canceled")
	}
	return fmt.Errorf("%s: %s", codeWords(st.Code()), st.Message())
}

func (d *daemon) unreachable(derr error) error {
	switch {
	case errors.Is(derr, syscall.ENOENT), errors.Is(derr, syscall.ECONNREFUSED):
		return fmt.Errorf("no tokend answering on %s (%v); start one with 'tokend --dev', or point --socket / TOKEND_SOCKET at a running daemon", d.socket, derr)
	case errors.Is(derr, syscall.EACCES), errors.Is(derr, syscall.EPERM):
		return fmt.Errorf("not allowed to connect to tokend on %s (%v); run tokenctl as a member of the socket's group (see 'ls -l %s') or with sudo", d.socket, derr, d.socket)
	default:
		return fmt.Errorf("cannot reach tokend on %s (%v); check --socket / TOKEND_SOCKET", d.socket, derr)
	}
}

// codeWords turns a gRPC code into lower-case words: InvalidArgument ->
// "invalid argument".
func codeWords(c codes.Code) string {
	var b strings.Builder
	for i, r := range c.String() {
		if unicode.IsUpper(r) {
			if i > 0 {
				b.WriteByte(' ')
			}
			r = unicode.ToLower(r)
		}
		b.WriteRune(r)
	}
	return b.String()
}
