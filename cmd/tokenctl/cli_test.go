package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// cannedToken is the token the fake's GetToken returns.
var cannedToken = func() string {
	_, tokens := cannedEntries()
	return tokens["a1b2c3d4e5f6"]
}()

// runCLI runs tokenctl with the fixed test clock and an empty environment.
func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	c := &cli{
		stdout: &out,
		stderr: &errb,
		getenv: func(string) string { return "" },
		now:    func() time.Time { return testNow },
	}
	code = c.run(context.Background(), args)
	return code, out.String(), errb.String()
}

// want describes an expected outcome; empty strings are not checked, and
// *Has fields are substrings.
type want struct {
	code      int
	stdout    string
	stdoutHas []string
	stderrHas []string
}

func check(t *testing.T, w want, code int, stdout, stderr string) {
	t.Helper()
	if code != w.code {
		t.Errorf("exit code = %d, want %d\nstdout:\n%s\nstderr:\n%s", code, w.code, stdout, stderr)
	}
	if w.stdout != "" && stdout != w.stdout {
		t.Errorf("stdout:\n%s\nwant:\n%s", stdout, w.stdout)
	}
	for _, s := range w.stdoutHas {
		if !strings.Contains(stdout, s) {
			t.Errorf("stdout does not contain %q:\n%s", s, stdout)
		}
	}
	for _, s := range w.stderrHas {
		if !strings.Contains(stderr, s) {
			t.Errorf("stderr does not contain %q:\n%s", s, stderr)
		}
	}
	if w.code == 0 && stderr != "" {
		t.Errorf("stderr on success: %s", stderr)
	}
}

func TestCommands(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want want
	}{
		{
			name: "get prints only the token",
			args: []string{"get", "--company", "biz_alpha", "--scope", "chat:read"},
			want: want{stdout: cannedToken + "\n"},
		},
		{
			name: "get invalid argument shows server message",
			args: []string{"get", "--company", "x"},
			want: want{code: 1, stderrHas: []string{`tokenctl: invalid argument: company_id "x": must start with "biz_"` + "\n"}},
		},
		{
			name: "get without subject",
			args: []string{"get", "--scope", "chat:read"},
			want: want{code: 2, stderrHas: []string{"get needs --company, --user, or both", "tokenctl get --help"}},
		},
		{
			name: "get negative min-ttl",
			args: []string{"get", "--user", "user_bob", "--min-ttl", "-1m"},
			want: want{code: 2, stderrHas: []string{"--min-ttl"}},
		},
		{
			name: "list by subject",
			args: []string{"list", "--subject", "user_bob"},
			want: want{stdout: "" +
				"KEY           SUBJECT   SCOPES STATE       EXPIRES REFRESH REQUESTED HITS\n" +
				"a1ff00112233  user_bob  *      retrying 3  3m ago  20s     5s ago       0\n"},
		},
		{
			name: "list bad sort",
			args: []string{"list", "--sort", "age"},
			want: want{code: 2, stderrHas: []string{`invalid --sort "age": use key, subject`}},
		},
		{
			name: "list bad state",
			args: []string{"list", "--state", "fresh,stale"},
			want: want{code: 2, stderrHas: []string{`invalid --state "stale": use fresh, refreshing, retrying, failing, idle, expired`}},
		},
		{
			name: "list nothing",
			args: []string{"list", "--subject", "biz_nobody"},
			want: want{stdout: "no entries\n"},
		},
		{
			name: "list takes no args",
			args: []string{"list", "extra"},
			want: want{code: 2, stderrHas: []string{"list takes no arguments"}},
		},
		{
			name: "inspect by prefix",
			args: []string{"inspect", "a1f"},
			want: want{stdoutHas: []string{
				"key:             a1ff00112233\n",
				"state:           retrying 3\n",
				"last refresh:    2026-03-01T11:59:20Z (40s ago): failed, http 502\n",
				"failures:        3 in a row\n",
				"last error:      2026-03-01T11:59:20Z (40s ago): http 502: bad gateway (retryable)\n",
				"  iat: 2026-03-01T10:57:00Z (1h3m ago)\n",
			}},
		},
		{
			name: "inspect ambiguous prefix",
			args: []string{"inspect", "a1"},
			want: want{code: 1, stderrHas: []string{`tokenctl: invalid argument: key prefix "a1" is ambiguous`}},
		},
		{
			name: "inspect unknown key",
			args: []string{"inspect", "zz"},
			want: want{code: 1, stderrHas: []string{`tokenctl: not found: no entry with key "zz"`}},
		},
		{
			name: "inspect needs a key",
			args: []string{"inspect"},
			want: want{code: 2, stderrHas: []string{"inspect needs a KEY"}},
		},
		{
			name: "refresh prints the entry",
			args: []string{"refresh", "a1b"},
			want: want{stdoutHas: []string{"key:             a1b2c3d4e5f6\n", "refreshes:       3\n", "expires at:      2026-03-01T13:00:00Z (in 1h)\n"}},
		},
		{
			name: "evict no target",
			args: []string{"evict"},
			want: want{code: 2, stderrHas: []string{"evict needs exactly one target", "tokenctl evict --help"}},
		},
		{
			name: "evict two targets",
			args: []string{"evict", "a1b", "--all"},
			want: want{code: 2, stderrHas: []string{"evict needs exactly one target"}},
		},
		{
			name: "evict subject and all",
			args: []string{"evict", "--subject", "biz_alpha", "--all"},
			want: want{code: 2, stderrHas: []string{"evict needs exactly one target"}},
		},
		{
			name: "evict two keys",
			args: []string{"evict", "a1b", "9e8"},
			want: want{code: 2, stderrHas: []string{"evict takes one KEY"}},
		},
		{
			name: "evict empty subject",
			args: []string{"evict", "--subject", ""},
			want: want{code: 2, stderrHas: []string{"--subject is empty"}},
		},
		{
			name: "evict by key",
			args: []string{"evict", "9e"},
			want: want{stdout: "9e8d7c6b5a40\n"},
		},
		{
			name: "evict by subject",
			args: []string{"evict", "--subject", "biz_alpha"},
			want: want{stdout: "9e8d7c6b5a40\na1b2c3d4e5f6\n"},
		},
		{
			name: "evict nothing",
			args: []string{"evict", "--subject", "biz_nobody"},
			want: want{stdout: "no entries evicted\n"},
		},
		{
			name: "unknown command",
			args: []string{"lst"}, // also close to "get"
			want: want{code: 2, stderrHas: []string{`unknown command "lst"`, `did you mean `, `"list"`, "tokenctl --help"}},
		},
		{
			name: "unknown flag",
			args: []string{"list", "--bogus"},
			want: want{code: 2, stderrHas: []string{"unknown flag: --bogus", "tokenctl list --help"}},
		},
		{
			name: "bad output",
			args: []string{"status", "-o", "yaml"},
			want: want{code: 2, stderrHas: []string{`invalid --output "yaml"`}},
		},
		{
			name: "help",
			args: []string{"--help"},
			want: want{stdoutHas: []string{"Available Commands:", "inspect"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, sock := startFake(t)
			code, stdout, stderr := runCLI(t, append([]string{"--socket", sock}, tt.args...)...)
			check(t, tt.want, code, stdout, stderr)
		})
	}
}

