package cache

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/clock"
)

// TestStateDirLinks: links planted in the state directory are never
// followed. One at the pid file is replaced by the pid file; one at the
// cache file is refused, naming it; the files they point to keep their
// mode and content.
func TestStateDirLinks(t *testing.T) {
	tests := []struct {
		name    string
		link    func(dbPath string) string
		wantErr string // "" means Open succeeds
	}{
		{"pid file", pidPath, ""},
		{"cache file", func(p string) string { return p }, "is a symbolic link"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(t, clock.NewFake(t0))
			must(t, os.MkdirAll(filepath.Dir(cfg.Path), 0o700))
			target := filepath.Join(t.TempDir(), "root-file")
			must(t, os.WriteFile(target, []byte("precious\n"), 0o600))
			must(t, os.Symlink(target, tt.link(cfg.Path)))

			s, _, err := Open(cfg)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Open: %v", err)
				}
				fi, err := os.Lstat(pidPath(cfg.Path))
				if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o600 {
					t.Fatalf("pid file after Open: %v, %v; want a regular 0600 file in place of the link", fi.Mode(), err)
				}
				if b, _ := os.ReadFile(pidPath(cfg.Path)); strings.TrimSpace(string(b)) != strconv.Itoa(os.Getpid()) {
					t.Fatalf("pid file holds %q, want %d", b, os.Getpid())
				}
				must(t, s.Close())
			} else if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), cfg.Path) {
				if s != nil {
					s.Close()
				}
				t.Fatalf("Open: %v; want an error naming %s and saying %q", err, cfg.Path, tt.wantErr)
			}
			fi, err := os.Stat(target)
			if err != nil || fi.Mode().Perm() != 0o600 {
				t.Fatalf("link target mode %v, %v; want 0600 unchanged", fi.Mode().Perm(), err)
			}
			if b, _ := os.ReadFile(target); string(b) != "precious\n" {
				t.Fatalf("link target content %q changed", b)
			}
		})
	}
}

// TestReadPIDShowsOnlyDigits: the pid file's content goes into the error a
// second tokend prints, so a file with anything but a pid shows nothing.
func TestReadPIDShowsOnlyDigits(t *testing.T) {
	dir := t.TempDir()
	db := filepath.Join(dir, "cache.db")
	d, err := os.Open(dir)
	must(t, err)
	defer d.Close()
	for _, tt := range []struct{ content, want string }{
		{"1234\n", "1234"},
		{"root:x:0:0:root:/root:/bin/bash\n", ""},
		{strings.Repeat("9", 40), ""},
		{"", ""},
	} {
		must(t, os.WriteFile(pidPath(db), []byte(tt.content), 0o600))
		if got := readPID(d, db); got != tt.want {
			t.Errorf("readPID of %q = %q, want %q", tt.content, got, tt.want)
		}
	}
}

// TestStateDirOwner: a state directory another non-root user owns is
// refused, naming it and its owner; tokend does not narrow its mode.
func TestStateDirOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give the directory to another uid")
	}
	cfg := testConfig(t, clock.NewFake(t0))
	dir := filepath.Dir(cfg.Path)
	must(t, os.Mkdir(dir, 0o755))
	must(t, os.Chown(dir, 65534, 65534))
	cfg.OpenTimeout = time.Second
	s, _, err := Open(cfg)
	if err == nil {
		s.Close()
		t.Fatal("Open in a directory owned by uid 65534 succeeded")
	}
	if !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), "owned by uid 65534") {
		t.Fatalf("Open: %v; want an error naming %s and its owner", err, dir)
	}
	if _, err := os.Lstat(cfg.Path); !os.IsNotExist(err) {
		t.Fatalf("Open created %s in the refused directory: %v", cfg.Path, err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
