// Package refresher owns every cached token's life: the entry in memory,
// its state, its place on the refresh schedule, its backoff, its in-flight
// upstream call and its watchers. It mints on a miss (one upstream call
// per entry however many callers wait), refreshes each entry ahead of
// expiry from its credential's schedule, and retries failures with
// randomized exponential backoff while the old token keeps being served.
// The persistent copy goes to a Store (internal/cache).
//
// Locks, in the order they may be taken:
//
//	Refresher.mu   every entry's state, the schedules, calls, watchers, counts
//	Refresher.imu  the index map (read-locked by the hit path)
//	the store's queue lock (Store.Put/Delete: map operations, no I/O)
//	a credential gate's lock
//
// Nothing under Refresher.mu logs, does I/O, calls upstream or notifies a
// watcher: decisions are made under it, and their effects after unlocking.
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
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/cenkalti/backoff/v4"

	"github.com/tokend/tokend/internal/cache"
	"github.com/tokend/tokend/internal/clock"
	"github.com/tokend/tokend/internal/whop"
)

// MaxLifetime is the longest token Whop issues.
const MaxLifetime = 3 * time.Hour

// MaxMinTTL is the longest min_ttl a mint can satisfy, before the expiry
// margin: tokend asks for at most MaxLifetime less lifetimeMargin, and the
// call itself takes time (up to half a minute is allowed for).
const MaxMinTTL = MaxLifetime - lifetimeMargin - 30*time.Second

// maxRetryAfter bounds what a Retry-After header may impose: a bad header
// must not pause a credential for years.
const maxRetryAfter = time.Hour

// maxLRUFixes bounds the work one capacity eviction does under mu to bring
// stale places in the LRU heap up to date (see enforceCapacityLocked).
const maxLRUFixes = 1024

// Fetcher mints tokens upstream; *whop.Client is one.
type Fetcher interface {
	CreateAccessToken(ctx context.Context, r whop.Request) (whop.AccessToken, error)
	// KeyFingerprint identifies the current secret without revealing it.
	KeyFingerprint() []byte
}

// Store is the persistent copy of the entries, which the refresher writes
// through. *cache.Store is one. Put and Delete must not block on I/O: the
// refresher calls them under its lock, so that a key's changes reach the
// store in the order they were decided.
type Store interface {
	// Loaded hands over the records found at start, once.
	Loaded() []cache.Record
	Put(enc string, r cache.Record)
	Delete(enc string)
	WriteStatus() (pending int, lastErr error)
}

// Defaults of Config.
const (
	DefaultLifetime      = time.Hour
	DefaultRefreshAt     = 2.0 / 3
	DefaultJitter        = 0.1
	DefaultRetryInitial  = time.Second
	DefaultRetryMax      = 2 * time.Minute
	DefaultNegativeTTL   = 30 * time.Second
	DefaultExpiryMargin  = time.Second
	DefaultRestartSpread = time.Minute
	DefaultMaxInFlight   = 4
	// DefaultRate and DefaultBurst never exceed, in any 10 s window, the
	// only limit Whop publishes (20 requests per 10 s, for API v5; v1's
	// limit is unpublished): 5 at once plus 1.5/s makes 20.
	DefaultRate              = 1.5
	DefaultBurst             = 5
	DefaultMaxEntries        = 100_000
	DefaultRateLimitCooldown = time.Minute // Whop's documented cooldown
	DefaultInCallRetries     = 2           // as Whop's SDKs
	DefaultDrainTimeout      = 5 * time.Second
	DefaultKeyProbeInterval  = time.Minute
	DefaultKeyProbeMax       = 30 * time.Minute
)

