package refresher

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/whop/whoptest"
)

// answerAt is a 200 from Whop whose token expires at exp.
func answerAt(exp time.Time) whoptest.Fault {
	return whoptest.Fault{Status: 200, Body: `{"token":"e30.e30.c2ln","expires_at":"` + exp.UTC().Format(time.RFC3339Nano) + `"}`}
}

// TestUnusableExpiryKeepsTheToken: a refresh answered with an expiry
// already past (or nearly) is an upstream error, counted and backed off;
// the token in hand keeps being served while it is valid.
func TestUnusableExpiryKeepsTheToken(t *testing.T) {
	for _, tc := range []struct {
		name string
		left time.Duration // the answer's expiry, from now
	}{
		{"past", -time.Minute},
		{"now", 0},
		{"under half the lifetime asked", 5 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newRig(t, func(_ *rig, c *Config) { c.Lifetime = 12 * time.Second })
			anyTTL := Options{}
			old, err := g.r.Get(t.Context(), key, anyTTL)
			if err != nil {
				t.Fatal(err)
			}
			g.advanceTo(g.info(key).NextRefresh)
			g.fake.SetDefault(answerAt(g.clock.Now().Add(tc.left)))
			g.waitCalls(2)
			i := g.waitFor(key, "retrying", func(i EntryInfo) bool { return i.State == StateRetrying })
			if i.LastError == nil || i.LastError.Status != 200 || !i.LastError.Retryable || !strings.Contains(i.LastError.Message, "unusable answer: expires_at") {
				t.Fatalf("last error %+v; want a retryable unusable answer", i.LastError)
			}
			res, err := g.r.Get(t.Context(), key, anyTTL)
			if err != nil || res.Token != old.Token || res.Source != SourceHit {
				t.Fatalf("get after the bad answer: %v %v (source %v); want the token in hand", res.Token, err, res.Source)
			}
			if n := g.fake.CallCount(); n != 2 {
				t.Fatalf("%d upstream calls; the hit made one more", n)
			}
			if st := g.r.Status(); st.UpstreamErrors != 1 || st.Credentials[0].Errors != 1 {
				t.Fatalf("status counts %d upstream errors (%d for the credential), want 1", st.UpstreamErrors, st.Credentials[0].Errors)
			}
		})
	}
}

// TestUnusableExpiryOnAMiss: a cold miss answered with an expiry in the
// past fails with the reason, and is not installed.
func TestUnusableExpiryOnAMiss(t *testing.T) {
	g := newRig(t, nil)
	g.fake.Enqueue(answerAt(g.clock.Now().Add(-time.Second)))
	_, err := g.get(key)
	if err == nil || !strings.Contains(err.Error(), "unusable answer") {
		t.Fatalf("miss: %v, want the unusable answer", err)
	}
	if i := g.info(key); !i.ExpiresAt.IsZero() {
		t.Fatalf("entry holds a token expiring %v", i.ExpiresAt)
	}
}

// TestLateExpiryIsCut: an expires_at far later than asked (30 days, the
// year 9999) is scheduled by the lifetime asked.
func TestLateExpiryIsCut(t *testing.T) {
	for _, tc := range []struct {
		name string
		exp  func(now time.Time) time.Time
	}{
		{"30 days", func(now time.Time) time.Time { return now.Add(30 * 24 * time.Hour) }},
		{"year 9999", func(time.Time) time.Time { return time.Date(9999, 12, 31, 0, 0, 0, 0, time.UTC) }},
		{"a few seconds late", func(now time.Time) time.Time { return now.Add(DefaultLifetime + 3*time.Second) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newRig(t, nil)
			now := g.clock.Now()
			exp := tc.exp(now)
			g.fake.Enqueue(answerAt(exp))
			res := g.mustGet(key)
			want := now.Add(DefaultLifetime)
			if tc.name == "a few seconds late" {
				want = exp // within the leeway: believed
			}
			if !res.Token.ExpiresAt.Round(time.Second).Equal(want.Round(time.Second)) {
				t.Fatalf("expires at %v, want %v", res.Token.ExpiresAt, want)
			}
			if next := g.info(key).NextRefresh; next.After(now.Add(DefaultLifetime)) {
				t.Fatalf("next refresh in %v, past the lifetime asked", next.Sub(now))
			}
		})
	}
}

