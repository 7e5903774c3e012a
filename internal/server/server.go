// Package server exposes tokend over gRPC: TokenService for local services,
// AdminService for operators, plus grpc.health.v1 and reflection so grpcurl
// and grpc-health-probe work against the socket. Responses never carry the
// API key, and only GetToken carries a token.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokend/tokend/internal/audit"
	"github.com/tokend/tokend/internal/policy"
	"github.com/tokend/tokend/internal/refresher"
	"github.com/tokend/tokend/internal/whop"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// MaxMessageBytes bounds requests; a GetTokenRequest at its limits is far
// smaller.
const MaxMessageBytes = 16 << 10

// Tokens is what the services need from the refresher, which owns every
// entry: the server keeps no entry of its own and names them by key id.
type Tokens interface {
	Get(ctx context.Context, k refresher.Key, o refresher.Options) (refresher.Result, error)
	Watch(k refresher.Key, notify func()) (*refresher.Watcher, error)
	// Credentials are the configured credential names, sorted.
	Credentials() []string
	IsOAuthUser(name string) (oauth, ok bool)
	Status() refresher.Status

	// For AdminService.
	Entries(match func(refresher.Key) bool) []refresher.EntryInfo
	Find(prefix string) (refresher.EntryInfo, error)
	Refresh(ctx context.Context, prefix string) (refresher.EntryInfo, error)
	Evict(ids ...string) []string
	EvictMatching(match func(refresher.Key) bool) []string
}

// Metrics is what the server reports about GetToken calls.
type Metrics interface {
	// GetToken: result is "hit", "joined", "miss", "refreshed" or "error".
	GetToken(result string, code codes.Code)
}

// Config configures New.
type Config struct {
	Tokens   Tokens
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
	// upstream call. Zero means MissShare of the refresher's default
	// upstream rate and burst.
	MissRate  rate.Limit
	MissBurst int
	// MaxStreams bounds concurrent calls per connection. Default 128.
	MaxStreams uint32
	// Conns caps and times out the connections of every listener Serve is
	// given; zero values mean the defaults.
	Conns ConnLimits
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
	admins  admins
	conns   *connCounts
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
		cfg.MissRate = rate.Limit(refresher.DefaultRate * MissShare)
	}
	if cfg.MissBurst <= 0 {
		cfg.MissBurst = int(math.Ceil(refresher.DefaultBurst * MissShare))
	}
	if cfg.MaxStreams == 0 {
		cfg.MaxStreams = 128
	}
	cfg.Conns = cfg.Conns.withDefaults()
	s := &Server{
		cfg:     cfg,
		health:  health.NewServer(),
		started: cfg.Now(),
		misses:  &missLimits{limit: cfg.MissRate, burst: cfg.MissBurst, byUID: make(map[uint32]*rate.Limiter)},
		admins:  admins{self: cfg.SelfUID, gid: cfg.AdminGID},
	}
	s.conns = newConnCounts(cfg.Conns, s.admins, cfg.Logger)
	s.grpc = grpc.NewServer(
		grpc.Creds(creds{s: s}),
		grpc.MaxRecvMsgSize(MaxMessageBytes),
		grpc.MaxConcurrentStreams(cfg.MaxStreams),
		// A connection that never speaks HTTP/2 is closed after the
		// timeout (gRPC's default is 120s); one without calls after the
		// idle timeout, by a GOAWAY that a gRPC client follows by
		// reconnecting on its next call. A peer that stops answering
		// pings on a long watch is closed too.
		grpc.ConnectionTimeout(cfg.Conns.HandshakeTimeout),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionIdle: cfg.Conns.IdleTimeout,
			Time:              2 * time.Minute,
			Timeout:           20 * time.Second,
		}),
		// Clients may ping every 10s, with or without calls; more often
		// is a flood and ends the connection.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		// Reuse handler goroutines: their stacks are already grown, which
		// a fresh goroutine per call pays for again.
		grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))),
		grpc.UnaryInterceptor(s.authorizeUnary),
		grpc.StreamInterceptor(s.authorizeStream),
	)
	tokendv1.RegisterTokenServiceServer(s.grpc, &tokenService{s: s})
	tokendv1.RegisterAdminServiceServer(s.grpc, &adminService{s: s})
	healthpb.RegisterHealthServer(s.grpc, s.health)
	reflection.Register(s.grpc)
	return s
}

// Serve answers on ln until ctx ends, then stops accepting, lets in-flight
// calls finish for at most StopTimeout, and returns nil. Connections over
// the caps of Config.Conns are closed as they are accepted.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	ln = s.conns.limit(ln)
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
	return answer(g.res.Token, g.res.KeyID), resultNames[g.res.Source], nil
}

