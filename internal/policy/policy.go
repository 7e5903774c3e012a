package policy

import (
	"errors"
	"fmt"
	"path"
	"slices"
	"strconv"
	"strings"
)

// DefaultCredential is the credential a Request with an empty Credential
// asks for, and the only one a rule without credentials covers.
const DefaultCredential = "default"

// Caller is the local process asking for a token, from its peer credentials.
type Caller struct {
	UID, GID uint32
	Groups   []uint32 // supplementary gids (may include GID)
	PID      int32
	// Exe resolves the caller's executable path when a rule needs it. It
	// must fail if PID no longer belongs to the process that connected
	// (PID reuse), or a rule naming exe could be satisfied by another
	// program. Nil means exe rules never match. Check calls it at most once,
	// and only when an applicable rule with exe allows everything else.
	Exe func() (string, error)
}

// Request is what the caller asks for.
type Request struct {
	Credential string // empty means DefaultCredential
	CompanyID  string // empty when the request names no company
	UserID     string // empty when the request names no user
	Scopes     []string
}

// Decision is the outcome of Check.
type Decision struct {
	Allowed bool
	Rule    string // the rule that allowed the request
	// Reason says, when denied, what was missing: the caller, the field
	// and value, and the closest rule considered. It holds no secrets and
	// may be returned to the caller.
	Reason string
}

// Policy is a parsed policy file. It is immutable and safe for concurrent
// use; the zero value and nil deny everything.
type Policy struct {
	rules    []rule
	ids      IDResolver
	needsExe bool
}

// rule is one parsed rule, precomputed so that Check does not allocate.
type rule struct {
	name       string
	uids, gids []uint32 // sorted, without duplicates
	exe        string   // "" when the rule does not constrain the executable
	anyCred    bool
	creds      []string
	companies  patterns
	users      patterns
	scopes     patterns
	allScopes  bool
}

// patterns is a list of path.Match patterns, validated at parse time.
type patterns struct {
	all   []string // as written, for messages
	exact []string // patterns without metacharacters
	globs []string
}

