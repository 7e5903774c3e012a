package refresher

import (
	"container/heap"
	"context"
	"time"
)

// sched is one credential's schedule: its own heaps, timer and worker
// budget, so one credential's backlog (a restart herd, a rate limit, a 429
// pause) never delays another credential's refreshes. Its fields are
// guarded by Refresher.mu, except wake.
type sched struct {
	up *upstream
	// actions orders entries by next: when to refresh, retry or drop.
	actions entryHeap
	// expiries orders entries with a token by its expiry, so an entry's
	// state turns expired on time and the earliest expiry is known without
	// a scan.
	expiries entryHeap
	// busy counts refreshes running from this schedule; at most workers.
	busy, workers int
	entries       int // entries of this credential
	wake          chan struct{}
	stop          chan struct{} // closed when the credential is removed
	running       bool
}

func newSched(up *upstream, workers int) *sched {
	s := &sched{up: up, workers: workers, wake: make(chan struct{}, 1), stop: make(chan struct{})}
	s.actions = entryHeap{less: func(a, b *entry) bool { return a.next.Before(b.next) }, idx: func(e *entry) *int { return &e.hidx }}
	s.expiries = entryHeap{less: func(a, b *entry) bool { return a.expiresAt.Before(b.expiresAt) }, idx: func(e *entry) *int { return &e.xidx }}
	return s
}

func (s *sched) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// scheduleLocked puts e on its schedule at at, or moves it there.
func (r *Refresher) scheduleLocked(e *entry, at time.Time) {
	if !e.live {
		return
	}
	e.next = at
	s := e.sched
	if e.hidx >= 0 {
		heap.Fix(&s.actions, e.hidx)
	} else {
		heap.Push(&s.actions, e)
	}
	if e.hidx == 0 {
		s.poke()
	}
}

func (r *Refresher) unscheduleLocked(e *entry) {
	if e.hidx >= 0 {
		heap.Remove(&e.sched.actions, e.hidx)
	}
	e.next = time.Time{}
}

// trackExpiryLocked keeps e's place in the expiry heap in step with its
// token.
func (r *Refresher) trackExpiryLocked(e *entry, now time.Time) {
	s := e.sched
	t := e.tok.Load()
	if t == nil || !e.live || !t.ExpiresAt.After(now) {
		if e.xidx >= 0 {
			heap.Remove(&s.expiries, e.xidx)
		}
		return
	}
	e.expiresAt = t.ExpiresAt
	if e.xidx >= 0 {
		heap.Fix(&s.expiries, e.xidx)
	} else {
		heap.Push(&s.expiries, e)
	}
	if e.xidx == 0 {
		s.poke()
	}
}

// earliestExpiryLocked is the soonest expiry of s's valid tokens.
func (s *sched) earliestExpiryLocked() time.Time {
	if len(s.expiries.es) == 0 {
		return time.Time{}
	}
	return s.expiries.es[0].expiresAt
}

// maxProtectedLook bounds protectedExpiryLocked's walk of the heap.
const maxProtectedLook = 64

// protectedExpiryLocked is the soonest expiry among s's tokens that a
// refresh would save: idle entries and ones that failed for good are let
// expire. It walks the expiry heap in order (a frontier of the heap's
// children), at most maxProtectedLook entries; past that it answers the
// heap's top, which errs on the side of a shorter pause.
func (s *sched) protectedExpiryLocked() time.Time {
	es := s.expiries.es
	if len(es) == 0 {
		return time.Time{}
	}
	frontier := []int{0}
	for look := 0; len(frontier) > 0; look++ {
		if look == maxProtectedLook {
			return es[0].expiresAt
		}
		best := 0 // the frontier's soonest
		for i := range frontier {
			if es[frontier[i]].expiresAt.Before(es[frontier[best]].expiresAt) {
				best = i
			}
		}
		n := frontier[best]
		frontier = append(frontier[:best], frontier[best+1:]...)
		if e := es[n]; e.state != StateIdle && e.fail != failPermanent {
			return e.expiresAt
		}
		for _, c := range []int{2*n + 1, 2*n + 2} {
			if c < len(es) {
				frontier = append(frontier, c)
			}
		}
	}
	return time.Time{}
}

// run drives s until ctx ends or its credential is removed. It sleeps on
// one timer until the next due action or expiry, and hands due actions to
// at most s.workers goroutines; a due action waits for a free worker of
// its own credential only.
func (r *Refresher) run(ctx context.Context, s *sched) {
	timer := r.clock.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		now := r.clock.Now()
		var due []*entry
		var lags []time.Duration
		r.mu.Lock()
		for len(s.expiries.es) > 0 && !s.expiries.es[0].expiresAt.After(now) {
			e := heap.Pop(&s.expiries).(*entry)
			r.settleLocked(e, now)
		}
		for s.busy < s.workers && len(s.actions.es) > 0 && !s.actions.es[0].next.After(now) {
			e := heap.Pop(&s.actions).(*entry)
			lags = append(lags, now.Sub(e.next))
			e.next = time.Time{}
			s.busy++
			due = append(due, e)
		}
		var nextAt time.Time
		if s.busy < s.workers && len(s.actions.es) > 0 {
			nextAt = s.actions.es[0].next
		}
		if x := s.earliestExpiryLocked(); !x.IsZero() && (nextAt.IsZero() || x.Before(nextAt)) {
			nextAt = x
		}
		r.mu.Unlock()
		if o := r.cfg.Observer; o != nil {
			for _, d := range lags {
				o.RefreshLag(s.up.Name, d)
			}
		}
		for _, e := range due {
			go func() {
				r.act(e)
				r.mu.Lock()
				s.busy--
				r.mu.Unlock()
				s.poke()
			}()
		}
		if len(due) > 0 {
			continue // time has moved while we handed work out
		}
		wait := time.Hour
		if !nextAt.IsZero() {
			if wait = nextAt.Sub(r.clock.Now()); wait <= 0 {
				continue // the clock passed it while we looked
			}
		}
		timer.Reset(wait)
		if !nextAt.IsZero() && !nextAt.After(r.clock.Now()) {
			continue // the clock passed it while we armed the timer
		}
		select {
		case <-ctx.Done():
			return
		case <-s.stop:
			return
		case <-timer.C():
		case <-s.wake:
		}
	}
}

// entryHeap is a min-heap of entries that keeps each entry's position in
// it, so an entry can be moved or removed in O(log n).
type entryHeap struct {
	es   []*entry
	less func(a, b *entry) bool
	idx  func(*entry) *int
}

func (h *entryHeap) Len() int           { return len(h.es) }
func (h *entryHeap) Less(i, j int) bool { return h.less(h.es[i], h.es[j]) }
func (h *entryHeap) Swap(i, j int) {
	h.es[i], h.es[j] = h.es[j], h.es[i]
	*h.idx(h.es[i]) = i
	*h.idx(h.es[j]) = j
}
func (h *entryHeap) Push(x any) {
	e := x.(*entry)
	*h.idx(e) = len(h.es)
	h.es = append(h.es, e)
}
func (h *entryHeap) Pop() any {
	n := len(h.es)
	e := h.es[n-1]
	h.es[n-1] = nil
	*h.idx(e) = -1
	h.es = h.es[:n-1]
	return e
}
