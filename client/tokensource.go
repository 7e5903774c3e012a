package client

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/sync/singleflight"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// DefaultMargin is how much validity a TokenSource's cached token must have
// left to be handed out, unless the Request sets MinTTL (then MinTTL is the
// margin). It is under tokend's default min_ttl of one minute, so a token
// fresh from tokend always clears it.
const DefaultMargin = 30 * time.Second

// Timing of the watcher.
const (
	// reconnectBase and reconnectMax bound the jittered, doubling wait
	// before reopening a broken WatchToken stream.
	reconnectBase = 250 * time.Millisecond
	reconnectMax  = 30 * time.Second
	// reprobeWatch is how long a source polls before trying WatchToken
	// again after tokend answered Unimplemented (an older tokend).
	reprobeWatch = 5 * time.Minute
	// minPoll keeps polling ahead of expiry from spinning when the token
	// is close to the margin.
	minPoll = 250 * time.Millisecond
)

// TokenSource hands out one subject's token from memory and keeps it fresh
// in the background. It satisfies oauth2.TokenSource and is safe for
// concurrent use: callers that find the cache stale share one GetToken.
//
// On first use it starts a watcher that holds a WatchToken stream open, so
// it has each replacement the moment tokend obtains it. If the stream
// breaks it reconnects with backoff, and meanwhile (or for good, against a
// tokend without WatchToken) polls GetToken ahead of expiry. Close stops
// the watcher; so does closing the Client.
//
// oauth2.NewClient wraps a source in oauth2.ReuseTokenSource, which keeps a
// token until 10s before it expires: still valid, but for every request to
// carry the newest token use &http.Client{Transport: &oauth2.Transport{Source: ts}}.
type TokenSource struct {
	c      *Client
	req    Request
	margin time.Duration
	sf     singleflight.Group

	// ctx ends the watcher and any GetToken the source started.
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // closed when the watcher returns

	mu      sync.Mutex
	cur     *Token
	gotAt   time.Time
	started bool
	closed  bool
}

// NewTokenSource returns a source for req that the caller owns: Close it
// when done, or it runs until the Client closes. The source keeps its own
// copy of req.
func (c *Client) NewTokenSource(req Request) *TokenSource {
	req.Scopes = append([]string(nil), req.Scopes...)
	margin := DefaultMargin
	if req.MinTTL > 0 {
		margin = req.MinTTL
	}
	ctx, cancel := context.WithCancel(c.ctx)
	return &TokenSource{c: c, req: req, margin: margin, ctx: ctx, cancel: cancel, done: make(chan struct{})}
}

// TokenSource returns the client's source for subject and scopes with
// tokend's default min TTL, for oauth2.NewClient or [PerRPCCredentials].
// The subject is "biz_..." (a company), "user_..." (a user) or
// "biz_.../user_..." (a user within a company); for any other subject the
// source's Token returns an error saying so.
//
// Calls with the same subject and scope set return one shared source, so
// calling TokenSource per request costs nothing extra; it stops when the
// Client closes. Use [Client.NewTokenSource] for a source you Close.
func (c *Client) TokenSource(subject string, scopes ...string) oauth2.TokenSource {
	req, err := parseSubject(subject)
	if err != nil {
		return errSource{err}
	}
	req.Scopes = scopes
	k := req.key()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errSource{ErrClosed}
	}
	s, ok := c.shared[k]
	if !ok {
		s = c.NewTokenSource(req)
		c.shared[k] = s
	}
	return sharedSource{s}
}

func parseSubject(subject string) (Request, error) {
	company, user, both := strings.Cut(subject, "/")
	switch {
	case both && strings.HasPrefix(company, "biz_") && len(company) > 4 && strings.HasPrefix(user, "user_") && len(user) > 5 && !strings.Contains(user, "/"):
		return Request{CompanyID: company, UserID: user}, nil
	case !both && strings.HasPrefix(subject, "biz_") && len(subject) > 4:
		return Request{CompanyID: subject}, nil
	case !both && strings.HasPrefix(subject, "user_") && len(subject) > 5:
		return Request{UserID: subject}, nil
	}
	return Request{}, fmt.Errorf("tokend: subject %q: want a company (biz_...), a user (user_...) or a user within a company (biz_.../user_...)", subject)
}

