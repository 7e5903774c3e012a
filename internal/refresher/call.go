package refresher

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/tokend/tokend/internal/whop"
)

// want is what a call is for.
type want struct {
	lifetime time.Duration
	// need is how long the token must stay valid for the caller who
	// started the call (min_ttl and the expiry margin): a token another
	// host minted is adopted only if it lasts that long.
	need time.Duration
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

	// by names who started the call (e.g. "uid 1000"), for status.
	by string
	// cred is the credential's fingerprint for the fleet, nil without one;
	// computed once per call (runCall), as the secret may rotate.
	cred []byte
	// retries is how many in-call retries the call may make: none for an
	// entry already failing, whose schedule's backoff paces the calls of
	// a known outage; in-call retries are for a fault that is news.
	retries int
	// sent: the gate let the call through; it is not abandoned any more.
	// Guarded by Refresher.mu.
	sent bool
	// queue ends when the last waiter of a call made for callers leaves:
	// a call still queued at the gate then leaves the queue instead of
	// spending the credential's budget on a token nobody waits for.
	// Scheduled refreshes have no waiters to lose; their queue is r.base.
	queue  context.Context
	cancel context.CancelFunc

	// Guarded by Refresher.mu. A call with waiters retries within itself
	// until the last of their deadlines (none: unbounded); a scheduled
	// refresh nobody waits for does not, its schedule's backoff does.
	waiters   int
	deadline  time.Time
	unbounded bool
}

// startCallLocked attaches a new call to e and starts it; by is who asked
// ("" for tokend's own schedule).
func (r *Refresher) startCallLocked(e *entry, w want, now time.Time, by string) *call {
	c := &call{e: e, want: w, done: make(chan struct{}), by: by, queue: r.base, cancel: func() {}, retries: r.cfg.InCallRetries}
	if e.failures > 0 {
		c.retries = 0
	}
	if w.cause != causeRefresh {
		c.queue, c.cancel = context.WithCancel(r.base)
	}
	e.call = c
	r.settleLocked(e, now)
	go r.runCall(c)
	return c
}

// causeRefresh is the want.cause of tokend's own scheduled refreshes.
const causeRefresh = "refresh"

// joinLocked counts a caller waiting on c until ctx ends.
func (c *call) joinLocked(ctx context.Context) {
	c.waiters++
	if dl, ok := ctx.Deadline(); !ok {
		c.unbounded = true
	} else if dl.After(c.deadline) {
		c.deadline = dl
	}
}

// leaveLocked is a waiter giving up before c is done. The last one takes
// c out of the gate's queue; a request already sent still completes, and
// its token serves the next caller (who joins it).
func (c *call) leaveLocked() {
	if c.waiters--; c.waiters == 0 && !c.sent {
		c.cancel()
	}
}

// budget is how long c may still spend on retries; ok is false when nobody
// waits for it.
func (r *Refresher) budget(c *call) (left time.Duration, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case c.waiters == 0:
		return 0, false
	case c.unbounded:
		return time.Duration(1<<63 - 1), true
	}
	return time.Until(c.deadline), true
}

// outcome is how a call ended.
type outcome struct {
	tok *Token
	err error
	fp  []byte // the secret the call used
	// notTried: no request reached Whop (the credential is locked out, or
	// tokend is stopping). It is no failure of the entry's.
	notTried bool
	// adopted: tok came from the fleet, minted by another host.
	adopted bool
}

// In-call retries follow Whop's SDKs: two more attempts, waiting 0.5 s
// doubling up to 8 s, less up to a quarter at random, unless Whop says how
// long (a hint of up to a minute; a longer one is the gate's pause).
const (
	retryBase    = 500 * time.Millisecond
	retryCap     = 8 * time.Second
	maxRetryHint = time.Minute
)

// WhopDefaultLifetime is what Whop grants when no expires_at is asked.
const WhopDefaultLifetime = time.Hour