// Config configures New. Zero values mean the defaults above.
type Config struct {
	Store Store
	// Credentials are the identities to mint with; SetCredentials changes
	// them later. Fetcher alone is shorthand for one credential "default".
	Credentials []Credential
	Fetcher     Fetcher
	Clock       clock.Clock
	Logger      *slog.Logger

	// Lifetime is the token lifetime asked of Whop, at most 3h.
	Lifetime time.Duration
	// RefreshAt is the fraction of a token's lifetime after which it is
	// refreshed.
	RefreshAt float64
	// Jitter is the fraction of the lifetime by which refreshes are moved
	// earlier at random, so tokens minted together drift apart.
	Jitter float64
	// RetryInitial and RetryMax bound the randomized exponential backoff
	// between failed refreshes.
	RetryInitial, RetryMax time.Duration
	// NegativeTTL is how long an error a retry cannot fix is returned to
	// callers without asking upstream again.
	NegativeTTL time.Duration
	// ExpiryMargin is subtracted from every token's expires_at to absorb
	// clock skew with Whop.
	ExpiryMargin time.Duration
	// RestartSpread is the window over which refreshes that fell due while
	// tokend was down are spread.
	RestartSpread time.Duration
	// MaxInFlight, Rate and Burst limit upstream calls per credential.
	MaxInFlight int
	Rate        rate.Limit
	Burst       int
	// Workers is how many scheduled refreshes of one credential run at
	// once. Default MaxInFlight.
	Workers int
	// RateLimitCooldown pauses a credential after a 429 that gives no
	// Retry-After or retry-after-ms.
	RateLimitCooldown time.Duration
	// InCallRetries is how many times a call someone waits for is retried
	// within itself, inside the waiters' deadlines. Negative means none.
	InCallRetries int
	// Fleet, when set, is shared with the other hosts of a fleet: a miss or
	// a due refresh looks there before it mints, one host mints per key at
	// a time, and the upstream budget and 429 pauses are fleet-wide.
	Fleet Fleet
	// DrainTimeout is how long Run, once its context ends, lets upstream
	// calls in flight finish (their callers get their tokens, and the
	// tokens are stored) before cancelling the rest. Negative: none.
	DrainTimeout time.Duration
	// KeyProbeInterval is the first wait before a secret Whop answered 401
	// to is tried again; it doubles up to KeyProbeMax.
	KeyProbeInterval, KeyProbeMax time.Duration
	// MaxEntries bounds the cache; a new key beyond it evicts a least
	// recently requested entry.
	MaxEntries int
	// Observer, if set, is told about upstream calls for metrics.
	Observer Observer
	// OnMint, if set, is told of every token obtained from Whop, for the
	// audit trail. It runs outside the refresher's lock.
	OnMint func(Mint)
}

// Mint describes one token obtained from Whop.
type Mint struct {
	Key   Key
	KeyID string
	Token *Token
	// Cause: "miss", "refresh" (scheduled), "rejected" or "admin".
	Cause string
	// Adopted: another host of the fleet minted the token; this one took
	// it from the fleet's Redis.
	Adopted bool
}

func (c *Config) setDefaults() error {
	if c.Store == nil || c.Fetcher == nil && len(c.Credentials) == 0 {
		return errors.New("refresher: a Store and a Fetcher or Credentials are required")
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
		c.Lifetime = DefaultLifetime
	}
	if c.Lifetime < 0 || c.Lifetime > MaxLifetime {
		return fmt.Errorf("refresher: token lifetime %v: must be positive and at most %v", c.Lifetime, MaxLifetime)
	}
	if c.RefreshAt == 0 {
		c.RefreshAt = DefaultRefreshAt
	}
	if c.RefreshAt <= 0 || c.RefreshAt >= 1 {
		return fmt.Errorf("refresher: refresh fraction %v: must be between 0 and 1", c.RefreshAt)
	}
	if c.Jitter == 0 {
		c.Jitter = DefaultJitter
	}
	if c.Jitter < 0 || c.Jitter >= c.RefreshAt {
		return fmt.Errorf("refresher: jitter %v: must be between 0 and the refresh fraction", c.Jitter)
	}
	setDefault(&c.RetryInitial, DefaultRetryInitial)
	setDefault(&c.RetryMax, DefaultRetryMax)
	setDefault(&c.NegativeTTL, DefaultNegativeTTL)
	setDefault(&c.ExpiryMargin, DefaultExpiryMargin)
	if c.DrainTimeout == 0 {
		c.DrainTimeout = DefaultDrainTimeout
	}
	setDefault(&c.RestartSpread, DefaultRestartSpread)
	setDefault(&c.MaxInFlight, DefaultMaxInFlight)
	setDefault(&c.Rate, DefaultRate)
	setDefault(&c.Burst, DefaultBurst)
	setDefault(&c.Workers, c.MaxInFlight)
	setDefault(&c.MaxEntries, DefaultMaxEntries)
	setDefault(&c.RateLimitCooldown, DefaultRateLimitCooldown)
	setDefault(&c.KeyProbeInterval, DefaultKeyProbeInterval)
	setDefault(&c.KeyProbeMax, DefaultKeyProbeMax)
	switch {
	case c.InCallRetries == 0:
		c.InCallRetries = DefaultInCallRetries
	case c.InCallRetries < 0:
		c.InCallRetries = 0
	}
	return nil
}

