package daemon

import (
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/user"
	"strconv"
	"strings"
	"syscall"

	"github.com/tokend/tokend/internal/audit"
	"github.com/tokend/tokend/internal/safefile"
)

// loadCacheKey reads the key that seals tokens at rest.
func loadCacheKey(path string) ([]byte, error) { return loadKey(path, "cache key file") }

// loadKey reads a 32-byte key: 32 raw bytes, or 64 hex digits (a trailing
// newline is ignored). The file must be owned by root or tokend's user and
// not readable or writable by group or others. Errors never show the key.
func loadKey(path, what string) ([]byte, error) {
	if path == "" {
		return nil, nil
	}
	b, err := safefile.Read(path, safefile.Rules{What: what, Secret: true, MaxSize: maxSecretSize})
	if err != nil {
		return nil, err
	}
	if len(b) == 32 {
		return b, nil
	}
	if h := strings.TrimSpace(string(b)); len(h) == 64 {
		if k, err := hex.DecodeString(h); err == nil {
			return k, nil
		}
	}
	return nil, fmt.Errorf("%s %s: want 32 random bytes (head -c32 /dev/urandom > %s) or 64 hex digits, found %d bytes", what, path, path, len(b))
}

// lookupGroup resolves a group name or numeric gid.
func lookupGroup(name string) (uint32, error) {
	if n, err := strconv.ParseUint(name, 10, 32); err == nil {
		return uint32(n), nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, fmt.Errorf("--admin-group %q: %w", name, err)
	}
	n, err := strconv.ParseUint(g.Gid, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("--admin-group %q: gid %q: %w", name, g.Gid, err)
	}
	return uint32(n), nil
}

// openAudit opens the audit trail: JSON lines appended to path, or lines on
// the daemon's log (stderr, the journal) with logger=audit.
func openAudit(path string, log *slog.Logger) (*audit.Trail, func(), error) {
	if path == "" {
		return audit.New(audit.Config{Logger: log.With("logger", "audit")}), func() {}, nil
	}
	// O_NOFOLLOW: a link planted at the path must not aim root's appends
	// at another file.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND|syscall.O_NOFOLLOW, 0o600)
	if errors.Is(err, syscall.ELOOP) {
		return nil, nil, fmt.Errorf("audit log %s is a symbolic link; tokend does not follow it: give the file's own path", path)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("open audit log: %w", err)
	}
	return audit.New(audit.Config{Logger: slog.New(slog.NewJSONHandler(f, nil))}), func() { f.Close() }, nil
}
