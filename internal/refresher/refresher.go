// Package refresher keeps cache entries supplied with valid tokens: it mints
// on a miss (one upstream call however many callers wait), refreshes each
// entry ahead of expiry from a single timer, and retries failures with
// randomized exponential backoff while the old token keeps being served.
package refresher

import (
	"bytes"
	"container/heap"
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"golang.org/x/sync/singleflight"
	"golang.org/x/time/rate"

	"github.com/tokend/tokend/internal/cache"
	"github.com/tokend/tokend/internal/clock"
	"github.com/tokend/tokend/internal/whop"
)

// MaxLifetime is the longest token Whop issues.
const MaxLifetime = 3 * time.Hour

// maxRetryAfter bounds what a Retry-After header may impose: a bad header
// must not pause a credential for years.
const maxRetryAfter = time.Hour

// Fetcher mints tokens upstream; *whop.Client is one.
type Fetcher interface {
	CreateAccessToken(ctx context.Context, r whop.Request) (whop.AccessToken, error)
	// KeyFingerprint identifies the current API key without revealing it.
	KeyFingerprint() []byte
}

// Config configures New. Zero values mean the defaults.
type Config struct {
	Cache *cache.Cache
	// Credentials are the identities to mint with; SetCredentials changes
	// them later. Fetcher alone is shorthand for one credential "default".
	Credentials []Credential
	Fetcher     Fetcher
	Clock       clock.Clock
	Logger      *slog.Logger

	// Lifetime is the token lifetime asked of Whop. Default 1h, at most 3h.
	Lifetime time.Duration
	// RefreshAt is the fraction of a token's lifetime after which it is
	// refreshed. Default 2/3.
	RefreshAt float64
	// Jitter is the fraction of the lifetime by which refreshes are moved
	// earlier at random, so tokens minted together drift apart. Default 0.1.
	Jitter float64
	// RetryInitial and RetryMax bound the randomized exponential backoff
	// between failed refreshes. Defaults 1s and 2m.
	RetryInitial, RetryMax time.Duration
	// NegativeTTL is how long an error a retry cannot fix is returned to
	// callers without asking upstream again. Default 30s.
	NegativeTTL time.Duration
	// ExpiryMargin is subtracted from every token's expires_at to absorb
	// clock skew with Whop. Default 1s.
	ExpiryMargin time.Duration
	// RestartSpread is the window over which refreshes that fell due while
	// tokend was down are spread. Default 1m.
	RestartSpread time.Duration
	// MaxInFlight, Rate and Burst limit upstream calls. Defaults 4, 10/s, 20.
	MaxInFlight int
	Rate        rate.Limit
	Burst       int
	// Workers is how many scheduled refreshes run at once. Default MaxInFlight.
	Workers int
	// MaxEntries bounds the cache; a new key beyond it evicts the least
	// recently requested entry. Default 100,000.
	MaxEntries int
	// Observer, if set, is told about upstream calls for metrics.
	Observer Observer
	// OnMint, if set, is told of every token obtained from Whop and why:
	// "miss", "refresh" (scheduled) or "admin". For the audit trail.
	OnMint func(e *cache.Entry, t *cache.Token, cause string)
}

func (c *Config) setDefaults() error {
	if c.Cache == nil || c.Fetcher == nil && len(c.Credentials) == 0 {
		return errors.New("refresher: Cache and a Fetcher or Credentials are required")
	}
	if len(c.Credentials) == 0 {
		c.Credentials = []Credential{{Name: "default", Fetcher: c.Fetcher}}
	}
	if c.Clock == nil {
		c.Clock = clock.Real{}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Lifetime == 0 {
		c.Lifetime = time.Hour
	}
	if c.Lifetime < 0 || c.Lifetime > MaxLifetime {
		return fmt.Errorf("refresher: token lifetime %v: must be positive and at most %v", c.Lifetime, MaxLifetime)
	}
	if c.RefreshAt == 0 {
		c.RefreshAt = 2.0 / 3
	}
	if c.RefreshAt <= 0 || c.RefreshAt >= 1 {
		return fmt.Errorf("refresher: refresh fraction %v: must be between 0 and 1", c.RefreshAt)
	}
	if c.Jitter == 0 {
		c.Jitter = 0.1
	}
	if c.Jitter < 0 || c.Jitter >= c.RefreshAt {
		return fmt.Errorf("refresher: jitter %v: must be between 0 and the refresh fraction", c.Jitter)
	}
	if c.RetryInitial <= 0 {
		c.RetryInitial = time.Second
	}
	if c.RetryMax <= 0 {
		c.RetryMax = 2 * time.Minute
	}
	if c.NegativeTTL <= 0 {
		c.NegativeTTL = 30 * time.Second
	}
	if c.ExpiryMargin <= 0 {
		c.ExpiryMargin = time.Second
	}
	if c.RestartSpread <= 0 {
		c.RestartSpread = time.Minute
	}
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = 4
	}
	if c.Rate <= 0 {
		c.Rate = 10
	}
	if c.Burst <= 0 {
		c.Burst = 20
	}
	if c.Workers <= 0 {
		c.Workers = c.MaxInFlight
	}
	if c.MaxEntries <= 0 {
		c.MaxEntries = 100_000
	}
	return nil
}

