package main

import (
	"bytes"
	"context"
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden with the current output")

// checkGolden compares got with testdata/name.golden, or rewrites the file
// under -update.
func checkGolden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v; run 'go test ./cmd/tokenctl -update' to create it", err)
	}
	if got != string(want) {
		t.Errorf("output differs from %s (rerun with -update if the change is meant):\ngot:\n%s\nwant:\n%s", path, got, want)
	}
}

// multiCredential moves two of the canned entries to a second credential.
func multiCredential(f *fakeDaemon) {
	es, _ := cannedEntries()
	for _, e := range es {
		if e.GetKeyId() == "9e8d7c6b5a40" || e.GetKeyId() == "7a11ce0ffee0" {
			e.Credential = "acme"
		}
	}
	f.setEntries(es)
}

// TestGolden pins the full output of list, inspect and status, as tables
// and as JSON, against the fixed clock.
func TestGolden(t *testing.T) {
	tests := []struct {
		name  string
		args  []string
		setup func(*fakeDaemon)
	}{
		{name: "list", args: []string{"list"}},
		{name: "list.json", args: []string{"list", "-o", "json"}},
		{name: "list-credentials", args: []string{"list"}, setup: multiCredential},
		{name: "list-sort-expires", args: []string{"list", "--sort", "expires"}},
		{name: "list-sort-hits", args: []string{"list", "--sort", "hits"}},
		{name: "list-sort-state", args: []string{"list", "--sort", "state"}},
		{name: "list-sort-requested", args: []string{"list", "--sort", "requested"}},
		{name: "list-sort-refresh", args: []string{"list", "--sort", "refresh"}},
		{name: "list-sort-key", args: []string{"list", "--sort", "key"}},
		{name: "list-state", args: []string{"list", "--state", "failing,retrying"}},
		{name: "list-state.json", args: []string{"list", "--state", "idle", "-o", "json"}},
		{name: "list-credential", args: []string{"list", "--credential", "acme"}, setup: multiCredential},
		{name: "inspect", args: []string{"inspect", "a1b"}},
		{name: "inspect.json", args: []string{"inspect", "a1b", "-o", "json"}},
		{name: "inspect-failing", args: []string{"inspect", "c0f"}},
		{name: "inspect-no-token", args: []string{"inspect", "9e8"}},
		{name: "status", args: []string{"status"}},
		{name: "status.json", args: []string{"status", "-o", "json"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, sock := startFake(t)
			if tt.setup != nil {
				tt.setup(f)
			}
			code, stdout, stderr := runCLI(t, append([]string{"--socket", sock}, tt.args...)...)
			if code != 0 || stderr != "" {
				t.Fatalf("exit %d, stderr %q", code, stderr)
			}
			checkGolden(t, tt.name, stdout)
		})
	}
}

// TestListFitsTerminal lays out entries with ids as long as Whop's and two
// scopes each, in every state: no line may be wider than 80 columns.
func TestListFitsTerminal(t *testing.T) {
	base, _ := cannedEntries()
	var typical []*tokendv1.Entry
	for i, e := range base {
		e = proto.Clone(e).(*tokendv1.Entry)
		e.CompanyId, e.UserId = "biz_"+strings.Repeat(string(rune('a'+i)), 14), ""
		e.ScopedActions = []string{"memberships:read", "payments:write"}
		e.Hits = 99999
		e.LastRequestedAt = ts(-41*time.Minute - 12*time.Second)
		typical = append(typical, e)
	}
	tests := []struct {
		name    string
		entries []*tokendv1.Entry
		args    []string
	}{
		{"canned", base, []string{"list"}},
		{"typical", typical, []string{"list"}},
		// A CRED column costs room: it fits with the common states.
		{"typical, two credentials", func() []*tokendv1.Entry {
			var es []*tokendv1.Entry
			for i, e := range typical {
				if st := e.GetState(); st != tokendv1.EntryState_ENTRY_STATE_FRESH && st != tokendv1.EntryState_ENTRY_STATE_RETRYING {
					continue
				}
				e = proto.Clone(e).(*tokendv1.Entry)
				e.Hits = 9999
				if i%2 == 0 {
					e.Credential = "acme"
				}
				es = append(es, e)
			}
			return es
		}(), []string{"list"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, sock := startFake(t)
			f.setEntries(tt.entries)
			code, stdout, stderr := runCLI(t, append([]string{"--socket", sock}, tt.args...)...)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			lines := strings.Split(strings.TrimSuffix(stdout, "\n"), "\n")
			if len(lines) != len(tt.entries)+1 {
				t.Errorf("%d lines, want a header and %d entries:\n%s", len(lines), len(tt.entries), stdout)
			}
			for _, l := range lines {
				if n := utf8.RuneCountInString(l); n > termWidth {
					t.Errorf("line is %d columns wide, want at most %d:\n%s", n, termWidth, l)
				}
			}
		})
	}
}

