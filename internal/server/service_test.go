package server

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/tokend/tokend/internal/cache"
	"github.com/tokend/tokend/internal/peercred"
	"github.com/tokend/tokend/internal/refresher"
	"github.com/tokend/tokend/internal/safesocket"
	"github.com/tokend/tokend/internal/whop"
	"github.com/tokend/tokend/internal/whop/whoptest"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// svcRig is the real server on a real Unix socket, in front of a real
// refresher and bbolt store minting from the fake upstream over HTTP.
type svcRig struct {
	fake    *whoptest.Server
	ref     *refresher.Refresher
	tokens  tokendv1.TokenServiceClient
	admin   tokendv1.AdminServiceClient
	metrics *recordedMetrics
}

// newTokens is a refresher on a real bbolt file minting from the fake
// upstream over HTTP; its limiter is wide so tests mint hundreds of keys.
func newTokens(tb testing.TB) (*refresher.Refresher, *whoptest.Server) {
	tb.Helper()
	fake, err := whoptest.NewServer(whoptest.Config{Keys: map[string][]string{"svc_key": nil}})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(fake.Close)
	store, _, err := cache.Open(cache.Config{Path: filepath.Join(tb.TempDir(), "cache.db")})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { store.Close() })
	wc, err := whop.New(whop.Config{BaseURL: fake.URL(), APIKey: "svc_key", FingerprintSalt: store.Salt()})
	if err != nil {
		tb.Fatal(err)
	}
	ref, err := refresher.New(refresher.Config{Store: store, Fetcher: wc, Rate: 1000, Burst: 1000, MaxInFlight: 16})
	if err != nil {
		tb.Fatal(err)
	}
	return ref, fake
}

func newSvcRig(t *testing.T) *svcRig {
	t.Helper()
	ref, fake := newTokens(t)
	dir, err := os.MkdirTemp("", "tsv") // short: sun_path
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s.sock")
	ln, err := safesocket.Listen(sock, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	m := &recordedMetrics{}
	// A uid's default share (MissShare) of the rig's upstream budget.
	srv := New(Config{Tokens: ref, SelfUID: uint32(os.Getuid()), Metrics: m, MissRate: 1000 * MissShare, MissBurst: 1000 * MissShare})
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); ref.Run(ctx) }()
	go func() { defer wg.Done(); srv.Serve(ctx, ln) }()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		cancel()
		wg.Wait()
	})
	return &svcRig{fake: fake, ref: ref, tokens: tokendv1.NewTokenServiceClient(conn), admin: tokendv1.NewAdminServiceClient(conn), metrics: m}
}

// recordedMetrics is the server's Metrics, counting results.
type recordedMetrics struct {
	mu     sync.Mutex
	counts map[string]int
}

func (m *recordedMetrics) GetToken(result string, code codes.Code) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.counts == nil {
		m.counts = map[string]int{}
	}
	m.counts[result+"/"+code.String()]++
}

