package client

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/sync/singleflight"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// DefaultMargin is how much validity a TokenSource's cached token must have
// left to be handed out, unless the Request sets MinTTL (then MinTTL is the
// margin). It is under tokend's default min_ttl of one minute, so a token
// fresh from tokend always clears it.
const DefaultMargin = 30 * time.Second

// DefaultIdleAfter is how long a TokenSource goes uncalled before it stops
// watching its token: tokend's default token lifetime.
const DefaultIdleAfter = time.Hour

// TokenSource hands out one subject's token from memory and keeps it fresh
// in the background. It satisfies oauth2.TokenSource and is safe for
// concurrent use: callers that find the cache stale share one GetToken.
//
// On first use it subscribes to its token on the Client's one WatchTokens
// stream, so it has each replacement the moment tokend obtains it. While
// the stream is down (or for good, against a tokend without WatchTokens)
// the Client refreshes it with GetToken ahead of expiry instead.
//
// A source watches only while it is used: once a minute the Client tells
// tokend which tokens were asked for, and a source not called for the
// client's idle time ([WithIdleAfter], default an hour) stops watching, so
// tokend lets the token go idle too. It keeps its last token; its next
// Token call answers from it if it is still good and watches again. A
// shared source from [Client.TokenSource] that goes idle also leaves the
// client, so a later TokenSource call may return a new one. Close stops an
// owned source for good; so does closing the Client.
//
// oauth2.NewClient wraps a source in oauth2.ReuseTokenSource, which keeps a
// token until 10s before it expires: still valid, but for every request to
// carry the newest token use &http.Client{Transport: &oauth2.Transport{Source: ts}}.
type TokenSource struct {
	c      *Client
	req    Request
	preq   *tokendv1.GetTokenRequest // req, for subscriptions; read-only
	margin time.Duration
	key    string // in c.shared under this key; "" for an owned source
	sf     singleflight.Group

	// ctx ends any GetToken the source started: c.ctx for a shared source,
	// which has no Close, a child of it for an owned one.
	ctx    context.Context
	cancel context.CancelFunc

	cur      atomic.Pointer[held]
	lastUsed atomic.Int64 // when Token was last called, as c.since
	active   atomic.Bool  // in c.mux.sources: watched or polled
	closed   atomic.Bool

	w watchState // guarded by c.mux.mu
}

// held is a token as the source cached it.
type held struct {
	tok   *Token
	gotAt time.Time
}

// NewTokenSource returns a source for req that the caller owns: Close it
// when done, or it lasts until the Client closes. The source keeps its own
// copy of req.
func (c *Client) NewTokenSource(req Request) *TokenSource {
	s := c.newSource(req, "")
	s.ctx, s.cancel = context.WithCancel(c.ctx)
	return s
}

func (c *Client) newSource(req Request, key string) *TokenSource {
	req.Scopes = append([]string(nil), req.Scopes...)
	margin := DefaultMargin
	if req.MinTTL > 0 {
		margin = req.MinTTL
	}
	return &TokenSource{c: c, req: req, preq: req.proto(), margin: margin, key: key, ctx: c.ctx, cancel: func() {}}
}

// TokenSource returns the client's source for subject and scopes with
// tokend's default min TTL, for oauth2.NewClient or [PerRPCCredentials].
// The subject is "biz_..." (a company), "user_..." (a user) or
// "biz_.../user_..." (a user within a company); for any other subject the
// source's Token returns an error saying so.
//
// Calls with the same subject and scope set return one shared source, so
// calling TokenSource per request costs nothing extra; it stops when the
// Client closes, and leaves the client when idle (see [TokenSource]). Use
// [Client.NewTokenSource] for a source you Close.
func (c *Client) TokenSource(subject string, scopes ...string) oauth2.TokenSource {
	req, err := parseSubject(subject)
	if err != nil {
		return errSource{err}
	}
	req.Scopes = scopes
	k := req.key()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() {
		return errSource{ErrClosed}
	}
	s, ok := c.shared[k]
	if !ok {
		s = c.newSource(req, k)
		c.shared[k] = s
	}
	return sharedSource{s}
}

