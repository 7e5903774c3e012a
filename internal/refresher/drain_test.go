package refresher

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestStopDrainsCallsInFlight: when Run's context ends, a miss whose call
// is in flight still gets its token if the call ends within DrainTimeout;
// past it the call is cancelled and Run returns.
func TestStopDrainsCallsInFlight(t *testing.T) {
	for _, tc := range []struct {
		name    string
		release bool // the upstream answers during the drain
	}{
		{"answered during the drain", true},
		{"cancelled at the drain timeout", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newRig(t, func(_ *rig, c *Config) { c.DrainTimeout = 5 * time.Second })
			g.valve.holdIf(forCompany(key.CompanyID))
			res := g.goGet(key)
			h := g.awaitStart()
			armed := g.clock.Armed()
			stopped := make(chan struct{})
			go func() { g.stop(); close(stopped) }()
			<-armed // the drain's timer
			select {
			case <-stopped:
				t.Fatal("Run returned with a call in flight and the drain timeout not passed")
			default:
			}
			if tc.release {
				h.Release()
				if r := g.await(res); r.err != nil {
					t.Fatalf("the caller of the drained call: %v", r.err)
				}
			} else {
				g.clock.Advance(5 * time.Second)
				if r := g.await(res); r.err == nil || !errors.Is(r.err, context.Canceled) {
					t.Fatalf("past the drain timeout: %v, want the call cancelled", r.err)
				}
			}
			select {
			case <-stopped:
			case <-time.After(waitLimit):
				t.Fatal("Run did not return after the drain")
			}
		})
	}
}
