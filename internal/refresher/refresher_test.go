package refresher

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/cache"
	"github.com/tokend/tokend/internal/clock"
	"github.com/tokend/tokend/internal/whop"
	"github.com/tokend/tokend/internal/whop/whoptest"
)

const (
	apiKey    = "whop_refresher_test_key"
	secondKey = "second_key"
	// waitLimit bounds every wait for real concurrent work: an HTTP call
	// to the fake upstream, a goroutine of the refresher's.
	waitLimit = 10 * time.Second
)

var key = NewKey("default", "biz_r", "", []string{"chat:read"})

// rig is a refresher on a real bbolt file, minting from the fake upstream
// through the real client (behind a valve that can hold calls), with time
// driven by a fake clock.
type rig struct {
	t      *testing.T
	clock  *clock.Fake
	fake   *whoptest.Server
	client *whop.Client
	valve  *valve
	path   string
	store  *cache.Store
	r      *Refresher
	// stop ends Run and waits for it to return; later calls do nothing.
	stop func()
}

// newRig starts a refresher; mod may change its Config (the rig's fields
// but r and stop are set when it runs).
func newRig(t *testing.T, mod func(*rig, *Config)) *rig {
	t.Helper()
	clk := clock.NewFake(time.Now())
	fake, err := whoptest.NewServer(whoptest.Config{Keys: map[string][]string{apiKey: nil, secondKey: nil}, Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fake.Close)
	path := filepath.Join(t.TempDir(), "cache.db")
	store, _, err := cache.Open(cache.Config{Path: path, Clock: clock.Real{}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	client, err := whop.New(whop.Config{BaseURL: fake.URL(), APIKey: apiKey, FingerprintSalt: store.Salt()})
	if err != nil {
		t.Fatal(err)
	}
	g := &rig{t: t, clock: clk, fake: fake, client: client, valve: newValve(client), path: path, store: store}
	// In-call retries wait on the fake clock: the tests of them turn them
	// on; the rest see each upstream answer as it is.
	// Stopping drains calls on the fake clock too: the tests of it turn it on.
	cfg := Config{Store: store, Fetcher: g.valve, Clock: clk, InCallRetries: -1, DrainTimeout: -1}
	if mod != nil {
		mod(g, &cfg)
	}
	if g.r, err = New(cfg); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.r.Run(ctx) }()
	var once sync.Once
	g.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(waitLimit):
				t.Errorf("Run did not return within %v of its context ending", waitLimit)
			}
		})
	}
	t.Cleanup(g.stop)
	t.Cleanup(g.valve.open) // first: nothing stays held past the test
	return g
}

// valve stands in front of a real whop client and can hold its calls: a
// call that the hold rule accepts is announced on started and waits for
// its release (or for its context) before it goes upstream. A test
// instrument, not a mock: every answer is the real client's.
type valve struct {
	next    Fetcher
	started chan *heldCall

	mu   sync.Mutex
	hold func(whop.Request) bool
	held []*heldCall
}

// heldCall is one call waiting in the valve.
type heldCall struct {
	Req      whop.Request
	release  chan struct{}
	released atomic.Bool
	once     sync.Once
}

// Release lets the call go upstream. It is safe to call more than once.
func (h *heldCall) Release() {
	h.once.Do(func() {
		h.released.Store(true)
		close(h.release)
	})
}

func newValve(next Fetcher) *valve {
	return &valve{next: next, started: make(chan *heldCall, 1024)}
}

func (v *valve) KeyFingerprint() []byte { return v.next.KeyFingerprint() }

func (v *valve) CreateAccessToken(ctx context.Context, req whop.Request) (whop.AccessToken, error) {
	v.mu.Lock()
	var h *heldCall
	if v.hold != nil && v.hold(req) {
		h = &heldCall{Req: req, release: make(chan struct{})}
		v.held = append(v.held, h)
	}
	v.mu.Unlock()
	if h != nil {
		v.started <- h
		select {
		case <-h.release:
		case <-ctx.Done(): // tokend is stopping: let the real client say so
		}
	}
	return v.next.CreateAccessToken(ctx, req)
}

// holdIf holds every later call whose request match accepts; nil holds
// none (calls already held stay held).
func (v *valve) holdIf(match func(whop.Request) bool) {
	v.mu.Lock()
	v.hold = match
	v.mu.Unlock()
}

// open holds nothing more and releases every call held.
func (v *valve) open() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.hold = nil
	for _, h := range v.held {
		h.Release()
	}
}

// holding reports whether a call for k is held and not yet released.
func (v *valve) holding(k Key) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, h := range v.held {
		if !h.released.Load() && h.Req.CompanyID == k.CompanyID && h.Req.UserID == k.UserID {
			return true
		}
	}
	return false
}

// awaitStart returns the next call the valve holds.
func (g *rig) awaitStart() *heldCall {
	g.t.Helper()
	select {
	case h := <-g.valve.started:
		return h
	case <-time.After(waitLimit):
		g.t.Fatalf("no upstream call reached the valve within %v", waitLimit)
		return nil
	}
}

func forCompany(id string) func(whop.Request) bool {
	return func(r whop.Request) bool { return r.CompanyID == id }
}

func all(whop.Request) bool { return true }

func (g *rig) get(k Key) (Result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	return g.r.Get(ctx, k, Options{MinTTL: time.Minute})
}

func (g *rig) mustGet(k Key) Result {
	g.t.Helper()
	res, err := g.get(k)
	if err != nil {
		g.t.Fatalf("Get %s: %v", k.Subject(), err)
	}
	return res
}

type got struct {
	res Result
	err error
}

// goGet runs Get in its own goroutine, for a miss that the valve holds.
func (g *rig) goGet(k Key) <-chan got {
	ch := make(chan got, 1)
	go func() {
		res, err := g.get(k)
		ch <- got{res, err}
	}()
	return ch
}

func (g *rig) await(ch <-chan got) got {
	g.t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(waitLimit):
		g.t.Fatalf("Get did not return within %v", waitLimit)
		return got{}
	}
}

// info snapshots k's entry.
func (g *rig) info(k Key) EntryInfo {
	g.t.Helper()
	i, err := g.r.Find(k.ID())
	if err != nil {
		g.t.Fatalf("Find %s (%s): %v", k.ID(), k.Subject(), err)
	}
	return i
}

// poll waits until cond holds: for the refresher's goroutines and the fake
// upstream, which work in real time after the fake clock moves.
func (g *rig) poll(what func() string, cond func() bool) {
	g.t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			g.t.Fatalf("after %v: %s", waitLimit, what())
		}
		time.Sleep(time.Millisecond)
	}
}

// waitCalls waits until the fake upstream has seen n calls.
func (g *rig) waitCalls(n int) {
	g.t.Helper()
	g.poll(func() string { return fmt.Sprintf("upstream calls = %d, want %d", g.fake.CallCount(), n) },
		func() bool { return g.fake.CallCount() >= n })
	if c := g.fake.CallCount(); c != n {
		g.t.Fatalf("upstream calls = %d, want %d", c, n)
	}
}

// waitFor waits until k's entry satisfies cond, and returns it.
func (g *rig) waitFor(k Key, want string, cond func(EntryInfo) bool) EntryInfo {
	g.t.Helper()
	var last EntryInfo
	var err error
	g.poll(func() string {
		return fmt.Sprintf("entry %s: want %s; have %+v (err %v)", k.Subject(), want, last, err)
	}, func() bool {
		last, err = g.r.Find(k.ID())
		return err == nil && cond(last)
	})
	return last
}

func (g *rig) waitGone(k Key) {
	g.t.Helper()
	g.poll(func() string { return fmt.Sprintf("entry %s still present: %+v", k.Subject(), g.info(k)) },
		func() bool { _, err := g.r.Find(k.ID()); return errors.Is(err, ErrNotFound) })
}

// waitWorkersIdle waits until no scheduled action of the credential runs:
// a refresh's worker returns only after its call has been finished.
func (g *rig) waitWorkersIdle(credential string) {
	g.t.Helper()
	s := g.r.upstream(credential).sched
	busy := func() int {
		g.r.mu.Lock()
		defer g.r.mu.Unlock()
		return s.busy
	}
	g.poll(func() string { return fmt.Sprintf("%d refresh workers of %q still busy", busy(), credential) },
		func() bool { return busy() == 0 })
}

