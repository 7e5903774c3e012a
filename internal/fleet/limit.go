package fleet

import (
	"context"
	"errors"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
)

// Allow takes one unit of cred's fleet-wide upstream budget (GCRA shared
// through Redis by redis_rate: rate per second, bursts of up to burst).
// retryAfter 0 means the unit was taken and the caller may call upstream
// now; otherwise nothing was taken and the caller should wait retryAfter
// and ask again (or give up if its deadline is sooner). Unlike
// x/time/rate's Reserve it never books a future slot: a caller that gives
// up then leaves no debt for the rest of the fleet. ok is false when Redis
// is unavailable or the limit is not positive: the caller then uses its
// local limiter.
func (f *Fleet) Allow(ctx context.Context, cred []byte, rate float64, burst int) (retryAfter time.Duration, ok bool) {
	if !(rate > 0) || burst < 1 {
		return 0, false
	}
	// One event per emission interval expresses any rate, including
	// fractions of one a second.
	lim := redis_rate.Limit{Rate: 1, Burst: burst, Period: time.Duration(float64(time.Second) / rate)}
	var res *redis_rate.Result
	err := f.do(ctx, func(ctx context.Context) (err error) {
		res, err = f.limiter.Allow(ctx, f.keys.cred(cred).rate, lim)
		return err
	})
	if err != nil {
		return 0, false
	}
	if res.Allowed > 0 {
		return 0, true
	}
	f.n.rateLimited.Add(1)
	return max(res.RetryAfter, time.Millisecond), true
}

// pause extends a credential's pause and never shortens it: the value is
// sealed, so the comparison uses the key's remaining time. Relative times
// (PX) keep hosts' clock differences out of it.
var pause = redis.NewScript(`
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0`)

// Pause tells every host to leave cred's upstream alone until until (after
// a 429, say), with why for their logs and status. A longer pause already
// in place is kept.
func (f *Fleet) Pause(ctx context.Context, cred []byte, until time.Time, why string) {
	d := time.Until(until)
	if d < time.Millisecond {
		return
	}
	name := f.keys.cred(cred).pause
	sealed := f.keys.seal(name, record{cred: cred, a: until.UnixNano(), text: why})
	_ = f.do(ctx, func(ctx context.Context) error {
		return pause.Run(ctx, f.rdb, []string{name}, sealed, d.Milliseconds()).Err()
	})
}

// Paused reports a fleet-wide pause of cred: until is this host's clock
// plus the time Redis says is left, so hosts' clocks need not agree. ok is
// false when there is none, when Redis is unavailable, or when the value
// does not open (counted as Tampered).
func (f *Fleet) Paused(ctx context.Context, cred []byte) (until time.Time, why string, ok bool) {
	name := f.keys.cred(cred).pause
	var get *redis.StringCmd
	var pttl *redis.DurationCmd
	err := f.do(ctx, func(ctx context.Context) error {
		_, err := f.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			get = p.Get(ctx, name)
			pttl = p.PTTL(ctx, name)
			return nil
		})
		return err
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return time.Time{}, "", false
	}
	raw, err := get.Bytes()
	if err != nil || pttl.Val() <= 0 {
		return time.Time{}, "", false
	}
	r, err := f.keys.open(name, cred, raw)
	if err != nil {
		f.n.tampered.Add(1)
		return time.Time{}, "", false
	}
	f.n.pausesSeen.Add(1)
	return time.Now().Add(pttl.Val()), r.text, true
}