func setDefault[T int | time.Duration | rate.Limit](v *T, d T) {
	if *v <= 0 {
		*v = d
	}
}

// Observer receives the refresher's events for metrics, always outside
// the refresher's lock.
type Observer interface {
	// Upstream: one request to Whop; status 0 for network errors.
	Upstream(status int, d time.Duration)
	// Minted: one mint attempt by cause ("miss", "refresh", "rejected", "admin").
	Minted(cause string, ok bool)
	// LimiterWait: an upstream call waited d for the limiter.
	LimiterWait(d time.Duration)
	// RefreshLag: a scheduled action of the credential started d after
	// it fell due.
	RefreshLag(credential string, d time.Duration)
}

// Refresher serves tokens from memory and keeps them fresh.
type Refresher struct {
	cfg   Config
	store Store
	clock clock.Clock
	log   *slog.Logger
	ups   atomic.Pointer[upstreamSet]
	// fleetSalt is Fleet's salt, fetched once.
	fleetSalt []byte
	// fleetAdopted counts calls answered by a token another host minted.
	fleetAdopted atomic.Uint64
	// expiryCutLog keeps an upstream that always answers a too-late
	// expires_at to one warning a minute.
	expiryCutLog rate.Sometimes

	// base is cancelled when Run returns, ending calls nobody waits for.
	base   context.Context
	cancel context.CancelFunc

	mu     sync.Mutex
	counts [numStates]int
	// runCtx is Run's context while it runs, for schedules of credentials
	// added by a reload.
	runCtx context.Context
	runWG  sync.WaitGroup

	imu   sync.RWMutex
	index map[string]*entry // by encoded key; written with mu and imu held
	// lru orders each owner's live entries by lastRequested as of their
	// last place in it, which the hit path does not move: a place is never
	// later than the entry's real last request, and is brought up to date
	// lazily. Capacity eviction takes from the owner with most entries.
	lru map[string]*entryHeap

	hits, misses, joined atomic.Uint64
	upstreamCalls        atomic.Uint64
	upstreamErrors       atomic.Uint64
	lastError            atomic.Pointer[ErrorInfo]
	evicted              atomic.Uint64 // over capacity
	droppedIdle          atomic.Uint64
	missesLimited        atomic.Uint64
	abandoned            atomic.Uint64 // calls left the gate's queue: every caller had gone
	// running counts calls sent upstream and not yet finished, under mu
	// (calls still queued at the gate are not worth a stop's wait);
	// drained, set while Run drains, is closed when it reaches zero.
	running int
	drained chan struct{}
}

// New returns a Refresher holding the store's records, each scheduled.
func New(cfg Config) (*Refresher, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	base, cancel := context.WithCancel(context.Background())
	r := &Refresher{
		cfg:          cfg,
		expiryCutLog: rate.Sometimes{Interval: time.Minute},
		store:        cfg.Store,
		clock:        cfg.Clock,
		log:          cfg.Logger,
		base:         base,
		cancel:       cancel,
		index:        make(map[string]*entry),
		lru:          make(map[string]*entryHeap),
	}
	if cfg.Fleet != nil {
		r.fleetSalt = cfg.Fleet.Salt()
	}
	r.ups.Store(&upstreamSet{})
	if err := r.SetCredentials(cfg.Credentials); err != nil {
		return nil, err
	}
	r.load(cfg.Store.Loaded())
	r.warnCapacity()
	return r, nil
}

// warnCapacity says at start when a full cache cannot be kept fresh: each
// credential's entries are refreshed once per RefreshAt of a lifetime,
// within its own rate.
func (r *Refresher) warnCapacity() {
	perEntry := r.cfg.Lifetime.Seconds() * r.cfg.RefreshAt
	need := float64(r.cfg.MaxEntries) / perEntry
	if need <= float64(r.cfg.Rate) {
		return
	}
	r.log.Warn("--max-entries is more than the upstream rate can keep fresh: if that many keys stay in use through one credential, refreshes fall behind and tokens expire",
		"max_entries", r.cfg.MaxEntries, "refreshes_per_second_needed", fmt.Sprintf("%.1f", need),
		"upstream_rate_per_credential", float64(r.cfg.Rate), "entries_kept_fresh_per_credential", int(float64(r.cfg.Rate)*perEntry))
}