func (ps *patterns) add(p string) {
	ps.all = append(ps.all, p)
	if strings.ContainsAny(p, `*?[\`) {
		ps.globs = append(ps.globs, p)
	} else {
		ps.exact = append(ps.exact, p)
	}
}

func (ps *patterns) match(s string) bool {
	for _, p := range ps.exact {
		if p == s {
			return true
		}
	}
	for _, p := range ps.globs {
		// The patterns were validated when parsed, so err is always nil.
		if ok, _ := path.Match(p, s); ok {
			return true
		}
	}
	return false
}

// NeedsExe reports whether some rule names exe, so that the server knows to
// track callers' processes.
func (p *Policy) NeedsExe() bool { return p != nil && p.needsExe }

// Rules returns the rule names in file order, for logs.
func (p *Policy) Rules() []string {
	if p == nil {
		return nil
	}
	names := make([]string, len(p.rules))
	for i := range p.rules {
		names[i] = p.rules[i].name
	}
	return names
}

// stage is how far a request got through a rule's checks, in the order
// they are made; a rule that fails at a later stage is closer to allowing
// the request.
type stage int

const (
	failCredential stage = iota
	failCompany
	failUser
	failScopes
	failExe
	passed
)

// exeResult resolves the caller's executable once per Check.
type exeResult struct {
	done bool
	path string
	err  error
}

func (e *exeResult) get(c *Caller) (string, error) {
	if !e.done {
		e.done = true
		if c.Exe == nil {
			e.err = errNoExe
		} else {
			e.path, e.err = c.Exe()
		}
	}
	return e.path, e.err
}

var errNoExe = errors.New("executable not known")

// Check decides whether c may make request r.
func (p *Policy) Check(c Caller, r Request) Decision {
	if p == nil {
		return Decision{Reason: "no policy is loaded"}
	}
	cred := r.Credential
	if cred == "" {
		cred = DefaultCredential
	}
	var exe exeResult
	for i := range p.rules {
		ru := &p.rules[i]
		if !ru.appliesTo(&c) {
			continue
		}
		if st, _ := ru.check(&c, &r, cred, &exe); st == passed {
			return Decision{Allowed: true, Rule: ru.name}
		}
	}
	return Decision{Reason: p.denial(&c, &r, cred, &exe)}
}

func (ru *rule) appliesTo(c *Caller) bool {
	if has(ru.uids, c.UID) || has(ru.gids, c.GID) {
		return true
	}
	for _, g := range c.Groups {
		if has(ru.gids, g) {
			return true
		}
	}
	return false
}

func has(ids []uint32, id uint32) bool {
	_, ok := slices.BinarySearch(ids, id)
	return ok
}

// check returns the stage at which r fails ru and, for failScopes, the
// index of the first scope not allowed (-1 for an empty list).
func (ru *rule) check(c *Caller, r *Request, cred string, exe *exeResult) (stage, int) {
	if !ru.anyCred && !slices.Contains(ru.creds, cred) {
		return failCredential, 0
	}
	if r.CompanyID != "" && !ru.companies.match(r.CompanyID) {
		return failCompany, 0
	}
	if r.UserID != "" && !ru.users.match(r.UserID) {
		return failUser, 0
	}
	if !ru.allScopes {
		if len(r.Scopes) == 0 {
			return failScopes, -1
		}
		for i, s := range r.Scopes {
			if !ru.scopes.match(s) {
				return failScopes, i
			}
		}
	}
	if ru.exe != "" {
		if got, err := exe.get(c); err != nil || got != ru.exe {
			return failExe, 0
		}
	}
	return passed, 0
}

// denial explains why no rule allowed r, naming the rule that came
// closest. It runs only on the deny path, so it may allocate.
func (p *Policy) denial(c *Caller, r *Request, cred string, exe *exeResult) string {
	var (
		best      *rule
		bestStage stage = -1
		bestScope int
	)
	for i := range p.rules {
		ru := &p.rules[i]
		if !ru.appliesTo(c) {
			continue
		}
		if st, idx := ru.check(c, r, cred, exe); st > bestStage {
			best, bestStage, bestScope = ru, st, idx
		}
	}
	who := p.describe(c)
	if best == nil {
		groups := []string{strconv.FormatUint(uint64(c.GID), 10)}
		for _, g := range c.Groups {
			if s := strconv.FormatUint(uint64(g), 10); !slices.Contains(groups, s) {
				groups = append(groups, s)
			}
		}
		msg := fmt.Sprintf("no rule applies to %s or its groups %s", who, strings.Join(groups, ", "))
		if len(p.rules) == 0 {
			msg += " (the policy has no rules)"
		}
		return msg
	}
	switch bestStage {
	case failCredential:
		return fmt.Sprintf("%s may not use credential %q: rule %q allows credentials %s",
			who, cred, best.name, strings.Join(best.creds, ", "))
	case failCompany:
		return fmt.Sprintf("%s may not request company_id %q: rule %q allows %s",
			who, r.CompanyID, best.name, list("companies", "no company_id", best.companies.all))
	case failUser:
		return fmt.Sprintf("%s may not request user_id %q: rule %q allows %s",
			who, r.UserID, best.name, list("users", "no user_id", best.users.all))
	case failScopes:
		if bestScope < 0 {
			return fmt.Sprintf("%s may not request all scopes (empty scoped_actions): rule %q allows only %s (all_scopes is not set)",
				who, best.name, strings.Join(best.scopes.all, ", "))
		}
		return fmt.Sprintf("%s may not request scope %q: rule %q allows %s",
			who, r.Scopes[bestScope], best.name, strings.Join(best.scopes.all, ", "))
	default: // failExe
		got, err := exe.get(c)
		if err != nil {
			return fmt.Sprintf("%s: the executable of pid %d could not be verified (%v): rule %q requires exe %s",
				who, c.PID, err, best.name, best.exe)
		}
		return fmt.Sprintf("%s may not request this from executable %q (pid %d): rule %q requires exe %s",
			who, got, c.PID, best.name, best.exe)
	}
}

// describe names the caller as "uid 1001 (billing)", or "uid 1001" when the
// user has no name.
func (p *Policy) describe(c *Caller) string {
	s := "uid " + strconv.FormatUint(uint64(c.UID), 10)
	if p.ids != nil {
		if name := p.ids.UserName(c.UID); name != "" {
			s += " (" + name + ")"
		}
	}
	return s
}

func list(what, none string, items []string) string {
	if len(items) == 0 {
		return none
	}
	return what + " " + strings.Join(items, ", ")
}
