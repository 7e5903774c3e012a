package server

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"github.com/tokend/tokend/internal/metrics"
	"github.com/tokend/tokend/internal/policy"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tokend/tokend/internal/cache"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

type adminService struct {
	tokendv1.UnimplementedAdminServiceServer
	s *Server
}

var _ tokendv1.AdminServiceServer = (*adminService)(nil)

func (a *adminService) ListEntries(_ context.Context, req *tokendv1.ListEntriesRequest) (*tokendv1.ListEntriesResponse, error) {
	now := a.s.cfg.Now()
	resp := &tokendv1.ListEntriesResponse{}
	for _, e := range a.s.cfg.Entries.Entries() {
		if req.GetSubject() != "" && !hasSubject(e, req.GetSubject()) {
			continue
		}
		if req.GetCredential() != "" && e.Key().Credential != req.GetCredential() {
			continue
		}
		resp.Entries = append(resp.Entries, entryProto(e, now))
	}
	return resp, nil
}

func hasSubject(e *cache.Entry, subject string) bool {
	k := e.Key()
	return k.CompanyID == subject || k.UserID == subject
}

func (a *adminService) find(id string) (*cache.Entry, error) {
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "key_id is required")
	}
	e, err := a.s.cfg.Entries.Find(id)
	switch {
	case errors.Is(err, cache.ErrNotFound):
		return nil, status.Errorf(codes.NotFound, "key %q: no entry has that id (tokenctl list shows them)", id)
	case errors.Is(err, cache.ErrAmbiguous):
		return nil, status.Errorf(codes.InvalidArgument, "key %q: prefix matches more than one entry; give more characters", id)
	case err != nil:
		return nil, status.Errorf(codes.Internal, "find key %q: %v", id, err)
	}
	return e, nil
}

func (a *adminService) GetEntry(_ context.Context, req *tokendv1.GetEntryRequest) (*tokendv1.Entry, error) {
	e, err := a.find(req.GetKeyId())
	if err != nil {
		return nil, err
	}
	return entryProto(e, a.s.cfg.Now()), nil
}

func (a *adminService) EvictEntries(_ context.Context, req *tokendv1.EvictEntriesRequest) (*tokendv1.EvictEntriesResponse, error) {
	var victims []*cache.Entry
	switch t := req.GetTarget().(type) {
	case *tokendv1.EvictEntriesRequest_KeyId:
		e, err := a.find(t.KeyId)
		if err != nil {
			return nil, err
		}
		victims = []*cache.Entry{e}
	case *tokendv1.EvictEntriesRequest_Subject:
		if t.Subject == "" {
			return nil, status.Error(codes.InvalidArgument, "subject is empty")
		}
		for _, e := range a.s.cfg.Entries.Entries() {
			if hasSubject(e, t.Subject) {
				victims = append(victims, e)
			}
		}
	case *tokendv1.EvictEntriesRequest_All:
		if !t.All {
			return nil, status.Error(codes.InvalidArgument, "all must be true to evict every entry")
		}
		victims = a.s.cfg.Entries.Entries()
	default:
		return nil, status.Error(codes.InvalidArgument, "target is required: key_id, subject or all")
	}
	a.s.cfg.Tokens.Evict(victims...)
	resp := &tokendv1.EvictEntriesResponse{}
	for _, e := range victims {
		resp.KeyIds = append(resp.KeyIds, e.ID())
	}
	a.s.cfg.Logger.Info("evicted entries", "count", len(victims))
	return resp, nil
}

func (a *adminService) RefreshEntry(ctx context.Context, req *tokendv1.RefreshEntryRequest) (*tokendv1.Entry, error) {
	e, err := a.find(req.GetKeyId())
	if err != nil {
		return nil, err
	}
	if err := a.s.cfg.Tokens.Refresh(ctx, e); err != nil {
		return nil, upstreamStatus(err)
	}
	return entryProto(e, a.s.cfg.Now()), nil
}

func (a *adminService) GetStatus(ctx context.Context, _ *tokendv1.GetStatusRequest) (*tokendv1.Status, error) {
	resp, err := a.status()
	if err == nil && a.s.checkAdmin(ctx) != nil {
		redactStatus(resp)
	}
	return resp, err
}

// redactStatus keeps what any local user may see: counters and health, not
// Whop's messages (they name other tenants' subjects), paths or names.
func redactStatus(st *tokendv1.Status) {
	st.StateDir = ""
	if le := st.LastUpstreamError; le != nil {
		le.Message = ""
	}
	if st.CacheWriteError != "" {
		st.CacheWriteError = "failing (details for administrators)"
	}
	st.Credentials = nil
}

