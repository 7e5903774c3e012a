package client

import (
	"context"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// Timing of the watch.
const (
	// touchEvery is how often the client tells tokend which watched tokens
	// were asked for, and lets sources nobody called go idle.
	touchEvery = time.Minute
	// reconnectBase and reconnectMax bound the jittered, doubling wait
	// before reopening a broken WatchTokens stream, and before subscribing
	// again to a key whose entry was evicted.
	reconnectBase = 250 * time.Millisecond
	reconnectMax  = 30 * time.Second
	// resubscribeBase and resubscribeMax bound the wait after tokend ended
	// a subscription with an error (a denial, a failing upstream): it seldom
	// clears at once, and GetToken reports it to callers meanwhile.
	resubscribeBase = time.Second
	resubscribeMax  = 5 * time.Minute
	// reprobeWatch is how long the client polls before trying WatchTokens
	// again after tokend answered Unimplemented (an older tokend).
	reprobeWatch = 5 * time.Minute
	// minPoll keeps polling ahead of expiry from spinning when the token
	// is close to the margin.
	minPoll = 250 * time.Millisecond
	// maxPolls bounds the background GetTokens in flight, so that a sweep
	// leaves the connection's streams to the application's own calls.
	maxPolls = 8
	// maxTouchIDs keeps a touch well under tokend's 16 KiB request limit.
	maxTouchIDs = 1000
)

// mux keeps every active source of a Client fresh: a subscription on the
// client's one WatchTokens stream while it is up, else a GetToken ahead of
// expiry. run is the stream's only writer; read, one per stream, its
// reader; short-lived pollers make the background GetTokens.
type mux struct {
	c     *Client
	wake  chan struct{}  // buffered: run has something to look at
	ended chan streamEnd // from read, when the stream ends

	// Owned by run.
	failures      int       // streams in a row that broke without an answer
	reconnectAt   time.Time // no stream is opened before then
	unimplemented bool      // tokend said so; logged once

	mu      sync.Mutex
	started bool // run is running
	closed  bool
	sources map[*TokenSource]struct{} // active: called within idleAfter
	subs    map[uint64]*TokenSource   // subscriptions on the open stream
	up      bool                      // a stream is open
	nextID  uint64
	toSub   []*TokenSource                 // to subscribe once the stream is up
	outbox  []*tokendv1.WatchTokensRequest // unsubscribes to send
	due     time.Time                      // when run must sweep next; zero: never
	pollQ   []*TokenSource
	polls   int // pollers running
}

// watchState is what the mux knows of one source. The zero value is an
// inactive source.
type watchState struct {
	id      uint64    // its subscription on the open stream; 0: none
	acked   bool      // a token arrived on it: the stream keeps the source fresh
	queued  bool      // in mux.toSub
	retryAt time.Time // after tokend ended its subscription: subscribe again then
	ends    int       // subscriptions ended in a row without a token
	touched int64     // lastUsed when the last touch named it

	polling      bool      // in mux.pollQ or being polled
	polled       time.Time // when the last background GetToken ended
	pollFailures int
	pollRetry    time.Time // after a failed poll: the next one
}

type streamEnd struct {
	err error
	got bool // the stream delivered an answer before it ended
}

type watchStream struct {
	ws     tokendv1.TokenService_WatchTokensClient
	cancel context.CancelFunc
	broken bool // a Send failed: read reports why
}

func (m *mux) init(c *Client) {
	m.c = c
	m.wake = make(chan struct{}, 1)
	m.ended = make(chan streamEnd)
	m.sources = make(map[*TokenSource]struct{})
	m.subs = make(map[uint64]*TokenSource)
}

func (m *mux) kick() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// close stops new goroutines from starting; the client's context ends the
// running ones.
func (m *mux) close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
}

