package refresher

// Watcher follows one entry: every token installed on it, and its end.
// The refresher calls notify (outside its lock; it must not block) after
// each change, and the consumer then calls Next. A Watcher does not keep
// its entry in use: Touch does, as a request would.
type Watcher struct {
	r      *Refresher
	e      *entry
	notify func()
	last   *Token // the last token Next returned; the consumer's
}

// Update is what Next found: a new token, or the end of the watch.
type Update struct {
	Token *Token
	KeyID string
	// Err is set when the watch has ended: ErrEvicted, or the failure a
	// retry cannot fix that took the entry down.
	Err error
}

// Watch follows the entry that holds k's token now (a Get made it).
// It fails with ErrEvicted when there is none.
func (r *Refresher) Watch(k Key, notify func()) (*Watcher, error) {
	enc := string(k.encode())
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.index[enc]
	if e == nil {
		return nil, ErrEvicted
	}
	w := &Watcher{r: r, e: e, notify: notify}
	if e.watchers == nil {
		e.watchers = make(map[*Watcher]struct{})
	}
	e.watchers[w] = struct{}{}
	return w, nil
}

// Next returns what changed since the last call: a token not returned
// before, or the end of the watch; ok is false when nothing did.
func (w *Watcher) Next() (u Update, ok bool) {
	w.r.mu.Lock()
	defer w.r.mu.Unlock()
	e := w.e
	if !e.live {
		u.Err = ErrEvicted
		if e.fail == failPermanent && e.err != nil {
			u.Err = e.err
		}
		return u, true
	}
	if t := e.tok.Load(); t != nil && t != w.last {
		w.last = t
		return Update{Token: t, KeyID: e.id}, true
	}
	return Update{}, false
}

// Touch counts as a request for the watched key: it keeps the entry from
// being set aside as idle, and brings an idle one back.
func (w *Watcher) Touch() {
	w.e.touch(w.r.clock.Now())
	if w.e.idle.Load() && w.e.idle.CompareAndSwap(true, false) {
		w.r.revive(w.e)
	}
}

// Stop ends the watch. It is safe to call more than once.
func (w *Watcher) Stop() {
	w.r.mu.Lock()
	delete(w.e.watchers, w)
	w.r.mu.Unlock()
}

// watchersLocked returns e's watchers, for notifyAll after unlocking.
func (r *Refresher) watchersLocked(e *entry) []*Watcher {
	if len(e.watchers) == 0 {
		return nil
	}
	out := make([]*Watcher, 0, len(e.watchers))
	for w := range e.watchers {
		out = append(out, w)
	}
	return out
}

func notifyAll(ws []*Watcher) {
	for _, w := range ws {
		w.notify()
	}
}
