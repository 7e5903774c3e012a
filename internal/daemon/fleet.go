package daemon

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tokend/tokend/internal/fleet"
	"github.com/tokend/tokend/internal/refresher"
	"github.com/tokend/tokend/internal/safefile"
)

// FleetConfig turns on the tier shared with other hosts through Redis.
type FleetConfig struct {
	// Redis is the server's URL (redis://, rediss://, unix://); empty
	// means no fleet. It carries no password.
	Redis string
	// Username is the Redis ACL user, if any.
	Username string
	// PasswordFile holds the Redis password; empty: none.
	PasswordFile string
	// KeyFile holds the 32-byte fleet key, the same on every host.
	KeyFile string
	// LockLease is how long a host's mint lock outlives the host; zero
	// means fleet.DefaultLockLease.
	LockLease time.Duration
}

// openFleet connects the fleet tier, or returns nil without one. Redis
// being down is no error: the tier starts degraded and joins by itself.
func openFleet(cfg FleetConfig, log *slog.Logger) (*fleet.Fleet, error) {
	if cfg.Redis == "" {
		if cfg.KeyFile != "" || cfg.PasswordFile != "" {
			return nil, errors.New("--fleet-key-file and --fleet-redis-password-file need --fleet-redis")
		}
		return nil, nil
	}
	if cfg.KeyFile == "" {
		return nil, errors.New("--fleet-redis needs --fleet-key-file: 32 random bytes shared by every host of the fleet (head -c32 /dev/urandom > FILE; chmod 600 FILE)")
	}
	key, err := loadKey(cfg.KeyFile, "fleet key file")
	if err != nil {
		return nil, err
	}
	password, err := fleetPassword(cfg.PasswordFile)
	if err != nil {
		return nil, err
	}
	// go-redis logs each failed dial through a process-wide logger: send
	// those to debug, so that an outage is said once, by the fleet.
	redis.SetLogger(fleet.LibraryLogger{L: log.With("component", "redis")})
	return fleet.New(fleet.Config{URL: cfg.Redis, Username: cfg.Username, Password: password, Key: key, LockLease: cfg.LockLease, Logger: log.With("component", "fleet")})
}

func fleetPassword(file string) (string, error) {
	if file == "" {
		return "", nil
	}
	b, err := safefile.Read(file, safefile.Rules{What: "fleet Redis password file", Secret: true, MaxSize: maxSecretSize})
	if err != nil {
		return "", err
	}
	p := strings.TrimRight(string(b), "\r\n")
	if p == "" {
		return "", fmt.Errorf("fleet Redis password file %s is empty", file)
	}
	return p, nil
}

// fleetOf is f as the refresher's Fleet: nil stays a nil interface.
func fleetOf(f *fleet.Fleet) refresher.Fleet {
	if f == nil {
		return nil
	}
	return f
}
