package refresher

import (
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"

	"github.com/tokend/tokend/internal/cache"
)

// Key names one token: the credential that mints it, the subject and the
// set of scoped actions (fields as cache.Key's, whose encoding it shares).
// It is the refresher's own type so that its consumers need nothing of
// the store. Build it with NewKey so Scopes is canonical.
type Key cache.Key

// NewKey returns the canonical key. Scopes already sorted and unique are
// used as they are, without a copy: the caller must not modify them.
func NewKey(credential, companyID, userID string, scopes []string) Key {
	return Key(cache.NewKey(credential, companyID, userID, scopes))
}

// ID is the key's short printable id, stable across restarts.
func (k Key) ID() string { return cache.Key(k).ID() }

// Subject is the human form of the subject: company, user, or company/user.
func (k Key) Subject() string { return cache.Key(k).Subject() }

// Token is one minted access token. It never changes once installed; a
// refresh installs a new one.
type Token struct {
	Value      string
	ExpiresAt  time.Time
	ObtainedAt time.Time
	// Fingerprint identifies the secret that minted it (a keyed hash,
	// never the secret), so tokens of a replaced key are not served.
	Fingerprint []byte

	// memo is a value the consumer derived from the token (the server's
	// reply), kept so that a hit builds nothing. Never persisted.
	memo atomic.Value
	// A copy would carry the original's memo: go vet refuses one.
	_ noCopy
}

type noCopy struct{}

func (*noCopy) Lock()   {}
func (*noCopy) Unlock() {}

// Memo is the value kept by SetMemo, or nil.
func (t *Token) Memo() any { return t.memo.Load() }

// SetMemo keeps v unless another caller got there first, and returns the
// value kept, so concurrent first callers share one. v must be of the same
// type every time and never change afterwards.
func (t *Token) SetMemo(v any) any {
	if t.memo.CompareAndSwap(nil, v) {
		return v
	}
	return t.memo.Load()
}

// validFor reports whether t is still valid for at least d after now.
func (t *Token) validFor(now time.Time, d time.Duration) bool {
	return t != nil && t.ExpiresAt.Sub(now) >= d
}

func (t *Token) lifetime() time.Duration { return t.ExpiresAt.Sub(t.ObtainedAt) }

// State is where an entry is in its life. It is computed in one place,
// (*Refresher).settleLocked, from the entry's facts.
type State uint8

const (
	StateFresh State = iota
	// StateRefreshing: an upstream call for the entry is in flight.
	StateRefreshing
	// StateRetrying: the last call failed in a way a retry may fix.
	StateRetrying
	// StateFailing: the last call failed in a way no retry fixes, or the
	// key never got a token.
	StateFailing
	// StateExpired: the token ran out and no replacement has arrived.
	StateExpired
	// StateIdle: nobody asked during a whole lifetime; not refreshed.
	StateIdle
	numStates
)

var stateNames = [numStates]string{"fresh", "refreshing", "retrying", "failing", "expired", "idle"}

// String is the lower-case word README's table uses.
func (s State) String() string {
	if s < numStates {
		return stateNames[s]
	}
	return "unknown"
}

// ErrorInfo is the last upstream failure of an entry. Message is Whop's
// message or a network error, never a secret.
type ErrorInfo struct {
	At      time.Time
	Status  int
	Message string
	// Type, Code and Param are Whop's, when its answer had them.
	Type, Code, Param string
	Retryable         bool
}

// failure says what kind of failure an entry last had.
type failure uint8

const (
	failNone failure = iota
	failRetryable
	failPermanent
)

// entry is one key's whole life. The token and the request counters are
// atomics, read by the hit path without a lock; everything else is guarded
// by Refresher.mu.
type entry struct {
	key   Key
	enc   string
	id    string
	sched *sched // its credential's schedule; fixed for the entry's life

	tok           atomic.Pointer[Token]
	lastRequested atomic.Int64 // Unix nanoseconds
	hits          atomic.Uint64
	// idle mirrors state == StateIdle for the hit path, which revives it.
	idle atomic.Bool

	// Guarded by Refresher.mu.
	live  bool // in the index; false once removed, for good
	state State
	// next is when the scheduler acts on the entry: a refresh, a retry, or
	// a drop. Zero while not scheduled.
	next time.Time
	// expiresAt mirrors tok's expiry for the expiry heap.
	expiresAt time.Time
	hidx      int   // position in sched.actions, -1 when not queued
	xidx      int   // position in sched.expiries, -1 when not queued
	lidx      int   // position in its owner's Refresher.lru heap, -1 once removed
	lruAt     int64 // lastRequested as of its place in that heap
	// owner is who first asked for the key ("uid 1000"; "" unknown), whose
	// share of the capacity the entry counts against.
	owner string

	call *call // the upstream call in flight for this entry, if any

	fail failure
	// err is the last failure, returned to callers without an upstream
	// call until errUntil, while the secret is still errKey.
	err      error
	errUntil time.Time
	errKey   []byte
	lastErr  *ErrorInfo
	bo       *backoff.ExponentialBackOff

	refreshes uint64
	failures  uint32
	watchers  map[*Watcher]struct{}
}

func newEntry(k Key, enc string, s *sched) *entry {
	return &entry{key: k, enc: enc, id: cache.Key(k).ID(), sched: s, hidx: -1, xidx: -1, lidx: -1}
}

func (e *entry) touch(now time.Time) { e.lastRequested.Store(now.UnixNano()) }

func (e *entry) lastRequestedAt() time.Time {
	if n := e.lastRequested.Load(); n != 0 {
		return time.Unix(0, n)
	}
	return time.Time{}
}

// record is what the store keeps of e. Called with Refresher.mu held.
func (e *entry) record() cache.Record {
	t := e.tok.Load()
	r := cache.Record{
		Key:           cache.Key(e.key),
		Token:         t.Value,
		ExpiresAt:     t.ExpiresAt,
		ObtainedAt:    t.ObtainedAt,
		Fingerprint:   t.Fingerprint,
		LastRequested: e.lastRequestedAt(),
		Hits:          e.hits.Load(),
		Refreshes:     e.refreshes,
		Failures:      e.failures,
		Owner:         e.owner,
	}
	if e.state == StateFresh {
		r.NextRefresh = e.next
	}
	if le := e.lastErr; le != nil {
		r.LastError = &cache.RecordError{At: le.At, Status: le.Status, Message: le.Message, Type: le.Type, Code: le.Code, Param: le.Param, Retryable: le.Retryable}
	}
	return r
}

func (k Key) encode() []byte { return cache.Key(k).Encode() }
