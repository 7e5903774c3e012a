package cache

import (
	"fmt"
	"sync"
	"testing"
)

// TestTokenReplyFirstWins: concurrent first callers of SetReply all get
// the one reply that was kept.
func TestTokenReplyFirstWins(t *testing.T) {
	tok := &Token{Value: "t"}
	if tok.Reply() != nil {
		t.Fatal("a new token has a reply")
	}
	const n = 8
	got := make([]*string, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			s := fmt.Sprint("reply ", i)
			got[i] = tok.SetReply(&s).(*string)
		})
	}
	wg.Wait()
	for i := range n {
		if got[i] != got[0] {
			t.Fatalf("caller %d kept %q, caller 0 %q: want one shared reply", i, *got[i], *got[0])
		}
	}
	if tok.Reply().(*string) != got[0] {
		t.Fatal("Reply differs from what SetReply returned")
	}
}
