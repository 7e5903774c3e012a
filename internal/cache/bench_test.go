package cache

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/clock"
)

// BenchmarkGetHit is the hit path: a warm entry looked up by a key the
// caller has already encoded.
func BenchmarkGetHit(b *testing.B) {
	clk := clock.NewFake(t0)
	c, _, _ := openCache(b, Config{Path: filepath.Join(b.TempDir(), "cache.db"), Clock: clk})
	for i := range 1000 {
		e, _ := c.Ensure(NewKey("cred", fmt.Sprintf("biz_%d", i), "", []string{"read"}))
		c.SetToken(e, token("tok", t0.Add(time.Hour)), nil)
	}
	enc := NewKey("cred", "biz_500", "", []string{"read"}).Encode()
	b.ReportAllocs()
	for b.Loop() {
		if c.Get(enc) == nil {
			b.Fatal("miss")
		}
	}
}

// BenchmarkFlush10k persists 10,000 dirty records in one Flush into a fresh
// file, the worst case after a burst of refreshes.
func BenchmarkFlush10k(b *testing.B) {
	const n = 10000
	keys := make([]Key, n)
	for i := range keys {
		keys[i] = NewKey("cred", fmt.Sprintf("biz_%d", i), fmt.Sprintf("user_%d", i), []string{"read", "write"})
	}
	dir := b.TempDir()
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		path := filepath.Join(dir, fmt.Sprintf("cache-%d.db", i))
		c, _, err := Open(Config{Path: path, Clock: clock.NewFake(t0)})
		if err != nil {
			b.Fatal(err)
		}
		for _, k := range keys {
			e, _ := c.Ensure(k)
			c.SetToken(e, token("tok-"+k.UserID, t0.Add(time.Hour)), nil)
		}
		b.StartTimer()
		if err := c.Flush(); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if pending, _ := c.WriteStatus(); pending != 0 {
			b.Fatalf("%d records still pending", pending)
		}
		if err := c.Close(); err != nil {
			b.Fatal(err)
		}
		os.Remove(path)
		b.StartTimer()
	}
	b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "records/s")
}
