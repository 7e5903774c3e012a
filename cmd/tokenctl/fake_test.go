package main

import (
	"context"
	"encoding/base64"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// testNow is the fixed clock of every test; entries are canned relative to it.
var testNow = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// fakeDaemon is a small working TokenService and AdminService over canned
// entries. It resolves key prefixes like tokend does (NotFound, or
// InvalidArgument for an ambiguous prefix) and records the last GetToken
// request. Setting err makes every call fail with it.
type fakeDaemon struct {
	tokendv1.UnimplementedTokenServiceServer
	tokendv1.UnimplementedAdminServiceServer

	mu      sync.Mutex
	entries []*tokendv1.Entry
	tokens  map[string]string // by key id
	status  *tokendv1.Status
	lastGet *tokendv1.GetTokenRequest
	err     error
	// onGetEntry, when set, runs at every GetEntry with the call's number
	// (from 1) and the stored entry, which it may change. An error it
	// returns is the call's.
	onGetEntry func(call int, e *tokendv1.Entry) error
	getEntries int
}

var (
	_ tokendv1.TokenServiceServer = (*fakeDaemon)(nil)
	_ tokendv1.AdminServiceServer = (*fakeDaemon)(nil)
)

func ts(d time.Duration) *timestamppb.Timestamp { return timestamppb.New(testNow.Add(d)) }

// cannedSignature is the signature part of every canned token. The fake
// holds the tokens as the daemon does; no admin output may carry them.
const cannedSignature = "c2lnbmF0dXJlLW9mLWEtY2FubmVkLXRva2VuLW5ldmVyLXByaW50LW1l"

// cannedJWT builds a token like Whop's: an ES256 JWT for subject with the
// given lifetime, signed with cannedSignature.
func cannedJWT(sub string, iat, exp time.Time) string {
	enc := base64.RawURLEncoding.EncodeToString
	header := `{"alg":"ES256","kid":"whop-2026-02","typ":"JWT"}`
	claims := fmt.Sprintf(`{"iss":"urn:whopcom:exp-proxy","sub":%q,"aud":"app_tokend","iat":%d,"exp":%d}`, sub, iat.Unix(), exp.Unix())
	return enc([]byte(header)) + "." + enc([]byte(claims)) + "." + cannedSignature
}

// decodeJWT is what the daemon does to fill jwt_header_json and
// jwt_claims_json.
func decodeJWT(tok string) (header, claims string) {
	parts := strings.Split(tok, ".")
	h, _ := base64.RawURLEncoding.DecodeString(parts[0])
	c, _ := base64.RawURLEncoding.DecodeString(parts[1])
	return string(h), string(c)
}

// cannedEntries are the fake's entries, with the tokens it holds for them by
// key id. The first three have short subjects; the rest have ids as long as
// Whop's.
func cannedEntries() ([]*tokendv1.Entry, map[string]string) {
	entries := []*tokendv1.Entry{
		{
			KeyId: "a1ff00112233", UserId: "user_bob", Credential: "default",
			State: tokendv1.EntryState_ENTRY_STATE_RETRYING, Failures: 3,
			ExpiresAt: ts(-3 * time.Minute), ObtainedAt: ts(-63 * time.Minute),
			NextRefreshAt: ts(20 * time.Second), LastRequestedAt: ts(-5 * time.Second),
			Refreshes: 1,
			LastError: &tokendv1.UpstreamError{
				At: ts(-40 * time.Second), HttpStatus: 502, Message: "bad gateway", Retryable: true,
			},
		},
		{
			KeyId: "9e8d7c6b5a40", CompanyId: "biz_alpha", UserId: "user_carol", Credential: "default",
			ScopedActions: []string{"chat:read", "chat:write", "forums:read"},
			State:         tokendv1.EntryState_ENTRY_STATE_FRESH,
			ExpiresAt:     ts(2*time.Hour + 3*time.Minute), Hits: 1234,
		},
		{
			KeyId: "a1b2c3d4e5f6", CompanyId: "biz_alpha", Credential: "default",
			ScopedActions: []string{"chat:read"},
			State:         tokendv1.EntryState_ENTRY_STATE_FRESH,
			ExpiresAt:     ts(41*time.Minute + 12*time.Second), ObtainedAt: ts(-18*time.Minute - 48*time.Second),
			NextRefreshAt: ts(31 * time.Minute), LastRequestedAt: ts(-2 * time.Second),
			Hits: 12, Refreshes: 2,
			LastError: &tokendv1.UpstreamError{
				At: ts(-25 * time.Minute), HttpStatus: 503, Message: "Service unavailable", Retryable: true,
			},
		},
		{
			KeyId: "c0ffee112233", CompanyId: "biz_4kQ8tXz1LmN2pB", Credential: "default",
			ScopedActions: []string{"chat:read", "forums:write"},
			State:         tokendv1.EntryState_ENTRY_STATE_FAILING, Failures: 1,
			ExpiresAt: ts(12 * time.Minute), ObtainedAt: ts(-48 * time.Minute),
			LastRequestedAt: ts(-3 * time.Minute), Hits: 40, Refreshes: 1,
			LastError: &tokendv1.UpstreamError{
				At: ts(-2 * time.Minute), HttpStatus: 403, Message: "scope forums:write not granted to this app",
				Type: "invalid_request_error", Code: "scope_not_granted", Param: "scoped_actions",
			},
		},
		{
			KeyId: "d00d5ca1ab1e", UserId: "user_Zx81bQ0pLr4sTe", Credential: "default",
			ScopedActions: []string{"chat:read", "chat:write"},
			State:         tokendv1.EntryState_ENTRY_STATE_IDLE,
			ExpiresAt:     ts(7*time.Minute + 30*time.Second), ObtainedAt: ts(-52*time.Minute - 30*time.Second),
			LastRequestedAt: ts(-58 * time.Minute), Hits: 1, Refreshes: 1,
		},
		{
			KeyId: "7a11ce0ffee0", CompanyId: "biz_9wErT5yU1iO3pA", Credential: "default",
			ScopedActions: []string{"payments:read", "memberships:read"},
			State:         tokendv1.EntryState_ENTRY_STATE_REFRESHING,
			ExpiresAt:     ts(50 * time.Second), ObtainedAt: ts(-59*time.Minute - 10*time.Second),
			NextRefreshAt: ts(-1 * time.Second), LastRequestedAt: ts(-9 * time.Second),
			Hits: 98765, Refreshes: 14,
		},
	}
	tokens := map[string]string{}
	for _, e := range entries {
		if e.GetObtainedAt() == nil {
			continue
		}
		tok := cannedJWT(subject(e), e.GetObtainedAt().AsTime(), e.GetExpiresAt().AsTime())
		tokens[e.GetKeyId()] = tok
		e.JwtHeaderJson, e.JwtClaimsJson = decodeJWT(tok)
	}
	return entries, tokens
}

func cannedStatus() *tokendv1.Status {
	return &tokendv1.Status{
		Version: "v0.3.1", StartedAt: ts(-26*time.Hour - 5*time.Minute),
		Uptime: durationpb.New(26*time.Hour + 5*time.Minute),
		Socket: "/run/tokend/tokend.sock", StateDir: "/var/lib/tokend",
		Entries:        6,
		EntriesByState: map[string]uint64{"fresh": 2, "retrying": 1, "failing": 1, "idle": 1, "refreshing": 1},
		Hits:           7, Misses: 1, UpstreamCalls: 4, UpstreamErrors: 1,
		LastUpstreamError: &tokendv1.UpstreamError{
			At: ts(-40 * time.Second), HttpStatus: 502, Message: "bad gateway", Retryable: true,
		},
		UpstreamInFlight: 1, UpstreamMaxInFlight: 4, UpstreamRatePerSecond: 10,
		MaxEntries: 100000, EvictedOverCapacity: 2, DroppedIdle: 5,
		MissesRateLimited: 3, AbandonedCalls: 4, ConnectionsAtLimit: 1,
		Fleet: &tokendv1.FleetStatus{Connected: true, Since: ts(-3 * time.Hour), KeyId: "9c1e07aa", Adopted: 120, Published: 40, LockWaits: 7, Tampered: 1}, MaxConnections: 256,
		PolicyLoaded: true, CacheSealed: true,
		Credentials: []*tokendv1.CredentialStatus{
			{
				Name: "default", Kind: "api_key", Fingerprint: "3f9a1c07",
				UpstreamCalls: 3, UpstreamErrors: 1, Entries: 6, InFlight: 1,
				Queued: 37, QueuedBy: []*tokendv1.QueueShare{{By: "uid 65534", Calls: 35}, {By: "uid 0", Calls: 2}},
			},
			{
				Name: "acme", Kind: "oauth_user", Fingerprint: "77be0241",
				PausedUntil: ts(42 * time.Second), UpstreamCalls: 1,
				SecretExpiresAt: ts(5*24*time.Hour + 2*time.Hour),
			},
		},
	}
}

// startFake serves a fakeDaemon on a Unix socket in a temporary directory and
// returns it with the socket path.
func startFake(t *testing.T) (*fakeDaemon, string) {
	t.Helper()
	f := &fakeDaemon{status: cannedStatus()}
	f.entries, f.tokens = cannedEntries()
	sock := filepath.Join(t.TempDir(), "tokend.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatalf("listen on %s: %v", sock, err)
	}
	srv := grpc.NewServer()
	tokendv1.RegisterTokenServiceServer(srv, f)
	tokendv1.RegisterAdminServiceServer(srv, f)
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	return f, sock
}

func (f *fakeDaemon) GetToken(_ context.Context, req *tokendv1.GetTokenRequest) (*tokendv1.Token, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return nil, f.err
	}
	f.lastGet = proto.Clone(req).(*tokendv1.GetTokenRequest)
	if c := req.GetCompanyId(); c != "" && !strings.HasPrefix(c, "biz_") {
		return nil, status.Errorf(codes.InvalidArgument, "company_id %q: must start with \"biz_\"", c)
	}
	// Every request gets the one company entry's token: enough for tests of
	// how get prints it.
	const key = "a1b2c3d4e5f6"
	return &tokendv1.Token{Token: f.tokens[key], ExpiresAt: ts(41*time.Minute + 12*time.Second), KeyId: key}, nil
}

