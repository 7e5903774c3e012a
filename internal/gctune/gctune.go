// Package gctune keeps a minimum of heap headroom between garbage
// collections.
//
// The Go runtime starts a collection when the heap reaches twice its live
// size, but never below 4 MiB. tokend's live heap is small next to the
// rate at which gRPC allocates while serving hits (a few KiB per call), so
// under load it would be collected every megabyte or two, each time
// marking the whole live heap again: at 30,000 calls a second, marking was
// 9% of tokend's CPU samples (4% for a bare gRPC server), and tokend spent
// 7-19% more CPU per call than that server. A Tuner raises GOGC just
// enough that the heap may grow by about the headroom between
// collections, and lets it fall back to the baseline as the live heap
// grows, so a large cache pays nothing beyond Go's default.
package gctune

import (
	"math"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
)

// defaultHeapMinimum is the runtime's least heap goal at GOGC=100; it
// scales with GOGC, which setting a high GOGC must account for.
const defaultHeapMinimum = 4 << 20

// maxPercent bounds GOGC whatever the sizes, as a guard against a bad
// reading; it allows a headroom of 1 GiB (MaxHeadroom) above any live heap.
const maxPercent = 100 * (MaxHeadroom + defaultHeapMinimum) / defaultHeapMinimum

// MaxHeadroom is the largest headroom Start accepts.
const MaxHeadroom = 1 << 30

// samples are the runtime/metrics read after each collection.
var samples = []string{
	"/gc/heap/live:bytes",
	"/gc/scan/stack:bytes",
	"/gc/scan/globals:bytes",
}

// Tuner adjusts GOGC after every collection. Its zero value is unusable;
// call Start.
type Tuner struct {
	headroom uint64
	baseline int // GOGC when Start was called

	mu      sync.Mutex
	stopped bool
	current int
	buf     []metrics.Sample
}

// Start keeps about headroom bytes (at most MaxHeadroom) between the live
// heap and the next collection, never going below the GOGC in force when
// it is called (the GOGC environment variable, or 100). It does nothing
// when headroom is 0 or GOGC is off. Stop restores the baseline.
func Start(headroom uint64) *Tuner {
	gogc := []metrics.Sample{{Name: "/gc/gogc:percent"}}
	metrics.Read(gogc)
	baseline := -1 // off: the metric reads as -1 in two's complement
	if gogc[0].Value.Kind() == metrics.KindUint64 {
		baseline = int(int64(gogc[0].Value.Uint64()))
	}
	headroom = min(headroom, MaxHeadroom)
	t := &Tuner{headroom: headroom, baseline: baseline, current: baseline}
	t.buf = make([]metrics.Sample, len(samples))
	for i, name := range samples {
		t.buf[i].Name = name
	}
	if headroom == 0 || baseline <= 0 {
		t.stopped = true
		return t
	}
	t.adjust()
	t.arm()
	return t
}

// Current is the GOGC the tuner last set.
func (t *Tuner) Current() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.current
}

// Stop ends tuning and restores the baseline GOGC.
func (t *Tuner) Stop() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		return
	}
	t.stopped = true
	debug.SetGCPercent(t.baseline)
	t.current = t.baseline
}

// sentinel is garbage from birth; its cleanup runs after the collection
// that finds it unreachable. It holds a pointer so that it is not put in a
// tiny-allocation block, whose cleanups may be delayed indefinitely.
type sentinel struct{ _ *int }

func (t *Tuner) arm() {
	runtime.AddCleanup(&sentinel{}, func(t *Tuner) {
		if t.adjust() {
			t.arm()
		}
	}, t)
}

// adjust sets GOGC for the live heap the last collection found. It
// reports false once the tuner has stopped.
func (t *Tuner) adjust() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		return false
	}
	metrics.Read(t.buf)
	var scannable uint64
	for _, s := range t.buf {
		if s.Value.Kind() == metrics.KindUint64 {
			scannable += s.Value.Uint64()
		}
	}
	if p := Percent(scannable, t.headroom, t.baseline); p != t.current {
		debug.SetGCPercent(p)
		t.current = p
	}
	return true
}

// Percent is the GOGC that puts the next collection headroom bytes above a
// heap whose scannable part (live heap, stacks and globals) is scannable
// bytes, and never below baseline.
//
// The runtime's goal is the larger of scannable*(1+GOGC/100) and
// 4 MiB*GOGC/100; both are kept near scannable+headroom.
func Percent(scannable, headroom uint64, baseline int) int {
	if scannable == 0 {
		scannable = 1
	}
	goal := float64(scannable + headroom)
	fromLive := 100 * float64(headroom) / float64(scannable)
	fromMinimum := 100 * goal / defaultHeapMinimum
	p := math.Min(fromLive, fromMinimum)
	return int(math.Max(float64(baseline), math.Min(p, maxPercent)))
}