// Observer receives the refresher's events for metrics.
type Observer interface {
	// Upstream: one request to Whop; status 0 for network errors.
	Upstream(status int, d time.Duration)
	// Minted: one mint attempt by cause ("miss", "refresh", "rejected", "admin").
	Minted(cause string, ok bool)
	// LimiterWait: an upstream call waited d for the limiter.
	LimiterWait(d time.Duration)
}

// Refresher serves tokens from the cache and keeps them fresh.
type Refresher struct {
	cfg   Config
	cache *cache.Cache
	clock clock.Clock
	log   *slog.Logger
	ups   atomic.Pointer[upstreamSet]
	sf    singleflight.Group

	// base is cancelled when Run returns, ending fetches nobody waits for.
	base   context.Context
	cancel context.CancelFunc

	mu    sync.Mutex
	items map[*cache.Entry]*item
	queue queue
	wake  chan struct{}

	watches watches

	hits, misses   atomic.Uint64
	upstreamCalls  atomic.Uint64
	upstreamErrors atomic.Uint64
	lastError      atomic.Pointer[cache.ErrorInfo]
	evicted        atomic.Uint64 // over capacity
	droppedIdle    atomic.Uint64
	missesLimited  atomic.Uint64
}

// New returns a Refresher and schedules every entry already in the cache.
func New(cfg Config) (*Refresher, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	base, cancel := context.WithCancel(context.Background())
	r := &Refresher{
		cfg:    cfg,
		cache:  cfg.Cache,
		clock:  cfg.Clock,
		log:    cfg.Logger,
		base:   base,
		cancel: cancel,
		items:  make(map[*cache.Entry]*item),
		wake:   make(chan struct{}, 1),
	}
	r.ups.Store(&upstreamSet{})
	if err := r.SetCredentials(cfg.Credentials); err != nil {
		return nil, err
	}
	r.scheduleLoaded()
	return r, nil
}

// scheduleLoaded queues the entries found on disk. Refreshes that fell due
// while tokend was down are spread over RestartSpread with fresh jitter so a
// restart does not fire them all at once.
func (r *Refresher) scheduleLoaded() {
	now := r.clock.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.cache.Entries() {
		t := e.Token()
		if t == nil {
			continue
		}
		due := e.Meta().NextRefresh
		if due.IsZero() {
			due = r.refreshTime(t)
		}
		if !due.After(now) {
			// Spread, but never past the point where a sixth of the
			// lifetime is left: repeated restarts must not keep
			// postponing a refresh until the token runs out.
			latest := t.ExpiresAt.Add(-t.ExpiresAt.Sub(t.ObtainedAt) / 6)
			due = now
			if window := min(r.cfg.RestartSpread, latest.Sub(now)); window > 0 {
				due = now.Add(time.Duration(rand.Int64N(int64(window))))
			}
		}
		r.scheduleLocked(r.itemLocked(e), due)
	}
}

// Stats are the refresher's counters since start and the upstream gate's
// state.
type Stats struct {
	Hits, Misses, UpstreamCalls, UpstreamErrors uint64
	LastError                                   *cache.ErrorInfo
	UpstreamInFlight, UpstreamMaxInFlight       int
	UpstreamRate                                float64
	UpstreamPausedUntil                         time.Time
	APIKeyRejected                              bool
	EvictedOverCapacity, DroppedIdle            uint64
	MaxEntries                                  int
	MissesRateLimited                           uint64
}

