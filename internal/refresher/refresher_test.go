package refresher

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/cache"
	"github.com/tokend/tokend/internal/clock"
	"github.com/tokend/tokend/internal/whop"
	"github.com/tokend/tokend/internal/whop/whoptest"
)

const apiKey = "whop_refresher_test_key"

// rig is a refresher on a real bbolt file, minting from the fake upstream
// through the real client, with time driven by a fake clock.
type rig struct {
	t      *testing.T
	clock  *clock.Fake
	fake   *whoptest.Server
	client *whop.Client
	cache  *cache.Cache
	r      *Refresher
}

func newRig(t *testing.T, mod func(*Config)) *rig {
	t.Helper()
	clk := clock.NewFake(time.Now())
	fake, err := whoptest.NewServer(whoptest.Config{Keys: map[string][]string{apiKey: nil, "second_key": nil}, Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fake.Close)
	c, _, err := cache.Open(cache.Config{Path: filepath.Join(t.TempDir(), "cache.db"), Clock: clock.Real{}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	client, err := whop.New(whop.Config{BaseURL: fake.URL(), APIKey: apiKey, FingerprintSalt: c.Salt()})
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Cache: c, Fetcher: client, Clock: clk}
	if mod != nil {
		mod(&cfg)
	}
	r, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return &rig{t: t, clock: clk, fake: fake, client: client, cache: c, r: r}
}

func (g *rig) get(k cache.Key) (*cache.Token, *cache.Entry, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return g.r.Get(ctx, k, Options{MinTTL: time.Minute})
}

// waitCalls waits until the fake has seen n calls; the refresher works in
// its own goroutines after the clock moves.
func (g *rig) waitCalls(n int) {
	g.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for g.fake.CallCount() < n {
		if time.Now().After(deadline) {
			g.t.Fatalf("upstream calls = %d, want %d", g.fake.CallCount(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// waitState waits until the entry's state is s.
func (g *rig) waitState(e *cache.Entry, s cache.State) {
	g.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for e.Meta().State != s {
		if time.Now().After(deadline) {
			g.t.Fatalf("entry state = %v, want %v", e.Meta().State, s)
		}
		time.Sleep(time.Millisecond)
	}
}

// advanceTo moves the fake clock to t.
func (g *rig) advanceTo(t time.Time) {
	if d := t.Sub(g.clock.Now()); d > 0 {
		g.clock.Advance(d)
	}
}

var key = cache.NewKey("default", "biz_r", "", []string{"chat:read"})

func TestRefreshAheadOfExpiry(t *testing.T) {
	g := newRig(t, nil)
	t0 := g.clock.Now()
	tok, e, err := g.get(key)
	if err != nil {
		t.Fatal(err)
	}
	life := tok.ExpiresAt.Sub(t0)
	if life < 59*time.Minute || life > time.Hour {
		t.Fatalf("token lifetime %v, want about 1h", life)
	}
	due := e.Meta().NextRefresh
	lo, hi := t0.Add(life*17/30), t0.Add(life*2/3)
	if due.Before(lo) || due.After(hi) {
		t.Fatalf("next refresh at +%v, want within [+%v, +%v]", due.Sub(t0), lo.Sub(t0), hi.Sub(t0))
	}
	// A second before it is due nothing happens; at the due time one call.
	g.advanceTo(due.Add(-time.Second))
	if _, _, err := g.get(key); err != nil {
		t.Fatal(err)
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("calls before the refresh point = %d, want 1", n)
	}
	g.advanceTo(due)
	g.waitCalls(2)
	g.waitState(e, cache.StateFresh)
	newTok, _, err := g.get(key)
	if err != nil {
		t.Fatal(err)
	}
	if newTok.Value == tok.Value {
		t.Fatal("refresh did not replace the token")
	}
	if n := g.fake.CallCount(); n != 2 {
		t.Fatalf("calls after refresh = %d, want 2", n)
	}
	if got := e.Meta().Refreshes; got != 2 {
		t.Fatalf("Refreshes = %d, want 2", got)
	}
}

func TestJitterSpreadsRefreshes(t *testing.T) {
	g := newRig(t, func(c *Config) { c.Rate = 1e6 })
	var earliest, latest time.Time
	for i := range 100 {
		_, e, err := g.get(cache.NewKey("default", "biz_j", "user_"+string(rune('a'+i%26))+string(rune('a'+i/26)), nil))
		if err != nil {
			t.Fatal(err)
		}
		due := e.Meta().NextRefresh
		if earliest.IsZero() || due.Before(earliest) {
			earliest = due
		}
		if due.After(latest) {
			latest = due
		}
	}
	// 10% of an hour is 6m; 100 uniform draws span most of it.
	if spread := latest.Sub(earliest); spread < 3*time.Minute {
		t.Fatalf("100 entries minted together refresh within %v of each other; want a spread of minutes", spread)
	}
}

func TestRetryWithBackoffWhileServingOldToken(t *testing.T) {
	g := newRig(t, func(c *Config) { c.RetryInitial = 10 * time.Second; c.RetryMax = 5 * time.Minute })
	tok, e, err := g.get(key)
	if err != nil {
		t.Fatal(err)
	}
	g.fake.SetDefault(whoptest.Fault{Status: 503})
	g.advanceTo(e.Meta().NextRefresh)
	g.waitCalls(2)
	g.waitState(e, cache.StateRetrying)

	// Every retry comes no sooner than the backoff allows: at least half
	// the nominal interval (randomization 0.5), doubling each time.
	nominal := 10 * time.Second
	for attempt := 3; attempt <= 6; attempt++ {
		before := g.clock.Now()
		g.clock.Advance(nominal/2 - time.Second)
		if _, _, err := g.get(key); err != nil {
			t.Fatalf("token not served during the outage: %v", err)
		}
		if n := g.fake.CallCount(); n != attempt-1 {
			t.Fatalf("attempt %d came %v after the last, sooner than backoff allows", attempt, g.clock.Now().Sub(before))
		}
		g.clock.Advance(nominal + time.Second)
		g.waitCalls(attempt)
		g.waitState(e, cache.StateRetrying) // the failure is recorded before we move on
		nominal = min(2*nominal, 5*time.Minute)
	}
	got, _, err := g.get(key)
	if err != nil || got.Value != tok.Value {
		t.Fatalf("during the outage Get = %v, %v; want the cached token", got, err)
	}
	if m := e.Meta(); m.Failures != 5 || m.LastError == nil || m.LastError.Status != 503 {
		t.Fatalf("meta = %+v, want 5 failures and the 503 kept", m)
	}

	// Recovery: the next retry succeeds and the entry is fresh again.
	g.fake.SetDefault(whoptest.Fault{})
	g.clock.Advance(10 * time.Minute)
	g.waitCalls(7)
	g.waitState(e, cache.StateFresh)
	if m := e.Meta(); m.Failures != 0 {
		t.Fatalf("failures after recovery = %d", m.Failures)
	}
}

func TestRetryAfterIsHonoured(t *testing.T) {
	g := newRig(t, nil)
	_, e, err := g.get(key)
	if err != nil {
		t.Fatal(err)
	}
	g.fake.Enqueue(whoptest.Fault{Status: 429, RetryAfter: "120"})
	g.advanceTo(e.Meta().NextRefresh)
	g.waitCalls(2)
	g.waitState(e, cache.StateRetrying)
	g.clock.Advance(119 * time.Second)
	time.Sleep(20 * time.Millisecond) // give a wrongly early retry the chance to show
	if n := g.fake.CallCount(); n != 2 {
		t.Fatalf("retried %d times inside Retry-After", n-2)
	}
	g.clock.Advance(2 * time.Second)
	g.waitCalls(3)
}

func TestPermanentErrorStopsRetries(t *testing.T) {
	g := newRig(t, nil)
	tok, e, err := g.get(key)
	if err != nil {
		t.Fatal(err)
	}
	g.fake.SetDefault(whoptest.Fault{Status: 403})
	g.advanceTo(e.Meta().NextRefresh)
	g.waitCalls(2)
	g.waitState(e, cache.StateFailing)
	// Until it expires the token is still served, with no more calls.
	g.advanceTo(tok.ExpiresAt.Add(-2 * time.Minute))
	if got, _, err := g.get(key); err != nil || got.Value != tok.Value {
		t.Fatalf("Get before expiry = %v; want the cached token", err)
	}
	if n := g.fake.CallCount(); n != 2 {
		t.Fatalf("calls after a 403 = %d, want 2 (no retries)", n)
	}
	// At expiry the entry is dropped.
	g.advanceTo(tok.ExpiresAt)
	deadline := time.Now().Add(5 * time.Second)
	for g.cache.Len() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("failing entry not dropped at expiry")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestNegativeCache(t *testing.T) {
	g := newRig(t, nil)
	g.fake.SetDefault(whoptest.Fault{Status: 404})
	for range 10 {
		_, _, err := g.get(key)
		var we *whop.Error
		if !errors.As(err, &we) || we.StatusCode != 404 {
			t.Fatalf("Get = %v, want the 404", err)
		}
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("10 gets of a 404 key made %d calls, want 1", n)
	}
	g.clock.Advance(31 * time.Second)
	g.fake.SetDefault(whoptest.Fault{})
	if _, _, err := g.get(key); err != nil {
		t.Fatalf("after the negative TTL: %v", err)
	}
	if n := g.fake.CallCount(); n != 2 {
		t.Fatalf("calls = %d, want 2", n)
	}
}

func TestMissDuringBackoffFailsFast(t *testing.T) {
	g := newRig(t, nil)
	g.fake.SetDefault(whoptest.Fault{Status: 503})
	if _, _, err := g.get(key); err == nil {
		t.Fatal("want an error from a 503")
	}
	for range 50 {
		if _, _, err := g.get(key); !whop.IsRetryable(err) {
			t.Fatalf("Get during backoff = %v, want the remembered 503", err)
		}
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("misses during backoff made %d calls, want 1", n)
	}
}

func TestConcurrentMissesCoalesce(t *testing.T) {
	g := newRig(t, nil)
	g.fake.SetLatency(50 * time.Millisecond)
	var wg sync.WaitGroup
	tokens := make([]string, 200)
	for i := range tokens {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tok, _, err := g.get(key)
			if err != nil {
				t.Error(err)
				return
			}
			tokens[i] = tok.Value
		}()
	}
	wg.Wait()
	for _, v := range tokens {
		if v != tokens[0] {
			t.Fatal("callers got different tokens")
		}
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("200 concurrent misses made %d calls, want 1", n)
	}
}

func TestNewKeyInvalidatesTokens(t *testing.T) {
	g := newRig(t, nil)
	old, _, err := g.get(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.client.SetAPIKey("second_key"); err != nil {
		t.Fatal(err)
	}
	tok, _, err := g.get(key)
	if err != nil {
		t.Fatal(err)
	}
	if tok.Value == old.Value {
		t.Fatal("token minted by the old key was served after the key changed")
	}
	calls := g.fake.Calls()
	if len(calls) != 2 || calls[1].Key != "second_key" {
		t.Fatalf("calls = %+v, want a second call with the new key", calls)
	}
}

func TestMinTTLBeyondLifetime(t *testing.T) {
	g := newRig(t, nil)
	ctx := context.Background()
	tok, _, err := g.r.Get(ctx, key, Options{MinTTL: 2 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if left := tok.ExpiresAt.Sub(g.clock.Now()); left < 2*time.Hour {
		t.Fatalf("token valid %v, want at least the 2h asked", left)
	}
	if _, _, err := g.r.Get(ctx, key, Options{MinTTL: 3 * time.Hour}); !errors.Is(err, ErrLifetime) {
		t.Fatalf("min_ttl 3h: %v, want ErrLifetime", err)
	}
}

func TestCallerDeadlineDoesNotCancelFetch(t *testing.T) {
	g := newRig(t, nil)
	g.fake.SetLatency(200 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, _, err := g.r.Get(ctx, key, Options{MinTTL: time.Minute}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Get = %v, want DeadlineExceeded", err)
	}
	g.waitCalls(1)
	deadline := time.Now().Add(5 * time.Second)
	for {
		if e := g.cache.Get(key.Encode()); e != nil && e.Token() != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the fetch the caller abandoned never completed")
		}
		time.Sleep(time.Millisecond)
	}
	if _, _, err := g.get(key); err != nil {
		t.Fatal(err)
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("calls = %d, want 1: the next caller should get the abandoned fetch's token", n)
	}
}

func TestRejectedKeyStopsUpstreamCalls(t *testing.T) {
	g := newRig(t, nil)
	g.fake.RemoveKey(apiKey)
	_, _, err := g.get(key)
	var we *whop.Error
	if !errors.As(err, &we) || we.StatusCode != 401 {
		t.Fatalf("Get = %v, want the 401", err)
	}
	other := cache.NewKey("default", "biz_other", "", nil)
	for range 5 {
		if _, _, err := g.get(other); !errors.Is(err, ErrKeyRejected) {
			t.Fatalf("Get with a rejected key = %v, want ErrKeyRejected", err)
		}
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("calls after a 401 = %d, want 1", n)
	}
	if !g.r.Stats().APIKeyRejected {
		t.Fatal("Stats does not show the rejected key")
	}
	if err := g.client.SetAPIKey("second_key"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := g.get(other); err != nil {
		t.Fatalf("after a key reload: %v", err)
	}
	if g.r.Stats().APIKeyRejected {
		t.Fatal("Stats still shows the key rejected after a reload")
	}
}

func TestCapacityEvictsLeastRecentlyRequested(t *testing.T) {
	g := newRig(t, func(c *Config) { c.MaxEntries = 3; c.Rate = 1e6 })
	keys := []cache.Key{
		cache.NewKey("default", "biz_0", "", nil),
		cache.NewKey("default", "biz_1", "", nil),
		cache.NewKey("default", "biz_2", "", nil),
	}
	for _, k := range keys {
		if _, _, err := g.get(k); err != nil {
			t.Fatal(err)
		}
		g.clock.Advance(time.Second)
	}
	g.get(keys[0]) // biz_1 is now the least recently requested
	g.clock.Advance(time.Second)
	if _, _, err := g.get(cache.NewKey("default", "biz_3", "", nil)); err != nil {
		t.Fatal(err)
	}
	if g.cache.Len() != 3 || g.cache.Get(keys[1].Encode()) != nil {
		t.Fatalf("after a 4th key: %d entries, biz_1 present=%v; want 3 and biz_1 evicted", g.cache.Len(), g.cache.Get(keys[1].Encode()) != nil)
	}
	if n := g.r.Stats().EvictedOverCapacity; n != 1 {
		t.Fatalf("EvictedOverCapacity = %d, want 1", n)
	}
}

func TestIdleEntryIsDropped(t *testing.T) {
	g := newRig(t, nil)
	_, e, err := g.get(key)
	if err != nil {
		t.Fatal(err)
	}
	g.advanceTo(e.Meta().NextRefresh)
	g.waitCalls(2) // requested within the last lifetime: refreshed once more
	g.waitState(e, cache.StateFresh)
	second := e.Token()
	g.advanceTo(e.Meta().NextRefresh)
	g.waitState(e, cache.StateIdle) // nobody asked for a whole lifetime
	if n := g.fake.CallCount(); n != 2 {
		t.Fatalf("idle entry refreshed again: %d calls", n)
	}
	g.advanceTo(second.ExpiresAt)
	deadline := time.Now().Add(5 * time.Second)
	for g.cache.Len() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("idle entry not dropped at expiry")
		}
		time.Sleep(time.Millisecond)
	}
	if n := g.r.Stats().DroppedIdle; n != 1 {
		t.Fatalf("DroppedIdle = %d, want 1", n)
	}
}

func TestRejectedTokenReplacedOnce(t *testing.T) {
	g := newRig(t, nil)
	old, _, err := g.get(key)
	if err != nil {
		t.Fatal(err)
	}
	g.fake.SetLatency(30 * time.Millisecond)
	var wg sync.WaitGroup
	got := make([]string, 100)
	for i := range got {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tok, _, err := g.r.Get(context.Background(), key, Options{MinTTL: time.Minute, Rejected: old.Value})
			if err != nil {
				t.Error(err)
				return
			}
			got[i] = tok.Value
		}()
	}
	wg.Wait()
	for _, v := range got {
		if v == old.Value || v != got[0] {
			t.Fatal("callers did not all get the same new token")
		}
	}
	if n := g.fake.CallCount(); n != 2 {
		t.Fatalf("100 reports of one rejected token made %d calls, want 1", n-1)
	}
	// A stale report (the token was already replaced) changes nothing.
	tok, _, err := g.r.Get(context.Background(), key, Options{MinTTL: time.Minute, Rejected: old.Value})
	if err != nil || tok.Value != got[0] || g.fake.CallCount() != 2 {
		t.Fatalf("stale report: %v, calls %d", err, g.fake.CallCount())
	}
}

func TestIdleEntryRevivedByRequest(t *testing.T) {
	g := newRig(t, nil)
	_, e, err := g.get(key)
	if err != nil {
		t.Fatal(err)
	}
	g.advanceTo(e.Meta().NextRefresh)
	g.waitCalls(2)
	g.waitState(e, cache.StateFresh)
	g.advanceTo(e.Meta().NextRefresh)
	g.waitState(e, cache.StateIdle)
	if _, _, err := g.get(key); err != nil { // a client asks again: a hit
		t.Fatal(err)
	}
	g.waitCalls(3) // refreshed at once instead of dropped at expiry
	g.waitState(e, cache.StateFresh)
	if e.Idle() {
		t.Fatal("entry still marked idle after a refresh")
	}
}

type never struct{}

func (never) Allow() bool { return false }

// TestRefusedMissCreatesNoEntry: a miss the caller's limiter refuses
// leaves the cache as it was, so it cannot push out others' entries.
func TestRefusedMissCreatesNoEntry(t *testing.T) {
	g := newRig(t, func(c *Config) { c.MaxEntries = 2 })
	if _, _, err := g.get(key); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		k := cache.NewKey("default", fmt.Sprintf("biz_refused%d", i), "", nil)
		if _, _, err := g.r.Get(context.Background(), k, Options{MinTTL: time.Minute, MissLimiter: never{}}); !errors.Is(err, ErrMissRateLimited) {
			t.Fatalf("Get = %v, want ErrMissRateLimited", err)
		}
	}
	if g.cache.Len() != 1 || g.cache.Get(key.Encode()) == nil {
		t.Fatalf("refused misses changed the cache: %d entries", g.cache.Len())
	}
}
