package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/tokend/tokend/internal/daemontest"
	"github.com/tokend/tokend/internal/whop/whoptest"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// hitPoints are the (concurrency, connections) pairs of the hit test. One
// caller over four connections would use only the first, so it is left out.
var hitPoints = [][2]int{{1, 1}, {16, 1}, {16, 4}, {64, 1}, {64, 4}}

// missConns is how many connections the miss tests spread callers over.
const missConns = 4

// bench is one run: its temporary directory, the binaries, the fake
// upstream and the processes to stop at the end.
type bench struct {
	o        options
	progress io.Writer
	dir      string
	tokend   string
	self     string
	fake     *whoptest.Server
	apiKey   string
	keyFile  string
	procs    []*proc
	// answer is one of tokend's real answers: the floor returns it and the
	// scale test copies its token's size.
	answer *tokendv1.Token
	// hitsTokend serves the hit test and then the one-cold-key test.
	hitsTokend *proc
	hitsFlags  []string
	hitReqs    []*tokendv1.GetTokenRequest // the warm keys
	// missLimitFlags raise tokend's per-caller limit on cache misses, when
	// the binary has flags for it; missLimitNote says what applied.
	missLimitFlags []string
	missLimitNote  string
}

// benchmark runs every section and returns the report.
func benchmark(ctx context.Context, o options, progress io.Writer) (*Report, error) {
	dir, err := os.MkdirTemp("", "tokenbench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	b := &bench{o: o, progress: progress, dir: dir}
	defer b.stopAll()
	rep := newReport(o)
	if err := b.setup(); err != nil {
		return nil, err
	}
	defer b.fake.Close()
	if err := b.prepare(ctx); err != nil {
		return nil, fmt.Errorf("hits: %w", err)
	}
	if o.sections["hits"] {
		if rep.Hits, err = b.hits(ctx); err != nil {
			return nil, fmt.Errorf("hits: %w", err)
		}
	}
	if o.sections["misses"] {
		if rep.Misses, err = b.misses(ctx); err != nil {
			return nil, fmt.Errorf("misses: %w", err)
		}
	}
	if o.sections["scale"] {
		if rep.Scale, err = b.scale(ctx); err != nil {
			return nil, fmt.Errorf("scale: %w", err)
		}
	}
	if o.sections["writes"] {
		b.logf("writes: persisting %d records in one Flush", o.writeRecords)
		wdir := filepath.Join(dir, "writes")
		if rep.Writes, err = measureWrites(wdir, o.writeRecords, b.answer.GetToken()); err != nil {
			return nil, fmt.Errorf("writes: %w", err)
		}
	}
	rep.evaluate(o.sections)
	return rep, nil
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.progress, "tokenbench: "+format+"\n", args...)
}

// setup builds tokend unless given, starts the fake upstream and writes the
// API key file.
func (b *bench) setup() error {
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own binary for the floor server: %w", err)
	}
	b.self = self
	b.tokend = b.o.tokend
	if b.tokend == "" {
		root, err := moduleRoot()
		if err != nil {
			return err
		}
		b.tokend = filepath.Join(b.dir, "tokend")
		b.logf("building tokend (go build ./cmd/tokend)")
		cmd := exec.Command("go", "build", "-o", b.tokend, "./cmd/tokend")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build ./cmd/tokend: %v\n%s", err, out)
		}
	}
	kb := make([]byte, 16)
	rand.Read(kb)
	b.apiKey = "whop_bench_" + hex.EncodeToString(kb)
	b.keyFile = filepath.Join(b.dir, "api-key")
	if err := os.WriteFile(b.keyFile, []byte(b.apiKey), 0o600); err != nil {
		return err
	}
	if err := b.detectMissLimit(); err != nil {
		return err
	}
	b.fake, err = whoptest.NewServer(whoptest.Config{Keys: map[string][]string{b.apiKey: nil}})
	return err
}

