package fleet

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"net"
	"time"

	"github.com/redis/go-redis/v9"
)

// Token is a token as the fleet shares it.
type Token struct {
	Value      string
	ExpiresAt  time.Time
	ObtainedAt time.Time
}

// Get returns the token another host (or this one) put for key under cred.
// key is the caller's opaque key string (an encoded cache key). On a due
// refresh the caller should adopt it only if it expires later than the
// token it holds (else Redis has that same token: Lock and mint). It reports
// false on a miss, on Redis trouble, and for a value that does not open,
// belongs to another credential (both counted as Tampered) or has expired.
func (f *Fleet) Get(ctx context.Context, cred []byte, key string) (Token, bool) {
	name := f.keys.entry(cred, key).tok
	var raw []byte
	err := f.do(ctx, func(ctx context.Context) (err error) {
		raw, err = f.rdb.Get(ctx, name).Bytes()
		return err
	})
	if errors.Is(err, redis.Nil) {
		f.n.misses.Add(1)
	}
	if err != nil {
		return Token{}, false
	}
	t, ok := f.openToken(name, cred, raw)
	if ok {
		f.n.adopted.Add(1)
	}
	return t, ok
}

// openToken opens a token value read under name and counts what is wrong
// with it.
func (f *Fleet) openToken(name string, cred, raw []byte) (Token, bool) {
	r, err := f.keys.open(name, cred, raw)
	if err != nil {
		f.n.tampered.Add(1)
		return Token{}, false
	}
	t := Token{Value: r.text, ExpiresAt: time.Unix(0, r.a), ObtainedAt: time.Unix(0, r.b)}
	if t.Value == "" {
		f.n.tampered.Add(1)
		return Token{}, false
	}
	if !time.Now().Before(t.ExpiresAt) {
		f.n.stale.Add(1)
		return Token{}, false
	}
	return t, true
}

// Put shares t for key under cred until t expires (SET ... PXAT, so Redis
// forgets it when Whop does) and wakes the hosts waiting in Await. A token
// already expired is not shared.
func (f *Fleet) Put(ctx context.Context, cred []byte, key string, t Token) {
	if t.Value == "" || !time.Now().Before(t.ExpiresAt) {
		return
	}
	name := f.keys.entry(cred, key).tok
	sealed := f.keys.seal(name, record{cred: cred, a: t.ExpiresAt.UnixNano(), b: t.ObtainedAt.UnixNano(), text: t.Value})
	err := f.do(ctx, func(ctx context.Context) error {
		_, err := f.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			p.Do(ctx, "SET", name, sealed, "PXAT", t.ExpiresAt.UnixMilli())
			p.Publish(ctx, f.channel, name)
			return nil
		})
		return err
	})
	if err == nil {
		f.n.published.Add(1)
	}
}

// Lease is a mint lock. A Lease from a degraded fleet is local-only: it
// holds nothing in Redis, and the caller mints alone as without a fleet.
type Lease struct {
	f           *Fleet
	name, owner string // empty when local-only
}

// Local reports whether the lease is local-only (Redis was unavailable).
func (l *Lease) Local() bool { return l.name == "" }

// Lock takes the fleet-wide mint lock for key under cred: SET NX PX with a
// random owner token, living Config.LockLease. held is false when another
// host holds it (the caller should Await); then the Lease is nil. When
// Redis is unavailable the caller gets a local-only Lease and held=true.
func (f *Fleet) Lock(ctx context.Context, cred []byte, key string) (l *Lease, held bool) {
	name := f.keys.entry(cred, key).lock
	owner := newOwner()
	err := f.do(ctx, func(ctx context.Context) error {
		return f.rdb.Do(ctx, "SET", name, owner, "NX", "PX", f.lease.Milliseconds()).Err()
	})
	switch {
	case err == nil:
		return &Lease{f: f, name: name, owner: owner}, true
	case errors.Is(err, redis.Nil):
		f.n.lockBusy.Add(1)
		return nil, false
	default:
		return &Lease{f: f}, true
	}
}

func newOwner() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails on Linux
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// unlock deletes the lock only if it still holds this owner's token: a
// holder whose lease ran out must not delete the lock of the host that took
// over.
var unlock = redis.NewScript(`if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0`)

// Release gives the lock up (compare-and-delete). Call it after Put, so
// that a waiter who sees the lock gone also sees the token. It is bounded
// by the fleet's timeout, not by a caller's context, which may have ended.
func (l *Lease) Release() {
	if l == nil || l.name == "" {
		return
	}
	_ = l.f.do(context.Background(), func(ctx context.Context) error {
		return unlock.Run(ctx, l.f.rdb, []string{l.name}, l.owner).Err()
	})
}

// renew extends the lock's life only while it still holds this owner's
// token.
var renew = redis.NewScript(`if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0`)

