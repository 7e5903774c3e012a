package fleet_test

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/fleet"
	"github.com/tokend/tokend/internal/fleet/redistest"
)

func TestPutExpiresWithTheToken(t *testing.T) {
	srv := redistest.Start(t)
	raw := srv.Client("")
	f, _ := host(t, srv)
	ctx := context.Background()
	cases := []struct {
		name   string
		life   time.Duration
		stored bool
	}{
		{"an hour", time.Hour, true},
		{"a minute", time.Minute, true},
		{"already expired", -time.Second, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := keySet(t, raw)
			tok := token("tok_"+c.name, c.life)
			f.Put(ctx, credA, c.name, tok)
			after := keySet(t, raw)
			if !c.stored {
				if len(after) != len(before) {
					t.Fatal("an expired token was stored")
				}
				return
			}
			k := newKey(t, raw, before)
			at, err := raw.PExpireTime(ctx, k).Result()
			if err != nil {
				t.Fatal(err)
			}
			if want := time.Duration(tok.ExpiresAt.UnixMilli()) * time.Millisecond; at != want {
				t.Fatalf("PEXPIRETIME %v, want the token's expiry %v", at, want)
			}
		})
	}
}

// TestLockOneMintsOthersAwait: one of three hosts holds the mint lock, the
// other two wait and get its token. Over several rounds the median wake-up
// shows pub/sub at work: with only the 100ms poll it would be about 50ms.
func TestLockOneMintsOthersAwait(t *testing.T) {
	srv := redistest.Start(t)
	a, _ := host(t, srv)
	b, _ := host(t, srv)
	c, _ := host(t, srv)
	ctx := context.Background()
	const rounds = 5
	var tooks []time.Duration
	for round := range rounds {
		key := fmt.Sprint("k-", round)
		lease, held := a.Lock(ctx, credA, key)
		if !held || lease.Local() {
			t.Fatalf("first Lock: held %v, want a Redis lock", held)
		}
		for _, f := range []*fleet.Fleet{b, c} {
			if l, held := f.Lock(ctx, credA, key); held {
				t.Fatalf("second Lock held too (local %v)", l.Local())
			}
		}
		if l, held := b.Lock(ctx, credB, key); !held {
			t.Fatal("another credential's lock for the same key was busy")
		} else {
			l.Release()
		}
		type result struct {
			tok  fleet.Token
			ok   bool
			when time.Time
		}
		results := make(chan result, 2)
		for _, f := range []*fleet.Fleet{b, c} {
			go func() {
				tok, ok := f.Await(ctx, credA, key, time.Time{})
				results <- result{tok, ok, time.Now()}
			}()
		}
		for b.Status().LockWaits+c.Status().LockWaits < uint64(2*(round+1)) { // both waiting (Redis is a process: poll)
			time.Sleep(time.Millisecond)
		}
		put := time.Now()
		a.Put(ctx, credA, key, token("tok_minted_once", time.Hour))
		lease.Release()
		for range 2 {
			r := <-results
			if !r.ok || r.tok.Value != "tok_minted_once" {
				t.Fatalf("Await: ok %v, want the holder's token", r.ok)
			}
			tooks = append(tooks, r.when.Sub(put))
		}
		if l, held := b.Lock(ctx, credA, key); !held {
			t.Fatal("Lock after Release: still busy")
		} else {
			l.Release()
		}
	}
	slices.Sort(tooks)
	median := tooks[len(tooks)/2]
	t.Logf("%d waits: median %v, slowest %v from Put to Await's return", len(tooks), median.Round(10*time.Microsecond), tooks[len(tooks)-1].Round(10*time.Microsecond))
	if median > 30*time.Millisecond {
		t.Errorf("median wake-up %v after the Put, want the pub/sub wake-up (the poll alone gives about 50ms)", median)
	}
	if s := b.Status(); s.LockWaits != rounds || s.LockBusy != rounds || s.Adopted != rounds {
		t.Fatalf("waiter status: waits %d busy %d adopted %d, want %d each", s.LockWaits, s.LockBusy, s.Adopted, rounds)
	}
}

