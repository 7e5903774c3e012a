package client_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokend/tokend/client"
)

func newClient(t *testing.T, socket string, opts ...client.Option) *client.Client {
	t.Helper()
	c, err := client.New(socket, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// rpcCounter counts the unary calls a client makes, by method.
type rpcCounter struct {
	mu sync.Mutex
	n  map[string]int
}

func (r *rpcCounter) option() client.Option {
	return client.WithDialOptions(grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		r.mu.Lock()
		if r.n == nil {
			r.n = make(map[string]int)
		}
		r.n[method[strings.LastIndex(method, "/")+1:]]++
		r.mu.Unlock()
		return invoker(ctx, method, req, reply, cc, opts...)
	}))
}

func (r *rpcCounter) count(method string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n[method]
}

func TestToken(t *testing.T) {
	ctx := testContext(t)
	c := newClient(t, shared.socket)
	req := client.Request{CompanyID: "biz_token", UserID: "user_token", Scopes: []string{"chat:read", "dms:read"}, MinTTL: 2 * time.Minute}
	tok, err := c.Token(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	claims, err := shared.fake.Verify(tok.Value)
	if err != nil {
		t.Fatal(err)
	}
	if claims.CompanyID != "biz_token" || claims.UserID != "user_token" || strings.Join(claims.Scopes, " ") != "chat:read dms:read" {
		t.Errorf("claims = %+v, want biz_token/user_token with chat:read dms:read", claims)
	}
	if tok.KeyID == "" || time.Until(tok.ExpiresAt) < 2*time.Minute {
		t.Errorf("key id %q, expires in %v: want an id and at least 2m", tok.KeyID, time.Until(tok.ExpiresAt))
	}
	again, err := c.Token(ctx, client.Request{CompanyID: "biz_token", UserID: "user_token", Scopes: []string{"dms:read", "chat:read", "chat:read"}})
	if err != nil {
		t.Fatal(err)
	}
	if again.Value != tok.Value || again.KeyID != tok.KeyID {
		t.Errorf("same subject and scope set gave another token (key %s, then %s)", tok.KeyID, again.KeyID)
	}
	if n := shared.fake.CallsFor("biz_token/user_token"); n != 1 {
		t.Errorf("upstream calls = %d, want 1", n)
	}
	for _, format := range []string{"%v", "%+v", "%#v", "%s"} {
		if s := fmt.Sprintf(format, tok); strings.Contains(s, tok.Value) || !strings.Contains(s, tok.KeyID) {
			t.Errorf("Sprintf(%q, token) = %q: want the key id and not the token", format, s)
		}
	}
}

func TestTokenErrors(t *testing.T) {
	ctx := testContext(t)
	c := newClient(t, shared.socket)
	for _, tc := range []struct {
		name string
		req  client.Request
		code codes.Code
		msg  string
	}{
		{"no subject", client.Request{Scopes: []string{"chat:read"}}, codes.InvalidArgument, "company_id or user_id is required"},
		{"bad company", client.Request{CompanyID: "acme"}, codes.InvalidArgument, `company_id "acme"`},
		{"empty scope", client.Request{UserID: "user_1", Scopes: []string{""}}, codes.InvalidArgument, "scoped_actions[0]"},
		{"min ttl over 3h", client.Request{UserID: "user_1", MinTTL: 4 * time.Hour}, codes.InvalidArgument, "min_ttl"},
		{"unknown credential", client.Request{UserID: "user_1", Credential: "nope"}, codes.InvalidArgument, `credential "nope"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := c.Token(ctx, tc.req)
			if status.Code(err) != tc.code || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %v: want %v naming %q", err, tc.code, tc.msg)
			}
		})
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Token(ctx, client.Request{CompanyID: "biz_1"}); !errors.Is(err, client.ErrClosed) {
		t.Fatalf("after Close: err = %v, want ErrClosed", err)
	}
}

func TestTokenDaemonDown(t *testing.T) {
	ctx, cancel := context.WithTimeout(testContext(t), 5*time.Second)
	defer cancel()
	c := newClient(t, t.TempDir()+"/none.sock")
	_, err := c.Token(ctx, client.Request{CompanyID: "biz_1"})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("err = %v, want Unavailable", err)
	}
}

func TestTokenSourceSubjects(t *testing.T) {
	c := newClient(t, shared.socket)
	for _, tc := range []struct{ subject, company, user string }{
		{"biz_subj", "biz_subj", ""},
		{"user_subj", "", "user_subj"},
		{"biz_subj/user_subj", "biz_subj", "user_subj"},
	} {
		t.Run(tc.subject, func(t *testing.T) {
			tok, err := c.TokenSource(tc.subject, "chat:read").Token()
			if err != nil {
				t.Fatal(err)
			}
			if tok.TokenType != "Bearer" || !tok.Valid() {
				t.Errorf("type %q, valid %v: want a valid Bearer token", tok.TokenType, tok.Valid())
			}
			claims, err := shared.fake.Verify(tok.AccessToken)
			if err != nil {
				t.Fatal(err)
			}
			if claims.CompanyID != tc.company || claims.UserID != tc.user {
				t.Errorf("claims company %q user %q, want %q %q", claims.CompanyID, claims.UserID, tc.company, tc.user)
			}
		})
	}
	for _, subject := range []string{"", "biz_", "user_", "acme", "user_1/biz_1", "biz_1/", "/user_1", "biz_1/user_1/user_2", "biz_1/biz_2"} {
		t.Run("invalid "+subject, func(t *testing.T) {
			_, err := c.TokenSource(subject).Token()
			if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("subject %q", subject)) || !strings.Contains(err.Error(), "biz_.../user_...") {
				t.Fatalf("err = %v: want one naming the subject and the accepted forms", err)
			}
		})
	}
}

func TestTokenSourceShared(t *testing.T) {
	c := newClient(t, shared.socket)
	a := c.TokenSource("biz_share", "b", "a")
	if b := c.TokenSource("biz_share", "a", "b", "a"); a != b {
		t.Error("same subject and scope set: want the same source")
	}
	if b := c.TokenSource("biz_share", "a"); a == b {
		t.Error("another scope set: want another source")
	}
	if _, ok := a.(interface{ Close() error }); ok {
		t.Error("a shared source must not be closable by one of its holders")
	}
}

// TestTokenSourceConcurrent: callers arriving together share one GetToken,
// and the watcher then keeps the token without more of them.
func TestTokenSourceConcurrent(t *testing.T) {
	var rpcs rpcCounter
	c := newClient(t, shared.socket, rpcs.option())
	ts := c.NewTokenSource(client.Request{CompanyID: "biz_conc", Scopes: []string{"chat:read"}})
	defer ts.Close()
	var wg sync.WaitGroup
	var first atomic.Value
	for range 100 {
		wg.Go(func() {
			tok, err := ts.Token()
			if err != nil {
				t.Error(err)
				return
			}
			first.CompareAndSwap(nil, tok.AccessToken)
			if tok.AccessToken != first.Load() {
				t.Error("concurrent callers got different tokens")
			}
		})
	}
	wg.Wait()
	if n := rpcs.count("GetToken"); n != 1 {
		t.Errorf("GetToken calls = %d, want 1", n)
	}
	if n := shared.fake.CallsFor("biz_conc"); n != 1 {
		t.Errorf("upstream calls = %d, want 1", n)
	}
	if err := ts.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.Token(); !errors.Is(err, client.ErrClosed) {
		t.Fatalf("after Close: err = %v, want ErrClosed", err)
	}
}
