// Package server exposes tokend over gRPC: TokenService for local services,
// AdminService for operators, plus grpc.health.v1 and reflection so grpcurl
// and grpc-health-probe work against the socket. Responses never carry the
// API key, and only GetToken carries a token.
package server

import (
	"runtime"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/tokend/tokend/internal/policy"
	"golang.org/x/time/rate"

	"context"
	"errors"
	"fmt"
	"github.com/tokend/tokend/internal/audit"
	"log/slog"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	"github.com/tokend/tokend/internal/cache"
	"github.com/tokend/tokend/internal/refresher"
	"github.com/tokend/tokend/internal/whop"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// MaxMessageBytes bounds requests; a GetTokenRequest at its limits is far
// smaller.
const MaxMessageBytes = 16 << 10

// Tokens is what the services need from the refresher.
type Tokens interface {
	Get(ctx context.Context, k cache.Key, o refresher.Options) (*cache.Token, *cache.Entry, error)
	Refresh(ctx context.Context, e *cache.Entry) error
	Evict(es ...*cache.Entry)
	Stats() refresher.Stats
	// For WatchToken.
	Watch(e *cache.Entry) (stop func())
	Changed(e *cache.Entry) <-chan struct{}
	Live(e *cache.Entry) bool
	LastError(e *cache.Entry) error
	// Credentials are the configured credential names, sorted.
	Credentials() []string
	IsOAuthUser(name string) (oauth, ok bool)
	CredentialStats() []refresher.CredentialStats
}

// Metrics is what the server reports about GetToken calls.
type Metrics interface {
	// GetToken: result is "hit", "miss", "refreshed" or "error".
	GetToken(result string, code codes.Code)
}

// Entries is the read side of the cache that AdminService lists.
type Entries interface {
	Entries() []*cache.Entry
	Find(prefix string) (*cache.Entry, error)
	WriteStatus() (pending int, lastErr error)
}

// Config configures New.
type Config struct {
	Tokens   Tokens
	Entries  Entries
	Logger   *slog.Logger
	Version  string
	Socket   string
	StateDir string
	Now      func() time.Time
	// StopTimeout bounds how long Serve waits for in-flight calls after ctx
	// ends. Default 5s.
	StopTimeout time.Duration

	// SelfUID is tokend's own uid, which may call AdminService.
	SelfUID uint32
	// AdminGID, when set, is the group whose members may call AdminService.
	AdminGID       *uint32
	AdminGroupName string
	// Audit records who got which token; nil means no audit trail.
	Audit *audit.Trail
	// MissRate and MissBurst bound, per caller uid, the misses that start an
	// upstream call. Zero means 10/s with a burst of 1000, enough for a
	// service warming a thousand keys at start.
	MissRate  rate.Limit
	MissBurst int
	// MaxStreams bounds concurrent calls per connection. Default 128.
	MaxStreams uint32
	// Conns reports the connection limit, when the listener has one.
	Conns *ConnLimit
	// SealedCache says whether tokens are sealed at rest, for status.
	SealedCache bool
	// Metrics counts GetToken calls; nil counts nothing.
	Metrics Metrics
	// Policy, when it holds one, decides who may ask for which token; it
	// is swapped on reload. Nil or empty: anyone who can open the socket.
	Policy *atomic.Pointer[policy.Policy]
}

// Server is tokend's gRPC server.
type Server struct {
	cfg     Config
	grpc    *grpc.Server
	health  *health.Server
	started time.Time
	misses  *missLimits
}

// New builds the server and registers every service.
func New(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.StopTimeout <= 0 {
		cfg.StopTimeout = 5 * time.Second
	}
	if cfg.MissRate <= 0 {
		cfg.MissRate = 10
	}
	if cfg.MissBurst <= 0 {
		cfg.MissBurst = 1000
	}
	if cfg.MaxStreams == 0 {
		cfg.MaxStreams = 128
	}
	s := &Server{
		cfg:     cfg,
		health:  health.NewServer(),
		started: cfg.Now(),
		misses:  &missLimits{limit: cfg.MissRate, burst: cfg.MissBurst, byUID: make(map[uint32]*rate.Limiter)},
	}
	s.grpc = grpc.NewServer(
		grpc.Creds(creds{s: s}),
		grpc.MaxRecvMsgSize(MaxMessageBytes),
		grpc.MaxConcurrentStreams(cfg.MaxStreams),
		// Reuse handler goroutines: their stacks are already grown, which
		// a fresh goroutine per call pays for again.
		grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))),
		grpc.UnaryInterceptor(s.authorize),
	)
	tokendv1.RegisterTokenServiceServer(s.grpc, &tokenService{s: s})
	tokendv1.RegisterAdminServiceServer(s.grpc, &adminService{s: s})
	healthpb.RegisterHealthServer(s.grpc, s.health)
	reflection.Register(s.grpc)
	return s
}

