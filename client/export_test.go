package client

import "github.com/tokend/tokend/internal/clock"

// WithClock makes the client schedule touches, idleness, backoff and polls
// with clk, and judge tokens by its time.
func WithClock(clk clock.Clock) Option {
	return func(o *options) { o.clock = clk }
}

// SetToken caches tok in s as if tokend had sent it.
func SetToken(s *TokenSource, tok *Token) { s.set(tok) }

// HasShared reports whether the client's map holds a source for subject
// and scopes.
func (c *Client) HasShared(subject string, scopes ...string) bool {
	req, err := parseSubject(subject)
	if err != nil {
		return false
	}
	req.Scopes = scopes
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.shared[req.key()]
	return ok
}

// Watching counts the sources that the open stream keeps fresh.
func (c *Client) Watching() int {
	c.mux.mu.Lock()
	defer c.mux.mu.Unlock()
	n := 0
	for s := range c.mux.sources {
		if s.w.acked {
			n++
		}
	}
	return n
}

// StreamUp reports whether the client holds an open WatchTokens stream.
func (c *Client) StreamUp() bool {
	c.mux.mu.Lock()
	defer c.mux.mu.Unlock()
	return c.mux.up
}