func (r *Refresher) Stats() Stats {
	st := r.stats()
	for _, u := range r.upstreams() {
		st.UpstreamInFlight += u.gate.inFlight()
		if p := u.gate.pausedTill(); p.After(st.UpstreamPausedUntil) {
			st.UpstreamPausedUntil = p
		}
		st.APIKeyRejected = st.APIKeyRejected || u.gate.isRejected(u.Fetcher.KeyFingerprint())
	}
	return st
}

func (r *Refresher) stats() Stats {
	return Stats{
		Hits:                r.hits.Load(),
		Misses:              r.misses.Load(),
		UpstreamCalls:       r.upstreamCalls.Load(),
		UpstreamErrors:      r.upstreamErrors.Load(),
		LastError:           r.lastError.Load(),
		UpstreamMaxInFlight: r.cfg.MaxInFlight,
		UpstreamRate:        float64(r.cfg.Rate),
		EvictedOverCapacity: r.evicted.Load(),
		DroppedIdle:         r.droppedIdle.Load(),
		MaxEntries:          r.cfg.MaxEntries,
		MissesRateLimited:   r.missesLimited.Load(),
	}
}

// ErrLifetime is returned when a caller's min_ttl exceeds what Whop issues.
var ErrLifetime = errors.New("no token Whop issues stays valid that long")

// Get returns a token for k valid for at least minTTL. A hit is answered
// from memory; a miss waits for one shared upstream call, or for ctx, whose
// end does not cancel the call: the next caller gets its result.
//
// Options.Rejected, when set, is a token the caller saw Whop refuse: if it
// is still the cached one it is replaced, once however many callers report
// it.
func (r *Refresher) Get(ctx context.Context, k cache.Key, o Options) (*cache.Token, *cache.Entry, error) {
	minTTL, rejected := o.MinTTL, o.Rejected
	var buf [256]byte // most keys fit: the hit path encodes without allocating
	enc := k.AppendEncode(buf[:0])
	now := r.clock.Now()
	up := r.upstream(k.Credential)
	if up == nil {
		return nil, nil, fmt.Errorf("credential %q: %w", k.Credential, ErrUnknownCredential)
	}
	if e := r.cache.Get(enc); e != nil {
		if t := e.Token(); r.usable(up, t, now, minTTL) && !isToken(t, rejected) {
			e.Touch(now, true)
			r.hits.Add(1)
			if e.Idle() && e.Revive() {
				r.revive(e)
			}
			return t, e, nil
		}
	}
	r.misses.Add(1)
	if r.log.Enabled(ctx, slog.LevelDebug) {
		r.log.Debug("cache miss", "key", k.ID(), "subject", k.Subject(), "reason", r.missReason(up, enc, now, minTTL, rejected))
	}
	want := want{minTTL: minTTL, rejected: rejected, lifetime: r.cfg.Lifetime, cause: "miss"}
	if rejected != "" {
		want.cause = "rejected"
	}
	if need := minTTL + r.cfg.ExpiryMargin; need >= want.lifetime {
		// Ask for enough to cover min_ttl and the call's own latency.
		want.lifetime = min(need+time.Minute, MaxLifetime)
	}
	for attempt := 0; ; attempt++ {
		// A refused miss must not create an entry: it would take a slot
		// from everyone under --max-entries.
		if e := r.cache.Get(enc); e != nil {
			if err := r.remembered(e); err != nil {
				return nil, e, err
			}
		}
		if o.MissLimiter != nil && !r.mintingKey(enc) && !o.MissLimiter.Allow() {
			r.missesLimited.Add(1)
			return nil, nil, ErrMissRateLimited
		}
		e, created := r.cache.Ensure(k)
		e.Touch(now, false)
		if created {
			r.enforceCapacity(e)
		}
		t, err := r.mintShared(ctx, e, want)
		if err != nil {
			return nil, e, err
		}
		if r.usable(up, t, r.clock.Now(), minTTL) {
			return t, e, nil
		}
		// We joined a call made for a shorter min_ttl; make our own once.
		if attempt > 0 || want.lifetime == MaxLifetime && t.ExpiresAt.Sub(t.ObtainedAt) >= MaxLifetime-time.Minute {
			return nil, e, fmt.Errorf("min_ttl %v: %w", minTTL, ErrLifetime)
		}
	}
}

