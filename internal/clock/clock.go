// Package clock provides the time source that tokend's schedulers use, so
// that tests can drive lifetimes of hours with a fake clock instead of
// sleeping.
package clock

import (
	"sort"
	"sync"
	"time"
)

// Clock is the part of package time that tokend schedules with.
type Clock interface {
	Now() time.Time
	// NewTimer behaves like time.NewTimer.
	NewTimer(d time.Duration) Timer
}

// Timer is the part of *time.Timer that tokend uses.
type Timer interface {
	C() <-chan time.Time
	// Reset behaves like (*time.Timer).Reset on a Go 1.23+ timer: no drain needed.
	Reset(d time.Duration)
	Stop() bool
}

// Real is the system clock.
type Real struct{}

func (Real) Now() time.Time { return time.Now() }

func (Real) NewTimer(d time.Duration) Timer { return realTimer{time.NewTimer(d)} }

type realTimer struct{ t *time.Timer }

func (r realTimer) C() <-chan time.Time   { return r.t.C }
func (r realTimer) Reset(d time.Duration) { r.t.Reset(d) }
func (r realTimer) Stop() bool            { return r.t.Stop() }

// Fake is a manually advanced clock for tests. Timers fire when Advance moves
// the clock past their deadline.
type Fake struct {
	mu      sync.Mutex
	now     time.Time
	timers  []*fakeTimer
	changed chan struct{} // closed and replaced whenever a timer is armed
}

// NewFake returns a fake clock set to start.
func NewFake(start time.Time) *Fake {
	return &Fake{now: start, changed: make(chan struct{})}
}

func (f *Fake) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *Fake) NewTimer(d time.Duration) Timer {
	f.mu.Lock()
	defer f.mu.Unlock()
	t := &fakeTimer{f: f, c: make(chan time.Time, 1)}
	f.armLocked(t, d)
	return t
}

func (f *Fake) armLocked(t *fakeTimer, d time.Duration) {
	t.when = f.now.Add(d)
	if d <= 0 { // like time.Timer: already due, fires at once
		if t.armed {
			f.removeLocked(t)
		}
		select {
		case t.c <- f.now:
		default:
		}
		return
	}
	if !t.armed {
		t.armed = true
		f.timers = append(f.timers, t)
	}
	close(f.changed)
	f.changed = make(chan struct{})
}

// Advance moves the clock forward by d, firing every timer that falls due in
// deadline order.
func (f *Fake) Advance(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.now = f.now.Add(d)
	sort.Slice(f.timers, func(i, j int) bool { return f.timers[i].when.Before(f.timers[j].when) })
	kept := f.timers[:0]
	for _, t := range f.timers {
		if t.when.After(f.now) {
			kept = append(kept, t)
			continue
		}
		t.armed = false
		select {
		case t.c <- f.now:
		default:
		}
	}
	f.timers = kept
}

// Timers reports how many timers are armed.
func (f *Fake) Timers() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.timers)
}

// Armed returns a channel that is closed the next time a timer is armed or
// re-armed, so a test can wait for the code under test to schedule.
func (f *Fake) Armed() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.changed
}

type fakeTimer struct {
	f     *Fake
	c     chan time.Time
	when  time.Time
	armed bool
}

func (t *fakeTimer) C() <-chan time.Time { return t.c }

func (t *fakeTimer) Reset(d time.Duration) {
	t.f.mu.Lock()
	defer t.f.mu.Unlock()
	select { // Go 1.23 semantics: a Reset timer never delivers a stale value.
	case <-t.c:
	default:
	}
	t.f.armLocked(t, d)
}

func (t *fakeTimer) Stop() bool {
	t.f.mu.Lock()
	defer t.f.mu.Unlock()
	was := t.armed
	if was {
		t.f.removeLocked(t)
	}
	return was
}

func (f *Fake) removeLocked(t *fakeTimer) {
	t.armed = false
	for i, x := range f.timers {
		if x == t {
			f.timers = append(f.timers[:i], f.timers[i+1:]...)
			return
		}
	}
}
