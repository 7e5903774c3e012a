package e2e

import (
	"context"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// fanOutBound is how soon after a refresh every watcher must have the new
// token. The target is 100 ms for the tokend that ships; .ci/run checks it
// by running this test without the race detector. A race build of tokend
// and of the 1,000 clients, on the same two cores, runs several times
// slower (one CI run saw 101 ms, one on a machine busy with other builds
// 578 ms), so under -race the bound only catches a watcher being held up:
// a stalled stream blocking the broadcast would hold the others until it
// reads, and they would miss the refresh altogether.
var fanOutBound = map[bool]time.Duration{false: 100 * time.Millisecond, true: 2 * time.Second}[raceEnabled]

// TestWatchTokenFanOut: 1,000 watchers of one key each get every refreshed
// token within 100 ms of the refresh, one upstream call per refresh, and a
// watcher that never reads holds nobody up. Someone keeps using the key
// (a GetToken every 500 ms): watchers alone do not keep it refreshed.
func TestWatchTokenFanOut(t *testing.T) {
	e := newEnv(t)
	// Refreshes come at 0.57-0.67 of the lifetime: long enough under -race
	// that the wait for delivery ends before a third refresh.
	lifetime := map[bool]time.Duration{false: 3 * time.Second, true: 8 * time.Second}[raceEnabled]
	e.start("--token-lifetime", lifetime.String())
	req := &tokendv1.GetTokenRequest{CompanyId: "biz_watch", MinTtl: noMinTTL}
	const conns, perConn = 10, 100
	type got struct {
		token string
		at    time.Time
	}
	recv := make([][]got, conns*perConn)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// The stalled watcher: opens a stream and never reads it.
	stalled, err := e.tokens().WatchToken(ctx, req)
	must(t, err)
	_ = stalled

	var ready, done sync.WaitGroup
	for c := range conns {
		tc := e.tokens() // its own connection
		for s := range perConn {
			i := c*perConn + s
			ready.Add(1)
			done.Add(1)
			go func() {
				defer done.Done()
				st, err := tc.WatchToken(ctx, req)
				if err != nil {
					t.Error(err)
					ready.Done()
					return
				}
				first := true
				for {
					tok, err := st.Recv()
					if err != nil {
						if first {
							ready.Done()
						}
						if status.Code(err) != codes.Canceled {
							t.Errorf("watcher %d: %v", i, err)
						}
						return
					}
					recv[i] = append(recv[i], got{tok.Token, time.Now()})
					if first {
						first = false
						ready.Done()
					}
				}
			}()
		}
	}
	ready.Wait()
	done.Add(1)
	go func() { // the key's user
		defer done.Done()
		tc := e.tokens()
		for ctx.Err() == nil {
			if _, err := tc.GetToken(ctx, req); err != nil && ctx.Err() == nil {
				t.Errorf("GetToken while watched: %v", err)
			}
			select {
			case <-ctx.Done():
			case <-time.After(500 * time.Millisecond):
			}
		}
	}()
	start := time.Now()
	// Two refreshes, each 0.57-0.67 of the lifetime after the token before.
	deadline := time.Now().Add(5 * lifetime)
	for e.fake.CallsFor("biz_watch") < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("no second refresh within %v (calls %d)", 5*lifetime, e.fake.CallsFor("biz_watch"))
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(fanOutBound + 200*time.Millisecond) // delivery
	calls := e.fake.Calls()
	cancel()
	done.Wait()

	refreshAt := map[int]time.Time{}
	for i, c := range calls {
		refreshAt[i] = c.At
	}
	tokensSeen := map[string]int{} // token -> index of the upstream call
	var worst time.Duration
	for i, gs := range recv {
		if len(gs) < 3 {
			t.Fatalf("watcher %d got %d tokens, want the first and two refreshes", i, len(gs))
		}
		for n, g := range gs[:3] {
			if idx, ok := tokensSeen[g.token]; ok && idx != n {
				t.Fatalf("watchers disagree on the order of tokens")
			}
			tokensSeen[g.token] = n
			if n == 0 {
				continue
			}
			lag := g.at.Sub(refreshAt[n])
			worst = max(worst, lag)
		}
	}
	t.Logf("%d watchers, %d upstream calls over %v; slowest delivery %v after the upstream call", len(recv), len(calls), time.Since(start).Round(time.Millisecond), worst.Round(time.Millisecond))
	if len(tokensSeen) != 3 {
		t.Fatalf("watchers saw %d distinct tokens in their first three, want 3", len(tokensSeen))
	}
	if n := e.fake.CallsFor("biz_watch"); n != 3 {
		t.Fatalf("%d upstream calls for 2 refreshes and the first mint, want 3", n)
	}
	if worst > fanOutBound {
		t.Fatalf("a watcher got a refreshed token %v after the refresh; want within %v", worst, fanOutBound)
	}
}

// TestWatchTokenEndsOnEvict: evicting the entry ends its watchers with
// Aborted.
func TestWatchTokenEndsOnEvict(t *testing.T) {
	e := newEnv(t)
	e.start()
	st, err := e.tokens().WatchToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_ev"})
	must(t, err)
	first, err := st.Recv()
	must(t, err)
	e.mustCtl("evict", first.KeyId)
	if _, err := st.Recv(); status.Code(err) != codes.Aborted {
		t.Fatalf("after evict: %v, want Aborted", err)
	}
}

// TestWatchAloneDoesNotKeepRefreshing: a key nobody asks for is set aside
// after a lifetime even while watched, and its watcher ends with Aborted
// when its token runs out, instead of tokend minting for it forever.
func TestWatchAloneDoesNotKeepRefreshing(t *testing.T) {
	e := newEnv(t)
	e.start("--token-lifetime", "3s")
	st, err := e.tokens().WatchToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_alone", MinTtl: noMinTTL})
	must(t, err)
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	for {
		_, err := st.Recv()
		if err == nil {
			continue // the refresh within the first lifetime
		}
		if status.Code(err) != codes.Aborted {
			t.Fatalf("watch of an unused key ended with %v, want Aborted", err)
		}
		break
	}
	if n := e.fake.CallsFor("biz_alone"); n > 2 {
		t.Fatalf("%d upstream calls for a key only watched, want at most 2 (the mint and one refresh within its lifetime)", n)
	}
}