// jwtLike matches anything shaped like a JWT: three base64url parts.
var jwtLike = regexp.MustCompile(`[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}`)

// TestNoTokenInOutput runs every command that shows entries or status, in
// both formats, against a fake that holds real-looking tokens, and looks
// for them in stdout and stderr.
func TestNoTokenInOutput(t *testing.T) {
	f, sock := startFake(t)
	var secrets []string
	for _, tok := range f.tokens {
		secrets = append(secrets, tok)
	}
	secrets = append(secrets, cannedSignature)

	// The check can see a token: get prints one.
	_, out, _ := runCLI(t, "--socket", sock, "get", "--company", "biz_alpha")
	if !strings.Contains(out, cannedSignature) || !jwtLike.MatchString(out) {
		t.Fatalf("get printed %q: the fake holds no canned token, so this test proves nothing", out)
	}

	var cmds [][]string
	for _, format := range []string{"table", "json"} {
		cmds = append(cmds, []string{"list", "-o", format}, []string{"status", "-o", format},
			[]string{"list", "--sort", "state", "--state", "fresh,failing", "-o", format})
		for _, key := range f.keys() {
			cmds = append(cmds, []string{"inspect", key, "-o", format}, []string{"refresh", key, "-o", format})
		}
	}
	for _, args := range cmds {
		code, stdout, stderr := runCLI(t, append([]string{"--socket", sock}, args...)...)
		if code != 0 {
			t.Errorf("%v: exit %d: %s", args, code, stderr)
		}
		assertNoToken(t, args, stdout+stderr, secrets)
	}

	// watch, until the entry goes.
	f.setOnGetEntry(func(call int, e *tokendv1.Entry) error {
		if call > 2 {
			return status.Error(codes.NotFound, "no entry")
		}
		return nil
	})
	for _, format := range []string{"table", "json"} {
		f.mu.Lock()
		f.getEntries = 0
		f.mu.Unlock()
		args := []string{"--socket", sock, "-o", format, "watch", "a1b"}
		code, stdout, stderr, _ := runWatch(t, 0, args...)
		if code != 0 {
			t.Errorf("%v: exit %d: %s", args, code, stderr)
		}
		assertNoToken(t, args, stdout+stderr, secrets)
	}

	// Evict last: it empties the fake.
	code, stdout, stderr := runCLI(t, "--socket", sock, "evict", "--all", "-o", "json")
	if code != 0 {
		t.Errorf("evict: exit %d: %s", code, stderr)
	}
	assertNoToken(t, []string{"evict"}, stdout+stderr, secrets)
}

func assertNoToken(t *testing.T, args []string, out string, secrets []string) {
	t.Helper()
	for _, s := range secrets {
		if strings.Contains(out, s) {
			t.Errorf("tokenctl %v printed a token or its signature:\n%s", args, out)
		}
	}
	if m := jwtLike.FindString(out); m != "" {
		t.Errorf("tokenctl %v printed something shaped like a JWT, %q:\n%s", args, m, out)
	}
}

