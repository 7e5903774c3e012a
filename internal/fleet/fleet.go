package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

const (
	// DefaultTimeout bounds each Redis call: long enough for a round trip
	// inside a data centre, short enough that a hung Redis costs a caller
	// far less than a mint does.
	DefaultTimeout = 50 * time.Millisecond
	// DefaultLockLease is how long a mint lock lives if its holder dies: it
	// must outlast an upstream call, or a second host mints beside a slow one.
	DefaultLockLease = 15 * time.Second

	minLockLease  = 10 * time.Millisecond  // PX counts milliseconds; shorter leases expire mid-call
	failThreshold = 3                      // failures in a row that open the breaker
	probeMin      = 100 * time.Millisecond // first probe after the breaker opens
	probeMax      = 5 * time.Second
	// awaitPoll bounds a waiter's sleep between looks at Redis, so a lost
	// pub/sub message or a dead pub/sub connection costs at most this much.
	awaitPoll = 100 * time.Millisecond
	// subscriberPing is how long the pub/sub connection may stay silent
	// before it is pinged; a second silence drops it.
	subscriberPing = 5 * time.Second
)

// Config configures a Fleet. URL and Key are required.
type Config struct {
	// URL is redis://host:port/db, rediss://host:port/db (TLS),
	// unix:///path/to/socket, or an absolute socket path. It must not carry
	// a password (a URL ends up in ps, logs and unit files): use Password.
	URL string
	// Username and Password authenticate to Redis (ACL user or
	// requirepass); the caller reads them from files or credentials. Never
	// logged.
	Username, Password string
	// Key is the 32-byte fleet key, the same on every host. Never logged.
	Key []byte
	// Timeout bounds each Redis call; zero means DefaultTimeout.
	Timeout time.Duration
	// LockLease is how long a mint lock lives; zero means DefaultLockLease.
	LockLease time.Duration
	// Logger gets one line per change of state; nil discards.
	Logger *slog.Logger
}

// Fleet is one host's connection to the fleet tier. Its methods are safe for
// concurrent use and never return an error: Redis trouble is a miss, a
// local-only lease or ok=false, so the caller carries on alone.
type Fleet struct {
	rdb     redis.UniversalClient
	limiter *redis_rate.Limiter
	keys    *keyring
	br      *breaker
	log     *slog.Logger
	timeout time.Duration
	lease   time.Duration
	channel string // pub/sub channel carrying the names of tokens just Put

	mu      sync.Mutex
	waiters map[string]map[chan struct{}]struct{} // token name -> Await calls

	stop   context.CancelFunc
	wg     sync.WaitGroup
	closed atomic.Bool

	n counters
}

type counters struct {
	adopted, misses, published, lockWaits, lockBusy, lockTakeovers,
	tampered, stale, errors, rateLimited, pausesSeen atomic.Uint64
}

// New validates cfg and connects. Redis being down is not an error: the
// fleet starts degraded and joins when Redis answers.
func New(cfg Config) (*Fleet, error) {
	keys, err := deriveKeys(cfg.Key)
	if err != nil {
		return nil, err
	}
	opt, err := parseURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	if cfg.Timeout < 0 {
		return nil, fmt.Errorf("fleet timeout: %v, want a positive duration (or 0 for %v)", cfg.Timeout, DefaultTimeout)
	}
	if cfg.LockLease < 0 || (cfg.LockLease > 0 && cfg.LockLease < minLockLease) {
		return nil, fmt.Errorf("fleet lock lease: %v, want at least %v (or 0 for %v)", cfg.LockLease, minLockLease, DefaultLockLease)
	}
	timeout := cmpOr(cfg.Timeout, DefaultTimeout)
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.Username != "" {
		opt.Username = cfg.Username
	}
	if cfg.Password != "" {
		opt.Password = cfg.Password
	}
	opt.MaxRetries = -1 // a retry would double a caller's wait; the breaker handles trouble
	opt.DialerRetries = 1
	opt.DialTimeout = max(timeout, time.Second) // background dials (MinIdleConns); calls are bounded by their context
	opt.ReadTimeout = timeout
	opt.WriteTimeout = timeout
	opt.PoolTimeout = timeout
	opt.ContextTimeoutEnabled = true
	opt.MinIdleConns = 2 // so a call rarely pays for a dial (a TLS handshake can exceed Timeout)
	opt.DisableIdentity = true
	opt.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}

	ctx, stop := context.WithCancel(context.Background())
	rdb := redis.NewClient(opt)
	f := &Fleet{
		rdb:     rdb,
		limiter: redis_rate.NewLimiter(rdb),
		keys:    keys,
		log:     log.With("fleet_key_id", keys.id),
		timeout: timeout,
		lease:   cmpOr(cfg.LockLease, DefaultLockLease),
		channel: "tokend:put:" + keys.id,
		waiters: map[string]map[chan struct{}]struct{}{},
		stop:    stop,
	}
	f.br = newBreaker(failThreshold, probeMin, probeMax, timeout, f.ping, f.log)
	pctx, cancel := context.WithTimeout(ctx, timeout)
	err = f.ping(pctx)
	cancel()
	if err != nil {
		f.br.trip(err)
	} else {
		f.log.Info("fleet: sharing tokens through redis", "redis", redactedURL(cfg.URL))
	}
	f.wg.Add(1)
	go f.subscribe(ctx)
	return f, nil
}