// resultNames are the metrics' words for where a token came from.
var resultNames = [...]string{
	refresher.SourceHit:       "hit",
	refresher.SourceJoined:    "joined",
	refresher.SourceMinted:    "miss",
	refresher.SourceRefreshed: "refreshed",
}

// answer is the reply carrying tok. It is built once per token and then
// shared by every hit, so a hit allocates nothing here; gRPC only reads a
// reply while marshalling it.
func answer(tok *refresher.Token, keyID string) *tokendv1.Token {
	if r, ok := tok.Memo().(*tokendv1.Token); ok {
		return r
	}
	return tok.SetMemo(&tokendv1.Token{Token: tok.Value, ExpiresAt: timestamp(tok.ExpiresAt), KeyId: keyID}).(*tokendv1.Token)
}

// MissShare is the default share of a credential's upstream rate and burst
// that one local uid's misses may use: any uid filling the queue leaves
// the rest of the budget to the others.
const MissShare = 0.5

// got is one answered token request.
type got struct {
	k   refresher.Key
	cs  *connState // nil outside a peer-credential connection
	res refresher.Result
}

// get is what GetToken and the watches share: validate the request against
// its credential, apply the policy, answer from the refresher, and record
// the hand-out in the audit trail.
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
		opts.MissLimiter, opts.Caller = cs.misses, cs.label
	}
	res, err := s.cfg.Tokens.Get(ctx, k, opts)
	if err != nil {
		return got{}, upstreamStatus(err)
	}
	g := got{k: k, cs: cs, res: res}
	g.audit(res.Token, res.Source != refresher.SourceHit)
	return g, nil
}

// audit records that tok was handed to the caller's connection.
func (g got) audit(tok *refresher.Token, minted bool) {
	if g.cs != nil && g.cs.audit != nil {
		g.cs.audit.HandedOut(audit.Subject{KeyID: g.res.KeyID, CompanyID: g.k.CompanyID, UserID: g.k.UserID, Scopes: g.k.Scopes}, tok.Value, minted)
	}
}

// parse validates req against its credential and returns its key.
func (s *Server) parse(req *tokendv1.GetTokenRequest) (request, refresher.Key, error) {
	name, err := s.credential(req.GetCredential())
	if err != nil {
		return request{}, refresher.Key{}, err
	}
	oauth, _ := s.cfg.Tokens.IsOAuthUser(name)
	r, err := validate(req, oauth)
	if err != nil {
		return r, refresher.Key{}, err
	}
	return r, refresher.NewKey(name, r.companyID, r.userID, r.scopes), nil
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
	changed := make(chan struct{}, 1)
	sub, first, err := t.s.subscribe(ctx, req, func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	})
	if err != nil {
		return err
	}
	defer sub.stop()
	if err := stream.Send(first); err != nil {
		return err
	}
	for {
		for {
			tok, err, ok := sub.next()
			if !ok {
				break
			}
			if err != nil {
				return err
			}
			if err := stream.Send(tok); err != nil {
				return err
			}
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
	}
}

// subscription is one watched key of one caller.
type subscription struct {
	s *Server
	g got
	w *refresher.Watcher
}

// subscribe gets req's token as GetToken would and watches its entry;
// notify is called after every change (it must not block).
func (s *Server) subscribe(ctx context.Context, req *tokendv1.GetTokenRequest, notify func()) (*subscription, *tokendv1.Token, error) {
	g, err := s.get(ctx, req)
	if err != nil {
		return nil, nil, err
	}
	w, err := s.cfg.Tokens.Watch(g.k, notify)
	if err != nil {
		return nil, nil, watchEnd(g.res.KeyID, err)
	}
	// Whatever changed between Get and Watch, Next reports.
	if u, ok := w.Next(); ok && u.Err == nil {
		g.res.Token, g.res.KeyID = u.Token, u.KeyID
	}
	return &subscription{s: s, g: g, w: w}, answer(g.res.Token, g.res.KeyID), nil
}

// next returns the next reply to send, or the status that ends the watch;
// ok is false when there is nothing new.
func (sub *subscription) next() (tok *tokendv1.Token, end error, ok bool) {
	u, ok := sub.w.Next()
	switch {
	case !ok:
		return nil, nil, false
	case u.Err != nil:
		return nil, watchEnd(sub.g.res.KeyID, u.Err), true
	}
	// The policy may have been reloaded since the watch began.
	if err := sub.s.checkPolicy(sub.g.cs, sub.g.k); err != nil {
		return nil, err, true
	}
	sub.g.audit(u.Token, false)
	return answer(u.Token, u.KeyID), nil, true
}

func (sub *subscription) stop() { sub.w.Stop() }

// watchEnd is the status that ends a watch.
func watchEnd(keyID string, err error) error {
	if errors.Is(err, refresher.ErrEvicted) {
		return status.Errorf(codes.Aborted, "entry %s was evicted; call again to get a new one", keyID)
	}
	return upstreamStatus(err)
}

