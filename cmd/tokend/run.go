package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/tokend/tokend/internal/daemon"
	"github.com/tokend/tokend/internal/fleet"
	"github.com/tokend/tokend/internal/gctune"
	"github.com/tokend/tokend/internal/refresher"
	"github.com/tokend/tokend/internal/server"
	"github.com/tokend/tokend/internal/whop"
)

// options are the command line; each flag falls back to an environment
// variable so units and containers can configure tokend without arguments.
type options struct {
	socket, stateDir, whopURL, apiKeyFile, logLevel string
	socketMode                                      string
	lifetime                                        time.Duration
	maxInFlight, burst                              int
	rate                                            float64
	dev                                             bool

	refreshAt                                                       float64
	retryInitial, retryMax, negativeTTL, restartSpread, upstreamTTO time.Duration
	maxEntries                                                      int
	rateLimitCooldown, keyProbeInterval                             time.Duration
	apiVersionDate                                                  string

	adminGroup, auditLog, cacheKeyFile, policyFile, metricsAddr, configFile string
	fleetRedis, fleetUser, fleetPasswordFile, fleetKeyFile                  string
	fleetLockLease                                                          time.Duration
	missRate                                                                float64
	missBurst, maxConns, maxStreams                                         int
	maxConnsPerUID, adminConnReserve                                        int
	handshakeTimeout, idleTimeout                                           time.Duration
	gcHeadroomMiB                                                           int
}

// run starts tokend; a value on reload (SIGHUP) re-reads the API key.
func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string, reload <-chan struct{}) int {
	opts, setSocket, err := parseFlags(args, stderr, getenv)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "tokend: %v\n", err)
		return 2
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(opts.logLevel)); err != nil {
		fmt.Fprintf(stderr, "tokend: --log-level %q: want debug, info, warn or error\n", opts.logLevel)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	cfg, err := buildConfig(opts, setSocket, getenv)
	if err != nil {
		fmt.Fprintf(stderr, "tokend: %v\n", err)
		return 2
	}
	// GOGC is the process's, not one daemon's: it is tuned here.
	defer gctune.Start(uint64(opts.gcHeadroomMiB) << 20).Stop()
	cfg.Logger = log
	cfg.Stdout = stdout
	cfg.Version = version
	cfg.Reload = reload
	if err := daemon.Run(ctx, cfg); err != nil {
		fmt.Fprintf(stderr, "tokend: %v\n", err)
		return 1
	}
	return 0
}

