package server

import (
	"context"
	"encoding/hex"
	"errors"
	"github.com/tokend/tokend/internal/metrics"
	"github.com/tokend/tokend/internal/policy"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tokend/tokend/internal/refresher"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

type adminService struct {
	tokendv1.UnimplementedAdminServiceServer
	s *Server
}

var _ tokendv1.AdminServiceServer = (*adminService)(nil)

func (a *adminService) ListEntries(_ context.Context, req *tokendv1.ListEntriesRequest) (*tokendv1.ListEntriesResponse, error) {
	subject, cred := req.GetSubject(), req.GetCredential()
	infos := a.s.cfg.Tokens.Entries(func(k refresher.Key) bool {
		return (subject == "" || hasSubject(k, subject)) && (cred == "" || k.Credential == cred)
	})
	resp := &tokendv1.ListEntriesResponse{Entries: make([]*tokendv1.Entry, 0, len(infos))}
	for _, i := range infos {
		resp.Entries = append(resp.Entries, entryProto(i))
	}
	return resp, nil
}

func hasSubject(k refresher.Key, subject string) bool {
	return k.CompanyID == subject || k.UserID == subject
}

// findStatus turns the refresher's lookup errors into statuses.
func findStatus(id string, err error) error {
	switch {
	case errors.Is(err, refresher.ErrNotFound):
		return status.Errorf(codes.NotFound, "key %q: no entry has that id (tokenctl list shows them)", id)
	case errors.Is(err, refresher.ErrAmbiguous):
		return status.Errorf(codes.InvalidArgument, "key %q: prefix matches more than one entry; give more characters", id)
	}
	return upstreamStatus(err)
}

func (a *adminService) GetEntry(_ context.Context, req *tokendv1.GetEntryRequest) (*tokendv1.Entry, error) {
	id := req.GetKeyId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "key_id is required")
	}
	i, err := a.s.cfg.Tokens.Find(id)
	if err != nil {
		return nil, findStatus(id, err)
	}
	return entryProto(i), nil
}

func (a *adminService) EvictEntries(_ context.Context, req *tokendv1.EvictEntriesRequest) (*tokendv1.EvictEntriesResponse, error) {
	var ids []string
	switch t := req.GetTarget().(type) {
	case *tokendv1.EvictEntriesRequest_KeyId:
		if t.KeyId == "" {
			return nil, status.Error(codes.InvalidArgument, "key_id is empty")
		}
		i, err := a.s.cfg.Tokens.Find(t.KeyId)
		if err != nil {
			return nil, findStatus(t.KeyId, err)
		}
		ids = a.s.cfg.Tokens.Evict(i.KeyID)
	case *tokendv1.EvictEntriesRequest_Subject:
		if t.Subject == "" {
			return nil, status.Error(codes.InvalidArgument, "subject is empty")
		}
		ids = a.s.cfg.Tokens.EvictMatching(func(k refresher.Key) bool { return hasSubject(k, t.Subject) })
	case *tokendv1.EvictEntriesRequest_All:
		if !t.All {
			return nil, status.Error(codes.InvalidArgument, "all must be true to evict every entry")
		}
		ids = a.s.cfg.Tokens.EvictMatching(func(refresher.Key) bool { return true })
	default:
		return nil, status.Error(codes.InvalidArgument, "target is required: key_id, subject or all")
	}
	a.s.cfg.Logger.Info("evicted entries", "count", len(ids))
	return &tokendv1.EvictEntriesResponse{KeyIds: ids}, nil
}

