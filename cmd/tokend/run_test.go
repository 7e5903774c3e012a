package main

import (
	"io"
	"strings"
	"testing"
	"time"
)

// TestFlagErrors: each bad flag or environment value is refused with a
// message naming it and what is expected.
func TestFlagErrors(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		wantErr string
	}{
		{"negative gc headroom", []string{"--dev", "--gc-headroom-mib", "-1"}, nil, "--gc-headroom-mib -1: must be between 0 (off) and 1024"},
		{"huge gc headroom", []string{"--dev", "--gc-headroom-mib", "1025"}, nil, "--gc-headroom-mib 1025"},
		{"gc headroom env not a number", []string{"--dev"}, map[string]string{"TOKEND_GC_HEADROOM_MIB": "lots"}, "TOKEND_GC_HEADROOM_MIB"},
		{"zero streams", []string{"--dev", "--max-streams", "0"}, nil, "--max-streams 0: must be positive"},
		{"lifetime above Whop's maximum", []string{"--dev", "--token-lifetime", "4h"}, nil, "--token-lifetime 4h0m0s"},
		{"socket mode not octal", []string{"--dev", "--socket-mode", "rw"}, nil, `--socket-mode "rw"`},
		{"retry max below initial", []string{"--dev", "--retry-initial", "10s", "--retry-max", "1s"}, nil, "--retry-max 1s"},
		{"zero per-uid cap", []string{"--dev", "--max-connections-per-uid", "0"}, nil, "--max-connections-per-uid 0: must be positive"},
		{"reserve as large as the total", []string{"--dev", "--max-connections", "8", "--admin-connection-reserve", "8"}, nil, "--admin-connection-reserve 8: must be at least 0 and below --max-connections 8"},
		{"negative reserve", []string{"--dev", "--admin-connection-reserve", "-1"}, nil, "--admin-connection-reserve -1"},
		{"zero handshake timeout", []string{"--dev", "--handshake-timeout", "0s"}, nil, "--handshake-timeout 0s: must be positive"},
		{"idle timeout env unparsable", []string{"--dev"}, map[string]string{"TOKEND_IDLE_TIMEOUT": "later"}, "TOKEND_IDLE_TIMEOUT"},
		{"env duration unparsable", []string{"--dev"}, map[string]string{"TOKEND_RETRY_MAX": "soon"}, "TOKEND_RETRY_MAX"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			getenv := func(k string) string { return tt.env[k] }
			o, setSocket, err := parseFlags(tt.args, io.Discard, getenv)
			if err == nil {
				_, err = buildConfig(o, setSocket, getenv)
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestFlagDefaults(t *testing.T) {
	getenv := func(k string) string { return map[string]string{"TOKEND_GC_HEADROOM_MIB": "0"}[k] }
	o, _, err := parseFlags([]string{"--dev"}, io.Discard, getenv)
	if err != nil {
		t.Fatal(err)
	}
	if o.gcHeadroomMiB != 0 {
		t.Errorf("TOKEND_GC_HEADROOM_MIB=0 gave %d MiB", o.gcHeadroomMiB)
	}
	o, _, err = parseFlags([]string{"--dev"}, io.Discard, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if o.gcHeadroomMiB != 16 || o.maxStreams != 128 || o.maxEntries != 100_000 {
		t.Errorf("defaults: gc headroom %d MiB, max streams %d, max entries %d", o.gcHeadroomMiB, o.maxStreams, o.maxEntries)
	}
	if o.maxConns != 1024 || o.maxConnsPerUID != 64 || o.adminConnReserve != 16 || o.handshakeTimeout != 5*time.Second || o.idleTimeout != 5*time.Minute {
		t.Errorf("connection defaults: max %d, per uid %d, reserve %d, handshake %v, idle %v", o.maxConns, o.maxConnsPerUID, o.adminConnReserve, o.handshakeTimeout, o.idleTimeout)
	}
	cfg, err := buildConfig(o, false, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if cfg.AdminConnReserve != 16 {
		t.Errorf("reserve 16 reached the config as %d", cfg.AdminConnReserve)
	}
	o.adminConnReserve = 0
	if cfg, _ = buildConfig(o, false, func(string) string { return "" }); cfg.AdminConnReserve != -1 {
		t.Errorf("--admin-connection-reserve 0 reached the config as %d, want -1 (none)", cfg.AdminConnReserve)
	}
}