// quiesce waits until the schedule loop of each named credential (all of
// them, if none is named) is parked on a timer armed for the schedule as it
// is now. Moving the fake clock while a loop is between reading the time
// and arming its timer would arm it late by the whole step, so every
// advance comes through here.
func (g *rig) quiesce(credentials ...string) {
	g.t.Helper()
	if len(credentials) == 0 {
		credentials = g.r.Credentials()
	}
	deadline := time.Now().Add(waitLimit)
	for _, name := range credentials {
		up := g.r.upstream(name)
		if up == nil {
			g.t.Fatalf("quiesce: no credential %q", name)
		}
		for {
			if armed, ok := g.park(up.sched); ok {
				select {
				case <-armed:
				case <-time.After(time.Until(deadline)):
					g.t.Fatalf("the schedule of %q did not re-arm its timer within %v", name, waitLimit)
				}
				break
			}
			if time.Now().After(deadline) {
				g.t.Fatalf("the schedule of %q still had work running or due after %v", name, waitLimit)
			}
			time.Sleep(time.Millisecond)
		}
	}
}

// park wakes s's loop if nothing of s is running or due, and waits, holding
// r.mu, for the loop to take the wake: from there the loop needs r.mu
// before it can arm its timer again, so the channel returned closes when it
// has armed it for the current schedule. ok is false when s has work in
// hand (a call the valve does not hold, a worker, something due), or when
// its loop is itself waiting for r.mu; the caller tries again.
func (g *rig) park(s *sched) (armed <-chan struct{}, ok bool) {
	r := g.r
	r.mu.Lock()
	defer r.mu.Unlock()
	now := g.clock.Now()
	if s.busy > 0 ||
		len(s.actions.es) > 0 && !s.actions.es[0].next.After(now) ||
		len(s.expiries.es) > 0 && !s.expiries.es[0].expiresAt.After(now) {
		return nil, false
	}
	for _, e := range r.index {
		if e.sched == s && e.call != nil && !g.valve.holding(e.key) {
			return nil, false
		}
	}
	s.poke()
	for spin := time.Now().Add(5 * time.Millisecond); len(s.wake) > 0; {
		if time.Now().After(spin) {
			return nil, false
		}
		runtime.Gosched()
	}
	return g.clock.Armed(), true
}

// advance moves the fake clock by d once every schedule is parked.
func (g *rig) advance(d time.Duration) {
	g.t.Helper()
	g.quiesce()
	g.clock.Advance(d)
}

func (g *rig) advanceTo(at time.Time) {
	g.t.Helper()
	if d := at.Sub(g.clock.Now()); d > 0 {
		g.advance(d)
	}
}

// latestRefresh is the latest NextRefresh among ks' entries.
func (g *rig) latestRefresh(ks ...Key) time.Time {
	g.t.Helper()
	var latest time.Time
	for _, k := range ks {
		if n := g.info(k).NextRefresh; n.After(latest) {
			latest = n
		}
	}
	return latest
}

// checkCounts compares Status's incrementally kept counts with a count of
// the entries' states. Call it only while nothing is in flight.
func (g *rig) checkCounts() Status {
	g.t.Helper()
	st := g.r.Status()
	infos := g.r.Entries(nil)
	var counted [numStates]int
	for _, i := range infos {
		counted[i.State]++
	}
	if st.ByState != counted || st.Entries != len(infos) {
		g.t.Fatalf("Status: %d entries, by state %v; Entries(nil): %d entries, by state %v",
			st.Entries, st.EntriesByState(), len(infos), Status{ByState: counted}.EntriesByState())
	}
	return st
}

// storedRecords flushes and closes the rig's store and reads the file back
// as the next start would.
func (g *rig) storedRecords() map[string]cache.Record {
	g.t.Helper()
	if err := g.store.Flush(); err != nil {
		g.t.Fatalf("flush: %v", err)
	}
	if err := g.store.Close(); err != nil {
		g.t.Fatalf("close: %v", err)
	}
	s, _, err := cache.Open(cache.Config{Path: g.path, Clock: clock.Real{}})
	if err != nil {
		g.t.Fatalf("reopen: %v", err)
	}
	defer s.Close()
	recs := make(map[string]cache.Record)
	for _, rec := range s.Loaded() {
		recs[rec.Key.ID()] = rec
	}
	return recs
}

// noted returns a notify func for Watch and the channel it signals.
func noted() (func(), <-chan struct{}) {
	ch := make(chan struct{}, 1)
	return func() {
		select {
		case ch <- struct{}{}:
		default:
		}
	}, ch
}

func (g *rig) awaitNote(ch <-chan struct{}, what string) {
	g.t.Helper()
	select {
	case <-ch:
	case <-time.After(waitLimit):
		g.t.Fatalf("watcher not notified of %s within %v", what, waitLimit)
	}
}

// liveEntryProblem checks, under the lock, that k's entry is the one live
// entry for it, holds tok, is fresh, and is on its credential's current
// schedule with a refresh set. It returns what is wrong, or "".
func (g *rig) liveEntryProblem(k Key, tok *Token) string {
	r := g.r
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.index[string(k.encode())]
	switch {
	case e == nil:
		return "no entry in the index"
	case !e.live:
		return "the indexed entry is not live"
	case e.tok.Load() != tok:
		return fmt.Sprintf("entry holds token %p, want the second caller's %p", e.tok.Load(), tok)
	case e.state != StateFresh:
		return fmt.Sprintf("state %v, want fresh", e.state)
	case e.hidx < 0 || e.next.IsZero():
		return "not scheduled: no refresh will ever come"
	case e.sched != r.upstream(k.Credential).sched:
		return "on a schedule that is not its credential's"
	}
	return ""
}

func TestRefreshAheadOfExpiry(t *testing.T) {
	g := newRig(t, nil)
	t0 := g.clock.Now()
	res := g.mustGet(key)
	if res.Source != SourceMinted || res.KeyID != key.ID() {
		t.Fatalf("first Get: source %v, key id %q; want minted, %q", res.Source, res.KeyID, key.ID())
	}
	tok := res.Token
	life := tok.ExpiresAt.Sub(t0)
	if life < 59*time.Minute || life > time.Hour {
		t.Fatalf("token lifetime %v, want about 1h", life)
	}
	due := g.info(key).NextRefresh
	lo, hi := t0.Add(life*17/30), t0.Add(life*2/3)
	if due.Before(lo) || due.After(hi) {
		t.Fatalf("next refresh at +%v, want within [+%v, +%v]", due.Sub(t0), lo.Sub(t0), hi.Sub(t0))
	}
	// A second before it is due nothing happens; at the due time one call.
	g.advanceTo(due.Add(-time.Second))
	if res := g.mustGet(key); res.Source != SourceHit || res.Token != tok {
		t.Fatalf("Get before the refresh point: source %v, same token %v; want a hit on the first token", res.Source, res.Token == tok)
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("calls before the refresh point = %d, want 1", n)
	}
	g.advanceTo(due)
	g.waitCalls(2)
	info := g.waitFor(key, "refreshed", func(i EntryInfo) bool { return i.Refreshes >= 2 })
	if info.State != StateFresh || info.Refreshes != 2 {
		t.Fatalf("after the refresh: state %v, Refreshes %d; want fresh, 2", info.State, info.Refreshes)
	}
	newRes := g.mustGet(key)
	if newRes.Token.Value == tok.Value {
		t.Fatal("refresh did not replace the token")
	}
	if n := g.fake.CallCount(); n != 2 {
		t.Fatalf("calls after refresh = %d, want 2", n)
	}
}

