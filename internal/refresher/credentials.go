package refresher

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Credential is one identity tokend mints with: an API key, or a user's
// OAuth token, under a name clients choose it by.
type Credential struct {
	Name    string
	Fetcher Fetcher
	// OAuthUser means the token names its user: requests carry no ids.
	OAuthUser bool
}

// upstream is a credential with its own limiter, 429 pause, 401 state and
// schedule: Whop's limits and revocations belong to one secret.
type upstream struct {
	Credential
	gate          *gate
	sched         *sched
	calls, errors atomic.Uint64
	// skewNanos is Whop's clock minus ours, as last measured from a Date
	// header; skewAt is when, in Unix nanoseconds (0: never).
	skewNanos, skewAt atomic.Int64

	// queue counts the calls waiting at the gate by who started them.
	qmu   sync.Mutex
	queue map[string]int
}

// queued adds d to the calls by waits at the gate.
func (u *upstream) queued(by string, d int) {
	if by == "" {
		by = "tokend" // its own scheduled refreshes
	}
	u.qmu.Lock()
	defer u.qmu.Unlock()
	if u.queue == nil {
		u.queue = map[string]int{}
	}
	if u.queue[by] += d; u.queue[by] <= 0 {
		delete(u.queue, by)
	}
}

// maxQueuers is how many of the callers filling a queue status names.
const maxQueuers = 5

// queueStats is how many calls wait at the gate and who, most first.
func (u *upstream) queueStats() (total int, by []QueueShare) {
	u.qmu.Lock()
	for who, n := range u.queue {
		total += n
		by = append(by, QueueShare{By: who, Calls: n})
	}
	u.qmu.Unlock()
	slices.SortFunc(by, func(a, b QueueShare) int { return cmp.Or(b.Calls-a.Calls, strings.Compare(a.By, b.By)) })
	return total, by[:min(len(by), maxQueuers)]
}

// QueueShare is how many of a credential's queued calls one caller made.
type QueueShare struct {
	By    string
	Calls int
}

// skewTolerance is the clock skew below which no correction is made: the
// Date header has whole seconds, so a smaller measure is mostly noise, and
// the lifetime and expiry margins absorb it.
const skewTolerance = 2 * time.Second

// SkewWarning is the skew to Whop's clock past which status warns.
const SkewWarning = 5 * time.Second

// skew is the correction to apply to our clock to get Whop's: the measured
// skew when it is past skewTolerance, else 0.
func (u *upstream) skew() time.Duration {
	d := time.Duration(u.skewNanos.Load())
	if d.Abs() <= skewTolerance {
		return 0
	}
	return d
}

// observeDate measures the skew from a response's Date header, sent some
// time between start and end: Whop's clock read date plus up to a second
// when our clock read the midpoint.
func (u *upstream) observeDate(date, start, end time.Time, log *slog.Logger) {
	if date.IsZero() {
		return
	}
	mid := start.Add(end.Sub(start) / 2)
	d := date.Add(500 * time.Millisecond).Sub(mid)
	old := time.Duration(u.skewNanos.Swap(int64(d)))
	u.skewAt.Store(end.UnixNano())
	if d.Abs() > SkewWarning && old.Abs() <= SkewWarning {
		log.Warn("this host's clock is off from Whop's; tokend asks for and judges token lifetimes on Whop's clock", "credential", u.Name, "skew", d.Round(time.Millisecond))
	}
}

// ErrUnknownCredential is returned for a key whose credential is not (or
// no longer) configured.
var ErrUnknownCredential = errors.New("no such credential")

// upstreamSet is the configured credentials, replaced whole on reload so
// lookups take no lock.
type upstreamSet struct {
	byName map[string]*upstream
	names  []string // sorted
}

func (r *Refresher) upstreams() map[string]*upstream { return r.ups.Load().byName }

func (r *Refresher) upstream(name string) *upstream { return r.ups.Load().byName[name] }