// An answer's token must stay valid at least half of what was asked, up to
// minUsableLife: less means an expiry already past or a clock far off, and
// installing it would replace a good token with a useless one.
const minUsableLife = time.Minute

// expiryLeeway is how much later than asked an expires_at may be before it
// is cut to what was asked: Whop's clock, rounding and latency.
const expiryLeeway = 5 * time.Second

// lifetimeMargin keeps the lifetime asked under Whop's maximum as Whop's
// clock sees it: a request that takes a while, or a Whop clock a little
// ahead, would otherwise turn --token-lifetime 3h into a 400.
const lifetimeMargin = time.Minute

// runCall makes c's upstream call, retrying as the SDKs do while a waiter
// still waits, and records the outcome.
func (r *Refresher) runCall(c *call) {
	up := c.e.sched.up
	fp := up.Fetcher.KeyFingerprint()
	ok, probe := up.gate.admit(fp)
	if !ok {
		r.finish(c, outcome{err: ErrKeyRejected, fp: fp, notTried: true})
		return
	}
	c.cred = r.fleetCred(up)
	cred := c.cred
	if cred != nil {
		tok, lease, err := r.fromFleet(c, cred, fp)
		if err != nil || tok != nil {
			o := outcome{err: err, fp: fp, notTried: true}
			if tok != nil {
				// Another host minted with the same key: the probe of
				// a key Whop once refused succeeded.
				r.fleetAdopted.Add(1)
				o = outcome{tok: tok, fp: fp, adopted: true}
			}
			if probe {
				// A wait that ended first leaves the probe to come, not
				// stuck: status 0 is "nothing learnt".
				up.gate.probed(fp, 0)
			}
			r.finish(c, o)
			return
		}
		// After the Put below: a waiter that sees the lock gone sees the
		// token too.
		defer lease.Release()
		// The lease lives while this call does (renewal stops before the
		// release): a call held at the gate or between retries must not
		// lose the key to another host.
		defer lease.KeepAlive()()
	}
	lifetime := min(c.want.lifetime, MaxLifetime-lifetimeMargin)
	var o outcome
	status := 0
	for attempt := 0; ; attempt++ {
		next, st, tried := r.attempt(c, up, fp, lifetime, attempt)
		if !tried && attempt > 0 && r.base.Err() == nil {
			// A retry the limiter could not fit in the waiters' time:
			// they get Whop's last answer, not the limiter's.
			break
		}
		o, status = next, st
		if !tried || o.err == nil || r.base.Err() != nil {
			break
		}
		var we *whop.Error
		if errors.As(o.err, &we) && we.ExpiresAtRefused() && lifetime != 0 {
			// Whop's clock judged the lifetime too long: take its default
			// rather than fail the key.
			r.log.Warn("Whop refused the token lifetime asked; asking for its default (1h) instead", "credential", up.Name, "lifetime", lifetime, "err", we.Message, "clock_skew", up.skew().Round(time.Millisecond))
			lifetime = 0
			attempt--
			continue
		}
		// A 401 locked the key out, whatever x-should-retry said.
		if attempt >= c.retries || !whop.IsRetryable(o.err) || status == 401 {
			break
		}
		wait := retryWait(we, attempt)
		if until, _ := up.gate.paused(); until.After(r.clock.Now()) {
			wait = max(wait, until.Sub(r.clock.Now()))
		}
		if left, ok := r.budget(c); !ok || wait >= left {
			break
		}
		t := r.clock.NewTimer(wait)
		select {
		case <-t.C():
		case <-c.queue.Done(): // tokend stopping, or every caller gone
			t.Stop()
		}
	}
	if probe {
		up.gate.probed(fp, status)
	}
	if cred != nil && o.tok != nil {
		r.toFleet(c, cred, o.tok)
	}
	r.finish(c, o)
}