func cmpOr(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

// parseURL accepts the schemes go-redis parses plus a bare socket path, and
// keeps the URL out of its errors (it may hold a user name).
func parseURL(raw string) (*redis.Options, error) {
	if raw == "" {
		return nil, errors.New("fleet redis URL: empty, want redis://host:port, rediss://host:port or unix:///path")
	}
	if strings.HasPrefix(raw, "/") {
		return &redis.Options{Network: "unix", Addr: raw}, nil
	}
	u, err := url.Parse(raw)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, fmt.Errorf("fleet redis URL: %w", err)
	}
	switch u.Scheme {
	case "redis", "rediss", "unix":
	default:
		return nil, fmt.Errorf("fleet redis URL: scheme %q, want redis, rediss or unix", u.Scheme)
	}
	if _, ok := u.User.Password(); ok {
		return nil, errors.New("fleet redis URL: carries a password; give it in the password file instead")
	}
	opt, err := redis.ParseURL(raw)
	if err != nil {
		return nil, fmt.Errorf("fleet redis URL %s: %w", redactedURL(raw), err)
	}
	return opt, nil
}

// redactedURL is the URL for logs: scheme, host and path only.
func redactedURL(raw string) string {
	if strings.HasPrefix(raw, "/") {
		return raw
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable)"
	}
	return (&url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path}).String()
}

// Close stops the background work and closes the connections.
func (f *Fleet) Close() error {
	if f.closed.Swap(true) {
		return nil
	}
	f.stop()
	f.br.stop()
	f.wg.Wait()
	return f.rdb.Close()
}

// Salt is the fleet-wide salt for credential fingerprints: every host that
// fingerprints the same API key with it gets the same bytes, which is what
// lets hosts recognise each other's tokens (cred arguments are such
// fingerprints).
func (f *Fleet) Salt() []byte { return append([]byte(nil), f.keys.salt...) }

// KeyID is a short keyed fingerprint of the fleet key, safe to log and show,
// for checking that every host has the same key.
func (f *Fleet) KeyID() string { return f.keys.id }

func (f *Fleet) ping(ctx context.Context) error { return f.rdb.Ping(ctx).Err() }

// errDegraded is returned by do while the breaker is open.
var errDegraded = errors.New("fleet degraded")

// do runs one bounded Redis call through the breaker. redis.Nil is an
// answer, not a failure; a call the caller gave up on says nothing about
// Redis.
func (f *Fleet) do(ctx context.Context, call func(context.Context) error) error {
	if !f.br.allow() || f.closed.Load() {
		return errDegraded
	}
	cctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	err := call(cctx)
	switch {
	case err == nil || errors.Is(err, redis.Nil):
		f.br.success()
	case ctx.Err() != nil:
	default:
		f.n.errors.Add(1)
		f.br.failure(err)
	}
	return err
}

// Status is a snapshot of the fleet tier for tokenctl status and metrics.
type Status struct {
	Connected bool      // breaker closed: calls go to Redis
	Since     time.Time // when the current state began
	Reason    string    // while degraded: the last error (names no secret)
	KeyID     string    // keyed fingerprint of the fleet key
	Degraded  uint64    // times the breaker opened

	Adopted       uint64 // tokens served from Redis (Get and Await): mints avoided
	Misses        uint64 // Gets that found nothing
	Published     uint64 // tokens Put into Redis
	LockWaits     uint64 // Await calls: another host was minting
	LockBusy      uint64 // Lock calls that found another host's lock
	LockTakeovers uint64 // Awaits that ended with the lock gone and no token (holder died or failed)
	Tampered      uint64 // values that failed to open, were malformed or were another credential's
	Stale         uint64 // values that opened but had expired (clock skew between hosts)
	Errors        uint64 // Redis calls that failed or timed out
	RateLimited   uint64 // Allow calls told to wait
	PausesSeen    uint64 // Paused calls that found a fleet-wide pause
}

// Status returns a snapshot.
func (f *Fleet) Status() Status {
	connected, since, reason, trips := f.br.state()
	return Status{
		Connected: connected, Since: since, Reason: reason, KeyID: f.keys.id, Degraded: trips,
		Adopted: f.n.adopted.Load(), Misses: f.n.misses.Load(), Published: f.n.published.Load(),
		LockWaits: f.n.lockWaits.Load(), LockBusy: f.n.lockBusy.Load(), LockTakeovers: f.n.lockTakeovers.Load(),
		Tampered: f.n.tampered.Load(), Stale: f.n.stale.Load(), Errors: f.n.errors.Load(),
		RateLimited: f.n.rateLimited.Load(), PausesSeen: f.n.pausesSeen.Load(),
	}
}

// LibraryLogger adapts l for redis.SetLogger, at Debug level: go-redis logs
// every failed dial through a process-wide logger, which would repeat the
// one line this package logs per outage. Setting it is the caller's choice
// (main's), since it is process-wide.
type LibraryLogger struct{ L *slog.Logger }

func (g LibraryLogger) Printf(ctx context.Context, format string, v ...any) {
	g.L.DebugContext(ctx, "go-redis: "+fmt.Sprintf(format, v...))
}
