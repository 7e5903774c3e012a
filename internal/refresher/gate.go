package refresher

import (
	"bytes"
	"context"
	"errors"
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

	probeMin, probeMax time.Duration

	mu          sync.Mutex
	pausedUntil time.Time
	pauseWhy    string // which hint set pausedUntil
	// lifted is closed when a reload lifts the pause, waking its waiters.
	lifted chan struct{}
	// rejected is the fingerprint of a key Whop answered 401 to. Calls
	// with it are refused until probeAt, when one call (the probe) may try
	// it again: hammering Whop with a revoked key helps nobody, but a key
	// re-enabled at Whop, or a 401 that was Whop's mistake, heals itself.
	rejected []byte
	probeAt  time.Time
	probeGap time.Duration // the wait before the next probe after a 401
	probing  bool
}

func newGate(c clock.Clock, inFlight int, r rate.Limit, burst int, probeMin, probeMax time.Duration) *gate {
	return &gate{
		clock:    c,
		slots:    make(chan struct{}, inFlight),
		rate:     rate.NewLimiter(r, burst),
		probeMin: probeMin,
		probeMax: max(probeMin, probeMax),
		lifted:   make(chan struct{}),
	}
}

// sharedLimit takes one unit of a budget shared with other hosts (the
// fleet's): retryAfter 0 means taken, else wait that long and ask again;
// ok false means it is unavailable and the local limiter applies.
type sharedLimit func(ctx context.Context) (retryAfter time.Duration, ok bool)

// acquire waits for the pause, a free slot and the rate limit (shared, when
// given and available, else local), in that order, or for ctx. The
// returned func gives the slot back.
func (g *gate) acquire(ctx context.Context, shared sharedLimit) (release func(), err error) {
	for {
		release, paused, err := g.acquireOnce(ctx, shared)
		if err != nil || !paused {
			return release, err
		}
		// A 429 came while this call waited for its slot and the rate:
		// it must not go out into the pause. Back to the pause's wait.
	}
}

// acquireOnce is one pass through the pause, the slot and the rate; paused
// reports a pause that began meanwhile (the slot already given back).
func (g *gate) acquireOnce(ctx context.Context, shared sharedLimit) (release func(), paused bool, err error) {
	for {
		g.mu.Lock()
		wait, lifted := g.pausedUntil.Sub(g.clock.Now()), g.lifted
		g.mu.Unlock()
		if wait <= 0 {
			break
		}
		t := g.clock.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, false, ctx.Err()
		case <-t.C():
		case <-lifted:
			t.Stop()
		}
	}
	// The slot first, then the rate: a call queued for a slot holds no
	// reservation of the rate, so calls abandoned in the queue leave the
	// budget as it was (Wait gives back a reservation it cancels).
	select {
	case g.slots <- struct{}{}:
	case <-ctx.Done():
		return nil, false, ctx.Err()
	}
	release = func() { <-g.slots }
	if err := g.waitRate(ctx, shared); err != nil {
		release()
		return nil, false, err
	}
	if until, _ := g.paused(); until.After(g.clock.Now()) {
		release()
		return nil, true, nil
	}
	return release, false, nil
}

// errRateDeadline: the rate limit cannot let the call through before ctx's
// deadline (what x/time/rate's Wait says of its own limit).
var errRateDeadline = errors.New("rate limit: the next slot comes after the deadline")

// waitRate takes one unit of the shared budget, or of the local one while
// the shared one is unavailable.
func (g *gate) waitRate(ctx context.Context, shared sharedLimit) error {
	for shared != nil {
		retry, ok := shared(ctx)
		switch {
		case !ok:
			shared = nil // the local limiter, below
			continue
		case retry == 0:
			return nil
		}
		if dl, has := ctx.Deadline(); has && time.Until(dl) < retry {
			return errRateDeadline
		}
		t := g.clock.NewTimer(retry)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C():
		}
	}
	if err := g.rate.Wait(ctx); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return err
	}
	return nil
}

// pause holds every upstream call until d has passed; why names the hint.
func (g *gate) pause(d time.Duration, why string) {
	until := g.clock.Now().Add(d)
	g.mu.Lock()
	if until.After(g.pausedUntil) {
		g.pausedUntil, g.pauseWhy = until, why
	}
	g.mu.Unlock()
}

// unpause lifts a 429 pause, returning what it was.
func (g *gate) unpause() (until time.Time, why string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	until, why = g.pausedUntil, g.pauseWhy
	g.pausedUntil, g.pauseWhy = time.Time{}, ""
	close(g.lifted)
	g.lifted = make(chan struct{})
	return until, why
}

func (g *gate) inFlight() int { return len(g.slots) }

// paused returns until when calls are held, and why.
func (g *gate) paused() (until time.Time, why string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.pausedUntil, g.pauseWhy
}

// rejectKey marks the key with fingerprint fp as refused by Whop, and
// schedules the next probe with a doubling gap; nil forgets a rejection.
func (g *gate) rejectKey(fp []byte) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if fp == nil {
		g.forgetLocked()
		return
	}
	if !bytes.Equal(g.rejected, fp) {
		g.probeGap = 0
	}
	g.probeGap = min(max(2*g.probeGap, g.probeMin), g.probeMax)
	g.rejected, g.probing = fp, false
	g.probeAt = g.clock.Now().Add(g.probeGap)
}

// admit reports whether a call with fp may go upstream: always for a key
// Whop has not refused, and for a refused one only as the one probe once
// its wait is over. probe is true for that call, which must report with
// probed.
func (g *gate) admit(fp []byte) (ok, probe bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch {
	case g.rejected == nil || !bytes.Equal(g.rejected, fp):
		return true, false
	case g.probing || g.clock.Now().Before(g.probeAt):
		return false, false
	}
	g.probing = true
	return true, true
}

// probed ends a probe: a 401 rejects the key again for a longer gap; an
// answer that says nothing of the key (a network error, 429, 5xx) keeps
// the gap; any other answer means Whop took the key.
func (g *gate) probed(fp []byte, status int) {
	switch {
	case status == 401:
		g.rejectKey(fp)
	case status == 0 || status == 429 || status >= 500:
		g.mu.Lock()
		if bytes.Equal(g.rejected, fp) {
			g.probing = false
			g.probeAt = g.clock.Now().Add(g.probeGap)
		}
		g.mu.Unlock()
	default:
		g.mu.Lock()
		if bytes.Equal(g.rejected, fp) {
			g.forgetLocked()
		}
		g.mu.Unlock()
	}
}

// forgetLocked ends a rejection and its probe schedule.
func (g *gate) forgetLocked() {
	g.rejected, g.probeAt, g.probeGap, g.probing = nil, time.Time{}, 0, false
}

// rejection reports whether fp is the key Whop refused, and when it will
// be probed.
func (g *gate) rejection(fp []byte) (rejected bool, probeAt time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.rejected == nil || !bytes.Equal(g.rejected, fp) {
		return false, time.Time{}
	}
	return true, g.probeAt
}
