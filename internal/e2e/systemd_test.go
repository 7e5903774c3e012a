package e2e

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// TestSocketActivation runs tokend under Debian's systemd-socket-activate,
// which binds the socket, waits for the first connection, then execs tokend
// with LISTEN_FDS. tokend serves on the inherited socket rather than
// --socket, and leaves it in place when it exits: the socket belongs to the
// service manager.
func TestSocketActivation(t *testing.T) {
	activate := requireTool(t, "systemd-socket-activate")
	e := newEnv(t)
	notMine := filepath.Join(e.dir, "flag.sock")
	d := e.startCmd(nil, activate, "--listen="+e.socket, bin.tokend,
		"--socket", notMine, "--state-dir", e.stateDir, "--whop-url", e.fake.URL(), "--api-key-file", e.keyFile, "--log-level", "debug")

	// The socket exists before tokend runs.
	e.waitActivationSocket(d)
	if exe := procExe(t, d); exe != resolve(t, activate) {
		t.Fatalf("before any connection the process is %s, want systemd-socket-activate still waiting", exe)
	}
	if _, err := os.Stat(e.stateDir); !os.IsNotExist(err) {
		t.Fatalf("tokend ran before the first connection: state directory: %v", err)
	}

	// The first connection starts tokend, and its call succeeds.
	tok, err := e.tokens().GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_activated", ScopedActions: []string{"chat:read"}})
	if err != nil {
		t.Fatalf("first GetToken through the activated socket: %v", err)
	}
	if _, err := e.fake.Verify(tok.Token); err != nil {
		t.Fatal(err)
	}
	if exe := procExe(t, d); exe != resolve(t, bin.tokend) {
		t.Fatalf("after the first connection the process is %s, want tokend", exe)
	}
	if strings.TrimSpace(e.mustCtl("get", "--company", "biz_activated", "--scope", "chat:read")) != tok.Token {
		t.Fatal("tokenctl got another token through the activated socket")
	}
	if !strings.Contains(d.Out.String(), "serving on the socket passed by the service manager") {
		t.Fatalf("tokend did not log that it serves the inherited socket:\n%s", d.Out.String())
	}

	d.stop()
	if fi, err := os.Lstat(e.socket); err != nil || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("tokend removed the inherited socket %s: %v", e.socket, err)
	}
	if _, err := os.Lstat(notMine); !os.IsNotExist(err) {
		t.Fatalf("tokend listened on --socket %s despite socket activation: %v", notMine, err)
	}
	d.noSecrets(testKey, tok.Token)
}