// activate starts keeping s fresh, on its first Token call or the first
// after it went idle.
func (m *mux) activate(s *TokenSource) {
	if s.key != "" {
		m.c.rejoin(s)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed || s.closed.Load() || s.active.Load() {
		return
	}
	s.active.Store(true)
	m.sources[s] = struct{}{}
	s.w = watchState{touched: s.lastUsed.Load()} // subscribing counts as a request
	m.queueLocked(s)
	if !m.up { // no subscription will answer soon: poll if its token needs it
		m.visitLocked(s, m.c.clock.Now())
		m.startPollersLocked()
	}
	if !m.started {
		m.started = true
		m.c.wg.Add(1)
		go m.run()
	}
	m.kick()
}

// deactivate stops keeping s fresh: it was closed.
func (m *mux) deactivate(s *TokenSource) {
	m.mu.Lock()
	m.deactivateLocked(s)
	m.mu.Unlock()
	m.kick()
}

func (m *mux) deactivateLocked(s *TokenSource) {
	if _, ok := m.sources[s]; !ok {
		return
	}
	delete(m.sources, s)
	if id := s.w.id; id != 0 {
		delete(m.subs, id)
		m.outbox = append(m.outbox, &tokendv1.WatchTokensRequest{Op: &tokendv1.WatchTokensRequest_Unsubscribe{Unsubscribe: id}})
	}
	s.w = watchState{}
	s.active.Store(false)
}

// fetched schedules the next poll of s after a GetToken filled it, in case
// the stream does not keep it fresh.
func (m *mux) fetched(s *TokenSource) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.sources[s]; ok && !s.w.acked {
		m.visitLocked(s, m.c.clock.Now())
		m.startPollersLocked()
		m.kick()
	}
}

func (m *mux) queueLocked(s *TokenSource) {
	if !s.w.queued && s.w.id == 0 {
		s.w.queued = true
		m.toSub = append(m.toSub, s)
	}
}

func (m *mux) lowerDueLocked(t time.Time) {
	if m.due.IsZero() || t.Before(m.due) {
		m.due = t
	}
}

// visitLocked does what is due for s, subscribing again or queueing a
// poll, and moves m.due no later than its next step.
func (m *mux) visitLocked(s *TokenSource, now time.Time) {
	w := &s.w
	if !w.retryAt.IsZero() {
		if now.Before(w.retryAt) {
			m.lowerDueLocked(w.retryAt)
		} else {
			w.retryAt = time.Time{}
			m.queueLocked(s)
		}
	}
	if w.acked || w.polling {
		return
	}
	early, late, ok := s.pollWindow()
	switch {
	case !ok:
	case now.Before(early):
		m.lowerDueLocked(late)
	default:
		w.polling = true
		m.pollQ = append(m.pollQ, s)
	}
}

// run opens the stream while any source is active, sends what the sources
// need, touches, and sweeps for polls, until the client closes.
func (m *mux) run() {
	defer m.c.wg.Done()
	ctx, clk := m.c.ctx, m.c.clock
	timer := clk.NewTimer(touchEvery)
	defer timer.Stop()
	var st *watchStream
	nextTouch := clk.Now().Add(touchEvery)
	for {
		now := clk.Now()
		if st == nil && !now.Before(m.reconnectAt) && m.wanted() {
			st = m.connect(ctx, now)
		}
		if !now.Before(nextTouch) {
			m.touch(st)
			m.dropIdle(now)
			if nextTouch = nextTouch.Add(touchEvery); nextTouch.Before(now) { // asleep for a while
				nextTouch = now.Add(touchEvery)
			}
		}
		next := nextTouch
		if due := m.sweep(now); !due.IsZero() && due.Before(next) {
			next = due
		}
		if st != nil { // last: what the steps above queued goes out now
			m.flush(st)
		}
		if st == nil && m.reconnectAt.After(now) && m.reconnectAt.Before(next) {
			next = m.reconnectAt
		}
		timer.Reset(next.Sub(now))
		select {
		case <-ctx.Done():
			if st != nil {
				st.cancel()
			}
			return
		case <-m.wake:
		case <-timer.C():
		case e := <-m.ended:
			st.cancel()
			st = nil
			now := clk.Now()
			m.lost(now)
			m.reconnectAt = m.retryAfter(e, now)
		}
	}
}

func (m *mux) wanted() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.sources) > 0
}