func (f *fakeDaemon) ListEntries(_ context.Context, req *tokendv1.ListEntriesRequest) (*tokendv1.ListEntriesResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return nil, f.err
	}
	resp := &tokendv1.ListEntriesResponse{}
	for _, e := range f.entries {
		if s := req.GetSubject(); s != "" && s != e.GetCompanyId() && s != e.GetUserId() {
			continue
		}
		if c := req.GetCredential(); c == "" || c == e.GetCredential() {
			resp.Entries = append(resp.Entries, proto.Clone(e).(*tokendv1.Entry))
		}
	}
	return resp, nil
}

// resolve finds the one entry whose key starts with prefix; f.mu is held.
func (f *fakeDaemon) resolve(prefix string) (*tokendv1.Entry, error) {
	var found []*tokendv1.Entry
	for _, e := range f.entries {
		if strings.HasPrefix(e.GetKeyId(), prefix) {
			found = append(found, e)
		}
	}
	switch len(found) {
	case 0:
		return nil, status.Errorf(codes.NotFound, "no entry with key %q", prefix)
	case 1:
		return found[0], nil
	default:
		return nil, status.Errorf(codes.InvalidArgument, "key prefix %q is ambiguous: matches %d entries", prefix, len(found))
	}
}

func (f *fakeDaemon) GetEntry(_ context.Context, req *tokendv1.GetEntryRequest) (*tokendv1.Entry, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return nil, f.err
	}
	e, err := f.resolve(req.GetKeyId())
	if err != nil {
		return nil, err
	}
	if f.onGetEntry != nil {
		f.getEntries++
		if err := f.onGetEntry(f.getEntries, e); err != nil {
			return nil, err
		}
	}
	return proto.Clone(e).(*tokendv1.Entry), nil
}

