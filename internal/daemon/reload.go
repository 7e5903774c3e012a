package daemon

import (
	"bytes"
	"context"
	"encoding/hex"
	"log/slog"
	"path/filepath"
	"strings"
	"sync/atomic"

	"github.com/tokend/tokend/internal/policy"
	"github.com/tokend/tokend/internal/refresher"
)

// initialKey fills cfg.APIKey from cfg.Keys unless dev mode or the caller
// already set one, and says where it came from (never the key).
func initialKey(cfg *Config) (from string, err error) {
	switch {
	case cfg.Dev:
		return "dev mode", nil
	case cfg.ConfigFile != "":
		return "credentials of " + cfg.ConfigFile, nil
	case cfg.APIKey != "":
		return "Config.APIKey", nil
	}
	cfg.APIKey, from, err = LoadAPIKey(cfg.Keys)
	return from, err
}

// reloader re-reads what a reload (SIGHUP, systemctl reload) may change:
// the API key, from the same source as at start. Connections, the cache and
// every other setting stay as they are. A source that fails to load keeps
// the current key.
type reloader struct {
	log   *slog.Logger
	keys  KeySource
	creds *credentialSet
	ref   *refresher.Refresher
	sd    *notifier
	// fixed says why the key cannot be re-read, or "" when it can.
	fixed string
	// policyFile is re-read into policy on reload, when set.
	policyFile string
	policy     *atomic.Pointer[policy.Policy]
}

func newReloader(cfg Config, from string, log *slog.Logger, creds *credentialSet, ref *refresher.Refresher, n *notifier) *reloader {
	r := &reloader{log: log, keys: cfg.Keys, creds: creds, ref: ref, sd: n}
	switch {
	case cfg.Dev:
		r.fixed = "dev mode uses a generated key and the fake upstream"
	case from == "Config.APIKey":
		r.fixed = "the API key was given directly, not from a file or the environment"
	}
	return r
}

// run reloads once per value received from reload or changed until ctx
// ends.
func (r *reloader) run(ctx context.Context, reload, changed <-chan struct{}) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-reload:
			r.reload()
		case <-changed:
			r.reload()
		}
	}
}

// watched are the files whose change reloads by itself: the API key
// file, or the config file and the credentials it names.
func (r *reloader) watched() []string {
	if r.fixed != "" {
		return nil
	}
	if r.creds.file == "" {
		if r.keys.File != "" {
			return []string{r.keys.File}
		}
		if r.keys.CredentialsDir != "" {
			return []string{filepath.Join(r.keys.CredentialsDir, "whop-api-key")}
		}
		return nil
	}
	files := []string{r.creds.file}
	if cfg, err := parseConfig(r.creds.file); err == nil {
		for _, s := range cfg.specs {
			if s.File != "" {
				files = append(files, s.File)
			}
		}
	}
	return files
}

func (r *reloader) reload() {
	r.sd.reloading()
	defer r.sd.ready()
	r.reloadPolicy()
	if r.creds.file != "" {
		list, err := r.creds.reload()
		if err != nil {
			r.log.Error("reload: keeping the current credentials", "err", err)
			return
		}
		if err := r.ref.SetCredentials(list); err != nil {
			r.log.Error("reload: keeping the current credentials", "err", err)
		}
		return
	}
	if r.fixed != "" {
		r.log.Info("reload: nothing to re-read", "reason", r.fixed)
		return
	}
	client := r.creds.clients["default"]
	key, from, err := LoadAPIKey(r.keys)
	if err != nil {
		r.log.Error("reload: keeping the current API key", "err", err)
		return
	}
	old := client.KeyFingerprint()
	if err := client.SetAPIKey(key); err != nil {
		r.log.Error("reload: keeping the current API key", "source", from, "err", err)
		return
	}
	fp := client.KeyFingerprint()
	// Clears a 401 lockout too, so re-enabling a key at Whop and reloading
	// works without a restart.
	if err := r.ref.SetCredentials(r.creds.list()); err != nil {
		r.log.Error("reload: credentials", "err", err)
	}
	if bytes.Equal(old, fp) {
		r.log.Info("reload: API key unchanged", "source", from, "key_fingerprint", shortFingerprint(fp))
		return
	}
	r.log.Info("reload: API key replaced; tokens of the old key are minted again on their next use", "source", from,
		"old_key_fingerprint", shortFingerprint(old), "key_fingerprint", shortFingerprint(fp))
}

// shortFingerprint is enough of the salted key fingerprint to tell keys
// apart in logs.
func shortFingerprint(fp []byte) string {
	return hex.EncodeToString(fp[:min(len(fp), 4)])
}

// reloadPolicy re-reads the policy file; a file that no longer parses keeps
// the policy in force.
func (r *reloader) reloadPolicy() {
	if r.policyFile == "" {
		return
	}
	p, err := policy.Load(r.policyFile)
	if err != nil {
		r.log.Error("reload: keeping the current policy", "err", err)
		return
	}
	r.policy.Store(p)
	r.log.Info("reload: policy loaded", "file", r.policyFile, "rules", strings.Join(p.Rules(), ","))
}