// load installs the records found on disk. Refreshes that fell due while
// tokend was down are spread over RestartSpread with fresh jitter so a
// restart does not fire them all at once.
func (r *Refresher) load(recs []cache.Record) {
	now := r.clock.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rec := range recs {
		k := Key(rec.Key)
		up := r.upstream(k.Credential)
		if up == nil {
			r.store.Delete(string(rec.Key.Encode())) // its credential is gone
			continue
		}
		e := r.insertLocked(k, string(rec.Key.Encode()), up.sched, rec.Owner)
		t := &Token{Value: rec.Token, ExpiresAt: rec.ExpiresAt, ObtainedAt: rec.ObtainedAt, Fingerprint: rec.Fingerprint}
		e.tok.Store(t)
		e.lastRequested.Store(unixNano(rec.LastRequested))
		e.hits.Store(rec.Hits)
		e.refreshes, e.failures = rec.Refreshes, rec.Failures
		if le := rec.LastError; le != nil {
			e.lastErr = &ErrorInfo{At: le.At, Status: le.Status, Message: le.Message, Type: le.Type, Code: le.Code, Param: le.Param, Retryable: le.Retryable}
		}
		due := rec.NextRefresh
		if due.IsZero() {
			due = r.refreshTime(t)
		}
		if !due.After(now) {
			// Spread, but never past the point where a sixth of the
			// lifetime is left: repeated restarts must not keep
			// postponing a refresh until the token runs out.
			latest := t.ExpiresAt.Add(-t.lifetime() / 6)
			due = now
			if window := min(r.cfg.RestartSpread, latest.Sub(now)); window > 0 {
				due = now.Add(time.Duration(rand.Int64N(int64(window))))
			}
		}
		r.trackExpiryLocked(e, now)
		r.scheduleLocked(e, due)
		r.settleLocked(e, now)
	}
}

func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

// Source says where a token handed out by Get came from.
type Source uint8

const (
	// SourceHit: from memory.
	SourceHit Source = iota
	// SourceJoined: from an upstream call another caller started.
	SourceJoined
	// SourceMinted: from an upstream call this caller started.
	SourceMinted
	// SourceRefreshed: minted to replace a token the caller reported
	// rejected.
	SourceRefreshed
)

var sourceNames = [...]string{"hit", "joined", "minted", "refreshed"}

func (s Source) String() string { return sourceNames[s] }

// Result is a token handed out by Get.
type Result struct {
	Token  *Token
	KeyID  string
	Source Source
}

// Options are the caller's needs for Get.
type Options struct {
	// MinTTL is how long the token must stay valid.
	MinTTL time.Duration
	// Rejected is a token the caller saw Whop refuse (401): if it is still
	// the cached one it is replaced, once however many callers report it.
	Rejected string
	// MissLimiter, when set, must allow every miss that starts an upstream
	// call (joining one in flight is free): a per-caller bound on what one
	// local process can cost the credential's quota. A miss it does not
	// allow at once waits for it within the caller's deadline.
	MissLimiter interface {
		Allow() bool
		Wait(context.Context) error
	}
	// Caller names who asks, such as "uid 1000", for the queue in status.
	Caller string
}

// Errors of Get.
var (
	// ErrLifetime: the caller's min_ttl exceeds what Whop issues.
	ErrLifetime = errors.New("no token Whop issues stays valid that long")
	// errAbandoned ends a call whose callers all left while it queued.
	errAbandoned = errors.New("every caller left before the upstream limiter let the call through")
	// ErrMissRateLimited: the caller's MissLimiter refused a miss.
	ErrMissRateLimited = errors.New("too many cache misses from this caller; retry later")
	// ErrKeyRejected is returned without an upstream call while Whop's last
	// answer to the credential's current secret was 401.
	ErrKeyRejected = &whop.Error{StatusCode: 401, Type: "unauthorized", Message: "Whop rejected this credential earlier; tokend tries it again when its key file changes, on reload (systemctl reload tokend), and by itself with a growing backoff (--key-probe-interval)"}
	// ErrEvicted: the entry is gone; asking again makes a new one.
	ErrEvicted = errors.New("entry was evicted")
)

// PausedError is returned without an upstream call when Whop rate-limited
// the credential and the pause outlasts every waiter's deadline.
type PausedError struct {
	Credential string
	Until      time.Time
	Why        string // the hint that set the pause
}

func (e *PausedError) Error() string {
	return fmt.Sprintf("Whop rate-limited credential %q (429); its calls are paused until %s (%s)", e.Credential, e.Until.UTC().Format(time.RFC3339), e.Why)
}

// BusyError: the credential's upstream budget (its rate, burst and calls
// in flight) cannot take a miss before its callers' deadlines.
type BusyError struct {
	Credential string
	Queued     int
	QueuedBy   []QueueShare
}