// retryWait is the wait before in-call retry attempt+1: Whop's hint when it
// gave a short one, else the SDKs' jittered exponential backoff.
func retryWait(we *whop.Error, attempt int) time.Duration {
	if we != nil && we.RetryAfter > 0 && we.RetryAfter <= maxRetryHint {
		return we.RetryAfter
	}
	d := min(retryBase<<attempt, retryCap)
	return d - time.Duration(rand.Int64N(int64(d)/4+1))
}

// through takes c through up's gate. A call made for callers waits only
// within the latest of their deadlines (a caller joining with a later one
// extends it) and leaves the queue when they have all gone, so abandoned
// misses never spend the credential's budget; tokend's own refreshes wait
// as long as it runs.
func (r *Refresher) through(c *call, up *upstream) (release func(), err error) {
	up.queued(c.by, 1)
	defer up.queued(c.by, -1)
	var shared sharedLimit
	if cred := c.cred; cred != nil {
		shared = func(ctx context.Context) (time.Duration, bool) {
			return r.cfg.Fleet.Allow(ctx, cred, float64(r.cfg.Rate), r.cfg.Burst)
		}
	}
	for {
		ctx, cancel := c.queue, context.CancelFunc(func() {})
		dl, bounded := r.callDeadline(c)
		if bounded {
			ctx, cancel = context.WithDeadline(c.queue, dl)
		}
		release, err = up.gate.acquire(ctx, shared)
		cancel()
		if err == nil && !r.sendLocked(c) {
			release() // the last caller left as the gate let the call through
			err = errAbandoned
		}
		switch {
		case err == nil:
			return release, nil
		case errors.Is(err, errAbandoned):
			r.abandoned.Add(1)
			return nil, errAbandoned
		case r.base.Err() != nil:
			return nil, fmt.Errorf("waiting for the upstream limiter: %w", err)
		case c.queue.Err() != nil:
			r.abandoned.Add(1)
			return nil, errAbandoned
		}
		if next, ok := r.callDeadline(c); !bounded || (ok && !next.After(dl)) || (!ok && !r.waited(c)) {
			be := &BusyError{Credential: up.Name}
			be.Queued, be.QueuedBy = up.queueStats()
			return nil, be
		}
	}
}

// sendLocked marks c as sent once the gate let it through, unless it is a
// call for callers and they have all left: then it must not be sent.
func (r *Refresher) sendLocked(c *call) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if c.want.cause != causeRefresh && c.waiters == 0 {
		return false
	}
	if !c.sent {
		c.sent = true
		r.running++
	}
	return true
}

// waited reports whether c still has waiters (one without a deadline
// joined: c may wait on).
func (r *Refresher) waited(c *call) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return c.waiters > 0
}

