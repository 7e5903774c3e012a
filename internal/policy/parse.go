package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"go.yaml.in/yaml/v3"

	"github.com/tokend/tokend/internal/safefile"
)

// MaxFileSize bounds what Load reads; a policy is a few kilobytes.
const MaxFileSize = 1 << 20

// maxNodes bounds the YAML nodes Parse visits, counting each use of an
// anchor again, so that aliases cannot make parsing explode.
const maxNodes = 1 << 20

// Load reads and parses the policy file at path, resolving names with
// SystemIDs. It refuses a file that anyone but root or tokend's user may
// write or owns, since whoever can edit the policy can grant themselves
// tokens.
func Load(path string) (*Policy, error) {
	data, err := safefile.Read(path, safefile.Rules{What: "policy", MaxSize: MaxFileSize})
	if err != nil {
		return nil, err
	}
	return Parse(path, data, SystemIDs())
}

// Parse parses a policy; name stands for the file in error messages, which
// read "name:LINE: problem". Names of users and groups are resolved with ids
// (SystemIDs when nil), which the Policy keeps to name callers in denials.
func Parse(name string, data []byte, ids IDResolver) (*Policy, error) {
	if ids == nil {
		ids = SystemIDs()
	}
	p := &parser{name: name, data: data, resolver: ids, budget: maxNodes}
	rules, err := p.document()
	if err != nil {
		return nil, err
	}
	pol := &Policy{rules: rules, ids: ids}
	for i := range rules {
		if rules[i].exe != "" {
			pol.needsExe = true
		}
	}
	return pol, nil
}

type parser struct {
	name     string
	data     []byte
	resolver IDResolver
	budget   int
}

func (p *parser) errorf(line int, format string, args ...any) error {
	if line < 1 {
		line = 1
	}
	return fmt.Errorf("%s:%d: %s", p.name, line, fmt.Sprintf(format, args...))
}

var yamlLine = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// syntaxError gives a yaml.v3 error the file:line form. yaml.v3 says
// "yaml: line N: ..." for most problems; for the few it reports without a
// line, the line is found here.
func (p *parser) syntaxError(err error) error {
	msg := err.Error()
	line := 0
	if m := yamlLine.FindStringSubmatch(msg); m != nil {
		line, _ = strconv.Atoi(m[1])
		msg = m[2]
	} else {
		msg = strings.TrimPrefix(msg, "yaml: ")
	}
	if isParserProblem(msg) {
		// yaml.v3 numbers the lines of parser (not scanner) errors from 0,
		// and leaves out line 0: the line of the construct that failed
		// to close, or else of the problem.
		return p.errorf(line+1, "%s", msg)
	}
	if line > 0 {
		return p.errorf(line, "%s", msg)
	}
	line = 1
	if _, anchor, ok := strings.Cut(msg, "unknown anchor '"); ok {
		anchor, _, _ = strings.Cut(anchor, "'")
		if i := bytes.Index(p.data, []byte("*"+anchor)); i >= 0 {
			line = lineAt(p.data, i)
		}
	}
	return p.errorf(line, "%s", msg)
}

// parserProblems are the messages of yaml.v3's parser, as opposed to its
// scanner, from parserc.go.
var parserProblems = []string{
	"did not find expected <stream-start>",
	"did not find expected <document start>",
	"found undefined tag handle",
	"did not find expected node content",
	"did not find expected '-' indicator",
	"did not find expected key",
	"did not find expected ',' or ']'",
	"did not find expected ',' or '}'",
	"found duplicate %YAML directive",
	"found incompatible YAML document",
	"found duplicate %TAG directive",
}

func isParserProblem(msg string) bool {
	return slices.Contains(parserProblems, msg) ||
		strings.HasPrefix(msg, "expected ") && strings.Contains(msg, " event but got ")
}

func lineAt(data []byte, off int) int { return 1 + bytes.Count(data[:off], []byte("\n")) }

// checkText reports characters YAML forbids with their line, which yaml.v3
// would report without one.
func (p *parser) checkText() error {
	for i := 0; i < len(p.data); {
		r, size := utf8.DecodeRune(p.data[i:])
		switch {
		case r == utf8.RuneError && size <= 1:
			return p.errorf(lineAt(p.data, i), "invalid UTF-8")
		case r < 0x20 && r != '\t' && r != '\n' && r != '\r', r == 0x7f:
			return p.errorf(lineAt(p.data, i), "control character %U is not allowed", r)
		}
		i += size
	}
	return nil
}

