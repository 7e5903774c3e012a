// Package daemon assembles tokend: the cache, the Whop client, the refresher
// and the gRPC server, run as tasks under one context. The first to fail
// stops the rest; a cancelled context is a clean stop.
package daemon

import (
	"net"

	"github.com/tokend/tokend/internal/metrics"
	"strings"
	"sync/atomic"

	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"github.com/tokend/tokend/internal/audit"
	"github.com/tokend/tokend/internal/policy"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sync/errgroup"
	"golang.org/x/time/rate"

	"github.com/tokend/tokend/internal/cache"
	"github.com/tokend/tokend/internal/refresher"
	"github.com/tokend/tokend/internal/server"
	"github.com/tokend/tokend/internal/whop"
	"github.com/tokend/tokend/internal/whop/whoptest"
)

// Config is everything tokend needs to run; cmd/tokend fills it from flags.
type Config struct {
	Socket     string
	SocketMode os.FileMode
	// StateDir holds cache.db. In dev mode an empty StateDir means a fresh
	// temporary directory, removed on exit.
	StateDir string
	WhopURL  string
	// APIKey is a fixed Whop API key, which a reload cannot change. When it
	// is empty (the usual case) Run reads the key from Keys, at start and
	// again on every reload. Never log it.
	APIKey string
	// Keys says where the API key is read from.
	Keys KeySource
	// Reload asks for a reload (SIGHUP): the API key is read again from
	// Keys; connections and the cache are untouched. Nil means never.
	Reload   <-chan struct{}
	Lifetime time.Duration

	MaxInFlight int
	Rate        float64
	Burst       int

	// Refresh and upstream tuning; zero values mean the defaults of
	// refresher.Config and whop.Config.
	RefreshAt       float64
	RetryInitial    time.Duration
	RetryMax        time.Duration
	NegativeTTL     time.Duration
	RestartSpread   time.Duration
	MaxEntries      int
	UpstreamTimeout time.Duration
	// RateLimitCooldown pauses a credential after a 429 without a wait
	// hint; KeyProbeInterval is the first wait before a key Whop refused
	// (401) is tried again.
	RateLimitCooldown time.Duration
	KeyProbeInterval  time.Duration
	// APIVersionDate, when set, is sent as Api-Version-Date; it wins over
	// the configuration file's api_version_date.
	APIVersionDate string

	// Local security; see the README's security section.
	// MetricsAddr, when set, serves Prometheus metrics: a loopback
	// host:port or unix:/path.
	MetricsAddr string
	// ConfigFile, when set, lists the named credentials to mint with
	// instead of the one API key of Keys.
	ConfigFile string
	// PolicyFile, when set, restricts who may ask for which token.
	PolicyFile string
	// AdminGroup names the group whose members may call AdminService.
	AdminGroup string
	// AuditLog is the file audit lines are appended to; empty sends them to
	// stderr (the journal) with logger=audit.
	AuditLog string
	// CacheKeyFile holds 32 bytes that seal tokens at rest; empty stores
	// them plain in the 0600 file.
	CacheKeyFile    string
	MissRatePerUID  float64
	MissBurstPerUID int
	// Fleet, when Fleet.Redis is set, shares tokens with other hosts.
	Fleet      FleetConfig
	MaxStreams int
	// Connection caps and timeouts; zero values mean server's defaults.
	MaxConnections       int
	MaxConnectionsPerUID int
	// AdminConnReserve: of MaxConnections, how many only administrators
	// may take; zero means the default, negative means none.
	AdminConnReserve int
	HandshakeTimeout time.Duration
	IdleTimeout      time.Duration

	// Dev starts the fake Whop upstream on loopback and needs no API key.
	Dev     bool
	Version string
	Logger  *slog.Logger
	// Stdout receives dev mode's "try this" lines.
	Stdout io.Writer
}