// revive puts an idle entry that a client asked for back on the refresh
// schedule: it is past its refresh point, so the refresh is due now.
func (r *Refresher) revive(e *cache.Entry) {
	r.cache.UpdateMeta(e, func(m *cache.Meta) { m.State = cache.StateFresh })
	r.mu.Lock()
	r.scheduleLocked(r.itemLocked(e), r.clock.Now())
	r.mu.Unlock()
}

// missReason says why Get could not answer from the cache, for debug logs.
func (r *Refresher) missReason(up *upstream, enc []byte, now time.Time, minTTL time.Duration, rejected string) string {
	e := r.cache.Get(enc)
	switch t := (*cache.Token)(nil); {
	case e == nil:
		return "no entry"
	case e.Token() == nil:
		return "no token yet"
	case isToken(e.Token(), rejected):
		return "caller reported the token rejected"
	case !up.current(e.Token()):
		return "token minted by another API key"
	default:
		t = e.Token()
		return fmt.Sprintf("token valid for %v, caller needs %v plus a %v margin", t.ExpiresAt.Sub(now).Round(time.Millisecond), minTTL, r.cfg.ExpiryMargin)
	}
}

// Options are the caller's needs for Get.
type Options struct {
	// MinTTL is how long the token must stay valid.
	MinTTL time.Duration
	// Rejected is a token the caller saw Whop refuse (401).
	Rejected string
	// MissLimiter, when set, must allow every miss that starts an upstream
	// call (joining one in flight is free): a per-caller bound on what one
	// local process can cost the API key's quota.
	MissLimiter interface{ Allow() bool }
}

// ErrMissRateLimited is returned when a caller's MissLimiter refuses a miss.
var ErrMissRateLimited = errors.New("too many cache misses from this caller; retry later")

// want is what a caller needs from a mint.
type want struct {
	minTTL   time.Duration
	rejected string
	lifetime time.Duration
	// force mints even when the current token would do: a scheduled or
	// operator-requested refresh.
	force bool
	// cause says why, for OnMint.
	cause string
}

// isToken reports whether t's value is v, in constant time since v came
// from a client.
func isToken(t *cache.Token, v string) bool {
	return v != "" && t != nil && subtle.ConstantTimeCompare([]byte(t.Value), []byte(v)) == 1
}

// enforceCapacity evicts the least recently requested entries beyond
// MaxEntries, sparing the one just created.
func (r *Refresher) enforceCapacity(keep *cache.Entry) {
	over := r.cache.Len() - r.cfg.MaxEntries
	if over <= 0 {
		return
	}
	victims := r.cache.LeastRecentlyRequested(over, keep)
	r.Evict(victims...)
	r.evicted.Add(uint64(len(victims)))
	r.log.Info("cache full: evicted least recently requested entries", "evicted", len(victims), "max_entries", r.cfg.MaxEntries)
}

// usable reports whether t can be handed out: minted by the current key and
// valid for minTTL beyond the safety margin.
func (r *Refresher) usable(up *upstream, t *cache.Token, now time.Time, minTTL time.Duration) bool {
	return t.ValidFor(now, minTTL+r.cfg.ExpiryMargin) && up.current(t)
}

// remembered returns the entry's last error while callers should get it
// without a new upstream call: during a retry backoff, or inside the
// negative-cache window of an error a retry cannot fix.
func (r *Refresher) remembered(e *cache.Entry) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	it := r.items[e]
	up := r.upstream(e.Key().Credential)
	if it == nil || it.err == nil || up == nil || !r.clock.Now().Before(it.errUntil) || !bytes.Equal(it.errKey, up.Fetcher.KeyFingerprint()) {
		return nil
	}
	return it.err
}

// mintingKey reports whether an upstream call for the key is in flight.
func (r *Refresher) mintingKey(enc []byte) bool {
	e := r.cache.Get(enc)
	return e != nil && r.minting(e)
}

// minting reports whether an upstream call for e is in flight.
func (r *Refresher) minting(e *cache.Entry) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	it := r.items[e]
	return it != nil && it.minting
}

func (r *Refresher) setMinting(e *cache.Entry, on bool) {
	r.mu.Lock()
	if on {
		r.itemLocked(e).minting = true
	} else if it := r.items[e]; it != nil { // gone if e was evicted meanwhile
		it.minting = false
	}
	r.mu.Unlock()
}

