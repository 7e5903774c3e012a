package e2e

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/fleet/redistest"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// sibling is another host beside e: its own socket and state directory,
// the same upstream and API key file.
func (e *env) sibling() *env {
	e.t.Helper()
	dir, err := os.MkdirTemp("", "td")
	must(e.t, err)
	e.t.Cleanup(func() { os.RemoveAll(dir) })
	return &env{t: e.t, fake: e.fake, dir: dir, socket: filepath.Join(dir, "t.sock"), stateDir: filepath.Join(dir, "state"), keyFile: e.keyFile}
}

// fleetFlags are the flags of a host of a fleet on redis with the fleet
// key in e's directory (written once).
func (e *env) fleetFlags(redisURL string) []string {
	e.t.Helper()
	key := filepath.Join(e.dir, "fleet.key")
	if _, err := os.Stat(key); err != nil {
		b := make([]byte, 32)
		rand.Read(b)
		must(e.t, os.WriteFile(key, b, 0o600))
	}
	return append([]string{"--fleet-redis", redisURL, "--fleet-key-file", key}, fast...)
}

// TestFleetOneMintPerKey: two hosts sharing a Redis mint each key once
// between them, however many callers ask each host at once, and both serve
// the same token; a host whose API key differs never adopts it.
func TestFleetOneMintPerKey(t *testing.T) {
	rs := redistest.Start(t)
	a := newEnv(t)
	b := a.sibling()
	flags := a.fleetFlags(rs.URL())
	a.start(flags...)
	b.start(flags...)

	req := &tokendv1.GetTokenRequest{CompanyId: "biz_fleet", ScopedActions: []string{"chat:read"}}
	first, err := a.tokens().GetToken(ctx(t), req)
	must(t, err)
	got, err := b.tokens().GetToken(ctx(t), req)
	must(t, err)
	if got.Token != first.Token || a.fake.CallCount() != 1 {
		t.Fatalf("host b: same token %v, %d upstream calls; want the token host a minted and 1 call", got.Token == first.Token, a.fake.CallCount())
	}
	// The audit trail is written behind the answer.
	for end := time.Now().Add(5 * time.Second); !strings.Contains(b.daemonLogs(), "msg=adopt") && time.Now().Before(end); {
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(b.daemonLogs(), "msg=adopt") || strings.Contains(b.daemonLogs(), "msg=mint") {
		t.Fatalf("host b's audit trail should record an adopt and no mint:\n%s", grepLines(b.daemonLogs(), "logger=audit"))
	}

	// 50 callers on each host at once, for a key neither has.
	req2 := &tokendv1.GetTokenRequest{CompanyId: "biz_fleet2"}
	var wg sync.WaitGroup
	tokens := make(chan string, 100)
	for _, h := range []*env{a, b} {
		tc := h.tokens()
		for range 50 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				tok, err := tc.GetToken(ctx(t), req2)
				if err != nil {
					t.Error(err)
					return
				}
				tokens <- tok.Token
			}()
		}
	}
	wg.Wait()
	close(tokens)
	distinct := map[string]bool{}
	for tok := range tokens {
		distinct[tok] = true
	}
	calls := a.fake.CallsFor("biz_fleet2")
	st := b.status(t)
	t.Logf("2 hosts, 100 callers of one cold key: %d upstream call(s), %d distinct token(s); host b: fleet connected %v, adopted %d, lock waits %d",
		calls, len(distinct), st.GetFleet().GetConnected(), st.GetFleet().GetAdopted(), st.GetFleet().GetLockWaits())
	if calls != 1 || len(distinct) != 1 {
		t.Fatalf("%d upstream calls and %d distinct tokens for one key across the fleet; want 1 and 1", calls, len(distinct))
	}

	// A host with another API key shares the Redis but never the tokens.
	c := a.sibling()
	c.keyFile = filepath.Join(c.dir, "key")
	const otherKey = "whop_other_key_0123456789abcdef"
	a.fake.AddKey(otherKey, nil)
	must(t, os.WriteFile(c.keyFile, []byte(otherKey), 0o600))
	c.start(flags...)
	before := a.fake.CallCount()
	if _, err := c.tokens().GetToken(ctx(t), req); err != nil {
		t.Fatal(err)
	}
	if n := a.fake.CallCount() - before; n != 1 || a.fake.Calls()[before].Key != otherKey {
		t.Fatalf("host c (another key): %d upstream calls, want its own mint", n)
	}
}

