package cache

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/clock"
)

// BenchmarkFlush10k persists 10,000 queued records in one Flush into a
// fresh file, the worst case after a burst of refreshes.
func BenchmarkFlush10k(b *testing.B) {
	const n = 10000
	recs := make([]Record, n)
	encs := make([]string, n)
	for i := range recs {
		k := NewKey("cred", fmt.Sprintf("biz_%d", i), fmt.Sprintf("user_%d", i), []string{"read", "write"})
		recs[i] = record(k, "tok-"+k.UserID, t0.Add(time.Hour))
		encs[i] = enc(k)
	}
	dir := b.TempDir()
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		path := filepath.Join(dir, fmt.Sprintf("cache-%d.db", i))
		s, _, err := Open(Config{Path: path, Clock: clock.NewFake(t0)}) // the flusher never fires
		if err != nil {
			b.Fatal(err)
		}
		for j := range recs {
			s.Put(encs[j], recs[j])
		}
		b.StartTimer()
		if err := s.Flush(); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if pending, _ := s.WriteStatus(); pending != 0 {
			b.Fatalf("%d records still pending", pending)
		}
		if err := s.Close(); err != nil {
			b.Fatal(err)
		}
		os.Remove(path)
		b.StartTimer()
	}
	b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "records/s")
}
