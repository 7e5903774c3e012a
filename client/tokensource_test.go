package client_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/oauth2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tokend/tokend/client"
	"github.com/tokend/tokend/internal/clock"
	"github.com/tokend/tokend/internal/daemontest"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// requireWatchTokens fails the test when the daemon does not serve
// WatchTokens: the tokend built from this tree must. It probes with a
// subscription tokend must refuse (no subject), so no token is minted.
func requireWatchTokens(t *testing.T, socket string) {
	t.Helper()
	if !servesWatchTokens(t, socket) {
		t.Fatal("tokend does not serve WatchTokens")
	}
}

func servesWatchTokens(t *testing.T, socket string) bool {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := tokendv1.NewTokenServiceClient(conn).WatchTokens(ctx)
	if err == nil {
		err = st.Send(&tokendv1.WatchTokensRequest{Op: &tokendv1.WatchTokensRequest_Subscribe{
			Subscribe: &tokendv1.WatchSubscribe{Id: 1, Request: &tokendv1.GetTokenRequest{}},
		}})
	}
	if err == nil || err == io.EOF {
		_, err = st.Recv()
	}
	// Any answer but Unimplemented (a subscription end, most likely) means
	// the method is there.
	return status.Code(err) != codes.Unimplemented
}

// wireLog records the streams a client opens and what it sends and
// receives on WatchTokens: ids, requests and end codes, never a token.
type wireLog struct {
	mu      sync.Mutex
	streams map[string]int
	subs    []sub
	unsubs  []uint64
	touches [][]uint64
	ends    map[uint64]codes.Code
}

type sub struct {
	id  uint64
	req *tokendv1.GetTokenRequest
}

func (w *wireLog) option() client.Option {
	return client.WithDialOptions(grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		w.mu.Lock()
		if w.streams == nil {
			w.streams = make(map[string]int)
		}
		w.streams[method[strings.LastIndex(method, "/")+1:]]++
		w.mu.Unlock()
		cs, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			return nil, err
		}
		return wiredStream{cs, w}, nil
	}))
}

type wiredStream struct {
	grpc.ClientStream
	w *wireLog
}

func (s wiredStream) SendMsg(m any) error {
	if r, ok := m.(*tokendv1.WatchTokensRequest); ok {
		s.w.mu.Lock()
		switch op := r.Op.(type) {
		case *tokendv1.WatchTokensRequest_Subscribe:
			s.w.subs = append(s.w.subs, sub{op.Subscribe.GetId(), op.Subscribe.GetRequest()})
		case *tokendv1.WatchTokensRequest_Unsubscribe:
			s.w.unsubs = append(s.w.unsubs, op.Unsubscribe)
		case *tokendv1.WatchTokensRequest_Touch:
			s.w.touches = append(s.w.touches, append([]uint64(nil), op.Touch.GetIds()...))
		}
		s.w.mu.Unlock()
	}
	return s.ClientStream.SendMsg(m)
}

func (s wiredStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	if r, ok := m.(*tokendv1.WatchTokensResponse); ok && err == nil && r.GetEndCode() != 0 {
		s.w.mu.Lock()
		if s.w.ends == nil {
			s.w.ends = make(map[uint64]codes.Code)
		}
		s.w.ends[r.GetId()] = codes.Code(r.GetEndCode())
		s.w.mu.Unlock()
	}
	return err
}

func (w *wireLog) streamCount(method string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.streams[method]
}

// subscriptions returns the ids of the subscriptions sent for company, in order.
func (w *wireLog) subscriptions(company string) []uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	var ids []uint64
	for _, s := range w.subs {
		if s.req.GetCompanyId() == company {
			ids = append(ids, s.id)
		}
	}
	return ids
}

func (w *wireLog) unsubscribed(id uint64) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Contains(w.unsubs, id)
}

func (w *wireLog) ended(id uint64) codes.Code {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.ends[id]
}

// touch returns the ids of the nth touch (from 0), and whether it was sent.
func (w *wireLog) touch(n int) ([]uint64, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if n >= len(w.touches) {
		return nil, false
	}
	return w.touches[n], true
}

// waitFor polls cond until it holds, for conditions that hang on another
// process or a socket, not on time passing.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("after 10s: still waiting for %s", what)
		}
	}
}