// Serve answers on ln until ctx ends, then stops accepting, lets in-flight
// calls finish for at most StopTimeout, and returns nil.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	for _, name := range []string{"", tokendv1.TokenService_ServiceDesc.ServiceName, tokendv1.AdminService_ServiceDesc.ServiceName} {
		s.health.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	}
	errc := make(chan error, 1)
	go func() { errc <- s.grpc.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve gRPC on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	s.health.Shutdown()
	stopped := make(chan struct{})
	go func() {
		s.grpc.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(s.cfg.StopTimeout):
		s.cfg.Logger.Warn("in-flight calls did not finish in time; closing them", "timeout", s.cfg.StopTimeout)
		s.grpc.Stop()
		<-stopped
	}
	return nil
}

type tokenService struct {
	tokendv1.UnimplementedTokenServiceServer
	s *Server
}

var _ tokendv1.TokenServiceServer = (*tokenService)(nil)

func (t *tokenService) GetToken(ctx context.Context, req *tokendv1.GetTokenRequest) (*tokendv1.Token, error) {
	tok, result, err := t.getToken(ctx, req)
	if m := t.s.cfg.Metrics; m != nil {
		m.GetToken(result, status.Code(err))
	}
	return tok, err
}

func (t *tokenService) getToken(ctx context.Context, req *tokendv1.GetTokenRequest) (_ *tokendv1.Token, result string, _ error) {
	g, err := t.s.get(ctx, req)
	if err != nil {
		return nil, "error", err
	}
	result = "hit"
	switch {
	case g.minted && req.GetRejectedToken() != "":
		result = "refreshed"
	case g.minted:
		result = "miss"
	}
	return answer(g.tok, g.e), result, nil
}

// answer is the reply carrying tok, an entry's token. It is built once per
// token and then shared by every hit, so a hit allocates nothing here;
// gRPC only reads a reply while marshalling it.
func answer(tok *cache.Token, e *cache.Entry) *tokendv1.Token {
	if r, ok := tok.Reply().(*tokendv1.Token); ok {
		return r
	}
	return tok.SetReply(&tokendv1.Token{Token: tok.Value, ExpiresAt: timestamp(tok.ExpiresAt), KeyId: e.ID()}).(*tokendv1.Token)
}

// got is one answered token request.
type got struct {
	k      cache.Key
	cs     *connState // nil outside a peer-credential connection
	tok    *cache.Token
	e      *cache.Entry
	minted bool // obtained from Whop for this call, not from the cache
}

// get is what GetToken and WatchToken share: validate the request against
// its credential, apply the policy, answer from the cache or Whop, and
// record the hand-out in the audit trail.
func (s *Server) get(ctx context.Context, req *tokendv1.GetTokenRequest) (got, error) {
	r, k, err := s.parse(req)
	if err != nil {
		return got{}, err
	}
	cs := connFrom(ctx)
	if err := s.checkPolicy(cs, k); err != nil {
		return got{}, err
	}
	opts := refresher.Options{MinTTL: r.minTTL, Rejected: req.GetRejectedToken()}
	if cs != nil {
		opts.MissLimiter = cs.misses
	}
	start := time.Now()
	tok, e, err := s.cfg.Tokens.Get(ctx, k, opts)
	if err != nil {
		return got{}, upstreamStatus(err)
	}
	g := got{k: k, cs: cs, tok: tok, e: e, minted: !tok.ObtainedAt.Before(start)}
	g.audit(tok, g.minted)
	return g, nil
}

// audit records that tok was handed to the caller's connection.
func (g got) audit(tok *cache.Token, minted bool) {
	if g.cs != nil && g.cs.audit != nil {
		g.cs.audit.HandedOut(audit.Subject{KeyID: g.e.ID(), CompanyID: g.k.CompanyID, UserID: g.k.UserID, Scopes: g.k.Scopes}, tok.Value, minted)
	}
}

