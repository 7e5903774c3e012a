package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokend/tokend/internal/daemontest"
	"github.com/tokend/tokend/internal/fleet/redistest"
	"github.com/tokend/tokend/internal/whop/whoptest"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// errNoRedis: the fleet section needs a real redis-server.
var errNoRedis = errors.New("fleet: redis-server not found: install redis-server or run --sections without fleet")

// fleetWorkers is how many closed-loop callers load each configuration.
const fleetWorkers = 16

// noMinTTL asks for whatever token is cached: with the bench's short
// lifetimes, the default min_ttl of a minute would make every call a mint.
var noMinTTL = durationpb.New(0)

// fleetLoad is one configuration under the fleet section's load: its own
// fake upstream (so calls are counted apart), its hosts and their clients.
type fleetLoad struct {
	name    string
	fake    *whoptest.Server
	hosts   []*proc
	clients []tokendv1.TokenServiceClient
	close   func()
	// verify checks every served token with the fake (signature, expiry,
	// subject).
	verify bool

	// walk is the configuration's current random order of every (key,
	// host) pair and next its position, shared by its workers.
	walk                []int
	next                int
	requests, errs, bad atomic.Int64
	// stalled counts calls still waiting after a second when the load
	// stopped.
	stalled atomic.Int64
	// slowest is the longest GetToken since the last phase began, in ns.
	slowest            atomic.Int64
	mu                 sync.Mutex
	firstErr, firstBad string
}