// TestAwaitDuringRefresh: while one host refreshes, Redis still holds the
// old token; a waiter must get the new one, not the old one back.
func TestAwaitDuringRefresh(t *testing.T) {
	srv := redistest.Start(t)
	a, _ := host(t, srv)
	b, _ := host(t, srv)
	ctx := context.Background()
	old := token("tok_old", 10*time.Minute)
	a.Put(ctx, credA, "k", old)
	lease, held := a.Lock(ctx, credA, "k")
	if !held {
		t.Fatal("Lock not held")
	}
	got := make(chan fleet.Token, 1)
	go func() {
		tok, _ := b.Await(ctx, credA, "k", old.ExpiresAt)
		got <- tok
	}()
	for b.Status().LockWaits < 1 {
		time.Sleep(time.Millisecond)
	}
	select {
	case tok := <-got:
		t.Fatalf("Await returned before the refresh (old token: %v)", tok.Value == old.Value)
	case <-time.After(150 * time.Millisecond): // past one poll: it looked at least twice
	}
	a.Put(ctx, credA, "k", token("tok_new", time.Hour))
	lease.Release()
	if tok := <-got; tok.Value != "tok_new" {
		t.Fatalf("Await after the refresh: %d-byte value, want the new token", len(tok.Value))
	}
	if s := b.Status(); s.Adopted != 1 || s.Tampered != 0 || s.Stale != 0 {
		t.Fatalf("status: adopted %d tampered %d stale %d, want 1 0 0", s.Adopted, s.Tampered, s.Stale)
	}
}

func TestHolderDiesOthersTakeOver(t *testing.T) {
	srv := redistest.Start(t)
	const lease = 200 * time.Millisecond
	short := func(c *fleet.Config) { c.LockLease = lease }
	a, _ := host(t, srv, short)
	b, _ := host(t, srv, short)
	ctx := context.Background()
	start := time.Now()
	if _, held := a.Lock(ctx, credA, "k"); !held { // a "dies": it never Puts or Releases
		t.Fatal("first Lock not held")
	}
	if _, held := b.Lock(ctx, credA, "k"); held {
		t.Fatal("second Lock held while the first lives")
	}
	if _, ok := b.Await(ctx, credA, "k", time.Time{}); ok {
		t.Fatal("Await returned a token nobody put")
	}
	waited := time.Since(start)
	if waited < lease-20*time.Millisecond || waited > lease+150*time.Millisecond {
		t.Fatalf("Await gave up after %v, want about the lease (%v)", waited, lease)
	}
	l, held := b.Lock(ctx, credA, "k")
	if !held || l.Local() {
		t.Fatal("Lock after the holder's lease ran out: not held in Redis")
	}
	if s := b.Status(); s.LockTakeovers != 1 {
		t.Fatalf("LockTakeovers = %d, want 1", s.LockTakeovers)
	}
	t.Logf("lease %v: waiter gave up after %v and took the lock", lease, waited.Round(time.Millisecond))

	// A waiter whose caller's deadline is shorter than the lease gives up at
	// the deadline.
	dctx, cancel := context.WithTimeout(ctx, 30*time.Millisecond)
	defer cancel()
	start = time.Now()
	if _, ok := a.Await(dctx, credA, "k", time.Time{}); ok {
		t.Fatal("Await returned a token nobody put")
	}
	if took := time.Since(start); took > 60*time.Millisecond {
		t.Fatalf("Await ran %v past a 30ms deadline", took)
	}
}

