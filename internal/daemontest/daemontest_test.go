package daemontest

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func TestOutputKeepsTail(t *testing.T) {
	o := NewOutput(10)
	o.Write([]byte("hello"))
	o.Write([]byte("world!!"))
	if got, want := o.String(), "lloworld!!"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	n, err := o.Write([]byte("0123456789abcdef"))
	if n != 16 || err != nil {
		t.Fatalf("Write returned %d, %v; want 16, nil", n, err)
	}
	if got, want := o.String(), "6789abcdef"; got != want {
		t.Fatalf("a write longer than the bound: got %q, want %q", got, want)
	}
}

// TestOutputConcurrent writes from many goroutines (run with -race): an
// unbounded Output keeps every line whole, a bounded one exactly its bound.
func TestOutputConcurrent(t *testing.T) {
	const writers, lines = 8, 500
	const line = "0123456789abcdef\n"
	all, tail := &Output{}, NewOutput(1000)
	var wg sync.WaitGroup
	for range writers {
		wg.Go(func() {
			for range lines {
				all.Write([]byte(line))
				tail.Write([]byte(line))
				_ = all.String()
			}
		})
	}
	wg.Wait()
	if got, want := strings.Count(all.String(), line), writers*lines; got != want || len(all.String()) != want*len(line) {
		t.Fatalf("unbounded output holds %d whole lines in %d bytes, want %d", got, len(all.String()), want)
	}
	if got := len(tail.String()); got != 1000 {
		t.Fatalf("bounded output holds %d bytes, want 1000", got)
	}
}

func start(t *testing.T, script string) *Process {
	t.Helper()
	p, err := Start("/bin/sh", []string{"-c", script}, []string{"PATH=" + os.Getenv("PATH")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	return p
}

// waitFor waits until the process has printed s.
func waitFor(t *testing.T, p *Process, s string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(p.Out.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q in the output after 10s:\n%s", s, p.Out.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestStartRunsUnderGivenEnv(t *testing.T) {
	t.Setenv("DAEMONTEST_LEAK", "leaked")
	p, err := Start("/bin/sh", []string{"-c", `echo "[$DAEMONTEST_LEAK][$ONLY]"`}, []string{"ONLY=given"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	<-p.Done()
	if p.Err() != nil || p.Out.String() != "[][given]\n" {
		t.Fatalf("exit %v, output %q; want a clean exit printing [][given]", p.Err(), p.Out.String())
	}
	if p.Name != "sh" {
		t.Fatalf("Name %q, want the binary's base name", p.Name)
	}
}

func TestStartFails(t *testing.T) {
	if _, err := Start(filepath.Join(t.TempDir(), "missing"), nil, nil, nil); err == nil || !strings.Contains(err.Error(), "start missing") {
		t.Fatalf("Start of a missing binary: %v", err)
	}
}

func TestStopClean(t *testing.T) {
	p := start(t, `trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.02; done`)
	waitFor(t, p, "up")
	if err := p.Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(p.Out.String(), "bye") || p.Err() != nil {
		t.Fatalf("exit %v, output %q", p.Err(), p.Out.String())
	}
	if err := p.Stop(10 * time.Second); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
}

// TestStopReportsUncleanExit: sleep dies of SIGTERM, which is no clean exit;
// the error says so and carries the output.
func TestStopReportsUncleanExit(t *testing.T) {
	p := start(t, `echo said-before; exec sleep 60`)
	waitFor(t, p, "said-before")
	err := p.Stop(10 * time.Second)
	if err == nil || !strings.Contains(err.Error(), "after SIGTERM") || !strings.Contains(err.Error(), "said-before") {
		t.Fatalf("Stop of a process killed by SIGTERM: %v", err)
	}
	if err := p.Stop(10 * time.Second); err != nil {
		t.Fatalf("a second Stop reported again: %v", err)
	}
}

func TestStopReportsEarlierExit(t *testing.T) {
	p := start(t, `echo crashed; exit 3`)
	<-p.Done()
	err := p.Stop(10 * time.Second)
	if err == nil || !strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "crashed") {
		t.Fatalf("Stop of a process that had exited 3: %v", err)
	}
}

func TestStopKillsAfterTimeout(t *testing.T) {
	p := start(t, `trap '' TERM; echo deaf; while :; do sleep 0.02; done`)
	waitFor(t, p, "deaf")
	t0 := time.Now()
	err := p.Stop(200 * time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "killed") || !strings.Contains(err.Error(), "deaf") {
		t.Fatalf("Stop of a process ignoring SIGTERM: %v", err)
	}
	select {
	case <-p.Done():
	default:
		t.Fatal("Stop returned with the process still running")
	}
	if took := time.Since(t0); took > 5*time.Second {
		t.Fatalf("Stop took %v with a 200ms timeout", took)
	}
}

// TestWaitReadyFailsFast: a process that exits before its socket appears
// fails WaitReady at once, with its output, not after the timeout.
func TestWaitReadyFailsFast(t *testing.T) {
	p := start(t, `echo no-config >&2; exit 2`)
	t0 := time.Now()
	_, err := WaitReady(context.Background(), p, filepath.Join(t.TempDir(), "never.sock"), time.Minute, HealthServing)
	if err == nil || !strings.Contains(err.Error(), "exited before it was ready") || !strings.Contains(err.Error(), "no-config") || !strings.Contains(err.Error(), "exit status 2") {
		t.Fatalf("WaitReady on an exited process: %v", err)
	}
	if took := time.Since(t0); took > 10*time.Second {
		t.Fatalf("WaitReady took %v to notice the exit", took)
	}
}

func TestWaitReadyTimeout(t *testing.T) {
	p := start(t, `echo waiting; exec sleep 60`)
	_, err := WaitReady(context.Background(), p, filepath.Join(t.TempDir(), "never.sock"), 100*time.Millisecond, HealthServing)
	if err == nil || !strings.Contains(err.Error(), "not answering") {
		t.Fatalf("WaitReady on a socket nobody serves: %v", err)
	}
}

// TestWaitReady serves the health service on a socket that appears late
// and says NOT_SERVING first: WaitReady returns once it says SERVING.
func TestWaitReady(t *testing.T) {
	p := start(t, `exec sleep 60`)
	socket := filepath.Join(t.TempDir(), "h.sock")
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	t.Cleanup(srv.Stop)
	serving := make(chan time.Time, 1)
	go func() {
		time.Sleep(50 * time.Millisecond)
		ln, err := net.Listen("unix", socket)
		if err != nil {
			t.Error(err)
			return
		}
		go srv.Serve(ln)
		time.Sleep(50 * time.Millisecond)
		serving <- time.Now()
		hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	}()
	took, err := WaitReady(context.Background(), p, socket, 20*time.Second, HealthServing)
	if err != nil {
		t.Fatal(err)
	}
	if at := <-serving; took < at.Sub(p.Started) {
		t.Fatalf("ready after %v, before the server said SERVING (%v)", took, at.Sub(p.Started))
	}
}
