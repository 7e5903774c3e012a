package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tokend/tokend/internal/cache/cachetest"
	"github.com/tokend/tokend/internal/daemontest"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// mountOrSkip mounts (or remounts) with unix.Mount, undone at cleanup. It
// skips only where mounting is not permitted, and never in CI
// (TOKEND_E2E_REQUIRE_SYSTEMD=1), which runs as root.
func mountOrSkip(t *testing.T, src, dst, fstype string, flags uintptr, data string) {
	t.Helper()
	if err := unix.Mount(src, dst, fstype, flags, data); err != nil {
		if os.Getenv("TOKEND_E2E_REQUIRE_SYSTEMD") == "1" {
			t.Fatalf("mount %s on %s: %v (CI runs as root and must be able to)", fstype, dst, err)
		}
		t.Skipf("mount %s on %s: %v (needs root or CAP_SYS_ADMIN); TestFaultDiskFileSizeLimit covers a full disk without mounts", fstype, dst, err)
	}
	if flags&unix.MS_REMOUNT == 0 {
		t.Cleanup(func() {
			if err := unix.Unmount(dst, unix.MNT_DETACH); err != nil {
				t.Errorf("unmount %s: %v", dst, err)
			}
		})
	}
}

// fillDisk fills the filesystem under dir and returns how to free it.
func fillDisk(t *testing.T, dir string) (free func()) {
	t.Helper()
	p, err := cachetest.FillDisk(dir)
	must(t, err)
	return func() { must(t, os.Remove(p)) }
}