func TestReleaseNeverDeletesAnotherOwnersLock(t *testing.T) {
	srv := redistest.Start(t)
	raw := srv.Client("")
	short := func(c *fleet.Config) { c.LockLease = 200 * time.Millisecond }
	a, _ := host(t, srv, short)
	b, _ := host(t, srv, short)
	ctx := context.Background()
	before := keySet(t, raw)
	old, held := a.Lock(ctx, credA, "k")
	if !held {
		t.Fatal("Lock not held")
	}
	lockKey := newKey(t, raw, before)
	deadline := time.Now().Add(2 * time.Second)
	for raw.Exists(ctx, lockKey).Val() == 1 { // Redis expires it on its own clock
		if time.Now().After(deadline) {
			t.Fatal("lock did not expire")
		}
		time.Sleep(10 * time.Millisecond)
	}
	taken, held := b.Lock(ctx, credA, "k")
	if !held || taken.Local() {
		t.Fatal("Lock after expiry not held")
	}
	owner := raw.Get(ctx, lockKey).Val()
	old.Release()
	if got := raw.Get(ctx, lockKey).Val(); got != owner {
		t.Fatalf("the late holder's Release changed the new owner's lock (%d bytes now)", len(got))
	}
	taken.Release()
	if raw.Exists(ctx, lockKey).Val() != 0 {
		t.Fatal("the owner's Release left the lock")
	}
}

