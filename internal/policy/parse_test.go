package policy

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name string
		text string
		line int
		word string // a word of the problem that must appear after "test.yaml:LINE: "
	}{
		{"empty file", "", 1, "empty policy"},
		{"only comments", "# nothing here\n", 1, "empty policy"},
		{"syntax: unclosed flow list", "rules:\n  - name: a\n    users: [1\n  - name: b\n", 3, "did not find expected ',' or ']'"},
		{"syntax: bad indentation", "rules:\n  - name: a\n    users: [1]\n    - x\n", 2, "did not find expected key"},
		{"syntax: unclosed quote", "rules:\n  - name: a\n    users: [1]\n  - name: \"b\n", 4, "end of stream"},
		{"syntax: undefined tag handle", "rules:\n  - name: a\n    users: [1]\n    scopes: !x!y [x]\n", 4, "tag"},
		{"syntax: tab indentation", "rules:\n\t- name: a\n", 2, "cannot start any token"},
		{"control character", "rules: []\n# \x01\n", 2, "control character"},
		{"invalid UTF-8", "rules: []\n\n# \xff\n", 3, "UTF-8"},
		{"unknown anchor", "rules:\n  - name: a\n    users: [1]\n    scopes: *chat\n", 4, "anchor"},
		{"more than one document", "rules: []\n---\nrules: []\n", 3, "more than one"},
		{"not a mapping", "- name: a\n", 1, "mapping"},
		{"no rules key", "{}\n", 1, "rules"},
		{"unknown top-level field", "rules: []\nrule: []\n", 2, `unknown field "rule"`},
		{"rules not a list", "rules:\n  name: a\n", 2, "list"},
		{"rule not a mapping", "rules:\n  - a\n", 2, "mapping"},
		{"missing rule name", "rules:\n  - users: [1]\n    all_scopes: true\n", 2, "no name"},
		{"empty rule name", "rules:\n  - name: \"\"\n    users: [1]\n", 2, "empty"},
		{"null rule name", "rules:\n  - name:\n    users: [1]\n", 2, "name"},
		{"duplicate rule name", "rules:\n  - name: a\n    users: [1]\n    all_scopes: true\n  - name: a\n    users: [2]\n    all_scopes: true\n", 5, `duplicate rule name "a" (first at line 2)`},
		{"unknown rule field", "rules:\n  - name: a\n    users: [1]\n    scope: [x]\n", 4, `unknown field "scope"`},
		{"duplicate rule field", "rules:\n  - name: a\n    users: [1]\n    users: [2]\n    all_scopes: true\n", 4, `duplicate field "users"`},
		{"merge key", "rules:\n  - name: a\n    <<: {users: [1]}\n", 3, "merge"},
		{"neither users nor groups", "rules:\n  - name: a\n    all_scopes: true\n", 2, "neither users nor groups"},
		{"empty users and groups", "rules:\n  - name: a\n    users: []\n    groups: []\n    all_scopes: true\n", 2, "neither users nor groups"},
		{"users not a list", "rules:\n  - name: a\n    users: billing\n", 3, "list"},
		{"unknown user", "rules:\n  - name: a\n    users: [billing, bob]\n    all_scopes: true\n", 3, `unknown user "bob"`},
		{"unknown group", "rules:\n  - name: a\n    groups:\n      - payments\n      - wheel\n    all_scopes: true\n", 5, `unknown group "wheel"`},
		{"user lookup fails", "rules:\n  - name: a\n    users: [ldapuser]\n    all_scopes: true\n", 3, "connection refused"},
		{"negative uid", "rules:\n  - name: a\n    users: [-1]\n    all_scopes: true\n", 3, "out of range"},
		{"uid too large", "rules:\n  - name: a\n    users: [4294967296]\n    all_scopes: true\n", 3, "out of range"},
		{"quoted uid too large", "rules:\n  - name: a\n    users: [\"99999999999\"]\n    all_scopes: true\n", 3, "out of range"},
		{"uid is a float", "rules:\n  - name: a\n    users: [1.5]\n    all_scopes: true\n", 3, "user name or id"},
		{"empty user name", "rules:\n  - name: a\n    users: [\"\"]\n    all_scopes: true\n", 3, "empty"},
		{"invalid company pattern", "rules:\n  - name: a\n    users: [1]\n    subjects:\n      companies: [\"biz_[\"]\n    all_scopes: true\n", 5, "invalid pattern"},
		{"invalid user pattern", "rules:\n  - name: a\n    users: [1]\n    subjects:\n      users:\n        - user_1\n        - 'user_\\'\n    all_scopes: true\n", 7, "invalid pattern"},
		{"invalid scope pattern", "rules:\n  - name: a\n    users: [1]\n    scopes: [\"chat:[a-\"]\n", 4, "invalid pattern"},
		{"empty scope pattern", "rules:\n  - name: a\n    users: [1]\n    scopes: [chat:read, \"\"]\n", 4, "empty"},
		{"null scope pattern", "rules:\n  - name: a\n    users: [1]\n    scopes: [~]\n", 4, "null"},
		{"subjects not a mapping", "rules:\n  - name: a\n    users: [1]\n    subjects: [biz_1]\n    all_scopes: true\n", 4, "mapping"},
		{"unknown subjects field", "rules:\n  - name: a\n    users: [1]\n    subjects:\n      company: [biz_1]\n    all_scopes: true\n", 5, `unknown field "company"`},
		{"exe not absolute", "rules:\n  - name: a\n    users: [1]\n    exe: bin/billing\n    all_scopes: true\n", 4, "absolute"},
		{"exe not clean", "rules:\n  - name: a\n    users: [1]\n    exe: /usr/local/../bin//billing\n    all_scopes: true\n", 4, "clean"},
		{"all_scopes is a string", "rules:\n  - name: a\n    users: [1]\n    all_scopes: \"true\"\n", 4, "true or false"},
		{"all_scopes is yes", "rules:\n  - name: a\n    users: [1]\n    all_scopes: yes\n", 4, "true or false"},
		{"all_scopes is a number", "rules:\n  - name: a\n    users: [1]\n    all_scopes: 1\n", 4, "true or false"},
		{"empty credentials", "rules:\n  - name: a\n    users: [1]\n    credentials: []\n    all_scopes: true\n", 4, "credentials is empty"},
		{"no scopes", "rules:\n  - name: a\n    users: [1]\n    subjects:\n      companies: [biz_1]\n", 2, "allows no scopes"},
		{"all_scopes false and no scopes", "rules:\n  - name: a\n    users: [1]\n    scopes: []\n    all_scopes: false\n", 2, "allows no scopes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Parse("test.yaml", []byte(tt.text), testIDs())
			if err == nil {
				t.Fatalf("Parse succeeded with rules %q; want an error at line %d", p.Rules(), tt.line)
			}
			prefix := fmt.Sprintf("test.yaml:%d: ", tt.line)
			msg := err.Error()
			if !strings.HasPrefix(msg, prefix) || !strings.Contains(msg[len(prefix):], tt.word) {
				t.Fatalf("error %q; want prefix %q and %q", msg, prefix, tt.word)
			}
		})
	}
}

