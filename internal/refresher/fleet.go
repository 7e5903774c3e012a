package refresher

import (
	"context"
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
// token within its waiters' time. Otherwise c gets the fleet's lock for
// the key (nil when another host took it over meanwhile: c mints anyway).
func (r *Refresher) fromFleet(c *call, up *upstream, cred, fp []byte) (tok *Token, lease *fleet.Lease) {
	f := r.cfg.Fleet
	if c.want.cause != "rejected" { // a caller saw the shared token refused
		if t, ok := f.Get(r.base, cred, c.e.enc); ok {
			if tok := r.adoptable(c, t, fp); tok != nil {
				return tok, nil
			}
		}
	}
	lease, held := f.Lock(r.base, cred, c.e.enc)
	if held {
		return nil, lease
	}
	var newer time.Time // during a refresh, Redis still holds the old token
	if cur := c.e.tok.Load(); cur != nil {
		newer = cur.ExpiresAt
	}
	ctx, cancel := r.awaitContext(c)
	t, ok := f.Await(ctx, cred, c.e.enc, newer)
	cancel()
	if ok {
		if tok := r.adoptable(c, t, fp); tok != nil {
			return tok, nil
		}
	}
	// The holder died, failed, or gave a token c cannot use: mint, under
	// the lock if it is free now.
	lease, _ = f.Lock(r.base, cred, c.e.enc)
	return nil, lease
}

// awaitContext bounds a wait for another host's mint like a wait at the
// gate: within the waiters' latest deadline, ended when they all leave.
func (r *Refresher) awaitContext(c *call) (context.Context, context.CancelFunc) {
	if dl, bounded := r.callDeadline(c); bounded {
		return context.WithDeadline(c.queue, dl)
	}
	return context.WithCancel(c.queue)
}

// adoptable is t as this host's token for c's entry, or nil when c cannot
// use it: one already due for refresh, one no newer than the entry's, or
// one shorter than a caller's large min_ttl asked for.
func (r *Refresher) adoptable(c *call, t fleet.Token, fp []byte) *Token {
	now := r.clock.Now()
	tok := &Token{Value: t.Value, ExpiresAt: t.ExpiresAt, ObtainedAt: t.ObtainedAt, Fingerprint: fp}
	if !tok.ExpiresAt.After(now) || !r.refreshTime(tok).After(now) {
		return nil
	}
	if cur := c.e.tok.Load(); cur != nil && (cur.Value == tok.Value || !tok.ExpiresAt.After(cur.ExpiresAt)) {
		return nil
	}
	if c.want.lifetime > r.cfg.Lifetime && tok.ExpiresAt.Sub(now) < c.want.lifetime-time.Minute {
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
