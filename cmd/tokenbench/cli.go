package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"
)

// options are the command line of a benchmark run.
type options struct {
	tokend   string
	jsonPath string
	quick    bool

	keys          int
	duration      time.Duration
	warmup        time.Duration
	missCallers   int
	upstreamDelay time.Duration
	missRate      float64
	missBurst     int
	missInFlight  int
	entries       int
	idle          time.Duration
	writeRecords  int
	tokendFlags   []string
	rounds        int
	// sections are the parts to run, a subset of allSections.
	sections map[string]bool
}

// allSections are the benchmark's parts, in the order they run.
var allSections = []string{"hits", "misses", "scale", "writes"}

// run is the whole command: the hidden floor-server subcommand, or a
// benchmark run. It returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == floorCommand {
		if err := runFloor(ctx, args[1:], stderr); err != nil {
			fmt.Fprintf(stderr, "tokenbench %s: %v\n", floorCommand, err)
			return 1
		}
		return 0
	}
	o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "tokenbench: %v\n", err)
		return 2
	}
	rep, err := benchmark(ctx, o, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "tokenbench: %v\n", err)
		return 1
	}
	printReport(stdout, rep)
	if err := writeJSON(o.jsonPath, rep); err != nil {
		fmt.Fprintf(stderr, "tokenbench: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "\nJSON summary written to %s\n", o.jsonPath)
	return 0
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("tokenbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: go run ./cmd/tokenbench [flags]\n\n"+
			"Runs tokend and a bare gRPC server (the transport's floor) on Unix sockets\n"+
			"against a fake Whop upstream, and measures hits, misses, start-up at scale,\n"+
			"idle cost and write batching. Prints a table and writes a JSON summary.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	fs.StringVar(&o.tokend, "tokend", "", "tokend binary to benchmark (default: go build ./cmd/tokend into a temporary directory)")
	fs.StringVar(&o.jsonPath, "json", "tokenbench.json", "where to write the machine-readable summary")
	fs.BoolVar(&o.quick, "quick", false, "short run for tests: 300ms per hit point, 3s idle, 10,000 entries (explicit flags still win)")
	fs.IntVar(&o.keys, "keys", 64, "warm keys the hit load cycles through")
	fs.DurationVar(&o.duration, "duration", 3*time.Second, "measured duration of each hit point")
	fs.DurationVar(&o.warmup, "warmup", 500*time.Millisecond, "unmeasured load before each hit point")
	fs.IntVar(&o.rounds, "rounds", 3, "alternating rounds per hit point: tokend and the floor take turns, each for --duration/rounds")
	fs.IntVar(&o.missCallers, "miss-callers", 1000, "concurrent callers in each miss test")
	fs.DurationVar(&o.upstreamDelay, "upstream-latency", 20*time.Millisecond, "latency of the fake Whop upstream during the miss tests")
	fs.Float64Var(&o.missRate, "miss-upstream-rate", 200, "tokend --upstream-rate for the distinct-keys miss test (tokend's default is 10)")
	fs.IntVar(&o.missBurst, "miss-upstream-burst", 50, "tokend --upstream-burst for the distinct-keys miss test (tokend's default is 20)")
	fs.IntVar(&o.missInFlight, "miss-upstream-max-inflight", 4, "tokend --upstream-max-inflight for the distinct-keys miss test (tokend's default is 4)")
	fs.IntVar(&o.entries, "entries", 100_000, "entries pre-loaded into the database for the scale test")
	fs.DurationVar(&o.idle, "idle-duration", 30*time.Second, "how long to watch an idle tokend's CPU time")
	fs.IntVar(&o.writeRecords, "writes", 10_000, "records persisted in the write test")
	sections := fs.String("sections", strings.Join(allSections, ","), "comma-separated parts to run: "+strings.Join(allSections, ", "))
	fs.Func("tokend-flag", "extra flag for every tokend started, as --tokend-flag=--name=value; repeatable", func(v string) error {
		if !strings.HasPrefix(v, "-") {
			return fmt.Errorf("%q is not a flag; write --tokend-flag=--name=value", v)
		}
		o.tokendFlags = append(o.tokendFlags, v)
		return nil
	})
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q; tokenbench takes flags only (see -h)", fs.Arg(0))
	}
	o.sections = map[string]bool{}
	for name := range strings.SplitSeq(*sections, ",") {
		if name = strings.TrimSpace(name); !slices.Contains(allSections, name) {
			return o, fmt.Errorf("--sections: unknown part %q; choose from %s", name, strings.Join(allSections, ", "))
		}
		o.sections[name] = true
	}
	if o.quick {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		quick := map[string]func(){
			"duration":      func() { o.duration = 300 * time.Millisecond },
			"warmup":        func() { o.warmup = 100 * time.Millisecond },
			"idle-duration": func() { o.idle = 3 * time.Second },
			"entries":       func() { o.entries = 10_000 },
		}
		for name, apply := range quick {
			if !set[name] {
				apply()
			}
		}
	}
	switch {
	case o.keys < 1 || o.rounds < 1 || o.missCallers < 1 || o.entries < 1 || o.writeRecords < 1:
		return o, errors.New("--keys, --miss-callers, --entries and --writes must be positive")
	case o.duration <= 0 || o.warmup < 0 || o.idle <= 0 || o.upstreamDelay < 0:
		return o, errors.New("--duration and --idle-duration must be positive, --warmup and --upstream-latency not negative")
	case o.missRate <= 0 || o.missBurst < 1 || o.missInFlight < 1:
		return o, errors.New("--miss-upstream-rate, --miss-upstream-burst and --miss-upstream-max-inflight must be positive")
	}
	if o.tokend != "" {
		if _, err := os.Stat(o.tokend); err != nil {
			return o, fmt.Errorf("--tokend: %w", err)
		}
	}
	return o, nil
}