// TestAllowFleetWide runs four hosts on one Redis, each trying to call
// upstream as fast as the fleet budget lets it.
func TestAllowFleetWide(t *testing.T) {
	srv := redistest.Start(t)
	const (
		rate   = 40.0
		burst  = 5
		hosts  = 4
		window = 750 * time.Millisecond
	)
	var allowed atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range hosts {
		f, _ := host(t, srv)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(start) < window {
				wait, ok := f.Allow(context.Background(), credA, rate, burst)
				if !ok {
					t.Error("Allow: not ok on a live Redis")
					return
				}
				if wait == 0 {
					allowed.Add(1)
					continue
				}
				time.Sleep(min(wait, 5*time.Millisecond)) // real time: the limiter runs on Redis's clock
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	ceiling := int64(rate*elapsed.Seconds()) + burst + 1
	floor := int64(rate*window.Seconds()*0.8) + burst
	got := allowed.Load()
	t.Logf("%d hosts, budget %.0f/s burst %d: %d calls allowed in %v (ceiling %d)", hosts, rate, burst, got, elapsed.Round(time.Millisecond), ceiling)
	if got > ceiling {
		t.Fatalf("fleet allowed %d calls in %v, more than rate×time+burst = %d", got, elapsed, ceiling)
	}
	if got < floor {
		t.Fatalf("fleet allowed only %d calls in %v, want at least %d", got, elapsed, floor)
	}
	// Another credential has its own budget.
	f, _ := host(t, srv)
	if wait, ok := f.Allow(context.Background(), credB, rate, burst); !ok || wait != 0 {
		t.Fatalf("another credential: wait %v ok %v, want an immediate go", wait, ok)
	}
}

func TestPauseSeenByOtherHosts(t *testing.T) {
	srv := redistest.Start(t)
	a, _ := host(t, srv)
	b, _ := host(t, srv)
	ctx := context.Background()
	until := time.Now().Add(2 * time.Second)
	a.Pause(ctx, credA, until, "429 from upstream")
	a.Pause(ctx, credA, time.Now().Add(time.Second), "shorter, must not shorten")
	got, why, ok := b.Paused(ctx, credA)
	if !ok || why != "429 from upstream" {
		t.Fatalf("Paused: ok %v why %q, want the first, longer pause", ok, why)
	}
	if d := got.Sub(until); d < -50*time.Millisecond || d > 50*time.Millisecond {
		t.Fatalf("Paused until %v, want %v (±50ms)", got, until)
	}
	if _, _, ok := b.Paused(ctx, credB); ok {
		t.Fatal("another credential is paused")
	}
	a.Pause(ctx, credA, time.Now().Add(3*time.Second), "longer")
	if _, why, _ := b.Paused(ctx, credA); why != "longer" {
		t.Fatalf("a longer pause did not replace the shorter one: why %q", why)
	}
	if s := b.Status(); s.PausesSeen != 2 {
		t.Fatalf("PausesSeen = %d, want 2", s.PausesSeen)
	}
}

// TestRedisOutage: with Redis killed or frozen, every call answers within
// the timeout, the host logs the outage once and rejoins by itself.
func TestRedisOutage(t *testing.T) {
	cases := []struct {
		name       string
		fail, heal func(*redistest.Server)
		perCall    time.Duration // bound on each call while failing
	}{
		{"killed", (*redistest.Server).Kill, (*redistest.Server).Restart, 20 * time.Millisecond},
		{"frozen", (*redistest.Server).Freeze, (*redistest.Server).Thaw, fleet.DefaultTimeout + 25*time.Millisecond},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			srv := redistest.Start(t)
			f, l := host(t, srv, func(c *fleet.Config) { c.Timeout = fleet.DefaultTimeout })
			ctx := context.Background()
			f.Put(ctx, credA, "k", token("tok_before", time.Hour))
			c.fail(srv)
			calls := map[string]func(){
				"Get":    func() { f.Get(ctx, credA, "k") },
				"Put":    func() { f.Put(ctx, credA, "k", token("tok_during", time.Hour)) },
				"Lock":   func() { l, held := f.Lock(ctx, credA, "k2"); _ = held; l.Release() },
				"Await":  func() { f.Await(ctx, credA, "k2", time.Time{}) },
				"Allow":  func() { f.Allow(ctx, credA, 10, 5) },
				"Pause":  func() { f.Pause(ctx, credA, time.Now().Add(time.Second), "x") },
				"Paused": func() { f.Paused(ctx, credA) },
			}
			var slowest time.Duration
			for round := range 5 {
				for name, call := range calls {
					start := time.Now()
					call()
					took := time.Since(start)
					slowest = max(slowest, took)
					if took > c.perCall {
						t.Errorf("round %d: %s took %v with Redis %s, want under %v", round, name, took, c.name, c.perCall)
					}
				}
			}
			s := f.Status()
			if s.Connected || s.Degraded != 1 || s.Reason == "" {
				t.Fatalf("status while %s: connected %v degraded %d reason %q, want degraded once with a reason", c.name, s.Connected, s.Degraded, s.Reason)
			}
			if _, ok := f.Get(ctx, credA, "k"); ok {
				t.Fatal("Get returned a token while degraded")
			}
			l2, held := f.Lock(ctx, credA, "k")
			if !held || !l2.Local() {
				t.Fatal("Lock while degraded: want a local-only lease")
			}
			t.Logf("Redis %s: slowest of %d calls %v; reason %q", c.name, 5*len(calls), slowest.Round(time.Microsecond), s.Reason)
			downAt := time.Now()
			c.heal(srv)
			deadline := time.Now().Add(6 * time.Second) // probe backoff tops out at 5s
			for !f.Status().Connected {
				if time.Now().After(deadline) {
					t.Fatal("did not rejoin within 6s of Redis coming back")
				}
				time.Sleep(10 * time.Millisecond)
			}
			t.Logf("rejoined %v after Redis came back", time.Since(downAt).Round(time.Millisecond))
			f.Put(ctx, credA, "k3", token("tok_after", time.Hour))
			if got, ok := f.Get(ctx, credA, "k3"); !ok || got.Value != "tok_after" {
				t.Fatal("Get after rejoining: no token")
			}
			warns, infos := l.lines(slog.LevelWarn), l.lines(slog.LevelInfo)
			if len(warns) != 1 || !strings.Contains(warns[0], "carries on alone") {
				t.Fatalf("warnings: %q, want exactly one outage line", warns)
			}
			if n := countContaining(infos, "answers again"); n != 1 {
				t.Fatalf("info lines: %q, want exactly one rejoin line", infos)
			}
			t.Logf("log: %s", warns[0])
		})
	}
}

func countContaining(lines []string, s string) int {
	n := 0
	for _, l := range lines {
		if strings.Contains(l, s) {
			n++
		}
	}
	return n
}

