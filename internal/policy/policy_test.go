package policy

import (
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
)

const matrixPolicy = `rules:
  - name: by-uid
    users: [1001]
    subjects:
      companies: [biz_billing]
    scopes: ["chat:read"]

  - name: by-name
    users: [alice]
    credentials: [default, other]
    subjects:
      companies: ["biz_a*"]
      users: ["user_a?c"]
    scopes: ["chat:read", "dms:*"]

  - name: by-primary-group
    groups: [ops]
    credentials: ["*"]
    subjects:
      users: ["user_*"]
    all_scopes: true

  - name: by-supplementary-group
    groups: [payments]
    subjects:
      companies: [biz_pay]
    scopes: ["payments:write"]

  - name: oauth
    groups: ["2001"]
    credentials: [support-oauth]
    scopes: ["chat:*"]

  - name: pinned
    users: [deploy]
    exe: /usr/local/bin/deploy
    subjects:
      companies: [biz_deploy]
    scopes: ["deploy:*"]
`

func mustParse(t testing.TB, text string) *Policy {
	t.Helper()
	p, err := Parse("test.yaml", []byte(text), testIDs())
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return p
}

func TestCheck(t *testing.T) {
	p := mustParse(t, matrixPolicy)
	billing := caller(uidBilling, uidBilling, uidBilling, gidPayments)
	alice := caller(uidAlice, uidAlice, uidAlice)
	ops := caller(uidOps, gidOps) // ops only as primary group
	agent := caller(uidAgent, uidAgent, gidSupport)
	deploy := func(exe func() (string, error)) Caller {
		c := caller(uidDeploy, uidDeploy)
		c.Exe = exe
		return c
	}

	tests := []struct {
		name   string
		caller Caller
		req    Request
		rule   string // the allowing rule; "" means denied
		reason string // for a denial: the exact reason, or a substring when it starts with "~"
	}{
		// Who: uid, user name, primary and supplementary groups.
		{name: "by uid", caller: billing,
			req: Request{CompanyID: "biz_billing", Scopes: []string{"chat:read"}}, rule: "by-uid"},
		{name: "by user name", caller: alice,
			req: Request{CompanyID: "biz_abc", Scopes: []string{"chat:read"}}, rule: "by-name"},
		{name: "by primary group", caller: ops,
			req: Request{UserID: "user_x", Scopes: []string{"any:thing"}}, rule: "by-primary-group"},
		{name: "by supplementary group", caller: billing,
			req: Request{CompanyID: "biz_pay", Scopes: []string{"payments:write"}}, rule: "by-supplementary-group"},
		{name: "by numeric group written as a string", caller: agent,
			req: Request{Credential: "support-oauth", Scopes: []string{"chat:write"}}, rule: "oauth"},
		{name: "no applicable rule", caller: caller(uidNobody, 65534, 65534),
			req:    Request{CompanyID: "biz_billing", Scopes: []string{"chat:read"}},
			reason: "no rule applies to uid 65534 (nobody) or its groups 65534"},
		{name: "no applicable rule, unnamed uid and several groups", caller: caller(4000, 4000, 4001, 4000),
			req:    Request{CompanyID: "biz_billing", Scopes: []string{"chat:read"}},
			reason: "no rule applies to uid 4000 or its groups 4000, 4001"},
		{name: "root is not special", caller: caller(uidRoot, 0, 0),
			req:    Request{CompanyID: "biz_billing", Scopes: []string{"chat:read"}},
			reason: "no rule applies to uid 0 (root) or its groups 0"},

		// Subjects: exact, glob, both ids required to match.
		{name: "exact company mismatch", caller: billing,
			req:    Request{CompanyID: "biz_billing2", Scopes: []string{"chat:read"}},
			reason: `uid 1001 (billing) may not request company_id "biz_billing2": rule "by-uid" allows companies biz_billing`},
		{name: "glob company mismatch", caller: alice,
			req:    Request{CompanyID: "biz_xyz", Scopes: []string{"chat:read"}},
			reason: `uid 1002 (alice) may not request company_id "biz_xyz": rule "by-name" allows companies biz_a*`},
		{name: "user glob ? matches one character", caller: alice,
			req: Request{UserID: "user_abc", Scopes: []string{"chat:read"}}, rule: "by-name"},
		{name: "user glob ? does not match two", caller: alice,
			req:    Request{UserID: "user_abbc", Scopes: []string{"chat:read"}},
			reason: `uid 1002 (alice) may not request user_id "user_abbc": rule "by-name" allows users user_a?c`},
		{name: "company and user both match", caller: alice,
			req: Request{CompanyID: "biz_a1", UserID: "user_abc", Scopes: []string{"chat:read"}}, rule: "by-name"},
		{name: "company matches, user does not", caller: alice,
			req:    Request{CompanyID: "biz_a1", UserID: "user_zzz", Scopes: []string{"chat:read"}},
			reason: `~may not request user_id "user_zzz"`},
		{name: "user matches, company does not", caller: alice,
			req:    Request{CompanyID: "biz_b1", UserID: "user_abc", Scopes: []string{"chat:read"}},
			reason: `~may not request company_id "biz_b1"`},
		{name: "user named where the rule allows none", caller: billing,
			req:    Request{CompanyID: "biz_billing", UserID: "user_1", Scopes: []string{"chat:read"}},
			reason: `uid 1001 (billing) may not request user_id "user_1": rule "by-uid" allows no user_id`},
		{name: "company named where the rule allows none", caller: agent,
			req:    Request{Credential: "support-oauth", CompanyID: "biz_x", Scopes: []string{"chat:read"}},
			reason: `uid 1600 (agent) may not request company_id "biz_x": rule "oauth" allows no company_id`},
		{name: "glob * does not cross /", caller: ops,
			req:    Request{UserID: "user_a/b", Scopes: []string{"chat:read"}},
			reason: `~may not request user_id "user_a/b"`},

		// Scopes.
		{name: "scopes subset", caller: alice,
			req: Request{CompanyID: "biz_a", Scopes: []string{"dms:send", "chat:read", "dms:read"}}, rule: "by-name"},
		{name: "scope outside the rule", caller: billing,
			req:    Request{CompanyID: "biz_billing", Scopes: []string{"chat:read", "payments:write"}},
			reason: `uid 1001 (billing) may not request scope "payments:write": rule "by-uid" allows chat:read`},
		{name: "scope outside, glob list", caller: alice,
			req:    Request{CompanyID: "biz_a", Scopes: []string{"chat:write"}},
			reason: `uid 1002 (alice) may not request scope "chat:write": rule "by-name" allows chat:read, dms:*`},
		{name: "empty scopes need all_scopes", caller: alice,
			req:    Request{CompanyID: "biz_a"},
			reason: `uid 1002 (alice) may not request all scopes (empty scoped_actions): rule "by-name" allows only chat:read, dms:* (all_scopes is not set)`},
		{name: "all_scopes allows empty scopes", caller: ops,
			req: Request{UserID: "user_1"}, rule: "by-primary-group"},

		// Credentials.
		{name: "absent credentials cover default, named", caller: billing,
			req: Request{Credential: "default", CompanyID: "biz_billing", Scopes: []string{"chat:read"}}, rule: "by-uid"},
		{name: "absent credentials cover default, empty", caller: billing,
			req: Request{CompanyID: "biz_billing", Scopes: []string{"chat:read"}}, rule: "by-uid"},
		{name: "absent credentials cover only default", caller: billing,
			req:    Request{Credential: "other", CompanyID: "biz_billing", Scopes: []string{"chat:read"}},
			reason: `uid 1001 (billing) may not use credential "other": rule "by-uid" allows credentials default`},
		{name: "explicit credential", caller: alice,
			req: Request{Credential: "other", CompanyID: "biz_a", Scopes: []string{"chat:read"}}, rule: "by-name"},
		{name: "explicit credentials exclude others", caller: alice,
			req:    Request{Credential: "third", CompanyID: "biz_a", Scopes: []string{"chat:read"}},
			reason: `uid 1002 (alice) may not use credential "third": rule "by-name" allows credentials default, other`},
		{name: "star covers every credential", caller: ops,
			req: Request{Credential: "anything", UserID: "user_1"}, rule: "by-primary-group"},
		{name: "explicit credentials exclude default", caller: agent,
			req:    Request{Scopes: []string{"chat:read"}},
			reason: `uid 1600 (agent) may not use credential "default": rule "oauth" allows credentials support-oauth`},

		// Executable.
		{name: "exe matches", caller: deploy(exeIs("/usr/local/bin/deploy")),
			req: Request{CompanyID: "biz_deploy", Scopes: []string{"deploy:run"}}, rule: "pinned"},
		{name: "exe mismatch", caller: deploy(exeIs("/usr/bin/curl")),
			req:    Request{CompanyID: "biz_deploy", Scopes: []string{"deploy:run"}},
			reason: `uid 1004 (deploy) may not request this from executable "/usr/bin/curl" (pid 4242): rule "pinned" requires exe /usr/local/bin/deploy`},
		{name: "exe replaced on disk", caller: deploy(exeIs("/usr/local/bin/deploy (deleted)")),
			req:    Request{CompanyID: "biz_deploy", Scopes: []string{"deploy:run"}},
			reason: `~executable "/usr/local/bin/deploy (deleted)"`},
		{name: "exe error (pid reused)", caller: deploy(func() (string, error) { return "", errors.New("pid 4242 was reused") }),
			req:    Request{CompanyID: "biz_deploy", Scopes: []string{"deploy:run"}},
			reason: `uid 1004 (deploy): the executable of pid 4242 could not be verified (pid 4242 was reused): rule "pinned" requires exe /usr/local/bin/deploy`},
		{name: "exe unknown", caller: deploy(nil),
			req:    Request{CompanyID: "biz_deploy", Scopes: []string{"deploy:run"}},
			reason: `~could not be verified (executable not known): rule "pinned"`},

		// The closest rule is named.
		{name: "closest of two applicable rules", caller: billing,
			req:    Request{CompanyID: "biz_pay", Scopes: []string{"chat:read"}},
			reason: `uid 1001 (billing) may not request scope "chat:read": rule "by-supplementary-group" allows payments:write`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := p.Check(tt.caller, tt.req)
			if tt.rule != "" {
				if !d.Allowed || d.Rule != tt.rule || d.Reason != "" {
					t.Fatalf("Check = %+v, want allowed by %q", d, tt.rule)
				}
				return
			}
			if d.Allowed || d.Rule != "" {
				t.Fatalf("Check = %+v, want denied", d)
			}
			if want, ok := strings.CutPrefix(tt.reason, "~"); ok {
				if !strings.Contains(d.Reason, want) {
					t.Fatalf("reason %q does not contain %q", d.Reason, want)
				}
			} else if d.Reason != tt.reason {
				t.Fatalf("reason\n got %s\nwant %s", d.Reason, tt.reason)
			}
		})
	}
}