// TestImpossibleMinTTLIsRefusedUpFront: no mint can last 3h or 2h59m59s,
// so none is made; the longest satisfiable min_ttl still mints once.
func TestImpossibleMinTTLIsRefusedUpFront(t *testing.T) {
	g := newRig(t, nil)
	for _, d := range []time.Duration{3 * time.Hour, 3*time.Hour - time.Second, MaxMinTTL} {
		for range 5 {
			if _, err := g.r.Get(t.Context(), key, Options{MinTTL: d}); !errors.Is(err, ErrLifetime) {
				t.Fatalf("min_ttl %v: %v, want ErrLifetime", d, err)
			}
		}
	}
	if n := g.fake.CallCount(); n != 0 {
		t.Fatalf("%d upstream calls for min_ttls no token can satisfy", n)
	}
	most := MaxMinTTL - DefaultExpiryMargin
	for range 5 {
		if _, err := g.r.Get(t.Context(), key, Options{MinTTL: most}); err != nil {
			t.Fatalf("min_ttl %v: %v", most, err)
		}
	}
	if n := g.fake.CallCount(); n != 1 {
		t.Fatalf("%d upstream calls for 5 gets of min_ttl %v, want 1", n, most)
	}
}

// TestPauseCutByEarliestExpiry: a 429 asking for 999999 s pauses the
// credential only until shortly before its first token expires; a reload
// lifts the pause.
func TestPauseCutByEarliestExpiry(t *testing.T) {
	g := newRig(t, func(_ *rig, c *Config) { c.Lifetime = 2 * time.Minute })
	tok := g.mustGet(key).Token
	g.fake.Enqueue(whoptest.Fault{Status: 429, RetryAfter: "999999"})
	other := NewKey("default", "biz_other", "", nil)
	if _, err := g.get(other); err == nil {
		t.Fatal("the 429 answer gave a token")
	}
	st := g.r.Status()
	cred := st.Credentials[0]
	want := tok.ExpiresAt.Add(-pauseLead - DefaultExpiryMargin)
	if d := cred.PausedUntil.Sub(want).Abs(); d > time.Second || !strings.Contains(cred.PauseReason, "retry-after header, cut short by the earliest token expiry") {
		t.Fatalf("paused until %v (%q); want about %v, cut short", cred.PausedUntil, cred.PauseReason, want)
	}
	if err := g.r.SetCredentials([]Credential{{Name: "default", Fetcher: g.valve}}); err != nil {
		t.Fatal(err)
	}
	if until := g.r.Status().Credentials[0].PausedUntil; until.After(g.clock.Now()) {
		t.Fatalf("still paused until %v after a reload", until)
	}
	if _, err := g.get(other); err != nil {
		t.Fatalf("after the reload: %v", err)
	}
}

// TestPauseNotCutForTokensLetExpire: a token whose entry failed for good
// (or went idle) is let expire, so it does not cut a 429's pause.
func TestPauseNotCutForTokensLetExpire(t *testing.T) {
	g := newRig(t, func(_ *rig, c *Config) { c.Lifetime = 2 * time.Minute })
	a := NewKey("default", "biz_gone", "", nil)
	g.mustGet(a) // expires in 2 min
	g.fake.Enqueue(whoptest.Fault{Status: 403})
	g.advanceTo(g.info(a).NextRefresh)
	g.waitFor(a, "failed for good", func(i EntryInfo) bool { return i.Failures == 1 })
	g.mustGet(key) // 2 min from now: the one to protect
	g.fake.Enqueue(whoptest.Fault{Status: 429, RetryAfter: "60"})
	if _, err := g.get(NewKey("default", "biz_other", "", nil)); err == nil {
		t.Fatal("the 429 answer gave a token")
	}
	c := g.r.Status().Credentials[0]
	if left := c.PausedUntil.Sub(g.clock.Now()); strings.Contains(c.PauseReason, "cut short") || left < 59*time.Second {
		t.Fatalf("paused %v (%q): a token let expire cut the pause", left, c.PauseReason)
	}
}
