package client_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/tokend/tokend/internal/whop/whoptest"
)

// tokendBin is the real daemon, built once by TestMain.
var tokendBin string

// shared is the daemon TestMain starts with default flags; the examples
// reach it through $TOKEND_SOCKET.
var shared *daemon

const testKey = "whop_test_key_0123456789abcdef"

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "tc")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	tokendBin = filepath.Join(dir, "tokend")
	args := []string{"build", "-o", tokendBin}
	if raceEnabled {
		args = append(args, "-race")
	}
	build := exec.Command("go", append(args, "../cmd/tokend")...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "build tokend: %v\n", err)
		return 1
	}
	shared, err = startDaemon()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer shared.stop()
	os.Setenv("TOKEND_SOCKET", shared.socket)
	code := m.Run()
	if code != 0 {
		fmt.Fprintf(os.Stderr, "shared tokend output:\n%s", shared.out.String())
	}
	return code
}

// daemon is a running tokend with its own fake Whop upstream, state
// directory and socket.
type daemon struct {
	fake   *whoptest.Server
	dir    string
	socket string
	cmd    *exec.Cmd
	out    *syncBuffer
	done   chan struct{}
}

// startDaemon runs tokend with extra flags and waits until its health
// service answers.
func startDaemon(extra ...string) (*daemon, error) {
	fake, err := whoptest.NewServer(whoptest.Config{Keys: map[string][]string{testKey: nil}})
	if err != nil {
		return nil, err
	}
	// Short: a socket path must fit in sun_path.
	dir, err := os.MkdirTemp("", "tc")
	if err != nil {
		fake.Close()
		return nil, err
	}
	d := &daemon{fake: fake, dir: dir, socket: filepath.Join(dir, "t.sock"), out: &syncBuffer{}, done: make(chan struct{})}
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, []byte(testKey+"\n"), 0o600); err != nil {
		d.cleanup()
		return nil, err
	}
	d.cmd = exec.Command(tokendBin, append([]string{
		"--socket", d.socket,
		"--state-dir", filepath.Join(dir, "state"),
		"--whop-url", fake.URL(),
		"--api-key-file", keyFile,
		"--log-level", "debug",
	}, extra...)...)
	d.cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir}
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	if err := d.cmd.Start(); err != nil {
		d.cleanup()
		return nil, fmt.Errorf("start tokend: %w", err)
	}
	go func() {
		d.cmd.Wait()
		close(d.done)
	}()
	if err := d.waitReady(); err != nil {
		d.stop()
		return nil, err
	}
	return d, nil
}

// startTestDaemon is startDaemon for one test, stopped when it ends.
func startTestDaemon(t *testing.T, extra ...string) *daemon {
	t.Helper()
	d, err := startDaemon(extra...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.stop()
		if t.Failed() {
			t.Logf("tokend output:\n%s", d.out.String())
		}
	})
	return d
}

func (d *daemon) waitReady() error {
	conn, err := grpc.NewClient("unix://"+d.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	h := healthpb.NewHealthClient(conn)
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		resp, err := h.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err == nil && resp.Status == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
		select {
		case <-d.done:
			return fmt.Errorf("tokend exited before it was ready:\n%s", d.out.String())
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("tokend not ready after 20s: %v\n%s", err, d.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop ends tokend with SIGTERM (SIGKILL after 15s) and removes its files.
func (d *daemon) stop() {
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(15 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
	}
	d.cleanup()
}

func (d *daemon) cleanup() {
	d.fake.Close()
	os.RemoveAll(d.dir)
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}
