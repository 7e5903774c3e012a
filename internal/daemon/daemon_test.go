package daemon

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/tokend/tokend/internal/daemontest"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "tdd") // a socket path must fit in sun_path
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// TestRunAssembles: Run in dev mode wires the store, refresher and server
// together: a token is minted, persisted, listed and counted, and a
// cancelled context is a clean stop that removes the socket and leaves the
// token in the cache file for the next start.
func TestRunAssembles(t *testing.T) {
	dir := shortDir(t)
	sock := filepath.Join(dir, "t.sock")
	logs := daemontest.NewOutput(1 << 20)
	cfg := Config{Dev: true, Socket: sock, SocketMode: 0o600, StateDir: filepath.Join(dir, "state"), Version: "test", Logger: slog.New(slog.NewTextHandler(logs, nil))}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg) }()

	// Redial quickly while the daemon is still starting.
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 10 * time.Millisecond, Multiplier: 1.5, MaxDelay: 50 * time.Millisecond}}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	tokens, admin := tokendv1.NewTokenServiceClient(conn), tokendv1.NewAdminServiceClient(conn)
	cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
	defer ccancel()
	// WaitForReady: the call waits for the socket to appear.
	tok, err := tokens.GetToken(cctx, &tokendv1.GetTokenRequest{CompanyId: "biz_dev", ScopedActions: []string{"chat:read"}}, grpc.WaitForReady(true))
	if err != nil {
		t.Fatalf("GetToken: %v\nlogs:\n%s", err, logs)
	}
	if strings.Count(tok.GetToken(), ".") != 2 {
		t.Fatal("dev mode did not hand out a JWT")
	}
	st, err := admin.GetStatus(cctx, &tokendv1.GetStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.GetEntries() != 1 || st.GetEntriesByState()["fresh"] != 1 || st.GetUpstreamCalls() != 1 || st.GetVersion() != "test" || len(st.GetCredentials()) != 1 {
		t.Fatalf("status: entries %d %v, upstream calls %d, version %q, credentials %d; want 1 fresh, 1, test, 1",
			st.GetEntries(), st.GetEntriesByState(), st.GetUpstreamCalls(), st.GetVersion(), len(st.GetCredentials()))
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run after cancel: %v, want nil (a clean stop)", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return within 10s of cancel")
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left after stop: %v", err)
	}
	if fi, err := os.Stat(filepath.Join(cfg.StateDir, "cache.db")); err != nil || fi.Size() == 0 {
		t.Fatalf("cache file after stop: %v", err)
	}
	if strings.Contains(logs.String(), tok.GetToken()) {
		t.Fatal("the token appears in the daemon's log")
	}
}

// TestRunRefusesBadConfig: each bad input stops Run before it serves, with
// an error naming what is wrong.
func TestRunRefusesBadConfig(t *testing.T) {
	dir := shortDir(t)
	wideKey := filepath.Join(dir, "wide.key")
	os.WriteFile(wideKey, bytes.Repeat([]byte{1}, 32), 0o644)
	shortKey := filepath.Join(dir, "short.key")
	os.WriteFile(shortKey, []byte("abc"), 0o600)
	for _, tc := range []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"missing policy", func(c *Config) { c.PolicyFile = filepath.Join(dir, "nope.yaml") }, "nope.yaml"},
		{"cache key readable by others", func(c *Config) { c.CacheKeyFile = wideKey }, "chmod 600"},
		{"cache key of the wrong size", func(c *Config) { c.CacheKeyFile = shortKey }, "cache key"},
		{"metrics on a public address", func(c *Config) { c.MetricsAddr = "0.0.0.0:9464" }, "0.0.0.0:9464"},
		{"token lifetime beyond Whop's", func(c *Config) { c.Lifetime = 4 * time.Hour }, "lifetime"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{Dev: true, Socket: filepath.Join(shortDir(t), "t.sock"), SocketMode: 0o600}
			tc.mod(&cfg)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err := Run(ctx, cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Run: %v, want an error mentioning %q", err, tc.want)
			}
		})
	}
}
