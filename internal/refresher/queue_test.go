package refresher

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"
)

// TestAbandonedMissesLeaveTheQueue: misses queued behind a busy credential
// whose callers all give up leave the queue without an upstream call, so
// the next caller is not held behind them; status shows the queue and who
// fills it while it lasts.
func TestAbandonedMissesLeaveTheQueue(t *testing.T) {
	g := newRig(t, func(_ *rig, c *Config) { c.MaxInFlight = 1 })
	g.valve.holdIf(forCompany("biz_hold"))
	held := g.goGet(NewKey("default", "biz_hold", "", nil))
	h := g.awaitStart()

	const n = 50
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, n)
	for i := range n {
		go func() {
			_, err := g.r.Get(ctx, NewKey("default", fmt.Sprintf("biz_q%02d", i), "", nil), Options{Caller: "uid 65534"})
			done <- err
		}()
	}
	g.poll(func() string { return fmt.Sprintf("queued %+v", g.r.Status().Credentials[0].QueuedBy) }, func() bool {
		c := g.r.Status().Credentials[0]
		return c.Queued == n && len(c.QueuedBy) == 1 && c.QueuedBy[0] == QueueShare{By: "uid 65534", Calls: n}
	})
	cancel()
	for range n {
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("abandoned miss: %v", err)
		}
	}
	g.poll(func() string { return fmt.Sprintf("status %+v", g.r.Status()) }, func() bool {
		st := g.r.Status()
		return st.Abandoned == n && st.Credentials[0].Queued == 0
	})
	h.Release()
	if r := g.await(held); r.err != nil {
		t.Fatal(r.err)
	}
	g.mustGet(NewKey("default", "biz_next", "", nil))
	if calls := g.fake.CallCount(); calls != 2 {
		t.Fatalf("%d upstream calls; the %d abandoned misses made some", calls, n)
	}
}

// TestMissThatCannotFitIsRefusedAtOnce: with the credential's rate spent,
// a miss whose deadline comes before the limiter's next slot fails at once
// with BusyError, spending nothing; a caller with time to wait is served.
func TestMissThatCannotFitIsRefusedAtOnce(t *testing.T) {
	g := newRig(t, func(_ *rig, c *Config) { c.Rate, c.Burst = 2, 1 })
	g.mustGet(NewKey("default", "biz_a", "", nil))
	short, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := g.r.Get(short, NewKey("default", "biz_b", "", nil), Options{Caller: "uid 1000"})
	var be *BusyError
	if !errors.As(err, &be) || be.Credential != "default" {
		t.Fatalf("miss that cannot fit: %v, want BusyError", err)
	}
	if short.Err() != nil {
		t.Fatal("the refusal waited for the caller's deadline")
	}
	g.mustGet(NewKey("default", "biz_b", "", nil)) // 10 s: the limiter's slot comes in 0.5 s
	if n := g.fake.CallCount(); n != 2 {
		t.Fatalf("%d upstream calls, want 2", n)
	}
}

// TestCapacityEvictionIsFairAcrossUIDs: one uid minting 200 keys into a
// cache of 100 evicts its own entries, not the 20 of two other uids; with
// one uid alone, eviction stays least recently requested first.
func TestCapacityEvictionIsFairAcrossUIDs(t *testing.T) {
	g := newRig(t, func(_ *rig, c *Config) { c.MaxEntries = 100; c.Rate, c.Burst = 1000, 1000 })
	ctx := t.Context()
	get := func(company, caller string) {
		t.Helper()
		if _, err := g.r.Get(ctx, NewKey("default", company, "", nil), Options{Caller: caller}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 10 {
		get(fmt.Sprintf("biz_a%02d", i), "uid 1000")
		get(fmt.Sprintf("biz_b%02d", i), "uid 1001")
	}
	for i := range 200 {
		g.clock.Advance(time.Millisecond)
		get(fmt.Sprintf("biz_flood%03d", i), "uid 65534")
	}
	for i := range 10 {
		for _, c := range []string{"biz_a", "biz_b"} {
			k := NewKey("default", fmt.Sprintf("%s%02d", c, i), "", nil)
			if _, err := g.r.find(k.ID()); err != nil {
				t.Fatalf("%s was evicted by another uid's keys: %v", k.Subject(), err)
			}
		}
	}
	st := g.r.Status()
	if st.Entries != 100 || st.EvictedOverCapacity != 120 {
		t.Fatalf("%d entries, %d evicted; want 100 and 120", st.Entries, st.EvictedOverCapacity)
	}
	// The flood kept its 80 most recent keys.
	for i := range 200 {
		_, err := g.r.find(NewKey("default", fmt.Sprintf("biz_flood%03d", i), "", nil).ID())
		if kept := err == nil; kept != (i >= 120) {
			t.Fatalf("flood key %d kept %v, want only the last 80", i, kept)
		}
	}
}

// TestSentCallIsJoinedNotReplaced: a miss whose caller gave up after the
// request went out is not abandoned: the next caller joins it (no second
// request), and its token serves them.
func TestSentCallIsJoinedNotReplaced(t *testing.T) {
	g := newRig(t, nil)
	g.valve.holdIf(forCompany(key.CompanyID))
	ctxA, cancelA := context.WithCancel(context.Background())
	a := make(chan error, 1)
	go func() {
		_, err := g.r.Get(ctxA, key, Options{})
		a <- err
	}()
	h := g.awaitStart() // the request is out
	cancelA()
	if err := <-a; !errors.Is(err, context.Canceled) {
		t.Fatalf("the first caller: %v", err)
	}
	b := g.goGet(key)
	g.poll(func() string { return "the second caller joining" }, func() bool { return g.r.Status().Joined+g.r.Status().Misses >= 2 })
	h.Release()
	if r := g.await(b); r.err != nil {
		t.Fatal(r.err)
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("%d upstream calls; the second caller should have joined the sent one", n)
	}
	if st := g.r.Status(); st.Abandoned != 0 {
		t.Fatalf("%d calls abandoned; a sent call is not", st.Abandoned)
	}
}