// Token returns the cached token while it has more than the margin left,
// else gets one from tokend (waiting at most the client's timeout).
func (s *TokenSource) Token() (*oauth2.Token, error) {
	return s.TokenContext(context.Background())
}

// TokenContext is Token, waiting no longer than ctx allows. A GetToken it
// started goes on for the next caller when ctx ends.
func (s *TokenSource) TokenContext(ctx context.Context) (*oauth2.Token, error) {
	s.mu.Lock()
	if s.closed || s.ctx.Err() != nil { // closed, or its Client is
		s.mu.Unlock()
		return nil, ErrClosed
	}
	if !s.started {
		s.start()
	}
	tok := s.cur
	s.mu.Unlock()
	if s.usable(tok, time.Now()) {
		return oauthToken(tok), nil
	}
	ch := s.sf.DoChan("", func() (any, error) {
		// The watcher or a poll may have just installed a fresh one.
		if tok := s.current(); s.usable(tok, time.Now()) {
			return tok, nil
		}
		return s.fetch()
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return nil, r.Err
		}
		return oauthToken(r.Val.(*Token)), nil
	case <-ctx.Done():
		return nil, fmt.Errorf("tokend: wait for token for %s: %w", s.req, context.Cause(ctx))
	}
}

// Close stops the watcher and waits for it. Token then returns ErrClosed,
// as it does once the Client is closed.
func (s *TokenSource) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	started := s.started
	s.mu.Unlock()
	s.cancel()
	if started {
		<-s.done
	}
	return nil
}

func oauthToken(t *Token) *oauth2.Token {
	return &oauth2.Token{AccessToken: t.Value, TokenType: "Bearer", Expiry: t.ExpiresAt}
}

func (s *TokenSource) usable(t *Token, now time.Time) bool {
	return t != nil && t.ExpiresAt.Sub(now) > s.margin
}

func (s *TokenSource) current() *Token {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur
}

// fetch makes one GetToken and caches its answer. Callers go through s.sf.
func (s *TokenSource) fetch() (*Token, error) {
	ctx, cancel := context.WithTimeout(s.ctx, s.c.timeout)
	defer cancel()
	tok, err := s.c.Token(ctx, s.req)
	if err != nil {
		return nil, err
	}
	s.set(tok)
	return tok, nil
}

// set caches t, and when it arrived, unless a token that lasts longer is
// already cached: a poll's answer can arrive after the stream's newer one.
func (s *TokenSource) set(t *Token) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur != nil && t.ExpiresAt.Before(s.cur.ExpiresAt) {
		return
	}
	if s.cur == nil || s.cur.Value != t.Value {
		s.c.log.Debug("tokend: new token", "request", s.req.String(), "key_id", t.KeyID, "expires_at", t.ExpiresAt)
	}
	s.cur, s.gotAt = t, time.Now()
}

// start runs the watcher unless the client is closing. Called with s.mu held.
func (s *TokenSource) start() {
	s.started = true
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	if s.c.closed {
		close(s.done)
		return
	}
	s.c.sources.Add(1)
	go func() {
		defer s.c.sources.Done()
		defer close(s.done)
		s.run(s.ctx)
	}()
}