// connect opens a stream and queues a subscription for every active source.
func (m *mux) connect(ctx context.Context, now time.Time) *watchStream {
	sctx, cancel := context.WithCancel(ctx)
	ws, err := m.c.tokens.WatchTokens(sctx)
	if err != nil {
		cancel()
		m.reconnectAt = m.retryAfter(streamEnd{err: err}, now)
		return nil
	}
	st := &watchStream{ws: ws, cancel: cancel}
	m.mu.Lock()
	m.up = true
	for s := range m.sources {
		m.queueLocked(s)
	}
	m.mu.Unlock()
	m.c.wg.Add(1)
	go m.read(st)
	return st
}

// retryAfter says when to open a stream again after one ended with e.
func (m *mux) retryAfter(e streamEnd, now time.Time) time.Time {
	if e.got {
		m.failures, m.unimplemented = 0, false
	}
	if m.c.ctx.Err() != nil {
		return now
	}
	code := status.Code(e.err)
	if code == codes.Unimplemented {
		if !m.unimplemented {
			m.c.log.Info("tokend: WatchTokens unimplemented by this tokend; polling GetToken ahead of expiry instead", "retry_in", reprobeWatch)
			m.unimplemented = true
		}
		return now.Add(reprobeWatch)
	}
	m.failures++
	wait := jittered(m.failures, reconnectBase, reconnectMax)
	m.c.log.Warn("tokend: token watch stream ended; polling until it reconnects", "code", code.String(), "err", status.Convert(e.err).Message(), "reconnect_in", wait)
	return now.Add(wait)
}

// lost forgets the subscriptions of a stream that ended: every source is
// polled until the next stream answers for it.
func (m *mux) lost(now time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.up = false
	clear(m.subs)
	m.toSub, m.outbox = nil, nil
	for s := range m.sources {
		w := &s.w
		w.id, w.acked, w.queued, w.retryAt, w.ends = 0, false, false, time.Time{}, 0
	}
	m.lowerDueLocked(now)
}

// flush sends the queued unsubscribes and subscribes.
func (m *mux) flush(st *watchStream) {
	if st.broken {
		return
	}
	m.mu.Lock()
	msgs := m.outbox
	m.outbox = nil
	for _, s := range m.toSub {
		s.w.queued = false
		if _, ok := m.sources[s]; !ok || s.w.id != 0 || !s.w.retryAt.IsZero() {
			continue
		}
		m.nextID++
		s.w.id = m.nextID
		m.subs[s.w.id] = s
		msgs = append(msgs, &tokendv1.WatchTokensRequest{Op: &tokendv1.WatchTokensRequest_Subscribe{
			Subscribe: &tokendv1.WatchSubscribe{Id: s.w.id, Request: s.preq},
		}})
	}
	m.toSub = nil
	m.mu.Unlock()
	m.send(st, msgs)
}

// send writes msgs in order; a failed Send stops the stream's writes.
func (m *mux) send(st *watchStream, msgs []*tokendv1.WatchTokensRequest) {
	for _, msg := range msgs {
		if st.broken {
			return
		}
		if err := st.ws.Send(msg); err != nil {
			st.broken = true
		}
	}
}

// touch tells tokend which subscribed tokens were asked for since the last
// touch, which counts as a request for each.
func (m *mux) touch(st *watchStream) {
	if st == nil || st.broken {
		return
	}
	var ids []uint64
	m.mu.Lock()
	for s := range m.sources {
		if u := s.lastUsed.Load(); s.w.id != 0 && u != s.w.touched {
			s.w.touched = u
			ids = append(ids, s.w.id)
		}
	}
	m.mu.Unlock()
	var msgs []*tokendv1.WatchTokensRequest
	for chunk := range slices.Chunk(ids, maxTouchIDs) {
		msgs = append(msgs, &tokendv1.WatchTokensRequest{Op: &tokendv1.WatchTokensRequest_Touch{Touch: &tokendv1.WatchTouch{Ids: chunk}}})
	}
	m.send(st, msgs)
}

