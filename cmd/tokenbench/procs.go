package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// startTimeout bounds how long a process may take to answer on its socket.
const startTimeout = 30 * time.Second

// proc is a child process serving gRPC on a Unix socket.
type proc struct {
	name    string
	socket  string
	cmd     *exec.Cmd
	out     *tailBuffer
	started time.Time
	done    chan struct{}
	err     error
}

// startProc starts bin with args. Its output is kept for error messages.
func startProc(name, socket, bin string, args ...string) (*proc, error) {
	p := &proc{name: name, socket: socket, out: &tailBuffer{max: 64 << 10}, done: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	// A small, explicit environment: no TOKEND_* or WHOP_API_KEY from the
	// caller's shell changes what is measured.
	p.cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.TempDir()}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.started = time.Now()
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// stop sends SIGTERM and waits; a process that does not exit within 10s is
// killed. It is safe to call more than once.
func (p *proc) stop() error {
	select {
	case <-p.done:
		return nil
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("%s did not stop within 10s of SIGTERM; killed", p.name)
	}
	if p.err != nil {
		return fmt.Errorf("%s exited with %v after SIGTERM:\n%s", p.name, p.err, p.out.String())
	}
	return nil
}

// waitReady polls until the socket accepts, then until ready returns nil,
// and reports the time since the process was started. It fails at once if
// the process exits.
func (p *proc) waitReady(ctx context.Context, ready func(context.Context, *grpc.ClientConn) error) (time.Duration, error) {
	deadline := time.Now().Add(startTimeout)
	var lastErr error
	exited := func() error {
		select {
		case <-p.done:
			return fmt.Errorf("%s exited before it was ready: %v\n%s", p.name, p.err, p.out.String())
		default:
			return nil
		}
	}
	// Dial the raw socket first: a gRPC client would back off between
	// attempts while the file does not exist yet, blurring the start-up time.
	for {
		c, err := net.Dial("unix", p.socket)
		if err == nil {
			c.Close()
			break
		}
		lastErr = err
		if err := exited(); err != nil {
			return 0, err
		}
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("%s not answering on %s after %v: %v\n%s", p.name, p.socket, startTimeout, lastErr, p.out.String())
		}
		time.Sleep(time.Millisecond)
	}
	conn, err := dial(p.socket)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		err := ready(cctx, conn)
		cancel()
		if err == nil {
			return time.Since(p.started), nil
		}
		lastErr = err
		if err := exited(); err != nil {
			return 0, err
		}
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("%s not ready after %v: %v\n%s", p.name, startTimeout, lastErr, p.out.String())
		}
		time.Sleep(time.Millisecond)
	}
}

// healthServing is a readiness check for tokend: its health service says
// SERVING.
func healthServing(ctx context.Context, conn *grpc.ClientConn) error {
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return err
	}
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("health: %v", resp.Status)
	}
	return nil
}

// dial returns a client of a Unix socket that reconnects quickly, so
// polling measures the server rather than the client's backoff.
func dial(socket string) (*grpc.ClientConn, error) {
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

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if over := len(t.b) - t.max; over > 0 {
		t.b = append(t.b[:0], t.b[over:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

// memStatus is a process's resident memory from /proc/PID/status, in KiB.
type memStatus struct {
	RSS, Anon, File int64
}

func readMemStatus(pid int) (memStatus, error) {
	f, err := os.Open(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return memStatus{}, err
	}
	defer f.Close()
	var m memStatus
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fields := strings.Fields(value)
		if len(fields) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(fields[0], 10, 64)
		switch name {
		case "VmRSS":
			m.RSS = n
		case "RssAnon":
			m.Anon = n
		case "RssFile":
			m.File = n
		}
	}
	if m.RSS == 0 {
		return m, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
	}
	return m, sc.Err()
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat times; it is 100 on
// every Linux architecture Go supports.
const clockTicks = 100

// cpuTime is a process's user plus system CPU time from /proc/PID/stat, at
// the kernel's 10ms resolution.
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	// The command name may hold spaces and parentheses; fields resume
	// after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("unexpected /proc stat format")
	}
	fields := strings.Fields(string(b[i+1:]))
	// fields[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(fields) < 13 {
		return 0, errors.New("unexpected /proc stat format")
	}
	utime, err1 := strconv.ParseInt(fields[11], 10, 64)
	stime, err2 := strconv.ParseInt(fields[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(utime+stime) * time.Second / clockTicks, nil
}