func (a *adminService) RefreshEntry(ctx context.Context, req *tokendv1.RefreshEntryRequest) (*tokendv1.Entry, error) {
	id := req.GetKeyId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "key_id is required")
	}
	i, err := a.s.cfg.Tokens.Refresh(ctx, id)
	if err != nil {
		return nil, findStatus(id, err)
	}
	return entryProto(i), nil
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
	st := a.s.cfg.Tokens.Status()
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
		AbandonedCalls:        st.Abandoned,
		CacheSealed:           a.s.cfg.SealedCache,
		PolicyLoaded:          a.s.cfg.Policy != nil && a.s.cfg.Policy.Load() != nil,
		MaxConnections:        uint32(a.s.conns.lim.Total),
		ConnectionsAtLimit:    a.s.conns.refusedTotal.Load(),
	}
	for _, c := range st.Credentials {
		cs := &tokendv1.CredentialStatus{
			Name: c.Name, Kind: "api_key", Fingerprint: hex.EncodeToString(c.Fingerprint[:min(4, len(c.Fingerprint))]),
			Rejected: c.Rejected, InFlight: uint32(c.InFlight), UpstreamCalls: c.Calls, UpstreamErrors: c.Errors, Entries: uint64(c.Entries),
		}
		if c.OAuthUser {
			cs.Kind = "oauth_user"
		}
		cs.Queued = uint32(c.Queued)
		for _, q := range c.QueuedBy {
			cs.QueuedBy = append(cs.QueuedBy, &tokendv1.QueueShare{By: q.By, Calls: uint32(q.Calls)})
		}
		if c.PausedUntil.After(now) {
			cs.PausedUntil = timestamppb.New(c.PausedUntil)
			cs.PauseReason = c.PauseReason
		}
		if c.Rejected && !c.NextProbe.IsZero() {
			cs.NextProbe = timestamppb.New(c.NextProbe)
		}
		if !c.SkewAt.IsZero() {
			cs.ClockSkew = durationpb.New(c.ClockSkew)
			cs.ClockSkewWarning = c.ClockSkew.Abs() > refresher.SkewWarning
		}
		if !c.SecretExpiresAt.IsZero() {
			cs.SecretExpiresAt = timestamppb.New(c.SecretExpiresAt)
		}
		resp.Credentials = append(resp.Credentials, cs)
	}
	if st.UpstreamPausedUntil.After(now) {
		resp.UpstreamPausedUntil = timestamppb.New(st.UpstreamPausedUntil)
	}
	resp.CachePendingWrites = uint64(st.PendingWrites)
	if f := st.Fleet; f != nil {
		resp.Fleet = &tokendv1.FleetStatus{
			Connected: f.Connected, Reason: f.Reason, KeyId: f.KeyID, Degraded: f.Degraded,
			Adopted: st.FleetAdopted, Published: f.Published, LockWaits: f.LockWaits, LockTakeovers: f.LockTakeovers,
			Tampered: f.Tampered, RedisErrors: f.Errors, RateLimited: f.RateLimited, PausesSeen: f.PausesSeen,
		}
		if !f.Since.IsZero() {
			resp.Fleet.Since = timestamppb.New(f.Since)
		}
	}
	if st.WriteError != nil {
		resp.CacheWriteError = st.WriteError.Error()
		resp.CacheMemoryOnly = st.MemoryOnly
	}
	resp.Entries = uint64(st.Entries)
	for name, n := range st.EntriesByState() {
		resp.EntriesByState[name] = uint64(n)
	}
	return resp, nil
}

// entryStates maps the refresher's states onto the contract's.
var entryStates = map[refresher.State]tokendv1.EntryState{
	refresher.StateFresh:      tokendv1.EntryState_ENTRY_STATE_FRESH,
	refresher.StateRefreshing: tokendv1.EntryState_ENTRY_STATE_REFRESHING,
	refresher.StateRetrying:   tokendv1.EntryState_ENTRY_STATE_RETRYING,
	refresher.StateFailing:    tokendv1.EntryState_ENTRY_STATE_FAILING,
	refresher.StateExpired:    tokendv1.EntryState_ENTRY_STATE_EXPIRED,
	refresher.StateIdle:       tokendv1.EntryState_ENTRY_STATE_IDLE,
}

// entryProto describes an entry without its token.
func entryProto(i refresher.EntryInfo) *tokendv1.Entry {
	p := &tokendv1.Entry{
		KeyId:           i.KeyID,
		CompanyId:       i.Key.CompanyID,
		UserId:          i.Key.UserID,
		ScopedActions:   i.Key.Scopes,
		State:           entryStates[i.State],
		NextRefreshAt:   timestamp(i.NextRefresh),
		LastRequestedAt: timestamp(i.LastRequested),
		Hits:            i.Hits,
		Refreshes:       i.Refreshes,
		Failures:        i.Failures,
		LastError:       errorProto(i.LastError),
		ExpiresAt:       timestamp(i.ExpiresAt),
		ObtainedAt:      timestamp(i.ObtainedAt),
		Credential:      i.Key.Credential,
	}
	p.JwtHeaderJson, p.JwtClaimsJson = i.JWTParts()
	return p
}

func errorProto(le *refresher.ErrorInfo) *tokendv1.UpstreamError {
	if le == nil {
		return nil
	}
	return &tokendv1.UpstreamError{At: timestamp(le.At), HttpStatus: int32(le.Status), Message: le.Message, Retryable: le.Retryable, Type: le.Type, Code: le.Code, Param: le.Param}
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

// MetricsSnapshot describes the cache for a metrics scrape, from one
// status snapshot: no scan of the entries.
func (s *Server) MetricsSnapshot() metrics.Snapshot {
	now := s.cfg.Now()
	st := s.cfg.Tokens.Status()
	snap := metrics.Snapshot{EntriesByState: st.EntriesByState(), EarliestExpiry: -1, UpstreamInFlight: st.UpstreamInFlight,
		OpenConnections: int(s.conns.openNow.Load()), ConnectionsRefused: s.conns.refusedTotal.Load()}
	if !st.EarliestExpiry.IsZero() {
		snap.EarliestExpiry = st.EarliestExpiry.Sub(now)
	}
	if f := st.Fleet; f != nil {
		snap.Fleet = &metrics.FleetSnapshot{Connected: f.Connected, Events: map[string]uint64{
			"adopted": st.FleetAdopted, "published": f.Published, "lock_wait": f.LockWaits, "lock_takeover": f.LockTakeovers,
			"tampered": f.Tampered, "redis_error": f.Errors, "rate_limited": f.RateLimited, "pause_seen": f.PausesSeen, "degraded": f.Degraded,
		}}
	}
	return snap
}