func (m *recordedMetrics) get(k string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.counts[k]
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestGetTokenSources: a miss is counted as a miss, the next call as a hit,
// joiners of one mint as joined, a reported rejected token as refreshed; bad
// requests are InvalidArgument without an upstream call.
func TestGetTokenSources(t *testing.T) {
	g := newSvcRig(t)
	ctx := testCtx(t)
	req := &tokendv1.GetTokenRequest{CompanyId: "biz_s", ScopedActions: []string{"chat:read"}}
	first, err := g.tokens.GetToken(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	again, err := g.tokens.GetToken(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if again.GetToken() != first.GetToken() || again.GetKeyId() != first.GetKeyId() || len(first.GetKeyId()) != cache.IDLen {
		t.Fatalf("hit answered key %q (same token: %v), miss key %q; want the same key of %d characters and token", again.GetKeyId(), again.GetToken() == first.GetToken(), first.GetKeyId(), cache.IDLen)
	}
	fresh, err := g.tokens.GetToken(ctx, &tokendv1.GetTokenRequest{CompanyId: "biz_s", ScopedActions: []string{"chat:read"}, RejectedToken: first.GetToken()})
	if err != nil {
		t.Fatal(err)
	}
	if fresh.GetToken() == first.GetToken() {
		t.Fatal("a token reported rejected was handed out again")
	}

	g.fake.SetLatency(200 * time.Millisecond)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := g.tokens.GetToken(ctx, &tokendv1.GetTokenRequest{CompanyId: "biz_herd"}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if n := g.fake.CallsFor("biz_herd"); n != 1 {
		t.Fatalf("8 concurrent misses made %d upstream calls, want 1", n)
	}
	before := g.fake.CallCount()
	_, err = g.tokens.GetToken(ctx, &tokendv1.GetTokenRequest{CompanyId: "not_a_company"})
	if status.Code(err) != codes.InvalidArgument || g.fake.CallCount() != before {
		t.Fatalf("bad company_id: %v after %d upstream calls, want InvalidArgument and none", err, g.fake.CallCount()-before)
	}
	for k, want := range map[string]int{"miss/OK": 2, "hit/OK": 1, "refreshed/OK": 1, "joined/OK": 7, "error/InvalidArgument": 1} {
		if got := g.metrics.get(k); got != want {
			t.Errorf("metrics %s = %d, want %d (all: %v)", k, got, want, g.metrics.counts)
		}
	}
}

// TestWatchTokensMultiplexes: many keys on one stream, each answered at
// once, a refresh delivered to its subscription only, and subscriptions
// ended one by one (evict: Aborted; bad request and reused id:
// InvalidArgument) while the stream and the others go on.
func TestWatchTokensMultiplexes(t *testing.T) {
	g := newSvcRig(t)
	ctx := testCtx(t)
	st, err := g.tokens.WatchTokens(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const n = 300 // more than a connection's 128 concurrent streams
	for i := range uint64(n) {
		req := &tokendv1.GetTokenRequest{CompanyId: "biz_w" + strconv.FormatUint(i, 10)}
		if err := st.Send(&tokendv1.WatchTokensRequest{Op: &tokendv1.WatchTokensRequest_Subscribe{Subscribe: &tokendv1.WatchSubscribe{Id: i, Request: req}}}); err != nil {
			t.Fatal(err)
		}
	}
	first := map[uint64]*tokendv1.Token{}
	for len(first) < n {
		r, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if r.GetEndCode() != 0 || r.GetToken().GetToken() == "" {
			t.Fatalf("subscription %d: end %d %q, want a token", r.GetId(), r.GetEndCode(), r.GetEndMessage())
		}
		first[r.GetId()] = r.GetToken()
	}
	// A unary call on the same connection is not held up.
	if _, err := g.tokens.GetToken(ctx, &tokendv1.GetTokenRequest{CompanyId: "biz_unary"}); err != nil {
		t.Fatalf("GetToken beside %d watches: %v", n, err)
	}

	send := func(r *tokendv1.WatchTokensRequest) {
		t.Helper()
		if err := st.Send(r); err != nil {
			t.Fatal(err)
		}
	}
	recv := func() *tokendv1.WatchTokensResponse {
		t.Helper()
		r, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	if _, err := g.admin.RefreshEntry(ctx, &tokendv1.RefreshEntryRequest{KeyId: first[7].GetKeyId()}); err != nil {
		t.Fatal(err)
	}
	if r := recv(); r.GetId() != 7 || r.GetToken().GetToken() == first[7].GetToken() || r.GetToken().GetKeyId() != first[7].GetKeyId() {
		t.Fatalf("after a refresh of 7: id %d, same token %v", r.GetId(), r.GetToken().GetToken() == first[7].GetToken())
	}
	send(&tokendv1.WatchTokensRequest{Op: &tokendv1.WatchTokensRequest_Subscribe{Subscribe: &tokendv1.WatchSubscribe{Id: 3, Request: &tokendv1.GetTokenRequest{CompanyId: "biz_x"}}}})
	if r := recv(); r.GetId() != 3 || codes.Code(r.GetEndCode()) != codes.InvalidArgument {
		t.Fatalf("reused id 3: %d %v %q, want InvalidArgument for 3", r.GetId(), codes.Code(r.GetEndCode()), r.GetEndMessage())
	}
	send(&tokendv1.WatchTokensRequest{Op: &tokendv1.WatchTokensRequest_Subscribe{Subscribe: &tokendv1.WatchSubscribe{Id: 1000, Request: &tokendv1.GetTokenRequest{CompanyId: "nope"}}}})
	if r := recv(); r.GetId() != 1000 || codes.Code(r.GetEndCode()) != codes.InvalidArgument {
		t.Fatalf("bad request: %d %v, want InvalidArgument for 1000", r.GetId(), codes.Code(r.GetEndCode()))
	}
	if _, err := g.admin.EvictEntries(ctx, &tokendv1.EvictEntriesRequest{Target: &tokendv1.EvictEntriesRequest_KeyId{KeyId: first[9].GetKeyId()}}); err != nil {
		t.Fatal(err)
	}
	if r := recv(); r.GetId() != 9 || codes.Code(r.GetEndCode()) != codes.Aborted {
		t.Fatalf("evicted 9: %d %v %q, want Aborted for 9", r.GetId(), codes.Code(r.GetEndCode()), r.GetEndMessage())
	}
	// Unsubscribed: a refresh of 11 sends nothing; 12's still arrives.
	send(&tokendv1.WatchTokensRequest{Op: &tokendv1.WatchTokensRequest_Unsubscribe{Unsubscribe: 11}})
	send(&tokendv1.WatchTokensRequest{Op: &tokendv1.WatchTokensRequest_Touch{Touch: &tokendv1.WatchTouch{Ids: []uint64{12, 13}}}})
	for _, id := range []uint64{11, 12} {
		if _, err := g.admin.RefreshEntry(ctx, &tokendv1.RefreshEntryRequest{KeyId: first[id].GetKeyId()}); err != nil {
			t.Fatal(err)
		}
	}
	if r := recv(); r.GetId() != 12 || r.GetToken() == nil {
		t.Fatalf("after refreshing 11 (unsubscribed) and 12: got id %d, want 12's token", r.GetId())
	}
	e, err := g.admin.GetEntry(ctx, &tokendv1.GetEntryRequest{KeyId: first[13].GetKeyId()})
	if err != nil {
		t.Fatal(err)
	}
	if got, was := e.GetLastRequestedAt().AsTime(), first[13].GetExpiresAt().AsTime().Add(-time.Hour); !got.After(was.Add(time.Millisecond)) {
		t.Fatalf("touch did not count as a request: last requested %v", got)
	}
	if err := st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err == nil {
		t.Fatal("stream went on after the client closed its side")
	}
}

// TestAdminOverSocket: list, get by prefix, refresh and evict, with the
// errors an operator sees for a bad id.
func TestAdminOverSocket(t *testing.T) {
	g := newSvcRig(t)
	ctx := testCtx(t)
	for _, c := range []string{"biz_a1", "biz_a2"} {
		if _, err := g.tokens.GetToken(ctx, &tokendv1.GetTokenRequest{CompanyId: c}); err != nil {
			t.Fatal(err)
		}
	}
	list, err := g.admin.ListEntries(ctx, &tokendv1.ListEntriesRequest{})
	if err != nil || len(list.GetEntries()) != 2 {
		t.Fatalf("list: %d entries, %v; want 2", len(list.GetEntries()), err)
	}
	one := list.GetEntries()[0]
	if one.GetState() != tokendv1.EntryState_ENTRY_STATE_FRESH || one.GetNextRefreshAt() == nil || one.GetJwtClaimsJson() == "" {
		t.Fatalf("entry %+v: want fresh, scheduled, with decoded claims", one)
	}
	got, err := g.admin.GetEntry(ctx, &tokendv1.GetEntryRequest{KeyId: one.GetKeyId()[:6]})
	if err != nil || got.GetKeyId() != one.GetKeyId() {
		t.Fatalf("get by prefix: %v, %v", got.GetKeyId(), err)
	}
	ref, err := g.admin.RefreshEntry(ctx, &tokendv1.RefreshEntryRequest{KeyId: one.GetKeyId()})
	if err != nil || ref.GetRefreshes() != one.GetRefreshes()+1 {
		t.Fatalf("refresh: refreshes %d (was %d), %v", ref.GetRefreshes(), one.GetRefreshes(), err)
	}
	for _, tc := range []struct {
		id   string
		code codes.Code
	}{{"", codes.InvalidArgument}, {"zzzz", codes.NotFound}} {
		if _, err := g.admin.GetEntry(ctx, &tokendv1.GetEntryRequest{KeyId: tc.id}); status.Code(err) != tc.code {
			t.Errorf("get %q: %v, want %v", tc.id, err, tc.code)
		}
	}
	ev, err := g.admin.EvictEntries(ctx, &tokendv1.EvictEntriesRequest{Target: &tokendv1.EvictEntriesRequest_Subject{Subject: "biz_a2"}})
	if err != nil || len(ev.GetKeyIds()) != 1 {
		t.Fatalf("evict subject: %v, %v", ev.GetKeyIds(), err)
	}
	st, err := g.admin.GetStatus(ctx, &tokendv1.GetStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.GetEntries() != 1 || st.GetEntriesByState()["fresh"] != 1 || st.GetUpstreamCalls() != 3 {
		t.Fatalf("status: %d entries, by state %v, %d upstream calls; want 1, fresh 1, 3", st.GetEntries(), st.GetEntriesByState(), st.GetUpstreamCalls())
	}
}

// TestAuthorizationTableComplete fails when a method is registered without
// an entry in the authorization table, or the table names one that is not.
func TestAuthorizationTableComplete(t *testing.T) {
	s := New(Config{Tokens: nil})
	seen := map[string]bool{}
	for svc, info := range s.grpc.GetServiceInfo() {
		for _, m := range info.Methods {
			name := "/" + svc + "/" + m.Name
			seen[name] = true
			if methods[name] == 0 {
				t.Errorf("%s has no entry in the authorization table (auth.go: methods)", name)
			}
		}
	}
	for name := range methods {
		if !seen[name] {
			t.Errorf("authorization table names %s, which the server does not register", name)
		}
	}
}

// TestAuthorization: who may call what, unary and streaming alike.
func TestAuthorization(t *testing.T) {
	s := New(Config{SelfUID: 999})
	as := func(uid uint32) context.Context {
		return peer.NewContext(context.Background(), &peer.Peer{AuthInfo: &peercred.Info{UID: uid}})
	}
	for _, tc := range []struct {
		method string
		uid    uint32
		ok     bool
	}{
		{tokendv1.TokenService_GetToken_FullMethodName, 1234, true},
		{tokendv1.TokenService_WatchTokens_FullMethodName, 1234, true},
		{tokendv1.AdminService_GetStatus_FullMethodName, 1234, true},
		{tokendv1.AdminService_EvictEntries_FullMethodName, 1234, false},
		{tokendv1.AdminService_ListEntries_FullMethodName, 1234, false},
		{tokendv1.AdminService_CheckPolicy_FullMethodName, 1234, false},
		{tokendv1.AdminService_EvictEntries_FullMethodName, 0, true},
		{tokendv1.AdminService_RefreshEntry_FullMethodName, 999, true},
		{"/grpc.health.v1.Health/Check", 1234, true},
		{"/tokend.v1.TokenService/Unlisted", 0, false},
	} {
		err := s.allow(as(tc.uid), tc.method)
		if (err == nil) != tc.ok || err != nil && status.Code(err) != codes.PermissionDenied {
			t.Errorf("%s as uid %d: %v, want allowed=%v", tc.method, tc.uid, err, tc.ok)
		}
		unaryRan := false
		_, uerr := s.authorizeUnary(as(tc.uid), nil, &grpc.UnaryServerInfo{FullMethod: tc.method}, func(context.Context, any) (any, error) { unaryRan = true; return nil, nil })
		streamRan := false
		serr := s.authorizeStream(nil, fakeStream{ctx: as(tc.uid)}, &grpc.StreamServerInfo{FullMethod: tc.method}, func(any, grpc.ServerStream) error { streamRan = true; return nil })
		if unaryRan != tc.ok || streamRan != tc.ok || (uerr == nil) != tc.ok || (serr == nil) != tc.ok {
			t.Errorf("%s as uid %d: unary ran %v (%v), stream ran %v (%v), want %v", tc.method, tc.uid, unaryRan, uerr, streamRan, serr, tc.ok)
		}
	}
}

type fakeStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (f fakeStream) Context() context.Context { return f.ctx }
