package e2e

import (
	"context"
	crand "crypto/rand"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokend/tokend/internal/whop/whoptest"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

var (
	whoptestFault503 = whoptest.Fault{Status: 503}
	noMinTTL         = durationpb.New(0)
	// fast lifts the limiter out of the way of tests that are not about it.
	fast = []string{"--upstream-rate", "5000", "--upstream-burst", "5000", "--upstream-max-inflight", "16"}
)

func faultStatus(s int) whoptest.Fault { return whoptest.Fault{Status: s} }

func companyKey(i int) *tokendv1.GetTokenRequest {
	return &tokendv1.GetTokenRequest{CompanyId: fmt.Sprintf("biz_k%04d", i), MinTtl: noMinTTL}
}

// warm mints n company keys with parallel callers and returns their tokens.
func warm(t *testing.T, tc tokendv1.TokenServiceClient, n int) []*tokendv1.Token {
	t.Helper()
	toks := make([]*tokendv1.Token, n)
	var wg sync.WaitGroup
	var next atomic.Int64
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
				tok, err := tc.GetToken(context.Background(), companyKey(i))
				if err != nil {
					t.Errorf("warm key %d: %v", i, err)
					return
				}
				toks[i] = tok
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	return toks
}

func (e *env) status(t *testing.T) *tokendv1.Status {
	t.Helper()
	st, err := tokendv1.NewAdminServiceClient(e.dial()).GetStatus(ctx(t), &tokendv1.GetStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestFaultOutage: 50 cached keys, then the upstream answers 503 and later
// drops connections until every token has expired. Clients see no error
// while a token is valid (short of tokend's 1 s expiry margin), Unavailable
// after, and service is back within one backoff interval of recovery.
func TestFaultOutage(t *testing.T) {
	e := newEnv(t)
	const keys = 50
	const retryMax = time.Second
	e.start(append(fast, "--token-lifetime", "6s", "--retry-initial", "200ms", "--retry-max", retryMax.String())...)
	tc := e.tokens()
	toks := warm(t, tc, keys)
	e.fake.ResetCounters()
	e.fake.SetDefault(whoptestFault503)
	outage := time.Now()
	var lastExpiry time.Time
	for _, tok := range toks {
		lastExpiry = maxTime(lastExpiry, tok.ExpiresAt.AsTime())
	}
	go func() {
		time.Sleep(2 * time.Second)
		e.fake.SetDefault(whoptest.Fault{Drop: true})
	}()

	var calls, okCalls, unavailable, badErrors atomic.Int64
	var firstBad atomic.Value
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; time.Now().Before(lastExpiry.Add(500 * time.Millisecond)); i = (i + 1) % keys {
				r, err := tc.GetToken(context.Background(), companyKey(i))
				now := time.Now()
				calls.Add(1)
				valid := now.Before(toks[i].ExpiresAt.AsTime().Add(-time.Second))
				switch {
				case err == nil && r.Token == toks[i].Token:
					okCalls.Add(1)
				case err == nil:
					badErrors.Add(1)
					firstBad.CompareAndSwap(nil, "a different token during the outage")
				case status.Code(err) == codes.Unavailable && !valid:
					unavailable.Add(1)
				default:
					badErrors.Add(1)
					firstBad.CompareAndSwap(nil, fmt.Sprintf("key %d, %v before expiry: %v", i, toks[i].ExpiresAt.AsTime().Sub(now), err))
				}
			}
		}()
	}
	wg.Wait()
	upstream := e.fake.CallCount()
	t.Logf("outage of %v: %d GetToken calls (%d served, %d Unavailable after expiry), %d upstream calls for %d keys",
		time.Since(outage).Round(time.Millisecond), calls.Load(), okCalls.Load(), unavailable.Load(), upstream, keys)
	if n := badErrors.Load(); n > 0 {
		t.Fatalf("%d wrong answers while tokens were valid; first: %v", n, firstBad.Load())
	}
	if calls.Load() < 10_000 {
		t.Fatalf("only %d calls during the outage; the test wants at least 10,000", calls.Load())
	}
	if unavailable.Load() == 0 {
		t.Fatal("no Unavailable after the tokens expired")
	}
	// Per key, retries are spaced at least 100ms, 200ms, 400ms, then 500ms
	// apart (the backoff's 50% randomization floor under --retry-initial
	// 200ms and --retry-max 1s); counting from the outage's start, not the
	// later refresh point, errs on the generous side.
	window := time.Since(outage)
	perKey := 0
	for at, gap := time.Duration(0), 100*time.Millisecond; at <= window; at, gap = at+gap, min(2*gap, retryMax/2) {
		perKey++
	}
	perKey++ // a caller's miss may coincide with the first retry
	if upstream > keys*perKey {
		t.Fatalf("%d upstream calls during the outage; the backoff allows at most %d per key (%d)", upstream, perKey, keys*perKey)
	}

	// Recovery: every key serves again within one backoff interval
	// (--retry-max, plus its 50% randomization).
	e.fake.SetDefault(whoptest.Fault{})
	recovered := time.Now()
	for i := range keys {
		for {
			if _, err := tc.GetToken(context.Background(), companyKey(i)); err == nil {
				break
			}
			if time.Since(recovered) > retryMax*3/2+time.Second {
				t.Fatalf("key %d still failing %v after the upstream recovered", i, time.Since(recovered))
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	t.Logf("all %d keys served again %v after recovery", keys, time.Since(recovered).Round(time.Millisecond))
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// TestFaultQuota: a 429 with Retry-After pauses all upstream traffic, and
// a burst of cold keys never exceeds the in-flight bound at the fake.
func TestFaultQuota(t *testing.T) {
	e := newEnv(t)
	e.start("--upstream-max-inflight", "4", "--upstream-rate", "2000", "--upstream-burst", "2000")
	tc := e.tokens()

	e.fake.Enqueue(whoptest.Fault{Status: 429, RetryAfter: "2"})
	// A caller that cannot wait out the 2s gets the 429 at once; with
	// more time the call would retry after it (TestFaultInCallRetry).
	short, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := tc.GetToken(short, companyKey(0)); status.Code(err) != codes.Unavailable {
		t.Fatalf("429: got %v, want Unavailable", err)
	}
	if _, err := tc.GetToken(ctx(t), companyKey(1)); err != nil {
		t.Fatal(err)
	}
	calls := e.fake.Calls()
	if len(calls) != 2 {
		t.Fatalf("calls = %d, want 2", len(calls))
	}
	gap := calls[1].At.Sub(calls[0].At)
	t.Logf("after 429 Retry-After: 2 the next upstream call came %v later", gap.Round(time.Millisecond))
	if gap < 2*time.Second {
		t.Fatalf("upstream called again %v after a 429 with Retry-After: 2", gap)
	}

	e.fake.ResetCounters()
	e.fake.SetLatency(20 * time.Millisecond)
	var wg sync.WaitGroup
	var failures atomic.Int64
	for i := range 1000 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := tc.GetToken(ctx(t), companyKey(1000+i)); err != nil {
				failures.Add(1)
			}
		}()
	}
	wg.Wait()
	t.Logf("1000 cold keys at once: %d upstream calls, at most %d in flight at the fake, %d failures", e.fake.CallCount(), e.fake.MaxInFlight(), failures.Load())
	if failures.Load() != 0 || e.fake.CallCount() != 1000 {
		t.Fatalf("%d failures, %d calls; want 0 and 1000", failures.Load(), e.fake.CallCount())
	}
	if m := e.fake.MaxInFlight(); m > 4 {
		t.Fatalf("%d upstream calls in flight at once; the bound is 4", m)
	}
}

// TestFaultCrash: kill -9 at random moments while tokend refreshes 1,000
// entries; every restart opens the DB, serves only valid tokens, and makes
// no upstream call for keys whose write had committed.
func TestFaultCrash(t *testing.T) {
	e := newEnv(t)
	const keys = 1000
	// 20s tokens refreshed every 1-3s keep ~400 refreshes a second going.
	flags := append(fast, "--token-lifetime", "20s", "--refresh-at", "0.15")
	d := e.start(flags...)
	warm(t, e.tokens(), keys)
	for round := range 20 {
		time.Sleep(time.Duration(100+rand.IntN(500)) * time.Millisecond)
		refreshing := e.fake.CallCount()
		d.Kill()
		d = e.start(flags...)
		st := e.status(t)
		loaded := st.Entries
		tc := e.tokens()
		var wg sync.WaitGroup
		var bad atomic.Value
		var next atomic.Int64
		for range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := int(next.Add(1) - 1); i < keys; i = int(next.Add(1) - 1) {
					tok, err := tc.GetToken(context.Background(), companyKey(i))
					if err != nil {
						bad.CompareAndSwap(nil, fmt.Sprintf("key %d: %v", i, err))
						return
					}
					if _, err := e.fake.Verify(tok.Token); err != nil {
						bad.CompareAndSwap(nil, fmt.Sprintf("key %d: token does not verify: %v", i, err))
						return
					}
				}
			}()
		}
		wg.Wait()
		if b := bad.Load(); b != nil {
			t.Fatalf("round %d: %v", round, b)
		}
		misses := e.status(t).Misses
		if misses > keys-loaded {
			t.Fatalf("round %d: %d entries loaded but %d misses: a committed key cost an upstream call\n%s", round, loaded, misses, grepLines(d.Out.String(), "cache miss"))
		}
		if round%5 == 0 {
			t.Logf("round %d: killed after %d upstream calls; restart loaded %d entries, %d misses", round, refreshing, loaded, misses)
		}
	}
}

// TestFaultCorruption: a file of random bytes, a truncated DB and a DB with
// one undecodable record each leave tokend starting and serving, with the
// reason in its log.
func TestFaultCorruption(t *testing.T) {
	cases := []struct {
		name   string
		damage func(t *testing.T, path string)
		log    string
	}{
		{"random bytes", func(t *testing.T, path string) {
			b := make([]byte, 64<<10)
			crand.Read(b)
			must(t, os.WriteFile(path, b, 0o600))
		}, "moved it aside"},
		{"truncated", func(t *testing.T, path string) {
			// Three pages: the meta pages survive, the data they point at
			// does not.
			must(t, os.Truncate(path, 3*4096))
		}, "moved it aside"},
		{"undecodable record", func(t *testing.T, path string) {
			db, err := bolt.Open(path, 0o600, nil)
			must(t, err)
			must(t, db.Update(func(tx *bolt.Tx) error {
				return tx.Bucket([]byte("entries")).Put([]byte("\x01garbage"), []byte("\xff\xff\xff"))
			}))
			must(t, db.Close())
		}, "dropping undecodable cache record"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			d := e.start(fast...)
			warm(t, e.tokens(), 300)
			d.stop()
			c.damage(t, filepath.Join(e.stateDir, "cache.db"))
			d = e.start(fast...)
			if _, err := e.tokens().GetToken(ctx(t), companyKey(0)); err != nil {
				t.Fatalf("tokend does not serve after %s: %v", c.name, err)
			}
			if !strings.Contains(d.Out.String(), c.log) {
				t.Fatalf("log does not say %q:\n%s", c.log, d.Out.String())
			}
			if c.name == "undecodable record" && e.status(t).Entries < 300 {
				t.Fatalf("the good records did not load: %d entries", e.status(t).Entries)
			}
		})
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestFaultIdleAndBounds: an entry requested once is refreshed at most once
// more and then disappears; the 101st key evicts the least recently
// requested when the bound is 100.
func TestFaultIdleAndBounds(t *testing.T) {
	t.Run("idle", func(t *testing.T) {
		e := newEnv(t)
		e.start("--token-lifetime", "3s")
		tok, err := e.tokens().GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_idle", MinTtl: noMinTTL})
		must(t, err)
		deadline := time.Now().Add(15 * time.Second)
		sawIdle := false
		for {
			out := e.mustCtl("list")
			sawIdle = sawIdle || strings.Contains(out, "idle")
			if !strings.Contains(out, tok.KeyId) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("idle entry still listed after 15s:\n%s", out)
			}
			time.Sleep(100 * time.Millisecond)
		}
		if n := e.fake.CallsFor("biz_idle"); n > 2 {
			t.Fatalf("an entry requested once was minted %d times, want at most 2", n)
		}
		if !sawIdle {
			t.Fatal("tokenctl list never showed the entry as idle")
		}
		if st := e.status(t); st.DroppedIdle != 1 {
			t.Fatalf("status dropped_idle = %d, want 1", st.DroppedIdle)
		}
	})
	t.Run("bound", func(t *testing.T) {
		e := newEnv(t)
		e.start(append(fast, "--max-entries", "100")...)
		tc := e.tokens()
		for i := range 100 {
			_, err := tc.GetToken(ctx(t), companyKey(i))
			must(t, err)
		}
		for i := 1; i < 100; i++ { // key 0 is now the least recently requested
			_, err := tc.GetToken(ctx(t), companyKey(i))
			must(t, err)
		}
		_, err := tc.GetToken(ctx(t), companyKey(100))
		must(t, err)
		out := e.mustCtl("list", "--subject", "biz_k0000")
		if strings.Contains(out, "biz_k0000") {
			t.Fatalf("least recently requested key not evicted:\n%s", out)
		}
		st := e.status(t)
		if st.Entries != 100 || st.EvictedOverCapacity != 1 {
			t.Fatalf("entries %d, evicted %d; want 100 and 1", st.Entries, st.EvictedOverCapacity)
		}
	})
}

// TestFaultNegativeCache: 100 calls for a subject Whop refuses with 403 make
// one upstream call; every caller gets PermissionDenied with Whop's message.
func TestFaultNegativeCache(t *testing.T) {
	e := newEnv(t)
	e.fake.AddKey("narrow", []string{"chat:read"})
	e.writeKey("narrow")
	e.start()
	tc := e.tokens()
	req := &tokendv1.GetTokenRequest{CompanyId: "biz_neg", ScopedActions: []string{"payments:write"}}
	var wg sync.WaitGroup
	errs := make([]error, 100)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = tc.GetToken(ctx(t), req)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(status.Convert(err).Message(), "You do not have permission") {
			t.Fatalf("call %d: %v, want PermissionDenied with Whop's message", i, err)
		}
	}
	if n := e.fake.CallsFor("biz_neg"); n != 1 {
		t.Fatalf("100 calls for a 403 subject made %d upstream calls, want 1", n)
	}
}

