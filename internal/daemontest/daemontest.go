// Package daemontest runs a daemon binary as a child process and waits until
// it serves gRPC on a Unix socket. The client and end-to-end tests start the
// real tokend with it, and tokenbench starts tokend and its floor server, so
// all of them start, watch and stop processes the same way. It is not a _test
// package, so keep it free of testing dependencies: callers turn its errors
// into test failures themselves.
package daemontest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// Output collects a process's stdout and stderr so that errors can show what
// it said. It is safe for concurrent Write and String. The zero value keeps
// everything: tests that scan the log for leaked secrets must see all of it.
type Output struct {
	mu  sync.Mutex
	max int
	b   []byte
}

// NewOutput returns an Output that keeps only the last max bytes, or
// everything when max is 0. A bound suits long runs such as a benchmark,
// where only the end matters in an error message.
func NewOutput(max int) *Output { return &Output{max: max} }

// Write appends p. A bounded Output lets its buffer reach twice the bound
// before dropping the oldest bytes, so that trimming is not a copy per
// write.
func (o *Output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.b = append(o.b, p...)
	if o.max > 0 && len(o.b) > 2*o.max {
		o.b = append(o.b[:0], o.b[len(o.b)-o.max:]...)
	}
	return len(p), nil
}

// String is what was written, or its last max bytes for a bounded Output.
func (o *Output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	b := o.b
	if o.max > 0 && len(b) > o.max {
		b = b[len(b)-o.max:]
	}
	return string(b)
}

// Process is a started child process.
type Process struct {
	// Name labels the process in errors. Start sets it to the binary's
	// base name; callers running several may set a clearer one.
	Name    string
	Cmd     *exec.Cmd
	Out     *Output
	Started time.Time // just before the exec, for start-up times

	done    chan struct{}
	err     error
	stopped atomic.Bool
}

// Start runs bin with args under exactly env (nil means an empty
// environment, not the caller's): callers pass a small explicit one, such as
// PATH and HOME, so that nothing in the shell that runs the tests or the
// benchmark, like TOKEND_* or WHOP_API_KEY, changes what the daemon does.
// stdout and stderr both go to out, or to a new unbounded Output when out
// is nil.
func Start(bin string, args, env []string, out *Output) (*Process, error) {
	if out == nil {
		out = &Output{}
	}
	p := &Process{Name: filepath.Base(bin), Cmd: exec.Command(bin, args...), Out: out, done: make(chan struct{})}
	p.Cmd.Env = append([]string{}, env...)
	p.Cmd.Stdout, p.Cmd.Stderr = out, out
	// A grandchild that inherited the output pipe must not keep Wait, and
	// so Stop and Kill, from returning once the process itself has exited.
	p.Cmd.WaitDelay = 5 * time.Second
	p.Started = time.Now()
	if err := p.Cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", p.Name, err)
	}
	go func() {
		p.err = p.Cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// Done is closed once the process has exited and its output is collected.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err is how the process ended, as exec.Cmd.Wait reports it; nil until Done
// is closed.
func (p *Process) Err() error {
	select {
	case <-p.done:
		return p.err
	default:
		return nil
	}
}

// Pid is the process's id.
func (p *Process) Pid() int { return p.Cmd.Process.Pid }

// Signal sends sig to the process.
func (p *Process) Signal(sig os.Signal) error { return p.Cmd.Process.Signal(sig) }

// Kill sends SIGKILL and waits until the process is gone. It is meant for
// cleanups and crash tests, and is harmless on a process that has exited.
func (p *Process) Kill() {
	_ = p.Cmd.Process.Kill()
	<-p.done
}

// Stop asks the process to exit with SIGTERM, the way a service manager
// does, and expects a clean exit: it returns an error, with the output, if
// the process had already failed, exited non-zero or by a signal, or was
// still running after timeout (it is then killed, so nothing is left
// behind). Only the first call reports; later ones return nil, so a
// deferred Stop after an explicit one is harmless.
func (p *Process) Stop(timeout time.Duration) error {
	if p.stopped.Swap(true) {
		<-p.done
		return nil
	}
	select {
	case <-p.done:
		if p.err != nil {
			return fmt.Errorf("%s exited with %v before it was stopped:\n%s", p.Name, p.err, p.Out.String())
		}
		return nil
	default:
	}
	_ = p.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(timeout):
		p.Kill()
		return fmt.Errorf("%s did not stop within %v of SIGTERM; killed:\n%s", p.Name, timeout, p.Out.String())
	}
	if p.err != nil {
		return fmt.Errorf("%s exited with %v after SIGTERM:\n%s", p.Name, p.err, p.Out.String())
	}
	return nil
}

// WaitReady polls until socket accepts connections, then until ready
// returns nil, and returns the time since p was started. It fails at once,
// with the output, if the process exits, and after timeout.
//
// It polls every millisecond: tokenbench reports this time as tokend's
// start-up time, so the polling must not blur it.
func WaitReady(ctx context.Context, p *Process, socket string, timeout time.Duration, ready func(context.Context, *grpc.ClientConn) error) (time.Duration, error) {
	deadline := time.Now().Add(timeout)
	var conn *grpc.ClientConn
	defer func() {
		if conn != nil {
			conn.Close()
		}
	}()
	for {
		var err error
		if conn == nil {
			// Dial the raw socket first: a gRPC client would back off
			// between attempts while the file does not exist yet.
			var c net.Conn
			if c, err = net.Dial("unix", socket); err == nil {
				c.Close()
				if conn, err = Dial(socket); err != nil {
					return 0, err
				}
			}
		}
		if conn != nil {
			cctx, cancel := context.WithTimeout(ctx, time.Second)
			err = ready(cctx, conn)
			cancel()
			if err == nil {
				return time.Since(p.Started), nil
			}
		}
		select {
		case <-p.done:
			return 0, fmt.Errorf("%s exited before it was ready: %v\n%s", p.Name, p.err, p.Out.String())
		default:
		}
		if cerr := ctx.Err(); cerr != nil {
			return 0, cerr
		}
		if time.Now().After(deadline) {
			if conn == nil {
				return 0, fmt.Errorf("%s not answering on %s after %v: %v\n%s", p.Name, socket, timeout, err, p.Out.String())
			}
			return 0, fmt.Errorf("%s not ready after %v: %v\n%s", p.Name, timeout, err, p.Out.String())
		}
		time.Sleep(time.Millisecond)
	}
}

// HealthServing is a readiness check for tokend: its health service says
// SERVING.
func HealthServing(ctx context.Context, conn *grpc.ClientConn) error {
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return err
	}
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("health: %v", resp.Status)
	}
	return nil
}

// Dial returns a client of a Unix socket that reconnects quickly, so that
// polling measures the server rather than the client's backoff. It starts
// connecting at once.
func Dial(socket string) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient("unix://"+socket,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: time.Millisecond, Multiplier: 1.5, Jitter: 0.1, MaxDelay: 20 * time.Millisecond},
			MinConnectTimeout: time.Second,
		}))
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", socket, err)
	}
	conn.Connect()
	return conn, nil
}