func adminClient(t *testing.T, socket string) tokendv1.AdminServiceClient {
	t.Helper()
	conn, err := daemontest.Dial(socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return tokendv1.NewAdminServiceClient(conn)
}

// TestHTTPClientFollowsRefresh: an HTTP client with an oauth2.Transport on a
// TokenSource sends the current token, and after tokend refreshes it
// (tokenctl refresh) the next request carries the new one, pushed over the
// client's WatchTokens stream rather than fetched. (oauth2.NewClient would
// keep the old token, still valid for an hour, by design.)
func TestHTTPClientFollowsRefresh(t *testing.T) {
	d := startTestDaemon(t)
	requireWatchTokens(t, d.socket)
	ctx := testContext(t)
	req := client.Request{CompanyID: "biz_http", Scopes: []string{"chat:read"}}

	var rpcs rpcCounter
	var wire wireLog
	c := newClient(t, d.socket, rpcs.option(), wire.option())
	ts := c.NewTokenSource(req)
	defer ts.Close()
	httpClient := &http.Client{Transport: &oauth2.Transport{Source: ts}}

	var mu sync.Mutex
	var got string
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = r.Header.Get("Authorization")
		mu.Unlock()
	}))
	defer api.Close()
	send := func() string {
		t.Helper()
		resp, err := httpClient.Get(api.URL)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		mu.Lock()
		defer mu.Unlock()
		return got
	}
	// The daemon's view, through a client of its own.
	daemonClient := newClient(t, d.socket)
	current := func() *client.Token {
		t.Helper()
		tok, err := daemonClient.Token(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	admin := adminClient(t, d.socket)

	prev := send()
	cur := current()
	if prev != "Bearer "+cur.Value {
		t.Fatalf("first request: Authorization is not the daemon's current token")
	}
	waitFor(t, "the source's subscription to answer", func() bool { return c.Watching() == 1 })
	for refresh := 1; refresh <= 2; refresh++ {
		if _, err := admin.RefreshEntry(ctx, &tokendv1.RefreshEntryRequest{KeyId: cur.KeyID}); err != nil {
			t.Fatalf("refresh %d: %v", refresh, err)
		}
		var h string
		waitFor(t, fmt.Sprintf("refresh %d to reach the source", refresh), func() bool { h = send(); return h != prev })
		if cur = current(); h != "Bearer "+cur.Value {
			t.Fatalf("refresh %d: Authorization is not the daemon's current token", refresh)
		}
		prev = h
	}
	if n := rpcs.count("GetToken"); n != 1 {
		t.Errorf("the source made %d GetToken calls, want 1: refreshes should arrive over WatchTokens", n)
	}
	if n, old := wire.streamCount("WatchTokens"), wire.streamCount("WatchToken"); n != 1 || old != 0 {
		t.Errorf("streams opened: %d WatchTokens, %d WatchToken; want 1 and 0", n, old)
	}
}

// fakeTokens is a TokenService with tokens of a given lifetime, replaced
// like tokend does once a third of the lifetime is left. With watch unset
// it answers WatchTokens with Unimplemented, as a tokend before
// WatchTokens; with watch set it answers each subscription with the
// current token, and with evictFirst it ends the very first subscription
// with ABORTED after its token (an eviction) and mints a new token for
// each later one; with failFirst it ends the first subscription with that
// code instead of a token. breakStreams ends every open stream with
// Unavailable.
type fakeTokens struct {
	tokendv1.UnimplementedTokenServiceServer
	lifetime          time.Duration
	watch, evictFirst bool
	failFirst         codes.Code

	gets, watches, watching, subscribes atomic.Int32

	mu      sync.Mutex
	n       int
	cur     *tokendv1.Token
	broken  chan struct{}
	getsFor map[string]int // GetToken calls by company
}

func (f *fakeTokens) token(force bool) *tokendv1.Token {
	f.mu.Lock()
	defer f.mu.Unlock()
	if force || f.cur == nil || time.Until(f.cur.ExpiresAt.AsTime()) < f.lifetime/3 {
		f.n++
		f.cur = &tokendv1.Token{Token: fmt.Sprintf("token-%d", f.n), ExpiresAt: timestamppb.New(time.Now().Add(f.lifetime)), KeyId: "fake"}
	}
	return f.cur
}

func (f *fakeTokens) GetToken(ctx context.Context, req *tokendv1.GetTokenRequest) (*tokendv1.Token, error) {
	f.gets.Add(1)
	f.mu.Lock()
	if f.getsFor == nil {
		f.getsFor = make(map[string]int)
	}
	f.getsFor[req.GetCompanyId()]++
	f.mu.Unlock()
	return f.token(false), nil
}

func (f *fakeTokens) getCount(company string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.getsFor[company]
}

func (f *fakeTokens) breakCh() chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.broken == nil {
		f.broken = make(chan struct{})
	}
	return f.broken
}