// detectMissLimit looks in tokend -h for flags of a per-caller (uid) limit
// on cache misses. All callers of the benchmark share one uid, so such a
// limit would refuse most of the miss tests' callers and the hit test's
// warm-up; where tokend lets it be raised, it is, and the report says so.
func (b *bench) detectMissLimit() error {
	out, _ := exec.Command(b.tokend, "-h").CombinedOutput()
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], "-") {
			continue
		}
		name := strings.TrimLeft(f[0], "-")
		if strings.HasPrefix(name, "miss-") && strings.Contains(name, "uid") {
			names = append(names, name)
			value := "1000000"
			if strings.Contains(name, "burst") {
				value = "100000"
			}
			b.missLimitFlags = append(b.missLimitFlags, "--"+name, value)
		}
	}
	if !strings.Contains(string(out), "-socket") {
		return fmt.Errorf("%s -h does not list tokend's flags:\n%s", b.tokend, out)
	}
	if len(names) == 0 {
		b.missLimitNote = "tokend has no flag for a per-uid miss limit; if it has one, its default applies"
	} else {
		b.missLimitNote = "raised for the hit and miss tests: " + strings.Join(b.missLimitFlags, " ")
	}
	return nil
}

// moduleRoot is the directory of the go.mod of the current directory's
// module, which must be tokend's.
func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	gomod := strings.TrimSpace(string(out))
	if err != nil || gomod == "" || gomod == os.DevNull {
		return "", errors.New("cannot find the tokend module to build tokend: run tokenbench from the repository, or pass --tokend PATH")
	}
	return filepath.Dir(gomod), nil
}

func (b *bench) stopAll() {
	for _, p := range b.procs {
		if err := p.stop(); err != nil {
			b.logf("%v", err)
		}
	}
}

// startTokend starts tokend named name on its own socket and state
// directory; limits are tokend's --upstream-* flags, nil for its defaults.
// It returns the process and the flags that differ between runs.
func (b *bench) startTokend(name string, limits []string, raiseMissLimit bool) (*proc, []string, error) {
	socket := filepath.Join(b.dir, name+".sock")
	args := []string{
		"--socket", socket,
		"--state-dir", filepath.Join(b.dir, name+"-state"),
		"--api-key-file", b.keyFile,
		"--whop-url", b.fake.URL(),
	}
	if raiseMissLimit {
		limits = append(limits, b.missLimitFlags...)
	}
	limits = append(limits, b.o.tokendFlags...)
	args = append(args, limits...)
	p, err := startProc("tokend ("+name+")", socket, b.tokend, args...)
	if err != nil {
		return nil, nil, err
	}
	b.procs = append(b.procs, p)
	shown := limits
	if len(shown) == 0 {
		shown = []string{"(tokend's defaults)"}
	}
	return p, shown, nil
}

func limitFlags(rate float64, burst, inFlight int) []string {
	return []string{
		"--upstream-rate", strconv.FormatFloat(rate, 'f', -1, 64),
		"--upstream-burst", strconv.Itoa(burst),
		"--upstream-max-inflight", strconv.Itoa(inFlight),
	}
}

// connect opens n connections to socket.
func connect(socket string, n int) ([]tokendv1.TokenServiceClient, func(), error) {
	var conns []*grpc.ClientConn
	closeAll := func() {
		for _, c := range conns {
			c.Close()
		}
	}
	clients := make([]tokendv1.TokenServiceClient, n)
	for i := range clients {
		c, err := daemontest.Dial(socket)
		if err != nil {
			closeAll()
			return nil, nil, err
		}
		conns = append(conns, c)
		clients[i] = tokendv1.NewTokenServiceClient(c)
	}
	return clients, closeAll, nil
}

