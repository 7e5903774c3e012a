package server

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/cache"
	"github.com/tokend/tokend/internal/refresher"
	"github.com/tokend/tokend/internal/whop"
	"github.com/tokend/tokend/internal/whop/whoptest"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// BenchmarkGetTokenHit is the hit path of the handler on real parts (cache,
// refresher, Whop client against the fake upstream), without the transport:
// what tokend adds to every call. .ci/run runs it briefly; watch allocs/op.
func BenchmarkGetTokenHit(b *testing.B) {
	ts, req := hitRig(b)
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := ts.GetToken(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}

// TestGetTokenHitAllocs guards the hit path: tokend allocates nothing; the
// reply is built once per token and shared.
func TestGetTokenHitAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	ts, req := hitRig(t)
	ctx := context.Background()
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := ts.GetToken(ctx, req); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("a cache hit allocates %v times; want 0", allocs)
	}
}

// hitRig is a warm tokenService on real parts.
func hitRig(b testing.TB) (*tokenService, *tokendv1.GetTokenRequest) {
	fake, err := whoptest.NewServer(whoptest.Config{Keys: map[string][]string{"k": nil}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(fake.Close)
	c, _, err := cache.Open(cache.Config{Path: filepath.Join(b.TempDir(), "cache.db")})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	client, err := whop.New(whop.Config{BaseURL: fake.URL(), APIKey: "k", FingerprintSalt: c.Salt()})
	if err != nil {
		b.Fatal(err)
	}
	ref, err := refresher.New(refresher.Config{Cache: c, Fetcher: client})
	if err != nil {
		b.Fatal(err)
	}
	s := New(Config{Tokens: ref, Entries: c})
	ts := &tokenService{s: s}
	req := &tokendv1.GetTokenRequest{CompanyId: "biz_bench", ScopedActions: []string{"chat:read", "dms:message:manage"}}
	ctx := context.Background()
	if _, err := ts.GetToken(ctx, req); err != nil {
		b.Fatal(err)
	}
	return ts, req
}

// TestAnswerSharedPerToken: hits share one reply per token, and a new token
// gets a new reply while the old one stays as it was sent.
func TestAnswerSharedPerToken(t *testing.T) {
	ts, req := hitRig(t)
	ctx := context.Background()
	first, err := ts.GetToken(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	again, err := ts.GetToken(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if again != first {
		t.Fatal("two hits on one token built two replies; want one shared reply")
	}
	old := first.GetToken()
	rejected := &tokendv1.GetTokenRequest{CompanyId: req.CompanyId, ScopedActions: req.ScopedActions, RejectedToken: old}
	fresh, err := ts.GetToken(ctx, rejected)
	if err != nil {
		t.Fatal(err)
	}
	if fresh == first || fresh.GetToken() == old {
		t.Fatal("after the token was replaced the reply still carries the old token")
	}
	if first.GetToken() != old {
		t.Fatal("the reply already sent was modified")
	}
	hit, err := ts.GetToken(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if hit != fresh {
		t.Fatal("a hit after the refresh did not share the new token's reply")
	}
	if hit.GetKeyId() != first.GetKeyId() || !hit.GetExpiresAt().AsTime().After(time.Now()) {
		t.Fatalf("new reply: key %q (was %q), expires %v", hit.GetKeyId(), first.GetKeyId(), hit.GetExpiresAt().AsTime())
	}
}
