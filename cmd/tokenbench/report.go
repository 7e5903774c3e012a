package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Report is the JSON summary; two of them compare field by field.
type Report struct {
	Date      string  `json:"date"`
	Machine   machine `json:"machine"`
	GoVersion string  `json:"go_version"`
	Commit    string  `json:"commit"`
	Quick     bool    `json:"quick"`
	// Sections are the parts that ran; the others are left zero.
	Sections []string     `json:"sections"`
	Hits     hitsReport   `json:"hits"`
	Misses   missesReport `json:"misses"`
	Scale    scaleReport  `json:"scale"`
	Writes   writeResult  `json:"writes"`
	Targets  []target     `json:"targets"`
}

type machine struct {
	Cores    int    `json:"cores"`
	CPUModel string `json:"cpu_model"`
	OS       string `json:"os"`
	Arch     string `json:"arch"`
}

type hitsReport struct {
	Keys          int     `json:"keys"`
	Seconds       float64 `json:"seconds_per_point"`
	WarmupSeconds float64 `json:"warmup_seconds"`
	// Rounds is how many alternating slices of each point's duration
	// each server got.
	Rounds      int        `json:"rounds"`
	AnswerBytes int        `json:"answer_bytes"`
	TokendFlags []string   `json:"tokend_flags"`
	Points      []hitPoint `json:"points"`
	// UpstreamCalls during the measured points: 0 if every call was a hit.
	UpstreamCalls int `json:"upstream_calls"`
}

type hitPoint struct {
	Concurrency int        `json:"concurrency"`
	Connections int        `json:"connections"`
	Tokend      loadResult `json:"tokend"`
	Floor       loadResult `json:"floor"`
	// Ratios are tokend/floor: above 1 is slower for latencies, below 1 is
	// slower for throughput.
	RatioRPS  float64 `json:"ratio_rps"`
	RatioP50  float64 `json:"ratio_p50"`
	RatioP99  float64 `json:"ratio_p99"`
	P50DiffUs float64 `json:"p50_diff_us"`
}

func (p *hitPoint) ratios() {
	ratio := func(a, b float64) float64 {
		if b == 0 {
			return 0
		}
		return round(a/b, 3)
	}
	p.RatioRPS = ratio(p.Tokend.RPS, p.Floor.RPS)
	p.RatioP50 = ratio(p.Tokend.P50us, p.Floor.P50us)
	p.RatioP99 = ratio(p.Tokend.P99us, p.Floor.P99us)
	p.P50DiffUs = round(p.Tokend.P50us-p.Floor.P50us, 1)
	p.Tokend.RPS = math.Round(p.Tokend.RPS)
	p.Floor.RPS = math.Round(p.Floor.RPS)
}

type missesReport struct {
	UpstreamLatencyMs float64 `json:"upstream_latency_ms"`
	// PerUIDMissLimit says whether tokend's per-caller miss limit was
	// raised for the test (all of the benchmark's callers share one uid).
	PerUIDMissLimit string   `json:"per_uid_miss_limit"`
	OneKey          missTest `json:"one_key"`
	DistinctKeys    missTest `json:"distinct_keys"`
}

type missTest struct {
	Callers int `json:"callers"`
	Keys    int `json:"keys"`
	// Result: Seconds is the wall time from the start of the burst to the
	// last answer.
	Result              loadResult `json:"result"`
	UpstreamCalls       int        `json:"upstream_calls"`
	UpstreamMaxInFlight int        `json:"upstream_max_in_flight"`
	// TokendFlags are the limiter settings that applied.
	TokendFlags []string `json:"tokend_flags"`
	// LimiterBoundSeconds is the least time the limiter allows for Keys
	// upstream calls.
	LimiterBoundSeconds float64 `json:"limiter_bound_seconds,omitempty"`
}