// mintShared joins or starts the one upstream call for e and waits for it
// or for ctx.
func (r *Refresher) mintShared(ctx context.Context, e *cache.Entry, w want) (*cache.Token, error) {
	ch := r.sf.DoChan(e.Enc(), func() (any, error) { return r.mint(e, w) })
	select {
	case res := <-ch:
		if res.Err != nil {
			return nil, res.Err
		}
		return res.Val.(*cache.Token), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// ErrKeyRejected is returned without an upstream call while Whop's last
// answer to the current API key was 401.
var ErrKeyRejected = &whop.Error{StatusCode: 401, Type: "unauthorized", Message: "Whop rejected this credential earlier; no call is made with it again until it is reloaded (systemctl reload tokend) or tokend restarts"}

// mint makes one upstream call for e and records the outcome, unless a
// call that finished just before already satisfies w.
func (r *Refresher) mint(e *cache.Entry, w want) (*cache.Token, error) {
	up := r.upstream(e.Key().Credential)
	if up == nil {
		return nil, fmt.Errorf("credential %q: %w", e.Key().Credential, ErrUnknownCredential)
	}
	if !w.force {
		if t := e.Token(); r.usable(up, t, r.clock.Now(), w.minTTL) && !isToken(t, w.rejected) {
			return t, nil // a call that just finished already did it
		}
		if err := r.remembered(e); err != nil {
			return nil, err // one that just failed: wait out its backoff
		}
	}
	fp := up.Fetcher.KeyFingerprint()
	if up.gate.isRejected(fp) {
		r.retryLater(e)
		return nil, ErrKeyRejected
	}
	r.setMinting(e, true)
	defer r.setMinting(e, false)
	prev := e.Meta().State
	r.cache.SetState(e, cache.StateRefreshing)
	waitStart := time.Now()
	release, err := up.gate.acquire(r.base)
	if err != nil {
		r.cache.SetState(e, prev)
		r.retryLater(e)
		return nil, fmt.Errorf("waiting for the upstream limiter: %w", err)
	}
	if waited := time.Since(waitStart); waited > time.Millisecond && r.cfg.Observer != nil {
		r.cfg.Observer.LimiterWait(waited)
	}
	k := e.Key()
	start := r.clock.Now()
	r.upstreamCalls.Add(1)
	up.calls.Add(1)
	callStart := time.Now()
	req := whop.Request{CompanyID: k.CompanyID, UserID: k.UserID, ScopedActions: k.Scopes, ExpiresAt: start.Add(w.lifetime)}
	if up.OAuthUser {
		req.CompanyID, req.UserID = "", "" // the token names its user
	}
	at, err := up.Fetcher.CreateAccessToken(r.base, req)
	release()
	if o := r.cfg.Observer; o != nil {
		st := 200
		var we *whop.Error
		if errors.As(err, &we) {
			st = we.StatusCode
		} else if err != nil {
			st = 0
		}
		o.Upstream(st, time.Since(callStart))
		o.Minted(w.cause, err == nil)
	}
	if err != nil {
		up.errors.Add(1)
		r.failed(up, e, err, fp)
		return nil, err
	}
	t := &cache.Token{Value: at.Token, ExpiresAt: at.ExpiresAt, ObtainedAt: start, Fingerprint: fp}
	due := r.refreshTime(t)
	r.cache.SetToken(e, t, func(m *cache.Meta) {
		m.State = cache.StateFresh
		m.NextRefresh = due
		m.Refreshes++
		m.Failures = 0
	})
	r.mu.Lock()
	it := r.itemLocked(e)
	it.bo, it.err, it.errUntil = nil, nil, time.Time{}
	r.scheduleLocked(it, due)
	r.mu.Unlock()
	r.notify(e)
	if r.cfg.OnMint != nil {
		r.cfg.OnMint(e, t, w.cause)
	}
	return t, nil
}

// retryLater keeps an entry on the schedule when a mint could not even be
// tried (its credential is locked out, or tokend is stopping): it is looked
// at again after the longest backoff, or dropped once its token expires.
func (r *Refresher) retryLater(e *cache.Entry) {
	now := r.clock.Now()
	at := now.Add(r.cfg.RetryMax)
	if t := e.Token(); t != nil && t.ExpiresAt.Before(at) {
		at = t.ExpiresAt
	}
	r.mu.Lock()
	if it := r.items[e]; it == nil || it.index < 0 {
		r.scheduleLocked(r.itemLocked(e), at)
	}
	r.mu.Unlock()
}

// refreshTime is when t should be replaced: RefreshAt of its lifetime, moved
// earlier by up to Jitter of it at random.
func (r *Refresher) refreshTime(t *cache.Token) time.Time {
	life := t.ExpiresAt.Sub(t.ObtainedAt)
	at := time.Duration(float64(life) * r.cfg.RefreshAt)
	if j := int64(float64(life) * r.cfg.Jitter); j > 0 {
		at -= time.Duration(rand.Int64N(j))
	}
	return t.ObtainedAt.Add(at)
}

// failed records an upstream failure on e and decides when to try again.
func (r *Refresher) failed(up *upstream, e *cache.Entry, err error, fp []byte) {
	now := r.clock.Now()
	info := errorInfo(now, err)
	r.upstreamErrors.Add(1)
	r.lastError.Store(&info)
	var we *whop.Error
	if errors.As(err, &we) && we.StatusCode == 429 && we.RetryAfter > 0 {
		up.gate.pause(min(we.RetryAfter, maxRetryAfter))
	}
	if errors.As(err, &we) && we.StatusCode == 401 {
		up.gate.rejectKey(fp)
		r.log.Error("Whop rejected a credential (401); no upstream call with it until it is reloaded or tokend restarts", "credential", up.Name, "err", info.Message)
	}
	t := e.Token()
	r.mu.Lock()
	defer r.mu.Unlock()
	it := r.itemLocked(e)
	it.err, it.errKey = err, fp
	state := cache.StateFailing
	if info.Retryable {
		state = cache.StateRetrying
		if it.bo == nil {
			it.bo = r.newBackoff()
		}
		wait := max(it.bo.NextBackOff(), min(whop.RetryAfterOf(err), maxRetryAfter))
		it.errUntil = now.Add(wait)
		if t != nil {
			// Keep retrying in the background while a token exists to
			// protect; a cold key is retried by its next caller.
			r.scheduleLocked(it, it.errUntil)
		}
	} else {
		it.errUntil = now.Add(r.cfg.NegativeTTL)
		if t != nil {
			// Nothing will fix it by retrying: keep serving the token we
			// have and drop the entry when it expires (now, if it has).
			at := t.ExpiresAt
			if at.Before(now) {
				at = now
			}
			r.scheduleLocked(it, at)
		}
	}
	if t == nil {
		// Forget a key that never worked once nobody has asked for a while.
		r.scheduleLocked(it, now.Add(max(r.cfg.NegativeTTL, r.cfg.RetryMax)))
	}
	r.cache.UpdateMeta(e, func(m *cache.Meta) {
		m.State = state
		m.Failures++
		m.LastError = &info
	})
	defer r.notify(e)
	r.log.Warn("upstream refresh failed", "key", e.ID(), "subject", e.Key().Subject(), "status", info.Status, "retryable", info.Retryable, "retry_in", it.errUntil.Sub(now).Round(time.Millisecond), "err", info.Message)
}

func (r *Refresher) newBackoff() *backoff.ExponentialBackOff {
	return backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(r.cfg.RetryInitial),
		backoff.WithMaxInterval(r.cfg.RetryMax),
		backoff.WithMultiplier(2),
		backoff.WithRandomizationFactor(0.5),
		backoff.WithMaxElapsedTime(0),
	)
}

func errorInfo(now time.Time, err error) cache.ErrorInfo {
	info := cache.ErrorInfo{At: now, Message: err.Error(), Retryable: whop.IsRetryable(err)}
	var we *whop.Error
	if errors.As(err, &we) {
		info.Status = we.StatusCode
		if we.Message != "" {
			info.Message = we.Message
		}
	}
	return info
}

func (r *Refresher) itemLocked(e *cache.Entry) *item {
	it := r.items[e]
	if it == nil {
		it = &item{e: e, index: -1}
		r.items[e] = it
	}
	return it
}

func (r *Refresher) scheduleLocked(it *item, due time.Time) {
	if r.cache.Get([]byte(it.e.Enc())) != it.e {
		r.forgetLocked(it.e) // evicted meanwhile
		return
	}
	it.due = due
	if it.index >= 0 {
		heap.Fix(&r.queue, it.index)
	} else {
		heap.Push(&r.queue, it)
	}
	if it.index == 0 {
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}
}

func (r *Refresher) forgetLocked(e *cache.Entry) {
	if it := r.items[e]; it != nil {
		if it.index >= 0 {
			heap.Remove(&r.queue, it.index)
		}
		delete(r.items, e)
	}
}

// Evict drops entries from the schedule and the cache.
func (r *Refresher) Evict(es ...*cache.Entry) {
	// Out of the cache first: a mint finishing meanwhile then finds the
	// entry dead and does not put it back on the schedule.
	r.cache.Remove(es...)
	r.mu.Lock()
	for _, e := range es {
		r.forgetLocked(e)
	}
	r.mu.Unlock()
	for _, e := range es {
		r.notify(e)
	}
}

// Refresh mints a new token for e now, sharing a call already in flight.
func (r *Refresher) Refresh(ctx context.Context, e *cache.Entry) error {
	_, err := r.mintShared(ctx, e, want{lifetime: r.cfg.Lifetime, force: true, cause: "admin"})
	return err
}

// Run drives the schedule until ctx ends. It is the only timer for all
// entries; due work goes to a fixed pool of workers.
func (r *Refresher) Run(ctx context.Context) error {
	defer r.cancel()
	work := make(chan *cache.Entry)
	var wg sync.WaitGroup
	for range r.cfg.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for e := range work {
				r.act(e)
			}
		}()
	}
	defer func() {
		close(work)
		r.cancel()
		wg.Wait()
	}()
	timer := r.clock.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		now := r.clock.Now()
		var due []*cache.Entry
		r.mu.Lock()
		for len(r.queue) > 0 && !r.queue[0].due.After(now) {
			it := heap.Pop(&r.queue).(*item)
			due = append(due, it.e)
		}
		next, nextDue := time.Hour, time.Time{}
		if len(r.queue) > 0 {
			nextDue = r.queue[0].due
			next = nextDue.Sub(now)
		}
		r.mu.Unlock()
		for _, e := range due {
			select {
			case work <- e:
			case <-ctx.Done():
				return nil
			}
		}
		if len(due) > 0 {
			continue // time has moved while we handed work out
		}
		timer.Reset(next)
		if !nextDue.IsZero() && !nextDue.After(r.clock.Now()) {
			continue // the clock passed due while we armed the timer
		}
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C():
		case <-r.wake:
		}
	}
}