func (f *fakeTokens) breakStreams() {
	close(f.breakCh())
	f.mu.Lock()
	f.broken = nil
	f.mu.Unlock()
}

func (f *fakeTokens) WatchTokens(st tokendv1.TokenService_WatchTokensServer) error {
	f.watches.Add(1)
	if !f.watch {
		return status.Error(codes.Unimplemented, "method WatchTokens not implemented")
	}
	f.watching.Add(1)
	defer f.watching.Add(-1)
	broken := f.breakCh()
	reqs, errc := make(chan *tokendv1.WatchTokensRequest), make(chan error, 1)
	go func() {
		for {
			r, err := st.Recv()
			if err != nil {
				errc <- err
				return
			}
			select {
			case reqs <- r:
			case <-st.Context().Done():
				return
			}
		}
	}()
	for {
		select {
		case <-broken:
			return status.Error(codes.Unavailable, "fake: stream broken")
		case err := <-errc:
			if err == io.EOF {
				return nil
			}
			return err
		case r := <-reqs:
			s := r.GetSubscribe()
			if s == nil {
				continue
			}
			n := f.subscribes.Add(1)
			if f.failFirst != codes.OK && n == 1 {
				if err := st.Send(&tokendv1.WatchTokensResponse{Id: s.GetId(), EndCode: int32(f.failFirst), EndMessage: "fake: refused"}); err != nil {
					return err
				}
				continue
			}
			if err := st.Send(&tokendv1.WatchTokensResponse{Id: s.GetId(), Token: f.token(f.evictFirst && n > 1)}); err != nil {
				return err
			}
			if f.evictFirst && n == 1 {
				if err := st.Send(&tokendv1.WatchTokensResponse{Id: s.GetId(), EndCode: int32(codes.Aborted), EndMessage: "entry fake was evicted"}); err != nil {
					return err
				}
			}
		}
	}
}

// serveFake serves f on a fresh Unix socket and returns its path.
func serveFake(t *testing.T, f *fakeTokens) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "tc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	socket := filepath.Join(dir, "f.sock")
	ln, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	tokendv1.RegisterTokenServiceServer(srv, f)
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return socket
}

// TestTokenSourcePollsWithoutWatch: against a tokend without WatchTokens,
// the source still replaces its token ahead of expiry, in the background.
func TestTokenSourcePollsWithoutWatch(t *testing.T) {
	f := &fakeTokens{lifetime: 4 * time.Second}
	c := newClient(t, serveFake(t, f))
	const margin = 800 * time.Millisecond
	ts := c.NewTokenSource(client.Request{CompanyID: "biz_poll", MinTTL: margin})
	defer ts.Close()
	first, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	for {
		asked := time.Now()
		tok, err := ts.Token()
		if err != nil {
			t.Fatal(err)
		}
		if tok.AccessToken != first.AccessToken {
			// Before the margin Token only reads the cache: the poller put it there.
			if left := first.Expiry.Sub(asked); left <= margin {
				t.Fatalf("token replaced only when Token had to fetch it (%v left); want a poll ahead of expiry", left)
			}
			break
		}
		if time.Now().After(first.Expiry) {
			t.Fatal("token not replaced before it expired")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := f.watches.Load(); n < 1 {
		t.Errorf("WatchTokens calls = %d, want at least 1 before falling back", n)
	}
	if n := f.gets.Load(); n > 6 {
		t.Errorf("GetToken calls = %d for one replacement, want a handful", n)
	}
}

// TestTokenSourceRewatches: a subscription that ends (here: the entry was
// evicted) is renewed on the same stream and delivers the next token;
// Client.Close ends the stream.
func TestTokenSourceRewatches(t *testing.T) {
	f := &fakeTokens{lifetime: time.Hour, watch: true, evictFirst: true}
	c, err := client.New(serveFake(t, f))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ts := c.TokenSource("biz_rewatch")
	first, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		tok, err := ts.Token()
		if err != nil {
			t.Fatal(err)
		}
		if tok.AccessToken != first.AccessToken {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no new token 5s after the subscription ended")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := f.gets.Load(); n != 1 {
		t.Errorf("GetToken calls = %d, want 1: the new token should come over the stream", n)
	}
	if n := f.subscribes.Load(); n != 2 {
		t.Errorf("subscriptions = %d, want 2", n)
	}
	if n := f.watches.Load(); n != 1 {
		t.Errorf("WatchTokens streams = %d, want 1: an ended subscription does not end the stream", n)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); f.watching.Load() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("watch stream still open 5s after Client.Close")
		}
	}
	if _, err := ts.Token(); !errors.Is(err, client.ErrClosed) {
		t.Fatalf("Token after Client.Close: err = %v, want ErrClosed", err)
	}
}

