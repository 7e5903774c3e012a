package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain lets the test binary serve as the floor server, which the
// benchmark starts by re-executing its own binary.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == floorCommand {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
		code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	os.Exit(m.Run())
}

// TestQuickRun runs the whole pipeline with --quick and checks the summary's
// structure and the invariants that do not depend on the machine's speed;
// the performance targets themselves are not asserted.
func TestQuickRun(t *testing.T) {
	if testing.Short() {
		t.Skip("runs tokend and a floor server for about 20s")
	}
	jsonPath := filepath.Join(t.TempDir(), "summary.json")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	if code := run(ctx, []string{"--quick", "--json", jsonPath}, &stdout, &stderr); code != 0 {
		t.Fatalf("tokenbench --quick exited %d\nstderr:\n%s\nstdout:\n%s", code, stderr.String(), stdout.String())
	}
	t.Logf("output:\n%s", stdout.String())

	raw, err := os.ReadFile(jsonPath)
	if err != nil {
		t.Fatal(err)
	}
	var sections map[string]json.RawMessage
	if err := json.Unmarshal(raw, &sections); err != nil {
		t.Fatalf("summary is not JSON: %v", err)
	}
	for _, name := range []string{"date", "machine", "go_version", "commit", "hits", "misses", "scale", "writes", "targets"} {
		if _, ok := sections[name]; !ok {
			t.Errorf("summary has no %q section", name)
		}
	}
	var r Report
	if err := json.Unmarshal(raw, &r); err != nil {
		t.Fatalf("summary does not decode into Report: %v", err)
	}
	if !r.Quick || r.Machine.Cores < 1 || r.Date == "" {
		t.Errorf("header: quick %v, cores %d, date %q", r.Quick, r.Machine.Cores, r.Date)
	}

	if len(r.Hits.Points) != len(hitPoints) {
		t.Errorf("%d hit points, want %d", len(r.Hits.Points), len(hitPoints))
	}
	for _, p := range r.Hits.Points {
		for name, res := range map[string]loadResult{"tokend": p.Tokend, "floor": p.Floor} {
			if res.Requests == 0 || res.RPS <= 0 || res.P50us <= 0 || res.P99us < res.P50us {
				t.Errorf("hits c=%d conns=%d %s: %+v", p.Concurrency, p.Connections, name, res)
			}
			if res.Errors != 0 {
				t.Errorf("hits c=%d conns=%d %s: %d errors, first: %s", p.Concurrency, p.Connections, name, res.Errors, res.FirstError)
			}
		}
	}
	if r.Hits.UpstreamCalls != 0 {
		t.Errorf("%d upstream calls during the hit points; every call should be a hit", r.Hits.UpstreamCalls)
	}
	if r.Hits.AnswerBytes == 0 {
		t.Error("answer size not recorded")
	}

	one := r.Misses.OneKey
	if one.UpstreamCalls != 1 {
		t.Errorf("one cold key, %d callers: %d upstream calls, want exactly 1", one.Callers, one.UpstreamCalls)
	}
	if one.Result.Errors != 0 {
		t.Errorf("one cold key: %d errors %v, first: %s", one.Result.Errors, one.Result.ErrorCodes, one.Result.FirstError)
	}
	d := r.Misses.DistinctKeys
	if d.Result.Errors != 0 || d.UpstreamCalls != d.Keys || d.Keys != 1000 {
		t.Errorf("distinct cold keys: %d keys, %d upstream calls, %d errors %v, first: %s", d.Keys, d.UpstreamCalls, d.Result.Errors, d.Result.ErrorCodes, d.Result.FirstError)
	}
	if len(d.TokendFlags) == 0 || d.LimiterBoundSeconds <= 0 {
		t.Errorf("distinct cold keys: limiter settings not recorded: %v, bound %v", d.TokendFlags, d.LimiterBoundSeconds)
	}

	s := r.Scale
	if s.Entries != 10_000 || s.Heap.Entries != 10_000 {
		t.Errorf("scale: %d entries, %d loaded in-process; want 10000", s.Entries, s.Heap.Entries)
	}
	if s.ReadyMs <= 0 || s.RSSKiB <= 0 || s.Heap.Cache <= 0 || s.Heap.Daemon < s.Heap.Cache || s.Heap.TokenBytes <= 0 || s.IdleSeconds != 3 {
		t.Errorf("scale: %+v", s)
	}
	if s.UpstreamCalls != 0 {
		t.Errorf("scale: %d upstream calls; pre-loaded entries should be hits and none due", s.UpstreamCalls)
	}
	if w := r.Writes; w.Records != 10_000 || w.InsertMs <= 0 || w.RefreshMs <= 0 {
		t.Errorf("writes: %+v", w)
	}
	if len(r.Targets) < 10 {
		t.Errorf("%d targets evaluated: %+v", len(r.Targets), r.Targets)
	}
	for _, want := range []string{"Hits:", "Misses:", "Scale:", "Writes:", "Targets (issue 7)"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("table has no %q", want)
		}
	}
}

func TestPercentile(t *testing.T) {
	d := make([]time.Duration, 100)
	for i := range d {
		d[i] = time.Duration(i+1) * time.Microsecond
	}
	for _, tc := range []struct {
		name string
		in   []time.Duration
		q    float64
		want time.Duration
	}{
		{"p50 of 1..100", d, 0.50, 50 * time.Microsecond},
		{"p99 of 1..100", d, 0.99, 99 * time.Microsecond},
		{"p100 of 1..100", d, 1, 100 * time.Microsecond},
		{"one value", d[:1], 0.99, time.Microsecond},
		{"empty", nil, 0.5, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := percentile(tc.in, tc.q); got != tc.want {
				t.Errorf("percentile(%v) = %v, want %v", tc.q, got, tc.want)
			}
		})
	}
}

func TestLimiterBound(t *testing.T) {
	// Tokend's defaults: 980 calls beyond the burst at 10/s.
	if got := limiterBound(1000, 10, 20, 4, 20*time.Millisecond); got != 98*time.Second {
		t.Errorf("defaults: %v, want 98s", got)
	}
	// Four in flight at 20ms each allow 200/s, the same as the rate.
	if got := limiterBound(1000, 200, 50, 4, 20*time.Millisecond); got != 5*time.Second {
		t.Errorf("200/s: %v, want 5s", got)
	}
}

// TestCPUTime: the process CPU clock counts this process's work in
// nanoseconds, not in 10 ms ticks.
func TestCPUTime(t *testing.T) {
	pid := os.Getpid()
	c0, err := cpuTime(pid)
	if err != nil {
		t.Fatal(err)
	}
	for start := time.Now(); time.Since(start) < 30*time.Millisecond; {
	}
	c1, err := cpuTime(pid)
	if err != nil {
		t.Fatal(err)
	}
	if d := c1 - c0; d < 10*time.Millisecond || d%(10*time.Millisecond) == 0 {
		t.Fatalf("30 ms of busy work counted as %v, want at least 10 ms at nanosecond resolution", d)
	}
}