func (p *parser) document() ([]rule, error) {
	if err := p.checkText(); err != nil {
		return nil, err
	}
	dec := yaml.NewDecoder(bytes.NewReader(p.data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, p.errorf(1, `empty policy: write "rules: []" to deny every request`)
		}
		return nil, p.syntaxError(err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		line := extra.Line
		if len(extra.Content) > 0 {
			line = extra.Content[0].Line
		}
		return nil, p.errorf(line, "more than one YAML document; a policy is one document")
	} else if !errors.Is(err, io.EOF) {
		return nil, p.syntaxError(err)
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) != 1 {
		return nil, p.errorf(doc.Line, "not a YAML document")
	}
	root, err := p.deref(doc.Content[0])
	if err != nil {
		return nil, err
	}
	if root.Kind != yaml.MappingNode {
		return nil, p.errorf(root.Line, `the policy must be a mapping with a "rules" list, such as "rules: []"`)
	}
	fields, err := p.fields(root, "the policy", "rules")
	if err != nil {
		return nil, err
	}
	rf, ok := fields["rules"]
	if !ok {
		return nil, p.errorf(root.Line, `no "rules" list; write "rules: []" to deny every request`)
	}
	seq, err := p.deref(rf.val)
	if err != nil {
		return nil, err
	}
	if seq.Kind != yaml.SequenceNode {
		return nil, p.errorf(seq.Line, `rules: must be a list of rules; write "rules: []" to deny every request`)
	}
	rules := make([]rule, 0, len(seq.Content))
	firstLine := map[string]int{}
	for _, item := range seq.Content {
		r, line, err := p.rule(item)
		if err != nil {
			return nil, err
		}
		if first, dup := firstLine[r.name]; dup {
			return nil, p.errorf(line, "duplicate rule name %q (first at line %d)", r.name, first)
		}
		firstLine[r.name] = line
		rules = append(rules, r)
	}
	return rules, nil
}

// deref follows aliases and charges the node against the budget.
func (p *parser) deref(n *yaml.Node) (*yaml.Node, error) {
	line := n.Line
	for i := 0; n.Kind == yaml.AliasNode; i++ {
		if n.Alias == nil || i > 100 {
			return nil, p.errorf(line, "unresolvable alias")
		}
		n = n.Alias
	}
	p.budget--
	if p.budget < 0 {
		return nil, p.errorf(line, "policy too large: more than %d values once aliases are expanded", maxNodes)
	}
	return n, nil
}

type field struct{ key, val *yaml.Node }

// fields checks that m has only known, distinct, string keys and returns
// them by name.
func (p *parser) fields(m *yaml.Node, what string, known ...string) (map[string]field, error) {
	out := make(map[string]field, len(m.Content)/2)
	for i := 0; i+1 < len(m.Content); i += 2 {
		k, err := p.deref(m.Content[i])
		if err != nil {
			return nil, err
		}
		if k.Kind != yaml.ScalarNode {
			return nil, p.errorf(k.Line, "%s: field names must be plain strings", what)
		}
		if k.Value == "<<" && k.ShortTag() == "!!merge" {
			return nil, p.errorf(k.Line, "%s: merge keys (<<) are not supported; write the fields out", what)
		}
		if !slices.Contains(known, k.Value) {
			return nil, p.errorf(k.Line, "%s: unknown field %q; known fields are %s", what, k.Value, strings.Join(known, ", "))
		}
		if prev, dup := out[k.Value]; dup {
			return nil, p.errorf(k.Line, "%s: duplicate field %q (first at line %d)", what, k.Value, prev.key.Line)
		}
		out[k.Value] = field{key: m.Content[i], val: m.Content[i+1]}
	}
	return out, nil
}

var ruleFields = []string{"name", "users", "groups", "exe", "credentials", "subjects", "scopes", "all_scopes"}

func (p *parser) rule(item *yaml.Node) (rule, int, error) {
	var r rule
	n, err := p.deref(item)
	if err != nil {
		return r, 0, err
	}
	line := item.Line
	if n.Kind != yaml.MappingNode {
		return r, line, p.errorf(line, "a rule must be a mapping with name, users or groups, subjects and scopes")
	}
	nf, ok, err := p.optional(n, "name")
	if err != nil {
		return r, line, err
	}
	if !ok {
		return r, line, p.errorf(line, "rule has no name; every rule needs a unique name")
	}
	name, err := p.str(nf.val, "name")
	if err != nil {
		return r, line, err
	}
	line = nf.val.Line
	r.name = name
	what := fmt.Sprintf("rule %q", name)
	fs, err := p.fields(n, what, ruleFields...)
	if err != nil {
		return r, line, err
	}

	if f, ok := fs["users"]; ok {
		if r.uids, err = p.idList(f.val, what+": users", "user", p.resolver.LookupUser); err != nil {
			return r, line, err
		}
	}
	if f, ok := fs["groups"]; ok {
		if r.gids, err = p.idList(f.val, what+": groups", "group", p.resolver.LookupGroup); err != nil {
			return r, line, err
		}
	}
	if len(r.uids) == 0 && len(r.gids) == 0 {
		return r, line, p.errorf(line, "%s has neither users nor groups, so it applies to no one; list at least one", what)
	}

	if f, ok := fs["exe"]; ok {
		if r.exe, err = p.str(f.val, what+": exe"); err != nil {
			return r, line, err
		}
		if !path.IsAbs(r.exe) {
			return r, line, p.errorf(f.val.Line, "%s: exe %q is not an absolute path", what, r.exe)
		}
		if c := path.Clean(r.exe); c != r.exe {
			return r, line, p.errorf(f.val.Line, "%s: exe %q is not a clean path; write %s", what, r.exe, c)
		}
	}

	if f, ok := fs["credentials"]; ok {
		creds, err := p.strs(f.val, what+": credentials")
		if err != nil {
			return r, line, err
		}
		if len(creds) == 0 {
			return r, line, p.errorf(f.val.Line, `%s: credentials is empty; omit it for "default" or write ["*"] for every credential`, what)
		}
		for _, c := range creds {
			if c == "*" {
				r.anyCred = true
			} else if !slices.Contains(r.creds, c) {
				r.creds = append(r.creds, c)
			}
		}
	} else {
		r.creds = []string{DefaultCredential}
	}

	if f, ok := fs["subjects"]; ok {
		s, err := p.deref(f.val)
		if err != nil {
			return r, line, err
		}
		switch {
		case s.Kind == yaml.ScalarNode && s.ShortTag() == "!!null":
		case s.Kind != yaml.MappingNode:
			return r, line, p.errorf(s.Line, "%s: subjects must be a mapping with companies and users", what)
		default:
			sf, err := p.fields(s, what+": subjects", "companies", "users")
			if err != nil {
				return r, line, err
			}
			if f, ok := sf["companies"]; ok {
				if r.companies, err = p.patterns(f.val, what+": subjects.companies"); err != nil {
					return r, line, err
				}
			}
			if f, ok := sf["users"]; ok {
				if r.users, err = p.patterns(f.val, what+": subjects.users"); err != nil {
					return r, line, err
				}
			}
		}
	}

	if f, ok := fs["scopes"]; ok {
		if r.scopes, err = p.patterns(f.val, what+": scopes"); err != nil {
			return r, line, err
		}
	}
	if f, ok := fs["all_scopes"]; ok {
		v, err := p.deref(f.val)
		if err != nil {
			return r, line, err
		}
		if v.Kind != yaml.ScalarNode || v.ShortTag() != "!!bool" {
			return r, line, p.errorf(v.Line, "%s: all_scopes must be true or false, not %s", what, describeNode(v))
		}
		if err := v.Decode(&r.allScopes); err != nil {
			return r, line, p.errorf(v.Line, "%s: all_scopes must be true or false", what)
		}
	}
	if len(r.scopes.all) == 0 && !r.allScopes {
		return r, line, p.errorf(line, "%s allows no scopes, so it allows nothing; list scopes, or set all_scopes: true", what)
	}
	return r, line, nil
}

// optional looks up one field of m without judging the others.
func (p *parser) optional(m *yaml.Node, key string) (field, bool, error) {
	for i := 0; i+1 < len(m.Content); i += 2 {
		k, err := p.deref(m.Content[i])
		if err != nil {
			return field{}, false, err
		}
		if k.Kind == yaml.ScalarNode && k.Value == key {
			return field{key: k, val: m.Content[i+1]}, true, nil
		}
	}
	return field{}, false, nil
}

// str reads a non-empty scalar as a string.
func (p *parser) str(n *yaml.Node, what string) (string, error) {
	v, err := p.deref(n)
	if err != nil {
		return "", err
	}
	if v.Kind != yaml.ScalarNode || v.ShortTag() == "!!null" {
		return "", p.errorf(v.Line, "%s: expected a string, not %s", what, describeNode(v))
	}
	if v.Value == "" {
		return "", p.errorf(v.Line, "%s: empty string", what)
	}
	return v.Value, nil
}

// list returns the items of a sequence.
func (p *parser) list(n *yaml.Node, what string) ([]*yaml.Node, error) {
	v, err := p.deref(n)
	if err != nil {
		return nil, err
	}
	switch {
	case v.Kind == yaml.ScalarNode && v.ShortTag() == "!!null":
		return nil, nil
	case v.Kind != yaml.SequenceNode:
		return nil, p.errorf(v.Line, "%s: expected a list such as [a, b], not %s", what, describeNode(v))
	}
	return v.Content, nil
}

func (p *parser) strs(n *yaml.Node, what string) ([]string, error) {
	items, err := p.list(n, what)
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(items))
	for _, it := range items {
		s, err := p.str(it, what)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

func (p *parser) patterns(n *yaml.Node, what string) (patterns, error) {
	var ps patterns
	items, err := p.list(n, what)
	if err != nil {
		return ps, err
	}
	for _, it := range items {
		s, err := p.str(it, what)
		if err != nil {
			return ps, err
		}
		if _, err := path.Match(s, ""); err != nil {
			return ps, p.errorf(it.Line, "%s: invalid pattern %q: %v", what, s, err)
		}
		if !slices.Contains(ps.all, s) {
			ps.add(s)
		}
	}
	return ps, nil
}

// idList resolves a list of names or numeric ids, sorted and without
// duplicates.
func (p *parser) idList(n *yaml.Node, what, kind string, lookup func(string) (uint32, error)) ([]uint32, error) {
	items, err := p.list(n, what)
	if err != nil {
		return nil, err
	}
	out := make([]uint32, 0, len(items))
	for _, it := range items {
		v, err := p.deref(it)
		if err != nil {
			return nil, err
		}
		var id uint32
		switch {
		case v.Kind == yaml.ScalarNode && v.ShortTag() == "!!int":
			var n int64
			if err := v.Decode(&n); err != nil || n < 0 || n >= 1<<32-1 {
				return nil, p.errorf(v.Line, "%s: %s id %s is out of range", what, kind, v.Value)
			}
			id = uint32(n)
		case v.Kind != yaml.ScalarNode || v.ShortTag() != "!!str":
			return nil, p.errorf(v.Line, "%s: expected a %s name or id, not %s", what, kind, describeNode(v))
		case v.Value == "":
			return nil, p.errorf(v.Line, "%s: empty %s name", what, kind)
		case isDigits(v.Value):
			n, err := strconv.ParseUint(v.Value, 10, 32)
			if err != nil || n == 1<<32-1 {
				return nil, p.errorf(v.Line, "%s: %s id %s is out of range", what, kind, v.Value)
			}
			id = uint32(n)
		default:
			id, err = lookup(v.Value)
			if err != nil {
				if errors.Is(err, ErrNotFound) {
					return nil, p.errorf(v.Line, "%s: unknown %s %q", what, kind, v.Value)
				}
				return nil, p.errorf(v.Line, "%s: look up %s %q: %v", what, kind, v.Value, err)
			}
		}
		out = append(out, id)
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

func describeNode(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		switch n.ShortTag() {
		case "!!null":
			return "null"
		case "!!str":
			return strconv.Quote(n.Value)
		}
		return n.Value
	}
	return "this"
}
