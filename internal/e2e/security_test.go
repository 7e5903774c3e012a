package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

const nobodyUID = 65534

// ctlAs runs tokenctl as uid/gid, as an unprivileged local process would.
func (e *env) ctlAs(uid, gid uint32, args ...string) (stdout, stderr string, code int) {
	e.t.Helper()
	return e.runCtl(&syscall.Credential{Uid: uid, Gid: gid}, args...)
}

// openToOthers lets another uid reach the socket: the boundary under test
// is tokend's, not the file system's.
func (e *env) openToOthers() {
	e.t.Helper()
	if os.Getuid() != 0 {
		e.t.Skip("needs root to run a client as another uid")
	}
	must(e.t, os.Chmod(e.dir, 0o755))
}

// TestSecurityOtherUID: a client running as nobody cannot use AdminService,
// and with a policy that allows nobody one company it gets tokens for that
// company only, with the scopes of its rule only.
func TestSecurityOtherUID(t *testing.T) {
	e := newEnv(t)
	e.openToOthers()
	policy := filepath.Join(e.dir, "policy.yaml")
	must(t, os.WriteFile(policy, []byte(`rules:
  - name: nobody-chat
    users: [nobody]
    subjects:
      companies: ["biz_allowed"]
    scopes: ["chat:read"]
`), 0o644))
	e.start("--socket-mode", "0666", "--policy", policy)

	_, errOut, code := e.ctlAs(nobodyUID, nobodyUID, "list")
	if code != 1 || !strings.Contains(errOut, "permission denied") || !strings.Contains(errOut, "uid 65534 refused") {
		t.Fatalf("list as nobody: exit %d, %q; want PermissionDenied naming uid 65534", code, errOut)
	}
	for _, args := range [][]string{{"evict", "--all"}, {"inspect", "abc"}, {"refresh", "abc"}} {
		if _, errOut, code := e.ctlAs(nobodyUID, nobodyUID, args...); code != 1 || !strings.Contains(errOut, "permission denied") {
			t.Fatalf("%v as nobody: exit %d, %q; want permission denied", args, code, errOut)
		}
	}
	if out, errOut, code := e.ctlAs(nobodyUID, nobodyUID, "status", "-o", "json"); code != 0 || !strings.Contains(out, "version") || strings.Contains(out, e.stateDir) || strings.Contains(out, `"name"`) {
		t.Fatalf("status as nobody should stay open with counters only: exit %d %q %q", code, out, errOut)
	}

	out, errOut, code := e.ctlAs(nobodyUID, nobodyUID, "get", "--company", "biz_allowed", "--scope", "chat:read")
	if code != 0 || strings.Count(strings.TrimSpace(out), ".") != 2 {
		t.Fatalf("allowed get as nobody: exit %d, %q %q", code, out, errOut)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"get", "--company", "biz_other", "--scope", "chat:read"}, `biz_other`},
		{[]string{"get", "--company", "biz_allowed", "--scope", "payments:write"}, `payments:write`},
		{[]string{"get", "--company", "biz_allowed"}, `all_scopes`},
	} {
		_, errOut, code := e.ctlAs(nobodyUID, nobodyUID, c.args...)
		if code != 1 || !strings.Contains(errOut, "permission denied: policy:") || !strings.Contains(errOut, c.want) {
			t.Fatalf("%v as nobody: exit %d, %q; want a policy denial mentioning %q", c.args, code, errOut, c.want)
		}
	}
	st := e.status(t)
	if !st.PolicyLoaded || st.MaxConnections != 1024 || st.StateDir == "" {
		t.Fatalf("status for root: policy_loaded %v, max_connections %d, state_dir %q", st.PolicyLoaded, st.MaxConnections, st.StateDir)
	}
	// Root may still administer, and policy check explains decisions.
	out = e.mustCtl("policy", "check", "--as", "nobody", "--company", "biz_allowed", "--scope", "chat:read")
	if !strings.Contains(out, `allowed by rule "nobody-chat"`) {
		t.Fatalf("policy check: %q", out)
	}
	out = e.mustCtl("policy", "check", "--as", "nobody", "--company", "biz_other", "--scope", "chat:read")
	if !strings.HasPrefix(out, "denied:") {
		t.Fatalf("policy check for another company: %q", out)
	}
}