func parseFlags(args []string, stderr io.Writer, getenv func(string) string) (options, bool, error) {
	var o options
	env := func(name, def string) string {
		if v := getenv(name); v != "" {
			return v
		}
		return def
	}
	ev := &envDefaults{getenv: getenv}
	fs := flag.NewFlagSet("tokend", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.socket, "socket", env("TOKEND_SOCKET", "/run/tokend/tokend.sock"), "Unix socket to serve gRPC on (env TOKEND_SOCKET)")
	fs.StringVar(&o.socketMode, "socket-mode", env("TOKEND_SOCKET_MODE", "0660"), "permissions of the socket file, octal (env TOKEND_SOCKET_MODE)")
	fs.StringVar(&o.stateDir, "state-dir", env("TOKEND_STATE_DIR", ""), "directory of the cache database cache.db (env TOKEND_STATE_DIR; default /var/lib/tokend, or a temporary directory with --dev)")
	fs.StringVar(&o.whopURL, "whop-url", env("TOKEND_WHOP_URL", whop.DefaultBaseURL), "Whop API base URL (env TOKEND_WHOP_URL)")
	fs.StringVar(&o.apiKeyFile, "api-key-file", env("TOKEND_API_KEY_FILE", ""), "file holding the Whop API key, mode 0600 (env TOKEND_API_KEY_FILE; else $CREDENTIALS_DIRECTORY/whop-api-key, else WHOP_API_KEY)")
	fs.DurationVar(&o.lifetime, "token-lifetime", ev.duration("TOKEND_TOKEN_LIFETIME", time.Hour), "lifetime of the tokens asked of Whop, at most 3h (env TOKEND_TOKEN_LIFETIME)")
	fs.IntVar(&o.maxInFlight, "upstream-max-inflight", ev.int("TOKEND_UPSTREAM_MAX_INFLIGHT", 4), "most upstream calls in flight at once (env TOKEND_UPSTREAM_MAX_INFLIGHT)")
	fs.Float64Var(&o.rate, "upstream-rate", ev.float("TOKEND_UPSTREAM_RATE", refresher.DefaultRate), "upstream calls per second per credential, sustained; with the burst, the default stays within Whop's only published limit, 20 per 10s (env TOKEND_UPSTREAM_RATE)")
	fs.IntVar(&o.burst, "upstream-burst", ev.int("TOKEND_UPSTREAM_BURST", refresher.DefaultBurst), "upstream calls allowed in a burst (env TOKEND_UPSTREAM_BURST)")
	fs.DurationVar(&o.rateLimitCooldown, "rate-limit-cooldown", ev.duration("TOKEND_RATE_LIMIT_COOLDOWN", refresher.DefaultRateLimitCooldown), "pause of a credential's calls after a 429 that says neither Retry-After nor retry-after-ms; Whop documents a 60s cooldown (env TOKEND_RATE_LIMIT_COOLDOWN)")
	fs.DurationVar(&o.keyProbeInterval, "key-probe-interval", ev.duration("TOKEND_KEY_PROBE_INTERVAL", refresher.DefaultKeyProbeInterval), "first wait before a key Whop answered 401 to is tried again; it doubles up to 30m (env TOKEND_KEY_PROBE_INTERVAL)")
	fs.StringVar(&o.apiVersionDate, "api-version-date", env("TOKEND_API_VERSION_DATE", ""), "Whop API version to pin, sent as Api-Version-Date (YYYY-MM-DD, at most "+whop.NewestAPIVersionDate+"); empty sends none (env TOKEND_API_VERSION_DATE)")
	fs.Float64Var(&o.refreshAt, "refresh-at", ev.float("TOKEND_REFRESH_AT", 2.0/3), "fraction of a token's lifetime after which it is refreshed, minus up to 0.1 of jitter (env TOKEND_REFRESH_AT)")
	fs.DurationVar(&o.retryInitial, "retry-initial", ev.duration("TOKEND_RETRY_INITIAL", time.Second), "first backoff interval after a failed refresh; it doubles, randomized by ±50% (env TOKEND_RETRY_INITIAL)")
	fs.DurationVar(&o.retryMax, "retry-max", ev.duration("TOKEND_RETRY_MAX", 2*time.Minute), "longest backoff interval between retries (env TOKEND_RETRY_MAX)")
	fs.DurationVar(&o.negativeTTL, "negative-ttl", ev.duration("TOKEND_NEGATIVE_TTL", 30*time.Second), "how long an error a retry cannot fix (400, 403, 404, 422) is returned without asking Whop again (env TOKEND_NEGATIVE_TTL)")
	fs.DurationVar(&o.restartSpread, "restart-spread", ev.duration("TOKEND_RESTART_SPREAD", time.Minute), "window over which refreshes that fell due while tokend was down are spread (env TOKEND_RESTART_SPREAD)")
	fs.DurationVar(&o.upstreamTTO, "upstream-timeout", ev.duration("TOKEND_UPSTREAM_TIMEOUT", 10*time.Second), "per-request timeout of upstream calls, cutting stuck connections (env TOKEND_UPSTREAM_TIMEOUT)")
	fs.IntVar(&o.maxEntries, "max-entries", ev.int("TOKEND_MAX_ENTRIES", 100_000), "most cache entries; a new key beyond it evicts the least recently requested (env TOKEND_MAX_ENTRIES)")
	fs.StringVar(&o.metricsAddr, "metrics-addr", env("TOKEND_METRICS_ADDR", ""), "serve Prometheus metrics at /metrics on a loopback host:port or unix:/path; off when empty (env TOKEND_METRICS_ADDR)")
	fs.StringVar(&o.configFile, "config", env("TOKEND_CONFIG", ""), "YAML file listing named credentials (API keys, user OAuth tokens) to mint with, instead of one --api-key-file; re-read on SIGHUP (env TOKEND_CONFIG)")
	fs.StringVar(&o.policyFile, "policy", env("TOKEND_POLICY", ""), "YAML policy file saying which local users may ask for which subjects and scopes; re-read on SIGHUP (env TOKEND_POLICY)")
	fs.StringVar(&o.adminGroup, "admin-group", env("TOKEND_ADMIN_GROUP", ""), "group (name or gid) whose members may use AdminService besides root and tokend's own user (env TOKEND_ADMIN_GROUP)")
	fs.StringVar(&o.auditLog, "audit-log", env("TOKEND_AUDIT_LOG", ""), "file to append the audit trail to as JSON lines; default: the log on stderr with logger=audit (env TOKEND_AUDIT_LOG)")
	fs.StringVar(&o.fleetRedis, "fleet-redis", env("TOKEND_FLEET_REDIS", ""), "Redis shared by a fleet of tokend hosts (redis://host:port, rediss://host:port, unix:///path; no password in it): hosts share one token per key and one upstream budget per credential; off when empty (env TOKEND_FLEET_REDIS)")
	fs.StringVar(&o.fleetUser, "fleet-redis-user", env("TOKEND_FLEET_REDIS_USER", ""), "Redis ACL user for --fleet-redis (env TOKEND_FLEET_REDIS_USER)")
	fs.StringVar(&o.fleetPasswordFile, "fleet-redis-password-file", env("TOKEND_FLEET_REDIS_PASSWORD_FILE", ""), "file holding the Redis password, mode 0600 (env TOKEND_FLEET_REDIS_PASSWORD_FILE; else $CREDENTIALS_DIRECTORY/tokend-fleet-redis-password if present)")
	fs.StringVar(&o.fleetKeyFile, "fleet-key-file", env("TOKEND_FLEET_KEY_FILE", ""), "file with the 32 random bytes every host of the fleet shares, mode 0600: they seal tokens in Redis and name its keys (env TOKEND_FLEET_KEY_FILE; else $CREDENTIALS_DIRECTORY/tokend-fleet-key if present)")
	fs.DurationVar(&o.fleetLockLease, "fleet-lock-lease", ev.duration("TOKEND_FLEET_LOCK_LEASE", fleet.DefaultLockLease), "how long a fleet host's lock on a key's mint outlives a host that died mid-mint; longer than --upstream-timeout (env TOKEND_FLEET_LOCK_LEASE)")
	fs.StringVar(&o.cacheKeyFile, "cache-key-file", env("TOKEND_CACHE_KEY_FILE", ""), "file with 32 random bytes that seal tokens at rest with AES-256-GCM (env TOKEND_CACHE_KEY_FILE; else $CREDENTIALS_DIRECTORY/tokend-cache-key if present)")
	fs.Float64Var(&o.missRate, "miss-rate-per-uid", ev.float("TOKEND_MISS_RATE_PER_UID", 0), "cache misses per second one local uid may send upstream; 0 means half of --upstream-rate, so no uid can take a credential's whole budget (env TOKEND_MISS_RATE_PER_UID)")
	fs.IntVar(&o.missBurst, "miss-burst-per-uid", ev.int("TOKEND_MISS_BURST_PER_UID", 0), "burst of upstream-bound misses one uid may make; 0 means half of --upstream-burst, rounded up (env TOKEND_MISS_BURST_PER_UID)")
	fs.IntVar(&o.maxConns, "max-connections", ev.int("TOKEND_MAX_CONNECTIONS", server.DefaultMaxConnections), "most client connections open at once; more are closed as they arrive (env TOKEND_MAX_CONNECTIONS)")
	fs.IntVar(&o.maxConnsPerUID, "max-connections-per-uid", ev.int("TOKEND_MAX_CONNECTIONS_PER_UID", server.DefaultMaxConnsPerUID), "most connections one local uid may hold; root, tokend's uid and --admin-group are exempt (env TOKEND_MAX_CONNECTIONS_PER_UID)")
	fs.IntVar(&o.adminConnReserve, "admin-connection-reserve", ev.int("TOKEND_ADMIN_CONNECTION_RESERVE", server.DefaultAdminReserve), "of --max-connections, how many only root, tokend's uid and --admin-group may take, so tokenctl status answers; 0 keeps none (env TOKEND_ADMIN_CONNECTION_RESERVE)")
	fs.DurationVar(&o.handshakeTimeout, "handshake-timeout", ev.duration("TOKEND_HANDSHAKE_TIMEOUT", server.DefaultHandshakeTimeout), "close a connection that has not completed the HTTP/2 handshake by then (env TOKEND_HANDSHAKE_TIMEOUT)")
	fs.DurationVar(&o.idleTimeout, "idle-timeout", ev.duration("TOKEND_IDLE_TIMEOUT", server.DefaultIdleTimeout), "close a connection that has had no call for that long; an open watch is a call (env TOKEND_IDLE_TIMEOUT)")
	fs.IntVar(&o.maxStreams, "max-streams", ev.int("TOKEND_MAX_STREAMS", 128), "most concurrent calls per connection (env TOKEND_MAX_STREAMS)")
	fs.IntVar(&o.gcHeadroomMiB, "gc-headroom-mib", ev.int("TOKEND_GC_HEADROOM_MIB", 16), "heap growth, in MiB (at most 1024), allowed between garbage collections: a small heap under load is otherwise collected every few MiB; 0 leaves Go's default (env TOKEND_GC_HEADROOM_MIB)")
	fs.StringVar(&o.logLevel, "log-level", env("TOKEND_LOG_LEVEL", "info"), "debug, info, warn or error (env TOKEND_LOG_LEVEL)")
	fs.BoolVar(&o.dev, "dev", getenv("TOKEND_DEV") == "1", "dev mode: fake Whop upstream on loopback, no API key, temporary state, socket in $XDG_RUNTIME_DIR or /tmp/tokend-dev (env TOKEND_DEV=1)")
	if err := fs.Parse(args); err != nil {
		return o, false, err
	}
	if ev.err != nil {
		return o, false, ev.err
	}
	if fs.NArg() > 0 {
		return o, false, fmt.Errorf("unexpected argument %q; tokend takes flags only (see -h)", fs.Arg(0))
	}
	setSocket := getenv("TOKEND_SOCKET") != ""
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "socket" {
			setSocket = true
		}
	})
	return o, setSocket, nil
}