// watchScript makes the fake's entry a1b2c3d4e5f6 go through a refresh
// attempt, two failures and a new token, then disappear.
func watchScript(call int, e *tokendv1.Entry) error {
	switch call {
	case 2:
		e.State = tokendv1.EntryState_ENTRY_STATE_REFRESHING
	case 3:
		e.State, e.Failures = tokendv1.EntryState_ENTRY_STATE_RETRYING, 1
		e.LastError = &tokendv1.UpstreamError{At: ts(5 * time.Second), HttpStatus: 503, Message: "Service unavailable", Retryable: true}
	case 4:
		e.Failures = 2
		e.LastError = &tokendv1.UpstreamError{At: ts(7 * time.Second), HttpStatus: 503, Message: "Service unavailable", Retryable: true}
	case 5:
		// Nothing changed: no line.
	case 6:
		e.State, e.Failures = tokendv1.EntryState_ENTRY_STATE_FRESH, 0
		e.ObtainedAt, e.ExpiresAt = ts(10*time.Second), ts(time.Hour+8*time.Second)
		e.Refreshes++
	case 7:
		// A failure and a refresh between two polls, printed in order.
		e.LastError = &tokendv1.UpstreamError{At: ts(20 * time.Second), Message: "dial tcp: i/o timeout", Retryable: true}
		e.ObtainedAt = ts(21 * time.Second)
		e.Refreshes++
	case 8:
		e.State, e.Failures = tokendv1.EntryState_ENTRY_STATE_FAILING, 1
		e.LastError = &tokendv1.UpstreamError{At: ts(30 * time.Second), HttpStatus: 403, Message: "Forbidden"}
	case 9:
		return status.Error(codes.NotFound, `no entry with key "a1b2c3d4e5f6"`)
	}
	return nil
}

// runWatch runs tokenctl with a wait that returns at once, recording the
// intervals asked for; cancelAfter > 0 cancels the context at that wait.
func runWatch(t *testing.T, cancelAfter int, args ...string) (code int, stdout, stderr string, waits []time.Duration) {
	t.Helper()
	var out, errb bytes.Buffer
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c := &cli{
		stdout: &out, stderr: &errb,
		getenv: func(string) string { return "" },
		now:    func() time.Time { return testNow },
		wait: func(ctx context.Context, d time.Duration) error {
			waits = append(waits, d)
			if len(waits) == cancelAfter {
				cancel()
			}
			return ctx.Err()
		},
	}
	code = c.run(ctx, args)
	return code, out.String(), errb.String(), waits
}

func TestWatch(t *testing.T) {
	for _, format := range []string{"table", "json"} {
		t.Run(format, func(t *testing.T) {
			f, sock := startFake(t)
			f.setOnGetEntry(watchScript)
			code, stdout, stderr, waits := runWatch(t, 0, "--socket", sock, "-o", format, "watch", "a1b", "--interval", "250ms")
			if code != 0 || stderr != "" {
				t.Fatalf("exit %d, stderr %q", code, stderr)
			}
			name := "watch"
			if format == "json" {
				name += ".json"
			}
			checkGolden(t, name, stdout)
			if len(waits) != 8 {
				t.Errorf("waited %d times, want 8 (one after each poll but the last)", len(waits))
			}
			for _, d := range waits {
				if d != 250*time.Millisecond {
					t.Errorf("waited %v between polls, want --interval 250ms", d)
				}
			}
		})
	}
}

func TestWatchStops(t *testing.T) {
	t.Run("canceled", func(t *testing.T) {
		_, sock := startFake(t)
		code, stdout, stderr, waits := runWatch(t, 3, "--socket", sock, "watch", "a1b")
		if code != 0 || stderr != "" {
			t.Errorf("exit %d, stderr %q; want a clean stop", code, stderr)
		}
		if len(waits) != 3 || waits[0] != time.Second {
			t.Errorf("waits %v, want three of the default 1s", waits)
		}
		if want := "2026-03-01T12:00:00Z  watching a1b2c3d4e5f6  fresh  expires in 41m12s  refreshes 2\n"; stdout != want {
			t.Errorf("stdout %q, want %q", stdout, want)
		}
	})
	t.Run("unknown key", func(t *testing.T) {
		_, sock := startFake(t)
		code, _, stderr, _ := runWatch(t, 0, "--socket", sock, "watch", "zz")
		check(t, want{code: 1, stderrHas: []string{`tokenctl: not found: no entry with key "zz"`}}, code, "", stderr)
	})
	t.Run("daemon fails", func(t *testing.T) {
		f, sock := startFake(t)
		f.setOnGetEntry(func(call int, _ *tokendv1.Entry) error {
			if call == 2 {
				return status.Error(codes.Unavailable, "shutting down")
			}
			return nil
		})
		code, _, stderr, _ := runWatch(t, 0, "--socket", sock, "watch", "a1b")
		check(t, want{code: 1, stderrHas: []string{"tokenctl: unavailable: shutting down"}}, code, "", stderr)
	})
	t.Run("bad interval", func(t *testing.T) {
		code, _, stderr, _ := runWatch(t, 0, "watch", "a1b", "--interval", "0s")
		check(t, want{code: 2, stderrHas: []string{"invalid --interval 0s"}}, code, "", stderr)
	})
}
