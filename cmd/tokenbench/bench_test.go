package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
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
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	args := []string{"--quick", "--json", jsonPath}
	// The fleet section needs a real redis-server: CI installs it, so
	// only outside CI may its absence drop the section.
	fleet := true
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("TOKEND_E2E_REQUIRE_SYSTEMD") == "1" {
			t.Fatalf("redis-server not found and TOKEND_E2E_REQUIRE_SYSTEMD=1: %v", err)
		}
		t.Logf("redis-server not found (apt-get install redis-server): running without the fleet section: %v", err)
		fleet = false
		args = append(args, "--sections", "hits,misses,scale,writes")
	}
	var stdout, stderr bytes.Buffer
	if code := run(ctx, args, &stdout, &stderr); code != 0 {
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
	if fleet {
		checkFleet(t, r.Fleet)
	}
	if len(r.Targets) < 10 {
		t.Errorf("%d targets evaluated: %+v", len(r.Targets), r.Targets)
	}
	for _, want := range []string{"Hits:", "Misses:", "Scale:", "Writes:", "Targets (issues 7 and 15)"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("table has no %q", want)
		}
	}
	if fleet && !strings.Contains(stdout.String(), "Fleet:") {
		t.Error(`table has no "Fleet:"`)
	}
}

// checkFleet checks the fleet section's invariants, which hold however
// slow the machine: no client error and no bad token through Redis's
// death, every miss on another host adopted, each cold key minted once, and
// the fleet minting less than its hosts alone.
func checkFleet(t *testing.T, f fleetReport) {
	t.Helper()
	if f.Hosts != 8 || f.Keys != 100 || f.LifetimeSeconds != 2 || len(f.Phases) != 3 {
		t.Fatalf("fleet: %d hosts, %d keys, lifetime %vs, %d phases; want 8, 100, 2s, 3", f.Hosts, f.Keys, f.LifetimeSeconds, len(f.Phases))
	}
	for _, p := range f.Phases {
		if p.Requests == 0 || p.HostRequests == 0 || p.SingleCalls == 0 || p.FleetCalls == 0 && p.Name != "redis back" {
			t.Errorf("fleet phase %s: %+v", p.Name, p)
		}
	}
	if f.Errors != 0 || f.BadTokens != 0 || f.OtherErrors != 0 {
		t.Errorf("fleet: %d errors (first: %s), %d bad tokens (first: %s), %d errors on the single host and the hosts alone", f.Errors, f.FirstError, f.BadTokens, f.FirstBad, f.OtherErrors)
	}
	if st := f.Phases[0]; st.AloneCalls == 0 || st.FleetCalls >= st.AloneCalls {
		t.Errorf("fleet steady: %d upstream calls with the fleet, %d alone; the fleet should share its tokens", st.FleetCalls, st.AloneCalls)
	}
	if a := f.Adopt; a.Keys != 50 || a.Adopted != a.Keys*a.Hosts || a.UpstreamCalls != 0 || a.Result.Errors != 0 || a.Result.P99us <= 0 || a.Hits.Requests != a.Keys*a.Hosts {
		t.Errorf("fleet adopt: %+v", a)
	}
	if rl := f.RateLimit; rl.UpstreamCalls != rl.Hosts*rl.KeysPerHost || rl.Errors != 0 || rl.Requests != rl.UpstreamCalls || rl.MaxPerSecond <= 0 {
		t.Errorf("fleet rate limit: %+v", rl)
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

func TestWindowRates(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms ...int) []time.Time {
		var out []time.Time
		for _, m := range ms {
			out = append(out, t0.Add(time.Duration(m)*time.Millisecond))
		}
		return out
	}
	for _, tc := range []struct {
		name          string
		at            []time.Time
		burst         int
		most          int
		sustainedRate float64
	}{
		{"empty", nil, 0, 0, 0},
		{"a burst then 2 a second", at(0, 0, 0, 500, 1000, 1500, 2000), 3, 4, 2},
		{"unsorted", at(1500, 0, 999, 1000), 0, 3, 2.7},
		{"window ends before 1 s", at(0, 1000, 2000), 0, 1, 1.5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			most, sustained := windowRates(tc.at, tc.burst)
			if most != tc.most || sustained != tc.sustainedRate {
				t.Errorf("windowRates = %d, %v; want %d, %v", most, sustained, tc.most, tc.sustainedRate)
			}
		})
	}
}
