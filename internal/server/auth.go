package server

import (
	"context"
	"fmt"
	"github.com/tokend/tokend/internal/cache"
	"github.com/tokend/tokend/internal/policy"
	"net"
	"strings"
	"sync"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
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

// connState is what tokend keeps per client connection.
type connState struct {
	peer   *peercred.Info
	audit  *audit.Conn   // nil without an audit trail
	caller policy.Caller // the peer as the policy sees it, built once
	misses *rate.Limiter // the peer uid's miss limiter, shared by its connections
}

// creds reads the peer's credentials once per connection and attaches
// tokend's per-connection state to them, so calls find it in their AuthInfo
// without per-call work; closing the connection closes the state.
type creds struct {
	peercred.Credentials
	s *Server
}

func (c creds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, ai, err := c.Credentials.ServerHandshake(conn)
	if err != nil {
		return nil, nil, err
	}
	p := ai.(*peercred.Info)
	cs := &connState{peer: p, caller: policy.Caller{UID: p.UID, GID: p.GID, Groups: p.Groups, PID: p.PID, Exe: p.Exe}, misses: c.s.misses.forUID(p.UID)}
	if c.s.cfg.Audit != nil {
		cs.audit = c.s.cfg.Audit.Open(p)
	}
	p.Local = cs
	return &stateConn{Conn: conn, state: cs}, p, nil
}

func (c creds) Clone() credentials.TransportCredentials { return c }

// stateConn ends a connection's state when gRPC closes it.
type stateConn struct {
	net.Conn
	state *connState
	once  sync.Once
}

func (c *stateConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		if c.state.audit != nil {
			c.state.audit.Close()
		}
	})
	return err
}

func connFrom(ctx context.Context) *connState {
	p, ok := peercred.FromContext(ctx)
	if !ok {
		return nil
	}
	cs, _ := p.Local.(*connState)
	return cs
}

// missLimits holds one limiter per uid so a single local caller cannot burn
// the API key's quota for everyone.
type missLimits struct {
	limit rate.Limit
	burst int
	mu    sync.Mutex
	byUID map[uint32]*rate.Limiter
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