func TestCheckCallsExeOnlyWhenNeeded(t *testing.T) {
	p := mustParse(t, matrixPolicy)
	calls := 0
	c := caller(uidDeploy, uidDeploy)
	c.Exe = func() (string, error) { calls++; return "/usr/local/bin/deploy", nil }

	p.Check(c, Request{CompanyID: "biz_other", Scopes: []string{"deploy:run"}})
	if calls != 0 {
		t.Errorf("Exe called %d times for a request the rule denies anyway; want 0", calls)
	}
	c.Exe = func() (string, error) { calls++; return "/bin/sh", nil }
	if d := p.Check(c, Request{CompanyID: "biz_deploy", Scopes: []string{"deploy:run"}}); d.Allowed {
		t.Fatalf("Check = %+v, want denied", d)
	}
	if calls != 1 {
		t.Errorf("Exe called %d times for one denied Check; want 1", calls)
	}
	if !p.NeedsExe() {
		t.Error("NeedsExe = false for a policy with an exe rule")
	}
	if mustParse(t, "rules: [{name: a, users: [1], all_scopes: true}]").NeedsExe() {
		t.Error("NeedsExe = true for a policy without exe rules")
	}
}

func TestEmptyRulesDenyEverything(t *testing.T) {
	data, err := os.ReadFile("testdata/deny-all.yaml")
	if err != nil {
		t.Fatal(err)
	}
	p, err := Parse("deny-all.yaml", data, testIDs())
	if err != nil {
		t.Fatal(err)
	}
	d := p.Check(caller(uidRoot, 0), Request{CompanyID: "biz_x"})
	want := "no rule applies to uid 0 (root) or its groups 0 (the policy has no rules)"
	if d.Allowed || d.Reason != want {
		t.Fatalf("Check = %+v, want denied with %q", d, want)
	}
	if len(p.Rules()) != 0 {
		t.Fatalf("Rules = %q, want none", p.Rules())
	}
	var nilPolicy *Policy
	if d := nilPolicy.Check(caller(uidRoot, 0), Request{}); d.Allowed {
		t.Fatal("a nil policy allowed a request")
	}
}