type scaleReport struct {
	Entries         int        `json:"entries"`
	FileBytes       int64      `json:"file_bytes"`
	PopulateSeconds float64    `json:"populate_seconds"`
	TokendFlags     []string   `json:"tokend_flags"`
	ReadyMs         float64    `json:"ready_ms"`
	RSSKiB          int64      `json:"rss_kib"`
	RSSAnonKiB      int64      `json:"rss_anon_kib"`
	RSSFileKiB      int64      `json:"rss_file_kib"`
	RSSAfterIdleKiB int64      `json:"rss_after_idle_kib"`
	IdleSeconds     float64    `json:"idle_seconds"`
	IdleCPUSeconds  float64    `json:"idle_cpu_seconds"`
	IdleCPUPer30s   float64    `json:"idle_cpu_seconds_per_30s"`
	UpstreamCalls   int        `json:"upstream_calls"`
	Heap            heapResult `json:"heap"`
}

// target is one of issue 7's targets and whether this run met it.
type target struct {
	Name string `json:"name"`
	Want string `json:"want"`
	Got  string `json:"got"`
	Pass bool   `json:"pass"`
}

func newReport(o options) *Report {
	r := &Report{
		Date:      time.Now().UTC().Format(time.RFC3339),
		Machine:   machine{Cores: runtime.NumCPU(), CPUModel: cpuModel(), OS: runtime.GOOS, Arch: runtime.GOARCH},
		GoVersion: runtime.Version(),
		Commit:    gitCommit(),
		Quick:     o.quick,
	}
	for _, name := range allSections {
		if o.sections[name] {
			r.Sections = append(r.Sections, name)
		}
	}
	return r
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if name, value, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(name) == "model name" {
			return strings.TrimSpace(value)
		}
	}
	return "unknown"
}

// gitCommit is the short HEAD commit, with "-dirty" when the work tree has
// changes; empty outside a repository. It never writes to the repository.
func gitCommit() string {
	out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return ""
	}
	commit := strings.TrimSpace(string(out))
	st, err := exec.Command("git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no").Output()
	if err == nil && len(strings.TrimSpace(string(st))) > 0 {
		commit += "-dirty"
	}
	return commit
}

func (r *Report) point(conc, conns int) *hitPoint {
	for i := range r.Hits.Points {
		if p := &r.Hits.Points[i]; p.Concurrency == conc && p.Connections == conns {
			return p
		}
	}
	return nil
}

// evaluate judges the targets of the sections that ran.
func (r *Report) evaluate(sections map[string]bool) {
	add := func(name, want, got string, pass bool) {
		r.Targets = append(r.Targets, target{Name: name, Want: want, Got: got, Pass: pass})
	}
	if sections["hits"] {
		r.evaluateHits(add)
	}
	if sections["misses"] {
		r.evaluateMisses(add)
	}
	if sections["scale"] {
		r.evaluateScale(add)
	}
	if sections["writes"] {
		w := r.Writes
		add(fmt.Sprintf("writes: %d records persisted", w.Records), "< 1 s",
			fmt.Sprintf("insert %.0f ms, refresh %.0f ms", w.InsertMs, w.RefreshMs), w.InsertMs < 1000 && w.RefreshMs < 1000)
	}
}

// addTarget records one target: what it asks, what the run got, and
// whether that meets it.
type addTarget func(name, want, got string, pass bool)

// evaluateHits judges the hit targets against the floor.
func (r *Report) evaluateHits(add addTarget) {
	for _, conns := range []int{1, 4} {
		if p := r.point(16, conns); p != nil {
			add(fmt.Sprintf("hits c=16 over %d conn: throughput", conns), ">= 0.90 of floor",
				fmt.Sprintf("%.3f (%.0f vs %.0f rps)", p.RatioRPS, p.Tokend.RPS, p.Floor.RPS), p.RatioRPS >= 0.90)
			add(fmt.Sprintf("hits c=16 over %d conn: p99", conns), "<= 1.25 of floor",
				fmt.Sprintf("%.3f (%.1f vs %.1f µs)", p.RatioP99, p.Tokend.P99us, p.Floor.P99us), p.RatioP99 <= 1.25)
		}
	}
	if p := r.point(1, 1); p != nil {
		add("hits c=1: p50", "within 20 µs of floor",
			fmt.Sprintf("+%.1f µs (%.1f vs %.1f µs)", p.P50DiffUs, p.Tokend.P50us, p.Floor.P50us), p.P50DiffUs <= 20)
	}
}