// callDeadline is the latest deadline of c's waiters; bounded is false for
// tokend's own refreshes and when a waiter set none.
func (r *Refresher) callDeadline(c *call) (dl time.Time, bounded bool) {
	if c.want.cause == causeRefresh {
		return time.Time{}, false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return c.deadline, c.waiters > 0 && !c.unbounded
}

// attempt makes one request through the gate. tried is false when no
// request was made (tokend is stopping, or the waiters' deadlines would
// pass before a pause ends); status is Whop's HTTP status, 0 for none.
func (r *Refresher) attempt(c *call, up *upstream, fp []byte, lifetime time.Duration, n int) (o outcome, status int, tried bool) {
	k := c.e.key
	if c.cred != nil {
		r.fleetPaused(up, c.cred) // another host's 429, before judging the pause
	}
	if n == 0 {
		// A first call held by a 429 pause that outlasts every waiter
		// fails now, saying why, instead of at the waiters' deadlines.
		if until, why := up.gate.paused(); until.After(r.clock.Now()) {
			if left, ok := r.budget(c); ok && left < until.Sub(r.clock.Now()) {
				return outcome{err: &PausedError{Credential: up.Name, Until: until, Why: why}, fp: fp, notTried: true}, 0, false
			}
		}
	}
	waitStart := time.Now()
	release, err := r.through(c, up)
	if err != nil {
		return outcome{err: err, fp: fp, notTried: true}, 0, false
	}
	if waited := time.Since(waitStart); waited > time.Millisecond && r.cfg.Observer != nil {
		r.cfg.Observer.LimiterWait(waited)
	}
	start := r.clock.Now()
	skew := up.skew()
	r.upstreamCalls.Add(1)
	up.calls.Add(1)
	callStart := time.Now()
	req := whop.Request{CompanyID: k.CompanyID, UserID: k.UserID, ScopedActions: k.Scopes}
	if lifetime > 0 {
		// On Whop's clock, so that Whop grants exactly the lifetime asked.
		req.ExpiresAt = start.Add(skew + lifetime)
	}
	if up.OAuthUser {
		req.CompanyID, req.UserID = "", "" // the token names its user
	}
	at, err := up.Fetcher.CreateAccessToken(r.base, req)
	release()
	end := r.clock.Now()
	stopping := err != nil && r.base.Err() != nil
	var exp time.Time
	var we *whop.Error
	switch {
	case err == nil:
		status = 200
		up.observeDate(at.ServerDate, start, end, r.log)
		// Judged on this host's clock: Whop's expiry less the skew measured.
		if exp, err = r.checkExpiry(up, k, at.ExpiresAt.Add(-up.skew()), start, end, lifetime); err != nil {
			err = &whop.Error{StatusCode: status, Message: err.Error(), ServerDate: at.ServerDate}
		}
	case errors.As(err, &we):
		status = we.StatusCode
		up.observeDate(we.ServerDate, start, end, r.log)
		r.upstreamRefused(up, we, fp, c.cred)
	}
	if o := r.cfg.Observer; o != nil && !stopping {
		o.Upstream(status, time.Since(callStart))
		o.Minted(c.want.cause, err == nil)
	}
	switch {
	case stopping:
		return outcome{err: err, fp: fp, notTried: true}, status, false
	case err != nil:
		return outcome{err: err, fp: fp}, status, true
	}
	return outcome{tok: &Token{Value: at.Token, ExpiresAt: exp, ObtainedAt: start, Fingerprint: fp}, fp: fp}, status, true
}

// checkExpiry judges a token's expiry (on this host's clock) against the
// lifetime asked at start: too short is an unusable answer, the token in
// hand staying in place; later than asked is cut to what was asked, since
// Whop issues no more and a schedule years out would never refresh it.
func (r *Refresher) checkExpiry(up *upstream, k Key, exp, start, end time.Time, lifetime time.Duration) (time.Time, error) {
	asked := lifetime
	if asked == 0 {
		asked = WhopDefaultLifetime
	}
	if left, need := exp.Sub(end), min(asked/2, minUsableLife); left < need {
		return exp, fmt.Errorf("unusable answer: expires_at %s leaves %v of the %v asked on this host's clock (Whop's clock %+v from it), less than the %v a token must have",
			exp.UTC().Format(time.RFC3339), left.Round(time.Millisecond), asked, up.skew().Round(time.Millisecond), need)
	}
	if limit := start.Add(asked); exp.After(limit.Add(expiryLeeway)) {
		r.expiryCutLog.Do(func() {
			r.log.Warn("Whop's expires_at is later than the lifetime asked; scheduling by the lifetime asked", "credential", up.Name, "key", k.ID(),
				"expires_at", exp.UTC().Format(time.RFC3339), "asked", asked, "kept_until", limit.UTC().Format(time.RFC3339))
		})
		return limit, nil
	}
	return exp, nil
}

// A 429 pause is cut to end pauseLead before the credential's earliest
// token expiry, and to no less than pauseFloor: near expiries one call
// probes every few seconds, rather than tokens expiring unrefreshed.
const (
	pauseLead  = 15 * time.Second
	pauseFloor = 5 * time.Second
)

// pauseLimit is the longest a 429 may pause up's calls now.
func (r *Refresher) pauseLimit(up *upstream) time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pauseLimitLocked(up.sched, r.clock.Now())
}

