package server

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/peer"

	"github.com/tokend/tokend/internal/audit"
	"github.com/tokend/tokend/internal/metrics"
	"github.com/tokend/tokend/internal/policy"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// BenchmarkGetTokenHit is the hit path of the handler on real parts (cache,
// refresher, Whop client against the fake upstream), without the transport:
// what tokend adds to every call. "production" adds what a production host
// turns on: a peer-credential connection state from a real Unix socket, a
// policy, the audit trail and metrics. .ci/run runs it briefly; watch
// allocs/op.
func BenchmarkGetTokenHit(b *testing.B) {
	for _, prod := range []bool{false, true} {
		b.Run(rigName(prod), func(b *testing.B) {
			ctx, ts, req := hitRig(b, prod)
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if _, err := ts.GetToken(ctx, req); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func rigName(production bool) string {
	if production {
		return "production"
	}
	return "plain"
}

// TestGetTokenHitAllocs guards the hit path: tokend allocates nothing; the
// reply is built once per token and shared.
func TestGetTokenHitAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	for _, prod := range []bool{false, true} {
		t.Run(rigName(prod), func(t *testing.T) {
			ctx, ts, req := hitRig(t, prod)
			allocs := testing.AllocsPerRun(1000, func() {
				if _, err := ts.GetToken(ctx, req); err != nil {
					t.Fatal(err)
				}
			})
			if allocs != 0 {
				t.Fatalf("a cache hit allocates %v times; want 0", allocs)
			}
		})
	}
}

// hitRig is a warm tokenService on real parts. With production set, the
// returned context carries the state of a real peer-credential handshake
// on a Unix socket pair, and the server has a policy, an audit trail and
// metrics.
func hitRig(b testing.TB, production bool) (context.Context, *tokenService, *tokendv1.GetTokenRequest) {
	ref, _ := newTokens(b)
	cfg := Config{Tokens: ref}
	ctx := context.Background()
	if production {
		pol, err := policy.Parse("bench-policy.yaml", fmt.Appendf(nil, `rules:
  - name: bench
    users: [%d]
    subjects:
      companies: ["biz_*"]
    scopes: ["chat:*", "dms:*"]
`, os.Getuid()), nil)
		if err != nil {
			b.Fatal(err)
		}
		cfg.Policy = new(atomic.Pointer[policy.Policy])
		cfg.Policy.Store(pol)
		cfg.Audit = audit.New(audit.Config{Logger: slog.New(slog.NewJSONHandler(io.Discard, nil))})
		cfg.Metrics = metrics.New(func() metrics.Snapshot { return metrics.Snapshot{} })
	}
	s := New(cfg)
	if production {
		ctx = handshake(b, s)
	}
	ts := &tokenService{s: s}
	req := &tokendv1.GetTokenRequest{CompanyId: "biz_bench", ScopedActions: []string{"chat:read", "dms:message:manage"}}
	if _, err := ts.GetToken(ctx, req); err != nil {
		b.Fatal(err)
	}
	return ctx, ts, req
}

// handshake runs the server's transport handshake on one end of a Unix
// socket pair and returns a context carrying its AuthInfo, as gRPC gives a
// call on that connection.
func handshake(b testing.TB, s *Server) context.Context {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		b.Fatal(err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		conns[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			b.Fatal(err)
		}
	}
	conn, info, err := (creds{s: s}).ServerHandshake(conns[0])
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		conn.Close()
		conns[1].Close()
	})
	return peer.NewContext(context.Background(), &peer.Peer{AuthInfo: info})
}

// TestAnswerSharedPerToken: hits share one reply per token, and a new token
// gets a new reply while the old one stays as it was sent.
func TestAnswerSharedPerToken(t *testing.T) {
	ctx, ts, req := hitRig(t, false)
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