// KeepAlive renews the lease every third of its life until the returned
// func is called, so that a holder slowed by its own limits (a rate wait,
// a 429 pause, retries) keeps the lock; a holder that dies stops renewing
// and loses it within one lease. A nil or local-only lease needs nothing.
func (l *Lease) KeepAlive() (stop func()) {
	if l == nil || l.name == "" {
		return func() {}
	}
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(l.f.lease / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				_ = l.f.do(context.Background(), func(ctx context.Context) error {
					return renew.Run(ctx, l.f.rdb, []string{l.name}, l.owner, l.f.lease.Milliseconds()).Err()
				})
			}
		}
	}()
	return func() {
		close(done)
		<-finished
	}
}

// Await waits for the holder of key's lock to Put a token that expires
// after newer, until ctx ends. newer is the expiry of the token the caller
// holds (zero on a miss): during a refresh Redis still has the old token,
// which must not count as the holder's result. It returns false when ctx ends, when Redis is unavailable, or when the
// lock is gone without a token (the holder died and its lease ran out, or
// its mint failed): then the caller may Lock again and mint.
func (f *Fleet) Await(ctx context.Context, cred []byte, key string, newer time.Time) (Token, bool) {
	if !f.br.allow() {
		return Token{}, false
	}
	f.n.lockWaits.Add(1)
	n := f.keys.entry(cred, key)
	wake := make(chan struct{}, 1)
	f.watch(n.tok, wake)
	defer f.unwatch(n.tok, wake)
	timer := time.NewTimer(awaitPoll)
	defer timer.Stop()
	var seen []byte
	for {
		var pttl *redis.DurationCmd
		var get *redis.StringCmd
		// The lock is read before the token: a holder Puts, then Releases,
		// so a lock seen gone implies its token (if any) is already there.
		err := f.do(ctx, func(ctx context.Context) error {
			_, err := f.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
				pttl = p.PTTL(ctx, n.lock)
				get = p.Get(ctx, n.tok)
				return nil
			})
			return err
		})
		if err != nil && !errors.Is(err, redis.Nil) {
			return Token{}, false
		}
		// A value looked at already (the old token, or a tampered one) is
		// neither opened nor counted again.
		if raw, err := get.Bytes(); err == nil && !bytes.Equal(raw, seen) {
			seen = raw
			if t, ok := f.openToken(n.tok, cred, raw); ok && t.ExpiresAt.After(newer) {
				f.n.adopted.Add(1)
				return t, true
			}
		}
		left := pttl.Val()
		if left <= 0 { // -2: no lock; -1: a lock without expiry is not ours
			f.n.lockTakeovers.Add(1)
			return Token{}, false
		}
		timer.Reset(min(left+time.Millisecond, awaitPoll))
		select {
		case <-ctx.Done():
			return Token{}, false
		case <-wake:
		case <-timer.C:
		}
	}
}

func (f *Fleet) watch(name string, c chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	w := f.waiters[name]
	if w == nil {
		w = map[chan struct{}]struct{}{}
		f.waiters[name] = w
	}
	w[c] = struct{}{}
}

func (f *Fleet) unwatch(name string, c chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.waiters[name], c)
	if len(f.waiters[name]) == 0 {
		delete(f.waiters, name)
	}
}

func (f *Fleet) wakeWaiters(name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for c := range f.waiters[name] {
		select {
		case c <- struct{}{}:
		default:
		}
	}
}

// subscribe keeps one pub/sub connection on the fleet's channel while the
// breaker is closed and wakes the Await calls for each name published.
// Awaits poll as well, so a gap here only costs latency.
func (f *Fleet) subscribe(ctx context.Context) {
	defer f.wg.Done()
	wait := probeMin
	for ctx.Err() == nil {
		if f.br.allow() {
			ps := f.rdb.Subscribe(ctx, f.channel)
			if _, err := ps.ReceiveTimeout(ctx, f.timeout); err == nil { // the subscription's confirmation
				wait = probeMin
				f.listen(ctx, ps)
			} else {
				wait = min(2*wait, probeMax)
			}
			_ = ps.Close()
		}
		t := time.NewTimer(jitter(wait))
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
	}
}

func (f *Fleet) listen(ctx context.Context, ps *redis.PubSub) {
	// A blocked read ignores ctx; closing the connection ends it.
	defer context.AfterFunc(ctx, func() { ps.Close() })()
	pinged := false
	for {
		msg, err := ps.ReceiveTimeout(ctx, subscriberPing)
		var ne net.Error
		switch {
		case err == nil:
		case errors.As(err, &ne) && ne.Timeout() && !pinged && ctx.Err() == nil:
			if ps.Ping(ctx) != nil {
				return
			}
			pinged = true
			continue
		default: // closed, reset, or silent after a ping: resubscribe
			return
		}
		pinged = false
		if m, ok := msg.(*redis.Message); ok {
			f.wakeWaiters(m.Payload)
		}
	}
}
