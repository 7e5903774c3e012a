// Package e2e runs the real tokend and tokenctl binaries against the fake
// Whop upstream on loopback, over real Unix sockets.
package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/tokend/tokend/internal/daemontest"
	"github.com/tokend/tokend/internal/whop/whoptest"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

var bin struct {
	tokend, tokenctl string
}

func TestMain(m *testing.M) {
	if runChild() {
		return
	}
	if spec := os.Getenv(connsHelperEnv); spec != "" {
		os.Exit(connsHelper(spec)) // a client process of TestSecurityConnectionFlood
	}
	dir, err := os.MkdirTemp("", "tokend-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Readable by all: the security tests run tokenctl as another user.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin.tokend = filepath.Join(dir, "tokend")
	bin.tokenctl = filepath.Join(dir, "tokenctl")
	for out, pkg := range map[string]string{bin.tokend: "../../cmd/tokend", bin.tokenctl: "../../cmd/tokenctl"} {
		args := []string{"build", "-o", out}
		if raceEnabled {
			args = append(args, "-race")
		}
		cmd := exec.Command("go", append(args, pkg)...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n", pkg, err)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

const testKey = "whop_test_key_0123456789abcdef"

// env is one test's world: a fake upstream, a state directory and a socket
// path short enough for sun_path.
type env struct {
	t        *testing.T
	fake     *whoptest.Server
	dir      string
	socket   string
	stateDir string
	keyFile  string
	daemons  []*daemon
}

// daemonLogs is everything every tokend of this env has written.
func (e *env) daemonLogs() string {
	var b strings.Builder
	for _, d := range e.daemons {
		b.WriteString(d.Out.String())
	}
	return b.String()
}

func newEnv(t *testing.T) *env {
	t.Helper()
	fake, err := whoptest.NewServer(whoptest.Config{Keys: map[string][]string{testKey: nil}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fake.Close)
	dir, err := os.MkdirTemp("", "td")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := &env{t: t, fake: fake, dir: dir, socket: filepath.Join(dir, "t.sock"), stateDir: filepath.Join(dir, "state"), keyFile: filepath.Join(dir, "key")}
	e.writeKey(testKey)
	return e
}

func (e *env) writeKey(key string) {
	e.t.Helper()
	if err := os.WriteFile(e.keyFile, []byte(key+"\n"), 0o600); err != nil {
		e.t.Fatal(err)
	}
}

// daemon is a running tokend process, or a wrapper such as
// systemd-socket-activate that execs it.
type daemon struct {
	*daemontest.Process
	t *testing.T
}

// start runs tokend with the env's socket, state and upstream, plus extra
// flags, and waits until its health service answers.
func (e *env) start(extra ...string) *daemon {
	e.t.Helper()
	args := append([]string{
		"--socket", e.socket,
		"--state-dir", e.stateDir,
		"--whop-url", e.fake.URL(),
		"--api-key-file", e.keyFile,
		"--log-level", "debug",
	}, extra...)
	d := e.startArgs(args...)
	e.waitReady(d)
	return d
}

func (e *env) startArgs(args ...string) *daemon {
	e.t.Helper()
	d := e.startCmd(nil, bin.tokend, args...)
	e.daemons = append(e.daemons, d)
	return d
}

func (e *env) waitReady(d *daemon) {
	e.t.Helper()
	if _, err := daemontest.WaitReady(context.Background(), d.Process, e.socket, 20*time.Second, daemontest.HealthServing); err != nil {
		e.t.Fatal(err)
	}
}

// stop sends SIGTERM and expects a clean exit within 15s.
func (d *daemon) stop() {
	d.t.Helper()
	if err := d.Stop(15 * time.Second); err != nil {
		d.t.Fatal(err)
	}
}

func (e *env) dial() *grpc.ClientConn {
	e.t.Helper()
	conn, err := grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return conn
}

func (e *env) tokens() tokendv1.TokenServiceClient {
	return tokendv1.NewTokenServiceClient(e.dial())
}

// ctl runs tokenctl against the env's socket.
func (e *env) ctl(args ...string) (stdout, stderr string, code int) {
	e.t.Helper()
	return e.runCtl(nil, args...)
}

// runCtl runs tokenctl, as another user when cred is set.
func (e *env) runCtl(cred *syscall.Credential, args ...string) (stdout, stderr string, code int) {
	e.t.Helper()
	cmd := exec.Command(bin.tokenctl, append([]string{"--socket", e.socket}, args...)...)
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	var o, er bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &er
	err := cmd.Run()
	var xe *exec.ExitError
	switch {
	case errors.As(err, &xe):
		code = xe.ExitCode()
	case err != nil:
		e.t.Fatal(err)
	}
	return o.String(), er.String(), code
}

func (e *env) mustCtl(args ...string) string {
	e.t.Helper()
	out, errOut, code := e.ctl(args...)
	if code != 0 {
		e.t.Fatalf("tokenctl %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	return out
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}