func TestJitterSpreadsRefreshes(t *testing.T) {
	g := newRig(t, func(_ *rig, c *Config) { c.Rate = 1e6 })
	var earliest, latest time.Time
	for i := range 100 {
		k := NewKey("default", "biz_j", fmt.Sprintf("user_%02d", i), nil)
		g.mustGet(k)
		due := g.info(k).NextRefresh
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

// retrySchedule is when k's entry last failed and when its retry is due.
func (g *rig) retrySchedule(k Key) (failedAt, retryAt time.Time) {
	g.t.Helper()
	g.r.mu.Lock()
	defer g.r.mu.Unlock()
	e := g.r.index[string(k.encode())]
	if e == nil || e.lastErr == nil || e.hidx < 0 {
		g.t.Errorf("entry %s: no failure with a retry scheduled", k.Subject())
		return
	}
	return e.lastErr.At, e.next
}

func TestRetryWithBackoffWhileServingOldToken(t *testing.T) {
	g := newRig(t, func(_ *rig, c *Config) { c.RetryInitial = 10 * time.Second; c.RetryMax = 5 * time.Minute })
	tok := g.mustGet(key).Token
	g.fake.SetDefault(whoptest.Fault{Status: 503})
	g.advanceTo(g.info(key).NextRefresh)
	g.waitCalls(2)
	g.waitFor(key, "retrying after 1 failure", func(i EntryInfo) bool { return i.State == StateRetrying && i.Failures == 1 })

	// Every retry comes no sooner than the backoff allows: at least half
	// the nominal interval (randomization 0.5), doubling each time.
	nominal := 10 * time.Second
	for attempt := 3; attempt <= 6; attempt++ {
		failedAt, retryAt := g.retrySchedule(key)
		if wait := retryAt.Sub(failedAt); wait < nominal/2 || wait > nominal*3/2 {
			t.Fatalf("attempt %d scheduled %v after the failure; want within [%v, %v]", attempt, wait, nominal/2, nominal*3/2)
		}
		g.advance(nominal/2 - time.Second)
		if res, err := g.get(key); err != nil || res.Token != tok {
			t.Fatalf("token not served during the outage: %v", err)
		}
		if n := g.fake.CallCount(); n != attempt-1 {
			t.Fatalf("attempt %d came %v after the last failure, sooner than backoff allows", attempt, g.clock.Now().Sub(failedAt))
		}
		g.advance(nominal + time.Second)
		g.waitCalls(attempt)
		g.waitFor(key, fmt.Sprintf("retrying after %d failures", attempt-1), func(i EntryInfo) bool {
			return i.State == StateRetrying && int(i.Failures) == attempt-1
		})
		nominal = min(2*nominal, 5*time.Minute)
	}
	res, err := g.get(key)
	if err != nil || res.Token != tok {
		t.Fatalf("during the outage Get = %v, %v; want the cached token", res, err)
	}
	if i := g.info(key); i.Failures != 5 || i.LastError == nil || i.LastError.Status != 503 {
		t.Fatalf("entry = %+v, want 5 failures and the 503 kept", i)
	}

	// Recovery: the next retry succeeds and the entry is fresh again.
	g.fake.SetDefault(whoptest.Fault{})
	g.advance(10 * time.Minute)
	g.waitCalls(7)
	i := g.waitFor(key, "fresh again", func(i EntryInfo) bool { return i.State == StateFresh })
	if i.Failures != 0 {
		t.Fatalf("failures after recovery = %d", i.Failures)
	}
}

func TestRetryAfterIsHonoured(t *testing.T) {
	g := newRig(t, nil)
	g.mustGet(key)
	g.fake.Enqueue(whoptest.Fault{Status: 429, RetryAfter: "120"})
	g.advanceTo(g.info(key).NextRefresh)
	g.waitCalls(2)
	g.waitFor(key, "retrying", func(i EntryInfo) bool { return i.State == StateRetrying })
	failedAt, retryAt := g.retrySchedule(key)
	if retryAt.Before(failedAt.Add(120 * time.Second)) {
		t.Fatalf("retry scheduled %v after the 429, inside its Retry-After of 120s", retryAt.Sub(failedAt))
	}
	if until := g.r.Status().UpstreamPausedUntil; until.Before(failedAt.Add(120 * time.Second)) {
		t.Fatalf("credential paused until %v after the 429, want at least 120s", until.Sub(failedAt))
	}
	g.advance(119 * time.Second)
	if n := g.fake.CallCount(); n != 2 {
		t.Fatalf("retried %d times inside Retry-After", n-2)
	}
	g.advance(2 * time.Second)
	g.waitCalls(3)
	g.waitFor(key, "fresh after the retry", func(i EntryInfo) bool { return i.State == StateFresh })
}

func TestPermanentErrorStopsRetries(t *testing.T) {
	g := newRig(t, nil)
	tok := g.mustGet(key).Token
	g.fake.SetDefault(whoptest.Fault{Status: 403})
	g.advanceTo(g.info(key).NextRefresh)
	g.waitCalls(2)
	g.waitFor(key, "failing", func(i EntryInfo) bool { return i.State == StateFailing })
	// Until it expires the token is still served, with no more calls.
	g.advanceTo(tok.ExpiresAt.Add(-2 * time.Minute))
	if res, err := g.get(key); err != nil || res.Token != tok {
		t.Fatalf("Get before expiry = %v; want the cached token", err)
	}
	if n := g.fake.CallCount(); n != 2 {
		t.Fatalf("calls after a 403 = %d, want 2 (no retries)", n)
	}
	// At expiry the entry is dropped.
	g.advanceTo(tok.ExpiresAt)
	g.poll(func() string {
		return fmt.Sprintf("failing entry not dropped at expiry: %d entries", g.r.Status().Entries)
	},
		func() bool { return g.r.Status().Entries == 0 })
	if st := g.r.Status(); st.ByState != [numStates]int{} {
		t.Fatalf("after the drop, by state %v; want all zero", st.EntriesByState())
	}
}

func TestNegativeCache(t *testing.T) {
	g := newRig(t, nil)
	g.fake.SetDefault(whoptest.Fault{Status: 404})
	for range 10 {
		_, err := g.get(key)
		var we *whop.Error
		if !errors.As(err, &we) || we.StatusCode != 404 {
			t.Fatalf("Get = %v, want the 404", err)
		}
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("10 gets of a 404 key made %d calls, want 1", n)
	}
	g.advance(31 * time.Second)
	g.fake.SetDefault(whoptest.Fault{})
	if _, err := g.get(key); err != nil {
		t.Fatalf("after the negative TTL: %v", err)
	}
	if n := g.fake.CallCount(); n != 2 {
		t.Fatalf("calls = %d, want 2", n)
	}
}

func TestMissDuringBackoffFailsFast(t *testing.T) {
	g := newRig(t, nil)
	g.fake.SetDefault(whoptest.Fault{Status: 503})
	if _, err := g.get(key); err == nil {
		t.Fatal("want an error from a 503")
	}
	for range 50 {
		if _, err := g.get(key); !whop.IsRetryable(err) {
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
	results := make([]Result, 200)
	for i := range results {
		wg.Go(func() {
			res, err := g.get(key)
			if err != nil {
				t.Error(err)
				return
			}
			results[i] = res
		})
	}
	wg.Wait()
	minted := 0
	for _, res := range results {
		if res.Token == nil || res.Token.Value != results[0].Token.Value {
			t.Fatal("callers got different tokens")
		}
		if res.Source == SourceMinted {
			minted++
		}
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("200 concurrent misses made %d calls, want 1", n)
	}
	if minted != 1 {
		t.Fatalf("%d callers say they minted the token, want 1", minted)
	}
}

func TestNewKeyInvalidatesTokens(t *testing.T) {
	g := newRig(t, nil)
	old := g.mustGet(key).Token
	if err := g.client.SetAPIKey(secondKey); err != nil {
		t.Fatal(err)
	}
	tok := g.mustGet(key).Token
	if tok.Value == old.Value {
		t.Fatal("token minted by the old key was served after the key changed")
	}
	calls := g.fake.Calls()
	if len(calls) != 2 || calls[1].Key != secondKey {
		t.Fatalf("calls = %+v, want a second call with the new key", calls)
	}
}

func TestMinTTLBeyondLifetime(t *testing.T) {
	g := newRig(t, nil)
	ctx := context.Background()
	res, err := g.r.Get(ctx, key, Options{MinTTL: 2 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if left := res.Token.ExpiresAt.Sub(g.clock.Now()); left < 2*time.Hour {
		t.Fatalf("token valid %v, want at least the 2h asked", left)
	}
	if _, err := g.r.Get(ctx, key, Options{MinTTL: 3 * time.Hour}); !errors.Is(err, ErrLifetime) {
		t.Fatalf("min_ttl 3h: %v, want ErrLifetime", err)
	}
}

func TestCallerDeadlineDoesNotCancelFetch(t *testing.T) {
	g := newRig(t, nil)
	g.fake.SetLatency(200 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := g.r.Get(ctx, key, Options{MinTTL: time.Minute}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Get = %v, want DeadlineExceeded", err)
	}
	g.waitCalls(1)
	g.waitFor(key, "the abandoned fetch's token installed", func(i EntryInfo) bool { return !i.ExpiresAt.IsZero() })
	if res := g.mustGet(key); res.Source != SourceHit {
		t.Fatalf("Get after the fetch completed: source %v, want a hit", res.Source)
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("calls = %d, want 1: the next caller should get the abandoned fetch's token", n)
	}
}

func TestRejectedKeyStopsUpstreamCalls(t *testing.T) {
	g := newRig(t, nil)
	g.fake.RemoveKey(apiKey)
	_, err := g.get(key)
	var we *whop.Error
	if !errors.As(err, &we) || we.StatusCode != 401 {
		t.Fatalf("Get = %v, want the 401", err)
	}
	other := NewKey("default", "biz_other", "", nil)
	for range 5 {
		if _, err := g.get(other); !errors.Is(err, ErrKeyRejected) {
			t.Fatalf("Get with a rejected key = %v, want ErrKeyRejected", err)
		}
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("calls after a 401 = %d, want 1", n)
	}
	// A key that never got a token is not reported fresh.
	if s := g.info(other).State; s != StateFailing {
		t.Fatalf("entry refused for a rejected key: state %v, want failing", s)
	}
	if !g.r.Status().APIKeyRejected {
		t.Fatal("Status does not show the rejected key")
	}
	if err := g.client.SetAPIKey(secondKey); err != nil {
		t.Fatal(err)
	}
	if _, err := g.get(other); err != nil {
		t.Fatalf("after a key reload: %v", err)
	}
	if g.r.Status().APIKeyRejected {
		t.Fatal("Status still shows the key rejected after a reload")
	}
}

func TestCapacityEvictsLeastRecentlyRequested(t *testing.T) {
	g := newRig(t, func(_ *rig, c *Config) { c.MaxEntries = 3; c.Rate = 1e6 })
	keys := []Key{
		NewKey("default", "biz_0", "", nil),
		NewKey("default", "biz_1", "", nil),
		NewKey("default", "biz_2", "", nil),
	}
	for _, k := range keys {
		g.mustGet(k)
		g.advance(time.Second)
	}
	g.mustGet(keys[0]) // biz_1 is now the least recently requested
	g.advance(time.Second)
	g.mustGet(NewKey("default", "biz_3", "", nil))
	_, err := g.r.Find(keys[1].ID())
	if n := g.r.Status().Entries; n != 3 || !errors.Is(err, ErrNotFound) {
		t.Fatalf("after a 4th key: %d entries, Find biz_1: %v; want 3 and biz_1 evicted", n, err)
	}
	for _, k := range []Key{keys[0], keys[2]} {
		if _, err := g.r.Find(k.ID()); err != nil {
			t.Fatalf("%s evicted instead of biz_1: %v", k.Subject(), err)
		}
	}
	if n := g.r.Status().EvictedOverCapacity; n != 1 {
		t.Fatalf("EvictedOverCapacity = %d, want 1", n)
	}
}

// TestCapacityEvictionIsExact: with more entries than any sample would
// look at, and hits reordering them after they were placed, each eviction
// still takes the one least recently requested.
func TestCapacityEvictionIsExact(t *testing.T) {
	const n = 300
	g := newRig(t, func(_ *rig, c *Config) { c.MaxEntries = n; c.Rate = 1e6 })
	keys := make([]Key, n)
	for i := range keys {
		keys[i] = NewKey("default", fmt.Sprintf("biz_%03d", i), "", nil)
		g.mustGet(keys[i])
		g.advance(time.Millisecond)
	}
	// Request all again but keys[victim], in a shuffled order: the hits
	// leave every place in the LRU heap stale.
	const victim = 217
	order := rand.New(rand.NewPCG(1, 2)).Perm(n)
	for _, i := range order {
		if i != victim {
			g.mustGet(keys[i])
			g.advance(time.Millisecond)
		}
	}
	evictedNext := []int{victim}
	for _, i := range order[:3] {
		if i != victim {
			evictedNext = append(evictedNext, i)
		}
	}
	for round, want := range evictedNext {
		g.mustGet(NewKey("default", fmt.Sprintf("biz_new%d", round), "", nil))
		g.advance(time.Millisecond)
		if _, err := g.r.Find(keys[want].ID()); !errors.Is(err, ErrNotFound) {
			t.Fatalf("round %d: %s not evicted (Find: %v)", round, keys[want].Subject(), err)
		}
		if got := g.r.Status(); got.Entries != n || got.EvictedOverCapacity != uint64(round+1) {
			t.Fatalf("round %d: %d entries, %d evicted; want %d and %d", round, got.Entries, got.EvictedOverCapacity, n, round+1)
		}
	}
}

func TestIdleEntryIsDropped(t *testing.T) {
	g := newRig(t, nil)
	g.mustGet(key)
	g.advanceTo(g.info(key).NextRefresh)
	g.waitCalls(2) // requested within the last lifetime: refreshed once more
	second := g.waitFor(key, "refreshed", func(i EntryInfo) bool { return i.Refreshes == 2 && i.State == StateFresh })
	g.advanceTo(second.NextRefresh)
	g.waitFor(key, "idle", func(i EntryInfo) bool { return i.State == StateIdle }) // nobody asked for a whole lifetime
	if n := g.fake.CallCount(); n != 2 {
		t.Fatalf("idle entry refreshed again: %d calls", n)
	}
	g.advanceTo(second.ExpiresAt)
	g.poll(func() string {
		return fmt.Sprintf("idle entry not dropped at expiry: %d entries", g.r.Status().Entries)
	},
		func() bool { return g.r.Status().Entries == 0 })
	if n := g.r.Status().DroppedIdle; n != 1 {
		t.Fatalf("DroppedIdle = %d, want 1", n)
	}
}

func TestRejectedTokenReplacedOnce(t *testing.T) {
	g := newRig(t, nil)
	old := g.mustGet(key).Token
	g.fake.SetLatency(30 * time.Millisecond)
	var wg sync.WaitGroup
	results := make([]Result, 100)
	for i := range results {
		wg.Go(func() {
			res, err := g.r.Get(context.Background(), key, Options{MinTTL: time.Minute, Rejected: old.Value})
			if err != nil {
				t.Error(err)
				return
			}
			results[i] = res
		})
	}
	wg.Wait()
	refreshed := 0
	for _, res := range results {
		if res.Token == nil || res.Token.Value == old.Value || res.Token.Value != results[0].Token.Value {
			t.Fatal("callers did not all get the same new token")
		}
		if res.Source == SourceRefreshed {
			refreshed++
		}
	}
	if n := g.fake.CallCount(); n != 2 {
		t.Fatalf("100 reports of one rejected token made %d calls, want 1", n-1)
	}
	if refreshed != 1 {
		t.Fatalf("%d callers say they replaced the token, want 1", refreshed)
	}
	// A stale report (the token was already replaced) changes nothing.
	res, err := g.r.Get(context.Background(), key, Options{MinTTL: time.Minute, Rejected: old.Value})
	if err != nil || res.Token != results[0].Token || g.fake.CallCount() != 2 {
		t.Fatalf("stale report: %v, calls %d", err, g.fake.CallCount())
	}
}

func TestIdleEntryRevivedByRequest(t *testing.T) {
	g := newRig(t, nil)
	g.mustGet(key)
	g.advanceTo(g.info(key).NextRefresh)
	g.waitCalls(2)
	second := g.waitFor(key, "refreshed", func(i EntryInfo) bool { return i.Refreshes == 2 && i.State == StateFresh })
	g.advanceTo(second.NextRefresh)
	g.waitFor(key, "idle", func(i EntryInfo) bool { return i.State == StateIdle })
	if res := g.mustGet(key); res.Source != SourceHit { // a client asks again: a hit
		t.Fatalf("Get of an idle entry: source %v, want a hit", res.Source)
	}
	g.waitCalls(3) // refreshed at once instead of dropped at expiry
	g.waitFor(key, "fresh", func(i EntryInfo) bool { return i.Refreshes == 3 && i.State == StateFresh })
	g.r.mu.Lock()
	idle := g.r.index[string(key.encode())].idle.Load()
	g.r.mu.Unlock()
	if idle {
		t.Fatal("entry still marked idle after a refresh")
	}
}

type never struct{}

func (never) Allow() bool { return false }

func (never) Wait(context.Context) error { return errors.New("never") }

// TestRefusedMissCreatesNoEntry: a miss the caller's limiter refuses
// leaves the cache as it was, so it cannot push out others' entries.
func TestRefusedMissCreatesNoEntry(t *testing.T) {
	g := newRig(t, func(_ *rig, c *Config) { c.MaxEntries = 2 })
	g.mustGet(key)
	for i := range 5 {
		k := NewKey("default", fmt.Sprintf("biz_refused%d", i), "", nil)
		if _, err := g.r.Get(context.Background(), k, Options{MinTTL: time.Minute, MissLimiter: never{}}); !errors.Is(err, ErrMissRateLimited) {
			t.Fatalf("Get = %v, want ErrMissRateLimited", err)
		}
	}
	entries := g.r.Entries(nil)
	if len(entries) != 1 || entries[0].KeyID != key.ID() {
		t.Fatalf("refused misses changed the cache: %+v", entries)
	}
	if n := g.r.Status().MissesRateLimited; n != 5 {
		t.Fatalf("MissesRateLimited = %d, want 5", n)
	}
}

// TestEntryRemovedDuringMiss: while a miss's upstream call is in flight its
// entry goes (evicted by an operator, pushed out by new keys, or taken with
// its credential). The call answers its own caller but must not fill the
// next entry for the key, which makes its own call, gets its own token, and
// lives on: fresh, scheduled, refreshed.
func TestEntryRemovedDuringMiss(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mod    func(*rig, *Config)
		remove func(t *testing.T, g *rig)
	}{
		{
			name: "evicted by id",
			remove: func(t *testing.T, g *rig) {
				if ids := g.r.Evict(key.ID()); !slices.Equal(ids, []string{key.ID()}) {
					t.Fatalf("Evict = %v, want [%s]", ids, key.ID())
				}
			},
		},
		{
			name: "pushed out over capacity",
			mod:  func(_ *rig, c *Config) { c.MaxEntries = 2 },
			remove: func(t *testing.T, g *rig) {
				// Two newer keys: the in-flight entry is the least
				// recently requested.
				g.advance(time.Second)
				g.mustGet(NewKey("default", "biz_newer1", "", nil))
				g.advance(time.Second)
				g.mustGet(NewKey("default", "biz_newer2", "", nil))
				if n := g.r.Status().EvictedOverCapacity; n != 1 {
					t.Fatalf("EvictedOverCapacity = %d, want 1 (one entry, with one watcher)", n)
				}
			},
		},
		{
			name: "credential removed and re-added",
			remove: func(t *testing.T, g *rig) {
				if err := g.r.SetCredentials(nil); err != nil {
					t.Fatal(err)
				}
				if err := g.r.SetCredentials([]Credential{{Name: "default", Fetcher: g.valve}}); err != nil {
					t.Fatal(err)
				}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newRig(t, tc.mod)
			g.valve.holdIf(forCompany(key.CompanyID))
			first := g.goGet(key)
			h1 := g.awaitStart()
			notify, ended := noted()
			w1, err := g.r.Watch(key, notify)
			if err != nil {
				t.Fatalf("Watch the in-flight entry: %v", err)
			}

			tc.remove(t, g)
			if _, err := g.r.Find(key.ID()); !errors.Is(err, ErrNotFound) {
				t.Fatalf("Find after the entry was removed: %v, want ErrNotFound", err)
			}
			g.awaitNote(ended, "its entry's removal")
			if u, ok := w1.Next(); !ok || !errors.Is(u.Err, ErrEvicted) {
				t.Fatalf("watcher of the removed entry: Next = %+v, %v; want ErrEvicted", u, ok)
			}

			// A new entry, and its own upstream call.
			second := g.goGet(key)
			h2 := g.awaitStart()
			h1.Release()
			r1 := g.await(first)
			if r1.err != nil || r1.res.Token == nil || r1.res.Source != SourceMinted {
				t.Fatalf("first caller: %+v, %v; want the token its call minted", r1.res, r1.err)
			}
			if i := g.info(key); i.State != StateRefreshing || !i.ExpiresAt.IsZero() {
				t.Fatalf("the first call filled the new entry: state %v, expires %v; want refreshing and no token", i.State, i.ExpiresAt)
			}
			h2.Release()
			r2 := g.await(second)
			if r2.err != nil || r2.res.Token == nil || r2.res.Source != SourceMinted {
				t.Fatalf("second caller: %+v, %v; want a token of its own call", r2.res, r2.err)
			}
			if r1.res.Token.Value == r2.res.Token.Value {
				t.Fatal("both callers got the same token; want one per upstream call")
			}
			if n := g.fake.CallsFor(key.CompanyID); n != 2 {
				t.Fatalf("upstream calls for the key = %d, want 2", n)
			}
			if infos := g.r.Entries(func(k Key) bool { return k.ID() == key.ID() }); len(infos) != 1 {
				t.Fatalf("entries for the key: %+v, want exactly one", infos)
			}
			if p := g.liveEntryProblem(key, r2.res.Token); p != "" {
				t.Fatalf("the key's entry after both calls: %s", p)
			}
			g.checkCounts()

			// It is refreshed on time: a watcher gets the next token.
			g.valve.holdIf(nil)
			notify, refreshed := noted()
			w, err := g.r.Watch(key, notify)
			if err != nil {
				t.Fatal(err)
			}
			if u, ok := w.Next(); !ok || u.Token != r2.res.Token {
				t.Fatalf("first Next = %+v, %v; want the current token", u, ok)
			}
			g.advanceTo(g.info(key).NextRefresh)
			g.awaitNote(refreshed, "the refresh")
			if u, ok := w.Next(); !ok || u.Token == nil || u.Token.Value == r2.res.Token.Value {
				t.Fatalf("Next after the refresh = %+v, %v; want a new token", u, ok)
			}
		})
	}
}

// missHook is a slog handler that runs fn once, inside Get, at the "cache
// miss" debug record: after Get has looked up the key's credential and
// before it takes the lock to make the entry.
type missHook struct {
	fn   atomic.Pointer[func()]
	once sync.Once
}

func (h *missHook) Enabled(context.Context, slog.Level) bool { return true }

func (h *missHook) Handle(_ context.Context, rec slog.Record) error {
	if rec.Message == "cache miss" {
		if fn := h.fn.Load(); fn != nil {
			h.once.Do(*fn)
		}
	}
	return nil
}

func (h *missHook) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *missHook) WithGroup(string) slog.Handler      { return h }

// TestCredentialChangedDuringMiss: a reload lands between a miss looking up
// its credential and making the entry. The entry must not be made on the
// old credential's schedule, whose loop has stopped: it would never be
// refreshed, and would be counted under no credential.
func TestCredentialChangedDuringMiss(t *testing.T) {
	for _, tc := range []struct {
		name    string
		readd   bool
		wantErr error
	}{
		{name: "removed", wantErr: ErrUnknownCredential},
		{name: "removed and re-added", readd: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hook := &missHook{}
			g := newRig(t, func(_ *rig, c *Config) { c.Logger = slog.New(hook) })
			reload := func() {
				if err := g.r.SetCredentials(nil); err != nil {
					t.Error(err)
				}
				if tc.readd {
					if err := g.r.SetCredentials([]Credential{{Name: "default", Fetcher: g.valve}}); err != nil {
						t.Error(err)
					}
				}
			}
			hook.fn.Store(&reload)
			res, err := g.get(key)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Get = %+v, %v; want error %v", res, err, tc.wantErr)
			}
			st := g.checkCounts()
			if tc.wantErr != nil {
				if st.Entries != 0 || st.ByState != [numStates]int{} || g.fake.CallCount() != 0 {
					t.Fatalf("after a miss for a removed credential: %d entries, by state %v, %d upstream calls; want none",
						st.Entries, st.EntriesByState(), g.fake.CallCount())
				}
				return
			}
			if p := g.liveEntryProblem(key, res.Token); p != "" {
				t.Fatalf("entry made across the reload: %s", p)
			}
			if len(st.Credentials) != 1 || st.Credentials[0].Entries != 1 {
				t.Fatalf("Status credentials = %+v, want default with 1 entry", st.Credentials)
			}
			g.advanceTo(g.info(key).NextRefresh)
			g.waitFor(key, "refreshed", func(i EntryInfo) bool { return i.Refreshes == 2 && i.State == StateFresh })
		})
	}
}

// refreshLag is an Observer that runs lag when a scheduled action has been
// taken off the schedule and before its worker starts (observers run
// outside the refresher's lock).
type refreshLag struct{ lag func() }

func (refreshLag) Upstream(int, time.Duration)        {}
func (refreshLag) Minted(string, bool)                {}
func (refreshLag) LimiterWait(time.Duration)          {}
func (o refreshLag) RefreshLag(string, time.Duration) { o.lag() }

// TestScheduledRefreshOfEvictedEntry: a refresh was taken off the schedule
// just before its entry was evicted. Nothing of it may bring the entry
// back: no entry for the key afterwards, no record in the store.
func TestScheduledRefreshOfEvictedEntry(t *testing.T) {
	t.Run("evicted while its call is in flight", func(t *testing.T) {
		g := newRig(t, nil)
		g.mustGet(key)
		g.valve.holdIf(forCompany(key.CompanyID))
		g.advanceTo(g.info(key).NextRefresh)
		h := g.awaitStart()
		if ids := g.r.Evict(key.ID()); !slices.Equal(ids, []string{key.ID()}) {
			t.Fatalf("Evict = %v, want [%s]", ids, key.ID())
		}
		h.Release()
		g.waitWorkersIdle("default")
		if n := g.fake.CallCount(); n != 2 {
			t.Fatalf("upstream calls = %d, want 2: the miss and the refresh", n)
		}
		checkNoTrace(t, g)
	})
	t.Run("evicted before its worker starts", func(t *testing.T) {
		var g *rig
		evicted := make(chan []string, 1)
		var once sync.Once
		evict := func() { once.Do(func() { evicted <- g.r.Evict(key.ID()) }) }
		g = newRig(t, func(_ *rig, c *Config) { c.Observer = refreshLag{lag: evict} })
		g.mustGet(key)
		g.advanceTo(g.info(key).NextRefresh)
		select {
		case ids := <-evicted:
			if !slices.Equal(ids, []string{key.ID()}) {
				t.Fatalf("Evict between the pop and the worker = %v, want [%s]", ids, key.ID())
			}
		case <-time.After(waitLimit):
			t.Fatalf("the refresh was not taken off the schedule within %v", waitLimit)
		}
		g.waitWorkersIdle("default")
		if n := g.fake.CallCount(); n != 1 {
			t.Fatalf("upstream calls = %d, want 1: no refresh of an evicted entry", n)
		}
		checkNoTrace(t, g)
	})
}

// checkNoTrace checks that key left no entry, no count and no record.
func checkNoTrace(t *testing.T, g *rig) {
	t.Helper()
	if _, err := g.r.Find(key.ID()); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Find after the refresh of an evicted entry: %v, want ErrNotFound", err)
	}
	if st := g.checkCounts(); st.Entries != 0 || st.ByState != [numStates]int{} {
		t.Fatalf("Status: %d entries, by state %v; want none", st.Entries, st.EntriesByState())
	}
	if rec, ok := g.storedRecords()[key.ID()]; ok {
		t.Fatalf("the store still has a record for the evicted key: %+v", rec)
	}
}

// TestCredentialBacklogDoesNotDelayOthers: one credential's refreshes are
// held up (its calls stuck upstream, its workers all busy, more due); the
// other credential's refresh still runs on time.
func TestCredentialBacklogDoesNotDelayOthers(t *testing.T) {
	const backlog = 20
	g := newRig(t, func(g *rig, c *Config) {
		b, err := whop.New(whop.Config{BaseURL: g.fake.URL(), APIKey: secondKey, FingerprintSalt: g.store.Salt()})
		if err != nil {
			t.Fatal(err)
		}
		c.Credentials = []Credential{{Name: "a", Fetcher: g.valve}, {Name: "b", Fetcher: b}}
		c.Rate = 1e6
	})
	var aKeys []Key
	for i := range backlog {
		k := NewKey("a", fmt.Sprintf("biz_a%02d", i), "", nil)
		g.mustGet(k)
		aKeys = append(aKeys, k)
	}
	g.advance(7 * time.Minute) // b's token is younger: due after all of a's
	bKey := NewKey("b", "biz_b", "", nil)
	g.mustGet(bKey)
	bDue := g.info(bKey).NextRefresh
	if aLast := g.latestRefresh(aKeys...); !aLast.Before(bDue) {
		t.Fatalf("setup: a's last refresh %v is not before b's %v", aLast, bDue)
	}

	g.valve.holdIf(all) // the valve is a's only
	g.advanceTo(g.latestRefresh(aKeys...))
	for range DefaultMaxInFlight {
		g.awaitStart()
	}
	// One step of the clock, to b's refresh, and no other.
	g.quiesce("b")
	g.clock.Advance(bDue.Sub(g.clock.Now()))
	g.waitFor(bKey, "refreshed on time", func(i EntryInfo) bool { return i.Refreshes == 2 && i.State == StateFresh })

	select {
	case h := <-g.valve.started:
		t.Fatalf("a fifth refresh of a started (%s) while a's workers were all held", h.Req.CompanyID)
	default:
	}
	for _, k := range aKeys {
		if i := g.info(k); i.Refreshes != 1 {
			t.Fatalf("%s refreshed %d times while a's calls were held", k.Subject(), i.Refreshes)
		}
	}
	st := g.r.Status()
	if st.ByState[StateRefreshing] != DefaultMaxInFlight {
		t.Fatalf("%d entries refreshing, want %d (a's held calls)", st.ByState[StateRefreshing], DefaultMaxInFlight)
	}
	byName := map[string]CredentialStats{}
	for _, c := range st.Credentials {
		byName[c.Name] = c
	}
	if a, b := byName["a"], byName["b"]; a.Entries != backlog || b.Entries != 1 || a.InFlight != DefaultMaxInFlight || b.InFlight != 0 {
		t.Fatalf("credentials: a %d entries, %d in flight; b %d entries, %d in flight; want %d, %d; 1, 0",
			a.Entries, a.InFlight, b.Entries, b.InFlight, backlog, DefaultMaxInFlight)
	}

	// Released, a's backlog drains.
	g.valve.open()
	for _, k := range aKeys {
		g.waitFor(k, "refreshed after the release", func(i EntryInfo) bool { return i.Refreshes == 2 })
	}
}

// TestShutdownMidRefreshIsNotAFailure: Run ends while a refresh's call is
// in flight. The call is cancelled, and that is no failure of the entry's.
func TestShutdownMidRefreshIsNotAFailure(t *testing.T) {
	g := newRig(t, nil)
	g.mustGet(key)
	g.valve.holdIf(forCompany(key.CompanyID))
	g.advanceTo(g.info(key).NextRefresh)
	g.awaitStart()
	g.stop()
	i := g.waitFor(key, "its cancelled call ended", func(i EntryInfo) bool { return i.State != StateRefreshing })
	if i.State != StateFresh || i.LastError != nil || i.Failures != 0 {
		t.Fatalf("after shutdown mid-refresh: state %v, last error %+v, %d failures; want fresh, none, 0", i.State, i.LastError, i.Failures)
	}
	if st := g.r.Status(); st.UpstreamErrors != 0 || st.LastError != nil {
		t.Fatalf("Status: %d upstream errors, last %+v; want none", st.UpstreamErrors, st.LastError)
	}
	rec, ok := g.storedRecords()[key.ID()]
	if !ok {
		t.Fatal("the store lost the entry's record")
	}
	if rec.LastError != nil || rec.Failures != 0 {
		t.Fatalf("stored record: last error %+v, %d failures; want none", rec.LastError, rec.Failures)
	}
}

// TestStatusCountsAgreeWithEntries: the per-state counts Status keeps as
// entries change match a count of the entries, through hits, misses, an
// eviction, refreshes, an idle entry and failures.
func TestStatusCountsAgreeWithEntries(t *testing.T) {
	g := newRig(t, func(_ *rig, c *Config) { c.Rate = 1e6 })
	kA := NewKey("default", "biz_asked", "", nil)
	kR := NewKey("default", "biz_retrying", "", nil)
	kI := NewKey("default", "biz_idle", "", nil)
	kV := NewKey("default", "biz_evicted", "", nil)
	kF := NewKey("default", "biz_failing", "", nil)
	for _, k := range []Key{kA, kR, kI, kV} {
		g.mustGet(k)
	}
	for range 3 {
		g.mustGet(kA)
	}
	g.checkCounts()
	g.r.Evict(kV.ID())
	g.checkCounts()

	// Everyone was asked for within a lifetime: all refreshed.
	g.advanceTo(g.latestRefresh(kA, kR, kI))
	for _, k := range []Key{kA, kR, kI} {
		g.waitFor(k, "refreshed", func(i EntryInfo) bool { return i.Refreshes == 2 && i.State == StateFresh })
	}
	g.mustGet(kA)
	g.mustGet(kR)
	g.checkCounts()

	// Nobody asked for kI for a lifetime: set aside.
	g.advanceTo(g.latestRefresh(kA, kR, kI))
	for _, k := range []Key{kA, kR} {
		g.waitFor(k, "refreshed", func(i EntryInfo) bool { return i.Refreshes == 3 && i.State == StateFresh })
	}
	g.waitFor(kI, "idle", func(i EntryInfo) bool { return i.State == StateIdle })
	g.checkCounts()

	g.fake.Enqueue(whoptest.Fault{Status: 404})
	if _, err := g.get(kF); err == nil {
		t.Fatal("Get of a key Whop answers 404: no error")
	}
	g.fake.Enqueue(whoptest.Fault{Status: 503})
	if _, err := g.r.Refresh(context.Background(), kR.ID()); !whop.IsRetryable(err) {
		t.Fatalf("Refresh answered 503: %v, want the 503", err)
	}
	st := g.checkCounts()
	want := [numStates]int{StateFresh: 1, StateRetrying: 1, StateIdle: 1, StateFailing: 1}
	if st.ByState != want {
		t.Fatalf("by state %v, want %v", st.EntriesByState(), Status{ByState: want}.EntriesByState())
	}
	if st.Hits != 5 || st.Misses != 5 {
		t.Fatalf("hits %d, misses %d; want 5, 5", st.Hits, st.Misses)
	}
}

func TestWatch(t *testing.T) {
	t.Run("next returns each token once", func(t *testing.T) {
		g := newRig(t, nil)
		first := g.mustGet(key).Token
		notify, notes := noted()
		w, err := g.r.Watch(key, notify)
		if err != nil {
			t.Fatal(err)
		}
		if u, ok := w.Next(); !ok || u.Token != first || u.KeyID != key.ID() || u.Err != nil {
			t.Fatalf("first Next = %+v, %v; want the current token", u, ok)
		}
		if u, ok := w.Next(); ok {
			t.Fatalf("second Next = %+v; want nothing new", u)
		}
		g.advanceTo(g.info(key).NextRefresh)
		g.awaitNote(notes, "the refresh")
		u, ok := w.Next()
		if !ok || u.Token == nil || u.Token == first || u.Err != nil {
			t.Fatalf("Next after the refresh = %+v, %v; want the new token", u, ok)
		}
		if u, ok := w.Next(); ok {
			t.Fatalf("Next again = %+v; want nothing new", u)
		}
	})

	t.Run("touch counts as a request", func(t *testing.T) {
		g := newRig(t, nil)
		touched := NewKey("default", "biz_touched", "", nil)
		watched := NewKey("default", "biz_watched", "", nil)
		g.mustGet(touched)
		g.mustGet(watched)
		wt, err := g.r.Watch(touched, func() {})
		if err != nil {
			t.Fatal(err)
		}
		ww, err := g.r.Watch(watched, func() {})
		if err != nil {
			t.Fatal(err)
		}
		g.advanceTo(g.latestRefresh(touched, watched))
		for _, k := range []Key{touched, watched} {
			g.waitFor(k, "refreshed", func(i EntryInfo) bool { return i.Refreshes == 2 && i.State == StateFresh })
		}
		wt.Touch()
		g.advanceTo(g.latestRefresh(touched, watched))
		g.waitFor(touched, "refreshed again", func(i EntryInfo) bool { return i.Refreshes == 3 && i.State == StateFresh })
		g.waitFor(watched, "idle", func(i EntryInfo) bool { return i.State == StateIdle })
		if i := g.info(watched); i.Refreshes != 2 {
			t.Fatalf("an entry only watched was refreshed %d times, want 2", i.Refreshes)
		}
		// A touch brings an idle entry back, as a request would.
		ww.Touch()
		g.waitFor(watched, "revived", func(i EntryInfo) bool { return i.Refreshes == 3 && i.State == StateFresh })
	})

	t.Run("stop is idempotent", func(t *testing.T) {
		minted := make(chan struct{}, 8)
		g := newRig(t, func(_ *rig, c *Config) { c.OnMint = func(Mint) { minted <- struct{}{} } })
		g.mustGet(key)
		<-minted
		var stoppedNotes atomic.Int32
		stopped, err := g.r.Watch(key, func() { stoppedNotes.Add(1) })
		if err != nil {
			t.Fatal(err)
		}
		notify, notes := noted()
		kept, err := g.r.Watch(key, notify)
		if err != nil {
			t.Fatal(err)
		}
		stopped.Stop()
		stopped.Stop()
		if n := g.info(key).Watchers; n != 1 {
			t.Fatalf("%d watchers after one of two stopped (twice), want 1", n)
		}
		g.advanceTo(g.info(key).NextRefresh)
		select {
		case <-minted: // OnMint runs after the watchers are told
		case <-time.After(waitLimit):
			t.Fatal("no refresh")
		}
		g.awaitNote(notes, "the refresh")
		if n := stoppedNotes.Load(); n != 0 {
			t.Fatalf("a stopped watcher was notified %d times", n)
		}
		kept.Stop()
		kept.Stop()
		if n := g.info(key).Watchers; n != 0 {
			t.Fatalf("%d watchers after both stopped, want 0", n)
		}
	})

	for _, tc := range []struct {
		name string
		mod  func(*rig, *Config)
		end  func(t *testing.T, g *rig)
	}{
		{name: "evicted", end: func(t *testing.T, g *rig) { g.r.Evict(key.ID()) }},
		{
			name: "pushed out over capacity",
			mod:  func(_ *rig, c *Config) { c.MaxEntries = 1 },
			end: func(t *testing.T, g *rig) {
				g.advance(time.Second)
				g.mustGet(NewKey("default", "biz_newer", "", nil))
				if n := g.r.Status().EvictedOverCapacity; n != 1 {
					t.Fatalf("EvictedOverCapacity = %d, want 1", n)
				}
			},
		},
		{
			name: "credential removed",
			end: func(t *testing.T, g *rig) {
				if err := g.r.SetCredentials(nil); err != nil {
					t.Fatal(err)
				}
			},
		},
	} {
		t.Run("ends when "+tc.name, func(t *testing.T) {
			g := newRig(t, tc.mod)
			g.mustGet(key)
			notify, notes := noted()
			w, err := g.r.Watch(key, notify)
			if err != nil {
				t.Fatal(err)
			}
			w.Next()
			tc.end(t, g)
			g.awaitNote(notes, "the end")
			for range 2 { // and it stays ended
				if u, ok := w.Next(); !ok || !errors.Is(u.Err, ErrEvicted) || u.Token != nil {
					t.Fatalf("Next = %+v, %v; want ErrEvicted", u, ok)
				}
			}
			if _, err := g.r.Watch(key, func() {}); !errors.Is(err, ErrEvicted) {
				t.Fatalf("Watch after the end: %v, want ErrEvicted", err)
			}
			w.Stop()
		})
	}
}

// TestRateLimitWithoutHintPausesTheCredential: a 429 with neither
// Retry-After nor retry-after-ms (Whop's documented v5 answer) pauses every
// key of the credential for the default cooldown, and status says why.
func TestRateLimitWithoutHintPausesTheCredential(t *testing.T) {
	g := newRig(t, nil)
	g.fake.Enqueue(whoptest.RateLimited())
	if _, err := g.get(key); err == nil {
		t.Fatal("want the 429")
	}
	st := g.r.Status().Credentials[0]
	if want := g.clock.Now().Add(DefaultRateLimitCooldown); !st.PausedUntil.Equal(want) || st.PauseReason != "default cooldown (no Retry-After)" {
		t.Fatalf("paused until %v (%q), want %v (default cooldown)", st.PausedUntil, st.PauseReason, want)
	}
	// Another key of the credential, with a deadline inside the pause,
	// fails at once without a call, naming the pause.
	var pe *PausedError
	if _, err := g.get(NewKey("default", "biz_other", "", nil)); !errors.As(err, &pe) || pe.Why != st.PauseReason {
		t.Fatalf("Get during the pause = %v, want a PausedError", err)
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("upstream calls during the pause = %d, want 1", n)
	}
}

// TestRetryAfterMsPauses: retry-after-ms sets the pause, to the millisecond.
func TestRetryAfterMsPauses(t *testing.T) {
	g := newRig(t, nil)
	g.fake.Enqueue(whoptest.Fault{Status: 429, RetryAfterMs: "1500"})
	if _, err := g.get(key); err == nil {
		t.Fatal("want the 429")
	}
	st := g.r.Status().Credentials[0]
	if want := g.clock.Now().Add(1500 * time.Millisecond); !st.PausedUntil.Equal(want) || st.PauseReason != "retry-after-ms header" {
		t.Fatalf("paused until %v (%q), want %v by retry-after-ms", st.PausedUntil, st.PauseReason, want)
	}
}

// TestInCallRetryOfAColdMiss: a dropped connection and a 503 on a cold
// miss are retried within the one call, after the SDKs' backoff on the
// virtual clock; the caller gets a token, and the key one entry.
func TestInCallRetryOfAColdMiss(t *testing.T) {
	g := newRig(t, func(_ *rig, c *Config) { c.InCallRetries = DefaultInCallRetries })
	g.fake.Enqueue(whoptest.Fault{Drop: true}, whoptest.Fault{Status: 503, ShouldRetry: "true"})
	start := g.clock.Now()
	ch := g.goGet(key)
	for n := 2; n <= 3; n++ {
		// The call is in flight, not on the schedule: step virtual time
		// until its retry timer fires.
		g.poll(func() string { return fmt.Sprintf("upstream calls = %d, want %d", g.fake.CallCount(), n) },
			func() bool { g.clock.Advance(10 * time.Millisecond); return g.fake.CallCount() >= n })
	}
	// Backoffs of 0.375-0.5s and 0.75-1s, on the virtual clock.
	if waited := g.clock.Now().Sub(start); waited < 1125*time.Millisecond || waited > 1600*time.Millisecond {
		t.Fatalf("the two retries came %v after the first call, want 1.125s to 1.5s", waited)
	}
	if r := g.await(ch); r.err != nil || r.res.Source != SourceMinted {
		t.Fatalf("Get after two retried failures = %v (%v), want a minted token", r.err, r.res.Source)
	}
}

// TestShouldRetryFalseStopsInCallRetry: x-should-retry: false makes even a
// 503 final, as Whop's SDKs treat it.
func TestShouldRetryFalseStopsInCallRetry(t *testing.T) {
	g := newRig(t, func(_ *rig, c *Config) { c.InCallRetries = DefaultInCallRetries })
	g.fake.Enqueue(whoptest.Fault{Status: 503, ShouldRetry: "false"})
	if _, err := g.get(key); err == nil || whop.IsRetryable(err) {
		t.Fatalf("Get = %v, want a final 503", err)
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("upstream calls = %d, want 1", n)
	}
}

// TestMaxLifetimeWithWhopClockBehind: --token-lifetime 3h against a Whop
// whose clock is 0.3s behind ours: the margin keeps every mint valid.
func TestMaxLifetimeWithWhopClockBehind(t *testing.T) {
	g := newRig(t, func(_ *rig, c *Config) { c.Lifetime = MaxLifetime })
	g.fake.SetSkew(-300 * time.Millisecond)
	res := g.mustGet(key)
	if life := res.Token.ExpiresAt.Sub(res.Token.ObtainedAt); life < MaxLifetime-lifetimeMargin-time.Second || life > MaxLifetime {
		t.Fatalf("lifetime %v, want about %v", life, MaxLifetime-lifetimeMargin)
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("upstream calls = %d, want 1", n)
	}
}

// TestClockSkewCorrected: Whop's clock 10 minutes ahead: tokend asks for
// the lifetime on Whop's clock and judges expiry on its own, so the token
// counts as an hour long here (and Whop grants an hour), and status shows
// the skew.
func TestClockSkewCorrected(t *testing.T) {
	g := newRig(t, nil)
	g.fake.SetSkew(10 * time.Minute)
	g.mustGet(NewKey("default", "biz_probe", "", nil)) // learns the skew
	res := g.mustGet(key)
	if life := res.Token.ExpiresAt.Sub(res.Token.ObtainedAt); (life - DefaultLifetime).Abs() > 2*time.Second {
		t.Fatalf("token lifetime on this host's clock = %v, want %v", life, DefaultLifetime)
	}
	st := g.r.Status().Credentials[0]
	if (st.ClockSkew - 10*time.Minute).Abs() > 2*time.Second {
		t.Fatalf("status clock skew = %v, want about 10m", st.ClockSkew)
	}
	calls := g.fake.Calls()
	asked, err := time.Parse(time.RFC3339, calls[len(calls)-1].ExpiresAt)
	if err != nil {
		t.Fatal(err)
	}
	if d := asked.Sub(g.clock.Now().Add(10*time.Minute + DefaultLifetime)); d.Abs() > 2*time.Second {
		t.Fatalf("asked expires_at %v off from Whop's now + 1h", d)
	}
}

// TestRejectedKeyIsProbed: after a 401, calls are refused without a
// request until the probe interval passes; then one call tries the key
// again, and its success ends the lockout.
func TestRejectedKeyIsProbed(t *testing.T) {
	g := newRig(t, nil)
	g.fake.Enqueue(whoptest.Fault{Status: 401})
	if _, err := g.get(key); err == nil {
		t.Fatal("want the 401")
	}
	if _, err := g.get(NewKey("default", "biz_other", "", nil)); !errors.Is(err, ErrKeyRejected) {
		t.Fatalf("Get before the probe = %v, want ErrKeyRejected", err)
	}
	st := g.r.Status().Credentials[0]
	if !st.Rejected || !st.NextProbe.Equal(g.clock.Now().Add(DefaultKeyProbeInterval)) {
		t.Fatalf("status rejected=%v next probe %v, want a probe in %v", st.Rejected, st.NextProbe, DefaultKeyProbeInterval)
	}
	g.advance(DefaultKeyProbeInterval)
	g.mustGet(NewKey("default", "biz_after", "", nil))
	if st := g.r.Status().Credentials[0]; st.Rejected {
		t.Fatal("still rejected after a probe Whop accepted")
	}
}

// TestExpiresAtRefusedRetriesWithWhopDefault: a 400 about expires_at is
// Whop's clock disagreeing with the lifetime asked: the call asks once
// more with no expires_at (Whop's default), and the key is not negative-
// cached.
func TestExpiresAtRefusedRetriesWithWhopDefault(t *testing.T) {
	g := newRig(t, nil)
	g.fake.Enqueue(whoptest.Fault{Status: 400, Body: `{"error":{"type":"invalid_request_error","code":"parameter_invalid","param":"expires_at","message":"Invalid parameter: expires_at must be at most 3 hours from now."}}`})
	res := g.mustGet(key)
	calls := g.fake.Calls()
	if len(calls) != 2 || calls[0].ExpiresAt == "" || calls[1].ExpiresAt != "" {
		t.Fatalf("calls = %+v, want one with expires_at, then one without", calls)
	}
	if life := res.Token.ExpiresAt.Sub(res.Token.ObtainedAt); (life - time.Hour).Abs() > 2*time.Second {
		t.Fatalf("lifetime %v, want Whop's default 1h", life)
	}
}
