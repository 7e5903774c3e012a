package refresher

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"sort"
	"strings"
	"time"

	"github.com/tokend/tokend/internal/cache"
	"github.com/tokend/tokend/internal/fleet"
)

// EntryInfo is an immutable snapshot of one entry, for operators. It
// carries no token: JWTParts gives the parts that are not secret.
type EntryInfo struct {
	KeyID         string
	Key           Key
	State         State
	ExpiresAt     time.Time // zero before the first token
	ObtainedAt    time.Time
	NextRefresh   time.Time // zero unless a refresh is scheduled
	LastRequested time.Time
	Hits          uint64
	Refreshes     uint64
	Failures      uint32
	LastError     *ErrorInfo
	Watchers      int

	tok *Token
}

// JWTParts returns the token's JWT header and claims as JSON, unverified;
// the signature, which makes a token usable, is never returned. Anything
// that is not a JWT gives nothing.
func (i EntryInfo) JWTParts() (header, claims string) {
	if i.tok == nil {
		return "", ""
	}
	parts := strings.Split(i.tok.Value, ".")
	if len(parts) != 3 {
		return "", ""
	}
	part := func(s string) string {
		b, err := base64.RawURLEncoding.DecodeString(s)
		if err != nil || !json.Valid(b) {
			return ""
		}
		return string(b)
	}
	return part(parts[0]), part(parts[1])
}

// infoLocked snapshots e.
func (r *Refresher) infoLocked(e *entry) EntryInfo {
	i := EntryInfo{
		KeyID: e.id, Key: e.key, State: e.state,
		LastRequested: e.lastRequestedAt(), Hits: e.hits.Load(),
		Refreshes: e.refreshes, Failures: e.failures, LastError: e.lastErr,
		Watchers: len(e.watchers),
	}
	if e.state == StateFresh {
		i.NextRefresh = e.next
	}
	if t := e.tok.Load(); t != nil {
		i.tok, i.ExpiresAt, i.ObtainedAt = t, t.ExpiresAt, t.ObtainedAt
	}
	return i
}

// snapshotChunk bounds how long a listing holds the lock at a time.
const snapshotChunk = 256

// Entries snapshots every entry that match accepts (nil: all), sorted by
// key id. It is for operators: it visits every entry, a few hundred per
// turn of the lock, so misses and the schedules are not held up.
func (r *Refresher) Entries(match func(Key) bool) []EntryInfo {
	r.imu.RLock()
	all := make([]*entry, 0, len(r.index))
	for _, e := range r.index {
		if match == nil || match(e.key) {
			all = append(all, e)
		}
	}
	r.imu.RUnlock()
	out := make([]EntryInfo, 0, len(all))
	for len(all) > 0 {
		n := min(len(all), snapshotChunk)
		r.mu.Lock()
		for _, e := range all[:n] {
			if e.live {
				out = append(out, r.infoLocked(e))
			}
		}
		r.mu.Unlock()
		all = all[n:]
	}
	sort.Slice(out, func(i, j int) bool { return out[i].KeyID < out[j].KeyID })
	return out
}

// Errors of Find.
var (
	ErrNotFound  = errors.New("no entry has that key id")
	ErrAmbiguous = errors.New("key id prefix matches more than one entry")
)

// find returns the one entry whose id starts with prefix.
func (r *Refresher) find(prefix string) (*entry, error) {
	prefix = strings.ToLower(prefix)
	if prefix == "" {
		return nil, ErrNotFound
	}
	var found *entry
	r.imu.RLock()
	defer r.imu.RUnlock()
	for _, e := range r.index {
		if strings.HasPrefix(e.id, prefix) {
			if found != nil {
				return nil, ErrAmbiguous
			}
			found = e
		}
	}
	if found == nil {
		return nil, ErrNotFound
	}
	return found, nil
}

