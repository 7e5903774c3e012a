package fleet

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// breaker stops calls to Redis after threshold failures in a row and lets
// them through again once a background probe succeeds. Callers never wait
// for the probe: while the breaker is open they get an answer at once.
//
// It is hand-written rather than sony/gobreaker: gobreaker reopens by
// letting a caller's request through after a fixed timeout (half-open), so
// a caller would pay a Redis timeout to find Redis still down; here only the
// probe ever waits on a Redis that is down, and its interval backs off.
type breaker struct {
	threshold int32
	minWait   time.Duration // first probe delay, doubled per failed probe
	maxWait   time.Duration
	timeout   time.Duration // per probe
	probe     func(context.Context) error
	log       *slog.Logger

	open  atomic.Bool
	fails atomic.Int32

	ctx    context.Context // ends on stop
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	since  time.Time // of the current state
	reason string    // last failure while open
	trips  uint64
}

func newBreaker(threshold int, minWait, maxWait, timeout time.Duration, probe func(context.Context) error, log *slog.Logger) *breaker {
	ctx, cancel := context.WithCancel(context.Background())
	return &breaker{
		threshold: int32(threshold), minWait: minWait, maxWait: maxWait, timeout: timeout,
		probe: probe, log: log, ctx: ctx, cancel: cancel, since: time.Now(),
	}
}

// allow reports whether a call may go to Redis.
func (b *breaker) allow() bool { return !b.open.Load() }

func (b *breaker) success() {
	if b.fails.Load() != 0 {
		b.fails.Store(0)
	}
}

func (b *breaker) failure(err error) {
	if b.fails.Add(1) >= b.threshold {
		b.trip(err)
	}
}

// trip opens the breaker (once) and starts the probe.
func (b *breaker) trip(err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.open.Load() || b.ctx.Err() != nil {
		return
	}
	b.open.Store(true)
	b.since = time.Now()
	b.reason = err.Error()
	b.trips++
	b.log.Warn("fleet: redis unavailable, this host carries on alone until it answers again",
		"reason", b.reason, "consecutive_failures", b.fails.Load())
	b.wg.Add(1)
	go b.probeLoop()
}

func (b *breaker) probeLoop() {
	defer b.wg.Done()
	wait := b.minWait
	t := time.NewTimer(jitter(wait))
	defer t.Stop()
	for {
		select {
		case <-b.ctx.Done():
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(b.ctx, b.timeout)
		err := b.probe(ctx)
		cancel()
		if err == nil {
			b.close()
			return
		}
		b.mu.Lock()
		b.reason = err.Error()
		b.mu.Unlock()
		wait = min(2*wait, b.maxWait)
		t.Reset(jitter(wait))
	}
}

func (b *breaker) close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	down := time.Since(b.since)
	b.since = time.Now()
	b.reason = ""
	b.fails.Store(0)
	b.open.Store(false)
	b.log.Info("fleet: redis answers again, sharing tokens with the fleet", "down_for", down.Round(time.Millisecond))
}

// state is a snapshot for Status.
func (b *breaker) state() (connected bool, since time.Time, reason string, trips uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return !b.open.Load(), b.since, b.reason, b.trips
}

// stop ends the probe and waits for it.
func (b *breaker) stop() {
	b.cancel()
	b.wg.Wait()
}

// jitter spreads d over ±20% so that a fleet's probes do not arrive together.
func jitter(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
}
