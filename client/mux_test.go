package client_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/oauth2"
	"google.golang.org/grpc/codes"

	"github.com/tokend/tokend/client"
	"github.com/tokend/tokend/internal/clock"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// TestManySourcesOneConnection is issue 12's regression: 300 shared sources
// on one Client, against tokend's default of 128 streams per connection,
// all get their token, and a unary call still answers while they watch.
// Against a tokend without WatchTokens the sources poll instead, and the
// same must hold.
func TestManySourcesOneConnection(t *testing.T) {
	// A limiter that mints 300 keys in a second rather than 30; the stream
	// limit stays at its default.
	d := startTestDaemon(t, "--upstream-rate", "1000", "--upstream-burst", "300", "--upstream-max-inflight", "16")
	watch := servesWatchTokens(t, d.socket)
	ctx := testContext(t)
	var wire wireLog
	c := newClient(t, d.socket, wire.option())

	const n = 300
	subject := func(i int) string { return fmt.Sprintf("biz_many%03d", i) }
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			tok, err := c.TokenSource(subject(i), "chat:read").Token()
			if err != nil {
				t.Errorf("source %d: %v", i, err)
				return
			}
			if claims, err := d.fake.Verify(tok.AccessToken); err != nil || claims.CompanyID != subject(i) {
				t.Errorf("source %d: token for %q (%v), want one for %s", i, claims.CompanyID, err, subject(i))
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	if watch {
		waitFor(t, fmt.Sprintf("all %d subscriptions to answer", n), func() bool { return c.Watching() == n })
	}

	unary, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := c.Token(unary, client.Request{CompanyID: "biz_many_unary"}); err != nil {
		t.Fatalf("unary GetToken with %d sources watching: %v", n, err)
	}
	for i := range n {
		if calls := d.fake.CallsFor(subject(i)); calls != 1 {
			t.Errorf("%s: %d upstream calls, want 1", subject(i), calls)
		}
	}
	// Without WatchTokens, the one stream is the probe that found out.
	if got, old := wire.streamCount("WatchTokens"), wire.streamCount("WatchToken"); got != 1 || old != 0 {
		t.Errorf("streams opened: %d WatchTokens, %d WatchToken; want 1 and 0", got, old)
	}
}

// TestEvictedSourceResubscribes: when tokend evicts a watched entry, it
// ends that subscription with ABORTED; the source subscribes again on the
// same stream and gets the new entry's token.
func TestEvictedSourceResubscribes(t *testing.T) {
	d := startTestDaemon(t)
	requireWatchTokens(t, d.socket)
	ctx := testContext(t)
	var rpcs rpcCounter
	var wire wireLog
	c := newClient(t, d.socket, rpcs.option(), wire.option())
	ts := c.TokenSource("biz_evict", "chat:read")
	first, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the subscription to answer", func() bool { return c.Watching() == 1 })
	req := client.Request{CompanyID: "biz_evict", Scopes: []string{"chat:read"}}
	before, err := newClient(t, d.socket).Token(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := adminClient(t, d.socket).EvictEntries(ctx, &tokendv1.EvictEntriesRequest{Target: &tokendv1.EvictEntriesRequest_KeyId{KeyId: before.KeyID}}); err != nil {
		t.Fatal(err)
	}
	var tok *oauth2.Token
	waitFor(t, "the evicted source to get a new token", func() bool {
		if tok, err = ts.Token(); err != nil {
			t.Fatal(err)
		}
		return tok.AccessToken != first.AccessToken
	})
	after, err := newClient(t, d.socket).Token(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if tok.AccessToken != after.Value {
		t.Error("after the eviction the source's token is not the daemon's current one")
	}
	ids := wire.subscriptions("biz_evict")
	if len(ids) != 2 {
		t.Fatalf("subscriptions for biz_evict: %v, want 2", ids)
	}
	if code := wire.ended(ids[0]); code != codes.Aborted {
		t.Errorf("first subscription ended with %v, want Aborted", code)
	}
	if n := wire.streamCount("WatchTokens"); n != 1 {
		t.Errorf("WatchTokens streams = %d, want 1: an eviction ends a subscription, not the stream", n)
	}
	if n := rpcs.count("GetToken"); n != 1 {
		t.Errorf("the source made %d GetToken calls, want 1: the new token should come over the stream", n)
	}
	if n := d.fake.CallsFor("biz_evict"); n != 2 {
		t.Errorf("upstream calls = %d, want 2 (before and after the eviction)", n)
	}
}

// TestIdleSourcesStopWatching: on a fake clock, the client touches the
// sources used since its last touch every minute, and a source nobody
// called for WithIdleAfter unsubscribes: a shared one leaves the client's
// map, an owned one resubscribes on its next Token call. A source in use
// stays.
func TestIdleSourcesStopWatching(t *testing.T) {
	for _, tc := range []struct {
		name  string
		serve func(t *testing.T) string
	}{
		{"tokend", func(t *testing.T) string {
			d := startTestDaemon(t)
			requireWatchTokens(t, d.socket)
			return d.socket
		}},
		{"fake", func(t *testing.T) string { return serveFake(t, &fakeTokens{lifetime: time.Hour, watch: true}) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			socket := tc.serve(t)
			clk := clock.NewFake(time.Now())
			var wire wireLog
			c := newClient(t, socket, client.WithClock(clk), client.WithIdleAfter(2*time.Minute), wire.option())
			used, unused := c.TokenSource("biz_used"), c.TokenSource("biz_unused")
			owned := c.NewTokenSource(client.Request{CompanyID: "biz_owned"})
			defer owned.Close()
			for _, ts := range []oauth2.TokenSource{used, unused, owned} {
				if _, err := ts.Token(); err != nil {
					t.Fatal(err)
				}
			}
			waitFor(t, "three subscriptions to answer", func() bool { return c.Watching() == 3 })
			id := func(company string) uint64 {
				ids := wire.subscriptions(company)
				if len(ids) != 1 {
					t.Fatalf("subscriptions for %s: %v, want 1", company, ids)
				}
				return ids[0]
			}
			usedID, unusedID, ownedID := id("biz_used"), id("biz_unused"), id("biz_owned")

			// Minute 1: nothing was called since subscribing (which tokend
			// counted as a request); then used is. Minute 2: the others
			// have gone two minutes without a call.
			clk.Advance(time.Minute)
			if _, err := used.Token(); err != nil {
				t.Fatal(err)
			}
			clk.Advance(time.Minute)
			waitFor(t, "the idle source to leave the client", func() bool { return !c.HasShared("biz_unused") })
			waitFor(t, "the idle sources to unsubscribe", func() bool { return wire.unsubscribed(unusedID) && wire.unsubscribed(ownedID) })
			// The used source was touched at minute 1 or 2, whichever tick
			// came after its call, and nothing else ever was.
			var touched []uint64
			for i := 0; ; i++ {
				ids, ok := wire.touch(i)
				if !ok {
					break
				}
				touched = append(touched, ids...)
			}
			if !slices.Equal(touched, []uint64{usedID}) {
				t.Errorf("touches named %v, want only the used source's %d", touched, usedID)
			}
			if wire.unsubscribed(usedID) || !c.HasShared("biz_used") || c.Watching() != 1 {
				t.Errorf("the used source: unsubscribed %v, in the map %v, %d watching; want it kept and alone", wire.unsubscribed(usedID), c.HasShared("biz_used"), c.Watching())
			}

			// Called again, the owned source watches again; a new call for
			// the dropped subject makes a new shared source.
			if _, err := owned.Token(); err != nil {
				t.Fatal(err)
			}
			if again := c.TokenSource("biz_unused"); again == unused {
				t.Error("TokenSource for a subject that went idle returned the dropped source")
			}
			waitFor(t, "the owned source to watch again", func() bool { return c.Watching() == 2 })
			if ids := wire.subscriptions("biz_owned"); len(ids) != 2 {
				t.Errorf("subscriptions for biz_owned: %v, want 2", ids)
			}
		})
	}
}

// TestIdleSourcesStopPolling: against a tokend without WatchTokens, one
// sweep polls the sources in use ahead of expiry (here halfway through
// their hour, on a fake clock), and a source gone idle is not polled.
func TestIdleSourcesStopPolling(t *testing.T) {
	f := &fakeTokens{lifetime: time.Hour}
	clk := clock.NewFake(time.Now())
	c := newClient(t, serveFake(t, f), client.WithClock(clk), client.WithIdleAfter(10*time.Minute))
	used, unused := c.TokenSource("biz_polled"), c.TokenSource("biz_idle")
	for _, ts := range []oauth2.TokenSource{used, unused} {
		if _, err := ts.Token(); err != nil {
			t.Fatal(err)
		}
	}
	for range 31 {
		clk.Advance(time.Minute)
		if _, err := used.Token(); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the used source's poll", func() bool { return f.getCount("biz_polled") == 2 })
	// Both tokens arrived together, so the sweep that polled one would
	// have polled the other had it been active.
	if n := f.getCount("biz_idle"); n != 1 {
		t.Errorf("the idle source made %d GetToken calls, want 1 (its first token)", n)
	}
	if c.HasShared("biz_idle") || !c.HasShared("biz_polled") {
		t.Errorf("in the client's map: idle source %v, used source %v; want false, true", c.HasShared("biz_idle"), c.HasShared("biz_polled"))
	}
	// A probe at the start, then at most one every 5 minutes.
	if n := f.watches.Load(); n < 1 || n > 1+31/5 {
		t.Errorf("WatchTokens calls = %d over 31 minutes, want 1 to %d", n, 1+31/5)
	}
}