// TestFaultRejectedToken: 100 concurrent callers reporting the same
// rejected token cause one upstream call and all get the same new token.
func TestFaultRejectedToken(t *testing.T) {
	e := newEnv(t)
	e.start()
	tc := e.tokens()
	old, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_rej"})
	must(t, err)
	e.fake.SetLatency(50 * time.Millisecond)
	got := make([]string, 100)
	var wg sync.WaitGroup
	for i := range got {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_rej", RejectedToken: old.Token})
			if err != nil {
				t.Error(err)
				return
			}
			got[i] = r.Token
		}()
	}
	wg.Wait()
	for _, v := range got {
		if v == old.Token || v != got[0] {
			t.Fatal("callers did not all receive the same new token")
		}
	}
	if n := e.fake.CallsFor("biz_rej"); n != 2 {
		t.Fatalf("100 reports made %d upstream calls, want 1", n-1)
	}
	if strings.Contains(e.daemonLogs(), old.Token) {
		t.Fatal("the rejected token appears in tokend's log")
	}
}

// TestFaultRestartHerd: 1,000 entries whose refresh fell due while tokend
// was stopped are refreshed spread over --restart-spread, within the
// limiter's rate, while every valid token is served from the first call.
func TestFaultRestartHerd(t *testing.T) {
	e := newEnv(t)
	const keys = 1000
	const rate, burst = 400, 20
	d := e.start(append(fast, "--token-lifetime", "12s", "--refresh-at", "0.15")...)
	warm(t, e.tokens(), keys)
	d.stop()
	time.Sleep(2 * time.Second) // every refresh (1.8s after minting at the latest) falls due
	e.fake.ResetCounters()
	restart := time.Now()
	e.start("--token-lifetime", "12s", "--refresh-at", "0.15", "--restart-spread", "3s",
		"--upstream-rate", fmt.Sprint(rate), "--upstream-burst", fmt.Sprint(burst), "--upstream-max-inflight", "16")
	warm(t, e.tokens(), keys)
	if st := e.status(t); st.Misses != 0 {
		t.Fatalf("%d of the first calls after restart were misses; valid tokens must be served at once", st.Misses)
	}
	deadline := time.Now().Add(20 * time.Second)
	first := map[string]time.Time{}
	for len(first) < keys {
		if time.Now().After(deadline) {
			var missing []string
			for i := range keys {
				if _, ok := first[fmt.Sprintf("biz_k%04d", i)]; !ok {
					missing = append(missing, fmt.Sprintf("biz_k%04d", i))
				}
			}
			if len(missing) > 0 {
				t.Logf("first missing: %s", e.mustCtl("list", "--subject", missing[0]))
			}
			t.Fatalf("only %d of %d overdue entries refreshed after 20s; missing %v", len(first), keys, missing)
		}
		time.Sleep(100 * time.Millisecond)
		for _, c := range e.fake.Calls() {
			if _, ok := first[c.CompanyID]; !ok {
				first[c.CompanyID] = c.At
			}
		}
	}
	var at []time.Time
	for _, ts := range first {
		at = append(at, ts)
	}
	sort.Slice(at, func(i, j int) bool { return at[i].Before(at[j]) })
	span := at[len(at)-1].Sub(at[0])
	busiest := 0
	for i, j := 0, 0; i < len(at); i++ {
		for at[i].Sub(at[j]) >= time.Second {
			j++
		}
		busiest = max(busiest, i-j+1)
	}
	inFirst := 0
	for _, ts := range at {
		if ts.Sub(restart) < time.Second {
			inFirst++
		}
	}
	t.Logf("1000 overdue refreshes after restart: span %v, busiest second %d calls, %d in the first second", span.Round(time.Millisecond), busiest, inFirst)
	if busiest > rate+burst {
		t.Fatalf("%d upstream calls in one second; the limiter allows %d", busiest, rate+burst)
	}
	if span < 2*time.Second {
		t.Fatalf("overdue refreshes spanned only %v; want them spread over the 3s window", span)
	}
}