func (f *fakeDaemon) RefreshEntry(_ context.Context, req *tokendv1.RefreshEntryRequest) (*tokendv1.Entry, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return nil, f.err
	}
	e, err := f.resolve(req.GetKeyId())
	if err != nil {
		return nil, err
	}
	e.Refreshes++
	e.ObtainedAt = ts(0)
	e.ExpiresAt = ts(time.Hour)
	return proto.Clone(e).(*tokendv1.Entry), nil
}

func (f *fakeDaemon) EvictEntries(_ context.Context, req *tokendv1.EvictEntriesRequest) (*tokendv1.EvictEntriesResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return nil, f.err
	}
	var match func(e *tokendv1.Entry) bool
	switch t := req.GetTarget().(type) {
	case *tokendv1.EvictEntriesRequest_KeyId:
		e, err := f.resolve(t.KeyId)
		if err != nil {
			return nil, err
		}
		match = func(x *tokendv1.Entry) bool { return x == e }
	case *tokendv1.EvictEntriesRequest_Subject:
		match = func(x *tokendv1.Entry) bool { return x.GetCompanyId() == t.Subject || x.GetUserId() == t.Subject }
	case *tokendv1.EvictEntriesRequest_All:
		match = func(*tokendv1.Entry) bool { return t.All }
	default:
		return nil, status.Error(codes.InvalidArgument, "target: set key_id, subject or all")
	}
	resp := &tokendv1.EvictEntriesResponse{}
	var keep []*tokendv1.Entry
	for _, e := range f.entries {
		if match(e) {
			resp.KeyIds = append(resp.KeyIds, e.GetKeyId())
		} else {
			keep = append(keep, e)
		}
	}
	f.entries = keep
	return resp, nil
}

func (f *fakeDaemon) GetStatus(context.Context, *tokendv1.GetStatusRequest) (*tokendv1.Status, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return nil, f.err
	}
	return proto.Clone(f.status).(*tokendv1.Status), nil
}

func (f *fakeDaemon) setStatus(s *tokendv1.Status) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.status = s
}

func (f *fakeDaemon) setErr(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
}

func (f *fakeDaemon) lastGetRequest() *tokendv1.GetTokenRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.lastGet
}

func (f *fakeDaemon) keys() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var ks []string
	for _, e := range f.entries {
		ks = append(ks, e.GetKeyId())
	}
	return ks
}

func (f *fakeDaemon) setEntries(es []*tokendv1.Entry) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.entries = es
}

func (f *fakeDaemon) setOnGetEntry(fn func(call int, e *tokendv1.Entry) error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.onGetEntry = fn
}
