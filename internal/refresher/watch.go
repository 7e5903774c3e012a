package refresher

import (
	"sync"

	"github.com/tokend/tokend/internal/cache"
)

// watches lets WatchToken streams wait for an entry to change without a
// goroutine or a buffer per event: each wait gets a channel that is closed
// (a broadcast that never blocks the refresher) at the next change.
type watches struct {
	mu      sync.Mutex
	changed map[*cache.Entry]chan struct{}
	count   map[*cache.Entry]int
}

// Watch registers a watcher of e; call the returned func when it stops. A
// watched entry counts as requested, so it is never set aside as idle.
func (r *Refresher) Watch(e *cache.Entry) (stop func()) {
	w := &r.watches
	w.mu.Lock()
	if w.count == nil {
		w.count = make(map[*cache.Entry]int)
	}
	w.count[e]++
	w.mu.Unlock()
	return func() {
		w.mu.Lock()
		if w.count[e]--; w.count[e] <= 0 {
			delete(w.count, e)
		}
		w.mu.Unlock()
	}
}

// Changed returns a channel closed at e's next change: a new token, a
// failure, or its removal. Check the entry after calling it, not before, so
// a change in between is not missed.
func (r *Refresher) Changed(e *cache.Entry) <-chan struct{} {
	w := &r.watches
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.changed == nil {
		w.changed = make(map[*cache.Entry]chan struct{})
	}
	ch := w.changed[e]
	if ch == nil {
		ch = make(chan struct{})
		w.changed[e] = ch
	}
	return ch
}

func (r *Refresher) notify(e *cache.Entry) {
	w := &r.watches
	w.mu.Lock()
	if ch := w.changed[e]; ch != nil {
		close(ch)
		delete(w.changed, e)
	}
	w.mu.Unlock()
}

func (r *Refresher) watched(e *cache.Entry) bool {
	w := &r.watches
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.count[e] > 0
}

// Live reports whether e is still the cache's entry for its key.
func (r *Refresher) Live(e *cache.Entry) bool {
	return r.cache.Get([]byte(e.Enc())) == e
}

// LastError returns the error that last failed e, if e's failures have
// stopped: a watcher ends with it.
func (r *Refresher) LastError(e *cache.Entry) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if it := r.items[e]; it != nil {
		return it.err
	}
	return nil
}