// evaluateMisses judges the coalescing and limiter targets.
func (r *Report) evaluateMisses(add addTarget) {
	one := r.Misses.OneKey
	add(fmt.Sprintf("misses: %d callers, one cold key", one.Callers), "exactly 1 upstream call",
		fmt.Sprintf("%d calls", one.UpstreamCalls), one.UpstreamCalls == 1)
	add(fmt.Sprintf("misses: %d callers, one cold key", one.Callers), "no errors",
		fmt.Sprintf("%d errors %v", one.Result.Errors, one.Result.ErrorCodes), one.Result.Errors == 0)
	d := r.Misses.DistinctKeys
	add(fmt.Sprintf("misses: %d distinct cold keys", d.Keys), "1 call each, 0 errors, wall <= 1.25 x limiter bound",
		fmt.Sprintf("%d calls, %d errors, %.2fs vs %.2fs bound", d.UpstreamCalls, d.Result.Errors, d.Result.Seconds, d.LimiterBoundSeconds),
		d.UpstreamCalls == d.Keys && d.Result.Errors == 0 && d.Result.Seconds <= 1.25*d.LimiterBoundSeconds)
}

// evaluateScale judges start-up, heap and idle targets.
func (r *Report) evaluateScale(add addTarget) {
	s := r.Scale
	add(fmt.Sprintf("scale: READY with %d entries", s.Entries), "<= 1 s", fmt.Sprintf("%.0f ms", s.ReadyMs), s.ReadyMs <= 1000)
	add("scale: heap per entry beyond token bytes", "<= 1024 B",
		fmt.Sprintf("%.0f B (cache %.0f B + refresher; token %.0f B)", s.Heap.DaemonNoToken, s.Heap.CacheNoToken, s.Heap.TokenBytes), s.Heap.DaemonNoToken <= 1024)
	add(fmt.Sprintf("scale: idle CPU with %d entries", s.Entries), "< 0.3 s per 30 s",
		fmt.Sprintf("%.2f s per 30 s (%.2f s over %.0f s)", s.IdleCPUPer30s, s.IdleCPUSeconds, s.IdleSeconds), s.IdleCPUPer30s < 0.3)
}

func printReport(out io.Writer, r *Report) {
	fmt.Fprintf(out, "tokenbench %s  %d cores, %s  %s  commit %s", r.Date, r.Machine.Cores, r.Machine.CPUModel, r.GoVersion, orNone(r.Commit))
	if r.Quick {
		fmt.Fprint(out, "  (--quick: not comparable with a full run)")
	}
	fmt.Fprintln(out)

	if r.ran("hits") {
		printHits(out, r.Hits)
	}
	if r.ran("misses") {
		printMisses(out, r.Misses)
	}
	if r.ran("scale") {
		printScale(out, r.Scale)
	}
	if r.ran("writes") {
		w := r.Writes
		fmt.Fprintf(out, "\nWrites: %d records in one Flush: insert %.1f ms, refresh %.1f ms (file %.1f MiB)\n",
			w.Records, w.InsertMs, w.RefreshMs, float64(w.FileBytes)/(1<<20))
	}
	printTargets(out, r.Targets)
}

// ran reports whether section was part of the run.
func (r *Report) ran(section string) bool { return slices.Contains(r.Sections, section) }

// printHits prints the hit points, tokend beside the floor.
func printHits(out io.Writer, h hitsReport) {
	fmt.Fprintf(out, "\nHits: GetToken on %d warm keys, %gs per point and server (in %d alternating rounds) after %gs warm-up; answer %d bytes; tokend %s\n",
		h.Keys, h.Seconds, h.Rounds, h.WarmupSeconds, h.AnswerBytes, strings.Join(h.TokendFlags, " "))
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "conc\tconns\ttokend rps\tp50 µs\tp99 µs\tfloor rps\tp50 µs\tp99 µs\trps ratio\tp50 ratio\tp99 ratio\tp50 +µs\tcpu µs/req\terrors\t")
	for _, p := range h.Points {
		fmt.Fprintf(tw, "%d\t%d\t%.0f\t%.1f\t%.1f\t%.0f\t%.1f\t%.1f\t%.3f\t%.3f\t%.3f\t%+.1f\t%.1f / %.1f\t%d\t\n",
			p.Concurrency, p.Connections, p.Tokend.RPS, p.Tokend.P50us, p.Tokend.P99us, p.Floor.RPS, p.Floor.P50us, p.Floor.P99us,
			p.RatioRPS, p.RatioP50, p.RatioP99, p.P50DiffUs, p.Tokend.ServerCPUus, p.Floor.ServerCPUus, p.Tokend.Errors+p.Floor.Errors)
	}
	tw.Flush()
	fmt.Fprintln(out, "cpu µs/req: CPU time of the tokend / floor process per answered request (user + system)")
	fmt.Fprintf(out, "upstream calls during the hit points: %d\n", h.UpstreamCalls)
}

