package refresher

import (
	"errors"
	"fmt"
	"time"

	"github.com/tokend/tokend/internal/whop"
)

// want is what a call is for.
type want struct {
	lifetime time.Duration
	// cause says why, for OnMint and metrics.
	cause string
}

// call is one upstream call for one entry instance. Its waiters share its
// outcome; tok and err are written once, before done is closed. Removing
// the entry detaches the call: it still answers its waiters, but installs
// nothing, so a new entry for the same key starts its own.
type call struct {
	e    *entry
	want want
	done chan struct{}
	tok  *Token
	err  error
}

// startCallLocked attaches a new call to e and starts it.
func (r *Refresher) startCallLocked(e *entry, w want, now time.Time) *call {
	c := &call{e: e, want: w, done: make(chan struct{})}
	e.call = c
	r.settleLocked(e, now)
	go r.runCall(c)
	return c
}

// outcome is how a call ended.
type outcome struct {
	tok *Token
	err error
	fp  []byte // the secret the call used
	// notTried: no request reached Whop (the credential is locked out, or
	// tokend is stopping). It is no failure of the entry's.
	notTried bool
}

// runCall makes c's upstream call and records its outcome.
func (r *Refresher) runCall(c *call) {
	up := c.e.sched.up
	k := c.e.key
	fp := up.Fetcher.KeyFingerprint()
	if up.gate.isRejected(fp) {
		r.finish(c, outcome{err: ErrKeyRejected, fp: fp, notTried: true})
		return
	}
	waitStart := time.Now()
	release, err := up.gate.acquire(r.base)
	if err != nil {
		r.finish(c, outcome{err: fmt.Errorf("waiting for the upstream limiter: %w", err), fp: fp, notTried: true})
		return
	}
	if waited := time.Since(waitStart); waited > time.Millisecond && r.cfg.Observer != nil {
		r.cfg.Observer.LimiterWait(waited)
	}
	start := r.clock.Now()
	r.upstreamCalls.Add(1)
	up.calls.Add(1)
	callStart := time.Now()
	req := whop.Request{CompanyID: k.CompanyID, UserID: k.UserID, ScopedActions: k.Scopes, ExpiresAt: start.Add(c.want.lifetime)}
	if up.OAuthUser {
		req.CompanyID, req.UserID = "", "" // the token names its user
	}
	at, err := up.Fetcher.CreateAccessToken(r.base, req)
	release()
	stopping := err != nil && r.base.Err() != nil
	if o := r.cfg.Observer; o != nil && !stopping {
		st := 200
		var we *whop.Error
		if errors.As(err, &we) {
			st = we.StatusCode
		} else if err != nil {
			st = 0
		}
		o.Upstream(st, time.Since(callStart))
		o.Minted(c.want.cause, err == nil)
	}
	switch {
	case stopping:
		r.finish(c, outcome{err: err, fp: fp, notTried: true})
	case err != nil:
		up.errors.Add(1)
		r.finish(c, outcome{err: err, fp: fp})
	default:
		r.finish(c, outcome{tok: &Token{Value: at.Token, ExpiresAt: at.ExpiresAt, ObtainedAt: start, Fingerprint: fp}, fp: fp})
	}
}