func (e *BusyError) Error() string {
	msg := fmt.Sprintf("credential %q: the upstream rate limit cannot fit this call before the caller's deadline", e.Credential)
	if e.Queued > 0 {
		by := make([]string, 0, len(e.QueuedBy))
		for _, q := range e.QueuedBy {
			by = append(by, fmt.Sprintf("%s: %d", q.By, q.Calls))
		}
		msg += fmt.Sprintf("; %d calls queued (%s)", e.Queued, strings.Join(by, ", "))
	}
	return msg
}

// Get returns a token for k valid for at least o.MinTTL. A hit is a
// read-locked map lookup and an atomic load, and allocates nothing. A miss
// waits for its entry's upstream call, or for ctx, whose end does not
// cancel the call: the next caller gets its result.
func (r *Refresher) Get(ctx context.Context, k Key, o Options) (Result, error) {
	var buf [256]byte // most keys fit: the hit path encodes without allocating
	enc := cache.Key(k).AppendEncode(buf[:0])
	now := r.clock.Now()
	up := r.upstream(k.Credential)
	if up == nil {
		return Result{}, fmt.Errorf("credential %q: %w", k.Credential, ErrUnknownCredential)
	}
	r.imu.RLock()
	e := r.index[string(enc)]
	r.imu.RUnlock()
	if e != nil {
		if t := e.tok.Load(); r.usable(up, t, now, o.MinTTL) && !isToken(t, o.Rejected) {
			e.touch(now)
			e.hits.Add(1)
			r.hits.Add(1)
			if e.idle.Load() && e.idle.CompareAndSwap(true, false) {
				r.revive(e)
			}
			return Result{Token: t, KeyID: e.id, Source: SourceHit}, nil
		}
	}
	return r.miss(ctx, k, string(enc), up, o, now)
}

// miss joins the upstream call of k's entry, or starts one, and waits.
func (r *Refresher) miss(ctx context.Context, k Key, enc string, up *upstream, o Options, now time.Time) (Result, error) {
	if most := MaxMinTTL - r.cfg.ExpiryMargin; o.MinTTL > most {
		// No mint could satisfy it: refuse before spending one.
		return Result{}, fmt.Errorf("min_ttl %v: at most %v: %w", o.MinTTL, most, ErrLifetime)
	}
	r.misses.Add(1)
	if r.log.Enabled(ctx, slog.LevelDebug) {
		r.log.Debug("cache miss", "key", k.ID(), "subject", k.Subject(), "reason", r.missReason(up, enc, now, o))
	}
	w := want{lifetime: r.cfg.Lifetime, need: o.MinTTL + r.cfg.ExpiryMargin, cause: "miss"}
	if o.Rejected != "" {
		w.cause = "rejected"
	}
	if need := o.MinTTL + r.cfg.ExpiryMargin; need >= w.lifetime {
		// Ask for enough to cover min_ttl and the call's own latency.
		w.lifetime = min(need+time.Minute, MaxLifetime)
	}
	admitted := false // the caller's MissLimiter let one call through
	for attempt := 0; ; attempt++ {
		r.mu.Lock()
		// SetCredentials swaps the set under mu and then evicts the old
		// credential's entries: an entry inserted under an up read before
		// the swap would sit on a stopped schedule, never refreshed.
		if cur := r.upstream(k.Credential); cur != up {
			if cur == nil {
				r.mu.Unlock()
				return Result{}, fmt.Errorf("credential %q: %w", k.Credential, ErrUnknownCredential)
			}
			up = cur
		}
		e := r.index[enc]
		if e != nil {
			if t := e.tok.Load(); r.usable(up, t, now, o.MinTTL) && !isToken(t, o.Rejected) {
				// Installed while we took the lock.
				e.touch(now)
				r.mu.Unlock()
				r.joined.Add(1)
				return Result{Token: t, KeyID: e.id, Source: SourceJoined}, nil
			}
			if err := r.rememberedLocked(e, up, now); err != nil {
				r.mu.Unlock()
				return Result{}, err
			}
		}
		source := SourceJoined
		var c *call
		var gone []*Watcher
		evicted := 0
		if e != nil && e.call != nil && e.call.queue.Err() == nil {
			c = e.call
		} else {
			// No call, or one whose callers all left and that is leaving
			// the queue: start afresh, if the caller's limiter lets it.
			// A refused miss must not create an entry: it would take a
			// slot from everyone under MaxEntries.
			if o.MissLimiter != nil && !admitted && !o.MissLimiter.Allow() {
				r.mu.Unlock()
				// Wait for the caller's share within its deadline, never
				// under the lock; Wait refuses at once when the deadline
				// comes first. Then look again: someone may have started
				// the call meanwhile.
				if err := o.MissLimiter.Wait(ctx); err != nil {
					r.missesLimited.Add(1)
					return Result{}, ErrMissRateLimited
				}
				admitted = true
				attempt--
				continue
			}
			admitted = false
			if e == nil {
				e = r.insertLocked(k, enc, up.sched, o.Caller)
				gone, evicted = r.enforceCapacityLocked(e)
			}
			source = SourceMinted
			if o.Rejected != "" {
				source = SourceRefreshed
			}
			c = r.startCallLocked(e, w, now, o.Caller)
		}
		c.joinLocked(ctx)
		e.touch(now)
		r.mu.Unlock()
		if evicted > 0 {
			r.log.Info("cache full: evicted a least recently requested entry", "max_entries", r.cfg.MaxEntries)
		}
		notifyAll(gone)
		select {
		case <-c.done:
		case <-ctx.Done():
			r.mu.Lock()
			c.leaveLocked()
			r.mu.Unlock()
			return Result{}, ctx.Err()
		}
		if c.err != nil {
			return Result{}, c.err
		}
		if r.usable(up, c.tok, r.clock.Now(), o.MinTTL) {
			if source == SourceJoined {
				r.joined.Add(1)
			}
			return Result{Token: c.tok, KeyID: e.id, Source: source}, nil
		}
		// We joined a call made for a shorter min_ttl; make our own once.
		if attempt > 0 || w.lifetime == MaxLifetime && c.tok.lifetime() >= MaxLifetime-time.Minute {
			return Result{}, fmt.Errorf("min_ttl %v: %w", o.MinTTL, ErrLifetime)
		}
		now = r.clock.Now()
	}
}

