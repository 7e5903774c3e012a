// Package audit records who got which token: every mint and the first
// hand-out of each token to each connection at once, further hits on the
// same connection as counts summarised when the connection closes or every
// few minutes. Its volume follows connections and tokens, not the call rate.
//
// Lines carry a short fingerprint of the token, never the token.
package audit

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/tokend/tokend/internal/peercred"
)

// Config configures New.
type Config struct {
	// Logger receives the audit lines. The daemon points it at --audit-log
	// or at stderr (the journal) with logger=audit.
	Logger *slog.Logger
	// SummaryEvery is how often counted hits are written for connections
	// that stay open. Default 5m.
	SummaryEvery time.Duration
}

// Trail is the audit log of one daemon.
type Trail struct {
	log   *slog.Logger
	every time.Duration

	mu    sync.Mutex
	conns map[*Conn]struct{}
}

// New returns a Trail; Run writes its periodic summaries.
func New(cfg Config) *Trail {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.SummaryEvery <= 0 {
		cfg.SummaryEvery = 5 * time.Minute
	}
	return &Trail{log: cfg.Logger, every: cfg.SummaryEvery, conns: make(map[*Conn]struct{})}
}

// Fingerprint is the short, non-reversible name of a token in audit lines.
func Fingerprint(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:6])
}

// Subject describes what a token is for.
type Subject struct {
	KeyID, CompanyID, UserID string
	Scopes                   []string
}

func (s Subject) attrs() []any {
	return []any{"key", s.KeyID, "company_id", s.CompanyID, "user_id", s.UserID, "scopes", strings.Join(s.Scopes, ",")}
}

// Minted records a token obtained from Whop; cause is "miss", "refresh",
// "rejected" or "admin".
func (t *Trail) Minted(s Subject, token, cause string) {
	t.log.Info("mint", append(s.attrs(), "cause", cause, "token_fp", Fingerprint(token))...)
}

// Adopted records that a token another host of the fleet minted came to
// this one (the fingerprint matches that host's mint line).
func (t *Trail) Adopted(s Subject, token, cause string) {
	t.log.Info("adopt", append(s.attrs(), "cause", cause, "token_fp", Fingerprint(token))...)
}

// Conn is the audit state of one client connection.
type Conn struct {
	trail *Trail
	peer  *peercred.Info

	mu     sync.Mutex
	exe    string
	counts map[handout]*tally
}

type handout struct {
	keyID, token string // token only as a map key, never written
}

type tally struct {
	subject Subject
	n       uint64 // hits not yet written
}

// Open starts auditing a connection from peer (nil if unknown).
func (t *Trail) Open(peer *peercred.Info) *Conn {
	c := &Conn{trail: t, peer: peer, counts: make(map[handout]*tally)}
	t.mu.Lock()
	t.conns[c] = struct{}{}
	t.mu.Unlock()
	return c
}

func (c *Conn) callerAttrs() []any {
	if c.peer == nil {
		return []any{"uid", -1}
	}
	if c.exe == "" {
		c.exe = "?"
		if exe, err := c.peer.Exe(); err == nil {
			c.exe = exe
		}
	}
	return []any{"uid", c.peer.UID, "gid", c.peer.GID, "pid", c.peer.PID, "exe", c.exe}
}

// HandedOut records a token given to this connection. The first hand-out of
// a token, and every one that followed a mint, is written at once; other
// hits are counted for the next summary.
func (c *Conn) HandedOut(s Subject, token string, minted bool) {
	h := handout{s.KeyID, token}
	c.mu.Lock()
	defer c.mu.Unlock()
	tl, seen := c.counts[h]
	if seen && !minted {
		tl.n++
		return
	}
	if !seen {
		c.counts[h] = &tally{subject: s}
	}
	source := "hit"
	if minted {
		source = "mint"
	}
	c.trail.log.Info("handout", append(append(c.callerAttrs(), s.attrs()...), "source", source, "token_fp", Fingerprint(token))...)
}

// summarise writes the counted hits and resets them. Tokens not handed out
// since the last summary are forgotten (all of them when closing), so the
// map does not grow with refreshes on a long-lived connection.
func (c *Conn) summarise(closing bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for h, tl := range c.counts {
		if tl.n == 0 || closing {
			if tl.n > 0 {
				c.writeHits(h, tl)
			}
			delete(c.counts, h)
			continue
		}
		c.writeHits(h, tl)
		tl.n = 0
	}
}

func (c *Conn) writeHits(h handout, tl *tally) {
	c.trail.log.Info("hits", append(append(c.callerAttrs(), tl.subject.attrs()...), "source", "hit", "count", tl.n, "token_fp", Fingerprint(h.token))...)
}

// Close writes the connection's remaining counts.
func (c *Conn) Close() {
	c.summarise(true)
	c.trail.mu.Lock()
	delete(c.trail.conns, c)
	c.trail.mu.Unlock()
}

// Run writes summaries of open connections every SummaryEvery until ctx
// ends, then for every connection still open.
func (t *Trail) Run(ctx context.Context) error {
	tick := time.NewTicker(t.every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			t.each(func(c *Conn) { c.summarise(true) })
			return nil
		case <-tick.C:
			t.each(func(c *Conn) { c.summarise(false) })
		}
	}
}

func (t *Trail) each(f func(*Conn)) {
	t.mu.Lock()
	conns := make([]*Conn, 0, len(t.conns))
	for c := range t.conns {
		conns = append(conns, c)
	}
	t.mu.Unlock()
	for _, c := range conns {
		f(c)
	}
}
