package gctune

import (
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"testing"
	"time"
)

const mib = 1 << 20

func TestPercent(t *testing.T) {
	tests := []struct {
		name       string
		scannable  uint64
		headroom   uint64
		baseline   int
		want       int
		wantGoalGE uint64 // the runtime's goal for the result is at least this
	}{
		{"tiny heap: bounded by the 4 MiB minimum's scaling", 1 * mib, 16 * mib, 100, 425, 17 * mib},
		{"medium heap", 8 * mib, 16 * mib, 100, 200, 24 * mib},
		{"large heap: baseline", 64 * mib, 16 * mib, 100, 100, 128 * mib},
		{"operator's higher GOGC wins", 64 * mib, 16 * mib, 300, 300, 256 * mib},
		{"no headroom: baseline", 1 * mib, 0, 100, 100, 4 * mib},
		{"empty reading does not divide by zero", 0, 16 * mib, 100, 400, 16 * mib},
		{"largest headroom on a tiny heap is not capped below it", 1, MaxHeadroom, 100, 25600, MaxHeadroom},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Percent(tt.scannable, tt.headroom, tt.baseline)
			if got != tt.want {
				t.Fatalf("Percent(%d MiB, %d MiB, %d) = %d, want %d", tt.scannable/mib, tt.headroom/mib, tt.baseline, got, tt.want)
			}
			// The runtime's goal: the larger of the scaled live heap and
			// the scaled 4 MiB minimum.
			goal := max(tt.scannable+tt.scannable*uint64(got)/100, defaultHeapMinimum*uint64(got)/100)
			if goal < tt.wantGoalGE {
				t.Errorf("goal %.1f MiB, want at least %.1f MiB", float64(goal)/mib, float64(tt.wantGoalGE)/mib)
			}
			if got > tt.baseline && goal > 2*(tt.scannable+tt.headroom)+defaultHeapMinimum {
				t.Errorf("goal %.1f MiB overshoots live + headroom (%d MiB)", float64(goal)/mib, (tt.scannable+tt.headroom)/mib)
			}
		})
	}
}

func heapGoal() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/goal:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// TestTunerRaisesGoal runs the real runtime: after a collection the heap
// goal is at least the headroom, and Stop restores GOGC.
func TestTunerRaisesGoal(t *testing.T) {
	before := debug.SetGCPercent(100)
	defer debug.SetGCPercent(before)

	tu := Start(32 * mib)
	defer tu.Stop()
	deadline := time.Now().Add(5 * time.Second)
	for heapGoal() < 32*mib {
		if time.Now().After(deadline) {
			t.Fatalf("heap goal %.1f MiB after collections, want at least 32 MiB (GOGC %d)", float64(heapGoal())/mib, tu.Current())
		}
		runtime.GC()
		time.Sleep(time.Millisecond) // let the cleanup goroutine run
	}
	if p := tu.Current(); p <= 100 {
		t.Errorf("GOGC %d after tuning, want above the baseline 100", p)
	}
	tu.Stop()
	if p := debug.SetGCPercent(100); p != 100 {
		t.Errorf("GOGC after Stop = %d, want the baseline 100", p)
	}
	runtime.GC()
	if g := heapGoal(); g >= 32*mib {
		t.Errorf("heap goal %.1f MiB after Stop, want the default again", float64(g)/mib)
	}
}

// TestTunerFollowsLiveHeap checks the re-arming after every collection: a
// live heap larger than the headroom brings GOGC back to the baseline, and
// freeing it raises GOGC again.
func TestTunerFollowsLiveHeap(t *testing.T) {
	before := debug.SetGCPercent(100)
	defer debug.SetGCPercent(before)
	tu := Start(16 * mib)
	defer tu.Stop()
	waitFor := func(what string, ok func(int) bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !ok(tu.Current()) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: GOGC still %d after 5s of collections", what, tu.Current())
			}
			runtime.GC()
			time.Sleep(time.Millisecond) // let the cleanup goroutine run
		}
	}
	waitFor("small heap", func(p int) bool { return p > 100 })

	live := make([]byte, 64*mib) // beyond the headroom: GOGC 100 gives more
	waitFor("64 MiB live", func(p int) bool { return p == 100 })
	runtime.KeepAlive(live)
	live = nil

	waitFor("after freeing it", func(p int) bool { return p > 100 })
	tu.Stop()
	if p := debug.SetGCPercent(100); p != 100 {
		t.Errorf("GOGC after Stop = %d, want the baseline 100", p)
	}
}

func TestTunerOffWhenGCOff(t *testing.T) {
	before := debug.SetGCPercent(-1)
	defer debug.SetGCPercent(before)
	tu := Start(32 * mib)
	defer tu.Stop()
	if p := tu.Current(); p != -1 {
		t.Errorf("Percent with GOGC=off = %d, want -1 (untouched)", p)
	}
	if p := debug.SetGCPercent(-1); p != -1 {
		t.Errorf("GOGC changed to %d while off", p)
	}
}
