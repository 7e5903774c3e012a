// Package redistest runs a real redis-server for tests and benchmarks, on a
// Unix socket under a temporary directory, with no persistence. Each Server
// (or Process) is its own process: tests that share one model a fleet of
// hosts.
package redistest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// ErrNotFound: there is no redis-server in PATH.
var ErrNotFound = errors.New("redis-server not found in PATH (apt-get install redis-server)")

// Process is one redis-server process on a Unix socket in its directory;
// Kill and Restart keep the socket path. Programs that are not tests (the
// benchmark) use it directly; tests use Server.
type Process struct {
	bin    string
	dir    string
	args   []string
	Socket string
	cmd    *exec.Cmd
	exited chan struct{}
}

// StartProcess runs redis-server with its socket, log and working files in
// dir and extra arguments (for example "--requirepass", "secret"), and waits
// until it answers PING. It fails with ErrNotFound without redis-server.
func StartProcess(dir string, extra ...string) (*Process, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotFound, err)
	}
	p := &Process{bin: bin, dir: dir, Socket: filepath.Join(dir, "redis.sock"), args: extra}
	if len(p.Socket) > 100 { // sun_path holds 108 bytes
		return nil, fmt.Errorf("redis-server socket %s: path longer than 100 bytes", p.Socket)
	}
	return p, p.start()
}

// URL is the unix:// URL of the server.
func (p *Process) URL() string { return "unix://" + p.Socket }

func (p *Process) start() error {
	args := append([]string{
		"--port", "0", "--unixsocket", p.Socket, "--unixsocketperm", "700",
		"--save", "", "--appendonly", "no", "--dir", p.dir,
		"--logfile", filepath.Join(p.dir, "redis.log"),
	}, p.args...)
	cmd := exec.Command(p.bin, args...)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start redis-server: %w", err)
	}
	p.cmd, p.exited = cmd, make(chan struct{})
	go func() { cmd.Wait(); close(p.exited) }()
	if err := p.waitReady(5 * time.Second); err != nil {
		p.Kill()
		log, _ := os.ReadFile(filepath.Join(p.dir, "redis.log"))
		return fmt.Errorf("redis-server on %s: %w\n%s", p.Socket, err, log)
	}
	return nil
}

// waitReady polls with PING: the server is a separate process, so there is
// no event to wait on. A password error still means it is up.
func (p *Process) waitReady(limit time.Duration) error {
	c := redis.NewClient(&redis.Options{Network: "unix", Addr: p.Socket, MaxRetries: -1, DialTimeout: 100 * time.Millisecond})
	defer c.Close()
	deadline := time.Now().Add(limit)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		err := c.Ping(ctx).Err()
		cancel()
		if err == nil || redis.HasErrorPrefix(err, "NOAUTH") {
			return nil
		}
		select {
		case <-p.exited:
			return fmt.Errorf("exited before answering: %w", err)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no answer after %v: %w", limit, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Kill stops the server with SIGKILL, as a crash or an OOM kill would, and
// waits until it is gone. Killing a stopped server does nothing.
func (p *Process) Kill() {
	if p.cmd == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL) // works on a frozen server too
	<-p.exited
	p.cmd = nil
}

// Signal sends sig to the running server.
func (p *Process) Signal(sig syscall.Signal) error {
	if p.cmd == nil {
		return fmt.Errorf("redis-server on %s is not running", p.Socket)
	}
	if err := p.cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("signal redis-server: %w", err)
	}
	return nil
}

// Restart starts the server again on the same socket (empty: it keeps no
// data), killing it first if it runs.
func (p *Process) Restart() error {
	p.Kill()
	return p.start()
}

// Server is a Process that a test owns: it fails the test instead of
// returning errors and is killed when the test ends.
type Server struct {
	*Process
	t testing.TB
}

// Start runs redis-server with extra arguments (for example
// "--requirepass", "secret") and waits until it answers PING. Without
// redis-server the test is skipped, or fails when TOKEND_E2E_REQUIRE_SYSTEMD=1
// (CI, which installs it).
func Start(t testing.TB, extra ...string) *Server {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("TOKEND_E2E_REQUIRE_SYSTEMD") == "1" {
			t.Fatalf("redis-server not found and TOKEND_E2E_REQUIRE_SYSTEMD=1: %v", err)
		}
		t.Skipf("redis-server not found (apt-get install redis-server): %v", err)
	}
	dir := t.TempDir()
	if len(filepath.Join(dir, "redis.sock")) > 100 {
		d, err := os.MkdirTemp("", "redis")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		dir = d
	}
	p, err := StartProcess(dir, extra...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	return &Server{Process: p, t: t}
}

// Client is a raw client for inspecting and tampering with what is stored;
// it is closed when the test ends.
func (s *Server) Client(password string) *redis.Client {
	c := redis.NewClient(&redis.Options{Network: "unix", Addr: s.Socket, Password: password, MaxRetries: -1})
	s.t.Cleanup(func() { c.Close() })
	return c
}

// Freeze stops the server with SIGSTOP: connections stay open and nothing
// answers, as with a hung server or a network partition. Thaw resumes it.
func (s *Server) Freeze() { s.signal(syscall.SIGSTOP) }

// Thaw resumes a frozen server.
func (s *Server) Thaw() { s.signal(syscall.SIGCONT) }

func (s *Server) signal(sig syscall.Signal) {
	s.t.Helper()
	if err := s.Signal(sig); err != nil {
		s.t.Fatal(err)
	}
}

// Restart starts the server again on the same socket (empty: it keeps no
// data), killing it first if it runs.
func (s *Server) Restart() {
	s.t.Helper()
	if err := s.Process.Restart(); err != nil {
		s.t.Fatal(err)
	}
}
