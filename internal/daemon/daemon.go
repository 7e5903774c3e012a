// Package daemon assembles tokend: the cache, the Whop client, the refresher
// and the gRPC server, run as tasks under one context. The first to fail
// stops the rest; a cancelled context is a clean stop.
package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
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
	// APIKey is the Whop API key. Never log it.
	APIKey   string
	Lifetime time.Duration

	MaxInFlight int
	Rate        float64
	Burst       int

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
	if cfg.APIKey == "" {
		return errors.New("no Whop API key: set --api-key-file or WHOP_API_KEY, or use --dev")
	}

	dbPath := filepath.Join(cfg.StateDir, "cache.db")
	c, stats, err := cache.Open(cache.Config{Path: dbPath, Logger: log.With("component", "cache")})
	if err != nil {
		return err
	}
	defer func() {
		if cerr := c.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	log.Info("cache loaded", "file", dbPath, "entries", stats.Loaded, "expired_dropped", stats.Expired, "undecodable_dropped", stats.Undecodable)

	client, err := whop.New(whop.Config{
		BaseURL:         cfg.WhopURL,
		APIKey:          cfg.APIKey,
		UserAgent:       "tokend/" + cfg.Version,
		FingerprintSalt: c.Salt(),
	})
	if err != nil {
		return err
	}
	ref, err := refresher.New(refresher.Config{
		Cache:       c,
		Fetcher:     client,
		Logger:      log.With("component", "refresher"),
		Lifetime:    cfg.Lifetime,
		MaxInFlight: cfg.MaxInFlight,
		Rate:        rate.Limit(cfg.Rate),
		Burst:       cfg.Burst,
	})
	if err != nil {
		return err
	}
	ln, err := server.Listen(cfg.Socket, cfg.SocketMode)
	if err != nil {
		return err
	}
	srv := server.New(server.Config{
		Tokens:   ref,
		Entries:  c,
		Logger:   log.With("component", "server"),
		Version:  cfg.Version,
		Socket:   cfg.Socket,
		StateDir: cfg.StateDir,
	})

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return srv.Serve(gctx, ln) })
	g.Go(func() error { return ref.Run(gctx) })
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