// Run serves until ctx ends or a task fails.
func Run(ctx context.Context, cfg Config) (err error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.Stdout == nil {
		cfg.Stdout = io.Discard
	}
	if cfg.Dev {
		stop, err := startDev(&cfg, log)
		if err != nil {
			return err
		}
		defer stop()
	}
	keyFrom, err := initialKey(&cfg)
	if err != nil {
		return err
	}
	log.Info("API key loaded", "source", keyFrom)

	sealKey, err := loadCacheKey(cfg.CacheKeyFile)
	if err != nil {
		return err
	}
	var adminGID *uint32
	if cfg.AdminGroup != "" {
		gid, err := lookupGroup(cfg.AdminGroup)
		if err != nil {
			return err
		}
		adminGID = &gid
	}
	var pol atomic.Pointer[policy.Policy]
	if cfg.PolicyFile != "" {
		p, err := policy.Load(cfg.PolicyFile)
		if err != nil {
			return fmt.Errorf("load policy: %w", err)
		}
		pol.Store(p)
		log.Info("policy loaded", "file", cfg.PolicyFile, "rules", strings.Join(p.Rules(), ","))
	}
	trail, closeAudit, err := openAudit(cfg.AuditLog, log)
	if err != nil {
		return err
	}
	defer closeAudit()

	dbPath := filepath.Join(cfg.StateDir, "cache.db")
	c, stats, err := cache.Open(cache.Config{Path: dbPath, Logger: log.With("component", "cache"), SealKey: sealKey})
	if err != nil {
		return err
	}
	defer func() {
		if cerr := c.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	loaded := []any{"file", dbPath, "entries", stats.Loaded, "expired_dropped", stats.Expired, "undecodable_dropped", stats.Undecodable, "moved_aside", stats.MovedAside, "sealed", sealKey != nil, "persistent", stats.Unavailable == nil}
	if stats.MovedAside != "" {
		loaded = append(loaded, "salvaged", stats.Salvaged, "lost", stats.Lost)
	}
	log.Info("cache loaded", loaded...)
	if stats.Unsealable > 0 {
		log.Warn("discarded cache records sealed under another cache key; they will be fetched again", "count", stats.Unsealable)
	}
	if sealKey == nil {
		log.Info("tokens are stored unsealed in the cache file (mode 0600); set --cache-key-file to seal them", "file", dbPath)
	}

	creds := &credentialSet{
		log:         log.With("component", "credentials"),
		file:        cfg.ConfigFile,
		credDir:     cfg.Keys.CredentialsDir,
		flagVersion: cfg.APIVersionDate,
		newWhop: func(key, apiVersionDate string) (*whop.Client, error) {
			return whop.New(whop.Config{
				BaseURL:         cfg.WhopURL,
				APIKey:          key,
				UserAgent:       "tokend/" + cfg.Version,
				Timeout:         cfg.UpstreamTimeout,
				FingerprintSalt: c.Salt(),
				APIVersionDate:  apiVersionDate,
			})
		},
	}
	credList, err := creds.load(cfg.APIKey)
	if err != nil {
		return err
	}
	var srv *server.Server
	var met *metrics.Metrics
	if cfg.MetricsAddr != "" {
		met = metrics.New(func() metrics.Snapshot { return srv.MetricsSnapshot() })
	}
	fl, err := openFleet(cfg.Fleet, log)
	if err != nil {
		return err
	}
	if fl != nil {
		defer fl.Close()
	}
	ref, err := refresher.New(refresher.Config{
		Fleet:       fleetOf(fl),
		Observer:    observer(met),
		Store:       c,
		Credentials: credList,
		Logger:      log.With("component", "refresher"),
		Lifetime:    cfg.Lifetime,
		MaxInFlight: cfg.MaxInFlight,
		Rate:        rate.Limit(cfg.Rate),
		Burst:       cfg.Burst,

		RefreshAt:     cfg.RefreshAt,
		RetryInitial:  cfg.RetryInitial,
		RetryMax:      cfg.RetryMax,
		NegativeTTL:   cfg.NegativeTTL,
		RestartSpread: cfg.RestartSpread,
		MaxEntries:    cfg.MaxEntries,

		RateLimitCooldown: cfg.RateLimitCooldown,
		KeyProbeInterval:  cfg.KeyProbeInterval,
		OnMint: func(m refresher.Mint) {
			subject := audit.Subject{KeyID: m.KeyID, CompanyID: m.Key.CompanyID, UserID: m.Key.UserID, Scopes: m.Key.Scopes}
			if m.Adopted {
				trail.Adopted(subject, m.Token.Value, m.Cause)
				return
			}
			trail.Minted(subject, m.Token.Value, m.Cause)
		},
	})
	if err != nil {
		return err
	}
	ln, err := listen(&cfg, log)
	if err != nil {
		return err
	}
	// After the cache lock and the gRPC socket, both of which refuse a
	// second tokend: one that is refused never reaches the metrics path.
	var metricsLn net.Listener
	if met != nil {
		if metricsLn, err = metrics.Listen(cfg.MetricsAddr); err != nil {
			ln.Close()
			return err
		}
		defer metricsLn.Close()
	}
	conns := server.ConnLimits{Total: cfg.MaxConnections, PerUID: cfg.MaxConnectionsPerUID, Reserve: cfg.AdminConnReserve,
		HandshakeTimeout: cfg.HandshakeTimeout, IdleTimeout: cfg.IdleTimeout}
	srv = server.New(server.Config{
		Metrics:        serverMetrics(met),
		Tokens:         ref,
		Logger:         log.With("component", "server"),
		Version:        cfg.Version,
		Socket:         cfg.Socket,
		StateDir:       cfg.StateDir,
		SelfUID:        uint32(os.Getuid()),
		AdminGID:       adminGID,
		AdminGroupName: cfg.AdminGroup,
		Audit:          trail,
		MissRate:       rate.Limit(cfg.MissRatePerUID),
		MissBurst:      cfg.MissBurstPerUID,
		MaxStreams:     uint32(cfg.MaxStreams),
		Conns:          conns,
		SealedCache:    sealKey != nil,
		Policy:         &pol,
	})
	if cfg.PolicyFile == "" {
		log.Warn("no policy loaded: any process that can open the socket may get any token; the socket's mode and group are the boundary", "socket", cfg.Socket)
	}

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return srv.Serve(gctx, ln) })
	g.Go(func() error { return ref.Run(gctx) })
	g.Go(func() error { return trail.Run(gctx) })
	if met != nil {
		g.Go(func() error { return met.Serve(gctx, metricsLn) })
		log.Info("serving metrics", "addr", cfg.MetricsAddr)
	}
	// The cache is loaded and the socket accepts: tell systemd.
	sdn := newNotifier(log, ref)
	g.Go(func() error { return sdn.run(gctx) })
	rl := newReloader(cfg, keyFrom, log, creds, ref, sdn)
	rl.policyFile, rl.policy = cfg.PolicyFile, &pol
	changed := make(chan struct{}, 1)
	g.Go(func() error { watchFiles(gctx, log.With("component", "keywatch"), rl.watched(), changed); return nil })
	g.Go(func() error { return rl.run(gctx, cfg.Reload, changed) })
	log.Info("tokend ready", "version", cfg.Version, "socket", cfg.Socket, "state_dir", cfg.StateDir, "entries", stats.Loaded)
	if cfg.Dev {
		fmt.Fprintf(cfg.Stdout, "tokend is running in dev mode against a fake Whop upstream. Try, in another shell:\n\n"+
			"  go run ./cmd/tokenctl --socket %s get --company biz_demo --scope chat:read\n\n"+
			"(or, with tokenctl installed: tokenctl --socket %[1]s get --company biz_demo --scope chat:read)\n", cfg.Socket)
	}
	err = g.Wait()
	log.Info("tokend stopping", "err", err)
	return err
}

