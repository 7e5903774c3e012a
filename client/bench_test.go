package client_test

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/tokend/tokend/client"
)

// warmSource returns a source holding a token tokend never sent, on a
// client of a socket nobody listens on: Token is answered from memory.
func warmSource(tb testing.TB) *client.TokenSource {
	tb.Helper()
	c, err := client.New(filepath.Join(tb.TempDir(), "none.sock"))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	ts := c.NewTokenSource(client.Request{CompanyID: "biz_warm"})
	client.SetToken(ts, &client.Token{Value: "warm", ExpiresAt: time.Now().Add(time.Hour), KeyID: "warm"})
	if tok, err := ts.Token(); err != nil || tok.AccessToken != "warm" {
		tb.Fatalf("warm source: %v, %v", tok, err)
	}
	return ts
}

func BenchmarkTokenSourceWarm(b *testing.B) {
	ts := warmSource(b)
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := ts.Token(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := ts.Token(); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// TestTokenSourceWarmAllocs: a warm Token allocates only the *oauth2.Token
// it returns. The race detector adds allocations, so it runs without.
func TestTokenSourceWarmAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("allocations are counted without -race")
	}
	ts := warmSource(t)
	if n := testing.AllocsPerRun(1000, func() { ts.Token() }); n > 1 {
		t.Errorf("warm Token: %v allocations, want at most 1", n)
	}
}
