package daemon

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// KeySource says where LoadAPIKey looks, in order.
type KeySource struct {
	// File is --api-key-file.
	File string
	// CredentialsDir is systemd's $CREDENTIALS_DIRECTORY; the key is the
	// file whop-api-key in it.
	CredentialsDir string
	// Env is the value of WHOP_API_KEY.
	Env string
}

// LoadAPIKey returns the API key from the first source that is set. A key
// file readable by group or others is refused. Errors name where the key
// was looked for, never the key.
func LoadAPIKey(src KeySource) (key, from string, err error) {
	switch {
	case src.File != "":
		return readKeyFile(src.File)
	case src.CredentialsDir != "":
		return readKeyFile(filepath.Join(src.CredentialsDir, "whop-api-key"))
	case src.Env != "":
		if k := strings.TrimSpace(src.Env); k != "" {
			return k, "WHOP_API_KEY", nil
		}
		return "", "", errors.New("WHOP_API_KEY is set but empty")
	}
	return "", "", errors.New("no Whop API key: looked for --api-key-file (TOKEND_API_KEY_FILE), $CREDENTIALS_DIRECTORY/whop-api-key and WHOP_API_KEY; set one, or run with --dev for a fake upstream")
}

func readKeyFile(path string) (string, string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", "", fmt.Errorf("read API key file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return "", "", fmt.Errorf("API key file %s is mode %04o, readable by group or others; run chmod 600 %s", path, fi.Mode().Perm(), path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", "", fmt.Errorf("read API key file: %w", err)
	}
	k := strings.TrimSpace(string(b))
	if k == "" {
		return "", "", fmt.Errorf("API key file %s is empty", path)
	}
	return k, path, nil
}