// fleet runs the fleet section: a single host, 8 hosts alone and 8 hosts
// sharing a redis-server under the same load, with Redis killed and
// restarted mid-run; then the latency of a local miss answered from Redis;
// then the fleet-wide rate limit.
func (b *bench) fleet(ctx context.Context) (fleetReport, error) {
	o := b.o
	L := o.fleetLifetime
	rep := fleetReport{Hosts: o.fleetHosts, Keys: o.fleetKeys, LifetimeSeconds: L.Seconds(), WorkersPerConfig: fleetWorkers}
	rdir := filepath.Join(b.dir, "redis")
	if err := os.Mkdir(rdir, 0o700); err != nil {
		return rep, err
	}
	rs, err := redistest.StartProcess(rdir)
	if errors.Is(err, redistest.ErrNotFound) {
		return rep, errNoRedis
	}
	if err != nil {
		return rep, err
	}
	defer rs.Kill()
	fleetKey := filepath.Join(b.dir, "fleet.key")
	kb := make([]byte, 32)
	rand.Read(kb)
	if err := os.WriteFile(fleetKey, kb, 0o600); err != nil {
		return rep, err
	}
	fleetFlags := []string{"--fleet-redis", rs.URL(), "--fleet-key-file", fleetKey}
	// The hosts' own limiters out of the way: the load mints 1,000 keys at
	// once, and each host's default of 10/s would be what is measured.
	common := append(limitFlags(1e6, 100_000, 64), "--token-lifetime", L.String())
	rep.TokendFlags = append(slices.Clone(common), fleetFlags[0], "unix://…/redis.sock", fleetFlags[2], "…/fleet.key")

	reqs := make([]*tokendv1.GetTokenRequest, o.fleetKeys)
	for i := range reqs {
		reqs[i] = &tokendv1.GetTokenRequest{CompanyId: fmt.Sprintf("biz_f%05d", i), ScopedActions: benchScopes, MinTtl: noMinTTL}
	}

	// First the fleet beside a single host under the same load, through
	// every phase; then the hosts alone, which need no Redis and mint 8
	// times as much: run beside the fleet, their load on this machine's
	// two cores would slow the fleet's Redis calls past their timeout.
	single, fl := &fleetLoad{name: "single"}, &fleetLoad{name: "fleet", verify: true}
	for _, c := range []*fleetLoad{single, fl} {
		n, flags := 1, slices.Clone(common)
		if c == fl {
			n, flags = o.fleetHosts, append(flags, fleetFlags...)
		}
		err := b.startFleetLoad(ctx, c, n, flags)
		defer c.done()
		if err != nil {
			return rep, err
		}
	}
	b.logf("fleet: %d keys over %d hosts of a fleet and one single host, token lifetime %v, redis-server on %s", o.fleetKeys, o.fleetHosts, L, rs.Socket)
	stopLoad := runFleetLoad(ctx, []*fleetLoad{single, fl}, reqs, o.fleetHosts)
	defer stopLoad()
	if err := sleep(ctx, L/2); err != nil { // every key minted and spread
		return rep, err
	}
	phase := func(name string, d time.Duration, configs ...*fleetLoad) (fleetPhase, error) {
		ph := fleetPhase{Name: name}
		before := snapshot(configs)
		var st0 []*tokendv1.FleetStatus
		if configs[len(configs)-1] == fl {
			st0, _ = statuses(ctx, fl.hosts)
		}
		t0 := time.Now()
		err := sleep(ctx, d)
		slowest := time.Duration(configs[len(configs)-1].slowest.Load())
		after := snapshot(configs)
		ph.fill(before, after, time.Since(t0), L, o.fleetKeys)
		last := configs[len(configs)-1].name
		ph.HostRequests, ph.SlowestMs = after[last][1]-before[last][1], round(float64(slowest)/1e6, 1)
		if st0 != nil {
			st1, serr := statuses(ctx, fl.hosts)
			if serr != nil {
				return ph, serr
			}
			for i := range st1 {
				ph.RedisErrors += st1[i].GetRedisErrors() - st0[i].GetRedisErrors()
				ph.Degraded += st1[i].GetDegraded() - st0[i].GetDegraded()
				ph.Adopted += st1[i].GetAdopted() - st0[i].GetAdopted()
				if st1[i].GetConnected() {
					ph.ConnectedAtEnd++
				}
			}
		}
		b.logf("fleet %s (%.1fs): upstream calls per key per lifetime: single host %.3f, %d hosts alone %.3f, %d hosts with the fleet %.3f; %d requests (%s %d, slowest %.1fms), %d errors; fleet: %d adopted, %d Redis errors, %d times degraded, %d connected at the end",
			name, ph.Seconds, ph.Single, o.fleetHosts, ph.Alone, o.fleetHosts, ph.Fleet, ph.Requests, last, ph.HostRequests, ph.SlowestMs, ph.Errors, ph.Adopted, ph.RedisErrors, ph.Degraded, ph.ConnectedAtEnd)
		return ph, err
	}
	for _, step := range []struct {
		name string
		d    time.Duration
		then func() error
	}{
		{"steady", 2 * L, func() error { rs.Kill(); return nil }},
		{"redis down", L, func() error {
			// The hosts rejoin by themselves; the last phase starts once
			// they all say so.
			if err := rs.Restart(); err != nil {
				return err
			}
			var err error
			rep.Rejoined, err = waitConnected(ctx, fl.hosts, 30*time.Second)
			b.logf("fleet: redis-server restarted; every host connected again after %.2fs", rep.Rejoined)
			return err
		}},
		{"redis back", L, nil},
	} {
		ph, err := phase(step.name, step.d, single, fl)
		rep.Phases = append(rep.Phases, ph)
		if err != nil {
			return rep, err
		}
		if step.then != nil {
			if err := step.then(); err != nil {
				return rep, err
			}
		}
	}
	stopLoad()
	rep.Errors, rep.BadTokens, rep.FirstError, rep.FirstBad = fl.errs.Load(), fl.bad.Load(), fl.firstErr, fl.firstBad
	rep.Stalled = fl.stalled.Load()
	rep.OtherErrors = single.errs.Load()
	sts, err := statuses(ctx, fl.hosts)
	if err != nil {
		return rep, err
	}
	for _, st := range sts {
		rep.Tampered += st.GetTampered()
	}
	if rep.Errors+rep.Stalled > 0 {
		rep.HostLog = warnings(fl.hosts, 20)
	}
	for _, c := range []*fleetLoad{single, fl} {
		if err := c.stop(); err != nil {
			return rep, err
		}
	}

	alone := &fleetLoad{name: "alone"}
	err = b.startFleetLoad(ctx, alone, o.fleetHosts, slices.Clone(common))
	defer alone.done()
	if err != nil {
		return rep, err
	}
	b.logf("fleet: the same load on %d hosts alone (no --fleet-redis)", o.fleetHosts)
	stopLoad = runFleetLoad(ctx, []*fleetLoad{alone}, reqs, o.fleetHosts)
	if err := sleep(ctx, L/2); err != nil {
		stopLoad()
		return rep, err
	}
	ph, err := phase("steady", L, alone)
	stopLoad()
	rep.AloneSteady = ph
	rep.OtherErrors += alone.errs.Load()
	if err != nil {
		return rep, err
	}
	if err := alone.stop(); err != nil {
		return rep, err
	}
	rep.Phases[0].Alone, rep.Phases[0].AloneCalls = ph.Alone, ph.AloneCalls
	// A fresh Redis and hosts with tokend's default lifetime (an hour), so
	// that no refresh falls in what follows.
	if err := rs.Restart(); err != nil {
		return rep, err
	}
	rep.Adopt, rep.RateLimit, err = b.fleetBudget(ctx, fl.fake, fleetFlags)
	return rep, err
}

