package cache

import (
	"bytes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"

	storev1 "github.com/tokend/tokend/proto/tokend/store/v1"
)

// Token is one minted access token. It is immutable once installed.
type Token struct {
	Value      string
	ExpiresAt  time.Time
	ObtainedAt time.Time
	// Fingerprint identifies the API key that minted it (a keyed hash,
	// never the key), so tokens of a replaced key are not served.
	Fingerprint []byte

	// reply is a server's answer built from the token, kept so that a
	// cache hit builds nothing. It is never persisted.
	reply atomic.Value
	// A copy would carry the reply of the original: go vet refuses one.
	_ noCopy
}

// noCopy makes go vet's copylocks check report copies of the struct that
// holds it.
type noCopy struct{}

func (*noCopy) Lock()   {}
func (*noCopy) Unlock() {}

// Reply is the answer kept by SetReply, or nil. The token never changes,
// and it belongs to one entry, so an answer built from the two never goes
// stale; a refresh installs a new Token, which starts without one.
func (t *Token) Reply() any { return t.reply.Load() }

// SetReply keeps v, unless another caller got there first, and returns the
// answer kept: concurrent first callers all use the same one. v must be
// of the same type every time and never be modified afterwards, since
// every hit shares it.
func (t *Token) SetReply(v any) any {
	if t.reply.CompareAndSwap(nil, v) {
		return v
	}
	return t.reply.Load()
}

// ValidFor reports whether t is still valid for at least ttl after now.
func (t *Token) ValidFor(now time.Time, ttl time.Duration) bool {
	return t != nil && t.ExpiresAt.Sub(now) >= ttl
}

// State is where an entry is in its refresh cycle.
type State int

const (
	StateFresh State = iota
	StateRefreshing
	StateRetrying
	StateFailing
	// StateIdle: nobody asked during a whole lifetime; not refreshed.
	StateIdle
)

// ErrorInfo is the last upstream failure of an entry. Message is Whop's
// message or a network error, never a secret.
type ErrorInfo struct {
	At        time.Time
	Status    int
	Message   string
	Retryable bool
}

// Meta is the refresh bookkeeping of an entry, persisted with it.
type Meta struct {
	State       State
	NextRefresh time.Time
	Refreshes   uint64
	Failures    uint32
	LastError   *ErrorInfo
}

// Entry is one cached key. The token and the request counters are atomics so
// the hit path takes no lock.
type Entry struct {
	key Key
	id  string
	enc string

	tok           atomic.Pointer[Token]
	lastRequested atomic.Int64 // Unix nanoseconds
	hits          atomic.Uint64
	// idle mirrors Meta.State == StateIdle for the lock-free hit path.
	idle atomic.Bool

	mu   sync.Mutex
	meta Meta
}

func newEntry(k Key, enc []byte) *Entry {
	return &Entry{key: k, id: idOf(enc), enc: string(enc)}
}

func (e *Entry) Key() Key    { return e.key }
func (e *Entry) ID() string  { return e.id }
func (e *Entry) Enc() string { return e.enc }

// Token returns the current token, or nil before the first one arrives.
func (e *Entry) Token() *Token { return e.tok.Load() }

// Touch records a request served from e.
func (e *Entry) Touch(now time.Time, hit bool) {
	e.lastRequested.Store(now.UnixNano())
	if hit {
		e.hits.Add(1)
	}
}

