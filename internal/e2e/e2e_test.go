package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// TestEndToEnd walks the path a newcomer takes: get a token with the Go
// client and with tokenctl, hit the cache, survive a restart, evict.
func TestEndToEnd(t *testing.T) {
	e := newEnv(t)
	d := e.start()
	tc := e.tokens()

	first, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_e2e", ScopedActions: []string{"chat:read", "dms:message:manage"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.fake.Verify(first.Token); err != nil {
		t.Fatalf("token does not verify at the fake: %v", err)
	}
	if got := e.fake.CallsFor("biz_e2e"); got != 1 {
		t.Fatalf("upstream calls after first get = %d, want 1", got)
	}

	// Scopes in another order, and repeated, are the same key.
	again, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_e2e", ScopedActions: []string{"dms:message:manage", "chat:read", "chat:read"}})
	if err != nil {
		t.Fatal(err)
	}
	if again.Token != first.Token || again.KeyId != first.KeyId {
		t.Fatalf("reordered scopes gave another token or key: %s vs %s", again.KeyId, first.KeyId)
	}
	out := e.mustCtl("get", "--company", "biz_e2e", "--scope", "dms:message:manage", "--scope", "chat:read")
	if out != first.Token+"\n" {
		t.Fatalf("tokenctl get printed %q, want the token and a newline", out)
	}
	if got := e.fake.CallsFor("biz_e2e"); got != 1 {
		t.Fatalf("upstream calls after cache hits = %d, want 1", got)
	}

	// Admin views carry no token.
	for _, args := range [][]string{{"list"}, {"list", "-o", "json"}, {"inspect", first.KeyId[:6]}, {"inspect", first.KeyId, "-o", "json"}, {"status"}, {"status", "-o", "json"}} {
		out := e.mustCtl(args...)
		if strings.Contains(out, first.Token) || strings.Contains(out, testKey) {
			t.Fatalf("tokenctl %v printed a secret:\n%s", args, out)
		}
		if args[0] != "status" && !strings.Contains(out, first.KeyId) {
			t.Fatalf("tokenctl %v does not show key %s:\n%s", args, first.KeyId, out)
		}
	}

	// After a restart the token comes from bbolt with no upstream call.
	d.stop()
	if _, err := os.Stat(e.socket); !os.IsNotExist(err) {
		t.Fatalf("socket %s left behind after SIGTERM: %v", e.socket, err)
	}
	e.fake.ResetCounters()
	e.start()
	tc = e.tokens()
	restarted, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_e2e", ScopedActions: []string{"chat:read", "dms:message:manage"}})
	if err != nil {
		t.Fatal(err)
	}
	if restarted.Token != first.Token {
		t.Fatal("after restart tokend served a different token")
	}
	if n := e.fake.CallCount(); n != 0 {
		t.Fatalf("upstream calls after restart = %d, want 0", n)
	}

	// Evict, then exactly one upstream call for the next get.
	out = e.mustCtl("evict", first.KeyId[:8])
	if strings.TrimSpace(out) != first.KeyId {
		t.Fatalf("tokenctl evict printed %q, want %s", out, first.KeyId)
	}
	fresh, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_e2e", ScopedActions: []string{"chat:read", "dms:message:manage"}})
	if err != nil {
		t.Fatal(err)
	}
	if fresh.Token == first.Token {
		t.Fatal("after evict tokend served the evicted token")
	}
	if n := e.fake.CallCount(); n != 1 {
		t.Fatalf("upstream calls after evict = %d, want 1", n)
	}
	if _, err := e.fake.Verify(fresh.Token); err != nil {
		t.Fatal(err)
	}
}

// TestColdKeyCoalesced: 500 concurrent misses on one key make one call.
func TestColdKeyCoalesced(t *testing.T) {
	e := newEnv(t)
	e.start()
	e.fake.SetLatency(100 * time.Millisecond)
	tc := e.tokens()
	const n = 500
	var wg sync.WaitGroup
	tokens := make([]string, n)
	errs := make([]error, n)
	start := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			r, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{UserId: "user_cold", ScopedActions: []string{"chat:read"}})
			errs[i] = err
			if err == nil {
				tokens[i] = r.Token
			}
		}()
	}
	close(start)
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("call %d: %v", i, errs[i])
		}
		if tokens[i] != tokens[0] {
			t.Fatalf("call %d got a different token", i)
		}
	}
	if got := e.fake.CallsFor("user_cold"); got != 1 {
		t.Fatalf("%d concurrent cold gets made %d upstream calls, want 1", n, got)
	}
}