// TestTokenSourcesReconnect: when the stream breaks, the sources answer
// from memory, and once the backoff has passed (on a fake clock) one new
// stream resubscribes every one of them, without a GetToken.
func TestTokenSourcesReconnect(t *testing.T) {
	f := &fakeTokens{lifetime: time.Hour, watch: true}
	clk := clock.NewFake(time.Now())
	var rpcs rpcCounter
	c := newClient(t, serveFake(t, f), client.WithClock(clk), rpcs.option())
	sources := []oauth2.TokenSource{c.TokenSource("biz_re1"), c.TokenSource("biz_re2")}
	for _, ts := range sources {
		if _, err := ts.Token(); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "both subscriptions to answer", func() bool { return c.Watching() == 2 })

	f.breakStreams()
	waitFor(t, "the client to see the stream end", func() bool { return !c.StreamUp() })
	for _, ts := range sources {
		if tok, err := ts.Token(); err != nil || !tok.Valid() {
			t.Fatalf("Token while the stream is down: %v, %v; want the cached token", tok, err)
		}
	}
	clk.Advance(reconnectWait)
	waitFor(t, "both sources to be watched again", func() bool { return c.Watching() == 2 })
	if n := f.watches.Load(); n != 2 {
		t.Errorf("WatchTokens streams = %d, want 2 (one before the break, one after)", n)
	}
	if n := f.subscribes.Load(); n != 4 {
		t.Errorf("subscriptions = %d, want 4 (each source on each stream)", n)
	}
	if n := rpcs.count("GetToken"); n != 2 {
		t.Errorf("GetToken calls = %d, want 2 (each source's first token)", n)
	}
}

// reconnectWait is more than the first backoff after a broken stream.
const reconnectWait = time.Second

// TestSubscriptionErrorResubscribes: a subscription tokend ends with an
// error (here PermissionDenied) leaves the source answering from memory and
// on demand, and it subscribes again after a backoff (on a fake clock).
func TestSubscriptionErrorResubscribes(t *testing.T) {
	f := &fakeTokens{lifetime: time.Hour, watch: true, failFirst: codes.PermissionDenied}
	clk := clock.NewFake(time.Now())
	var wire wireLog
	c := newClient(t, serveFake(t, f), client.WithClock(clk), wire.option())
	ts := c.TokenSource("biz_denied")
	if _, err := ts.Token(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the first subscription to end", func() bool {
		ids := wire.subscriptions("biz_denied")
		return len(ids) == 1 && wire.ended(ids[0]) == codes.PermissionDenied
	})
	if tok, err := ts.Token(); err != nil || !tok.Valid() {
		t.Fatalf("Token after the subscription ended: %v, %v; want the cached token", tok, err)
	}
	// The first retry waits at most resubscribeBase (1s). The end may not
	// be handled yet, so keep moving the clock until it is.
	waitFor(t, "a second subscription that answers", func() bool {
		clk.Advance(time.Second)
		return c.Watching() == 1
	})
	if ids := wire.subscriptions("biz_denied"); len(ids) != 2 {
		t.Errorf("subscriptions: %v, want 2", ids)
	}
	if n := f.watches.Load(); n != 1 {
		t.Errorf("WatchTokens streams = %d, want 1: an ended subscription does not end the stream", n)
	}
}