func TestStartsDegradedAndJoins(t *testing.T) {
	srv := redistest.Start(t)
	srv.Kill()
	f, l := host(t, srv)
	if s := f.Status(); s.Connected {
		t.Fatal("connected to a Redis that is down")
	}
	srv.Restart()
	deadline := time.Now().Add(2 * time.Second)
	for !f.Status().Connected {
		if time.Now().After(deadline) {
			t.Fatal("did not join within 2s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := len(l.lines(slog.LevelWarn)); n != 1 {
		t.Fatalf("%d warnings, want 1", n)
	}
}

func TestPassword(t *testing.T) {
	const secret = "s3cret-redis-pass"
	srv := redistest.Start(t, "--requirepass", secret)
	cases := []struct {
		name      string
		password  string
		connected bool
	}{
		{"right password", secret, true},
		{"wrong password", "not-the-password", false},
		{"no password", "", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f, l := host(t, srv, func(cfg *fleet.Config) { cfg.Password = c.password })
			ctx := context.Background()
			f.Put(ctx, credA, "k", token("tok_pw", time.Hour))
			_, ok := f.Get(ctx, credA, "k")
			s := f.Status()
			if s.Connected != c.connected || ok != c.connected {
				t.Fatalf("connected %v, Get ok %v, want %v (reason %q)", s.Connected, ok, c.connected, s.Reason)
			}
			for _, text := range []string{s.Reason, l.all()} {
				if c.password != "" && strings.Contains(text, c.password) {
					t.Fatalf("the password appears in status or log: %q", text)
				}
			}
			if !c.connected {
				t.Logf("reason: %s", s.Reason)
			}
		})
	}
}

// BenchmarkGet is a local miss answered from Redis: one Get of a present
// key on a Unix-socket redis-server.
func BenchmarkGet(b *testing.B) {
	srv := redistest.Start(b)
	f, _ := host(b, srv)
	ctx := context.Background()
	names := make([]string, 1000)
	for i := range names {
		names[i] = fmt.Sprint("key-", i)
		f.Put(ctx, credA, names[i], token("tok_bench", time.Hour))
	}
	lat := make([]time.Duration, 0, b.N)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		start := time.Now()
		if _, ok := f.Get(ctx, credA, names[i%len(names)]); !ok {
			b.Fatal("miss")
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	if len(lat) > 100 {
		slices.Sort(lat)
		b.ReportMetric(float64(lat[len(lat)/2])/1e3, "p50-µs")
		b.ReportMetric(float64(lat[len(lat)*99/100])/1e3, "p99-µs")
	}
}

// TestKeepAliveHoldsTheLock: a holder that renews keeps the lock past its
// lease (a slow mint behind a rate wait or a 429 pause); once it stops,
// the lock lapses within one lease and another host takes it.
func TestKeepAliveHoldsTheLock(t *testing.T) {
	srv := redistest.Start(t)
	const lease = 150 * time.Millisecond
	short := func(c *fleet.Config) { c.LockLease = lease }
	a, _ := host(t, srv, short)
	b, _ := host(t, srv, short)
	ctx := context.Background()
	l, held := a.Lock(ctx, credA, "k")
	if !held {
		t.Fatal("first Lock not held")
	}
	stop := l.KeepAlive()
	time.Sleep(4 * lease) // Redis's own clock decides; there is no fake for it
	if _, held := b.Lock(ctx, credA, "k"); held {
		t.Fatalf("the lock lapsed after %v although its holder renews it", 4*lease)
	}
	stop()
	deadline := time.Now().Add(lease + 200*time.Millisecond)
	for {
		if _, held := b.Lock(ctx, credA, "k"); held {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the lock outlived its lease after renewal stopped")
		}
		time.Sleep(10 * time.Millisecond)
	}
	(*fleet.Lease)(nil).KeepAlive()() // nil and local leases need nothing
}
