package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

const (
	keyB       = "whop_second_key_abcdef0123456789"
	keyB2      = "whop_second_key_rotated_98765432"
	oauthAlice = "oauth_alice_token_0123456789abcdef"
)

// credEnv is an env whose tokend holds three credentials from a config file.
func credEnv(t *testing.T) (*env, *daemon) {
	e := newEnv(t)
	e.fake.AddKey(keyB, []string{"chat:read"})
	e.fake.AddKey(keyB2, []string{"chat:read"})
	e.fake.AddOAuthToken(oauthAlice, "user_alice")
	write := func(name, secret string) string {
		p := filepath.Join(e.dir, name)
		must(t, os.WriteFile(p, []byte(secret+"\n"), 0o600))
		return p
	}
	cfg := filepath.Join(e.dir, "tokend.yaml")
	must(t, os.WriteFile(cfg, []byte(fmt.Sprintf(`credentials:
  - name: default
    file: %s
  - name: second
    kind: api_key
    file: %s
  - name: alice
    kind: oauth_user
    file: %s
`, write("a.key", testKey), write("b.key", keyB), write("alice.oauth", oauthAlice))), 0o600))
	d := e.startArgs("--socket", e.socket, "--state-dir", e.stateDir, "--whop-url", e.fake.URL(), "--config", cfg, "--log-level", "debug")
	e.waitReady(d)
	return e, d
}

// TestCredentialsSeparate: the same subject and scopes through two
// credentials are two tokens, one upstream call each, with the right key.
func TestCredentialsSeparate(t *testing.T) {
	e, _ := credEnv(t)
	tc := e.tokens()
	a, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_c", ScopedActions: []string{"chat:read"}})
	must(t, err)
	b, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_c", ScopedActions: []string{"chat:read"}, Credential: "second"})
	must(t, err)
	if a.Token == b.Token || a.KeyId == b.KeyId {
		t.Fatal("two credentials shared a token or a cache key")
	}
	calls := e.fake.Calls()
	if len(calls) != 2 || calls[0].Key != testKey || calls[1].Key != keyB {
		t.Fatalf("calls = %d; want one with each key", len(calls))
	}
	if _, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_c", Credential: "nope"}); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "alice, default, second") {
		t.Fatalf("unknown credential: %v, want InvalidArgument listing the names", err)
	}
	out := e.mustCtl("status")
	for _, name := range []string{"default", "second", "alice"} {
		if !strings.Contains(out, name) {
			t.Fatalf("status does not show credential %s:\n%s", name, out)
		}
	}
}

// TestCredentials429PausesOnlyItsOwn: a 429 on one credential pauses its
// calls only; the other keeps minting.
func TestCredentials429PausesOnlyItsOwn(t *testing.T) {
	e, _ := credEnv(t)
	tc := e.tokens()
	e.fake.Enqueue(whoptestFault429(2))
	short, cancel := context.WithTimeout(context.Background(), time.Second) // shorter than the pause: no in-call retry
	defer cancel()
	if _, err := tc.GetToken(short, &tokendv1.GetTokenRequest{CompanyId: "biz_p1"}); status.Code(err) != codes.Unavailable {
		t.Fatalf("429: %v", err)
	}
	start := time.Now()
	if _, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_p2", ScopedActions: []string{"chat:read"}, Credential: "second"}); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("the other credential waited %v behind a 429 that was not its own", d)
	}
	if _, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_p3"}); err != nil {
		t.Fatal(err)
	}
	calls := e.fake.Calls()
	if gap := calls[2].At.Sub(calls[0].At); gap < 2*time.Second || calls[2].Key != testKey {
		t.Fatalf("the paused credential called again after %v, want at least 2s", gap)
	}
	if gap := calls[1].At.Sub(calls[0].At); gap > time.Second || calls[1].Key != keyB {
		t.Fatalf("the other credential's call came %v after the 429", gap)
	}
}

// TestCredentialsOAuthUser: an oauth_user credential mints with no ids;
// naming ids with it is InvalidArgument.
func TestCredentialsOAuthUser(t *testing.T) {
	e, _ := credEnv(t)
	tc := e.tokens()
	tok, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{Credential: "alice", ScopedActions: []string{"chat:read"}})
	must(t, err)
	claims, err := e.fake.Verify(tok.Token)
	must(t, err)
	if claims.Sub != "user_alice" {
		t.Fatalf("oauth token minted for %q, want user_alice", claims.Sub)
	}
	c := e.fake.Calls()[0]
	if c.CompanyID != "" || c.UserID != "" || c.Key != oauthAlice {
		t.Fatalf("oauth call carried ids %q/%q", c.CompanyID, c.UserID)
	}
	_, err = tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{Credential: "alice", UserId: "user_bob"})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "OAuth") {
		t.Fatalf("ids with an oauth credential: %v, want InvalidArgument saying why", err)
	}
}

// TestCredentialsRotateOne: rotating one credential's file and reloading
// makes its next mint use the new secret; the other's cached tokens are
// still served with no upstream call.
func TestCredentialsRotateOne(t *testing.T) {
	e, d := credEnv(t)
	tc := e.tokens()
	a, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_r"})
	must(t, err)
	b, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_r", ScopedActions: []string{"chat:read"}, Credential: "second"})
	must(t, err)
	must(t, os.WriteFile(filepath.Join(e.dir, "b.key"), []byte(keyB2+"\n"), 0o600))
	d.Signal(syscall.SIGHUP)
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(d.Out.String(), "reload: credential rotated") {
		if time.Now().After(deadline) {
			t.Fatalf("no rotation logged:\n%s", d.Out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.fake.ResetCounters()
	a2, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_r"})
	must(t, err)
	if a2.Token != a.Token || e.fake.CallCount() != 0 {
		t.Fatal("the untouched credential's token was not served from the cache")
	}
	b2, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_r", ScopedActions: []string{"chat:read"}, Credential: "second"})
	must(t, err)
	calls := e.fake.Calls()
	if b2.Token == b.Token || len(calls) != 1 || calls[0].Key != keyB2 {
		t.Fatalf("after rotation: same token=%v, %d calls; want one call with the new secret", b2.Token == b.Token, len(calls))
	}
	if strings.Contains(d.Out.String(), keyB2) || strings.Contains(d.Out.String(), keyB) {
		t.Fatal("a secret appears in tokend's log")
	}
}
