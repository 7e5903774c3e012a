package policy

import (
	"errors"
	"fmt"
	"os/user"
	"strconv"
)

// ErrNotFound is wrapped by IDResolver errors for a name that does not
// exist, so that Parse can say "unknown user" rather than repeat the
// resolver's error.
var ErrNotFound = errors.New("not found")

// IDResolver maps local user and group names to ids. Its methods must be
// safe for concurrent use: UserName is called by Check when it denies.
type IDResolver interface {
	LookupUser(name string) (uint32, error)
	LookupGroup(name string) (uint32, error)
	// UserName returns the name of uid, or "" when it has none.
	UserName(uid uint32) string
}

// GroupLister is implemented by IDResolvers that know a user's groups.
// CallerForUser uses it when its resolver has it, and os/user otherwise.
type GroupLister interface {
	// UserGroups returns the primary gid and the supplementary gids of uid.
	UserGroups(uid uint32) (gid uint32, groups []uint32, err error)
}

// SystemIDs resolves names with os/user: /etc/passwd and /etc/group, or NSS
// when built with cgo. It also implements GroupLister.
func SystemIDs() IDResolver { return systemIDs{} }

type systemIDs struct{}

func (systemIDs) LookupUser(name string) (uint32, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return 0, notFound(err)
	}
	return parseID(u.Uid)
}

func (systemIDs) LookupGroup(name string) (uint32, error) {
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, notFound(err)
	}
	return parseID(g.Gid)
}

func (systemIDs) UserName(uid uint32) string {
	u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10))
	if err != nil {
		return ""
	}
	return u.Username
}

func (systemIDs) UserGroups(uid uint32) (uint32, []uint32, error) {
	u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10))
	if err != nil {
		return 0, nil, notFound(err)
	}
	gid, err := parseID(u.Gid)
	if err != nil {
		return 0, nil, err
	}
	ids, err := u.GroupIds()
	if err != nil {
		return 0, nil, fmt.Errorf("groups of %s: %w", u.Username, err)
	}
	groups := make([]uint32, 0, len(ids))
	for _, s := range ids {
		g, err := parseID(s)
		if err != nil {
			return 0, nil, err
		}
		groups = append(groups, g)
	}
	return gid, groups, nil
}

func notFound(err error) error {
	var (
		uu  user.UnknownUserError
		uid user.UnknownUserIdError
		ug  user.UnknownGroupError
	)
	if errors.As(err, &uu) || errors.As(err, &uid) || errors.As(err, &ug) {
		return fmt.Errorf("%w: %w", ErrNotFound, err)
	}
	return err
}

func parseID(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("id %q: not a 32-bit number", s)
	}
	return uint32(n), nil
}

// CallerForUser builds the Caller that user (a name or a numeric uid) would
// be, with its primary and supplementary groups, for "tokenctl policy
// check". PID is 0 and Exe nil, so rules that name exe never match it.
func CallerForUser(userOrUID string, ids IDResolver) (Caller, error) {
	if ids == nil {
		ids = SystemIDs()
	}
	if userOrUID == "" {
		return Caller{}, errors.New("no user given: name a user or a uid, such as billing or 1001")
	}
	var uid uint32
	if isDigits(userOrUID) {
		n, err := strconv.ParseUint(userOrUID, 10, 32)
		if err != nil {
			return Caller{}, fmt.Errorf("uid %s: out of range", userOrUID)
		}
		uid = uint32(n)
	} else {
		n, err := ids.LookupUser(userOrUID)
		if err != nil {
			if errors.Is(err, ErrNotFound) {
				return Caller{}, fmt.Errorf("unknown user %q", userOrUID)
			}
			return Caller{}, fmt.Errorf("look up user %q: %w", userOrUID, err)
		}
		uid = n
	}
	gl, ok := ids.(GroupLister)
	if !ok {
		gl = systemIDs{}
	}
	gid, groups, err := gl.UserGroups(uid)
	if err != nil {
		if errors.Is(err, ErrNotFound) {
			return Caller{}, fmt.Errorf("uid %d has no entry in the user database, so its groups are unknown; name a user that exists", uid)
		}
		return Caller{}, fmt.Errorf("groups of uid %d: %w", uid, err)
	}
	return Caller{UID: uid, GID: gid, Groups: groups}, nil
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}
