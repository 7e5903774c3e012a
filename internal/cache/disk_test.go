package cache

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	berrors "go.etcd.io/bbolt/errors"
	"golang.org/x/sys/unix"

	"github.com/tokend/tokend/internal/cache/cachetest"
	"github.com/tokend/tokend/internal/clock"
)

// mountTmpfs mounts a tmpfs of size bytes on a fresh directory, unmounted
// at cleanup. It skips only where mounting is not permitted, and never in
// CI (TOKEND_E2E_REQUIRE_SYSTEMD=1), where the tests run as root.
func mountTmpfs(t *testing.T, size int) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		if os.Getenv("TOKEND_E2E_REQUIRE_SYSTEMD") == "1" {
			t.Fatalf("mount tmpfs on %s: %v (CI runs as root and must be able to)", dir, err)
		}
		t.Skipf("mount tmpfs on %s: %v (needs root or CAP_SYS_ADMIN)", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// fill fills the filesystem under dir and returns how to free it.
func fill(t *testing.T, dir string) (free func()) {
	t.Helper()
	p, err := cachetest.FillDisk(dir)
	if err != nil {
		t.Fatal(err)
	}
	return func() {
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
	}
}

func remount(t *testing.T, dir string, flags uintptr) {
	t.Helper()
	if err := unix.Mount("", dir, "", unix.MS_REMOUNT|flags, ""); err != nil {
		t.Fatalf("remount %s: %v", dir, err)
	}
}

// seed writes n records with tokens of size bytes and closes the store.
func seed(t *testing.T, cfg Config, from, n, size int) {
	t.Helper()
	s, _, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for i := from; i < from+n; i++ {
		k := NewKey("cred", fmt.Sprintf("biz_%d", i), "", nil)
		s.Put(enc(k), record(k, strings.Repeat("t", size), t0.Add(time.Hour)))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

func asideFiles(t *testing.T, path string) []string {
	t.Helper()
	m, err := filepath.Glob(path + ".corrupt-*")
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestDiskFaults: a full or read-only filesystem under the cache, for real
// on a small tmpfs. Open succeeds and serves what it could read, nothing is
// moved aside, writes fail with the reason in WriteStatus, and once the disk
// is back the queued changes reach the file.
func TestDiskFaults(t *testing.T) {
	tests := []struct {
		name string
		// seeded records are in the file before the fault.
		seeded int
		// fault breaks the disk under dir and returns how to repair it.
		fault   func(t *testing.T, dir string) (repair func())
		wantErr error
	}{
		{"full disk, no file yet", 0, fill, unix.ENOSPC},
		{"full disk, file with records", 200, fill, unix.ENOSPC},
		{"read-only, file with records", 200, func(t *testing.T, dir string) func() {
			remount(t, dir, unix.MS_RDONLY)
			return func() { remount(t, dir, 0) }
		}, unix.EROFS},
		{"read-only, no file yet", 0, func(t *testing.T, dir string) func() {
			remount(t, dir, unix.MS_RDONLY)
			return func() { remount(t, dir, 0) }
		}, unix.EROFS},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := mountTmpfs(t, 1<<20)
			cfg := Config{Path: filepath.Join(dir, "cache.db"), Clock: clock.NewFake(t0)}
			if tt.seeded > 0 {
				seed(t, cfg, 0, tt.seeded, 100)
			}
			var salt []byte
			if tt.seeded > 0 {
				s, _, err := Open(cfg)
				if err != nil {
					t.Fatal(err)
				}
				salt = bytes.Clone(s.Salt())
				s.Close()
			}
			repair := tt.fault(t, dir)

			var logs bytes.Buffer
			cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
			s, stats, err := Open(cfg)
			if err != nil {
				t.Fatalf("Open on a broken disk: %v; want it to serve from memory", err)
			}
			t.Logf("Open: %+v", stats)
			if stats.Loaded != tt.seeded || len(s.Loaded()) != tt.seeded {
				t.Errorf("Loaded = %d, want the %d records in the file", stats.Loaded, tt.seeded)
			}
			if salt != nil && !bytes.Equal(s.Salt(), salt) {
				t.Error("Salt is not the file's: fingerprints of the loaded records would not match")
			}
			if a := asideFiles(t, cfg.Path); len(a) != 0 || stats.MovedAside != "" {
				t.Errorf("moved aside for an environmental error: %v %q", a, stats.MovedAside)
			}
			// Writes that need new pages: 300 records of 1 KiB.
			for i := 1000; i < 1300; i++ {
				k := NewKey("cred", fmt.Sprintf("biz_%d", i), "", nil)
				s.Put(enc(k), record(k, strings.Repeat("n", 1024), t0.Add(time.Hour)))
			}
			ferr := s.Flush()
			pending, werr := s.WriteStatus()
			t.Logf("on the broken disk: Flush = %v; pending %d", ferr, pending)
			if !errors.Is(ferr, tt.wantErr) || !errors.Is(werr, tt.wantErr) || pending < 300 {
				t.Fatalf("Flush = %v, WriteStatus = %d, %v; want %v and 300 pending", ferr, pending, werr, tt.wantErr)
			}
			if unavailable := errors.Is(werr, ErrUnavailable); unavailable != (stats.Unavailable != nil) {
				t.Errorf("WriteStatus error %v: ErrUnavailable %v, but Open's Unavailable = %v", werr, unavailable, stats.Unavailable)
			}
			if a := asideFiles(t, cfg.Path); len(a) != 0 {
				t.Errorf("moved aside after a failed write: %v", a)
			}

			repair()
			mustFlush(t, s)
			if _, werr := s.WriteStatus(); werr != nil {
				t.Errorf("after repair: WriteStatus error %v", werr)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			checkDB(t, cfg.Path)
			s, stats, err = Open(cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if want := tt.seeded + 300; stats.Loaded != want || stats.Unavailable != nil {
				t.Errorf("reopen after repair: %+v, want %d loaded from the file", stats, want)
			}
			if salt != nil && !bytes.Equal(s.Salt(), salt) {
				t.Error("Salt changed across the fault")
			}
			if !strings.Contains(logs.String(), "nothing was moved aside") && stats.Unavailable != nil {
				t.Errorf("log does not say the file was kept:\n%s", logs.String())
			}
		})
	}
}

// TestEnvironmental: the errors that say the disk, not the file, is at
// fault; a file failing with them is never moved aside.
func TestEnvironmental(t *testing.T) {
	tests := []struct {
		err  error
		want bool
	}{
		{&fs.PathError{Op: "write", Path: "cache.db", Err: unix.ENOSPC}, true},
		{&fs.PathError{Op: "write", Path: "cache.db", Err: unix.EDQUOT}, true},
		{&fs.PathError{Op: "write", Path: "cache.db", Err: unix.EFBIG}, true},
		{&fs.PathError{Op: "open", Path: "cache.db", Err: unix.EROFS}, true},
		{&fs.PathError{Op: "read", Path: "cache.db", Err: unix.EIO}, true},
		{&fs.PathError{Op: "open", Path: "cache.db", Err: unix.EACCES}, true},
		{&fs.PathError{Op: "chmod", Path: "cache.db", Err: unix.EPERM}, true},
		{fmt.Errorf("sync: %w", unix.EIO), true},
		{berrors.ErrInvalid, false},
		{berrors.ErrChecksum, false},
		{berrors.ErrVersionMismatch, false},
		{fmt.Errorf("%w: page 7 invalid", errDamaged), false},
		{berrors.ErrTimeout, false},
	}
	for _, tt := range tests {
		t.Run(tt.err.Error(), func(t *testing.T) {
			if got := environmental(tt.err); got != tt.want {
				t.Errorf("environmental(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

// TestSalvageDamagedLeaf: one leaf page of 200 records overwritten with
// random bytes costs the records on that page and no other; the count kept
// in the file says exactly how many were lost.
func TestSalvageDamagedLeaf(t *testing.T) {
	cfg := testConfig(t, clock.NewFake(t0))
	seed(t, cfg, 0, 200, 100)
	onVictim, err := cachetest.DamageLeaf(cfg.Path)
	if err != nil {
		t.Fatal(err)
	}
	s, stats, closeS := openStore(t, cfg)
	t.Logf("the damaged page held %d records: %+v", onVictim, stats)
	if stats.MovedAside == "" {
		t.Fatalf("a file with a damaged page was not moved aside: %+v", stats)
	}
	if stats.Salvaged != 200-onVictim || stats.Lost != onVictim || stats.Loaded != stats.Salvaged {
		t.Errorf("LoadStats = %+v; want %d salvaged, %d lost", stats, 200-onVictim, onVictim)
	}
	if got := len(s.Loaded()); got != 200-onVictim {
		t.Errorf("Loaded %d records, want %d", got, 200-onVictim)
	}
	closeS()
	// The salvaged records are in the fresh file.
	if n := len(fileValues(t, cfg.Path)); n != 200-onVictim {
		t.Errorf("fresh file holds %d records, want %d", n, 200-onVictim)
	}
}

// TestReopenRetriedWithoutWrites: a store serving from memory keeps trying
// to open its file on its own, on a doubling delay, so that it becomes
// persistent again after the disk recovers even if nothing new is written.
func TestReopenRetriedWithoutWrites(t *testing.T) {
	dir := mountTmpfs(t, 1<<20)
	remount(t, dir, unix.MS_RDONLY)
	synctest.Test(t, func(t *testing.T) {
		cfg := Config{Path: filepath.Join(dir, "cache.db"), RetryDelay: time.Second, RetryMax: 8 * time.Second}
		s, stats, err := Open(cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if !errors.Is(stats.Unavailable, unix.EROFS) {
			t.Fatalf("Open on a read-only tmpfs: Unavailable = %v, want EROFS", stats.Unavailable)
		}
		k := NewKey("cred", "biz_retry", "", nil)
		s.Put(enc(k), record(k, "tok", time.Now().Add(time.Hour)))
		// Failures at 10ms, then 1s, 2s, 4s, 8s, 8s... later.
		time.Sleep(20 * time.Second)
		synctest.Wait()
		if _, werr := s.WriteStatus(); !errors.Is(werr, ErrUnavailable) || !errors.Is(werr, unix.EROFS) {
			t.Fatalf("after 20s read-only: WriteStatus error %v, want ErrUnavailable and EROFS", werr)
		}
		remount(t, dir, 0)
		start := time.Now()
		for {
			if pending, werr := s.WriteStatus(); pending == 0 && werr == nil {
				break
			}
			if time.Since(start) > cfg.RetryMax {
				t.Fatalf("not persistent %v after the disk became writable (RetryMax %v)", time.Since(start), cfg.RetryMax)
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Logf("persistent again %v after the disk became writable, with no new write", time.Since(start))
	})
	checkDB(t, filepath.Join(dir, "cache.db"))
}
