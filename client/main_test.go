package client_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/daemontest"
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
		fmt.Fprintf(os.Stderr, "shared tokend output:\n%s", shared.Out.String())
	}
	return code
}

// daemon is a running tokend with its own fake Whop upstream, state
// directory and socket.
type daemon struct {
	*daemontest.Process
	fake   *whoptest.Server
	dir    string
	socket string
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
	d := &daemon{fake: fake, dir: dir, socket: filepath.Join(dir, "t.sock")}
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, []byte(testKey+"\n"), 0o600); err != nil {
		d.cleanup()
		return nil, err
	}
	args := append([]string{
		"--socket", d.socket,
		"--state-dir", filepath.Join(dir, "state"),
		"--whop-url", fake.URL(),
		"--api-key-file", keyFile,
		"--log-level", "debug",
	}, extra...)
	d.Process, err = daemontest.Start(tokendBin, args, []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir}, nil)
	if err != nil {
		d.cleanup()
		return nil, err
	}
	if _, err := daemontest.WaitReady(context.Background(), d.Process, d.socket, 20*time.Second, daemontest.HealthServing); err != nil {
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
			t.Logf("tokend output:\n%s", d.Out.String())
		}
	})
	return d
}

// stop ends tokend with SIGTERM (SIGKILL after 15s) and removes its files.
// How tokend exited is not checked here: the e2e tests do that.
func (d *daemon) stop() {
	_ = d.Stop(15 * time.Second)
	d.cleanup()
}

func (d *daemon) cleanup() {
	d.fake.Close()
	os.RemoveAll(d.dir)
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}