func (a *adminService) status() (*tokendv1.Status, error) {
	now := a.s.cfg.Now()
	st := a.s.cfg.Tokens.Stats()
	resp := &tokendv1.Status{
		Version:               a.s.cfg.Version,
		StartedAt:             timestamppb.New(a.s.started),
		Uptime:                durationpb.New(now.Sub(a.s.started).Round(time.Second)),
		Socket:                a.s.cfg.Socket,
		StateDir:              a.s.cfg.StateDir,
		EntriesByState:        map[string]uint64{},
		Hits:                  st.Hits,
		Misses:                st.Misses,
		UpstreamCalls:         st.UpstreamCalls,
		UpstreamErrors:        st.UpstreamErrors,
		LastUpstreamError:     errorProto(st.LastError),
		ApiKeyRejected:        st.APIKeyRejected,
		UpstreamInFlight:      uint32(st.UpstreamInFlight),
		UpstreamMaxInFlight:   uint32(st.UpstreamMaxInFlight),
		UpstreamRatePerSecond: st.UpstreamRate,
		EvictedOverCapacity:   st.EvictedOverCapacity,
		DroppedIdle:           st.DroppedIdle,
		MaxEntries:            uint64(st.MaxEntries),
		MissesRateLimited:     st.MissesRateLimited,
		CacheSealed:           a.s.cfg.SealedCache,
		PolicyLoaded:          a.s.cfg.Policy != nil && a.s.cfg.Policy.Load() != nil,
	}
	if cl := a.s.cfg.Conns; cl != nil {
		resp.MaxConnections = uint32(cl.max)
		resp.ConnectionsAtLimit = cl.waits.Load()
	}
	for _, c := range a.s.cfg.Tokens.CredentialStats() {
		cs := &tokendv1.CredentialStatus{
			Name: c.Name, Kind: "api_key", Fingerprint: hex.EncodeToString(c.Fingerprint[:min(4, len(c.Fingerprint))]),
			Rejected: c.Rejected, InFlight: uint32(c.InFlight), UpstreamCalls: c.Calls, UpstreamErrors: c.Errors, Entries: uint64(c.Entries),
		}
		if c.OAuthUser {
			cs.Kind = "oauth_user"
		}
		if c.PausedUntil.After(now) {
			cs.PausedUntil = timestamppb.New(c.PausedUntil)
		}
		if !c.SecretExpiresAt.IsZero() {
			cs.SecretExpiresAt = timestamppb.New(c.SecretExpiresAt)
		}
		resp.Credentials = append(resp.Credentials, cs)
	}
	if st.UpstreamPausedUntil.After(now) {
		resp.UpstreamPausedUntil = timestamppb.New(st.UpstreamPausedUntil)
	}
	pending, werr := a.s.cfg.Entries.WriteStatus()
	resp.CachePendingWrites = uint64(pending)
	if werr != nil {
		resp.CacheWriteError = werr.Error()
	}
	for _, e := range a.s.cfg.Entries.Entries() {
		resp.Entries++
		resp.EntriesByState[stateName(entryState(e, now))]++
	}
	return resp, nil
}

func stateName(s tokendv1.EntryState) string {
	switch s {
	case tokendv1.EntryState_ENTRY_STATE_FRESH:
		return "fresh"
	case tokendv1.EntryState_ENTRY_STATE_REFRESHING:
		return "refreshing"
	case tokendv1.EntryState_ENTRY_STATE_RETRYING:
		return "retrying"
	case tokendv1.EntryState_ENTRY_STATE_FAILING:
		return "failing"
	case tokendv1.EntryState_ENTRY_STATE_EXPIRED:
		return "expired"
	case tokendv1.EntryState_ENTRY_STATE_IDLE:
		return "idle"
	}
	return "unknown"
}

func entryState(e *cache.Entry, now time.Time) tokendv1.EntryState {
	m := e.Meta()
	t := e.Token()
	switch {
	case m.State == cache.StateRefreshing:
		return tokendv1.EntryState_ENTRY_STATE_REFRESHING
	case t == nil && m.LastError != nil:
		return tokendv1.EntryState_ENTRY_STATE_FAILING
	case t != nil && !t.ExpiresAt.After(now):
		return tokendv1.EntryState_ENTRY_STATE_EXPIRED
	case m.State == cache.StateRetrying:
		return tokendv1.EntryState_ENTRY_STATE_RETRYING
	case m.State == cache.StateFailing:
		return tokendv1.EntryState_ENTRY_STATE_FAILING
	case m.State == cache.StateIdle:
		return tokendv1.EntryState_ENTRY_STATE_IDLE
	}
	return tokendv1.EntryState_ENTRY_STATE_FRESH
}