// TestOutageServesCachedToken: with the upstream answering 503 after the
// first token, callers keep the cached token until it expires, then get
// Unavailable; retries follow the backoff schedule.
func TestOutageServesCachedToken(t *testing.T) {
	e := newEnv(t)
	const lifetime = 4 * time.Second
	e.start("--token-lifetime", lifetime.String())
	tc := e.tokens()
	req := &tokendv1.GetTokenRequest{CompanyId: "biz_outage", MinTtl: durationpb.New(0)}
	first, err := tc.GetToken(ctx(t), req)
	if err != nil {
		t.Fatal(err)
	}
	e.fake.SetDefault(whoptestFault503)
	outageStart := time.Now()
	expires := first.ExpiresAt.AsTime()

	var served, unavailable int
	for time.Now().Before(expires.Add(1500 * time.Millisecond)) {
		r, err := tc.GetToken(ctx(t), req)
		now := time.Now()
		switch {
		case err == nil:
			if r.Token != first.Token {
				t.Fatal("a new token appeared while the upstream answers 503")
			}
			if !now.Before(expires) {
				t.Fatalf("served a token %v after it expired", now.Sub(expires))
			}
			served++
		case status.Code(err) == codes.Unavailable:
			// Allowed only once the token is (about to be) unusable.
			if expires.Sub(now) > 2*time.Second {
				t.Fatalf("Unavailable with %v of validity left: %v", expires.Sub(now), err)
			}
			if !strings.Contains(status.Convert(err).Message(), "503") {
				t.Fatalf("Unavailable does not carry the upstream status: %v", err)
			}
			unavailable++
		default:
			t.Fatalf("unexpected error: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if served == 0 || unavailable == 0 {
		t.Fatalf("served %d, unavailable %d: want both", served, unavailable)
	}
	// Backoff: initial 1s, factor 2, randomization 0.5 (so at least 0.5s,
	// 1s, 2s, ... between attempts). The first retry comes at the refresh
	// point, at least (2/3-0.1) of the lifetime in.
	window := time.Since(outageStart)
	obtained := expires.Add(-lifetime)
	earliest := obtained.Add(lifetime * 17 / 30) // 2/3 minus the 10% jitter
	allowed := 0
	for at, gap := earliest, 500*time.Millisecond; !at.After(outageStart.Add(window)); at, gap = at.Add(gap), gap*2 {
		allowed++
	}
	calls := e.fake.CallsFor("biz_outage") - 1
	t.Logf("outage window %v: %d GetToken served, %d unavailable, %d upstream retries (backoff allows %d)", window.Round(time.Millisecond), served, unavailable, calls, allowed)
	if calls < 1 || calls > allowed {
		t.Fatalf("upstream retries = %d, want between 1 and %d", calls, allowed)
	}
}

// TestBadInputs: every malformed request gets InvalidArgument naming the
// field, and the daemon keeps serving.
func TestBadInputs(t *testing.T) {
	e := newEnv(t)
	e.start()
	tc := e.tokens()
	long := strings.Repeat("a", 129)
	many := make([]string, 65)
	for i := range many {
		many[i] = "s" + strings.Repeat("x", i)
	}
	cases := []struct {
		name  string
		req   *tokendv1.GetTokenRequest
		field string
	}{
		{"no subject", &tokendv1.GetTokenRequest{ScopedActions: []string{"chat:read"}}, "company_id or user_id"},
		{"company prefix", &tokendv1.GetTokenRequest{CompanyId: "acme"}, "company_id"},
		{"user prefix", &tokendv1.GetTokenRequest{UserId: "biz_x"}, "user_id"},
		{"empty scope", &tokendv1.GetTokenRequest{CompanyId: "biz_x", ScopedActions: []string{"chat:read", ""}}, "scoped_actions[1]"},
		{"long scope", &tokendv1.GetTokenRequest{CompanyId: "biz_x", ScopedActions: []string{long}}, "scoped_actions[0]"},
		{"too many scopes", &tokendv1.GetTokenRequest{CompanyId: "biz_x", ScopedActions: many}, "scoped_actions"},
		{"negative min_ttl", &tokendv1.GetTokenRequest{CompanyId: "biz_x", MinTtl: durationpb.New(-time.Second)}, "min_ttl"},
		{"min_ttl over 3h", &tokendv1.GetTokenRequest{CompanyId: "biz_x", MinTtl: durationpb.New(3*time.Hour + time.Second)}, "min_ttl"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := tc.GetToken(ctx(t), c.req)
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("got %v, want InvalidArgument", err)
			}
			if msg := status.Convert(err).Message(); !strings.Contains(msg, c.field) {
				t.Fatalf("message %q does not name %q", msg, c.field)
			}
		})
	}
	if n := e.fake.CallCount(); n != 0 {
		t.Fatalf("bad requests reached the upstream %d times", n)
	}
	if _, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_x"}); err != nil {
		t.Fatalf("tokend stopped serving after bad input: %v", err)
	}
}

