package daemon

import (
	"bytes"
	"fmt"
	"log/slog"
	"path/filepath"
	"regexp"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/tokend/tokend/internal/refresher"
	"github.com/tokend/tokend/internal/safefile"
	"github.com/tokend/tokend/internal/whop"
)

// credentialSpec is one entry of the configuration file's credentials list.
type credentialSpec struct {
	Name string `yaml:"name"`
	// Kind is api_key (the default) or oauth_user.
	Kind string `yaml:"kind"`
	// File holds the secret; SystemdCredential names a file in
	// $CREDENTIALS_DIRECTORY instead. Exactly one is set.
	File              string `yaml:"file"`
	SystemdCredential string `yaml:"systemd_credential"`

	line int
}

type configFile struct {
	// APIVersionDate is sent as Api-Version-Date by every credential;
	// --api-version-date, when set, wins.
	APIVersionDate string      `yaml:"api_version_date"`
	Credentials    []yaml.Node `yaml:"credentials"`
}

// config is a parsed, validated configuration file.
type config struct {
	apiVersionDate string
	specs          []credentialSpec
}

var credentialName = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]{0,62}$`)

// parseConfig reads a configuration file, which must be owned by root or
// tokend's user and writable by no one else: it names the secrets. Errors
// name the file and line.
func parseConfig(path string) (config, error) {
	data, err := safefile.Read(path, safefile.Rules{What: "config file"})
	if err != nil {
		return config{}, err
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var cf configFile
	if err := dec.Decode(&cf); err != nil {
		return config{}, fmt.Errorf("%s: %v", path, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	if err := whop.ValidateAPIVersionDate(cf.APIVersionDate); err != nil {
		return config{}, fmt.Errorf("%s: api_version_date: %v", path, err)
	}
	if len(cf.Credentials) == 0 {
		return config{}, fmt.Errorf("%s: credentials: at least one credential is required", path)
	}
	var specs []credentialSpec
	seen := map[string]int{}
	for _, n := range cf.Credentials {
		var s credentialSpec
		if err := n.Decode(&s); err != nil {
			return config{}, fmt.Errorf("%s:%d: %v", path, n.Line, strings.TrimPrefix(err.Error(), "yaml: "))
		}
		s.line = n.Line
		at := fmt.Sprintf("%s:%d", path, n.Line)
		switch {
		case !credentialName.MatchString(s.Name):
			return config{}, fmt.Errorf("%s: name %q: want lower-case letters, digits, '.', '_' or '-', such as default or chat-app", at, s.Name)
		case seen[s.Name] != 0:
			return config{}, fmt.Errorf("%s: name %q is already used at line %d", at, s.Name, seen[s.Name])
		case s.Kind == "":
			s.Kind = "api_key"
		case s.Kind != "api_key" && s.Kind != "oauth_user":
			return config{}, fmt.Errorf("%s: kind %q: want api_key or oauth_user", at, s.Kind)
		}
		if (s.File == "") == (s.SystemdCredential == "") {
			return config{}, fmt.Errorf("%s: credential %q needs exactly one of file and systemd_credential", at, s.Name)
		}
		if s.File != "" && !filepath.IsAbs(s.File) {
			return config{}, fmt.Errorf("%s: file %q: want an absolute path", at, s.File)
		}
		seen[s.Name] = n.Line
		specs = append(specs, s)
	}
	return config{apiVersionDate: cf.APIVersionDate, specs: specs}, nil
}

// credentialSet holds the Whop clients of every configured credential and
// re-reads them on reload: a rotated secret is swapped into its client in
// place, a new name gets a client, a removed name is dropped.
type credentialSet struct {
	log     *slog.Logger
	file    string // the configuration file; "" means the one default key
	credDir string
	// flagVersion is --api-version-date, which wins over the file's;
	// version is the one in use.
	flagVersion, version string
	newWhop              func(key, apiVersionDate string) (*whop.Client, error)

	clients map[string]*whop.Client
	oauth   map[string]bool
}

// load reads every credential. With no configuration file, key is the
// default credential's secret, already loaded.
func (cs *credentialSet) load(key string) ([]refresher.Credential, error) {
	cs.clients, cs.oauth = map[string]*whop.Client{}, map[string]bool{}
	cs.version = cs.flagVersion
	if cs.file == "" {
		c, err := cs.newWhop(key, cs.version)
		if err != nil {
			return nil, err
		}
		cs.clients["default"] = c
		return cs.list(), nil
	}
	cfg, err := parseConfig(cs.file)
	if err != nil {
		return nil, err
	}
	cs.version = cs.versionFor(cfg)
	for _, s := range cfg.specs {
		secret, err := cs.read(s)
		if err != nil {
			return nil, err
		}
		c, err := cs.newWhop(secret, cs.version)
		if err != nil {
			return nil, fmt.Errorf("credential %q: %w", s.Name, err)
		}
		cs.clients[s.Name], cs.oauth[s.Name] = c, s.Kind == "oauth_user"
		cs.log.Info("credential loaded", "credential", s.Name, "kind", s.Kind, "key_fingerprint", shortFingerprint(c.KeyFingerprint()))
	}
	return cs.list(), nil
}

// reload re-reads the configuration file and every secret. Any failure
// keeps the whole current set, so a half-written file changes nothing.
func (cs *credentialSet) reload() ([]refresher.Credential, error) {
	cfg, err := parseConfig(cs.file)
	if err != nil {
		return nil, err
	}
	specs, version := cfg.specs, cs.versionFor(cfg)
	secrets := map[string]string{}
	for _, s := range specs {
		if secrets[s.Name], err = cs.read(s); err != nil {
			return nil, err
		}
		// Check every secret before changing anything: a bad one keeps the
		// whole current set, not half of it.
		if _, err := cs.newWhop(secrets[s.Name], version); err != nil {
			return nil, fmt.Errorf("credential %q: %w", s.Name, err)
		}
	}
	if version != cs.version {
		cs.log.Info("reload: Api-Version-Date changed", "old", cs.version, "new", version)
	}
	clients, oauth := map[string]*whop.Client{}, map[string]bool{}
	for _, s := range specs {
		c := cs.clients[s.Name]
		switch {
		case c == nil:
			if c, err = cs.newWhop(secrets[s.Name], version); err != nil {
				return nil, fmt.Errorf("credential %q: %w", s.Name, err)
			}
			cs.log.Info("reload: credential added", "credential", s.Name, "kind", s.Kind)
		default:
			old := c.KeyFingerprint()
			// Validated above, so neither can fail half-way through.
			if err := c.SetAPIVersionDate(version); err != nil {
				return nil, fmt.Errorf("credential %q: %w", s.Name, err)
			}
			if err := c.SetAPIKey(secrets[s.Name]); err != nil {
				return nil, fmt.Errorf("credential %q: %w", s.Name, err)
			}
			if !bytes.Equal(old, c.KeyFingerprint()) {
				cs.log.Info("reload: credential rotated", "credential", s.Name, "old_key_fingerprint", shortFingerprint(old), "key_fingerprint", shortFingerprint(c.KeyFingerprint()))
			}
		}
		clients[s.Name], oauth[s.Name] = c, s.Kind == "oauth_user"
	}
	for name := range cs.clients {
		if clients[name] == nil {
			cs.log.Info("reload: credential removed; its entries are evicted", "credential", name)
		}
	}
	cs.clients, cs.oauth, cs.version = clients, oauth, version
	return cs.list(), nil
}

// versionFor is the Api-Version-Date to send under cfg: the flag's if set
// (saying so when the file disagrees), else the file's.
func (cs *credentialSet) versionFor(cfg config) string {
	if cs.flagVersion == "" {
		return cfg.apiVersionDate
	}
	if cfg.apiVersionDate != "" && cfg.apiVersionDate != cs.flagVersion {
		cs.log.Warn("--api-version-date overrides the config file's api_version_date", "file", cs.file, "flag", cs.flagVersion, "file_value", cfg.apiVersionDate)
	}
	return cs.flagVersion
}

func (cs *credentialSet) read(s credentialSpec) (string, error) {
	src := KeySource{File: s.File}
	if s.SystemdCredential != "" {
		if cs.credDir == "" {
			return "", fmt.Errorf("credential %q: systemd_credential %q but $CREDENTIALS_DIRECTORY is not set", s.Name, s.SystemdCredential)
		}
		src.File = filepath.Join(cs.credDir, s.SystemdCredential)
	}
	secret, _, err := LoadAPIKey(src)
	if err != nil {
		return "", fmt.Errorf("credential %q: %w", s.Name, err)
	}
	return secret, nil
}

func (cs *credentialSet) list() []refresher.Credential {
	var out []refresher.Credential
	for name, c := range cs.clients {
		out = append(out, refresher.Credential{Name: name, Fetcher: c, OAuthUser: cs.oauth[name]})
	}
	return out
}
