package refresher

import (
	"bytes"
	"context"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/tokend/tokend/internal/clock"
)

// gate is the one door to the upstream for a credential: a bound on calls in
// flight, a rate limit, and a pause that a 429 imposes on every call, since
// Whop's limits belong to the key, not to one subject.
type gate struct {
	clock clock.Clock
	slots chan struct{}
	rate  *rate.Limiter

	mu          sync.Mutex
	pausedUntil time.Time
	// rejected is the fingerprint of a key Whop answered 401 to. No call is
	// made with that key again: it would only fail, and hammering Whop with
	// a revoked key helps nobody.
	rejected []byte
}

func newGate(c clock.Clock, inFlight int, r rate.Limit, burst int) *gate {
	return &gate{
		clock: c,
		slots: make(chan struct{}, inFlight),
		rate:  rate.NewLimiter(r, burst),
	}
}

// acquire waits for the pause, the rate limit and a free slot, in that
// order, or for ctx. The returned func gives the slot back.
func (g *gate) acquire(ctx context.Context) (release func(), err error) {
	for {
		g.mu.Lock()
		wait := g.pausedUntil.Sub(g.clock.Now())
		g.mu.Unlock()
		if wait <= 0 {
			break
		}
		t := g.clock.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C():
		}
	}
	if err := g.rate.Wait(ctx); err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	select {
	case g.slots <- struct{}{}:
		return func() { <-g.slots }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// pause holds every upstream call until d has passed.
func (g *gate) pause(d time.Duration) {
	until := g.clock.Now().Add(d)
	g.mu.Lock()
	if until.After(g.pausedUntil) {
		g.pausedUntil = until
	}
	g.mu.Unlock()
}

func (g *gate) inFlight() int { return len(g.slots) }

func (g *gate) pausedTill() time.Time {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.pausedUntil
}

// rejectKey marks the key with fingerprint fp as refused by Whop.
func (g *gate) rejectKey(fp []byte) {
	g.mu.Lock()
	g.rejected = fp
	g.mu.Unlock()
}

// isRejected reports whether fp is the key Whop refused.
func (g *gate) isRejected(fp []byte) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.rejected != nil && bytes.Equal(g.rejected, fp)
}