// startDev points cfg at a fake upstream on loopback with a throwaway key
// and, unless one was given, a temporary state directory.
func startDev(cfg *Config, log *slog.Logger) (stop func(), err error) {
	keyBytes := make([]byte, 16)
	rand.Read(keyBytes)
	key := "dev_" + hex.EncodeToString(keyBytes)
	fake, err := whoptest.NewServer(whoptest.Config{Keys: map[string][]string{key: nil}})
	if err != nil {
		return nil, fmt.Errorf("start fake Whop upstream: %w", err)
	}
	cfg.APIKey = key
	cfg.WhopURL = fake.URL()
	var tmp string
	if cfg.StateDir == "" {
		if tmp, err = os.MkdirTemp("", "tokend-dev-"); err != nil {
			fake.Close()
			return nil, fmt.Errorf("create dev state directory: %w", err)
		}
		cfg.StateDir = tmp
	}
	log.Warn("dev mode: minting from a fake Whop upstream; tokens are not valid at Whop", "upstream", cfg.WhopURL, "state_dir", cfg.StateDir)
	return func() {
		fake.Close()
		if tmp != "" {
			os.RemoveAll(tmp)
		}
	}, nil
}

// observer and serverMetrics keep a nil *metrics.Metrics from becoming a
// non-nil interface holding nil.
func observer(m *metrics.Metrics) refresher.Observer {
	if m == nil {
		return nil
	}
	return m
}

func serverMetrics(m *metrics.Metrics) server.Metrics {
	if m == nil {
		return nil
	}
	return m
}