// TestFleetRedisDies: Redis killed while two hosts serve 20 keys with 6 s
// tokens, and restarted 4 s later: no client error, each host carries on
// alone (status says degraded), and both rejoin by themselves.
func TestFleetRedisDies(t *testing.T) {
	rs := redistest.Start(t)
	a := newEnv(t)
	b := a.sibling()
	flags := append(a.fleetFlags(rs.URL()), "--token-lifetime", "6s")
	a.start(flags...)
	b.start(flags...)
	hosts := []tokendv1.TokenServiceClient{a.tokens(), b.tokens()}
	var calls, failures int
	var firstErr error
	loop := func(d time.Duration) {
		for end := time.Now().Add(d); time.Now().Before(end); {
			for i := range 20 {
				calls++
				if _, err := hosts[i%2].GetToken(ctx(t), companyKey(i)); err != nil {
					failures++
					if firstErr == nil {
						firstErr = err
					}
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	loop(2 * time.Second)
	upBefore := a.fake.CallCount()
	rs.Kill()
	loop(4 * time.Second)
	degraded := b.status(t).GetFleet()
	upDown := a.fake.CallCount() - upBefore
	rs.Restart()
	var rejoined time.Duration
	for start := time.Now(); ; time.Sleep(50 * time.Millisecond) {
		if a.status(t).GetFleet().GetConnected() && b.status(t).GetFleet().GetConnected() {
			rejoined = time.Since(start)
			break
		}
		if time.Since(start) > 10*time.Second {
			t.Fatal("the hosts did not rejoin the fleet within 10s of Redis coming back")
		}
	}
	loop(2 * time.Second)
	t.Logf("Redis killed for 4s under 2 hosts x 20 keys: %d GetToken calls, %d failed; %d upstream calls while it was down; status then: connected %v (%s); both rejoined %v after the restart",
		calls, failures, upDown, degraded.GetConnected(), degraded.GetReason(), rejoined.Round(time.Millisecond))
	if failures != 0 {
		t.Fatalf("%d of %d calls failed while Redis was down; first: %v", failures, calls, firstErr)
	}
	if degraded.GetConnected() {
		t.Fatal("status said connected with Redis down")
	}
	for name, h := range map[string]*env{"a": a, "b": b} {
		logs := h.daemonLogs()
		down, up := strings.Count(logs, "fleet: redis unavailable"), strings.Count(logs, "fleet: redis answers again")
		if down != 1 || up != 1 {
			t.Fatalf("host %s logged the outage %d times and the rejoin %d times; want once each:\n%s", name, down, up, grepLines(logs, "fleet"))
		}
	}
}

// TestFleetTamperedValue: a value in Redis overwritten with garbage is
// ignored and counted, never served; the host mints its own.
func TestFleetTamperedValue(t *testing.T) {
	rs := redistest.Start(t)
	a := newEnv(t)
	b := a.sibling()
	flags := a.fleetFlags(rs.URL())
	a.start(flags...)
	if _, err := a.tokens().GetToken(ctx(t), companyKey(0)); err != nil {
		t.Fatal(err)
	}
	rc := rs.Client("")
	keys, err := rc.Keys(context.Background(), "tokend:tok:*").Result()
	must(t, err)
	if len(keys) != 1 {
		t.Fatalf("%d token keys in Redis, want 1", len(keys))
	}
	must(t, rc.Set(context.Background(), keys[0], "garbage that is no sealed value", time.Hour).Err())
	msock := filepath.Join(b.dir, "metrics.sock")
	b.start(append(flags, "--metrics-addr", "unix:"+msock)...)
	tok, err := b.tokens().GetToken(ctx(t), companyKey(0))
	must(t, err)
	if _, err := a.fake.Verify(tok.Token); err != nil {
		t.Fatalf("host b served a token that does not verify: %v", err)
	}
	st := b.status(t).GetFleet()
	t.Logf("garbage in Redis: host b minted its own (%d upstream calls in all), tampered %d", a.fake.CallCount(), st.GetTampered())
	if st.GetTampered() == 0 || a.fake.CallCount() != 2 {
		t.Fatalf("tampered %d, %d upstream calls; want the garbage counted and a mint of b's own", st.GetTampered(), a.fake.CallCount())
	}
	m := scrape(t, msock)
	want := []string{"tokend_fleet_connected 1", fmt.Sprintf(`tokend_fleet_events_total{event="tampered"} %d`, st.GetTampered()), `tokend_fleet_events_total{event="published"} 1`}
	for _, want := range want {
		if !strings.Contains(m, want) {
			t.Fatalf("metrics lack %q:\n%s", want, grepLines(m, "tokend_fleet"))
		}
	}
}

// TestFleetHolderKilled: the host minting a key is killed (-9) mid-mint;
// another host's caller waits out the lock's lease, mints, and is served.
func TestFleetHolderKilled(t *testing.T) {
	rs := redistest.Start(t)
	a := newEnv(t)
	b := a.sibling()
	flags := append(a.fleetFlags(rs.URL()), "--fleet-lock-lease", "2s")
	da := a.start(flags...)
	b.start(flags...)
	a.fake.SetLatency(5 * time.Second)
	go a.tokens().GetToken(context.Background(), companyKey(0)) // holds the lock, then dies
	for a.fake.CallCount() == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	da.Kill()
	a.fake.SetLatency(0)
	start := time.Now()
	tok, err := b.tokens().GetToken(ctx(t), companyKey(0))
	took := time.Since(start)
	must(t, err)
	if _, err := a.fake.Verify(tok.Token); err != nil {
		t.Fatal(err)
	}
	st := b.status(t).GetFleet()
	t.Logf("holder killed mid-mint: host b served after %v (lease 2s), lock waits %d, takeovers %d, upstream calls %d", took.Round(time.Millisecond), st.GetLockWaits(), st.GetLockTakeovers(), a.fake.CallCount())
	if st.GetLockTakeovers() == 0 || took > 4*time.Second {
		t.Fatalf("took %v, takeovers %d; want a takeover after the 2s lease", took, st.GetLockTakeovers())
	}
}

// TestFleetRefreshOnce: two hosts keep one key fresh with 4 s tokens while
// a watcher on each host listens: each refresh cycle costs the fleet one
// upstream call (the first host due mints, the other adopts), and both
// watchers see every token the fleet minted.
func TestFleetRefreshOnce(t *testing.T) {
	rs := redistest.Start(t)
	a := newEnv(t)
	b := a.sibling()
	flags := append(a.fleetFlags(rs.URL()), "--token-lifetime", "4s")
	a.start(flags...)
	b.start(flags...)
	req := &tokendv1.GetTokenRequest{CompanyId: "biz_watchfleet", MinTtl: noMinTTL}
	wctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	seen := make([]map[string]bool, 2)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i, h := range []*env{a, b} {
		seen[i] = map[string]bool{}
		st, err := h.tokens().WatchToken(wctx, req)
		must(t, err)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				tok, err := st.Recv()
				if err != nil {
					return
				}
				mu.Lock()
				seen[i][tok.Token] = true
				mu.Unlock()
			}
		}()
	}
	// Someone keeps using the key on both hosts, so it stays in use.
	for end := time.Now().Add(9 * time.Second); time.Now().Before(end); time.Sleep(200 * time.Millisecond) {
		for _, h := range []*env{a, b} {
			if _, err := h.tokens().GetToken(ctx(t), req); err != nil {
				t.Fatal(err)
			}
		}
	}
	time.Sleep(300 * time.Millisecond) // the last delivery
	calls := a.fake.CallsFor("biz_watchfleet")
	cancel()
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	var gaps []time.Duration
	cs := a.fake.Calls()
	for i := 1; i < len(cs); i++ {
		gaps = append(gaps, cs[i].At.Sub(cs[i-1].At).Round(10*time.Millisecond))
	}
	t.Logf("9 s of 4 s tokens on 2 hosts: %d upstream calls (gaps %v); watcher on a saw %d tokens, on b %d", calls, gaps, len(seen[0]), len(seen[1]))
	// 9 s of 4 s tokens refreshed at 0.57-0.67 of their lifetime: the
	// first mint and 3 or 4 refreshes, per fleet, not per host.
	if calls < 3 || calls > 5 {
		t.Fatalf("%d upstream calls for one key on 2 hosts over 9 s; want the first mint and one per refresh cycle", calls)
	}
	for i, s := range seen {
		if len(s) < calls-1 {
			t.Fatalf("the watcher on host %d saw %d of the fleet's %d tokens", i, len(s), calls)
		}
	}
}