// rejoin puts a shared source that went idle back in the client's map,
// unless another source took its place meanwhile.
func (c *Client) rejoin(s *TokenSource) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.shared[s.key]; !ok && !c.closed.Load() {
		c.shared[s.key] = s
	}
}

// forget drops shared sources that went idle from the client's map.
func (c *Client) forget(sources []*TokenSource) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range sources {
		if c.shared[s.key] == s && !s.active.Load() {
			delete(c.shared, s.key)
		}
	}
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
	if s.closed.Load() || s.c.closed.Load() {
		return nil, ErrClosed
	}
	now := s.c.clock.Now()
	s.used(now)
	if !s.active.Load() {
		s.c.mux.activate(s)
	}
	if h := s.cur.Load(); s.usable(h, now) {
		return oauthToken(h.tok), nil
	}
	ch := s.sf.DoChan("", func() (any, error) {
		// The stream or a poll may have just installed a fresh one.
		if h := s.cur.Load(); s.usable(h, s.c.clock.Now()) {
			return h.tok, nil
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

// Close stops watching the token and ends a GetToken the source started.
// Token then returns ErrClosed, as it does once the Client is closed.
func (s *TokenSource) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	s.c.mux.deactivate(s)
	s.cancel()
	return nil
}

func oauthToken(t *Token) *oauth2.Token {
	return &oauth2.Token{AccessToken: t.Value, TokenType: "Bearer", Expiry: t.ExpiresAt}
}

// used records a Token call for the idle rule. It stores at most once a
// second: on a source many goroutines call, stores are what make their
// cores fight over the cache line, and idleness is counted in minutes.
func (s *TokenSource) used(now time.Time) {
	if t := s.c.since(now); t-s.lastUsed.Load() >= int64(time.Second) {
		s.lastUsed.Store(t)
	}
}

func (s *TokenSource) usable(h *held, now time.Time) bool {
	return h != nil && h.tok.ExpiresAt.Sub(now) > s.margin
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
	s.c.mux.fetched(s)
	return tok, nil
}

// set caches t, and when it arrived, unless a token that lasts longer is
// already cached: a poll's answer can arrive after the stream's newer one.
func (s *TokenSource) set(t *Token) {
	h := &held{tok: t, gotAt: s.c.clock.Now()}
	for {
		old := s.cur.Load()
		if old != nil && t.ExpiresAt.Before(old.tok.ExpiresAt) {
			return
		}
		if s.cur.CompareAndSwap(old, h) {
			if old == nil || old.tok.Value != t.Value {
				s.c.log.Debug("tokend: new token", "request", s.req.String(), "key_id", t.KeyID, "expires_at", t.ExpiresAt)
			}
			return
		}
	}
}

// pollWindow says when the background should next call GetToken for s: from
// early to late. late is halfway through what was left of the token when it
// last arrived (tokend refreshes at about two thirds of a lifetime, so the
// second poll usually finds the replacement) and no later than when the
// token stops clearing the margin; early is a tenth of the wait before it,
// so one sweep serves the sources falling due together. ok is false when
// there is no token to keep fresh: callers then fetch one on demand.
// Called with c.mux.mu held.
func (s *TokenSource) pollWindow() (early, late time.Time, ok bool) {
	h := s.cur.Load()
	if h == nil {
		return time.Time{}, time.Time{}, false
	}
	if s.w.pollFailures > 0 {
		return s.w.pollRetry, s.w.pollRetry, true
	}
	base := h.gotAt
	if s.w.polled.After(base) { // a poll whose answer was not kept
		base = s.w.polled
	}
	late = base.Add(h.tok.ExpiresAt.Sub(base) / 2)
	if limit := h.tok.ExpiresAt.Add(-s.margin); late.After(limit) {
		late = limit
	}
	if earliest := base.Add(minPoll); late.Before(earliest) {
		late = earliest
	}
	return late.Add(-late.Sub(base) / 10), late, true
}

// jittered is the wait after n consecutive failures: doubling from base up
// to ceiling, with the upper half jittered.
func jittered(n int, base, ceiling time.Duration) time.Duration {
	d := base
	for i := 1; i < n && d < ceiling; i++ {
		d *= 2
	}
	d = min(d, ceiling)
	return d/2 + rand.N(d/2+1)
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
