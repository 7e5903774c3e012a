package daemon

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/tokend/tokend/internal/safefile"
)

// maxSecretSize bounds a key file: an API key or OAuth token is well under
// a kilobyte, and a larger file is not one.
const maxSecretSize = 64 << 10

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
// file readable by group or others, writable by group or others, or owned
// by a user other than root and tokend's is refused (see safefile). Errors
// name where the key was looked for, never the key.
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
	b, err := safefile.Read(path, safefile.Rules{What: "API key file", Secret: true, MaxSize: maxSecretSize})
	if err != nil {
		return "", "", err
	}
	k := strings.TrimSpace(string(b))
	if k == "" {
		return "", "", fmt.Errorf("API key file %s is empty", path)
	}
	return k, path, nil
}