// entryProto describes e without its token.
func entryProto(e *cache.Entry, now time.Time) *tokendv1.Entry {
	k := e.Key()
	m := e.Meta()
	p := &tokendv1.Entry{
		KeyId:           e.ID(),
		CompanyId:       k.CompanyID,
		UserId:          k.UserID,
		ScopedActions:   k.Scopes,
		State:           entryState(e, now),
		NextRefreshAt:   timestamp(m.NextRefresh),
		LastRequestedAt: timestamp(e.LastRequested()),
		Hits:            e.Hits(),
		Refreshes:       m.Refreshes,
		Failures:        m.Failures,
		LastError:       errorProto(m.LastError),
	}
	if t := e.Token(); t != nil {
		p.ExpiresAt = timestamp(t.ExpiresAt)
		p.ObtainedAt = timestamp(t.ObtainedAt)
		p.JwtHeaderJson, p.JwtClaimsJson = decodeJWT(t.Value)
	}
	p.Credential = k.Credential
	return p
}

// decodeJWT returns a JWT's header and claims as JSON, unverified, for
// operators; the signature, which makes a token usable, is never returned.
// Anything that is not a JWT decodes to nothing.
func decodeJWT(token string) (header, claims string) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return "", ""
	}
	part := func(s string) string {
		b, err := base64.RawURLEncoding.DecodeString(s)
		if err != nil || !json.Valid(b) {
			return ""
		}
		return string(b)
	}
	return part(parts[0]), part(parts[1])
}

func errorProto(le *cache.ErrorInfo) *tokendv1.UpstreamError {
	if le == nil {
		return nil
	}
	return &tokendv1.UpstreamError{At: timestamp(le.At), HttpStatus: int32(le.Status), Message: le.Message, Retryable: le.Retryable}
}

func timestamp(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func (a *adminService) CheckPolicy(_ context.Context, req *tokendv1.CheckPolicyRequest) (*tokendv1.CheckPolicyResponse, error) {
	if req.GetUser() == "" {
		return nil, status.Error(codes.InvalidArgument, "user is required: a local user name or uid")
	}
	_, k, err := a.s.parse(&tokendv1.GetTokenRequest{CompanyId: req.GetCompanyId(), UserId: req.GetUserId(), ScopedActions: req.GetScopedActions(), Credential: req.GetCredential()})
	if err != nil {
		return nil, err
	}
	caller, err := policy.CallerForUser(req.GetUser(), policy.SystemIDs())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "user %q: %v", req.GetUser(), err)
	}
	resp := &tokendv1.CheckPolicyResponse{Uid: caller.UID}
	var p *policy.Policy
	if a.s.cfg.Policy != nil {
		p = a.s.cfg.Policy.Load()
	}
	if p == nil {
		resp.Allowed = true
		resp.Reason = "no policy is loaded: every caller that can open the socket is allowed"
		return resp, nil
	}
	d := p.Check(caller, policy.Request{Credential: k.Credential, CompanyID: k.CompanyID, UserID: k.UserID, Scopes: k.Scopes})
	resp.PolicyLoaded, resp.Allowed, resp.Rule, resp.Reason = true, d.Allowed, d.Rule, d.Reason
	return resp, nil
}

// MetricsSnapshot describes the cache for a metrics scrape.
func (s *Server) MetricsSnapshot() metrics.Snapshot {
	now := s.cfg.Now()
	snap := metrics.Snapshot{EntriesByState: map[string]int{}, EarliestExpiry: -1, UpstreamInFlight: s.cfg.Tokens.Stats().UpstreamInFlight}
	var earliest time.Time
	for _, e := range s.cfg.Entries.Entries() {
		snap.EntriesByState[stateName(entryState(e, now))]++
		if t := e.Token(); t != nil && t.ExpiresAt.After(now) && (earliest.IsZero() || t.ExpiresAt.Before(earliest)) {
			earliest = t.ExpiresAt
		}
	}
	if !earliest.IsZero() {
		snap.EarliestExpiry = earliest.Sub(now)
	}
	return snap
}