// run keeps a WatchToken stream open and, whenever it is not, polls
// GetToken ahead of expiry until it is time to reconnect.
func (s *TokenSource) run(ctx context.Context) {
	log := s.c.log.With("request", s.req.String())
	failures, unimplemented := 0, false
	for ctx.Err() == nil {
		got, err := s.watch(ctx)
		if ctx.Err() != nil {
			return
		}
		if got {
			failures = 0
		}
		var wait time.Duration
		switch code := status.Code(err); {
		case code == codes.Unimplemented:
			if !unimplemented {
				log.Info("tokend: WatchToken unimplemented by this tokend; polling GetToken ahead of expiry instead")
				unimplemented = true
			}
			wait = reprobeWatch
		case code == codes.Aborted:
			// Evicted: a new stream makes a new entry.
			failures++
			wait = backoffDelay(failures)
			log.Debug("tokend: watched entry was evicted; watching again", "in", wait)
		default:
			failures++
			wait = backoffDelay(failures)
			log.Warn("tokend: token watch ended; polling until it reconnects", "code", code.String(), "err", status.Convert(err).Message(), "reconnect_in", wait)
		}
		s.pollUntil(ctx, time.Now().Add(wait))
	}
}

// watch reads one WatchToken stream into the cache until it ends, and says
// whether it delivered a token.
func (s *TokenSource) watch(ctx context.Context) (got bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := s.c.tokens.WatchToken(ctx, s.req.proto())
	if err != nil {
		return false, err
	}
	for {
		p, err := st.Recv()
		if err != nil {
			return got, err
		}
		if p.GetToken() == "" {
			continue
		}
		got = true
		s.set(fromProto(p))
	}
}

// pollUntil keeps the cached token fresh with GetToken until the time
// comes to try watching again.
func (s *TokenSource) pollUntil(ctx context.Context, until time.Time) {
	failures := 0
	for {
		now := time.Now()
		at := s.nextPoll(now)
		if failures > 0 {
			at = now.Add(backoffDelay(failures))
		}
		if !at.Before(until) {
			sleep(ctx, until.Sub(now))
			return
		}
		if !sleep(ctx, at.Sub(now)) {
			return
		}
		ch := s.sf.DoChan("", func() (any, error) { return s.fetch() })
		select {
		case r := <-ch:
			if r.Err != nil {
				failures++
				s.c.log.Debug("tokend: poll failed", "request", s.req.String(), "err", r.Err)
			} else {
				failures = 0
			}
		case <-ctx.Done():
			return
		}
	}
}

// nextPoll is halfway through what was left of the token when it last
// arrived
// (tokend refreshes at about two thirds of a lifetime, so the second poll
// usually finds the replacement), and no later than when the token stops
// clearing the margin.
func (s *TokenSource) nextPoll(now time.Time) time.Time {
	s.mu.Lock()
	tok, gotAt := s.cur, s.gotAt
	s.mu.Unlock()
	if tok == nil {
		return now
	}
	at := gotAt.Add(tok.ExpiresAt.Sub(gotAt) / 2)
	if limit := tok.ExpiresAt.Add(-s.margin); at.After(limit) {
		at = limit
	}
	if earliest := now.Add(minPoll); at.Before(earliest) {
		at = earliest
	}
	return at
}

// backoffDelay is the wait after n consecutive failures: doubling from
// reconnectBase up to reconnectMax, with the upper half jittered.
func backoffDelay(n int) time.Duration {
	d := reconnectBase
	for i := 1; i < n && d < reconnectMax; i++ {
		d *= 2
	}
	d = min(d, reconnectMax)
	return d/2 + rand.N(d/2+1)
}

// sleep waits d or until ctx ends, and says whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// sharedSource is what Client.TokenSource hands out: the shared source
// without its Close, which would stop it for every other holder.
type sharedSource struct{ s *TokenSource }

func (x sharedSource) Token() (*oauth2.Token, error) { return x.s.Token() }

func (x sharedSource) TokenContext(ctx context.Context) (*oauth2.Token, error) {
	return x.s.TokenContext(ctx)
}

// errSource is a TokenSource that can only fail, for a subject that does
// not parse: the mistake surfaces at the first Token call.
type errSource struct{ err error }

func (e errSource) Token() (*oauth2.Token, error) { return nil, e.err }
