package e2e

import (
	"crypto/rand"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/tokend/tokend/internal/fleet/redistest"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// sibling is another host beside e: its own socket and state directory,
// the same upstream and API key file.
func (e *env) sibling() *env {
	e.t.Helper()
	dir, err := os.MkdirTemp("", "td")
	must(e.t, err)
	e.t.Cleanup(func() { os.RemoveAll(dir) })
	return &env{t: e.t, fake: e.fake, dir: dir, socket: filepath.Join(dir, "t.sock"), stateDir: filepath.Join(dir, "state"), keyFile: e.keyFile}
}

// fleetFlags are the flags of a host of a fleet on redis with the fleet
// key in e's directory (written once).
func (e *env) fleetFlags(redisURL string) []string {
	e.t.Helper()
	key := filepath.Join(e.dir, "fleet.key")
	if _, err := os.Stat(key); err != nil {
		b := make([]byte, 32)
		rand.Read(b)
		must(e.t, os.WriteFile(key, b, 0o600))
	}
	return append([]string{"--fleet-redis", redisURL, "--fleet-key-file", key}, fast...)
}

// TestFleetOneMintPerKey: two hosts sharing a Redis mint each key once
// between them, however many callers ask each host at once, and both serve
// the same token; a host whose API key differs never adopts it.
func TestFleetOneMintPerKey(t *testing.T) {
	rs := redistest.Start(t)
	a := newEnv(t)
	b := a.sibling()
	flags := a.fleetFlags(rs.URL())
	a.start(flags...)
	b.start(flags...)

	req := &tokendv1.GetTokenRequest{CompanyId: "biz_fleet", ScopedActions: []string{"chat:read"}}
	first, err := a.tokens().GetToken(ctx(t), req)
	must(t, err)
	got, err := b.tokens().GetToken(ctx(t), req)
	must(t, err)
	if got.Token != first.Token || a.fake.CallCount() != 1 {
		t.Fatalf("host b: same token %v, %d upstream calls; want the token host a minted and 1 call", got.Token == first.Token, a.fake.CallCount())
	}

	// 50 callers on each host at once, for a key neither has.
	req2 := &tokendv1.GetTokenRequest{CompanyId: "biz_fleet2"}
	var wg sync.WaitGroup
	tokens := make(chan string, 100)
	for _, h := range []*env{a, b} {
		tc := h.tokens()
		for range 50 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				tok, err := tc.GetToken(ctx(t), req2)
				if err != nil {
					t.Error(err)
					return
				}
				tokens <- tok.Token
			}()
		}
	}
	wg.Wait()
	close(tokens)
	distinct := map[string]bool{}
	for tok := range tokens {
		distinct[tok] = true
	}
	calls := a.fake.CallsFor("biz_fleet2")
	st := b.status(t)
	t.Logf("2 hosts, 100 callers of one cold key: %d upstream call(s), %d distinct token(s); host b: fleet connected %v, adopted %d, lock waits %d",
		calls, len(distinct), st.GetFleet().GetConnected(), st.GetFleet().GetAdopted(), st.GetFleet().GetLockWaits())
	if calls != 1 || len(distinct) != 1 {
		t.Fatalf("%d upstream calls and %d distinct tokens for one key across the fleet; want 1 and 1", calls, len(distinct))
	}

	// A host with another API key shares the Redis but never the tokens.
	c := a.sibling()
	c.keyFile = filepath.Join(c.dir, "key")
	const otherKey = "whop_other_key_0123456789abcdef"
	a.fake.AddKey(otherKey, nil)
	must(t, os.WriteFile(c.keyFile, []byte(otherKey), 0o600))
	c.start(flags...)
	before := a.fake.CallCount()
	if _, err := c.tokens().GetToken(ctx(t), req); err != nil {
		t.Fatal(err)
	}
	if n := a.fake.CallCount() - before; n != 1 || a.fake.Calls()[before].Key != otherKey {
		t.Fatalf("host c (another key): %d upstream calls, want its own mint", n)
	}
}
