package policy

import (
	"errors"
	"fmt"
)

// fakeIDs is an IDResolver and GroupLister over fixed tables, so tests do
// not depend on the host's /etc/passwd. A name listed in broken fails with
// an error that is not ErrNotFound, as a failing NSS service would.
type fakeIDs struct {
	users  map[string]uint32
	groups map[string]uint32
	member map[uint32][]uint32 // uid -> primary gid, then supplementary gids
	broken map[string]bool
}

func (f *fakeIDs) LookupUser(name string) (uint32, error) {
	if f.broken[name] {
		return 0, errors.New("nss: connection refused")
	}
	if id, ok := f.users[name]; ok {
		return id, nil
	}
	return 0, fmt.Errorf("user %s: %w", name, ErrNotFound)
}

func (f *fakeIDs) LookupGroup(name string) (uint32, error) {
	if f.broken[name] {
		return 0, errors.New("nss: connection refused")
	}
	if id, ok := f.groups[name]; ok {
		return id, nil
	}
	return 0, fmt.Errorf("group %s: %w", name, ErrNotFound)
}

func (f *fakeIDs) UserName(uid uint32) string {
	for name, id := range f.users {
		if id == uid {
			return name
		}
	}
	return ""
}

func (f *fakeIDs) UserGroups(uid uint32) (uint32, []uint32, error) {
	m, ok := f.member[uid]
	if !ok {
		return 0, nil, fmt.Errorf("uid %d: %w", uid, ErrNotFound)
	}
	return m[0], m[1:], nil
}

// Accounts of the fake host.
const (
	uidRoot      = 0
	uidBilling   = 1001
	uidAlice     = 1002
	uidAnalytics = 1003
	uidDeploy    = 1004
	uidOps       = 1500
	uidAgent     = 1600
	uidNobody    = 65534

	gidPayments = 2000
	gidSupport  = 2001
	gidOps      = 3000
	gidOncall   = 3001
)

func testIDs() *fakeIDs {
	return &fakeIDs{
		users: map[string]uint32{
			"root": uidRoot, "billing": uidBilling, "alice": uidAlice, "analytics": uidAnalytics,
			"deploy": uidDeploy, "ops": uidOps, "agent": uidAgent, "nobody": uidNobody,
		},
		groups: map[string]uint32{
			"root": 0, "billing": uidBilling, "payments": gidPayments, "support": gidSupport,
			"ops": gidOps, "oncall": gidOncall, "nogroup": 65534,
		},
		member: map[uint32][]uint32{
			uidRoot:    {0, 0},
			uidBilling: {uidBilling, uidBilling, gidPayments},
			uidAlice:   {uidAlice, gidOncall},
			uidAgent:   {uidAgent, gidSupport},
			uidNobody:  {65534},
		},
		broken: map[string]bool{"ldapuser": true},
	}
}

// caller returns the Caller of a fake account, as SO_PEERCRED and
// /proc/PID/status would describe it.
func caller(uid, gid uint32, groups ...uint32) Caller {
	return Caller{UID: uid, GID: gid, Groups: groups, PID: 4242}
}

func exeIs(path string) func() (string, error) {
	return func() (string, error) { return path, nil }
}
