package fleet

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// TestBreaker drives the breaker on virtual time: it opens on the third
// failure in a row (not on three scattered ones), logs once, probes at
// 100ms doubling to 5s, and closes on the first good probe, logging once.
func TestBreaker(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var logBuf bytes.Buffer
		log := slog.New(slog.NewTextHandler(&logBuf, nil))
		var mu sync.Mutex
		var probes []time.Time
		healthy := false
		probe := func(ctx context.Context) error {
			mu.Lock()
			defer mu.Unlock()
			probes = append(probes, time.Now())
			if healthy {
				return nil
			}
			return errors.New("dial unix /run/redis.sock: connection refused")
		}
		b := newBreaker(3, 100*time.Millisecond, 5*time.Second, 50*time.Millisecond, probe, log)
		defer b.stop()
		down := errors.New("i/o timeout")

		b.failure(down)
		b.failure(down)
		b.success()
		b.failure(down)
		b.failure(down)
		if !b.allow() {
			t.Fatal("opened on failures that were not consecutive")
		}
		opened := time.Now()
		for range 10 {
			b.failure(down) // calls in flight when it opens
		}
		if b.allow() {
			t.Fatal("still closed after three failures in a row")
		}
		if c, _, reason, trips := b.state(); c || trips != 1 || reason != down.Error() {
			t.Fatalf("state: connected %v trips %d reason %q", c, trips, reason)
		}

		time.Sleep(20 * time.Second)
		synctest.Wait()
		mu.Lock()
		got := append([]time.Time(nil), probes...)
		healthy = true
		mu.Unlock()
		want := []time.Duration{100, 200, 400, 800, 1600, 3200, 5000, 5000}
		if len(got) < len(want) {
			t.Fatalf("%d probes in 20s, want at least %d", len(got), len(want))
		}
		prev := opened
		for i, w := range want {
			gap, w := got[i].Sub(prev), w*time.Millisecond
			if gap < w*8/10 || gap > w*12/10 {
				t.Errorf("probe %d came %v after the last, want %v ±20%%", i+1, gap, w)
			}
			prev = got[i]
		}
		if _, _, reason, _ := b.state(); !strings.Contains(reason, "connection refused") {
			t.Fatalf("reason %q, want the last probe's error", reason)
		}
		time.Sleep(6 * time.Second)
		synctest.Wait()
		if !b.allow() {
			t.Fatal("still open 6s after Redis answered")
		}
		if c, _, reason, trips := b.state(); !c || reason != "" || trips != 1 {
			t.Fatalf("after rejoin: connected %v reason %q trips %d", c, reason, trips)
		}
		text := logBuf.String()
		if n := strings.Count(text, "level=WARN"); n != 1 {
			t.Fatalf("%d warnings, want 1:\n%s", n, text)
		}
		if n := strings.Count(text, "level=INFO"); n != 1 || !strings.Contains(text, "down_for=") {
			t.Fatalf("want one rejoin line with the downtime:\n%s", text)
		}
		t.Logf("probe gaps: %v", gaps(opened, got[:len(want)]))
	})
}

func gaps(start time.Time, at []time.Time) []time.Duration {
	out := make([]time.Duration, len(at))
	for i, t := range at {
		out[i] = t.Sub(start).Round(time.Millisecond)
		start = t
	}
	return out
}