// startFleetLoad gives c its own fake upstream and n hosts with flags,
// each with one connection.
func (b *bench) startFleetLoad(ctx context.Context, c *fleetLoad, n int, flags []string) error {
	var err error
	if c.fake, err = whoptest.NewServer(whoptest.Config{Keys: map[string][]string{b.apiKey: nil}}); err != nil {
		return err
	}
	for i := range n {
		p, _, err := b.startTokendOn(c.fake, fmt.Sprintf("fl-%s-%d", c.name, i), slices.Clone(flags), true)
		if err != nil {
			return err
		}
		c.hosts = append(c.hosts, p)
	}
	var conns []func()
	c.close = func() {
		for _, f := range conns {
			f()
		}
	}
	for _, p := range c.hosts {
		if _, err := p.waitReady(ctx, fleetReady(slices.Contains(flags, "--fleet-redis"))); err != nil {
			return err
		}
		cl, closeC, err := connect(p.socket, 1)
		if err != nil {
			return err
		}
		conns = append(conns, closeC)
		c.clients = append(c.clients, cl[0])
	}
	return nil
}

// stop closes c's connections and stops its hosts; the fake stays up for
// its counters and Verify until the bench ends. It is safe to call more
// than once.
func (c *fleetLoad) stop() error {
	if c.close != nil {
		c.close()
		c.close = nil
	}
	var errs []error
	for _, p := range c.hosts {
		errs = append(errs, p.stop())
	}
	return errors.Join(errs...)
}

// done stops c and closes its fake upstream.
func (c *fleetLoad) done() {
	c.stop()
	if c.fake != nil {
		c.fake.Close()
	}
}

// runFleetLoad starts fleetWorkers callers on each configuration; the
// returned function stops them and waits (it may be called again).
func runFleetLoad(ctx context.Context, configs []*fleetLoad, reqs []*tokendv1.GetTokenRequest, hosts int) (stop func()) {
	lctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, c := range configs {
		for range fleetWorkers {
			wg.Go(func() { c.load(lctx, reqs, hosts) })
		}
	}
	return func() { cancel(); wg.Wait() }
}

// fleetReady: health SERVING and, for a host of the fleet, connected.
func fleetReady(inFleet bool) func(context.Context, *grpc.ClientConn) error {
	return func(ctx context.Context, conn *grpc.ClientConn) error {
		if err := daemontest.HealthServing(ctx, conn); err != nil || !inFleet {
			return err
		}
		st, err := tokendv1.NewAdminServiceClient(conn).GetStatus(ctx, &tokendv1.GetStatusRequest{})
		if err == nil && !st.GetFleet().GetConnected() {
			err = fmt.Errorf("fleet not connected: %s", st.GetFleet().GetReason())
		}
		return err
	}
}

