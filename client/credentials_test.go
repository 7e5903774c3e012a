package client_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/credentials/local"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/tokend/tokend/client"
)

// authServer is a gRPC service on a Unix socket whose interceptor records
// each call's authorization metadata and refuses calls without a bearer.
type authServer struct {
	socket string
	mu     sync.Mutex
	seen   []string
}

func startAuthServer(t *testing.T) *authServer {
	t.Helper()
	dir, err := os.MkdirTemp("", "tc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	a := &authServer{socket: filepath.Join(dir, "a.sock")}
	ln, err := net.Listen("unix", a.socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(local.NewCredentials()), grpc.UnaryInterceptor(
		func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
			md, _ := metadata.FromIncomingContext(ctx)
			auth := md.Get("authorization")
			a.mu.Lock()
			a.seen = append(a.seen, auth...)
			a.mu.Unlock()
			if len(auth) != 1 {
				return nil, status.Error(codes.Unauthenticated, "want one authorization header")
			}
			return handler(ctx, req)
		}))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return a
}

func (a *authServer) headers() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.seen...)
}

func TestPerRPCCredentials(t *testing.T) {
	ctx := testContext(t)
	c := newClient(t, shared.socket)
	ts := c.TokenSource("biz_rpc", "chat:read")
	a := startAuthServer(t)

	conn, err := grpc.NewClient("unix://"+a.socket,
		grpc.WithTransportCredentials(local.NewCredentials()),
		grpc.WithPerRPCCredentials(client.PerRPCCredentials(ts)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for range 2 {
		if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	tok, err := c.Token(ctx, client.Request{CompanyID: "biz_rpc", Scopes: []string{"chat:read"}})
	if err != nil {
		t.Fatal(err)
	}
	seen := a.headers()
	if len(seen) != 2 {
		t.Fatalf("server saw %d authorization headers, want 2", len(seen))
	}
	for i, h := range seen {
		if h != "Bearer "+tok.Value {
			t.Errorf("call %d: authorization is not Bearer with tokend's current token", i)
		}
	}
}

// TestPerRPCCredentialsNeedPrivacy: over a connection without privacy the
// token is never sent.
func TestPerRPCCredentialsNeedPrivacy(t *testing.T) {
	ctx := testContext(t)
	c := newClient(t, shared.socket)
	a := startAuthServer(t)
	conn, err := grpc.NewClient("unix://"+a.socket,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithPerRPCCredentials(client.PerRPCCredentials(c.TokenSource("biz_rpc"))))
	if err == nil {
		defer conn.Close()
		_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	}
	if err == nil {
		t.Fatal("call with insecure transport credentials succeeded; want it refused before sending the token")
	}
	if seen := a.headers(); len(seen) != 0 {
		t.Fatalf("server saw %d authorization headers, want none", len(seen))
	}
	t.Logf("refused as expected: %v", err)
}
