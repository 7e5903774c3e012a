package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// refused runs tokend with args (plus env) and expects it to exit non-zero
// within 10s; it returns what tokend printed.
func (e *env) refused(env []string, args ...string) string {
	e.t.Helper()
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(c, bin.tokend, args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + e.dir}, env...)
	out, err := cmd.CombinedOutput()
	if err == nil {
		e.t.Fatalf("tokend %s exited 0; want it refused:\n%s", strings.Join(args, " "), out)
	}
	if c.Err() != nil {
		e.t.Fatalf("tokend %s did not exit within 10s:\n%s", strings.Join(args, " "), out)
	}
	return string(out)
}

// baseArgs are start's flags without --api-key-file, for cases that
// choose their own key source.
func (e *env) baseArgs(extra ...string) []string {
	return append([]string{"--socket", e.socket, "--state-dir", e.stateDir, "--whop-url", e.fake.URL(), "--log-level", "debug"}, extra...)
}

// fileState is what a test keeps of a file to prove nobody changed it.
type fileState struct {
	path    string
	mode    os.FileMode
	content string
}

func snapshotFile(t *testing.T, path string) fileState {
	t.Helper()
	fi, err := os.Lstat(path)
	must(t, err)
	b, err := os.ReadFile(path)
	must(t, err)
	return fileState{path, fi.Mode(), string(b)}
}

func (f fileState) unchanged(t *testing.T) {
	t.Helper()
	if got := snapshotFile(t, f.path); got != f {
		t.Fatalf("%s changed: mode %v -> %v, content %q -> %q", f.path, f.mode, got.mode, f.content, got.content)
	}
}

func requireRoot(t *testing.T, why string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skipf("needs root to %s", why)
	}
}

// TestSecuritySocketModeUnderUmask000: 30 starts under umask 000 with
// --socket-mode 0600 while the socket path is polled and its directory
// watched with inotify: the socket is never seen at its path with any mode
// but 0600, and the private directory it is bound in is never seen wider
// than 0700.
func TestSecuritySocketModeUnderUmask000(t *testing.T) {
	const starts = 30
	e := newEnv(t)
	ifd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	must(t, err)
	defer unix.Close(ifd)
	_, err = unix.InotifyAddWatch(ifd, e.dir, unix.IN_CREATE|unix.IN_MOVED_TO|unix.IN_ATTRIB)
	must(t, err)

	var polls, seen, inotifyEvents, widerSeen atomic.Int64
	var mu sync.Mutex
	var wider []string
	report := func(what string, mode os.FileMode) {
		widerSeen.Add(1)
		mu.Lock()
		defer mu.Unlock()
		if len(wider) < 5 {
			wider = append(wider, fmt.Sprintf("%s %v", what, mode))
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // tight Lstat polling of the final path
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			polls.Add(1)
			if fi, err := os.Lstat(e.socket); err == nil {
				seen.Add(1)
				if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
					report(e.socket, fi.Mode())
				}
			}
		}
	}()
	go func() { // every entry created, moved or chmod-ed in the directory
		defer wg.Done()
		buf := make([]byte, 64<<10)
		for {
			select {
			case <-stop:
				return
			default:
			}
			n, err := unix.Read(ifd, buf)
			if err != nil {
				time.Sleep(time.Millisecond)
				continue
			}
			for off := 0; off+unix.SizeofInotifyEvent <= n; {
				ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
				name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+int(ev.Len)]), "\x00")
				off += unix.SizeofInotifyEvent + int(ev.Len)
				inotifyEvents.Add(1)
				p := filepath.Join(e.dir, name)
				fi, err := os.Lstat(p)
				switch {
				case err != nil:
				case p == e.socket && fi.Mode().Perm() != 0o600:
					report(p, fi.Mode())
				case strings.HasPrefix(name, ".tk") && (!fi.IsDir() || fi.Mode().Perm()&^0o700 != 0):
					report(p, fi.Mode())
				}
			}
		}
	}()
	for i := range starts {
		d := e.startCmd(nil, "/bin/sh", "-c", `umask 000 && exec "$0" "$@"`, bin.tokend,
			"--socket", e.socket, "--socket-mode", "0600", "--state-dir", e.stateDir, "--whop-url", e.fake.URL(), "--api-key-file", e.keyFile)
		e.waitReady(d)
		if i == 0 {
			st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.Pid()))
			must(t, err)
			if !strings.Contains(string(st), "Umask:\t0000") {
				t.Fatalf("tokend does not run under umask 000:\n%s", st)
			}
		}
		d.stop()
	}
	close(stop)
	wg.Wait()
	t.Logf("%d starts under umask 000: %d polls of the socket path, %d saw a socket, %d inotify events; %d observations wider than 0600",
		starts, polls.Load(), seen.Load(), inotifyEvents.Load(), widerSeen.Load())
	if len(wider) > 0 {
		t.Fatalf("socket or private directory seen wider than asked for %d times, such as %v", widerSeen.Load(), wider)
	}
	if seen.Load() == 0 {
		t.Fatal("the poller never saw the socket: it proves nothing")
	}
	if ents, _ := filepath.Glob(filepath.Join(e.dir, ".tk*")); len(ents) != 0 {
		t.Fatalf("private directories left behind: %v", ents)
	}
}