// dropIdle deactivates the sources not called for idleAfter, and removes
// the shared ones from the client's map.
func (m *mux) dropIdle(now time.Time) {
	cutoff := m.c.since(now) - int64(m.c.idleAfter)
	var shared []*TokenSource
	m.mu.Lock()
	for s := range m.sources {
		if s.lastUsed.Load() > cutoff {
			continue
		}
		m.c.log.Debug("tokend: token source idle; no longer watched", "request", s.req.String())
		m.deactivateLocked(s)
		if s.key != "" {
			shared = append(shared, s)
		}
	}
	m.mu.Unlock()
	if len(shared) > 0 {
		m.c.forget(shared)
	}
}

// sweep visits every source once m.due has come, and returns the next due
// time.
func (m *mux) sweep(now time.Time) time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.due.IsZero() || now.Before(m.due) {
		return m.due
	}
	m.due = time.Time{}
	for s := range m.sources {
		m.visitLocked(s, now)
	}
	m.startPollersLocked()
	return m.due
}

func (m *mux) startPollersLocked() {
	for !m.closed && m.polls < maxPolls && m.polls < len(m.pollQ) {
		m.polls++
		m.c.wg.Add(1)
		go m.poller()
	}
}

// poller makes the queued background GetTokens, one at a time.
func (m *mux) poller() {
	defer m.c.wg.Done()
	for {
		m.mu.Lock()
		if len(m.pollQ) == 0 || m.c.ctx.Err() != nil {
			m.polls--
			m.mu.Unlock()
			return
		}
		s := m.pollQ[0]
		m.pollQ[0] = nil // the backing array must not keep a dropped source alive
		m.pollQ = m.pollQ[1:]
		m.mu.Unlock()
		if !s.active.Load() {
			continue
		}
		_, err, _ := s.sf.Do("", func() (any, error) { return s.fetch() })
		now := m.c.clock.Now()
		m.mu.Lock()
		if _, ok := m.sources[s]; ok {
			w := &s.w
			w.polling, w.polled = false, now
			if err != nil {
				w.pollFailures++
				w.pollRetry = now.Add(jittered(w.pollFailures, reconnectBase, reconnectMax))
				m.c.log.Debug("tokend: poll failed", "request", s.req.String(), "err", err)
			} else {
				w.pollFailures = 0
			}
			m.visitLocked(s, now)
		}
		m.mu.Unlock()
		m.kick()
	}
}

// read delivers a stream's answers to their sources until it ends.
func (m *mux) read(st *watchStream) {
	defer m.c.wg.Done()
	got := false
	for {
		r, err := st.ws.Recv()
		if err != nil {
			select {
			case m.ended <- streamEnd{err: err, got: got}:
			case <-m.c.ctx.Done():
			}
			return
		}
		got = true
		m.deliver(r)
	}
}

// deliver hands a subscription's token to its source, or ends the
// subscription and schedules the next one.
func (m *mux) deliver(r *tokendv1.WatchTokensResponse) {
	now := m.c.clock.Now()
	m.mu.Lock()
	s := m.subs[r.GetId()]
	if s == nil { // unsubscribed meanwhile
		m.mu.Unlock()
		return
	}
	if r.GetEndCode() == 0 {
		p := r.GetToken()
		if p.GetToken() == "" {
			m.mu.Unlock()
			return
		}
		s.w.acked, s.w.ends = true, 0
		m.mu.Unlock()
		s.set(fromProto(p))
		return
	}
	delete(m.subs, r.GetId())
	w := &s.w
	w.id, w.acked = 0, false
	w.ends++
	code := codes.Code(r.GetEndCode())
	var wait time.Duration
	if code == codes.Aborted { // evicted: a new subscription makes a new entry
		wait = jittered(w.ends, reconnectBase, reconnectMax)
		m.c.log.Debug("tokend: watched entry was evicted; watching again", "request", s.req.String(), "in", wait)
	} else {
		wait = jittered(w.ends, resubscribeBase, resubscribeMax)
		m.c.log.Warn("tokend: token watch ended; fetching on demand until it resumes", "request", s.req.String(), "code", code.String(), "err", r.GetEndMessage(), "retry_in", wait)
	}
	w.retryAt = now.Add(wait)
	m.visitLocked(s, now)
	m.startPollersLocked()
	m.mu.Unlock()
	m.kick()
}