// load sends GetToken as soon as the last answer came, for the next (key,
// host) pair of a random order of them all that the configuration's
// workers share: requests spread uniformly at random, and every host sees
// every key within one walk, so no entry goes idle for want of callers as
// long as a walk takes less than a lifetime. A single host gets the same
// stream.
func (c *fleetLoad) load(ctx context.Context, reqs []*tokendv1.GetTokenRequest, hosts int) {
	for ctx.Err() == nil {
		p := c.nextPair(len(reqs) * hosts)
		req, client := reqs[p/hosts], c.clients[(p%hosts)%len(c.clients)]
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		t0 := time.Now()
		tok, err := client.GetToken(cctx, req)
		took := int64(time.Since(t0))
		cancel()
		if ctx.Err() != nil {
			// Cut off by the end of the load: a call that had waited
			// more than a second by then is counted, not dropped.
			if took > int64(time.Second) {
				c.stalled.Add(1)
			}
			return
		}
		for old := c.slowest.Load(); took > old && !c.slowest.CompareAndSwap(old, took); old = c.slowest.Load() {
		}
		c.requests.Add(1)
		if err != nil {
			c.errs.Add(1)
			c.note(&c.firstErr, err.Error())
			continue
		}
		if !c.verify {
			continue
		}
		// Signed by this upstream, unexpired, for the key asked for:
		// neither stale nor another key's token.
		if cl, err := c.fake.Verify(tok.GetToken()); err != nil {
			c.bad.Add(1)
			c.note(&c.firstBad, err.Error())
		} else if cl.CompanyID != req.CompanyId {
			c.bad.Add(1)
			c.note(&c.firstBad, "token of "+cl.CompanyID+" served for "+req.CompanyId)
		}
	}
}

// nextPair is the next pair of the walk, starting a new random walk of
// the pairs once one ends.
func (c *fleetLoad) nextPair(pairs int) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.next == len(c.walk) {
		c.walk, c.next = mrand.Perm(pairs), 0
	}
	c.next++
	return c.walk[c.next-1]
}

func (c *fleetLoad) note(first *string, msg string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if *first == "" {
		*first = msg
	}
}

// counters are each configuration's upstream calls, requests and errors,
// by its name.
type counters map[string][3]int64

func snapshot(configs []*fleetLoad) counters {
	s := counters{}
	for _, c := range configs {
		c.slowest.Store(0)
		s[c.name] = [3]int64{int64(c.fake.CallCount()), c.requests.Load(), c.errs.Load()}
	}
	return s
}