// printMisses prints the two miss tests.
func printMisses(out io.Writer, m missesReport) {
	fmt.Fprintf(out, "\nMisses: fake upstream latency %gms, callers over %d connections; per-uid miss limit: %s\n", m.UpstreamLatencyMs, missConns, m.PerUIDMissLimit)
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "test\tcallers\tupstream calls\tmax in flight\terrors\twall\tp50\tp99\tlimiter bound\ttokend limiter flags")
	for _, t := range []struct {
		name string
		m    missTest
	}{{"one cold key", m.OneKey}, {"distinct cold keys", m.DistinctKeys}} {
		bound := "-"
		if t.m.LimiterBoundSeconds > 0 {
			bound = fmt.Sprintf("%.2fs", t.m.LimiterBoundSeconds)
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%.3fs\t%.1fms\t%.1fms\t%s\t%s\n", t.name, t.m.Callers, t.m.UpstreamCalls, t.m.UpstreamMaxInFlight,
			t.m.Result.Errors, t.m.Result.Seconds, t.m.Result.P50us/1000, t.m.Result.P99us/1000, bound, strings.Join(t.m.TokendFlags, " "))
	}
	tw.Flush()
	for _, t := range []struct {
		name string
		m    missTest
	}{{"one cold key", m.OneKey}, {"distinct cold keys", m.DistinctKeys}} {
		if t.m.Result.Errors > 0 {
			fmt.Fprintf(out, "%s errors by code: %v; first: %s\n", t.name, t.m.Result.ErrorCodes, t.m.Result.FirstError)
		}
	}
}

// printScale prints start-up, memory and idle cost at scale.
func printScale(out io.Writer, s scaleReport) {
	fmt.Fprintf(out, "\nScale: %d entries (cache.db %.1f MiB), tokend %s\n", s.Entries, float64(s.FileBytes)/(1<<20), strings.Join(s.TokendFlags, " "))
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "start to READY (health SERVING and a hit)\t%.0f ms\n", s.ReadyMs)
	fmt.Fprintf(tw, "resident memory (VmRSS)\t%.1f MiB (anon %.1f MiB, file %.1f MiB); %.1f MiB after idle\n",
		kib(s.RSSKiB), kib(s.RSSAnonKiB), kib(s.RSSFileKiB), kib(s.RSSAfterIdleKiB))
	fmt.Fprintf(tw, "Go heap per entry, cache only\t%.0f B (%.0f B beyond the %.0f token bytes)\n", s.Heap.Cache, s.Heap.CacheNoToken, s.Heap.TokenBytes)
	fmt.Fprintf(tw, "Go heap per entry, cache + refresher\t%.0f B (%.0f B beyond the token bytes)\n", s.Heap.Daemon, s.Heap.DaemonNoToken)
	fmt.Fprintf(tw, "CPU time over %.0fs idle\t%.2f s (%.2f s per 30 s); %d upstream calls\n", s.IdleSeconds, s.IdleCPUSeconds, s.IdleCPUPer30s, s.UpstreamCalls)
	tw.Flush()
}

// printTargets prints PASS or MISS for each target judged.
func printTargets(out io.Writer, targets []target) {
	fmt.Fprintln(out, "\nTargets (issue 7)")
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	for _, t := range targets {
		verdict := "MISS"
		if t.Pass {
			verdict = "PASS"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", verdict, t.Name, t.Want, t.Got)
	}
	tw.Flush()
}

func writeJSON(path string, r *Report) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write JSON summary: %w", err)
	}
	return nil
}

func kib(n int64) float64 { return float64(n) / 1024 }

func round(f float64, digits int) float64 {
	p := math.Pow(10, float64(digits))
	return math.Round(f*p) / p
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}