// prepare starts the tokend of the hit and one-cold-key tests and warms
// its keys; every section needs one of its real answers.
func (b *bench) prepare(ctx context.Context) error {
	o := b.o
	// Limits out of the way: the hit test must not wait on the limiter
	// while warming keys.
	tk, flags, err := b.startTokend("hits", limitFlags(1e6, 100_000, 256), true)
	if err != nil {
		return err
	}
	b.hitsTokend, b.hitsFlags = tk, flags
	if _, err := tk.waitReady(ctx, daemontest.HealthServing); err != nil {
		return err
	}
	reqs := make([]*tokendv1.GetTokenRequest, o.keys)
	for i := range reqs {
		reqs[i] = &tokendv1.GetTokenRequest{CompanyId: fmt.Sprintf("biz_h%05d", i), ScopedActions: benchScopes}
	}
	clients, closeWarm, err := connect(tk.socket, 1)
	if err != nil {
		return err
	}
	b.logf("hits: warming %d keys", o.keys)
	for i, req := range reqs {
		tok, err := warm(ctx, clients[0], req)
		if err != nil {
			closeWarm()
			return fmt.Errorf("warm %s: %w", req.CompanyId, err)
		}
		if i == 0 {
			b.answer = tok
		}
	}
	closeWarm()
	b.hitReqs = reqs
	return nil
}

func (b *bench) hits(ctx context.Context) (hitsReport, error) {
	o, reqs, tk, flags := b.o, b.hitReqs, b.hitsTokend, b.hitsFlags
	rep := hitsReport{Keys: o.keys, Seconds: o.duration.Seconds(), WarmupSeconds: o.warmup.Seconds(), Rounds: o.rounds, AnswerBytes: proto.Size(b.answer), TokendFlags: flags}

	answerFile := filepath.Join(b.dir, "answer.pb")
	ab, err := proto.Marshal(b.answer)
	if err != nil {
		return rep, err
	}
	if err := os.WriteFile(answerFile, ab, 0o600); err != nil {
		return rep, err
	}
	floorSocket := filepath.Join(b.dir, "floor.sock")
	floor, err := startProc("floor server", floorSocket, b.self, floorCommand, "--socket", floorSocket, "--answer", answerFile)
	if err != nil {
		return rep, err
	}
	b.procs = append(b.procs, floor)
	defer floor.stop()
	if _, err := floor.waitReady(ctx, func(ctx context.Context, conn *grpc.ClientConn) error {
		tok, err := tokendv1.NewTokenServiceClient(conn).GetToken(ctx, reqs[0])
		if err == nil && proto.Size(tok) != rep.AnswerBytes {
			err = fmt.Errorf("floor answers %d bytes, tokend %d", proto.Size(tok), rep.AnswerBytes)
		}
		return err
	}); err != nil {
		return rep, err
	}

	callsBefore := b.fake.CallCount()
	for _, pt := range hitPoints {
		conc, nconns := pt[0], pt[1]
		point := hitPoint{Concurrency: conc, Connections: nconns}
		tClients, closeT, err := connect(tk.socket, nconns)
		if err != nil {
			return rep, err
		}
		fClients, closeF, err := connect(floor.socket, nconns)
		if err != nil {
			closeT()
			return rep, err
		}
		point.Tokend, point.Floor = compare(ctx, loadTarget{tClients, tk.Pid()}, loadTarget{fClients, floor.Pid()}, reqs, conc, o.warmup, o.duration, o.rounds)
		closeT()
		closeF()
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		point.ratios()
		b.logf("hits c=%d conns=%d: tokend %.0f rps p50 %.1fµs p99 %.1fµs; floor %.0f rps p50 %.1fµs p99 %.1fµs; ratio rps %.3f",
			conc, nconns, point.Tokend.RPS, point.Tokend.P50us, point.Tokend.P99us, point.Floor.RPS, point.Floor.P50us, point.Floor.P99us, point.RatioRPS)
		rep.Points = append(rep.Points, point)
	}
	rep.UpstreamCalls = b.fake.CallCount() - callsBefore
	return rep, nil
}