// TestRealisticPolicy checks the sample in testdata, which the package
// documentation describes.
func TestRealisticPolicy(t *testing.T) {
	data, err := os.ReadFile("testdata/policy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	p, err := Parse("testdata/policy.yaml", data, testIDs())
	if err != nil {
		t.Fatal(err)
	}
	if got, want := p.Rules(), []string{"billing-service", "support-oauth", "analytics", "oncall"}; !slices.Equal(got, want) {
		t.Fatalf("Rules = %q, want %q", got, want)
	}
	if !p.NeedsExe() {
		t.Fatal("NeedsExe = false")
	}
	billing := caller(uidBilling, uidBilling, uidBilling, gidPayments)
	billing.Exe = exeIs("/usr/local/bin/billing")
	analytics := caller(uidAnalytics, uidAnalytics)
	oncall := caller(uidAlice, uidAlice, gidOncall)

	tests := []struct {
		name   string
		caller Caller
		req    Request
		rule   string
	}{
		{"billing reads chat", billing, Request{CompanyID: "biz_123", UserID: "user_abc123", Scopes: []string{"chat:read", "dms:send"}}, "billing-service"},
		{"billing may not write payments", billing, Request{CompanyID: "biz_123", Scopes: []string{"payments:write"}}, ""},
		{"billing from another binary", Caller{UID: uidBilling, GID: uidBilling, Exe: exeIs("/usr/bin/python3")}, Request{CompanyID: "biz_123", Scopes: []string{"chat:read"}}, ""},
		{"payments member through its group", Caller{UID: 5000, GID: 5000, Groups: []uint32{gidPayments}, Exe: exeIs("/usr/local/bin/billing")}, Request{CompanyID: "biz_1", Scopes: []string{"chat:read"}}, "billing-service"},
		{"support agent with its oauth credential", caller(uidAgent, uidAgent, gidSupport), Request{Credential: "support-oauth", Scopes: []string{"chat:write"}}, "support-oauth"},
		{"support agent with the company key", caller(uidAgent, uidAgent, gidSupport), Request{CompanyID: "biz_1", Scopes: []string{"chat:write"}}, ""},
		{"analytics, aliased scopes", analytics, Request{Credential: "analytics-app", CompanyID: "biz_AAAAAAAAAAAAAA", Scopes: []string{"chat:write"}}, "analytics"},
		{"analytics, unlisted company", analytics, Request{CompanyID: "biz_CCCCCCCCCCCCCC", Scopes: []string{"chat:read"}}, ""},
		{"on call mints anything", oncall, Request{Credential: "support-oauth", CompanyID: "biz_x", UserID: "user_y"}, "oncall"},
		{"nobody", caller(uidNobody, 65534), Request{CompanyID: "biz_1", Scopes: []string{"chat:read"}}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := p.Check(tt.caller, tt.req)
			if d.Allowed != (tt.rule != "") || d.Rule != tt.rule {
				t.Fatalf("Check = %+v, want rule %q", d, tt.rule)
			}
			if !d.Allowed && d.Reason == "" {
				t.Fatal("denied without a reason")
			}
		})
	}
}

func TestCheckAllowedDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	p := mustParse(t, matrixPolicy)
	c := caller(uidDeploy, uidDeploy)
	c.Exe = exeIs("/usr/local/bin/deploy")
	r := Request{CompanyID: "biz_deploy", Scopes: []string{"deploy:run", "deploy:read"}}
	if n := testing.AllocsPerRun(100, func() {
		if !p.Check(c, r).Allowed {
			t.Fatal("denied")
		}
	}); n != 0 {
		t.Fatalf("Check allocates %v times per allowed call; want 0", n)
	}
}

func BenchmarkCheckAllowed(b *testing.B) {
	p := mustParse(b, matrixPolicy)
	c := caller(uidAlice, uidAlice, uidAlice, gidOncall)
	r := Request{Credential: "other", CompanyID: "biz_abc", UserID: "user_abc", Scopes: []string{"chat:read", "dms:send"}}
	b.ReportAllocs()
	for b.Loop() {
		if !p.Check(c, r).Allowed {
			b.Fatal("denied")
		}
	}
}