// insertLocked adds a new entry for k, asked for first by owner.
func (r *Refresher) insertLocked(k Key, enc string, s *sched, owner string) *entry {
	e := newEntry(k, enc, s)
	e.live, e.owner = true, owner
	r.imu.Lock()
	r.index[enc] = e
	r.imu.Unlock()
	e.lruAt = e.lastRequested.Load()
	r.lruPushLocked(e)
	s.entries++
	r.counts[e.state]++
	return e
}

// removeLocked takes e out of the index, its schedule and the store, and
// detaches its call (whose waiters still get its result; the entry does
// not). It returns the watchers to tell.
func (r *Refresher) removeLocked(e *entry) []*Watcher {
	if !e.live {
		return nil
	}
	e.live = false
	r.imu.Lock()
	delete(r.index, e.enc)
	r.imu.Unlock()
	r.lruRemoveLocked(e)
	r.unscheduleLocked(e)
	r.trackExpiryLocked(e, r.clock.Now())
	r.counts[e.state]--
	e.sched.entries--
	e.call = nil
	r.store.Delete(e.enc)
	return r.watchersLocked(e)
}

// lruPushLocked places e in its owner's LRU heap.
func (r *Refresher) lruPushLocked(e *entry) {
	h := r.lru[e.owner]
	if h == nil {
		h = &entryHeap{less: func(a, b *entry) bool { return a.lruAt < b.lruAt }, idx: func(e *entry) *int { return &e.lidx }}
		r.lru[e.owner] = h
	}
	heap.Push(h, e)
}

// lruRemoveLocked takes e out of its owner's LRU heap.
func (r *Refresher) lruRemoveLocked(e *entry) {
	h := r.lru[e.owner]
	if h == nil || e.lidx < 0 {
		return
	}
	heap.Remove(h, e.lidx)
	if h.Len() == 0 {
		delete(r.lru, e.owner)
	}
}

// heaviestLocked is the LRU heap of the owner with most entries; ties go
// to the one whose oldest place is oldest.
func (r *Refresher) heaviestLocked() *entryHeap {
	var best *entryHeap
	for _, h := range r.lru {
		if best == nil || h.Len() > best.Len() || h.Len() == best.Len() && h.es[0].lruAt < best.es[0].lruAt {
			best = h
		}
	}
	return best
}