func (b *bench) misses(ctx context.Context) (missesReport, error) {
	o := b.o
	rep := missesReport{UpstreamLatencyMs: float64(o.upstreamDelay.Microseconds()) / 1000, PerUIDMissLimit: b.missLimitNote}
	b.fake.SetLatency(o.upstreamDelay)
	defer b.fake.SetLatency(0)

	// One cold key, many callers: singleflight must make it one call.
	b.logf("misses: %d concurrent callers on one cold key", o.missCallers)
	clients, closeAll, err := connect(b.hitsTokend.socket, missConns)
	if err != nil {
		return rep, err
	}
	if err := warmConns(ctx, clients); err != nil {
		closeAll()
		return rep, err
	}
	one := &tokendv1.GetTokenRequest{CompanyId: "biz_cold_one", ScopedActions: benchScopes}
	reqs := make([]*tokendv1.GetTokenRequest, o.missCallers)
	for i := range reqs {
		reqs[i] = one
	}
	b.fake.ResetCounters()
	res := burst(ctx, clients, reqs, 2*time.Minute)
	closeAll()
	rep.OneKey = missTest{
		Callers: o.missCallers, Keys: 1, Result: res,
		UpstreamCalls:       b.fake.CallsFor("biz_cold_one"),
		UpstreamMaxInFlight: b.fake.MaxInFlight(),
		TokendFlags:         b.hitsFlags,
	}
	if err := b.hitsTokend.stop(); err != nil {
		return rep, err
	}

	// Distinct cold keys: as fast as the limiter allows, no errors.
	limits := limitFlags(o.missRate, o.missBurst, o.missInFlight)
	tk, flags, err := b.startTokend("misses", limits, true)
	if err != nil {
		return rep, err
	}
	defer tk.stop()
	if _, err := tk.waitReady(ctx, daemontest.HealthServing); err != nil {
		return rep, err
	}
	if clients, closeAll, err = connect(tk.socket, missConns); err != nil {
		return rep, err
	}
	defer closeAll()
	if err := warmConns(ctx, clients); err != nil {
		return rep, err
	}
	for i := range reqs {
		reqs[i] = &tokendv1.GetTokenRequest{CompanyId: fmt.Sprintf("biz_c%05d", i), ScopedActions: benchScopes}
	}
	bound := limiterBound(o.missCallers, o.missRate, o.missBurst, o.missInFlight, o.upstreamDelay)
	b.logf("misses: %d concurrent callers on %d distinct cold keys, %s (the limiter allows about %.1fs)", o.missCallers, o.missCallers, strings.Join(flags, " "), bound.Seconds())
	b.fake.ResetCounters()
	res = burst(ctx, clients, reqs, 2*bound+time.Minute)
	rep.DistinctKeys = missTest{
		Callers: o.missCallers, Keys: o.missCallers, Result: res,
		UpstreamCalls:       b.fake.CallCount(),
		UpstreamMaxInFlight: b.fake.MaxInFlight(),
		TokendFlags:         flags,
		LimiterBoundSeconds: bound.Seconds(),
	}
	return rep, ctx.Err()
}