func TestParseAccepts(t *testing.T) {
	tests := []struct {
		name  string
		text  string
		rules []string
	}{
		{"empty rules", "rules: []\n", nil},
		{"numeric ids, quoted and not, hex", "rules:\n  - name: a\n    users: [1001, \"1002\", 0x3EA]\n    groups: [0]\n    all_scopes: true\n", []string{"a"}},
		{"anchors and aliases", "rules:\n  - name: a\n    users: [1]\n    scopes: &s [\"chat:*\"]\n  - name: b\n    users: &u [2]\n    scopes: *s\n  - name: c\n    users: *u\n    scopes: *s\n", []string{"a", "b", "c"}},
		{"null subjects and lists", "rules:\n  - name: a\n    users: [1]\n    groups:\n    subjects:\n    all_scopes: true\n", []string{"a"}},
		{"credentials with star and names", "rules:\n  - name: a\n    users: [1]\n    credentials: [\"*\", default]\n    all_scopes: true\n", []string{"a"}},
		{"numeric rule name", "rules:\n  - name: 2024\n    users: [1]\n    all_scopes: true\n", []string{"2024"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Parse("test.yaml", []byte(tt.text), testIDs())
			if err != nil {
				t.Fatal(err)
			}
			if got := p.Rules(); fmt.Sprint(got) != fmt.Sprint(tt.rules) {
				t.Fatalf("Rules = %q, want %q", got, tt.rules)
			}
		})
	}
}

