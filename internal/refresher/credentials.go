package refresher

import (
	"bytes"
	"errors"
	"fmt"
	"sort"
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
	for _, c := range creds {
		if c.Name == "" || c.Fetcher == nil {
			return fmt.Errorf("refresher: credential %q needs a name and a fetcher", c.Name)
		}
		if _, dup := next[c.Name]; dup {
			return fmt.Errorf("refresher: credential %q is configured twice", c.Name)
		}
		if u := old[c.Name]; u != nil && u.Fetcher == c.Fetcher && u.OAuthUser == c.OAuthUser {
			// A reload is the operator saying "try this secret again",
			// even when it did not change.
			u.gate.rejectKey(nil)
			next[c.Name] = u
			continue
		}
		u := &upstream{Credential: c, gate: newGate(r.clock, r.cfg.MaxInFlight, r.cfg.Rate, r.cfg.Burst)}
		u.sched = newSched(u, r.cfg.Workers)
		next[c.Name] = u
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
	Name          string
	OAuthUser     bool
	Fingerprint   []byte
	Rejected      bool
	PausedUntil   time.Time
	InFlight      int
	Calls, Errors uint64
	Entries       int
	// EarliestExpiry is the soonest expiry of its valid tokens.
	EarliestExpiry time.Time
	// SecretExpiresAt is when an OAuth token expires, if it says so.
	SecretExpiresAt time.Time
}

// credentialStatsLocked describes u from counters kept as entries change.
func (r *Refresher) credentialStatsLocked(u *upstream) CredentialStats {
	fp := u.Fetcher.KeyFingerprint()
	c := CredentialStats{
		Name: u.Name, OAuthUser: u.OAuthUser, Fingerprint: fp,
		Rejected: u.gate.isRejected(fp), PausedUntil: u.gate.pausedTill(), InFlight: u.gate.inFlight(),
		Calls: u.calls.Load(), Errors: u.errors.Load(), Entries: u.sched.entries,
		EarliestExpiry: u.sched.earliestExpiryLocked(),
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