// warm gets a token for req, waiting out a miss limit (ResourceExhausted)
// that tokend may apply per caller.
func warm(ctx context.Context, client tokendv1.TokenServiceClient, req *tokendv1.GetTokenRequest) (*tokendv1.Token, error) {
	deadline := time.Now().Add(time.Minute)
	for {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		tok, err := client.GetToken(cctx, req)
		cancel()
		if status.Code(err) != codes.ResourceExhausted || time.Now().After(deadline) {
			return tok, err
		}
		select {
		case <-time.After(100 * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// warmConns makes sure every connection is up before a timed burst. A
// GetToken without a subject is refused by validation and touches no key.
func warmConns(ctx context.Context, clients []tokendv1.TokenServiceClient) error {
	for _, c := range clients {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := c.GetToken(cctx, &tokendv1.GetTokenRequest{}, grpc.WaitForReady(true))
		cancel()
		if status.Code(err) != codes.InvalidArgument {
			return fmt.Errorf("connect: GetToken without a subject: want InvalidArgument, got %v", err)
		}
	}
	return nil
}

// limiterBound is the least time n upstream calls can take: the token
// bucket allows burst at once then rate per second, and inFlight calls of
// latency each run at a time.
func limiterBound(n int, rate float64, burst, inFlight int, latency time.Duration) time.Duration {
	byRate := time.Duration(float64(max(n-burst, 0)) / rate * float64(time.Second))
	byConcurrency := time.Duration((n + inFlight - 1) / inFlight * int(latency))
	return max(byRate, byConcurrency)
}

func (b *bench) scale(ctx context.Context) (scaleReport, error) {
	o := b.o
	rep := scaleReport{Entries: o.entries, IdleSeconds: o.idle.Seconds()}
	stateDir := filepath.Join(b.dir, "scale-state")
	path := filepath.Join(stateDir, "cache.db")
	b.logf("scale: writing %d entries to %s", o.entries, path)
	t0 := time.Now()
	tokenBytes, err := populate(path, o.entries, b.apiKey, b.answer.GetToken())
	if err != nil {
		return rep, err
	}
	rep.PopulateSeconds = time.Since(t0).Seconds()
	if fi, err := os.Stat(path); err == nil {
		rep.FileBytes = fi.Size()
	}
	b.logf("scale: measuring the Go heap of %d loaded entries in-process", o.entries)
	if rep.Heap, err = measureHeap(path, b.apiKey, b.fake.URL(), tokenBytes); err != nil {
		return rep, err
	}

	b.fake.ResetCounters()
	tk, flags, err := b.startTokend("scale", nil, false)
	if err != nil {
		return rep, err
	}
	defer tk.stop()
	rep.TokendFlags = flags
	first := &tokendv1.GetTokenRequest{CompanyId: scaleCompany(0), ScopedActions: benchScopes}
	want := uniqueToken(b.answer.GetToken(), 0)
	ready, err := tk.waitReady(ctx, func(ctx context.Context, conn *grpc.ClientConn) error {
		if err := daemontest.HealthServing(ctx, conn); err != nil {
			return err
		}
		tok, err := tokendv1.NewTokenServiceClient(conn).GetToken(ctx, first)
		if err != nil {
			return err
		}
		if tok.Token != want {
			return errors.New("GetToken on a pre-loaded key was not a hit: tokend minted a new token")
		}
		return nil
	})
	if err != nil {
		return rep, err
	}
	rep.ReadyMs = float64(ready.Microseconds()) / 1000
	mem, err := readMemStatus(tk.Pid())
	if err != nil {
		return rep, err
	}
	rep.RSSKiB, rep.RSSAnonKiB, rep.RSSFileKiB = mem.RSS, mem.Anon, mem.File

	b.logf("scale: ready in %.0fms, RSS %d KiB; watching idle CPU for %v", rep.ReadyMs, mem.RSS, o.idle)
	cpu0, err := cpuTime(tk.Pid())
	if err != nil {
		return rep, err
	}
	select {
	case <-time.After(o.idle):
	case <-ctx.Done():
		return rep, ctx.Err()
	}
	cpu1, err := cpuTime(tk.Pid())
	if err != nil {
		return rep, err
	}
	rep.IdleCPUSeconds = (cpu1 - cpu0).Seconds()
	rep.IdleCPUPer30s = rep.IdleCPUSeconds * 30 / o.idle.Seconds()
	rep.UpstreamCalls = b.fake.CallCount()
	if mem, err := readMemStatus(tk.Pid()); err == nil {
		rep.RSSAfterIdleKiB = mem.RSS
	}
	return rep, tk.stop()
}
