package client_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/oauth2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tokend/tokend/client"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// skipWithoutWatch skips the test when the daemon does not serve WatchToken.
func skipWithoutWatch(t *testing.T, socket string, req client.Request) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := tokendv1.NewTokenServiceClient(conn).WatchToken(ctx, &tokendv1.GetTokenRequest{CompanyId: req.CompanyID, UserId: req.UserID, ScopedActions: req.Scopes, MinTtl: durationpb.New(req.MinTTL)})
	if err == nil {
		_, err = st.Recv()
	}
	if status.Code(err) == codes.Unimplemented {
		t.Skip("tokend does not serve WatchToken yet")
	}
	if err != nil {
		t.Fatal(err)
	}
}

// TestHTTPClientFollowsRefresh: an oauth2.NewClient on a TokenSource sends
// the current token, and after tokend refreshes it (every ~2s with 3s
// tokens) the next request carries the new one, pushed over WatchToken
// rather than fetched.
func TestHTTPClientFollowsRefresh(t *testing.T) {
	d := startTestDaemon(t, "--token-lifetime", "3s")
	ctx := testContext(t)
	req := client.Request{CompanyID: "biz_http", Scopes: []string{"chat:read"}, MinTTL: 500 * time.Millisecond}
	skipWithoutWatch(t, d.socket, req)

	var rpcs rpcCounter
	c := newClient(t, d.socket, rpcs.option())
	ts := c.NewTokenSource(req)
	defer ts.Close()
	httpClient := oauth2.NewClient(ctx, ts)

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
	current := func() string {
		t.Helper()
		tok, err := newClient(t, d.socket).Token(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		return "Bearer " + tok.Value
	}

	prev := send()
	if want := current(); prev != want {
		t.Fatalf("first request: Authorization is not the daemon's current token")
	}
	for refresh := 1; refresh <= 2; refresh++ {
		deadline := time.Now().Add(10 * time.Second)
		h := send()
		for ; h == prev; h = send() {
			if time.Now().After(deadline) {
				t.Fatalf("refresh %d: token unchanged after 10s", refresh)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if want := current(); h != want {
			t.Fatalf("refresh %d: Authorization is not the daemon's current token", refresh)
		}
		prev = h
	}
	if n := rpcs.count("GetToken"); n != 1 {
		t.Errorf("the source made %d GetToken calls, want 1: refreshes should arrive over WatchToken", n)
	}
}

// fakeTokens is a TokenService with tokens of a given lifetime, replaced
// like tokend does once a third of the lifetime is left. With watch unset
// it answers WatchToken with Unimplemented, as a tokend before WatchToken;
// with watch set, its first stream ends with Aborted after one token (an
// eviction) and later streams mint a new token and then stay open.
type fakeTokens struct {
	tokendv1.UnimplementedTokenServiceServer
	lifetime time.Duration
	watch    bool

	gets, watches, watching atomic.Int32

	mu  sync.Mutex
	n   int
	cur *tokendv1.Token
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
	return f.token(false), nil
}

func (f *fakeTokens) WatchToken(req *tokendv1.GetTokenRequest, st tokendv1.TokenService_WatchTokenServer) error {
	n := f.watches.Add(1)
	f.watching.Add(1)
	defer f.watching.Add(-1)
	if !f.watch {
		return status.Error(codes.Unimplemented, "method WatchToken not implemented")
	}
	if err := st.Send(f.token(n > 1)); err != nil {
		return err
	}
	if n == 1 {
		return status.Error(codes.Aborted, "entry fake was evicted")
	}
	<-st.Context().Done()
	return nil
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

// TestTokenSourcePollsWithoutWatch: against a tokend without WatchToken,
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
		t.Errorf("WatchToken calls = %d, want at least 1 before falling back", n)
	}
	if n := f.gets.Load(); n > 6 {
		t.Errorf("GetToken calls = %d for one replacement, want a handful", n)
	}
}

// TestTokenSourceRewatches: a stream that ends (here: the entry was
// evicted) is reopened and delivers the next token; Client.Close ends it.
func TestTokenSourceRewatches(t *testing.T) {
	f := &fakeTokens{lifetime: time.Hour, watch: true}
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
			t.Fatal("no new token 5s after the stream ended")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := f.gets.Load(); n != 1 {
		t.Errorf("GetToken calls = %d, want 1: the new token should come over the stream", n)
	}
	if n := f.watches.Load(); n != 2 {
		t.Errorf("WatchToken calls = %d, want 2", n)
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
