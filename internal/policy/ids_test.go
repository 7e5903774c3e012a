package policy

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// TestSystemIDs is the one test that reads the host's user database: root
// is uid 0 everywhere.
func TestSystemIDs(t *testing.T) {
	ids := SystemIDs()
	uid, err := ids.LookupUser("root")
	if err != nil || uid != 0 {
		t.Fatalf(`LookupUser("root") = %d, %v; want 0`, uid, err)
	}
	if _, err := ids.LookupUser("no-such-user-tokend-test"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("LookupUser of a missing user = %v, want ErrNotFound", err)
	}
}

func TestCallerForUser(t *testing.T) {
	ids := testIDs()
	tests := []struct {
		user    string
		want    Caller
		wantErr string
	}{
		{user: "billing", want: Caller{UID: uidBilling, GID: uidBilling, Groups: []uint32{uidBilling, gidPayments}}},
		{user: "1002", want: Caller{UID: uidAlice, GID: uidAlice, Groups: []uint32{gidOncall}}},
		{user: "bob", wantErr: `unknown user "bob"`},
		{user: "ldapuser", wantErr: "connection refused"},
		{user: "4000", wantErr: "uid 4000 has no entry"},
		{user: "99999999999", wantErr: "out of range"},
		{user: "", wantErr: "no user given"},
	}
	for _, tt := range tests {
		t.Run(tt.user, func(t *testing.T) {
			c, err := CallerForUser(tt.user, ids)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("CallerForUser = %+v, %v; want an error with %q", c, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.UID != tt.want.UID || c.GID != tt.want.GID || !slices.Equal(c.Groups, tt.want.Groups) || c.PID != 0 || c.Exe != nil {
				t.Fatalf("CallerForUser = %+v, want %+v", c, tt.want)
			}
		})
	}
}

// TestCallerForUserChecks runs the "tokenctl policy check" path end to end:
// a user's supplementary groups count, and exe rules never match.
func TestCallerForUserChecks(t *testing.T) {
	ids := testIDs()
	p := mustParse(t, matrixPolicy)
	c, err := CallerForUser("billing", ids)
	if err != nil {
		t.Fatal(err)
	}
	if d := p.Check(c, Request{CompanyID: "biz_pay", Scopes: []string{"payments:write"}}); !d.Allowed || d.Rule != "by-supplementary-group" {
		t.Fatalf("Check = %+v, want allowed by by-supplementary-group", d)
	}
	ids.member[uidDeploy] = []uint32{uidDeploy}
	c, err = CallerForUser("deploy", ids)
	if err != nil {
		t.Fatal(err)
	}
	if d := p.Check(c, Request{CompanyID: "biz_deploy", Scopes: []string{"deploy:run"}}); d.Allowed || !strings.Contains(d.Reason, "requires exe") {
		t.Fatalf("Check = %+v, want denied for the exe", d)
	}
}