// SetCredentials installs the configured credentials: new names get their
// own limiter; known names keep theirs (their Fetcher rotates its secret in
// place); removed names lose their entries, and their watchers are ended.
func (r *Refresher) SetCredentials(creds []Credential) error {
	old := r.upstreams()
	next := make(map[string]*upstream, len(creds))
	var kept []*upstream
	for _, c := range creds {
		if c.Name == "" || c.Fetcher == nil {
			return fmt.Errorf("refresher: credential %q needs a name and a fetcher", c.Name)
		}
		if _, dup := next[c.Name]; dup {
			return fmt.Errorf("refresher: credential %q is configured twice", c.Name)
		}
		if u := old[c.Name]; u != nil && u.Fetcher == c.Fetcher && u.OAuthUser == c.OAuthUser {
			kept = append(kept, u)
			next[c.Name] = u
			continue
		}
		u := &upstream{Credential: c, gate: newGate(r.clock, r.cfg.MaxInFlight, r.cfg.Rate, r.cfg.Burst, r.cfg.KeyProbeInterval, r.cfg.KeyProbeMax)}
		u.sched = newSched(u, r.cfg.Workers)
		next[c.Name] = u
	}
	// Only once the whole set is valid: a reload is the operator saying
	// "try this secret again", even when it did not change.
	for _, u := range kept {
		u.gate.rejectKey(nil)
		if until, why := u.gate.unpause(); until.After(r.clock.Now()) {
			r.log.Info("reload: lifted the 429 pause", "credential", u.Name, "was_until", until.UTC().Format(time.RFC3339), "reason", why)
		}
	}
	names := make([]string, 0, len(next))
	for n := range next {
		names = append(names, n)
	}
	sort.Strings(names)
	r.mu.Lock()
	r.ups.Store(&upstreamSet{byName: next, names: names})
	for _, u := range next {
		r.startSchedLocked(u.sched)
	}
	for n, u := range old {
		if next[n] != u {
			close(u.sched.stop)
		}
	}
	r.mu.Unlock()
	// Entries keep the schedule of the credential they were made under;
	// a credential replaced or removed takes its entries with it.
	gone := r.evictWhere(func(e *entry) bool { return next[e.key.Credential] != e.sched.up })
	if len(gone) > 0 {
		r.log.Info("evicting the entries of removed or replaced credentials", "entries", len(gone))
	}
	return nil
}

// Credentials lists the configured credential names, sorted. The slice is
// shared: do not modify it.
func (r *Refresher) Credentials() []string { return r.ups.Load().names }

// IsOAuthUser reports whether the named credential is a user OAuth token.
func (r *Refresher) IsOAuthUser(name string) (oauth, ok bool) {
	u := r.upstream(name)
	if u == nil {
		return false, false
	}
	return u.OAuthUser, true
}

// CredentialStats describe one credential's health.
type CredentialStats struct {
	Name        string
	OAuthUser   bool
	Fingerprint []byte
	// Rejected: Whop answered 401 to the current secret; it is probed
	// again at NextProbe.
	Rejected  bool
	NextProbe time.Time
	// PausedUntil holds every call after a 429; PauseReason names the hint
	// that set it (a header, or the default cooldown).
	PausedUntil time.Time
	PauseReason string
	// ClockSkew is Whop's clock minus this host's, measured at SkewAt from
	// a Date header (zero SkewAt: never measured).
	ClockSkew     time.Duration
	SkewAt        time.Time
	InFlight      int
	Calls, Errors uint64
	Entries       int
	// EarliestExpiry is the soonest expiry of its valid tokens.
	EarliestExpiry time.Time
	// SecretExpiresAt is when an OAuth token expires, if it says so.
	SecretExpiresAt time.Time
	// Queued calls wait at the gate (limiter, in-flight bound or pause);
	// QueuedBy names who made the most of them.
	Queued   int
	QueuedBy []QueueShare
}

// credentialStatsLocked describes u from counters kept as entries change.
func (r *Refresher) credentialStatsLocked(u *upstream) CredentialStats {
	fp := u.Fetcher.KeyFingerprint()
	c := CredentialStats{
		Name: u.Name, OAuthUser: u.OAuthUser, Fingerprint: fp,
		InFlight: u.gate.inFlight(),
		Calls:    u.calls.Load(), Errors: u.errors.Load(), Entries: u.sched.entries,
		EarliestExpiry: u.sched.earliestExpiryLocked(),
	}
	c.Rejected, c.NextProbe = u.gate.rejection(fp)
	c.PausedUntil, c.PauseReason = u.gate.paused()
	c.Queued, c.QueuedBy = u.queueStats()
	if at := u.skewAt.Load(); at != 0 {
		c.ClockSkew, c.SkewAt = time.Duration(u.skewNanos.Load()), time.Unix(0, at)
	}
	if x, ok := u.Fetcher.(interface{ SecretExpiresAt() time.Time }); ok {
		c.SecretExpiresAt = x.SecretExpiresAt()
	}
	return c
}

// current reports whether t was minted by the secret u holds now.
func (u *upstream) current(t *Token) bool {
	return bytes.Equal(t.Fingerprint, u.Fetcher.KeyFingerprint())
}