// finish applies o to c's entry, if c is still its entry's call, and
// answers c's waiters. Logging, the gate, watchers and OnMint come after
// the lock.
func (r *Refresher) finish(c *call, o outcome) {
	e := c.e
	up := e.sched.up
	now := r.clock.Now()
	var info ErrorInfo
	var we *whop.Error
	rejected := false
	if o.err != nil && !o.notTried {
		info = errorInfo(now, o.err)
		r.upstreamErrors.Add(1)
		r.lastError.Store(&info)
		// Before any waiter is answered: a caller that got the 401 or the
		// 429 and asks again at once must find the gate closed.
		if errors.As(o.err, &we) && we.StatusCode == 429 && we.RetryAfter > 0 {
			up.gate.pause(min(we.RetryAfter, maxRetryAfter))
		}
		if rejected = errors.As(o.err, &we) && we.StatusCode == 401; rejected {
			up.gate.rejectKey(o.fp)
		}
	}
	var notify []*Watcher
	var retryIn time.Duration
	r.mu.Lock()
	attached := e.call == c && e.live
	if attached {
		e.call = nil
		switch {
		case o.tok != nil:
			r.installLocked(e, o.tok, now)
			notify = r.watchersLocked(e)
		case o.notTried:
			r.retryLaterLocked(e, now)
			r.settleLocked(e, now)
		default:
			retryIn = r.failedLocked(e, o.err, &info, o.fp, now)
		}
	}
	c.tok, c.err = o.tok, o.err
	close(c.done)
	r.mu.Unlock()

	notifyAll(notify)
	if o.err != nil && !o.notTried {
		if rejected {
			r.log.Error("Whop rejected a credential (401); no upstream call with it until it is reloaded or tokend restarts", "credential", up.Name, "err", info.Message)
		}
		r.log.Warn("upstream refresh failed", "key", e.id, "subject", e.key.Subject(), "status", info.Status, "retryable", info.Retryable, "retry_in", retryIn.Round(time.Millisecond), "err", info.Message)
	}
	if o.tok != nil && r.cfg.OnMint != nil {
		r.cfg.OnMint(Mint{Key: e.key, KeyID: e.id, Token: o.tok, Cause: c.want.cause})
	}
}

// installLocked makes t e's token and schedules its refresh.
func (r *Refresher) installLocked(e *entry, t *Token, now time.Time) {
	e.tok.Store(t)
	e.idle.Store(false)
	e.fail, e.err, e.errUntil, e.errKey, e.bo = failNone, nil, time.Time{}, nil, nil
	e.refreshes++
	e.failures = 0
	r.trackExpiryLocked(e, now)
	r.scheduleLocked(e, r.refreshTime(t))
	r.settleLocked(e, now)
	r.store.Put(e.enc, e.record())
}

// failedLocked records a failed call on e and decides when to try again.
// It returns how long callers get the error without a new call.
func (r *Refresher) failedLocked(e *entry, err error, info *ErrorInfo, fp []byte, now time.Time) time.Duration {
	e.err, e.errKey, e.lastErr = err, fp, info
	e.failures++
	t := e.tok.Load()
	if info.Retryable {
		e.fail = failRetryable
		if e.bo == nil {
			e.bo = r.newBackoff()
		}
		e.errUntil = now.Add(max(e.bo.NextBackOff(), min(whop.RetryAfterOf(err), maxRetryAfter)))
		if t != nil {
			// Keep retrying in the background while a token exists to
			// protect; a cold key is retried by its next caller.
			r.scheduleLocked(e, e.errUntil)
		}
	} else {
		e.fail = failPermanent
		e.errUntil = now.Add(r.cfg.NegativeTTL)
		if t != nil {
			// Nothing will fix it by retrying: keep serving the token we
			// have and drop the entry when it expires (now, if it has).
			r.scheduleLocked(e, maxTime(t.ExpiresAt, now))
		}
	}
	if t == nil {
		// Forget a key that never worked once nobody has asked for a while.
		r.scheduleLocked(e, now.Add(max(r.cfg.NegativeTTL, r.cfg.RetryMax)))
	} else {
		r.store.Put(e.enc, e.record())
	}
	r.settleLocked(e, now)
	return e.errUntil.Sub(now)
}

// retryLaterLocked keeps e on the schedule when a call could not even be
// tried: it is looked at again after the longest backoff, or dropped once
// its token expires.
func (r *Refresher) retryLaterLocked(e *entry, now time.Time) {
	if e.hidx >= 0 {
		return
	}
	at := now.Add(r.cfg.RetryMax)
	if t := e.tok.Load(); t != nil && t.ExpiresAt.Before(at) {
		at = t.ExpiresAt
	}
	r.scheduleLocked(e, at)
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