func TestGetRequest(t *testing.T) {
	f, sock := startFake(t)
	code, _, stderr := runCLI(t, "--socket", sock, "get", "--company", "biz_alpha", "--user", "user_carol",
		"--scope", "chat:read", "--scope", "chat:write", "--min-ttl", "5m")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	got := f.lastGetRequest()
	if got.GetCompanyId() != "biz_alpha" || got.GetUserId() != "user_carol" ||
		!reflect.DeepEqual(got.GetScopedActions(), []string{"chat:read", "chat:write"}) ||
		got.GetMinTtl().AsDuration() != 5*time.Minute {
		t.Errorf("request = %v", got)
	}
}

func TestEvictRemovesEntries(t *testing.T) {
	f, sock := startFake(t)
	code, stdout, stderr := runCLI(t, "--socket", sock, "evict", "--all")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if n := strings.Count(stdout, "\n"); n != 6 {
		t.Errorf("evict --all printed %d lines, want 6:\n%s", n, stdout)
	}
	if ks := f.keys(); len(ks) != 0 {
		t.Errorf("entries left after evict --all: %v", ks)
	}
}

func TestJSON(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string // JSON, compared after decoding
	}{
		{
			name: "get",
			args: []string{"get", "--company", "biz_alpha"},
			want: `{"token": "` + cannedToken + `", "expires_at": "2026-03-01T12:41:12Z", "key_id": "a1b2c3d4e5f6"}`,
		},
		{
			name: "list empty",
			args: []string{"list", "--subject", "biz_nobody"},
			want: `{"entries": []}`,
		},
		{
			name: "evict",
			args: []string{"evict", "--subject", "user_bob"},
			want: `{"key_ids": ["a1ff00112233"]}`,
		},
		{
			name: "evict nothing",
			args: []string{"evict", "--subject", "biz_nobody"},
			want: `{"key_ids": []}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, sock := startFake(t)
			code, stdout, stderr := runCLI(t, append([]string{"--socket", sock, "-o", "json"}, tt.args...)...)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			if !strings.HasSuffix(stdout, "}\n") || !strings.Contains(stdout, "\n  \"") {
				t.Errorf("want indented JSON ending in a newline, got:\n%s", stdout)
			}
			var got, want any
			if err := json.Unmarshal([]byte(stdout), &got); err != nil {
				t.Fatalf("stdout is not JSON: %v\n%s", err, stdout)
			}
			if err := json.Unmarshal([]byte(tt.want), &want); err != nil {
				t.Fatalf("bad want: %v", err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("got:\n%s\nwant:\n%s", stdout, tt.want)
			}
		})
	}
}

func TestStatusHitRatio(t *testing.T) {
	tests := []struct {
		name         string
		hits, misses uint64
		want         string
	}{
		{"no requests", 0, 0, "hit ratio:            -\n"},
		{"all hits", 5, 0, "hit ratio:            100.0%\n"},
		{"one in three", 1, 2, "hit ratio:            33.3%\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, sock := startFake(t)
			f.setStatus(&tokendv1.Status{Version: "dev", Hits: tt.hits, Misses: tt.misses})
			code, stdout, stderr := runCLI(t, "--socket", sock, "status")
			check(t, want{stdoutHas: []string{tt.want, "uptime:               -\n"}}, code, stdout, stderr)
		})
	}
}

func TestStatusLastUpstreamError(t *testing.T) {
	f, sock := startFake(t)
	f.setStatus(&tokendv1.Status{LastUpstreamError: &tokendv1.UpstreamError{
		At: ts(-90 * time.Second), Message: "dial tcp: i/o timeout", Retryable: true,
	}})
	code, stdout, stderr := runCLI(t, "--socket", sock, "status")
	check(t, want{stdoutHas: []string{
		"last upstream error:  2026-03-01T11:58:30Z (1m30s ago): network error: dial tcp: i/o timeout (retryable)\n",
	}}, code, stdout, stderr)
}

func TestServerErrors(t *testing.T) {
	tests := []struct {
		err  error
		want string
	}{
		{status.Error(codes.PermissionDenied, "uid 1000 is not in group tokend-admin"), "tokenctl: permission denied: uid 1000 is not in group tokend-admin\n"},
		{status.Error(codes.Unavailable, "shutting down"), "tokenctl: unavailable: shutting down\n"},
		{status.Error(codes.FailedPrecondition, "no api key configured"), "tokenctl: failed precondition: no api key configured\n"},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			f, sock := startFake(t)
			f.setErr(tt.err)
			code, _, stderr := runCLI(t, "--socket", sock, "status")
			if code != 1 || stderr != tt.want {
				t.Errorf("exit %d, stderr %q; want 1, %q", code, stderr, tt.want)
			}
		})
	}
}

func TestNoDaemon(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.sock")

	// A socket file nobody listens on any more: connection refused.
	stale := filepath.Join(dir, "stale.sock")
	lis, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	lis.SetUnlinkOnClose(false)
	lis.Close()

	tests := []struct {
		name   string
		socket string
		cause  string
	}{
		{"no such file", missing, "no such file or directory"},
		{"connection refused", stale, "connection refused"},
	}
	for _, tt := range tests {
		for _, cmd := range [][]string{{"status"}, {"list"}, {"get", "--company", "biz_x"}, {"inspect", "abc"}} {
			t.Run(tt.name+"/"+cmd[0], func(t *testing.T) {
				code, stdout, stderr := runCLI(t, append([]string{"--socket", tt.socket, "--timeout", "5s"}, cmd...)...)
				check(t, want{code: 1, stderrHas: []string{
					"tokenctl: no tokend answering on " + tt.socket + " (",
					tt.cause,
					"start one with 'tokend --dev'",
					"--socket / TOKEND_SOCKET",
				}}, code, stdout, stderr)
				if stdout != "" {
					t.Errorf("stdout = %q, want empty", stdout)
				}
			})
		}
	}
}

func TestRelativeSocket(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	code, _, stderr := runCLI(t, "--socket", "rel.sock", "status")
	check(t, want{code: 1, stderrHas: []string{"no tokend answering on " + filepath.Join(dir, "rel.sock")}}, code, "", stderr)
}

// TestRun drives the entry point main uses, with the socket from the
// environment.
func TestRun(t *testing.T) {
	_, sock := startFake(t)
	env := map[string]string{"TOKEND_SOCKET": sock}
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"get", "--user", "user_bob"}, &out, &errb, func(k string) string { return env[k] })
	if code != 0 || out.String() != cannedToken+"\n" || errb.Len() != 0 {
		t.Errorf("exit %d, stdout %q, stderr %q", code, out.String(), errb.String())
	}

	out.Reset()
	errb.Reset()
	code = run(context.Background(), []string{"frobnicate"}, &out, &errb, func(string) string { return "" })
	if code != 2 || !strings.Contains(errb.String(), `unknown command "frobnicate"`) {
		t.Errorf("unknown command: exit %d, stderr %q", code, errb.String())
	}
}

func TestTimeout(t *testing.T) {
	// A listener that accepts but never speaks gRPC: the call waits for the
	// server preface until --timeout.
	sock := filepath.Join(t.TempDir(), "mute.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		var conns []net.Conn
		for {
			c, err := lis.Accept()
			if err != nil {
				for _, c := range conns {
					c.Close()
				}
				return
			}
			conns = append(conns, c)
		}
	}()
	defer func() {
		lis.Close()
		<-done
	}()
	code, _, stderr := runCLI(t, "--socket", sock, "--timeout", "200ms", "status")
	check(t, want{code: 1, stderrHas: []string{"no answer from tokend on " + sock + " within 200ms; raise --timeout"}}, code, "", stderr)
}