func buildConfig(o options, setSocket bool, getenv func(string) string) (daemon.Config, error) {
	mode, err := strconv.ParseUint(o.socketMode, 8, 32)
	if err != nil || mode > 0o777 {
		return daemon.Config{}, fmt.Errorf("--socket-mode %q: want octal permissions such as 0660", o.socketMode)
	}
	if o.lifetime <= 0 || o.lifetime > refresher.MaxLifetime {
		return daemon.Config{}, fmt.Errorf("--token-lifetime %v: must be positive and at most %v", o.lifetime, refresher.MaxLifetime)
	}
	for _, c := range []struct {
		name string
		ok   bool
		v    any
	}{
		{"--upstream-max-inflight", o.maxInFlight >= 1, o.maxInFlight},
		{"--upstream-rate", o.rate > 0, o.rate},
		{"--upstream-burst", o.burst >= 1, o.burst},
		{"--max-connections", o.maxConns >= 1, o.maxConns},
		{"--max-connections-per-uid", o.maxConnsPerUID >= 1, o.maxConnsPerUID},
		{"--max-streams", o.maxStreams >= 1, o.maxStreams},
	} {
		if !c.ok {
			return daemon.Config{}, fmt.Errorf("%s %v: must be positive", c.name, c.v)
		}
	}
	if o.missRate < 0 || o.missBurst < 0 {
		return daemon.Config{}, fmt.Errorf("--miss-rate-per-uid %v, --miss-burst-per-uid %v: must not be negative (0: half of the credential's --upstream-rate and --upstream-burst)", o.missRate, o.missBurst)
	}
	if o.adminConnReserve < 0 || o.adminConnReserve >= o.maxConns {
		return daemon.Config{}, fmt.Errorf("--admin-connection-reserve %d: must be at least 0 and below --max-connections %d", o.adminConnReserve, o.maxConns)
	}
	if o.refreshAt <= 0.1 || o.refreshAt >= 1 {
		return daemon.Config{}, fmt.Errorf("--refresh-at %v: must be above 0.1 (the jitter) and below 1", o.refreshAt)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"--retry-initial", o.retryInitial}, {"--retry-max", o.retryMax}, {"--negative-ttl", o.negativeTTL}, {"--restart-spread", o.restartSpread}, {"--upstream-timeout", o.upstreamTTO}, {"--rate-limit-cooldown", o.rateLimitCooldown}, {"--key-probe-interval", o.keyProbeInterval}, {"--handshake-timeout", o.handshakeTimeout}, {"--idle-timeout", o.idleTimeout}} {
		if d.v <= 0 {
			return daemon.Config{}, fmt.Errorf("%s %v: must be positive", d.name, d.v)
		}
	}
	if o.fleetLockLease < 10*time.Millisecond {
		return daemon.Config{}, fmt.Errorf("--fleet-lock-lease %v: must be at least 10ms (and longer than --upstream-timeout)", o.fleetLockLease)
	}
	if o.retryMax < o.retryInitial {
		return daemon.Config{}, fmt.Errorf("--retry-max %v: must not be below --retry-initial %v", o.retryMax, o.retryInitial)
	}
	if err := whop.ValidateAPIVersionDate(o.apiVersionDate); err != nil {
		return daemon.Config{}, fmt.Errorf("--api-version-date: %w", err)
	}
	if o.maxEntries < 1 {
		return daemon.Config{}, fmt.Errorf("--max-entries %d: must be positive", o.maxEntries)
	}
	if o.gcHeadroomMiB < 0 || o.gcHeadroomMiB > gctune.MaxHeadroom>>20 {
		return daemon.Config{}, fmt.Errorf("--gc-headroom-mib %d: must be between 0 (off) and %d", o.gcHeadroomMiB, gctune.MaxHeadroom>>20)
	}

	if dir := getenv("CREDENTIALS_DIRECTORY"); dir != "" {
		for _, f := range []struct {
			v    *string
			name string
		}{{&o.cacheKeyFile, "tokend-cache-key"}, {&o.fleetKeyFile, "tokend-fleet-key"}, {&o.fleetPasswordFile, "tokend-fleet-redis-password"}} {
			if p := filepath.Join(dir, f.name); *f.v == "" && fileExists(p) {
				*f.v = p
			}
		}
	}
	cfg := daemon.Config{
		Socket:      o.socket,
		SocketMode:  os.FileMode(mode),
		StateDir:    o.stateDir,
		WhopURL:     o.whopURL,
		Lifetime:    o.lifetime,
		MaxInFlight: o.maxInFlight,
		Rate:        o.rate,
		Burst:       o.burst,
		Dev:         o.dev,

		RefreshAt:       o.refreshAt,
		RetryInitial:    o.retryInitial,
		RetryMax:        o.retryMax,
		NegativeTTL:     o.negativeTTL,
		RestartSpread:   o.restartSpread,
		MaxEntries:      o.maxEntries,
		UpstreamTimeout: o.upstreamTTO,

		RateLimitCooldown: o.rateLimitCooldown,
		KeyProbeInterval:  o.keyProbeInterval,
		APIVersionDate:    o.apiVersionDate,

		PolicyFile:      o.policyFile,
		ConfigFile:      o.configFile,
		MetricsAddr:     o.metricsAddr,
		AdminGroup:      o.adminGroup,
		AuditLog:        o.auditLog,
		CacheKeyFile:    o.cacheKeyFile,
		Fleet:           daemon.FleetConfig{Redis: o.fleetRedis, Username: o.fleetUser, PasswordFile: o.fleetPasswordFile, KeyFile: o.fleetKeyFile, LockLease: o.fleetLockLease},
		MissRatePerUID:  cmp.Or(o.missRate, o.rate*server.MissShare),
		MissBurstPerUID: cmp.Or(o.missBurst, int(math.Ceil(float64(o.burst)*server.MissShare))),
		MaxStreams:      o.maxStreams,

		MaxConnections:       o.maxConns,
		MaxConnectionsPerUID: o.maxConnsPerUID,
		AdminConnReserve:     noneIfZero(o.adminConnReserve),
		HandshakeTimeout:     o.handshakeTimeout,
		IdleTimeout:          o.idleTimeout,
	}
	if o.dev {
		if !setSocket {
			cfg.Socket = devSocket(getenv)
		}
		return cfg, nil
	}
	if cfg.StateDir == "" {
		cfg.StateDir = "/var/lib/tokend"
	}
	if o.configFile != "" && o.apiKeyFile != "" {
		return daemon.Config{}, errors.New("--config and --api-key-file exclude each other: list the key in the config file as a credential named default")
	}
	// The daemon reads the key from here at start and again on reload.
	cfg.Keys = daemon.KeySource{File: o.apiKeyFile, CredentialsDir: getenv("CREDENTIALS_DIRECTORY"), Env: getenv("WHOP_API_KEY")}
	return cfg, nil
}