// pauseLimitLocked is the longest wait Whop's hint may impose on s's
// calls at now: up to maxRetryAfter, and over before the earliest expiry
// a refresh would save (not an idle entry's).
func (r *Refresher) pauseLimitLocked(s *sched, now time.Time) time.Duration {
	x := s.protectedExpiryLocked()
	if x.IsZero() {
		return maxRetryAfter
	}
	return min(maxRetryAfter, max(x.Sub(now)-pauseLead-r.cfg.ExpiryMargin, pauseFloor))
}

// upstreamRefused applies what an error answer says about the credential
// as soon as it arrives, before any waiter hears of it or a retry is made:
// a 429 pauses every call of the credential, a 401 locks its key out.
func (r *Refresher) upstreamRefused(up *upstream, we *whop.Error, fp, cred []byte) {
	switch we.StatusCode {
	case 429:
		d, why := we.RetryAfter, we.RetryAfterFrom+" header"
		if d <= 0 {
			d, why = r.cfg.RateLimitCooldown, "default cooldown (no Retry-After)"
		}
		d = min(d, maxRetryAfter)
		if limit := r.pauseLimit(up); d > limit {
			r.log.Warn("429 pause cut short so that the tokens expiring first can be refreshed", "credential", up.Name, "asked", d.Round(time.Millisecond), "paused", limit.Round(time.Millisecond), "hint", why)
			d, why = limit, why+", cut short by the earliest token expiry"
		}
		up.gate.pause(d, why)
		if cred != nil {
			r.cfg.Fleet.Pause(r.base, cred, r.clock.Now().Add(d), why)
		}
	case 401:
		up.gate.rejectKey(fp)
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
		up.errors.Add(1)
		r.lastError.Store(&info)
		// The gate was closed by upstreamRefused, before this.
		rejected = errors.As(o.err, &we) && we.StatusCode == 401
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
		case o.notTried && e.tok.Load() != nil && (errors.Is(o.err, errAbandoned) || errors.Is(o.err, errFleetWait)):
			// Its callers left: no failure, and the token's own refresh
			// stays due when it was (now, if it was due already).
			if e.hidx < 0 {
				r.scheduleLocked(e, maxTime(now, r.refreshTime(e.tok.Load())))
			}
			r.settleLocked(e, now)
		case o.notTried:
			r.retryLaterLocked(e, now)
			r.settleLocked(e, now)
		default:
			retryIn = r.failedLocked(e, o.err, &info, o.fp, now)
		}
	}
	c.tok, c.err = o.tok, o.err
	close(c.done)
	if c.sent {
		r.running--
	}
	if r.running == 0 && r.drained != nil {
		close(r.drained)
		r.drained = nil
	}
	r.mu.Unlock()

	notifyAll(notify)
	c.cancel() // the call is over: release its context
	if o.err != nil && !o.notTried {
		if rejected {
			_, probeAt := up.gate.rejection(o.fp)
			r.log.Error("Whop rejected a credential (401); no upstream call with it until its key file changes, a reload, or the next probe", "credential", up.Name, "next_probe", probeAt.Format(time.RFC3339), "err", info.Message)
		}
		r.log.Warn("upstream refresh failed", "key", e.id, "subject", e.key.Subject(), "status", info.Status, "retryable", info.Retryable, "retry_in", retryIn.Round(time.Millisecond), "err", info.Message)
	}
	if o.tok != nil && r.cfg.OnMint != nil {
		r.cfg.OnMint(Mint{Key: e.key, KeyID: e.id, Token: o.tok, Cause: c.want.cause, Adopted: o.adopted})
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
		hint := min(whop.RetryAfterOf(err), r.pauseLimitLocked(e.sched, now))
		e.errUntil = now.Add(max(e.bo.NextBackOff(), hint))
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