// fill turns the counters around a phase into upstream calls per key per
// token lifetime of each configuration that ran.
func (ph *fleetPhase) fill(a, b counters, d, lifetime time.Duration, keys int) {
	ph.Seconds, ph.Lifetimes = round(d.Seconds(), 2), round(d.Seconds()/lifetime.Seconds(), 2)
	for name, after := range b {
		before := a[name]
		calls := after[0] - before[0]
		per := round(float64(calls)/float64(keys)/(d.Seconds()/lifetime.Seconds()), 3)
		switch name {
		case "single":
			ph.Single, ph.SingleCalls = per, calls
		case "alone":
			ph.Alone, ph.AloneCalls = per, calls
		case "fleet":
			ph.Fleet, ph.FleetCalls = per, calls
		}
		ph.Requests += after[1] - before[1]
		ph.Errors += after[2] - before[2]
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-time.After(d):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func statuses(ctx context.Context, hosts []*proc) ([]*tokendv1.FleetStatus, error) {
	var out []*tokendv1.FleetStatus
	for _, p := range hosts {
		conn, err := daemontest.Dial(p.socket)
		if err != nil {
			return nil, err
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		st, err := tokendv1.NewAdminServiceClient(conn).GetStatus(cctx, &tokendv1.GetStatusRequest{})
		cancel()
		conn.Close()
		if err != nil {
			return nil, fmt.Errorf("%s: status: %w", p.Name, err)
		}
		out = append(out, st.GetFleet())
	}
	return out, nil
}

// waitConnected waits until every host says its fleet tier is connected
// and reports how long that took.
func waitConnected(ctx context.Context, hosts []*proc, limit time.Duration) (float64, error) {
	t0 := time.Now()
	for {
		sts, err := statuses(ctx, hosts)
		if err != nil {
			return 0, err
		}
		down := 0
		for _, st := range sts {
			if !st.GetConnected() {
				down++
			}
		}
		if down == 0 {
			return round(time.Since(t0).Seconds(), 2), nil
		}
		if time.Since(t0) > limit {
			return 0, fmt.Errorf("%d of %d hosts not connected to the fleet %v after redis-server came back", down, len(hosts), limit)
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return 0, err
		}
	}
}

// adoptLatency warms fresh keys on the first host of the fleet, then asks
// every other host for each of them once: a local miss there, answered
// from Redis. Status must count each as adopted and the upstream see no
// call.
func (b *bench) adoptLatency(ctx context.Context, fl *fleetLoad) (fleetAdopt, error) {
	n := b.o.fleetAdoptKeys
	rep := fleetAdopt{Keys: n, Hosts: len(fl.hosts) - 1}
	// The upstream sees the warm-up's calls only: a host that minted
	// instead of adopting would add to them.
	reqs := make([]*tokendv1.GetTokenRequest, n)
	for i := range reqs {
		reqs[i] = &tokendv1.GetTokenRequest{CompanyId: fmt.Sprintf("biz_fa%05d", i), ScopedActions: benchScopes, MinTtl: noMinTTL}
		if _, err := warm(ctx, fl.clients[0], reqs[i]); err != nil {
			return rep, fmt.Errorf("warm %s on %s: %w", reqs[i].CompanyId, fl.hosts[0].Name, err)
		}
	}
	before, err := statuses(ctx, fl.hosts)
	if err != nil {
		return rep, err
	}
	b.logf("fleet: %d keys minted on %s; asking the %d other hosts for each", n, fl.hosts[0].Name, rep.Hosts)
	calls0 := fl.fake.CallCount()
	pass := func() loadResult {
		var lat []time.Duration
		var res loadResult
		for _, client := range fl.clients[1:] {
			for _, req := range reqs {
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				t0 := time.Now()
				_, err := client.GetToken(cctx, req)
				d := time.Since(t0)
				cancel()
				if err != nil {
					res.addError(err)
					continue
				}
				lat = append(lat, d)
			}
		}
		var total time.Duration
		for _, d := range lat {
			total += d
		}
		summarize(&res, lat, total)
		return res
	}
	rep.Result = pass()
	rep.UpstreamCalls = fl.fake.CallCount() - calls0
	after, err := statuses(ctx, fl.hosts)
	if err != nil {
		return rep, err
	}
	for i := 1; i < len(fl.hosts); i++ {
		rep.Adopted += int(after[i].GetAdopted() - before[i].GetAdopted())
	}
	// The same calls again are hits: what this machine gives any call
	// over gRPC at the moment, to read the misses' figures against.
	rep.Hits = pass()
	return rep, nil
}

// fleetBudget starts hosts of a fleet whose --upstream-rate and
// --upstream-burst are the fleet's budget. It times a local miss answered
// from Redis on them, then asks each for its own cold keys at once and
// counts what reached the upstream in every 1 s window.
func (b *bench) fleetBudget(ctx context.Context, fake *whoptest.Server, fleetFlags []string) (fleetAdopt, fleetRate, error) {
	o := b.o
	rep := fleetRate{Hosts: o.fleetHosts, KeysPerHost: o.fleetColdKeys, Rate: o.fleetRate, Burst: o.fleetBurst}
	limits := limitFlags(o.fleetRate, o.fleetBurst, 8)
	rep.TokendFlags = limits
	fl := &fleetLoad{name: "budget", fake: fake}
	for i := range o.fleetHosts {
		p, _, err := b.startTokendOn(fake, "fl-budget-"+strconv.Itoa(i), append(slices.Clone(limits), fleetFlags...), true)
		if err != nil {
			return fleetAdopt{}, rep, err
		}
		fl.hosts = append(fl.hosts, p)
	}
	defer func() {
		for _, p := range fl.hosts {
			p.stop()
		}
	}()
	type hostLoad struct {
		clients []tokendv1.TokenServiceClient
		reqs    []*tokendv1.GetTokenRequest
	}
	loads := make([]hostLoad, len(fl.hosts))
	for h, p := range fl.hosts {
		if _, err := p.waitReady(ctx, fleetReady(true)); err != nil {
			return fleetAdopt{}, rep, err
		}
		clients, closeC, err := connect(p.socket, missConns)
		if err != nil {
			return fleetAdopt{}, rep, err
		}
		defer closeC()
		if err := warmConns(ctx, clients); err != nil {
			return fleetAdopt{}, rep, err
		}
		loads[h].clients = clients
		fl.clients = append(fl.clients, clients[0])
		for i := range o.fleetColdKeys {
			loads[h].reqs = append(loads[h].reqs, &tokendv1.GetTokenRequest{CompanyId: fmt.Sprintf("biz_fr%d_%05d", h, i), ScopedActions: benchScopes, MinTtl: noMinTTL})
		}
	}
	adopt, err := b.adoptLatency(ctx, fl)
	if err != nil {
		return adopt, rep, err
	}
	// The budget refills before the burst.
	if err := sleep(ctx, time.Duration(float64(o.fleetBurst)/o.fleetRate*float64(time.Second))+100*time.Millisecond); err != nil {
		return adopt, rep, err
	}
	before, err := statuses(ctx, fl.hosts)
	if err != nil {
		return adopt, rep, err
	}
	total := o.fleetHosts * o.fleetColdKeys
	bound := limiterBound(total, o.fleetRate, o.fleetBurst, 1<<30, 0)
	rep.LimiterBoundSeconds = bound.Seconds()
	b.logf("fleet rate limit: %d hosts x %d cold keys at once under a fleet budget of %g/s, burst %d (about %.1fs)", o.fleetHosts, o.fleetColdKeys, o.fleetRate, o.fleetBurst, bound.Seconds())
	fake.ResetCounters()
	results := make([]loadResult, len(loads))
	var wg sync.WaitGroup
	t0 := time.Now()
	for h := range loads {
		wg.Go(func() { results[h] = burst(ctx, loads[h].clients, loads[h].reqs, 2*bound+time.Minute) })
	}
	wg.Wait()
	rep.Seconds = round(time.Since(t0).Seconds(), 3)
	for _, r := range results {
		rep.Requests += r.Requests
		rep.Errors += r.Errors
		if rep.FirstError == "" {
			rep.FirstError = r.FirstError
		}
	}
	calls := fake.Calls()
	rep.UpstreamCalls = len(calls)
	at := make([]time.Time, len(calls))
	for i, c := range calls {
		at[i] = c.At
	}
	rep.MaxPerSecond, rep.SustainedPerSecond = windowRates(at, o.fleetBurst)
	after, err := statuses(ctx, fl.hosts)
	if err != nil {
		return adopt, rep, err
	}
	for i := range after {
		rep.RateLimited += after[i].GetRateLimited() - before[i].GetRateLimited()
		rep.RedisErrors += after[i].GetRedisErrors() - before[i].GetRedisErrors()
		if !after[i].GetConnected() {
			rep.Disconnected++
		}
	}
	return adopt, rep, ctx.Err()
}

// windowRates is the most calls in any 1 s window starting at a call, and
// the rate beyond the first burst calls from the first call to the last.
func windowRates(at []time.Time, burst int) (most int, sustained float64) {
	slices.SortFunc(at, func(a, b time.Time) int { return a.Compare(b) })
	j := 0
	for i := range at {
		for j < len(at) && at[j].Sub(at[i]) < time.Second {
			j++
		}
		most = max(most, j-i)
	}
	if len(at) > burst+1 {
		if span := at[len(at)-1].Sub(at[0]).Seconds(); span > 0 {
			sustained = round(float64(len(at)-burst)/span, 1)
		}
	}
	return most, sustained
}

// warnings are the last n warning and error lines of the hosts' logs
// (tokend logs no token or key), each prefixed with its host, to say why a
// caller failed.
func warnings(hosts []*proc, n int) []string {
	var out []string
	for _, p := range hosts {
		for line := range strings.SplitSeq(p.Out.String(), "\n") {
			if strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") {
				out = append(out, p.Name+": "+line)
			}
		}
	}
	return out[max(len(out)-n, 0):]
}

// redisServerFound reports whether the fleet section can run.
func redisServerFound() error {
	if _, err := exec.LookPath("redis-server"); err != nil {
		return errNoRedis
	}
	return nil
}
