package audit

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/tokend/tokend/internal/peercred"
)

type lines struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lines) decode(t *testing.T) []map[string]any {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(l.b.String()), "\n") {
		if line == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatal(err)
		}
		out = append(out, m)
	}
	return out
}

func TestHandoutsAccountedAndBounded(t *testing.T) {
	var out lines
	tr := New(Config{Logger: slog.New(slog.NewJSONHandler(&out, nil))})
	c := tr.Open(&peercred.Info{UID: 1000, GID: 1000, PID: 1})
	s := Subject{KeyID: "abc", CompanyID: "biz_1", Scopes: []string{"chat:read"}}
	const token = "header.payload.signature"
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 1000 {
				c.HandedOut(s, token, i < 2 && j == 0) // two callers shared the mint
			}
		}()
	}
	wg.Wait()
	tr.Minted(s, token, "miss")
	tr.Adopted(s, token, "refresh") // as another host of the fleet logs it
	c.Close()

	total, n := 0, 0
	fps := map[string]any{}
	for _, m := range out.decode(t) {
		n++
		switch m["msg"] {
		case "mint", "adopt":
			fps[m["msg"].(string)] = m["token_fp"]
		case "handout":
			total++
		case "hits":
			total += int(m["count"].(float64))
		}
		for _, v := range m {
			if str, ok := v.(string); ok && strings.Contains(str, "payload") {
				t.Fatalf("audit line holds the token: %v", m)
			}
		}
	}
	if total != 8000 {
		t.Fatalf("audit accounts for %d hand-outs, want 8000", total)
	}
	if n > 6 {
		t.Fatalf("%d lines for 8000 hand-outs on one connection", n)
	}
	if fps["mint"] == nil || fps["adopt"] != fps["mint"] {
		t.Fatalf("mint and adopt lines' token fingerprints: %v; want the same one, so a token is traced across hosts", fps)
	}
}
