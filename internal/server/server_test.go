package server

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokend/tokend/internal/refresher"
	"github.com/tokend/tokend/internal/whop"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

func TestValidate(t *testing.T) {
	scopes := func(n int) []string {
		s := make([]string, n)
		for i := range s {
			s[i] = "scope:" + strings.Repeat("x", i+1)
		}
		return s
	}
	cases := []struct {
		name    string
		req     *tokendv1.GetTokenRequest
		wantErr string // substring of the InvalidArgument message; empty means valid
		minTTL  time.Duration
	}{
		{"company", &tokendv1.GetTokenRequest{CompanyId: "biz_1"}, "", DefaultMinTTL},
		{"user", &tokendv1.GetTokenRequest{UserId: "user_1"}, "", DefaultMinTTL},
		{"both", &tokendv1.GetTokenRequest{CompanyId: "biz_1", UserId: "user_1", ScopedActions: []string{"chat:read", "dms:message:manage"}}, "", DefaultMinTTL},
		{"zero min_ttl", &tokendv1.GetTokenRequest{CompanyId: "biz_1", MinTtl: durationpb.New(0)}, "", 0},
		{"max min_ttl", &tokendv1.GetTokenRequest{CompanyId: "biz_1", MinTtl: durationpb.New(3 * time.Hour)}, "", 3 * time.Hour},
		{"64 scopes", &tokendv1.GetTokenRequest{CompanyId: "biz_1", ScopedActions: scopes(64)}, "", DefaultMinTTL},
		{"128-byte scope", &tokendv1.GetTokenRequest{CompanyId: "biz_1", ScopedActions: []string{strings.Repeat("s", 128)}}, "", DefaultMinTTL},
		{"no subject", &tokendv1.GetTokenRequest{}, "company_id or user_id is required", 0},
		{"bare prefix", &tokendv1.GetTokenRequest{CompanyId: "biz_"}, `company_id "biz_"`, 0},
		{"company wrong prefix", &tokendv1.GetTokenRequest{CompanyId: "user_1"}, `company_id "user_1": must start with "biz_"`, 0},
		{"user wrong prefix", &tokendv1.GetTokenRequest{UserId: "biz_1"}, `user_id "biz_1": must start with "user_"`, 0},
		{"id with space", &tokendv1.GetTokenRequest{UserId: "user_a b"}, "user_id", 0},
		{"long id", &tokendv1.GetTokenRequest{UserId: "user_" + strings.Repeat("x", 200)}, "user_id: 205 bytes", 0},
		{"empty scope", &tokendv1.GetTokenRequest{CompanyId: "biz_1", ScopedActions: []string{"a", ""}}, "scoped_actions[1]: empty", 0},
		{"long scope", &tokendv1.GetTokenRequest{CompanyId: "biz_1", ScopedActions: []string{strings.Repeat("s", 129)}}, "scoped_actions[0]: 129 bytes", 0},
		{"control char scope", &tokendv1.GetTokenRequest{CompanyId: "biz_1", ScopedActions: []string{"chat:\nread"}}, "scoped_actions[0]", 0},
		{"65 scopes", &tokendv1.GetTokenRequest{CompanyId: "biz_1", ScopedActions: scopes(65)}, "scoped_actions: 65 scopes", 0},
		{"negative min_ttl", &tokendv1.GetTokenRequest{CompanyId: "biz_1", MinTtl: durationpb.New(-time.Second)}, "min_ttl -1s", 0},
		{"min_ttl over 3h", &tokendv1.GetTokenRequest{CompanyId: "biz_1", MinTtl: durationpb.New(3*time.Hour + 1)}, "min_ttl 3h0m0.000000001s", 0},
		{"malformed min_ttl", &tokendv1.GetTokenRequest{CompanyId: "biz_1", MinTtl: &durationpb.Duration{Seconds: 1, Nanos: -1}}, "min_ttl", 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, err := validate(c.req, false)
			if c.wantErr == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				if r.minTTL != c.minTTL {
					t.Fatalf("minTTL = %v, want %v", r.minTTL, c.minTTL)
				}
				return
			}
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), c.wantErr) {
				t.Fatalf("got %v, want InvalidArgument containing %q", err, c.wantErr)
			}
		})
	}
}

