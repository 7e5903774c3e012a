package refresher

import (
	"context"
	"errors"
	"time"

	"github.com/tokend/tokend/internal/fleet"
)

// Fleet is the tier that hosts of a fleet share (internal/fleet, over
// Redis): the tokens of a key minted with the same credential, one minter
// per key at a time, and one upstream budget and 429 pause per credential.
// Every method degrades to "nothing there" or "go alone" when the tier is
// unavailable; none can fail a caller. cred is the credential's secret
// fingerprinted with Salt, the same on every host.
type Fleet interface {
	Salt() []byte
	Get(ctx context.Context, cred []byte, key string) (fleet.Token, bool)
	Put(ctx context.Context, cred []byte, key string, t fleet.Token)
	Lock(ctx context.Context, cred []byte, key string) (*fleet.Lease, bool)
	Await(ctx context.Context, cred []byte, key string, newer time.Time) (fleet.Token, bool)
	Allow(ctx context.Context, cred []byte, rate float64, burst int) (retryAfter time.Duration, ok bool)
	Pause(ctx context.Context, cred []byte, until time.Time, why string)
	Paused(ctx context.Context, cred []byte) (until time.Time, why string, ok bool)
	Status() fleet.Status
}

// fleetCred is up's fingerprint for the fleet, or nil when there is no
// fleet or up's fetcher cannot fingerprint its secret with another salt.
func (r *Refresher) fleetCred(up *upstream) []byte {
	if r.cfg.Fleet == nil {
		return nil
	}
	f, ok := up.Fetcher.(interface{ FingerprintWith([]byte) []byte })
	if !ok {
		return nil
	}
	return f.FingerprintWith(r.fleetSalt)
}

// fromFleet looks for c's token in the fleet before c mints: a token
// another host put is adopted; if another host is minting, c waits for its
// token within its waiters' time (err when that ends first). Otherwise c
// gets the fleet's lock for the key (nil when another host took it over
// meanwhile: c mints anyway).
func (r *Refresher) fromFleet(c *call, cred, fp []byte) (tok *Token, lease *fleet.Lease, err error) {
	f := r.cfg.Fleet
	if tok := r.fleetToken(c, cred, fp); tok != nil {
		return tok, nil, nil
	}
	if tok, lease, held := r.lockOrAdopt(c, cred, fp); held {
		return tok, lease, nil
	}
	var newer time.Time // during a refresh, Redis still holds the old token
	if cur := c.e.tok.Load(); cur != nil {
		newer = cur.ExpiresAt
	}
	var t fleet.Token
	var ok, ended bool
	for {
		dl, bounded := r.callDeadline(c)
		ctx, cancel := r.awaitContext(c, dl, bounded)
		t, ok = f.Await(ctx, cred, c.e.enc, newer)
		ended = ctx.Err() != nil
		cancel()
		// A caller with a later deadline (or none) may have joined.
		if next, nowBounded := r.callDeadline(c); !ok && ended && c.queue.Err() == nil && bounded && (!nowBounded && r.waited(c) || next.After(dl)) {
			continue
		}
		break
	}
	if ok {
		if tok := r.adoptable(c, t, fp); tok != nil {
			return tok, nil, nil
		}
	}
	if ended {
		return nil, nil, errFleetWait
	}
	// The holder died, failed, or gave a token c cannot use: mint, under
	// the lock if it is free now.
	tok, lease, _ = r.lockOrAdopt(c, cred, fp)
	return tok, lease, nil
}

// errFleetWait: c's callers left, or their deadline passed, while another
// host minted the key.
var errFleetWait = errors.New("another host of the fleet is minting this token; it did not come before the caller's deadline")

// lockOrAdopt takes the fleet's lock for c's key. Another host may have
// put its token and released the lock since c last looked, so c looks
// once more under the lock and adopts it if it is there (releasing the
// lock). held is false when another host holds the lock.
func (r *Refresher) lockOrAdopt(c *call, cred, fp []byte) (tok *Token, lease *fleet.Lease, held bool) {
	lease, held = r.cfg.Fleet.Lock(r.base, cred, c.e.enc)
	if !held {
		return nil, nil, false
	}
	if tok := r.fleetToken(c, cred, fp); tok != nil {
		lease.Release()
		return tok, nil, true
	}
	return nil, lease, true
}

// fleetToken is the fleet's token for c's key if c can adopt it. A call
// made because a caller saw the shared token refused adopts nothing.
func (r *Refresher) fleetToken(c *call, cred, fp []byte) *Token {
	if c.want.cause == "rejected" {
		return nil
	}
	if t, ok := r.cfg.Fleet.Get(r.base, cred, c.e.enc); ok {
		return r.adoptable(c, t, fp)
	}
	return nil
}

// awaitContext bounds a wait for another host's mint like a wait at the
// gate: within the waiters' latest deadline dl, ended when they all leave.
func (r *Refresher) awaitContext(c *call, dl time.Time, bounded bool) (context.Context, context.CancelFunc) {
	if bounded {
		return context.WithDeadline(c.queue, dl)
	}
	return context.WithCancel(c.queue)
}

// adoptable is t as this host's token for c's entry, or nil when c cannot
// use it: one already due for refresh, one no newer than the entry's, or
// one shorter than the min_ttl of the caller who started c.
func (r *Refresher) adoptable(c *call, t fleet.Token, fp []byte) *Token {
	now := r.clock.Now()
	tok := &Token{Value: t.Value, ExpiresAt: t.ExpiresAt, ObtainedAt: t.ObtainedAt, Fingerprint: fp}
	if !tok.ExpiresAt.After(now) || !r.refreshTime(tok).After(now) {
		return nil
	}
	if cur := c.e.tok.Load(); cur != nil && (cur.Value == tok.Value || !tok.ExpiresAt.After(cur.ExpiresAt)) {
		return nil
	}
	if tok.ExpiresAt.Sub(now) < c.want.need {
		return nil
	}
	return tok
}

// toFleet shares a token c minted.
func (r *Refresher) toFleet(c *call, cred []byte, tok *Token) {
	r.cfg.Fleet.Put(r.base, cred, c.e.enc, fleet.Token{Value: tok.Value, ExpiresAt: tok.ExpiresAt, ObtainedAt: tok.ObtainedAt})
}

// fleetPaused applies a pause another host of the fleet set for up's
// credential to this host's gate.
func (r *Refresher) fleetPaused(up *upstream, cred []byte) {
	if until, why, ok := r.cfg.Fleet.Paused(r.base, cred); ok && until.After(r.clock.Now()) {
		up.gate.pause(until.Sub(r.clock.Now()), why+" (set by a host of the fleet)")
	}
}