// waitPersistent polls GetStatus until no cache write is failing.
func (e *env) waitPersistent(t *testing.T) *tokendv1.Status {
	t.Helper()
	deadline := time.Now().Add(40 * time.Second)
	for {
		st := e.status(t)
		if st.CacheWriteError == "" && !st.CacheMemoryOnly && st.CachePendingWrites == 0 {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("cache writes still failing after 40s: %q, %d pending, memory only %v", st.CacheWriteError, st.CachePendingWrites, st.CacheMemoryOnly)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitFailing polls GetStatus until a cache write has failed with want in
// its error.
func (e *env) waitFailing(t *testing.T, want string) *tokendv1.Status {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st := e.status(t)
		if strings.Contains(st.CacheWriteError, want) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("no cache write error with %q after 20s; status says %q", want, st.CacheWriteError)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkServedFromCache fetches keys [0, n) and fails if any costs an
// upstream call: proof they were loaded from the file.
func (e *env) checkServedFromCache(t *testing.T, n int) {
	t.Helper()
	before := e.fake.CallCount()
	warm(t, e.tokens(), n)
	if calls := e.fake.CallCount() - before; calls != 0 {
		t.Fatalf("%d of %d keys cost an upstream call after the restart: their writes did not persist", calls, n)
	}
}

func noneMovedAside(t *testing.T, stateDir string) {
	t.Helper()
	if m, _ := filepath.Glob(filepath.Join(stateDir, "cache.db.corrupt-*")); len(m) != 0 {
		t.Fatalf("moved aside for an environmental error: %v", m)
	}
}

func healthServing(t *testing.T, e *env) {
	t.Helper()
	if err := daemontest.HealthServing(ctx(t), e.dial()); err != nil {
		t.Fatalf("health: %v, want SERVING", err)
	}
}

// TestFaultDiskFull: the state directory is a 4 MiB tmpfs, filled up. With
// or without a cache file, tokend starts, serves, keeps every token in
// memory, says so in its log and status, moves nothing aside, and writes
// everything once the disk has room: a restart then serves every key
// without an upstream call.
func TestFaultDiskFull(t *testing.T) {
	for _, existing := range []int{0, 200} {
		t.Run(fmt.Sprintf("%d entries in the file", existing), func(t *testing.T) {
			e := newEnv(t)
			must(t, os.MkdirAll(e.stateDir, 0o700))
			mountOrSkip(t, "tmpfs", e.stateDir, "tmpfs", 0, "size=4m,mode=0700")
			if existing > 0 {
				d := e.start(fast...)
				warm(t, e.tokens(), existing)
				d.stop()
			}
			free := fillDisk(t, e.stateDir)
			d := e.start(fast...)
			healthServing(t, e)
			const more = 200
			start := time.Now()
			warm(t, e.tokens(), existing+more)
			served := time.Since(start)
			st := e.waitFailing(t, "no space left on device")
			t.Logf("disk full, %d entries in the file: tokend serves %d keys (%v); status: memory only %v, %d pending, %q",
				existing, existing+more, served.Round(time.Millisecond), st.CacheMemoryOnly, st.CachePendingWrites, st.CacheWriteError)
			// With a file, some writes may land in pages bbolt had already
			// allocated before the disk filled; the restart below checks
			// that none is lost.
			if st.Entries != uint64(existing+more) || st.CachePendingWrites == 0 || existing == 0 && st.CachePendingWrites < more {
				t.Errorf("status: %d entries, %d pending; want %d entries and writes pending (all %d without a file)", st.Entries, st.CachePendingWrites, existing+more, more)
			}
			// Without a file to open, the store is memory-only; with one,
			// bbolt opened it read-write and only its writes fail.
			if st.CacheMemoryOnly != (existing == 0) {
				t.Errorf("status: cache_memory_only = %v with %d entries in the file", st.CacheMemoryOnly, existing)
			}
			healthServing(t, e)
			noneMovedAside(t, e.stateDir)
			if !strings.Contains(d.Out.String(), "serving from memory") {
				t.Errorf("log does not say tokend serves from memory:\n%s", grepLines(d.Out.String(), "cache"))
			}

			free()
			// A new key's write tries again at once.
			if _, err := e.tokens().GetToken(ctx(t), companyKey(existing+more)); err != nil {
				t.Fatal(err)
			}
			recovered := time.Now()
			e.waitPersistent(t)
			t.Logf("room again: writes persistent within %v", time.Since(recovered).Round(time.Millisecond))
			d.stop()
			noneMovedAside(t, e.stateDir)
			e.start(fast...)
			if st := e.status(t); st.Entries != uint64(existing+more+1) {
				t.Fatalf("after restart: %d entries loaded, want %d", st.Entries, existing+more+1)
			}
			e.checkServedFromCache(t, existing+more+1)
		})
	}
}

// TestFaultDiskReadOnly: the state directory is a read-only bind mount.
// tokend starts, serves what the file holds (read with a read-only open)
// and what it mints, says so, and persists it all once the mount is
// writable again.
func TestFaultDiskReadOnly(t *testing.T) {
	e := newEnv(t)
	d := e.start(fast...)
	const existing, more = 200, 100
	warm(t, e.tokens(), existing)
	d.stop()
	mountOrSkip(t, e.stateDir, e.stateDir, "", unix.MS_BIND, "")
	mountOrSkip(t, "", e.stateDir, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, "")
	before := e.fake.CallCount()
	d = e.start(fast...)
	healthServing(t, e)
	st := e.status(t)
	if st.Entries != existing || !st.CacheMemoryOnly || !strings.Contains(st.CacheWriteError, "read-only file system") {
		t.Fatalf("status on a read-only state directory: %d entries, memory only %v, %q; want %d from the file, memory only, EROFS", st.Entries, st.CacheMemoryOnly, st.CacheWriteError, existing)
	}
	warm(t, e.tokens(), existing+more)
	if calls := e.fake.CallCount() - before; calls != more {
		t.Errorf("%d upstream calls, want %d: the file's %d entries should have been served", calls, more, existing)
	}
	t.Logf("read-only state directory: %d entries read from the file, %d minted into memory; status %q", existing, more, e.status(t).CacheWriteError)
	noneMovedAside(t, e.stateDir)
	healthServing(t, e)

	mountOrSkip(t, "", e.stateDir, "", unix.MS_REMOUNT|unix.MS_BIND, "")
	if _, err := e.tokens().GetToken(ctx(t), companyKey(existing+more)); err != nil {
		t.Fatal(err)
	}
	e.waitPersistent(t)
	if !strings.Contains(d.Out.String(), "persistent again") {
		t.Errorf("log does not say the cache is persistent again:\n%s", grepLines(d.Out.String(), "cache"))
	}
	d.stop()
	e.start(fast...)
	e.checkServedFromCache(t, existing+more+1)
}

// TestFaultDiskFileSizeLimit: a full disk without mounts: tokend runs
// under prlimit --fsize, so its writes beyond 128 KiB fail with EFBIG (a soft limit:
// the hard one stays unlimited, so raising it needs no capability).
// Raising the limit on the running process lets the writes through.
func TestFaultDiskFileSizeLimit(t *testing.T) {
	prlimit := requireTool(t, "prlimit")
	e := newEnv(t)
	args := append(e.daemonArgs(fast...), "--api-key-file", e.keyFile)
	d := e.startCmd(nil, prlimit, append([]string{"--fsize=131072:unlimited", bin.tokend}, args...)...)
	e.daemons = append(e.daemons, d)
	e.waitReady(d)
	const keys = 600
	warm(t, e.tokens(), keys)
	st := e.waitFailing(t, "file too large")
	t.Logf("RLIMIT_FSIZE 128 KiB: %d keys served; status: %d pending, %q", keys, st.CachePendingWrites, st.CacheWriteError)
	healthServing(t, e)
	noneMovedAside(t, e.stateDir)

	out, err := exec.Command(prlimit, "--pid", strconv.Itoa(d.Pid()), "--fsize=unlimited").CombinedOutput()
	if err != nil {
		t.Fatalf("prlimit --pid: %v: %s", err, out)
	}
	if _, err := e.tokens().GetToken(ctx(t), companyKey(keys)); err != nil {
		t.Fatal(err)
	}
	e.waitPersistent(t)
	d.stop()
	e.start(fast...)
	e.checkServedFromCache(t, keys+1)
}

// TestFaultDiskSalvage: one damaged page among 200 entries costs only the
// records on it: the rest are salvaged into a fresh file and served
// without an upstream call, and the log says how many came back.
func TestFaultDiskSalvage(t *testing.T) {
	e := newEnv(t)
	d := e.start(fast...)
	const keys = 200
	warm(t, e.tokens(), keys)
	d.stop()
	held, err := cachetest.DamageLeaf(filepath.Join(e.stateDir, "cache.db"))
	must(t, err)
	before := e.fake.CallCount()
	d = e.start(fast...)
	line := grepLines(d.Out.String(), "cache loaded")
	m := regexp.MustCompile(`salvaged=(\d+) lost=(-?\d+)`).FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("cache loaded line does not say salvaged and lost:\n%s", line)
	}
	t.Logf("%s", line)
	salvaged, _ := strconv.Atoi(m[1])
	lost, _ := strconv.Atoi(m[2])
	if salvaged != keys-held || lost != held {
		t.Errorf("salvaged %d, lost %d; the damaged page held %d of %d", salvaged, lost, held, keys)
	}
	if !strings.Contains(d.Out.String(), "moved it aside") {
		t.Errorf("log does not say the file was moved aside:\n%s", grepLines(d.Out.String(), "cache"))
	}
	start := time.Now()
	warm(t, e.tokens(), keys)
	calls := e.fake.CallCount() - before
	t.Logf("one damaged page of %d entries: %d salvaged, %d lost; serving all %d again took %d upstream calls in %v", keys, salvaged, lost, keys, calls, time.Since(start).Round(time.Millisecond))
	if calls != held {
		t.Errorf("%d upstream calls to serve %d keys, want %d (only the lost ones)", calls, keys, held)
	}
	// The salvaged records are in the fresh file.
	d.stop()
	e.start(fast...)
	e.checkServedFromCache(t, keys)
}

// TestFaultDiskEmptyFile: a zero-length cache.db is a lost cache, said in
// a WARN naming the file, and tokend starts empty.
func TestFaultDiskEmptyFile(t *testing.T) {
	e := newEnv(t)
	d := e.start(fast...)
	warm(t, e.tokens(), 10)
	d.stop()
	path := filepath.Join(e.stateDir, "cache.db")
	must(t, os.Truncate(path, 0))
	d = e.start(fast...)
	var warn string
	for _, l := range strings.Split(d.Out.String(), "\n") {
		if strings.Contains(l, "cache file is empty (0 bytes): the previous cache was lost; starting empty") {
			warn = l
		}
	}
	if !strings.Contains(warn, "WARN") || !strings.Contains(warn, path) {
		t.Fatalf("no WARN naming %s for the empty cache file:\n%s", path, grepLines(d.Out.String(), "cache"))
	}
	t.Logf("%s", warn)
	if _, err := e.tokens().GetToken(context.Background(), companyKey(0)); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Size() == 0 {
		t.Fatalf("the empty file was not initialised: %v", err)
	}
}