func FuzzValidate(f *testing.F) {
	f.Add("biz_1", "user_1", "chat:read", int64(60))
	f.Add("", "", "", int64(-1))
	f.Fuzz(func(t *testing.T, company, user, scope string, ttl int64) {
		req := &tokendv1.GetTokenRequest{CompanyId: company, UserId: user, ScopedActions: []string{scope}, MinTtl: durationpb.New(time.Duration(ttl) * time.Second)}
		r, err := validate(req, false)
		if err != nil {
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("non-InvalidArgument error %v", err)
			}
			return
		}
		if r.companyID == "" && r.userID == "" || r.minTTL < 0 || r.minTTL > MaxMinTTL || len(scope) == 0 || len(scope) > MaxScopeBytes {
			t.Fatalf("accepted an invalid request: %+v", req)
		}
	})
}

func TestUpstreamStatusCodes(t *testing.T) {
	cases := []struct {
		err  error
		code codes.Code
	}{
		{&whop.Error{StatusCode: 400, Message: "bad"}, codes.InvalidArgument},
		{&whop.Error{StatusCode: 401, Message: "Invalid or missing API key"}, codes.FailedPrecondition},
		{&whop.Error{StatusCode: 403, Message: "no"}, codes.PermissionDenied},
		{&whop.Error{StatusCode: 404, Message: "gone"}, codes.NotFound},
		{&whop.Error{StatusCode: 408}, codes.Unavailable},
		{&whop.Error{StatusCode: 422, Message: "verify"}, codes.InvalidArgument},
		{&whop.Error{StatusCode: 429}, codes.Unavailable},
		{&whop.Error{StatusCode: 503}, codes.Unavailable},
		{&whop.Error{Err: os.ErrDeadlineExceeded}, codes.Unavailable},
		{&whop.Error{Message: "timed out after 10s waiting for Whop", Err: whop.ErrTimeout}, codes.Unavailable},
		{&whop.Error{StatusCode: 200, Message: "response missing token"}, codes.Unavailable},
		{&whop.Error{StatusCode: 409}, codes.Aborted},
		{&refresher.PausedError{Credential: "default", Until: time.Now().Add(time.Minute), Why: "default cooldown (no Retry-After)"}, codes.Unavailable},
		{context.DeadlineExceeded, codes.DeadlineExceeded},
	}
	for _, c := range cases {
		err := upstreamStatus(c.err)
		if status.Code(err) != c.code {
			t.Errorf("%v -> %v, want %v", c.err, status.Code(err), c.code)
		}
	}
}

// TestUpstreamStatusDetails: what Whop said beyond its message reaches the
// caller as a google.rpc.ErrorInfo, and a wait it asked for as RetryInfo.
func TestUpstreamStatusDetails(t *testing.T) {
	err := upstreamStatus(&whop.Error{StatusCode: 400, Type: "invalid_request_error", Code: "parameter_invalid", Param: "company_id", Message: "Invalid parameter"})
	st := status.Convert(err)
	var info *errdetails.ErrorInfo
	for _, d := range st.Details() {
		if i, ok := d.(*errdetails.ErrorInfo); ok {
			info = i
		}
	}
	if info == nil || info.Reason != "PARAMETER_INVALID" || info.Domain != whopDomain ||
		info.Metadata["type"] != "invalid_request_error" || info.Metadata["param"] != "company_id" || info.Metadata["http_status"] != "400" {
		t.Fatalf("ErrorInfo = %v, want reason PARAMETER_INVALID with type, param and status", info)
	}
	err = upstreamStatus(&whop.Error{StatusCode: 429, RetryAfter: 2 * time.Second, RetryAfterFrom: "retry-after"})
	var retry *errdetails.RetryInfo
	for _, d := range status.Convert(err).Details() {
		if r, ok := d.(*errdetails.RetryInfo); ok {
			retry = r
		}
	}
	if retry == nil || retry.RetryDelay.AsDuration() != 2*time.Second {
		t.Fatalf("RetryInfo = %v, want 2s", retry)
	}
	if msg := status.Convert(upstreamStatus(context.DeadlineExceeded)).Message(); strings.Contains(msg, "will be cached") {
		t.Fatalf("deadline message promises a cached token: %q", msg)
	}
}
