package e2e

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/stats"

	"github.com/tokend/tokend/internal/daemontest"
)

// requireTool returns the path of a systemd tool, or skips the test when it
// is missing. .ci/run installs Debian's systemd package and sets
// TOKEND_E2E_REQUIRE_SYSTEMD=1, so in CI a missing tool fails instead.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("TOKEND_E2E_REQUIRE_SYSTEMD") == "1" {
			t.Fatalf("%s not found and TOKEND_E2E_REQUIRE_SYSTEMD=1: %v", name, err)
		}
		t.Skipf("%s not found (apt-get install systemd): %v", name, err)
	}
	return p
}

// daemonArgs are the flags start uses, without any API key source.
func (e *env) daemonArgs(extra ...string) []string {
	return append([]string{
		"--socket", e.socket,
		"--state-dir", e.stateDir,
		"--whop-url", e.fake.URL(),
		"--log-level", "debug",
	}, extra...)
}

// startCmd runs name with args under exactly the environment env (plus
// PATH and HOME), like startArgs does for tokend. It does not wait for
// readiness.
func (e *env) startCmd(env []string, name string, args ...string) *daemon {
	e.t.Helper()
	p, err := daemontest.Start(name, args, append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + e.dir}, env...), nil)
	if err != nil {
		e.t.Fatal(err)
	}
	d := &daemon{Process: p, t: e.t}
	e.t.Cleanup(func() {
		d.Kill()
		if e.t.Failed() {
			e.t.Logf("%s output:\n%s", d.Name, d.Out.String())
		}
	})
	return d
}

// waitOutput waits until the daemon's output contains s.
func (d *daemon) waitOutput(s string) {
	d.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(d.Out.String(), s) {
		select {
		case <-d.Done():
			d.t.Fatalf("process exited (%v) before printing %q:\n%s", d.Err(), s, d.Out.String())
		default:
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("no %q in the output after 20s:\n%s", s, d.Out.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// noSecrets fails the test if the daemon printed any of the secrets.
func (d *daemon) noSecrets(secrets ...string) {
	d.t.Helper()
	out := d.Out.String()
	for _, s := range secrets {
		if strings.Contains(out, s) {
			d.t.Fatalf("tokend printed a secret (%d bytes long) in its output", len(s))
		}
	}
}

// notifySocket plays systemd's side of sd_notify: a unixgram socket whose
// datagrams are kept in order, each as its VAR=value lines.
type notifySocket struct {
	t    *testing.T
	path string
	msgs chan []string
}

func newNotifySocket(t *testing.T, dir string) *notifySocket {
	t.Helper()
	n := &notifySocket{t: t, path: filepath.Join(dir, "notify.sock"), msgs: make(chan []string, 4096)}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	go func() {
		buf := make([]byte, 64<<10)
		for {
			k, err := conn.Read(buf)
			if err != nil {
				close(n.msgs)
				return
			}
			n.msgs <- strings.Split(strings.TrimRight(string(buf[:k]), "\n"), "\n")
		}
	}()
	return n
}

// await returns the next message with a line starting with prefix,
// skipping others (they are logged).
func (n *notifySocket) await(prefix string) []string {
	n.t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case m, ok := <-n.msgs:
			if !ok {
				n.t.Fatalf("notify socket closed while waiting for %s", prefix)
			}
			if line(m, prefix) != "" {
				return m
			}
			n.t.Logf("notify (skipped while waiting for %s): %q", prefix, m)
		case <-timeout:
			n.t.Fatalf("no %s notification within 20s", prefix)
		}
	}
}

// line returns the first line of m starting with prefix, or "".
func line(m []string, prefix string) string {
	for _, l := range m {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

// connCounter is a gRPC stats handler that counts transport connections
// opened and closed: a client that keeps one connection sees 1 and 0.
type connCounter struct {
	begun, ended atomic.Int32
}

func (c *connCounter) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (c *connCounter) HandleRPC(context.Context, stats.RPCStats)                       {}
func (c *connCounter) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}

func (c *connCounter) HandleConn(_ context.Context, s stats.ConnStats) {
	switch s.(type) {
	case *stats.ConnBegin:
		c.begun.Add(1)
	case *stats.ConnEnd:
		c.ended.Add(1)
	}
}

// dialCounted is dial with a connCounter.
func (e *env) dialCounted() (*grpc.ClientConn, *connCounter) {
	e.t.Helper()
	cc := &connCounter{}
	conn, err := grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithStatsHandler(cc))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return conn, cc
}

// writeFileAtomic replaces path the way an operator's tooling should:
// write a temporary file, then rename it over the old one.
func writeFileAtomic(t *testing.T, path, data string, mode os.FileMode) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(data), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(tmp, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}
