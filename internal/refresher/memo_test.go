package refresher

import (
	"sync"
	"testing"
)

// TestTokenMemoFirstWins: concurrent first callers of SetMemo all get the
// one value kept, and a later SetMemo does not replace it.
func TestTokenMemoFirstWins(t *testing.T) {
	tok := &Token{Value: "a.b.c"}
	if tok.Memo() != nil {
		t.Fatal("a new token has a memo")
	}
	const n = 32
	got := make([]any, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i] = tok.SetMemo(new(int))
		}()
	}
	wg.Wait()
	for i := range got {
		if got[i] != got[0] {
			t.Fatalf("caller %d kept %p, caller 0 %p: want one shared memo", i, got[i], got[0])
		}
	}
	if tok.SetMemo(new(int)) != got[0] || tok.Memo() != got[0] {
		t.Fatal("a later SetMemo replaced the memo")
	}
}