// waitActivationSocket waits until systemd-socket-activate has created the
// env's socket.
func (e *env) waitActivationSocket(d *daemon) {
	e.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if fi, err := os.Lstat(e.socket); err == nil && fi.Mode().Type() == os.ModeSocket {
			break
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("systemd-socket-activate did not create %s within 20s:\n%s", e.socket, d.Out.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func procExe(t *testing.T, d *daemon) string {
	t.Helper()
	exe, err := os.Readlink("/proc/" + strconv.Itoa(d.Pid()) + "/exe")
	if err != nil {
		t.Fatal(err)
	}
	return exe
}

func resolve(t *testing.T, path string) string {
	t.Helper()
	p, err := filepath.EvalSymlinks(path)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestSystemdNotify plays systemd's side of Type=notify with a unixgram
// socket: READY=1 once the socket accepts, STATUS= lines with the entries,
// WATCHDOG=1 at half of WATCHDOG_USEC, RELOADING=1 (with MONOTONIC_USEC)
// then READY=1 around SIGHUP, STOPPING=1 on SIGTERM.
func TestSystemdNotify(t *testing.T) {
	e := newEnv(t)
	ns := newNotifySocket(t, e.dir)
	d := e.startCmd([]string{"NOTIFY_SOCKET=" + ns.path, "WATCHDOG_USEC=200000"}, bin.tokend, e.daemonArgs("--api-key-file", e.keyFile)...)

	ready := ns.await("READY=1")
	// Checked at once: by READY=1 the socket accepts and the cache is open.
	c, err := net.DialTimeout("unix", e.socket, time.Second)
	if err != nil {
		t.Fatalf("READY=1 arrived but the socket does not accept: %v", err)
	}
	c.Close()
	if _, err := os.Stat(filepath.Join(e.stateDir, "cache.db")); err != nil {
		t.Fatalf("READY=1 arrived before the cache was opened: %v", err)
	}
	if st := line(ready, "STATUS="); !strings.Contains(st, "entries: 0") {
		t.Fatalf("READY=1 came with %q, want a STATUS= line with the entries", st)
	}
	e.waitReady(d)

	tc := e.tokens()
	first, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_notify"})
	if err != nil {
		t.Fatal(err)
	}
	if st := line(ns.await("STATUS=serving; entries: 1;"), "STATUS="); !strings.Contains(st, "upstream calls: 1") {
		t.Fatalf("STATUS after one mint = %q, want the upstream calls", st)
	}

	// WATCHDOG_USEC=200ms: a ping every 100ms.
	start := time.Now()
	for range 3 {
		ns.await("WATCHDOG=1")
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("3 watchdog pings took %v with WATCHDOG_USEC=200000", took)
	}

	d.Signal(syscall.SIGHUP)
	reloading := ns.await("RELOADING=1")
	usec, err := strconv.ParseUint(strings.TrimPrefix(line(reloading, "MONOTONIC_USEC="), "MONOTONIC_USEC="), 10, 64)
	if err != nil || usec == 0 {
		t.Fatalf("RELOADING=1 without a valid MONOTONIC_USEC: %q", reloading)
	}
	ns.await("READY=1")
	d.waitOutput("reload: API key unchanged")
	// The reload kept the cache: same token, no upstream call.
	again, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_notify"})
	if err != nil {
		t.Fatal(err)
	}
	if again.Token != first.Token || e.fake.CallCount() != 1 {
		t.Fatalf("after a reload with the same key: new token %v, upstream calls %d; want the cached token", again.Token != first.Token, e.fake.CallCount())
	}

	d.stop()
	ns.await("STOPPING=1")
	d.noSecrets(testKey, first.Token)
}

// TestCredentialsDirectoryReload gives tokend its API key only through
// systemd's $CREDENTIALS_DIRECTORY, then rotates the key with SIGHUP (what
// systemctl reload sends): the next upstream call uses the new key, a bad
// file keeps the current one, and the client's connection stays up.
func TestCredentialsDirectoryReload(t *testing.T) {
	e := newEnv(t)
	const newKey = "whop_rotated_key_fedcba9876543210"
	e.fake.AddKey(newKey, nil)
	creds := filepath.Join(e.dir, "creds")
	if err := os.Mkdir(creds, 0o700); err != nil {
		t.Fatal(err)
	}
	keyPath := filepath.Join(creds, "whop-api-key")
	writeFileAtomic(t, keyPath, testKey+"\n", 0o400)
	d := e.startCmd([]string{"CREDENTIALS_DIRECTORY=" + creds}, bin.tokend, e.daemonArgs()...)
	e.waitReady(d)
	d.waitOutput("source=" + keyPath)

	conn, conns := e.dialCounted()
	tc := tokendv1.NewTokenServiceClient(conn)
	lastKey := func() string {
		calls := e.fake.Calls()
		if len(calls) == 0 {
			t.Fatal("no upstream call")
		}
		return calls[len(calls)-1].Key
	}
	get := func(company string) *tokendv1.Token {
		t.Helper()
		tok, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: company})
		if err != nil {
			t.Fatalf("GetToken %s: %v", company, err)
		}
		return tok
	}
	first := get("biz_cred")
	if lastKey() != testKey {
		t.Fatal("tokend did not mint with the key from $CREDENTIALS_DIRECTORY")
	}

	writeFileAtomic(t, keyPath, newKey+"\n", 0o400)
	before := e.fake.CallCount()
	d.Signal(syscall.SIGHUP)
	d.waitOutput("reload: API key replaced")
	// A token of the old key is not served again: the same subject is minted
	// anew, with the new key, as is a new subject.
	second := get("biz_cred")
	if second.Token == first.Token {
		t.Fatal("after the key changed tokend served a token minted with the old key")
	}
	if lastKey() != newKey {
		t.Fatal("after the reload the upstream call did not use the new key")
	}
	get("biz_cred_new")
	for i, c := range e.fake.Calls()[before:] {
		if c.Key != newKey {
			t.Fatalf("upstream call %d after the reload used another key", before+i)
		}
	}

	// A bad file keeps the current key and says why.
	for _, c := range []struct {
		name, want string
		bad        func()
	}{
		{"empty", "is empty", func() { writeFileAtomic(t, keyPath, "\n", 0o400) }},
		{"readable by others", "readable by group or others", func() { writeFileAtomic(t, keyPath, testKey+"\n", 0o644) }},
		{"missing", "no such file or directory", func() { os.Remove(keyPath) }},
	} {
		c.bad()
		d.Signal(syscall.SIGHUP)
		d.waitOutput(c.want)
		get("biz_cred_" + strings.ReplaceAll(c.name, " ", "_"))
		if lastKey() != newKey {
			t.Fatalf("%s key file: tokend stopped using the current key", c.name)
		}
	}
	// One per SIGHUP; the key-file watch reloads on the same changes and
	// may add its own.
	if n := strings.Count(d.Out.String(), "reload: keeping the current API key"); n < 3 {
		t.Fatalf("%d reloads kept the current key, want at least 3:\n%s", n, d.Out.String())
	}

	// One connection throughout: reloads never dropped the client.
	if s := conn.GetState(); s != connectivity.Ready {
		t.Fatalf("client connection is %v after the reloads, want READY", s)
	}
	if b, en := conns.begun.Load(), conns.ended.Load(); b != 1 || en != 0 {
		t.Fatalf("client opened %d and lost %d connections across the reloads, want 1 and 0", b, en)
	}
	d.stop()
	d.noSecrets(testKey, newKey, first.Token, second.Token)
}

// TestReloadAfterKeyRejected: once Whop answers 401, tokend stops calling
// with that key; replacing the key file and reloading brings it back.
func TestReloadAfterKeyRejected(t *testing.T) {
	e := newEnv(t)
	const revoked = "whop_revoked_key_0000000000000000"
	e.writeKey(revoked)
	d := e.start()
	tc := e.tokens()
	req := &tokendv1.GetTokenRequest{CompanyId: "biz_revoked"}
	if _, err := tc.GetToken(ctx(t), req); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("with a key Whop does not know: got %v, want FailedPrecondition", err)
	}
	e.writeKey(testKey)
	d.Signal(syscall.SIGHUP)
	d.waitOutput("reload: API key replaced")
	// A new subject: the entry that got the 401 remembers that error for
	// the negative TTL, whatever the key (see the refresher).
	tok, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_after_reload"})
	if err != nil {
		t.Fatalf("after replacing the key and reloading: %v", err)
	}
	if _, err := e.fake.Verify(tok.Token); err != nil {
		t.Fatal(err)
	}
	d.stop()
	d.noSecrets(revoked, testKey, tok.Token)
}

// TestSystemdUnits checks the files in systemd/ with systemd's own tools:
// systemd-analyze verify is silent on the units, systemd-analyze security
// rates tokend.service at 2.0 or lower, and systemd-sysusers accepts the
// sysusers.d file.
func TestSystemdUnits(t *testing.T) {
	analyze := requireTool(t, "systemd-analyze")
	src, err := filepath.Abs("../../systemd")
	if err != nil {
		t.Fatal(err)
	}
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(src, name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	service, socket := read("tokend.service"), read("tokend.socket")
	for _, want := range []string{"\nType=notify\n", "\nExecReload=/bin/kill -HUP $MAINPID\n", "\nLoadCredential=whop-api-key:/etc/tokend/whop-api-key\n", "\nStateDirectory=tokend\n", "\nRuntimeDirectory=tokend\n", "\nUser=tokend\n", "\nWatchdogSec="} {
		if !strings.Contains(service, want) {
			t.Errorf("tokend.service lacks %q", strings.TrimSpace(want))
		}
	}
	for _, want := range []string{"\nListenStream=/run/tokend/tokend.sock\n", "\nSocketMode=0660\n", "\nSocketGroup=tokend-clients\n"} {
		if !strings.Contains(socket, want) {
			t.Errorf("tokend.socket lacks %q", strings.TrimSpace(want))
		}
	}

	// verify insists that ExecStart= exists: point it at the tokend built
	// for these tests (make install rewrites it the same way).
	const execStart = "\nExecStart=/usr/local/bin/tokend\n"
	if !strings.Contains(service, execStart) {
		t.Fatalf("tokend.service lacks %q, which this test and the Makefile rewrite", strings.TrimSpace(execStart))
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "tokend.service"), []byte(strings.Replace(service, execStart, "\nExecStart="+bin.tokend+"\n", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "tokend.socket"), []byte(socket), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(analyze, "verify", filepath.Join(dir, "tokend.socket"), filepath.Join(dir, "tokend.service"))
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil || len(out) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}

	out, err := exec.Command(analyze, "security", "--offline=yes", filepath.Join(src, "tokend.service")).CombinedOutput()
	m := regexp.MustCompile(`Overall exposure level for tokend\.service: ([0-9.]+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("systemd-analyze security printed no exposure level (%v):\n%s", err, out)
	}
	level, _ := strconv.ParseFloat(string(m[1]), 64)
	t.Logf("systemd-analyze security --offline=yes: exposure %s", m[1])
	if level > 2.0 {
		t.Errorf("exposure level %s, want 2.0 or lower:\n%s", m[1], out)
	}

	if sysusers, err := exec.LookPath("systemd-sysusers"); err == nil {
		root := t.TempDir()
		if err := os.Mkdir(filepath.Join(root, "etc"), 0o755); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(sysusers, "--root="+root, filepath.Join(src, "tokend.sysusers")).CombinedOutput(); err != nil {
			t.Fatalf("systemd-sysusers rejects tokend.sysusers: %v\n%s", err, out)
		}
		passwd, _ := os.ReadFile(filepath.Join(root, "etc", "passwd"))
		group, _ := os.ReadFile(filepath.Join(root, "etc", "group"))
		if !regexp.MustCompile(`(?m)^tokend:x:\d+:\d+:`).Match(passwd) || !regexp.MustCompile(`(?m)^tokend:x:`).Match(group) || !regexp.MustCompile(`(?m)^tokend-clients:x:`).Match(group) {
			t.Fatalf("tokend.sysusers did not create user tokend and groups tokend, tokend-clients:\n%s\n%s", passwd, group)
		}
	}
}