// upstreamStatus maps a failure to mint into the gRPC code a caller can act
// on. The message is Whop's, or a network error; neither holds the key.
// Whop's own type, code and param travel as a google.rpc.ErrorInfo, and a
// wait Whop asked for as a google.rpc.RetryInfo.
func upstreamStatus(err error) error {
	var we *whop.Error
	var pe *refresher.PausedError
	var be *refresher.BusyError
	switch {
	case errors.As(err, &be):
		// The credential's budget, not Whop: a later call may fit.
		return status.Error(codes.ResourceExhausted, be.Error())
	case errors.As(err, &pe):
		return withDetails(status.New(codes.Unavailable, pe.Error()),
			&errdetails.ErrorInfo{Reason: "RATE_LIMITED", Domain: whopDomain, Metadata: map[string]string{"http_status": "429", "credential": pe.Credential, "pause_reason": pe.Why}},
			&errdetails.RetryInfo{RetryDelay: durationpb.New(max(0, time.Until(pe.Until)))})
	case errors.Is(err, context.DeadlineExceeded):
		// The caller's own deadline: the call it joined goes on.
		return status.Error(codes.DeadlineExceeded, "deadline passed while waiting for Whop; the upstream call goes on, and a token it gets serves the next request")
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
		code := codeForStatus(we.StatusCode)
		var st *status.Status
		switch c := we.StatusCode; {
		case c == 401:
			st = status.Newf(code, "Whop rejected tokend's API key (401): %s", msg)
		case c == 0:
			st = status.Newf(code, "no answer from Whop: %s", msg)
		case c >= 200 && c < 300:
			st = status.Newf(code, "Whop's answer (%d) was unusable: %s", c, msg)
		case code == codes.Unavailable:
			st = status.Newf(code, "Whop is unavailable (%d): %s", c, msg)
		default:
			st = status.Newf(code, "Whop refused (%d): %s", c, msg)
		}
		details := []protoadapt.MessageV1{whopErrorInfo(we)}
		if we.RetryAfter > 0 {
			details = append(details, &errdetails.RetryInfo{RetryDelay: durationpb.New(we.RetryAfter)})
		}
		return withDetails(st, details...)
	default:
		return status.Errorf(codes.Unavailable, "mint token: %v", err)
	}
}

// whopDomain is the ErrorInfo domain of errors that are Whop's answers.
const whopDomain = "api.whop.com"

// whopErrorInfo carries what Whop said beyond its message. The reason is
// Whop's code, else its type, else the HTTP status, in the UPPER_SNAKE
// form google.rpc.ErrorInfo asks for.
func whopErrorInfo(we *whop.Error) *errdetails.ErrorInfo {
	md := map[string]string{"http_status": strconv.Itoa(we.StatusCode)}
	for k, v := range map[string]string{"type": we.Type, "code": we.Code, "param": we.Param, "retry_after_from": we.RetryAfterFrom} {
		if v != "" {
			md[k] = v
		}
	}
	reason := errorReason(we.Code)
	if reason == "" {
		reason = errorReason(we.Type)
	}
	if reason == "" {
		reason = "HTTP_" + strconv.Itoa(we.StatusCode)
		if we.StatusCode == 0 {
			reason = "UPSTREAM_UNREACHABLE"
		}
	}
	return &errdetails.ErrorInfo{Reason: reason, Domain: whopDomain, Metadata: md}
}

// errorReason turns "parameter_invalid" into "PARAMETER_INVALID"; it
// returns "" for text with nothing usable, and keeps at most 63 bytes.
func errorReason(s string) string {
	b := make([]byte, 0, min(len(s), 63))
	for i := 0; i < len(s) && len(b) < 63; i++ {
		switch c := s[i]; {
		case c >= 'a' && c <= 'z':
			b = append(b, c-'a'+'A')
		case c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
			b = append(b, c)
		case len(b) > 0 && b[len(b)-1] != '_':
			b = append(b, '_')
		}
	}
	for len(b) > 0 && b[len(b)-1] == '_' {
		b = b[:len(b)-1]
	}
	if len(b) == 0 || b[0] < 'A' || b[0] > 'Z' {
		return ""
	}
	return string(b)
}

// withDetails attaches details to st; should that fail, st goes without.
func withDetails(st *status.Status, details ...protoadapt.MessageV1) error {
	if d, err := st.WithDetails(details...); err == nil {
		return d.Err()
	}
	return st.Err()
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
	case httpStatus == 0 || httpStatus >= 200 && httpStatus < 300,
		httpStatus == 408 || httpStatus == 429 || httpStatus >= 500:
		// No answer, an unusable one, or Whop busy: the same call may
		// work later.
		return codes.Unavailable
	case httpStatus == 409:
		return codes.Aborted
	default:
		return codes.Unknown
	}
}