// act does what a due entry needs: refresh it, or drop it when it can no
// longer be served and nothing will mend it, or when nobody has asked for it
// during a whole token lifetime.
func (r *Refresher) act(e *cache.Entry) {
	now := r.clock.Now()
	t := e.Token()
	m := e.Meta()
	expired := t == nil || !t.ExpiresAt.After(now)
	idle := t != nil && now.Sub(e.LastRequested()) > t.ExpiresAt.Sub(t.ObtainedAt) && !r.watched(e)
	switch {
	case t == nil, m.State == cache.StateFailing && expired:
		r.drop(e)
	case m.State == cache.StateFailing:
		// Scheduled for expiry only.
	case idle && expired:
		r.droppedIdle.Add(1)
		r.drop(e)
	case idle:
		// Nobody wants it: no refresh; drop it when it expires unless a
		// client asks meanwhile.
		r.cache.UpdateMeta(e, func(m *cache.Meta) { m.State = cache.StateIdle; m.NextRefresh = time.Time{} })
		r.mu.Lock()
		r.scheduleLocked(r.itemLocked(e), t.ExpiresAt)
		r.mu.Unlock()
	default:
		r.mu.Lock()
		it := r.items[e]
		rescheduled := it != nil && it.index >= 0
		r.mu.Unlock()
		if rescheduled {
			return // a caller's mint ran meanwhile and set a new time
		}
		if up := r.upstream(e.Key().Credential); up != nil {
			if until := up.gate.pausedTill(); until.After(now) {
				// Its credential is paused after a 429: come back then
				// rather than hold a worker other credentials need.
				r.mu.Lock()
				r.scheduleLocked(r.itemLocked(e), until)
				r.mu.Unlock()
				return
			}
		}
		_, _ = r.mintShared(r.base, e, want{lifetime: r.cfg.Lifetime, force: true, cause: "refresh"})
	}
}

// drop removes e unless it was rescheduled since it fell due.
func (r *Refresher) drop(e *cache.Entry) {
	r.mu.Lock()
	it := r.items[e]
	stale := it != nil && it.index < 0
	if stale {
		r.forgetLocked(e)
	}
	r.mu.Unlock()
	if stale {
		r.cache.Remove(e)
		r.notify(e)
	}
}
