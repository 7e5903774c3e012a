package main

import (
	"context"
	"math"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc/status"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// loadResult is what one load run measured. Latencies are in microseconds.
type loadResult struct {
	Requests int `json:"requests"`
	Errors   int `json:"errors"`
	// ErrorCodes counts errors by gRPC status code.
	ErrorCodes map[string]int `json:"error_codes,omitempty"`
	FirstError string         `json:"first_error,omitempty"`
	Seconds    float64        `json:"seconds"`
	RPS        float64        `json:"rps"`
	P50us      float64        `json:"p50_us"`
	P99us      float64        `json:"p99_us"`
	MaxUs      float64        `json:"max_us"`
	// ServerCPUus is the server process's CPU time (user + system) per
	// answered request: its own cost, apart from the client's share of
	// the machine. Zero where it was not measured.
	ServerCPUus float64 `json:"server_cpu_us_per_request,omitempty"`
}

// expectedRPS sizes the per-worker latency slices so that recording never
// allocates during a measurement; a faster machine only pays an append.
const expectedRPS = 200_000

// sample is what one or more load phases recorded.
type sample struct {
	lat     []time.Duration
	elapsed time.Duration
	cpu     time.Duration // the server's, over the phases
	errs    []error       // the first few of each phase
	nerr    int
}

func (s *sample) add(o sample) {
	s.lat = append(s.lat, o.lat...)
	s.elapsed += o.elapsed
	s.cpu += o.cpu
	s.errs = append(s.errs, o.errs...)
	s.nerr += o.nerr
}

func (s *sample) result() loadResult {
	var res loadResult
	for _, err := range s.errs {
		res.addError(err)
	}
	// Errors beyond the first few of a phase are counted, not sorted by code.
	res.Errors += s.nerr - len(s.errs)
	summarize(&res, s.lat, s.elapsed)
	if len(s.lat) > 0 && s.cpu > 0 {
		res.ServerCPUus = math.Round(float64(s.cpu)/float64(time.Microsecond)/float64(len(s.lat))*100) / 100
	}
	return res
}

// loadTarget is one server under load: its clients, one per connection,
// and its process, whose CPU time is read around each measured phase.
type loadTarget struct {
	clients []tokendv1.TokenServiceClient
	pid     int // 0: CPU time not measured
}

// compare loads a and b alternately, rounds times each for d/rounds after a
// warm-up of each, so that a change in the machine's background load
// during the run affects both alike.
func compare(ctx context.Context, a, b loadTarget, reqs []*tokendv1.GetTokenRequest, conc int, warmup, d time.Duration, rounds int) (ra, rb loadResult) {
	if warmup > 0 {
		loadPhase(ctx, a, reqs, conc, warmup, false)
		loadPhase(ctx, b, reqs, conc, warmup, false)
	}
	var sa, sb sample
	for range rounds {
		sa.add(loadPhase(ctx, a, reqs, conc, d/time.Duration(rounds), true))
		sb.add(loadPhase(ctx, b, reqs, conc, d/time.Duration(rounds), true))
	}
	return sa.result(), sb.result()
}

// loadPhase runs conc workers, each sending GetToken as soon as its last
// answer arrived, for d. Worker w uses clients[w%len(clients)] and cycles
// through reqs starting at w.
func loadPhase(ctx context.Context, target loadTarget, reqs []*tokendv1.GetTokenRequest, conc int, d time.Duration, record bool) sample {
	type worker struct {
		lat  []time.Duration
		errs []error
		n    int
	}
	workers := make([]worker, conc)
	if record {
		perWorker := int(d.Seconds()*expectedRPS)/conc + 1024
		for i := range workers {
			workers[i].lat = make([]time.Duration, 0, perWorker)
		}
	}
	start := make(chan struct{})
	var deadline time.Time // set before start is closed
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			wk := &workers[w]
			client := target.clients[w%len(target.clients)]
			next := w % len(reqs)
			<-start
			for {
				t0 := time.Now()
				_, err := client.GetToken(ctx, reqs[next])
				t1 := time.Now()
				if err != nil {
					if wk.n++; len(wk.errs) < 100 {
						wk.errs = append(wk.errs, err)
					}
				} else if record {
					wk.lat = append(wk.lat, t1.Sub(t0))
				}
				if next++; next == len(reqs) {
					next = 0
				}
				if !t1.Before(deadline) || ctx.Err() != nil {
					return
				}
			}
		})
	}
	cpu0 := target.cpuTime()
	t0 := time.Now()
	deadline = t0.Add(d)
	close(start)
	wg.Wait()
	var s sample
	s.elapsed = time.Since(t0)
	if cpu1 := target.cpuTime(); cpu0 > 0 && cpu1 >= cpu0 {
		s.cpu = cpu1 - cpu0
	}
	n := 0
	for i := range workers {
		n += len(workers[i].lat)
	}
	s.lat = make([]time.Duration, 0, n)
	for i := range workers {
		s.lat = append(s.lat, workers[i].lat...)
		s.errs = append(s.errs, workers[i].errs...)
		s.nerr += workers[i].n
	}
	return s
}

// cpuTime is the target process's CPU time so far, or 0 if unknown.
func (t loadTarget) cpuTime() time.Duration {
	if t.pid == 0 {
		return 0
	}
	d, err := cpuTime(t.pid)
	if err != nil {
		return 0
	}
	return d
}

// burst starts one GetToken per request at the same instant and waits for
// all of them: wall time, errors and the latency distribution.
func burst(ctx context.Context, clients []tokendv1.TokenServiceClient, reqs []*tokendv1.GetTokenRequest, timeout time.Duration) loadResult {
	lat := make([]time.Duration, len(reqs))
	errs := make([]error, len(reqs))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, req := range reqs {
		wg.Go(func() {
			client := clients[i%len(clients)]
			<-start
			cctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			t0 := time.Now()
			_, errs[i] = client.GetToken(cctx, req)
			lat[i] = time.Since(t0)
		})
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	elapsed := time.Since(t0)
	var res loadResult
	ok := lat[:0:0]
	for i, err := range errs {
		if err != nil {
			res.addError(err)
			continue
		}
		ok = append(ok, lat[i])
	}
	summarize(&res, ok, elapsed)
	return res
}

func (r *loadResult) addError(err error) {
	if r.Errors == 0 {
		r.FirstError = err.Error()
	}
	r.Errors++
	if r.ErrorCodes == nil {
		r.ErrorCodes = map[string]int{}
	}
	r.ErrorCodes[status.Code(err).String()]++
}

func summarize(res *loadResult, lat []time.Duration, elapsed time.Duration) {
	slices.Sort(lat)
	res.Requests = len(lat)
	res.Seconds = elapsed.Seconds()
	res.RPS = float64(len(lat)) / elapsed.Seconds()
	res.P50us = micros(percentile(lat, 0.50))
	res.P99us = micros(percentile(lat, 0.99))
	if len(lat) > 0 {
		res.MaxUs = micros(lat[len(lat)-1])
	}
}

// percentile is the nearest-rank percentile of sorted values.
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func micros(d time.Duration) float64 { return math.Round(float64(d)/float64(time.Microsecond)*10) / 10 }