// enforceCapacityLocked evicts entries while the cache holds more than
// MaxEntries; keep is spared. Each eviction takes the least recently
// requested entry of the owner (local uid) with most entries, so one uid
// minting many keys evicts its own before anyone else's, and a cache used
// by one service is exact LRU. Within an owner's heap the top is the
// victim once its place matches its real last request: every place is at
// most the real time, so no other entry of the owner was requested
// earlier. A top hit since it was placed moves down instead; at most
// maxLRUFixes moves are made per eviction, each paid for by a hit, so a
// burst of hits cannot hold mu for long (past that bound the top is taken
// as it is). The owners are few (local uids): finding the heaviest is a
// short scan.
// It returns the evicted entries' watchers and how many entries it evicted.
func (r *Refresher) enforceCapacityLocked(keep *entry) (gone []*Watcher, evicted int) {
	if keep != nil && keep.lidx >= 0 {
		r.lruRemoveLocked(keep)
		defer r.lruPushLocked(keep)
	}
	fixes := 0
	for len(r.index) > r.cfg.MaxEntries {
		h := r.heaviestLocked()
		if h == nil {
			break
		}
		top := h.es[0]
		if at := top.lastRequested.Load(); at != top.lruAt && fixes < maxLRUFixes {
			top.lruAt = at
			heap.Fix(h, 0)
			fixes++
			continue
		}
		gone = append(gone, r.removeLocked(top)...)
		r.evicted.Add(1)
		evicted++
	}
	return gone, evicted
}

// settleLocked computes e's state from its facts and keeps the per-state
// counts in step. It is the one place states are decided.
func (r *Refresher) settleLocked(e *entry, now time.Time) {
	t := e.tok.Load()
	var s State
	switch {
	case e.call != nil:
		s = StateRefreshing
	case t == nil:
		// Never got a token: a call that could not even be tried (a
		// rejected key, a shutdown) leaves no failure, but no token either.
		s = StateFailing
	case t != nil && !t.ExpiresAt.After(now):
		s = StateExpired
	case e.fail == failRetryable:
		s = StateRetrying
	case e.fail == failPermanent:
		s = StateFailing
	case e.idle.Load():
		s = StateIdle
	default:
		s = StateFresh
	}
	if s != e.state && e.live {
		r.counts[e.state]--
		r.counts[s]++
	}
	e.state = s
}

// revive puts an idle entry that a client asked for back on the refresh
// schedule: it is past its refresh point, so the refresh is due now.
func (r *Refresher) revive(e *entry) {
	now := r.clock.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if !e.live {
		return
	}
	r.settleLocked(e, now)
	if e.call == nil {
		r.scheduleLocked(e, now)
	}
}

// missReason says why Get could not answer from memory, for debug logs.
func (r *Refresher) missReason(up *upstream, enc string, now time.Time, o Options) string {
	r.imu.RLock()
	e := r.index[enc]
	r.imu.RUnlock()
	var t *Token
	if e != nil {
		t = e.tok.Load()
	}
	switch {
	case e == nil:
		return "no entry"
	case t == nil:
		return "no token yet"
	case isToken(t, o.Rejected):
		return "caller reported the token rejected"
	case !up.current(t):
		return "token minted by another secret"
	default:
		return fmt.Sprintf("token valid for %v, caller needs %v plus a %v margin", t.ExpiresAt.Sub(now).Round(time.Millisecond), o.MinTTL, r.cfg.ExpiryMargin)
	}
}

// isToken reports whether t's value is v, in constant time since v came
// from a client.
func isToken(t *Token, v string) bool {
	return v != "" && t != nil && subtle.ConstantTimeCompare([]byte(t.Value), []byte(v)) == 1
}

// usable reports whether t can be handed out: minted by the current secret
// and valid for minTTL beyond the safety margin.
func (r *Refresher) usable(up *upstream, t *Token, now time.Time, minTTL time.Duration) bool {
	return t.validFor(now, minTTL+r.cfg.ExpiryMargin) && up.current(t)
}

// rememberedLocked returns e's last error while callers should get it
// without a new upstream call: during a retry backoff, or inside the
// negative-cache window of an error a retry cannot fix.
func (r *Refresher) rememberedLocked(e *entry, up *upstream, now time.Time) error {
	if e.err == nil || !now.Before(e.errUntil) || !bytes.Equal(e.errKey, up.Fetcher.KeyFingerprint()) {
		return nil
	}
	if whop.StatusOf(e.err) == 429 {
		// The credential's pause says how long a 429 holds; a reload may
		// have lifted it.
		if until, _ := up.gate.paused(); !until.After(now) {
			return nil
		}
	}
	return e.err
}

// refreshTime is when t should be replaced: RefreshAt of its lifetime, moved
// earlier by up to Jitter of it at random.
func (r *Refresher) refreshTime(t *Token) time.Time {
	life := t.lifetime()
	at := time.Duration(float64(life) * r.cfg.RefreshAt)
	if j := int64(float64(life) * r.cfg.Jitter); j > 0 {
		at -= time.Duration(tokenHash(t.Value) % uint64(j))
	}
	return t.ObtainedAt.Add(at)
}

