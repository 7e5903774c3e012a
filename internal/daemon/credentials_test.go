package daemon

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tokend/tokend/internal/whop"
)

// TestConfigAPIVersionDate: the configuration file's api_version_date is
// validated with the file's name, sent by every credential, loses to the
// flag, and a reload applies a change to the clients in place.
func TestConfigAPIVersionDate(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, []byte("whop_test_key_0123456789"), 0o600); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "tokend.yaml")
	write := func(version string) {
		t.Helper()
		body := "credentials:\n  - name: default\n    file: " + keyFile + "\n  - name: other\n    file: " + keyFile + "\n"
		if version != "" {
			body = "api_version_date: " + version + "\n" + body
		}
		if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	newSet := func(flag string) *credentialSet {
		return &credentialSet{
			log: slog.New(slog.DiscardHandler), file: conf, flagVersion: flag,
			newWhop: func(key, v string) (*whop.Client, error) {
				return whop.New(whop.Config{APIKey: key, APIVersionDate: v})
			},
		}
	}
	sent := func(cs *credentialSet) map[string]string {
		out := map[string]string{}
		for name, c := range cs.clients {
			out[name] = c.APIVersionDate()
		}
		return out
	}
	want := func(cs *credentialSet, v string) {
		t.Helper()
		for name, got := range sent(cs) {
			if got != v {
				t.Errorf("credential %s sends Api-Version-Date %q, want %q", name, got, v)
			}
		}
	}

	for _, tc := range []struct {
		name, file, flag, want, wantErr string
	}{
		{name: "none", want: ""},
		{name: "file", file: "2025-06-01", want: "2025-06-01"},
		{name: "flag wins", file: "2025-06-01", flag: "2026-01-15", want: "2026-01-15"},
		{name: "flag alone", flag: "2026-01-15", want: "2026-01-15"},
		{name: "newer than this build", file: "2030-01-01", wantErr: conf + `: api_version_date: api version date "2030-01-01": later than ` + whop.NewestAPIVersionDate},
		{name: "not a date", file: "latest", wantErr: conf + `: api_version_date: api version date "latest": want a calendar date YYYY-MM-DD`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			write(tc.file)
			cs := newSet(tc.flag)
			_, err := cs.load("")
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("load: %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want(cs, tc.want)
		})
	}

	t.Run("reload", func(t *testing.T) {
		write("2025-06-01")
		cs := newSet("")
		if _, err := cs.load(""); err != nil {
			t.Fatal(err)
		}
		before := cs.clients["default"]
		write("2026-02-01")
		if _, err := cs.reload(); err != nil {
			t.Fatal(err)
		}
		if cs.clients["default"] != before {
			t.Fatal("a version change replaced the client (its entries would be evicted)")
		}
		want(cs, "2026-02-01")
		write("2099-01-01")
		if _, err := cs.reload(); err == nil || !strings.Contains(err.Error(), "api_version_date") {
			t.Fatalf("reload of a version this build does not know: %v", err)
		}
		want(cs, "2026-02-01")
	})
}