// TestFaultKeyRotation: after a restart with another API key, the next
// GetToken for a cached subject makes one upstream call with the new key.
func TestFaultKeyRotation(t *testing.T) {
	e := newEnv(t)
	e.fake.AddKey("second_key_0123456789", nil)
	d := e.start()
	old, err := e.tokens().GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_rot"})
	must(t, err)
	d.stop()
	e.writeKey("second_key_0123456789")
	e.start()
	fresh, err := e.tokens().GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_rot"})
	must(t, err)
	if fresh.Token == old.Token {
		t.Fatal("a token minted by the old key was served after the key changed")
	}
	calls := e.fake.Calls()
	if n := e.fake.CallsFor("biz_rot"); n != 2 || calls[len(calls)-1].Key != "second_key_0123456789" {
		t.Fatalf("calls for biz_rot = %d, last with the new key = %v; want 2 and true", n, calls[len(calls)-1].Key == "second_key_0123456789")
	}
}

// grepLines returns the lines of s that contain substr.
func grepLines(s, substr string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func whoptestFault429(retryAfter int) whoptest.Fault {
	return whoptest.Fault{Status: 429, RetryAfter: fmt.Sprint(retryAfter)}
}

// TestFault401RecoversWhenTheKeyFileChanges: Whop revokes the key (401);
// the operator writes a new one into --api-key-file and does nothing else:
// tokend notices the file, reloads, and serves again without a SIGHUP.
func TestFault401RecoversWhenTheKeyFileChanges(t *testing.T) {
	e := newEnv(t)
	e.start(fast...)
	tc := e.tokens()
	e.fake.RemoveKey(testKey)
	if _, err := tc.GetToken(ctx(t), companyKey(0)); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("revoked key: got %v, want FailedPrecondition", err)
	}
	const rotated = "whop_rotated_key_0123456789abcdef"
	e.fake.AddKey(rotated, nil)
	e.writeKey(rotated)
	changed := time.Now()
	for {
		_, err := tc.GetToken(ctx(t), companyKey(1))
		if err == nil {
			break
		}
		if time.Since(changed) > 10*time.Second {
			t.Fatalf("still failing %v after the key file changed: %v", time.Since(changed), err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("served again %v after the key file changed, without a reload", time.Since(changed).Round(time.Millisecond))
	calls := e.fake.Calls()
	if last := calls[len(calls)-1]; last.Key != rotated {
		t.Fatal("the last upstream call did not use the rotated key")
	}
}
