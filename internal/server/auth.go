package server

import (
	"context"
	"fmt"
	"github.com/tokend/tokend/internal/cache"
	"github.com/tokend/tokend/internal/policy"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	"github.com/tokend/tokend/internal/audit"
	"github.com/tokend/tokend/internal/peercred"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// adminPrefix names the methods only administrators may call.
var adminPrefix = "/" + tokendv1.AdminService_ServiceDesc.ServiceName + "/"

// authorize is the unary interceptor that keeps AdminService to uid 0,
// tokend's own uid and members of the admin group. GetStatus carries no
// secret and stays open to every caller of the socket.
func (s *Server) authorize(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if strings.HasPrefix(info.FullMethod, adminPrefix) && info.FullMethod != tokendv1.AdminService_GetStatus_FullMethodName {
		if err := s.checkAdmin(ctx); err != nil {
			return nil, err
		}
	}
	return handler(ctx, req)
}

func (s *Server) checkAdmin(ctx context.Context) error {
	p, ok := peercred.FromContext(ctx)
	if !ok {
		return status.Error(codes.PermissionDenied, "admin: caller's credentials unknown (not a Unix socket connection)")
	}
	if p.UID == 0 || p.UID == s.cfg.SelfUID {
		return nil
	}
	if s.cfg.AdminGID != nil && p.InGroup(*s.cfg.AdminGID) {
		return nil
	}
	why := fmt.Sprintf("AdminService answers only uid 0 and tokend's uid %d", s.cfg.SelfUID)
	if s.cfg.AdminGID != nil {
		why += fmt.Sprintf(" and members of group %s (gid %d)", s.cfg.AdminGroupName, *s.cfg.AdminGID)
	} else {
		why += " (no --admin-group is set)"
	}
	return status.Errorf(codes.PermissionDenied, "admin: uid %d refused: %s", p.UID, why)
}

type connKey struct{}

// connState is what tokend keeps per client connection.
type connState struct {
	peer   *peercred.Info
	audit  *audit.Conn   // nil without an audit trail
	caller policy.Caller // the peer as the policy sees it, built once
}

// connTracker is a stats.Handler that opens per-connection state when a
// connection starts and closes it (writing its audit summary) when it ends.
type connTracker struct {
	s *Server
}

func (t connTracker) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	p, _ := peercred.FromContext(ctx)
	cs := &connState{peer: p}
	if p != nil {
		cs.caller = policy.Caller{UID: p.UID, GID: p.GID, Groups: p.Groups, PID: p.PID, Exe: p.Exe}
	}
	if t.s.cfg.Audit != nil {
		cs.audit = t.s.cfg.Audit.Open(p)
	}
	return context.WithValue(ctx, connKey{}, cs)
}

func (t connTracker) HandleConn(ctx context.Context, st stats.ConnStats) {
	if _, end := st.(*stats.ConnEnd); end {
		if cs, ok := ctx.Value(connKey{}).(*connState); ok && cs.audit != nil {
			cs.audit.Close()
		}
	}
}

func (connTracker) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (connTracker) HandleRPC(context.Context, stats.RPCStats)                       {}

func connFrom(ctx context.Context) *connState {
	cs, _ := ctx.Value(connKey{}).(*connState)
	return cs
}

// missLimits holds one limiter per uid so a single local caller cannot burn
// the API key's quota for everyone.
type missLimits struct {
	limit   rate.Limit
	burst   int
	mu      sync.Mutex
	byUID   map[uint32]*rate.Limiter
	limited atomic.Uint64
}

func (m *missLimits) forUID(uid uint32) *rate.Limiter {
	m.mu.Lock()
	defer m.mu.Unlock()
	l := m.byUID[uid]
	if l == nil {
		l = rate.NewLimiter(m.limit, m.burst)
		m.byUID[uid] = l
	}
	return l
}

// checkPolicy applies the loaded policy, if any, to a token request.
func (s *Server) checkPolicy(cs *connState, k cache.Key) error {
	if s.cfg.Policy == nil {
		return nil
	}
	p := s.cfg.Policy.Load()
	if p == nil {
		return nil
	}
	if cs == nil || cs.peer == nil {
		return status.Error(codes.PermissionDenied, "policy: the caller's credentials are unknown")
	}
	d := p.Check(cs.caller, policy.Request{Credential: k.Credential, CompanyID: k.CompanyID, UserID: k.UserID, Scopes: k.Scopes})
	if !d.Allowed {
		return status.Error(codes.PermissionDenied, "policy: "+d.Reason)
	}
	return nil
}
