package policy

import (
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"testing"
)

var errorPosition = regexp.MustCompile(`^fuzz\.yaml:[1-9][0-9]*: `)

// FuzzParse checks that no input makes Parse or, on what it accepts, Check
// panic; that every error carries a file:line; and that decisions are
// coherent. Seeds are in testdata/fuzz/FuzzParse and below.
func FuzzParse(f *testing.F) {
	for _, name := range []string{"testdata/policy.yaml", "testdata/deny-all.yaml"} {
		data, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte(matrixPolicy))
	f.Add([]byte("rules:\n  - name: a\n    users: [1]\n    scopes: &s [\"chat:*\"]\n  - {name: b, groups: [payments], scopes: *s, exe: /bin/x}\n"))
	f.Add([]byte("rules:\n  - name: a\n    users: [1\n"))
	f.Add([]byte("rules: {}\n---\n"))

	ids := testIDs()
	callers := []Caller{
		caller(uidBilling, uidBilling, uidBilling, gidPayments),
		caller(uidAlice, uidAlice, gidOncall),
		caller(1, 1),
		caller(uidNobody, 65534, 65534),
		{UID: uidDeploy, GID: gidOps, PID: 7, Exe: exeIs("/bin/x")},
		{UID: uidAgent, GID: gidSupport, PID: 8, Exe: func() (string, error) { return "", errors.New("gone") }},
	}
	requests := []Request{
		{},
		{CompanyID: "biz_a", Scopes: []string{"chat:read"}},
		{Credential: "support-oauth", UserID: "user_abc123", Scopes: []string{"chat:write", "dms:x"}},
		{Credential: "other", CompanyID: "biz_AAAAAAAAAAAAAA", UserID: "user_a/c"},
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse("fuzz.yaml", data, ids)
		if err != nil {
			if !errorPosition.MatchString(err.Error()) {
				t.Fatalf("error without file:line: %q", err)
			}
			return
		}
		rules := p.Rules()
		p.NeedsExe()
		for _, c := range callers {
			for _, r := range requests {
				d := p.Check(c, r)
				switch {
				case d.Allowed && (!slices.Contains(rules, d.Rule) || d.Reason != ""):
					t.Fatalf("allowed by unknown rule %q (rules %q), reason %q", d.Rule, rules, d.Reason)
				case !d.Allowed && (d.Rule != "" || d.Reason == ""):
					t.Fatalf("denied with rule %q and reason %q", d.Rule, d.Reason)
				}
			}
		}
	})
}

// TestFuzzCorpusFiles keeps the seed corpus readable by go test.
func TestFuzzCorpusFiles(t *testing.T) {
	files, err := filepath.Glob("testdata/fuzz/FuzzParse/*")
	if err != nil || len(files) == 0 {
		t.Fatalf("no seed corpus in testdata/fuzz/FuzzParse: %v", err)
	}
}