// parse validates req against its credential and returns its cache key.
func (s *Server) parse(req *tokendv1.GetTokenRequest) (request, cache.Key, error) {
	name, err := s.credential(req.GetCredential())
	if err != nil {
		return request{}, cache.Key{}, err
	}
	oauth, _ := s.cfg.Tokens.IsOAuthUser(name)
	r, err := validate(req, oauth)
	if err != nil {
		return r, cache.Key{}, err
	}
	return r, cache.NewKey(name, r.companyID, r.userID, r.scopes), nil
}

// credential resolves a request's credential name: empty means "default",
// or the only credential when there is just one.
func (s *Server) credential(name string) (string, error) {
	names := s.cfg.Tokens.Credentials()
	if name == "" {
		switch {
		case slices.Contains(names, "default"):
			return "default", nil
		case len(names) == 1:
			return names[0], nil
		}
		return "", invalid("credential is required: tokend holds several (%s) and none is named default", strings.Join(names, ", "))
	}
	if !slices.Contains(names, name) {
		return "", invalid("credential %q: no such credential; tokend holds %s", name, strings.Join(names, ", "))
	}
	return name, nil
}

// WatchToken sends the current token, then each replacement as soon as
// the refresher installs it. A stalled watcher blocks only its own Send.
func (t *tokenService) WatchToken(req *tokendv1.GetTokenRequest, stream tokendv1.TokenService_WatchTokenServer) error {
	ctx := stream.Context()
	g, err := t.s.get(ctx, req)
	if err != nil {
		return err
	}
	k, cs, e, tok := g.k, g.cs, g.e, g.tok
	tokens := t.s.cfg.Tokens
	stop := tokens.Watch(e)
	defer stop()
	send := func(tok *cache.Token) error {
		return stream.Send(answer(tok, e))
	}
	if err := send(tok); err != nil {
		return err
	}
	last := tok
	for {
		var changed <-chan struct{}
		if tokens.Live(e) { // a dead entry never changes again: no channel for it
			changed = tokens.Changed(e)
		}
		switch cur := e.Token(); {
		case cur != nil && cur != last:
			// The policy may have been reloaded since the stream opened.
			if err := t.s.checkPolicy(cs, k); err != nil {
				return err
			}
			g.audit(cur, false)
			if err := send(cur); err != nil {
				return err
			}
			last = cur
			continue
		case changed == nil || !tokens.Live(e):
			if m := e.Meta(); m.State == cache.StateFailing {
				if err := tokens.LastError(e); err != nil {
					return upstreamStatus(err)
				}
			}
			return status.Errorf(codes.Aborted, "entry %s was evicted; call again to get a new one", e.ID())
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
	}
}

// upstreamStatus maps a failure to mint into the gRPC code a caller can act
// on. The message is Whop's, or a network error; neither holds the key.
func upstreamStatus(err error) error {
	var we *whop.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline passed while waiting for Whop; the token will be cached for the next call")
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "call cancelled")
	case errors.Is(err, refresher.ErrUnknownCredential):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, refresher.ErrLifetime):
		return status.Error(codes.OutOfRange, err.Error())
	case errors.Is(err, refresher.ErrMissRateLimited):
		return status.Error(codes.ResourceExhausted, "too many cache misses from this uid; tokend limits misses per local user to protect the API key's quota (--miss-rate-per-uid); retry later")
	case errors.As(err, &we):
		msg := we.Message
		if msg == "" {
			msg = we.Error()
		}
		switch code := codeForStatus(we.StatusCode); code {
		case codes.FailedPrecondition:
			return status.Errorf(code, "Whop rejected tokend's API key (401): %s", msg)
		case codes.Unavailable:
			if we.StatusCode == 0 {
				return status.Errorf(code, "Whop is unreachable: %s", msg)
			}
			return status.Errorf(code, "Whop is unavailable (%d): %s", we.StatusCode, msg)
		default:
			return status.Errorf(code, "Whop refused (%d): %s", we.StatusCode, msg)
		}
	default:
		return status.Errorf(codes.Unavailable, "mint token: %v", err)
	}
}

func codeForStatus(httpStatus int) codes.Code {
	switch {
	case httpStatus == 400 || httpStatus == 422:
		return codes.InvalidArgument
	case httpStatus == 401:
		return codes.FailedPrecondition
	case httpStatus == 403:
		return codes.PermissionDenied
	case httpStatus == 404:
		return codes.NotFound
	case httpStatus == 0 || httpStatus == 408 || httpStatus == 429 || httpStatus >= 500:
		return codes.Unavailable
	default:
		return codes.Unknown
	}
}
