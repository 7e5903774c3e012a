package main

import (
	"context"
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
	status  *tokendv1.Status
	lastGet *tokendv1.GetTokenRequest
	err     error
}

var (
	_ tokendv1.TokenServiceServer = (*fakeDaemon)(nil)
	_ tokendv1.AdminServiceServer = (*fakeDaemon)(nil)
)

func ts(d time.Duration) *timestamppb.Timestamp { return timestamppb.New(testNow.Add(d)) }

func cannedEntries() []*tokendv1.Entry {
	return []*tokendv1.Entry{
		{
			KeyId: "a1ff00112233", UserId: "user_bob",
			State: tokendv1.EntryState_ENTRY_STATE_RETRYING, Failures: 3,
			ExpiresAt: ts(-3 * time.Minute), ObtainedAt: ts(-63 * time.Minute),
			NextRefreshAt: ts(20 * time.Second), LastRequestedAt: ts(-5 * time.Second),
			Refreshes: 1,
			LastError: &tokendv1.UpstreamError{
				At: ts(-40 * time.Second), HttpStatus: 502, Message: "bad gateway", Retryable: true,
			},
		},
		{
			KeyId: "9e8d7c6b5a40", CompanyId: "biz_alpha", UserId: "user_carol",
			ScopedActions: []string{"chat:read", "chat:write", "forums:read"},
			State:         tokendv1.EntryState_ENTRY_STATE_FRESH,
			ExpiresAt:     ts(2*time.Hour + 3*time.Minute), Hits: 1234,
		},
		{
			KeyId: "a1b2c3d4e5f6", CompanyId: "biz_alpha",
			ScopedActions: []string{"chat:read"},
			State:         tokendv1.EntryState_ENTRY_STATE_FRESH,
			ExpiresAt:     ts(41*time.Minute + 12*time.Second), ObtainedAt: ts(-18*time.Minute - 48*time.Second),
			NextRefreshAt: ts(31 * time.Minute), LastRequestedAt: ts(-2 * time.Second),
			Hits: 12, Refreshes: 2,
		},
	}
}

// startFake serves a fakeDaemon on a Unix socket in a temporary directory and
// returns it with the socket path.
func startFake(t *testing.T) (*fakeDaemon, string) {
	t.Helper()
	f := &fakeDaemon{
		entries: cannedEntries(),
		status: &tokendv1.Status{
			Version: "v0.3.1", StartedAt: ts(-26*time.Hour - 5*time.Minute),
			Uptime: durationpb.New(26*time.Hour + 5*time.Minute),
			Socket: "/run/tokend/tokend.sock", StateDir: "/var/lib/tokend",
			Entries:        3,
			EntriesByState: map[string]uint64{"fresh": 2, "retrying": 1},
			Hits:           7, Misses: 1, UpstreamCalls: 4, UpstreamErrors: 1,
			UpstreamInFlight: 1, UpstreamMaxInFlight: 4, UpstreamRatePerSecond: 10,
			MaxEntries: 100000, EvictedOverCapacity: 2, DroppedIdle: 5,
		},
	}
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
	return &tokendv1.Token{Token: "eyJhbGciOiJFUzI1NiJ9.fake.sig", ExpiresAt: ts(time.Hour), KeyId: "a1b2c3d4e5f6"}, nil
}

func (f *fakeDaemon) ListEntries(_ context.Context, req *tokendv1.ListEntriesRequest) (*tokendv1.ListEntriesResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return nil, f.err
	}
	resp := &tokendv1.ListEntriesResponse{}
	for _, e := range f.entries {
		if s := req.GetSubject(); s == "" || s == e.GetCompanyId() || s == e.GetUserId() {
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
	match := func(e *tokendv1.Entry) bool { return false }
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