// Find snapshots the one entry whose key id starts with prefix.
func (r *Refresher) Find(prefix string) (EntryInfo, error) {
	e, err := r.find(prefix)
	if err != nil {
		return EntryInfo{}, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !e.live {
		return EntryInfo{}, ErrNotFound
	}
	return r.infoLocked(e), nil
}

// Evict removes the entries whose key ids are given (exact ids, as Entries
// and Find return them) and returns the ids it removed.
func (r *Refresher) Evict(ids ...string) []string {
	want := make(map[string]bool, len(ids))
	for _, id := range ids {
		want[id] = true
	}
	return r.evictWhere(func(e *entry) bool { return want[e.id] })
}

// EvictMatching removes every entry whose key match accepts.
func (r *Refresher) EvictMatching(match func(Key) bool) []string {
	return r.evictWhere(func(e *entry) bool { return match(e.key) })
}

func (r *Refresher) evictWhere(match func(*entry) bool) []string {
	r.imu.RLock()
	var victims []*entry
	for _, e := range r.index {
		if match(e) {
			victims = append(victims, e)
		}
	}
	r.imu.RUnlock()
	var gone []*Watcher
	var ids []string
	r.mu.Lock()
	for _, e := range victims {
		if e.live {
			ids = append(ids, e.id)
			gone = append(gone, r.removeLocked(e)...)
		}
	}
	r.mu.Unlock()
	notifyAll(gone)
	sort.Strings(ids)
	return ids
}

// Refresh mints a new token for the entry with key id prefix now, joining
// a call in flight, and returns the entry afterwards.
func (r *Refresher) Refresh(ctx context.Context, prefix string) (EntryInfo, error) {
	e, err := r.find(prefix)
	if err != nil {
		return EntryInfo{}, err
	}
	r.mu.Lock()
	if !e.live {
		r.mu.Unlock()
		return EntryInfo{}, ErrNotFound
	}
	c := e.call
	if c == nil || c.queue.Err() != nil {
		c = r.startCallLocked(e, want{lifetime: r.cfg.Lifetime, cause: "admin"}, r.clock.Now(), "admin")
	}
	c.joinLocked(ctx)
	r.mu.Unlock()
	select {
	case <-c.done:
	case <-ctx.Done():
		r.mu.Lock()
		c.leaveLocked()
		r.mu.Unlock()
		return EntryInfo{}, ctx.Err()
	}
	if c.err != nil {
		return EntryInfo{}, c.err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.infoLocked(e), nil
}

// Status is one consistent look at the refresher, for status and metrics.
type Status struct {
	Hits, Misses, Joined           uint64
	UpstreamCalls, UpstreamErrors  uint64
	LastError                      *ErrorInfo
	Entries                        int
	ByState                        [numStates]int
	UpstreamInFlight               int
	UpstreamMaxInFlight            int
	UpstreamRate                   float64
	UpstreamPausedUntil            time.Time
	APIKeyRejected                 bool
	EvictedOverCapacity            uint64
	DroppedIdle, MissesRateLimited uint64
	// Abandoned counts calls that left the gate's queue because every
	// caller had gone.
	Abandoned  uint64
	MaxEntries int
	// EarliestExpiry is the soonest expiry of a valid token; zero if none.
	EarliestExpiry time.Time
	Credentials    []CredentialStats
	// PendingWrites and WriteError are the store's; MemoryOnly means its
	// file cannot be opened for writing, so tokend serves from memory.
	PendingWrites int
	WriteError    error
	MemoryOnly    bool
	// Fleet is the fleet tier's state; nil without one. FleetAdopted
	// counts calls answered by a token another host minted.
	Fleet        *fleet.Status
	FleetAdopted uint64
}

// EntriesByState names the states as README's table does, all of them.
func (s Status) EntriesByState() map[string]int {
	m := make(map[string]int, numStates)
	for st, n := range s.ByState {
		m[State(st).String()] = n
	}
	return m
}

// Status takes one snapshot: counters, per-state counts kept as entries
// change (no scan), and every credential's health.
func (r *Refresher) Status() Status {
	st := Status{
		Hits:                r.hits.Load(),
		Misses:              r.misses.Load(),
		Joined:              r.joined.Load(),
		UpstreamCalls:       r.upstreamCalls.Load(),
		UpstreamErrors:      r.upstreamErrors.Load(),
		Abandoned:           r.abandoned.Load(),
		LastError:           r.lastError.Load(),
		UpstreamMaxInFlight: r.cfg.MaxInFlight,
		UpstreamRate:        float64(r.cfg.Rate),
		EvictedOverCapacity: r.evicted.Load(),
		DroppedIdle:         r.droppedIdle.Load(),
		MaxEntries:          r.cfg.MaxEntries,
		MissesRateLimited:   r.missesLimited.Load(),
	}
	st.PendingWrites, st.WriteError = r.store.WriteStatus()
	st.MemoryOnly = errors.Is(st.WriteError, cache.ErrUnavailable)
	if r.cfg.Fleet != nil {
		fs := r.cfg.Fleet.Status()
		st.Fleet, st.FleetAdopted = &fs, r.fleetAdopted.Load()
	}
	set := r.ups.Load()
	r.mu.Lock()
	st.ByState = r.counts
	for _, n := range set.names {
		u := set.byName[n]
		c := r.credentialStatsLocked(u)
		st.Entries += c.Entries
		if !c.EarliestExpiry.IsZero() && (st.EarliestExpiry.IsZero() || c.EarliestExpiry.Before(st.EarliestExpiry)) {
			st.EarliestExpiry = c.EarliestExpiry
		}
		st.Credentials = append(st.Credentials, c)
	}
	r.mu.Unlock()
	for _, c := range st.Credentials {
		st.UpstreamInFlight += c.InFlight
		if c.PausedUntil.After(st.UpstreamPausedUntil) {
			st.UpstreamPausedUntil = c.PausedUntil
		}
		st.APIKeyRejected = st.APIKeyRejected || c.Rejected
	}
	return st
}
