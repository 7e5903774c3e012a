// Package redistest runs a real redis-server for tests, on a Unix socket
// under the test's temporary directory, with no persistence. Each Server is
// its own process: tests that share one model a fleet of hosts.
package redistest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Server is one redis-server process; Kill and Restart keep its socket path.
type Server struct {
	t      testing.TB
	bin    string
	dir    string
	args   []string
	Socket string
	cmd    *exec.Cmd
	exited chan struct{}
}

// Start runs redis-server with extra arguments (for example
// "--requirepass", "secret") and waits until it answers PING. Without
// redis-server the test is skipped, or fails when TOKEND_E2E_REQUIRE_SYSTEMD=1
// (CI, which installs it).
func Start(t testing.TB, extra ...string) *Server {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("TOKEND_E2E_REQUIRE_SYSTEMD") == "1" {
			t.Fatalf("redis-server not found and TOKEND_E2E_REQUIRE_SYSTEMD=1: %v", err)
		}
		t.Skipf("redis-server not found (apt-get install redis-server): %v", err)
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "redis.sock")
	if len(sock) > 100 { // sun_path holds 108 bytes
		d, err := os.MkdirTemp("", "redis")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		dir, sock = d, filepath.Join(d, "redis.sock")
	}
	s := &Server{t: t, bin: bin, dir: dir, Socket: sock, args: extra}
	s.start()
	t.Cleanup(s.Kill)
	return s
}

// URL is the unix:// URL of the server.
func (s *Server) URL() string { return "unix://" + s.Socket }

// Client is a raw client for inspecting and tampering with what is stored;
// it is closed when the test ends.
func (s *Server) Client(password string) *redis.Client {
	c := redis.NewClient(&redis.Options{Network: "unix", Addr: s.Socket, Password: password, MaxRetries: -1})
	s.t.Cleanup(func() { c.Close() })
	return c
}

func (s *Server) start() {
	s.t.Helper()
	args := append([]string{
		"--port", "0", "--unixsocket", s.Socket, "--unixsocketperm", "700",
		"--save", "", "--appendonly", "no", "--dir", s.dir,
		"--logfile", filepath.Join(s.dir, "redis.log"),
	}, s.args...)
	cmd := exec.Command(s.bin, args...)
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start redis-server: %v", err)
	}
	s.cmd, s.exited = cmd, make(chan struct{})
	go func() { cmd.Wait(); close(s.exited) }()
	if err := s.waitReady(5 * time.Second); err != nil {
		s.Kill()
		log, _ := os.ReadFile(filepath.Join(s.dir, "redis.log"))
		s.t.Fatalf("redis-server on %s: %v\n%s", s.Socket, err, log)
	}
}

// waitReady polls with PING: the server is a separate process, so there is
// no event to wait on. A password error still means it is up.
func (s *Server) waitReady(limit time.Duration) error {
	c := redis.NewClient(&redis.Options{Network: "unix", Addr: s.Socket, MaxRetries: -1, DialTimeout: 100 * time.Millisecond})
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
		case <-s.exited:
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
func (s *Server) Kill() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGKILL) // works on a frozen server too
	<-s.exited
	s.cmd = nil
}

// Freeze stops the server with SIGSTOP: connections stay open and nothing
// answers, as with a hung server or a network partition. Thaw resumes it.
func (s *Server) Freeze() { s.signal(syscall.SIGSTOP) }

// Thaw resumes a frozen server.
func (s *Server) Thaw() { s.signal(syscall.SIGCONT) }

func (s *Server) signal(sig syscall.Signal) {
	s.t.Helper()
	if s.cmd == nil {
		s.t.Fatalf("redis-server on %s is not running", s.Socket)
	}
	if err := s.cmd.Process.Signal(sig); err != nil {
		s.t.Fatalf("signal redis-server: %v", err)
	}
}

// Restart starts the server again on the same socket (empty: it keeps no
// data), killing it first if it runs.
func (s *Server) Restart() {
	s.t.Helper()
	s.Kill()
	s.start()
}