// devSocket is a path a user without root can create, and can predict.
func devSocket(getenv func(string) string) string {
	if d := getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "tokend.sock")
	}
	return "/tmp/tokend-dev/tokend.sock"
}

// envDefaults reads flag defaults from the environment and remembers a
// value that does not parse, so a typo is an error rather than a silent
// default.
type envDefaults struct {
	getenv func(string) string
	err    error
}

func (ev *envDefaults) bad(name, v, want string) {
	if ev.err == nil {
		ev.err = fmt.Errorf("environment %s=%q: want %s", name, v, want)
	}
}

func (ev *envDefaults) duration(name string, def time.Duration) time.Duration {
	v := ev.getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		ev.bad(name, v, "a duration such as 90s or 1h")
		return def
	}
	return d
}

func (ev *envDefaults) int(name string, def int) int {
	v := ev.getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		ev.bad(name, v, "a whole number")
		return def
	}
	return n
}

func (ev *envDefaults) float(name string, def float64) float64 {
	v := ev.getenv(name)
	if v == "" {
		return def
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil {
		ev.bad(name, v, "a number")
		return def
	}
	return f
}

// noneIfZero turns a flag's 0, "none", into the -1 by which a Config says
// none where 0 means the default.
func noneIfZero(n int) int {
	if n == 0 {
		return -1
	}
	return n
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
