package server

import (
	"context"
	"fmt"
	"github.com/tokend/tokend/internal/policy"
	"github.com/tokend/tokend/internal/refresher"
	"net"
	"strconv"
	"sync"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionv1 "google.golang.org/grpc/reflection/grpc_reflection_v1"
	reflectionv1alpha "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/status"

	"github.com/tokend/tokend/internal/audit"
	"github.com/tokend/tokend/internal/peercred"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// access is who may call a method.
type access uint8

const (
	// accessToken: any caller of the socket; the policy decides per key.
	accessToken access = iota + 1
	// accessAdmin: uid 0, tokend's own uid and the admin group.
	accessAdmin
	// accessStatus: anyone; non-administrators get a redacted answer.
	accessStatus
	// accessHealth and accessReflection: anyone; they carry no secret,
	// and grpc-health-probe and grpcurl need them.
	accessHealth
	accessReflection
)

// methods is the authorization table: every method of every service the
// server registers has an entry, and a method without one is refused.
// TestAuthorizationTableComplete fails when a method is added without one.
var methods = map[string]access{
	tokendv1.TokenService_GetToken_FullMethodName:    accessToken,
	tokendv1.TokenService_WatchToken_FullMethodName:  accessToken,
	tokendv1.TokenService_WatchTokens_FullMethodName: accessToken,

	tokendv1.AdminService_ListEntries_FullMethodName:  accessAdmin,
	tokendv1.AdminService_GetEntry_FullMethodName:     accessAdmin,
	tokendv1.AdminService_EvictEntries_FullMethodName: accessAdmin,
	tokendv1.AdminService_RefreshEntry_FullMethodName: accessAdmin,
	tokendv1.AdminService_CheckPolicy_FullMethodName:  accessAdmin,
	tokendv1.AdminService_GetStatus_FullMethodName:    accessStatus,

	healthpb.Health_Check_FullMethodName: accessHealth,
	healthpb.Health_Watch_FullMethodName: accessHealth,
	healthpb.Health_List_FullMethodName:  accessHealth,

	reflectionv1.ServerReflection_ServerReflectionInfo_FullMethodName:      accessReflection,
	reflectionv1alpha.ServerReflection_ServerReflectionInfo_FullMethodName: accessReflection,
}

// allow applies the table to one call.
func (s *Server) allow(ctx context.Context, method string) error {
	switch methods[method] {
	case accessToken, accessStatus, accessHealth, accessReflection:
		return nil
	case accessAdmin:
		return s.checkAdmin(ctx)
	}
	return status.Errorf(codes.PermissionDenied, "method %s is not in tokend's authorization table", method)
}

// authorizeUnary and authorizeStream apply the table to every call.
func (s *Server) authorizeUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := s.allow(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (s *Server) authorizeStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := s.allow(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return handler(srv, ss)
}

func (s *Server) checkAdmin(ctx context.Context) error {
	p, ok := peercred.FromContext(ctx)
	if !ok {
		return status.Error(codes.PermissionDenied, "admin: caller's credentials unknown (not a Unix socket connection)")
	}
	if s.admins.isAdmin(p.UID, p.GID, func() []uint32 { return p.Groups }) {
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

// admins says who administers tokend: uid 0, tokend's own uid and the
// members of the admin group. They may call AdminService and take the
// connections kept in reserve.
type admins struct {
	self uint32
	gid  *uint32 // nil: no admin group
}

// isAdmin decides for a peer; groups (its supplementary groups) is called
// only when the uid and primary gid do not decide.
func (a admins) isAdmin(uid, gid uint32, groups func() []uint32) bool {
	if uid == 0 || uid == a.self {
		return true
	}
	if a.gid == nil {
		return false
	}
	p := peercred.Info{GID: gid}
	if !p.InGroup(*a.gid) {
		p.Groups = groups()
	}
	return p.InGroup(*a.gid)
}

// connState is what tokend keeps per client connection.
type connState struct {
	peer   *peercred.Info
	audit  *audit.Conn   // nil without an audit trail
	caller policy.Caller // the peer as the policy sees it, built once
	misses *rate.Limiter // the peer uid's miss limiter, shared by its connections
	label  string        // "uid N", naming the caller in the refresher's queue
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
	cs := &connState{peer: p, caller: policy.Caller{UID: p.UID, GID: p.GID, Groups: p.Groups, PID: p.PID, Exe: p.Exe}, misses: c.s.misses.forUID(p.UID), label: "uid " + strconv.FormatUint(uint64(p.UID), 10)}
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
func (s *Server) checkPolicy(cs *connState, k refresher.Key) error {
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