// TestSecurityLinksNotFollowed: a symbolic link planted at the socket, the
// cache file, the pid file or the audit log never leads tokend to change
// the file it points to; directories another user controls are refused.
func TestSecurityLinksNotFollowed(t *testing.T) {
	requireRoot(t, "give files to another uid")
	tests := []struct {
		name  string
		setup func(e *env, target string) []string // returns extra flags
		// want is what the refusal says; "" means tokend starts, and
		// check then runs against the running daemon.
		want  []string
		check func(t *testing.T, e *env)
	}{
		{"link at the socket path", func(e *env, target string) []string {
			must(e.t, os.Symlink(target, e.socket))
			return nil
		}, []string{"symbolic link", "t.sock"}, nil},
		{"socket directory owned by nobody", func(e *env, target string) []string {
			must(e.t, os.Chown(e.dir, nobodyUID, nobodyUID))
			return nil
		}, []string{"socket directory", "owned by uid 65534"}, nil},
		{"socket directory writable by everyone", func(e *env, target string) []string {
			must(e.t, os.Chmod(e.dir, 0o777))
			return nil
		}, []string{"socket directory", "writable by others (its group and everyone) without the sticky bit"}, nil},
		{"nobody's link in a sticky socket directory", func(e *env, target string) []string {
			must(e.t, os.Chmod(e.dir, os.ModeSticky|0o777))
			must(e.t, os.Symlink(target, e.socket))
			must(e.t, os.Lchown(e.socket, nobodyUID, nobodyUID))
			return nil
		}, []string{"symbolic link"}, nil},
		{"state directory owned by nobody", func(e *env, target string) []string {
			must(e.t, os.Mkdir(e.stateDir, 0o700))
			must(e.t, os.Chown(e.stateDir, nobodyUID, nobodyUID))
			return nil
		}, []string{"state directory", "owned by uid 65534"}, nil},
		{"link at cache.db", func(e *env, target string) []string {
			must(e.t, os.Mkdir(e.stateDir, 0o700))
			must(e.t, os.Symlink(target, filepath.Join(e.stateDir, "cache.db")))
			return nil
		}, []string{"cache.db is a symbolic link"}, nil},
		{"link at the audit log", func(e *env, target string) []string {
			audit := filepath.Join(e.dir, "audit.jsonl")
			must(e.t, os.Symlink(target, audit))
			return []string{"--audit-log", audit}
		}, []string{"audit log", "is a symbolic link"}, nil},
		{"link at cache.db.pid is replaced", func(e *env, target string) []string {
			must(e.t, os.Mkdir(e.stateDir, 0o700))
			must(e.t, os.Symlink(target, filepath.Join(e.stateDir, "cache.db.pid")))
			return nil
		}, nil, func(t *testing.T, e *env) {
			pid := filepath.Join(e.stateDir, "cache.db.pid")
			fi, err := os.Lstat(pid)
			must(t, err)
			b, _ := os.ReadFile(pid)
			if !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o600 || strings.TrimSpace(string(b)) != fmt.Sprint(e.daemons[0].Pid()) {
				t.Fatalf("cache.db.pid is %v holding %q; want a 0600 file with pid %d in place of the link", fi.Mode(), b, e.daemons[0].Pid())
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			// A root file outside the test's directories, as /etc/shadow is.
			targetDir := t.TempDir()
			target := filepath.Join(targetDir, "root-secret")
			must(t, os.WriteFile(target, []byte("root only\n"), 0o600))
			before := snapshotFile(t, target)
			extra := tt.setup(e, target)
			if tt.want == nil {
				d := e.start(extra...)
				tt.check(t, e)
				d.stop()
			} else {
				out := e.refused(nil, append(e.baseArgs("--api-key-file", e.keyFile), extra...)...)
				for _, w := range tt.want {
					if !strings.Contains(out, w) {
						t.Fatalf("refusal does not say %q:\n%s", w, out)
					}
				}
				t.Logf("refused: %s", lastLine(out))
			}
			before.unchanged(t)
		})
	}
}

// TestSecurityDevModeRuntimeDir: dev mode keeps working in a private
// $XDG_RUNTIME_DIR and refuses one another user owns.
func TestSecurityDevModeRuntimeDir(t *testing.T) {
	requireRoot(t, "give a directory to another uid")
	dir, err := os.MkdirTemp("", "tdd")
	must(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := &env{t: t, dir: dir, socket: filepath.Join(dir, "tokend.sock")}
	d := e.startCmd([]string{"XDG_RUNTIME_DIR=" + dir}, bin.tokend, "--dev")
	e.waitReady(d)
	if fi, err := os.Lstat(e.socket); err != nil || fi.Mode().Perm() != 0o660 {
		t.Fatalf("dev socket: %v, %v; want 0660", fi.Mode(), err)
	}
	d.stop()
	must(t, os.Chown(dir, nobodyUID, nobodyUID))
	out := e.refused([]string{"XDG_RUNTIME_DIR=" + dir}, "--dev")
	if !strings.Contains(out, "socket directory "+dir+" is owned by uid 65534") {
		t.Fatalf("dev mode in nobody's runtime directory: %s", out)
	}
}

// TestSecurityUntrustedFiles: every file that steers tokend (policy, API
// key, config, credential, cache key) is refused at start when another
// non-root uid owns it or its group can write it, naming the file, its
// owner or mode, and what is expected.
func TestSecurityUntrustedFiles(t *testing.T) {
	requireRoot(t, "give files to another uid")
	type spoil struct {
		name string
		do   func(t *testing.T, path string)
		want string
	}
	spoils := []spoil{
		{"owned by uid 1234", func(t *testing.T, p string) { must(t, os.Chown(p, 1234, 1234)) }, "is owned by uid 1234 (mode 0600); want a file owned by root or tokend's uid 0"},
		{"mode 0620", func(t *testing.T, p string) { must(t, os.Chmod(p, 0o620)) }, "is mode 0620: writable by others (its group); want a file only root or uid 0 can write"},
	}
	files := []struct {
		name, file string
		// setup writes the file under test at path and returns the flags
		// (and environment) that make tokend read it.
		setup func(e *env, path string) (args, env []string)
	}{
		{"policy", "policy.yaml", func(e *env, p string) ([]string, []string) {
			must(e.t, os.WriteFile(p, []byte("rules: []\n"), 0o600))
			return e.baseArgs("--api-key-file", e.keyFile, "--policy", p), nil
		}},
		{"API key file", "key.txt", func(e *env, p string) ([]string, []string) {
			must(e.t, os.WriteFile(p, []byte(testKey+"\n"), 0o600))
			return e.baseArgs("--api-key-file", p), nil
		}},
		{"systemd credential", "whop-api-key", func(e *env, p string) ([]string, []string) {
			must(e.t, os.WriteFile(p, []byte(testKey+"\n"), 0o600))
			return e.baseArgs(), []string{"CREDENTIALS_DIRECTORY=" + filepath.Dir(p)}
		}},
		{"config file", "tokend.yaml", func(e *env, p string) ([]string, []string) {
			must(e.t, os.WriteFile(p, []byte("credentials:\n  - name: default\n    file: "+e.keyFile+"\n"), 0o600))
			return e.baseArgs("--config", p), nil
		}},
		{"credential file of the config", "chat-app.key", func(e *env, p string) ([]string, []string) {
			must(e.t, os.WriteFile(p, []byte(testKey+"\n"), 0o600))
			cfg := filepath.Join(e.dir, "main.yaml")
			must(e.t, os.WriteFile(cfg, []byte("credentials:\n  - name: default\n    file: "+p+"\n"), 0o600))
			return e.baseArgs("--config", cfg), nil
		}},
		{"cache key file", "cache.key", func(e *env, p string) ([]string, []string) {
			must(e.t, os.WriteFile(p, bytes.Repeat([]byte{7}, 32), 0o600))
			return e.baseArgs("--api-key-file", e.keyFile, "--cache-key-file", p), nil
		}},
	}
	for _, f := range files {
		for _, s := range spoils {
			t.Run(f.name+"/"+s.name, func(t *testing.T) {
				e := newEnv(t)
				credDir := filepath.Join(e.dir, "creds")
				must(t, os.Mkdir(credDir, 0o700))
				path := filepath.Join(credDir, f.file)
				args, env := f.setup(e, path)
				s.do(t, path)
				out := e.refused(env, args...)
				if !strings.Contains(out, path+" "+s.want) {
					t.Fatalf("refusal does not name %s and say %q:\n%s", path, s.want, out)
				}
				if strings.Contains(out, testKey) {
					t.Fatal("the refusal shows the API key")
				}
				t.Logf("%s", lastLine(out))
			})
		}
	}
	// The same files owned by root, mode 0400 as systemd's credentials are,
	// start: the rule does not lock out $CREDENTIALS_DIRECTORY.
	e := newEnv(t)
	credDir := filepath.Join(e.dir, "creds")
	must(t, os.Mkdir(credDir, 0o500))
	must(t, os.WriteFile(filepath.Join(credDir, "whop-api-key"), []byte(testKey+"\n"), 0o400))
	d := e.startCmd([]string{"CREDENTIALS_DIRECTORY=" + credDir}, bin.tokend, e.baseArgs()...)
	e.waitReady(d)
	if _, err := e.tokens().GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_cred"}); err != nil {
		t.Fatalf("with a root-owned 0400 credential: %v", err)
	}
	d.stop()
}

// TestSecurityUntrustedFilesOnReload: a policy or key file that becomes
// owned by another uid, or group-writable, is not taken on reload: tokend
// keeps the one in force, logs why naming the file, and keeps serving.
func TestSecurityUntrustedFilesOnReload(t *testing.T) {
	requireRoot(t, "give files to another uid")
	e := newEnv(t)
	policy := filepath.Join(e.dir, "policy.yaml")
	must(t, os.WriteFile(policy, []byte(`rules:
  - name: root-only
    users: [0]
    subjects:
      companies: ["biz_ok"]
    all_scopes: true
`), 0o600))
	d := e.start("--policy", policy)
	tc := e.tokens()
	_, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_ok"})
	must(t, err)

	steps := []struct {
		name, file, want, log string
		do                    func(path string) error
	}{
		{"key owned by uid 1234", e.keyFile, "is owned by uid 1234", "reload: keeping the current API key", func(p string) error { return os.Chown(p, 1234, 1234) }},
		{"key mode 0620", e.keyFile, "is mode 0620: writable by others (its group)", "reload: keeping the current API key", func(p string) error { return os.Chmod(p, 0o620) }},
		{"policy owned by uid 1234", policy, "is owned by uid 1234", "reload: keeping the current policy", func(p string) error { return os.Chown(p, 1234, 1234) }},
		{"policy mode 0620", policy, "is mode 0620: writable by others (its group)", "reload: keeping the current policy", func(p string) error { return os.Chmod(p, 0o620) }},
	}
	for i, s := range steps {
		// Rewrite the file so that, were it taken, the next call would
		// fail: a key the fake upstream refuses, a policy denying biz_ok.
		if s.file == policy {
			must(t, os.WriteFile(policy, []byte("rules: []\n"), 0o600))
		} else {
			e.writeKey("whop_key_the_upstream_does_not_know")
		}
		must(t, os.Chown(s.file, 0, 0))
		must(t, os.Chmod(s.file, 0o600))
		must(t, s.do(s.file))
		before := strings.Count(d.Out.String(), s.log)
		d.Signal(syscall.SIGHUP)
		deadline := time.Now().Add(10 * time.Second)
		for strings.Count(d.Out.String(), s.log) == before {
			if time.Now().After(deadline) {
				t.Fatalf("step %d (%s): no %q logged:\n%s", i, s.name, s.log, d.Out.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
		logLine := lastLine(grepLines(d.Out.String(), s.log))
		if !strings.Contains(logLine, s.file+" "+s.want) {
			t.Fatalf("step %s: reload log does not name %s and say %q:\n%s", s.name, s.file, s.want, logLine)
		}
		// Still serving, with the key and policy in force: a fresh subject
		// is minted with the old key, and biz_ok is still allowed.
		if _, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_ok", ScopedActions: []string{fmt.Sprintf("s:%d", i)}}); err != nil {
			t.Fatalf("step %s: after the refused reload: %v", s.name, err)
		}
		t.Logf("%s: %s", s.name, strings.TrimSpace(logLine))
	}
	d.stop()
}

// TestSecuritySecondInstanceKeepsMetrics: a second tokend refused by the
// cache lock, the gRPC socket or the metrics socket leaves the first one's
// metrics socket in place and answering; a regular file at the metrics
// path is refused, not removed.
func TestSecuritySecondInstanceKeepsMetrics(t *testing.T) {
	e := newEnv(t)
	msock := filepath.Join(e.dir, "m.sock")
	e.start("--metrics-addr", "unix:"+msock)
	var st0 unix.Stat_t
	must(t, unix.Lstat(msock, &st0))
	scrape(t, msock)
	other := func(name string) string { return filepath.Join(e.dir, name) }
	tests := []struct {
		name         string
		socket, dir  string
		wantInOutput string
	}{
		{"same state directory", other("s2.sock"), e.stateDir, "holds its lock"},
		{"same gRPC socket", e.socket, other("state2"), "address already in use"},
		{"same metrics socket only", other("s3.sock"), other("state3"), "--metrics-addr unix:" + msock},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := e.refused(nil, "--socket", tt.socket, "--state-dir", tt.dir, "--whop-url", e.fake.URL(), "--api-key-file", e.keyFile, "--metrics-addr", "unix:"+msock)
			if !strings.Contains(out, tt.wantInOutput) {
				t.Fatalf("second tokend's refusal does not say %q:\n%s", tt.wantInOutput, out)
			}
			var st unix.Stat_t
			must(t, unix.Lstat(msock, &st))
			if st.Ino != st0.Ino {
				t.Fatalf("the metrics socket was replaced (inode %d -> %d)", st0.Ino, st.Ino)
			}
			if m := scrape(t, msock); !strings.Contains(m, "tokend_gettoken_total") && !strings.Contains(m, "tokend_entries") {
				t.Fatalf("first tokend's metrics after the second was refused:\n%.300s", m)
			}
			t.Logf("refused, first still scraped: %s", lastLine(out))
		})
	}
	if st0.Mode&0o777 != 0o600 {
		t.Errorf("metrics socket mode %04o, want 0600", st0.Mode&0o777)
	}

	t.Run("regular file at the metrics path", func(t *testing.T) {
		e := newEnv(t)
		file := filepath.Join(e.dir, "m.sock")
		must(t, os.WriteFile(file, []byte("keep me\n"), 0o644))
		before := snapshotFile(t, file)
		out := e.refused(nil, e.baseArgs("--api-key-file", e.keyFile, "--metrics-addr", "unix:"+file)...)
		if !strings.Contains(out, "not a socket") || !strings.Contains(out, file) {
			t.Fatalf("refusal does not say a file is in the way at %s:\n%s", file, out)
		}
		before.unchanged(t)
	})
}

// lastLine is the last non-empty line of s.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