// tokenHash is FNV-1a of a token: the refresh jitter comes from the token,
// not from this process, so every host of a fleet holding the same token
// falls due at the same moment (one mints under the lock, the others adopt
// its token) instead of the earliest of N random draws, which would refresh
// the fleet more often than one host. Tokens differ, so keys still spread.
func tokenHash(s string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	return h
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

func errorInfo(now time.Time, err error) ErrorInfo {
	info := ErrorInfo{At: now, Message: err.Error(), Retryable: whop.IsRetryable(err)}
	var we *whop.Error
	if errors.As(err, &we) {
		info.Status = we.StatusCode
		info.Type, info.Code, info.Param = we.Type, we.Code, we.Param
		if we.Message != "" {
			info.Message = we.Message
		}
	}
	return info
}

// act does what a due entry needs: refresh it, or drop it when it can no
// longer be served and nothing will mend it, or set it aside when nobody
// has asked for it during a whole token lifetime. A watcher does not count
// as asking: a client that still uses a watched token says so (a touch).
func (r *Refresher) act(e *entry) {
	r.mu.Lock()
	if !e.live || e.hidx >= 0 || e.call != nil {
		// Removed, rescheduled by a call that finished meanwhile, or a
		// call is in flight that will reschedule it.
		r.mu.Unlock()
		return
	}
	now := r.clock.Now()
	t := e.tok.Load()
	expired := t == nil || !t.ExpiresAt.After(now)
	idle := t != nil && now.Sub(e.lastRequestedAt()) > t.lifetime()
	var gone []*Watcher
	switch {
	case t == nil, e.fail == failPermanent && expired:
		gone = r.removeLocked(e)
	case e.fail == failPermanent:
		r.scheduleLocked(e, t.ExpiresAt) // kept for expiry only
	case idle && expired:
		r.droppedIdle.Add(1)
		gone = r.removeLocked(e)
	case idle:
		e.idle.Store(true)
		r.settleLocked(e, now)
		r.scheduleLocked(e, t.ExpiresAt)
		r.store.Put(e.enc, e.record())
	default:
		if until, _ := e.sched.up.gate.paused(); until.After(now) {
			// Its credential is paused after a 429: come back then
			// rather than hold a worker.
			r.scheduleLocked(e, until)
			break
		}
		c := r.startCallLocked(e, want{lifetime: r.cfg.Lifetime, cause: causeRefresh}, now, "")
		r.mu.Unlock()
		<-c.done // the worker stays busy while its call runs
		return
	}
	r.mu.Unlock()
	notifyAll(gone)
}

// Run drives every credential's schedule until ctx ends, then cancels the
// upstream calls still in flight.
func (r *Refresher) Run(ctx context.Context) error {
	r.mu.Lock()
	r.runCtx = ctx
	for _, u := range r.upstreams() {
		r.startSchedLocked(u.sched)
	}
	r.mu.Unlock()
	<-ctx.Done()
	r.runWG.Wait() // the schedules start no more refreshes
	r.drain()
	r.cancel()
	return nil
}

// drain waits up to DrainTimeout for the upstream calls in flight, so a
// stop does not fail the callers waiting on them.
func (r *Refresher) drain() {
	r.mu.Lock()
	n := r.running
	if n == 0 || r.cfg.DrainTimeout < 0 {
		r.mu.Unlock()
		return
	}
	done := make(chan struct{})
	r.drained = done
	r.mu.Unlock()
	t := r.clock.NewTimer(r.cfg.DrainTimeout)
	defer t.Stop()
	start := time.Now()
	select {
	case <-done:
		r.log.Info("stopping: upstream calls in flight finished", "calls", n, "took", time.Since(start).Round(time.Millisecond))
	case <-t.C():
		r.mu.Lock()
		left := r.running
		r.mu.Unlock()
		r.log.Warn("stopping: upstream calls still in flight after the drain timeout are cancelled", "calls", left, "timeout", r.cfg.DrainTimeout)
	}
}

// startSchedLocked runs s's loop if Run is running and it is not yet.
func (r *Refresher) startSchedLocked(s *sched) {
	if r.runCtx == nil || s.running {
		return
	}
	s.running = true
	ctx := r.runCtx
	r.runWG.Add(1)
	go func() {
		defer r.runWG.Done()
		r.run(ctx, s)
	}()
}