// TestSecurityNoSecretsAnywhere: a full scenario at debug level leaves no
// token and no API key in the log, tokenctl's output, errors or the audit
// trail; the audit trail accounts for every hand-out; with a cache key the
// raw file holds no token, and another key means fetching again.
func TestSecurityNoSecretsAnywhere(t *testing.T) {
	e := newEnv(t)
	auditLog := filepath.Join(e.dir, "audit.jsonl")
	cacheKey := filepath.Join(e.dir, "cache.key")
	must(t, os.WriteFile(cacheKey, bytes.Repeat([]byte{7}, 32), 0o600))
	d := e.start("--audit-log", auditLog, "--cache-key-file", cacheKey, "--token-lifetime", "4s")
	tc := e.tokens()
	var issued []string
	var outputs []string
	handouts := 0
	get := func(req *tokendv1.GetTokenRequest) (*tokendv1.Token, error) {
		tok, err := tc.GetToken(ctx(t), req)
		if err == nil {
			issued = append(issued, tok.Token)
			handouts++
		} else {
			outputs = append(outputs, err.Error())
		}
		return tok, err
	}
	for i := range 5 {
		for range 3 {
			if _, err := get(&tokendv1.GetTokenRequest{CompanyId: "biz_sec", ScopedActions: []string{"chat:read"}, MinTtl: noMinTTL}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := get(&tokendv1.GetTokenRequest{UserId: "user_sec", CompanyId: "biz_sec", MinTtl: noMinTTL}); err != nil {
			t.Fatal(err)
		}
		if i == 2 {
			e.fake.Enqueue(faultStatus(503), faultStatus(403))
			get(&tokendv1.GetTokenRequest{CompanyId: "biz_err1"})
			get(&tokendv1.GetTokenRequest{CompanyId: "biz_err2"})
		}
	}
	list := e.mustCtl("list", "-o", "json")
	var entries struct {
		Entries []struct {
			KeyID string `json:"key_id"`
		} `json:"entries"`
	}
	must(t, json.Unmarshal([]byte(list), &entries))
	outputs = append(outputs, list, e.mustCtl("list"), e.mustCtl("status", "-o", "json"))
	for _, en := range entries.Entries {
		// Entries may go meanwhile (idle, or failed keys reaped): any output counts.
		for _, args := range [][]string{{"inspect", en.KeyID, "-o", "json"}, {"inspect", en.KeyID}} {
			out, errOut, _ := e.ctl(args...)
			outputs = append(outputs, out, errOut)
		}
		if out, _, code := e.ctl("refresh", en.KeyID); code == 0 {
			outputs = append(outputs, out)
		}
	}
	e.mustCtl("evict", "--subject", "biz_sec")
	if _, err := get(&tokendv1.GetTokenRequest{CompanyId: "biz_sec", ScopedActions: []string{"chat:read"}, MinTtl: noMinTTL}); err != nil {
		t.Fatal(err)
	}
	if st := e.status(t); !st.CacheSealed {
		t.Fatal("status does not say the cache is sealed")
	}
	d.stop()

	raw, err := os.ReadFile(filepath.Join(e.stateDir, "cache.db"))
	must(t, err)
	auditText, err := os.ReadFile(auditLog)
	must(t, err)
	places := map[string]string{"tokend log": d.Out.String(), "audit log": string(auditText), "cache.db": string(raw)}
	for i, o := range outputs {
		places["tokenctl/error output "+string(rune('a'+i%26))] = o
	}
	for name, text := range places {
		for _, tok := range issued {
			if strings.Contains(text, tok) {
				t.Fatalf("%s contains an issued token", name)
			}
			// A JWT's signature alone is enough to misuse nothing, but its
			// payload must not leak either.
			if parts := strings.Split(tok, "."); len(parts) == 3 && strings.Contains(text, parts[1]) {
				t.Fatalf("%s contains a token payload", name)
			}
		}
		if strings.Contains(text, testKey) || strings.Contains(text, testKey[len(testKey)-12:]) {
			t.Fatalf("%s contains the API key or part of it", name)
		}
	}

	// The audit trail accounts for every hand-out, with our uid.
	counted := 0
	sc := bufio.NewScanner(bytes.NewReader(auditText))
	for sc.Scan() {
		var line struct {
			Msg    string `json:"msg"`
			UID    *int   `json:"uid"`
			Source string `json:"source"`
			Count  int    `json:"count"`
		}
		must(t, json.Unmarshal(sc.Bytes(), &line))
		switch line.Msg {
		case "handout":
			counted++
		case "hits":
			counted += line.Count
		default:
			continue
		}
		if line.UID == nil || *line.UID != os.Getuid() {
			t.Fatalf("audit line without the caller's uid: %s", sc.Text())
		}
		if line.Source != "hit" && line.Source != "mint" {
			t.Fatalf("audit line without a hit/mint flag: %s", sc.Text())
		}
	}
	if counted != handouts {
		t.Fatalf("audit trail accounts for %d hand-outs, the scenario made %d\n%s", counted, handouts, auditText)
	}

	// Restart with another cache key: records are discarded, tokens fetched
	// again and served.
	must(t, os.WriteFile(cacheKey, bytes.Repeat([]byte{9}, 32), 0o600))
	e.fake.ResetCounters()
	d = e.start("--cache-key-file", cacheKey)
	if _, err := e.tokens().GetToken(ctx(t), &tokendv1.GetTokenRequest{UserId: "user_sec", CompanyId: "biz_sec", MinTtl: noMinTTL}); err != nil {
		t.Fatal(err)
	}
	if n := e.fake.CallCount(); n != 1 {
		t.Fatalf("after a cache key change: %d upstream calls, want 1", n)
	}
	if !strings.Contains(d.Out.String(), "sealed under another cache key") {
		t.Fatalf("tokend did not log the discarded records:\n%s", d.Out.String())
	}
}

// TestSecurityAuditVolume: 100,000 hits on one connection produce a
// bounded number of audit lines.
func TestSecurityAuditVolume(t *testing.T) {
	e := newEnv(t)
	auditLog := filepath.Join(e.dir, "audit.jsonl")
	d := e.start("--audit-log", auditLog)
	tc := e.tokens()
	req := &tokendv1.GetTokenRequest{CompanyId: "biz_vol"}
	const calls = 100_000
	const workers = 8 // concurrent calls on the one connection
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range calls / workers {
				if _, err := tc.GetToken(ctx(t), req); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	d.stop() // closes the connection's summary
	b, err := os.ReadFile(auditLog)
	must(t, err)
	lines := bytes.Count(b, []byte("\n"))
	total := 0
	for _, l := range bytes.Split(bytes.TrimSpace(b), []byte("\n")) {
		var line struct {
			Msg   string `json:"msg"`
			Count int    `json:"count"`
		}
		must(t, json.Unmarshal(l, &line))
		switch line.Msg {
		case "handout":
			total++
		case "hits":
			total += line.Count
		}
	}
	t.Logf("%d hits on one connection: %d audit lines", calls, lines)
	if lines > 10 {
		t.Fatalf("%d audit lines for %d hits on one connection; want a handful", lines, calls)
	}
	if total != calls {
		t.Fatalf("audit counts %d hand-outs, want %d", total, calls)
	}
}

// TestSecurityOversizedMessage: a request over 16 KiB gets
// ResourceExhausted and the daemon keeps serving.
func TestSecurityOversizedMessage(t *testing.T) {
	e := newEnv(t)
	e.start()
	tc := e.tokens()
	_, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_big", ScopedActions: []string{strings.Repeat("x", 20<<10)}})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("20 KiB request: %v, want ResourceExhausted", err)
	}
	if _, err := e.tokens().GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_big"}); err != nil {
		t.Fatalf("tokend stopped serving after an oversized message: %v", err)
	}
}