// LastRequested is when a client last asked for e (zero if never).
func (e *Entry) LastRequested() time.Time {
	n := e.lastRequested.Load()
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

// Idle reports whether e was set aside as unused.
func (e *Entry) Idle() bool { return e.idle.Load() }

// Revive clears the idle mark, reporting whether it was set: exactly one
// caller wins the right to bring an idle entry back.
func (e *Entry) Revive() bool { return e.idle.CompareAndSwap(true, false) }

// Hits counts requests answered from the cache.
func (e *Entry) Hits() uint64 { return e.hits.Load() }

// Meta returns a copy of e's refresh bookkeeping.
func (e *Entry) Meta() Meta {
	e.mu.Lock()
	defer e.mu.Unlock()
	m := e.meta
	if m.LastError != nil {
		le := *m.LastError
		m.LastError = &le
	}
	return m
}

func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromUnixNano(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

func (e *Entry) record(aead cipher.AEAD) (*storev1.Record, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	t := e.tok.Load()
	r := &storev1.Record{
		Credential:      e.key.Credential,
		CompanyId:       e.key.CompanyID,
		UserId:          e.key.UserID,
		ScopedActions:   e.key.Scopes,
		Token:           t.Value,
		ExpiresAt:       unixNano(t.ExpiresAt),
		ObtainedAt:      unixNano(t.ObtainedAt),
		KeyFingerprint:  t.Fingerprint,
		LastRequestedAt: e.lastRequested.Load(),
		NextRefreshAt:   unixNano(e.meta.NextRefresh),
		Hits:            e.hits.Load(),
		Refreshes:       e.meta.Refreshes,
		Failures:        e.meta.Failures,
	}
	if le := e.meta.LastError; le != nil {
		r.LastErrorAt = unixNano(le.At)
		r.LastErrorStatus = int32(le.Status)
		r.LastErrorMessage = le.Message
		r.LastErrorRetryable = le.Retryable
	}
	if aead != nil {
		nonce := make([]byte, aead.NonceSize(), aead.NonceSize()+len(t.Value)+aead.Overhead())
		if _, err := rand.Read(nonce); err != nil {
			return nil, fmt.Errorf("seal token: %w", err)
		}
		r.SealedToken = aead.Seal(nonce, nonce, []byte(t.Value), []byte(e.enc))
		r.Token = ""
	}
	return r, nil
}

// errUnsealable marks a sealed record that the configured cache key cannot
// open: written under another key, or with no key configured now.
var errUnsealable = errors.New("sealed token cannot be opened with this cache key")

// decodeEntry rebuilds an entry from its bbolt key and value. The key is the
// authority; the record's copy of it must agree.
//
// A plain record read while a cache key is configured decodes fine; the
// caller rewrites it sealed.
func decodeEntry(k, v []byte, aead cipher.AEAD) (e *Entry, sealed bool, err error) {
	key, err := DecodeKey(k)
	if err != nil {
		return nil, false, err
	}
	var r storev1.Record
	if err := proto.Unmarshal(v, &r); err != nil {
		return nil, false, fmt.Errorf("decode record: %w", err)
	}
	if !bytes.Equal(NewKey(r.Credential, r.CompanyId, r.UserId, r.ScopedActions).Encode(), k) {
		return nil, false, fmt.Errorf("record does not match its key")
	}
	if sealed = len(r.SealedToken) > 0; sealed {
		if aead == nil || len(r.SealedToken) < aead.NonceSize() {
			return nil, true, errUnsealable
		}
		n := aead.NonceSize()
		plain, err := aead.Open(nil, r.SealedToken[:n], r.SealedToken[n:], k)
		if err != nil {
			return nil, true, errUnsealable
		}
		r.Token = string(plain)
	}
	if r.Token == "" || r.ExpiresAt == 0 {
		return nil, sealed, fmt.Errorf("record has no token")
	}
	e = newEntry(key, k)
	e.tok.Store(&Token{
		Value:       r.Token,
		ExpiresAt:   fromUnixNano(r.ExpiresAt),
		ObtainedAt:  fromUnixNano(r.ObtainedAt),
		Fingerprint: r.KeyFingerprint,
	})
	e.lastRequested.Store(r.LastRequestedAt)
	e.hits.Store(r.Hits)
	e.meta = Meta{
		State:       StateFresh,
		NextRefresh: fromUnixNano(r.NextRefreshAt),
		Refreshes:   r.Refreshes,
		Failures:    r.Failures,
	}
	if r.LastErrorAt != 0 {
		e.meta.LastError = &ErrorInfo{
			At:        fromUnixNano(r.LastErrorAt),
			Status:    int(r.LastErrorStatus),
			Message:   r.LastErrorMessage,
			Retryable: r.LastErrorRetryable,
		}
	}
	return e, sealed, nil
}

// SetState changes e's state in memory only: transient states such as
// StateRefreshing are not worth a write.
func (c *Cache) SetState(e *Entry, s State) {
	e.mu.Lock()
	e.meta.State = s
	e.mu.Unlock()
}