func TestParseIDs(t *testing.T) {
	p := mustParse(t, "rules:\n  - name: a\n    users: [billing, 1002, \"1003\", 0x3EC]\n    groups: [payments, \"3000\"]\n    all_scopes: true\n")
	for _, c := range []Caller{
		caller(uidBilling, 1), caller(uidAlice, 1), caller(uidAnalytics, 1), caller(uidDeploy, 1),
		caller(9, gidPayments), caller(9, 9, 9, gidOps),
	} {
		if d := p.Check(c, Request{}); !d.Allowed {
			t.Errorf("uid %d gid %d groups %v denied: %s", c.UID, c.GID, c.Groups, d.Reason)
		}
	}
	if d := p.Check(caller(9, 9, 9), Request{}); d.Allowed {
		t.Error("uid 9 allowed")
	}
}

// TestParseAliasBomb checks that aliases cannot make parsing explode: the
// file is 60 KB, but expands to millions of patterns.
func TestParseAliasBomb(t *testing.T) {
	var b strings.Builder
	b.WriteString("rules:\n  - name: r0\n    users: [1]\n    scopes: &s [")
	for i := range 2000 {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString("a")
	}
	b.WriteString("]\n")
	for i := 1; i < 2000; i++ {
		fmt.Fprintf(&b, "  - {name: r%d, users: [1], scopes: *s}\n", i)
	}
	_, err := Parse("bomb.yaml", []byte(b.String()), testIDs())
	if err == nil || !strings.Contains(err.Error(), "too large") {
		t.Fatalf("Parse = %v, want a 'too large' error", err)
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string, mode os.FileMode) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}

	// Numeric ids only, so that the test does not depend on the host's users.
	good := write("good.yaml", "rules:\n  - name: numeric\n    users: [1001]\n    groups: [\"2000\"]\n    all_scopes: true\n", 0o644)
	p, err := Load(good)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if d := p.Check(caller(1001, 1001), Request{}); !d.Allowed || d.Rule != "numeric" {
		t.Fatalf("Check = %+v, want allowed by numeric", d)
	}

	bad := write("bad.yaml", "rules:\n  - name: a\n    users: [1]\n    scopes: [\"[\"]\n", 0o600)
	if _, err := Load(bad); err == nil || !strings.HasPrefix(err.Error(), bad+":4: ") {
		t.Fatalf("Load = %v, want an error starting %q", err, bad+":4: ")
	}

	open := write("open.yaml", "rules: []\n", 0o666)
	if _, err := Load(open); err == nil || !strings.Contains(err.Error(), "writable by others") {
		t.Fatalf("Load = %v, want a 'writable by others' error", err)
	}

	if _, err := Load(filepath.Join(dir, "missing.yaml")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Load = %v, want ErrNotExist", err)
	}
	if _, err := Load(dir); err == nil || !strings.Contains(err.Error(), "regular file") {
		t.Fatalf("Load(dir) = %v, want a 'regular file' error", err)
	}
}
