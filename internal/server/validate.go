package server

import (
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// Limits on a GetTokenRequest, so hostile input stays cheap to reject.
const (
	MaxScopes     = 64
	MaxScopeBytes = 128
	MaxIDBytes    = 128
	MaxTokenBytes = 8 << 10
	DefaultMinTTL = time.Minute
	MaxMinTTL     = 3 * time.Hour
)

// request is a validated GetTokenRequest.
type request struct {
	companyID, userID string
	scopes            []string
	minTTL            time.Duration
}

// validate checks req and names the offending field in an InvalidArgument
// status. oauth says the credential is a user OAuth token, which names its
// own user: then the request must name no ids.
func validate(req *tokendv1.GetTokenRequest, oauth bool) (request, error) {
	r := request{companyID: req.GetCompanyId(), userID: req.GetUserId(), scopes: req.GetScopedActions(), minTTL: DefaultMinTTL}
	switch {
	case oauth && (r.companyID != "" || r.userID != ""):
		return r, invalid("company_id and user_id must be empty with credential %q: it is a user OAuth token, and Whop derives the user from it", req.GetCredential())
	case !oauth && r.companyID == "" && r.userID == "":
		return r, invalid("company_id or user_id is required")
	}
	if err := checkID("company_id", r.companyID, "biz_"); err != nil {
		return r, err
	}
	if err := checkID("user_id", r.userID, "user_"); err != nil {
		return r, err
	}
	if len(r.scopes) > MaxScopes {
		return r, invalid("scoped_actions: %d scopes, at most %d allowed", len(r.scopes), MaxScopes)
	}
	for i, s := range r.scopes {
		switch {
		case s == "":
			return r, invalid("scoped_actions[%d]: empty scope", i)
		case len(s) > MaxScopeBytes:
			return r, invalid("scoped_actions[%d]: %d bytes, at most %d allowed", i, len(s), MaxScopeBytes)
		case !printable(s):
			return r, invalid("scoped_actions[%d] %q: only printable ASCII without spaces is allowed, such as chat:read", i, s)
		}
	}
	if n := len(req.GetRejectedToken()); n > MaxTokenBytes {
		return r, invalid("rejected_token: %d bytes, at most %d allowed", n, MaxTokenBytes)
	}
	if d := req.GetMinTtl(); d != nil {
		if err := d.CheckValid(); err != nil {
			return r, invalid("min_ttl: %v", err)
		}
		r.minTTL = d.AsDuration()
		if r.minTTL < 0 || r.minTTL > MaxMinTTL {
			return r, invalid("min_ttl %v: must be between 0 and %v", r.minTTL, MaxMinTTL)
		}
	}
	return r, nil
}

func checkID(field, id, prefix string) error {
	switch {
	case id == "":
		return nil
	case len(id) > MaxIDBytes:
		return invalid("%s: %d bytes, at most %d allowed", field, len(id), MaxIDBytes)
	case !strings.HasPrefix(id, prefix) || len(id) == len(prefix):
		return invalid("%s %q: must start with %q and name an id, such as %sxxxxxxxxxxxxxx", field, id, prefix, prefix)
	case !printable(id):
		return invalid("%s %q: only printable ASCII without spaces is allowed", field, id)
	}
	return nil
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] > '~' {
			return false
		}
	}
	return true
}

func invalid(format string, args ...any) error {
	return status.Error(codes.InvalidArgument, fmt.Sprintf(format, args...))
}