// TestUpstreamErrorCodes: Whop's refusals map to gRPC codes and carry
// Whop's message.
func TestUpstreamErrorCodes(t *testing.T) {
	e := newEnv(t)
	e.fake.AddKey("narrow", []string{"chat:read"})
	e.writeKey("narrow")
	// A short cooldown, so that the 429 case does not hold the cases after it.
	e.start("--rate-limit-cooldown", "50ms")
	tc := e.tokens()
	_, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_x", ScopedActions: []string{"payments:write"}})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(status.Convert(err).Message(), "payments:write") {
		t.Fatalf("scope outside the key: got %v, want PermissionDenied naming the scope", err)
	}
	if strings.Contains(err.Error(), "narrow") {
		t.Fatal("error carries the API key")
	}
	for _, c := range []struct {
		status int
		code   codes.Code
	}{{404, codes.NotFound}, {422, codes.InvalidArgument}, {500, codes.Unavailable}, {429, codes.Unavailable}, {400, codes.InvalidArgument}, {401, codes.FailedPrecondition}} { // 401 last: it locks the key out
		// A retryable status is tried three times within the call, as
		// Whop's SDKs do: it must fail each time to reach the caller.
		e.fake.Enqueue(faultStatus(c.status))
		if c.code == codes.Unavailable {
			e.fake.Enqueue(faultStatus(c.status), faultStatus(c.status))
		}
		_, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: fmt.Sprintf("biz_code%d", c.status)})
		if status.Code(err) != c.code {
			t.Errorf("upstream %d: got %v, want %v", c.status, err, c.code)
		}
	}
}

// TestDevMode runs the README's dev command and the tokenctl line it prints.
func TestDevMode(t *testing.T) {
	dir, err := os.MkdirTemp("", "tdd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := &env{t: t, dir: dir, socket: filepath.Join(dir, "tokend.sock")}
	d := e.startCmd([]string{"XDG_RUNTIME_DIR=" + dir}, bin.tokend, "--dev")
	e.waitReady(d)

	line := regexp.MustCompile(`(?m)^\s+go run ./cmd/tokenctl (.*)$`).FindStringSubmatch(d.Out.String())
	if line == nil {
		t.Fatalf("dev mode printed no tokenctl line:\n%s", d.Out.String())
	}
	cmd := exec.Command(bin.tokenctl, strings.Fields(line[1])...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("tokenctl %s: %v", line[1], err)
	}
	if tok := strings.TrimSpace(string(out)); strings.Count(tok, ".") != 2 {
		t.Fatalf("dev tokenctl line printed %q, want a JWT", out)
	}
	js, err := exec.Command(bin.tokenctl, "--socket", e.socket, "status", "-o", "json").Output()
	if err != nil {
		t.Fatal(err)
	}
	var st map[string]any
	if err := json.Unmarshal(js, &st); err != nil {
		t.Fatalf("status -o json is not JSON: %v\n%s", err, js)
	}
	d.stop()
}

// TestSecondDaemonFailsFast: a second tokend on the same state directory
// exits non-zero within a second, naming the locked file.
func TestSecondDaemonFailsFast(t *testing.T) {
	e := newEnv(t)
	first := e.start()
	start := time.Now()
	cmd := exec.Command(bin.tokend, "--socket", filepath.Join(e.dir, "second.sock"), "--state-dir", e.stateDir, "--whop-url", e.fake.URL(), "--api-key-file", e.keyFile)
	out, err := cmd.CombinedOutput()
	took := time.Since(start)
	if err == nil {
		t.Fatalf("second tokend exited 0:\n%s", out)
	}
	if took > time.Second {
		t.Fatalf("second tokend took %v to give up", took)
	}
	if want := filepath.Join(e.stateDir, "cache.db"); !strings.Contains(string(out), want) {
		t.Fatalf("error does not name %s:\n%s", want, out)
	}
	if want := fmt.Sprintf("process %d holds", first.Pid()); !strings.Contains(string(out), want) {
		t.Fatalf("error does not name the running tokend (%q):\n%s", want, out)
	}
	t.Logf("second tokend exited after %v: %s", took.Round(time.Millisecond), strings.TrimSpace(string(out)))
}
