package cache

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
	"google.golang.org/protobuf/proto"

	"github.com/tokend/tokend/internal/clock"
	storev1 "github.com/tokend/tokend/proto/tokend/store/v1"
)

var t0 = time.Date(2030, 1, 2, 3, 4, 5, 6, time.UTC)

// openStore opens a store and returns an idempotent close. The cleanup
// closes it if the test did not, then checks the bbolt file's consistency,
// like bbolt's own btesting does after every test.
func openStore(tb testing.TB, cfg Config) (*Store, LoadStats, func()) {
	tb.Helper()
	s, stats, err := Open(cfg)
	if err != nil {
		tb.Fatalf("Open(%s): %v", cfg.Path, err)
	}
	var once sync.Once
	closeFn := func() {
		once.Do(func() {
			if err := s.Close(); err != nil {
				tb.Errorf("Close %s: %v", cfg.Path, err)
			}
		})
	}
	tb.Cleanup(func() {
		closeFn()
		checkDB(tb, cfg.Path)
	})
	return s, stats, closeFn
}

func checkDB(tb testing.TB, path string) {
	tb.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		tb.Errorf("check %s: %v", path, err)
		return
	}
	defer db.Close()
	err = db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			tb.Errorf("check %s: %v", path, err)
		}
		return nil
	})
	if err != nil {
		tb.Errorf("check %s: %v", path, err)
	}
}

// fileValues returns the entries bucket of a closed cache file as stored,
// encoded key to raw value.
func fileValues(t *testing.T, path string) map[string][]byte {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	defer db.Close()
	vals := make(map[string][]byte)
	err = db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(entriesBucket).ForEach(func(k, v []byte) error {
			vals[string(k)] = bytes.Clone(v)
			return nil
		})
	})
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return vals
}

// writeRaw puts raw values into the entries bucket of a closed cache file,
// as a damaged disk, an older tokend or an attacker with write access might.
func writeRaw(t *testing.T, path string, kv map[string][]byte) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for k, v := range kv {
			if err := tx.Bucket(entriesBucket).Put([]byte(k), v); err != nil {
				return err
			}
		}
		return nil
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
}

// liveToken returns the token the open store's file holds under enc, as
// committed: it reads the file, not the queue.
func liveToken(t *testing.T, s *Store, enc string) (token string, ok bool) {
	t.Helper()
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(entriesBucket).Get([]byte(enc))
		if v == nil {
			return nil
		}
		r, _, err := decodeRecord([]byte(enc), v, s.aead)
		if err != nil {
			return fmt.Errorf("decode %s: %w", idOf([]byte(enc)), err)
		}
		token, ok = r.Token, true
		return nil
	})
	if err != nil {
		t.Fatalf("read %s: %v", s.cfg.Path, err)
	}
	return token, ok
}

// txID is the id of the last committed write transaction: it goes up by
// one for every transaction that writes.
func txID(t *testing.T, s *Store) int {
	t.Helper()
	var id int
	if err := s.db.View(func(tx *bolt.Tx) error { id = tx.ID(); return nil }); err != nil {
		t.Fatalf("read %s: %v", s.cfg.Path, err)
	}
	return id
}

func testConfig(t *testing.T, clk clock.Clock) Config {
	return Config{Path: filepath.Join(t.TempDir(), "state", "cache.db"), Clock: clk}
}

// record builds a record for k. Its fingerprint does not derive from the
// token, so the sealing tests can look for the token in the raw file.
func record(k Key, token string, expires time.Time) Record {
	return Record{Key: k, Token: token, ExpiresAt: expires, ObtainedAt: expires.Add(-time.Hour), Fingerprint: []byte("fp-" + k.Subject())}
}

func enc(k Key) string { return string(k.Encode()) }

func mustFlush(tb testing.TB, s *Store) {
	tb.Helper()
	if err := s.Flush(); err != nil {
		tb.Fatalf("Flush: %v", err)
	}
	if pending, err := s.WriteStatus(); pending != 0 || err != nil {
		tb.Fatalf("after Flush: WriteStatus = %d, %v; want 0, nil", pending, err)
	}
}

// canon maps a record to the form the codec returns, so that two records
// that mean the same compare equal under reflect.DeepEqual: times as
// instants (no location, no monotonic reading) and empty slices as nil.
func canon(r Record) Record {
	at := func(t time.Time) time.Time {
		if t.IsZero() {
			return time.Time{}
		}
		return time.Unix(0, t.UnixNano())
	}
	r.ExpiresAt, r.ObtainedAt = at(r.ExpiresAt), at(r.ObtainedAt)
	r.LastRequested, r.NextRefresh = at(r.LastRequested), at(r.NextRefresh)
	if len(r.Fingerprint) == 0 {
		r.Fingerprint = nil
	}
	if len(r.Key.Scopes) == 0 {
		r.Key.Scopes = nil
	}
	if r.LastError != nil {
		le := *r.LastError
		le.At = at(le.At)
		r.LastError = &le
	}
	return r
}

func sameRecord(t *testing.T, name string, got, want Record) {
	t.Helper()
	if g, w := canon(got), canon(want); !reflect.DeepEqual(g, w) {
		t.Errorf("%s:\n got %s\nwant %s", name, fmtRecord(g), fmtRecord(w))
	}
}

func fmtRecord(r Record) string {
	s := fmt.Sprintf("%+v", r)
	if r.LastError != nil {
		s += fmt.Sprintf(" LastError=%+v", *r.LastError)
	}
	return s
}

// byKey indexes records by encoded key, failing on a key seen twice.
func byKey(t *testing.T, rs []Record) map[string]Record {
	t.Helper()
	m := make(map[string]Record, len(rs))
	for _, r := range rs {
		if _, dup := m[enc(r.Key)]; dup {
			t.Errorf("record %s (%s) appears twice", r.Key.ID(), r.Key.Subject())
		}
		m[enc(r.Key)] = r
	}
	return m
}

// fullRecord sets every field of Record, so its round trip tests them all.
func fullRecord() Record {
	k := NewKey("cred", "biz_1", "user_1", []string{"b", "a"})
	return Record{
		Key:           k,
		Token:         "tok-full",
		ExpiresAt:     t0.Add(time.Hour),
		ObtainedAt:    t0.Add(-time.Hour),
		Fingerprint:   []byte{0xde, 0xad, 0xbe, 0xef},
		LastRequested: t0.Add(-time.Second),
		NextRefresh:   t0.Add(30 * time.Minute),
		Hits:          1 << 40,
		Refreshes:     7,
		Failures:      3,
		LastError:     &RecordError{At: t0.Add(-time.Minute), Status: 503, Message: "upstream unavailable", Type: "service_unavailable", Code: "upstream_down", Param: "company_id", Retryable: true},
		Owner:         "uid 1000",
	}
}

// TestFullRecordIsFull keeps fullRecord honest when Record grows a field.
func TestFullRecordIsFull(t *testing.T) {
	r := fullRecord()
	for _, v := range []reflect.Value{reflect.ValueOf(r), reflect.ValueOf(r.Key), reflect.ValueOf(*r.LastError)} {
		for i := range v.NumField() {
			if v.Field(i).IsZero() {
				t.Errorf("fullRecord leaves %s.%s zero: set it, so that TestPersistence checks its round trip", v.Type().Name(), v.Type().Field(i).Name)
			}
		}
	}
}

func TestPersistence(t *testing.T) {
	clk := clock.NewFake(t0)
	cfg := testConfig(t, clk)
	s, stats, closeS := openStore(t, cfg)
	if stats != (LoadStats{}) {
		t.Fatalf("new file: LoadStats = %+v, want zero", stats)
	}
	if got := s.Loaded(); len(got) != 0 {
		t.Fatalf("new file: Loaded = %d records, want none", len(got))
	}

	full := fullRecord()
	minimal := Record{Key: NewKey("cred", "", "user_2", nil), Token: "tok-minimal", ExpiresAt: t0.Add(2 * time.Hour)}
	deleted := record(NewKey("cred", "biz_3", "", nil), "tok-deleted", t0.Add(time.Hour))
	expired := record(NewKey("cred", "biz_4", "", nil), "tok-expired", t0.Add(5*time.Minute))

	s.Put(enc(full.Key), full)
	s.Put(enc(minimal.Key), minimal)
	s.Put(enc(deleted.Key), deleted)
	mustFlush(t, s)
	s.Delete(enc(deleted.Key))
	s.Put(enc(expired.Key), expired)
	closeS() // writes the delete and the expiring record

	clk.Advance(10 * time.Minute) // past the expiring record
	s, stats, closeS = openStore(t, cfg)
	if want := (LoadStats{Loaded: 2, Expired: 1}); stats != want {
		t.Errorf("reopen: LoadStats = %+v, want %+v", stats, want)
	}
	got := byKey(t, s.Loaded())
	if len(got) != 2 {
		t.Errorf("reopen: Loaded %d records, want 2", len(got))
	}
	for _, r := range []Record{full, minimal} {
		if g, ok := got[enc(r.Key)]; !ok {
			t.Errorf("reopen: record %s (%s) missing", r.Key.ID(), r.Key.Subject())
		} else {
			sameRecord(t, r.Key.Subject(), g, r)
		}
	}
	for _, r := range []Record{deleted, expired} {
		if _, ok := got[enc(r.Key)]; ok {
			t.Errorf("reopen: record %s (%s) came back", r.Key.ID(), r.Key.Subject())
		}
	}
	closeS()

	// The expired record was deleted from the file, not just skipped.
	vals := fileValues(t, cfg.Path)
	if _, ok := vals[enc(expired.Key)]; ok || len(vals) != 2 {
		t.Errorf("file after reopen: %d records, expired one present: %v; want 2, false", len(vals), ok)
	}
	if _, stats, _ = openStore(t, cfg); stats != (LoadStats{Loaded: 2}) {
		t.Errorf("second reopen: LoadStats = %+v, want %+v", stats, LoadStats{Loaded: 2})
	}
}

func TestExpiryBoundaryOnOpen(t *testing.T) {
	tests := []struct {
		name    string
		advance time.Duration
		want    LoadStats
	}{
		{"well before", 0, LoadStats{Loaded: 1}},
		{"one ns before", 10*time.Minute - 1, LoadStats{Loaded: 1}},
		{"at expiry", 10 * time.Minute, LoadStats{Expired: 1}},
		{"after", time.Hour, LoadStats{Expired: 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := clock.NewFake(t0)
			cfg := testConfig(t, clk)
			s, _, closeS := openStore(t, cfg)
			k := NewKey("cred", "biz", "", nil)
			s.Put(enc(k), record(k, "tok", t0.Add(10*time.Minute)))
			closeS()

			clk.Advance(tt.advance)
			s, stats, closeS := openStore(t, cfg)
			if stats != tt.want {
				t.Errorf("LoadStats = %+v, want %+v", stats, tt.want)
			}
			if got := len(s.Loaded()); got != tt.want.Loaded {
				t.Errorf("Loaded %d records, want %d", got, tt.want.Loaded)
			}
			closeS()
			if got := len(fileValues(t, cfg.Path)); got != tt.want.Loaded {
				t.Errorf("file holds %d records after Open, want %d", got, tt.want.Loaded)
			}
		})
	}
}

func TestUndecodableRecord(t *testing.T) {
	good := NewKey("cred", "biz_good", "", nil)
	other := NewKey("cred", "biz_other", "", nil)
	marshal := func(r *storev1.Record) []byte {
		b, err := proto.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	validRecord := func(k Key) *storev1.Record {
		return &storev1.Record{
			Credential: k.Credential, CompanyId: k.CompanyID, UserId: k.UserID, ScopedActions: k.Scopes,
			Token: "tok", ExpiresAt: t0.Add(time.Hour).UnixNano(),
		}
	}
	noToken := validRecord(other)
	noToken.Token = ""
	noExpiry := validRecord(other)
	noExpiry.ExpiresAt = 0

	tests := []struct {
		name string
		k, v []byte
	}{
		{"garbage key and value", []byte("\xffgarbage"), []byte("not a record")},
		{"empty key value", []byte{keyVersion, 0, 0, 0, 0, 0}, []byte("x")},
		{"valid key, garbage value", other.Encode(), []byte{0xff, 0xff, 0xff}},
		{"record for another key", other.Encode(), marshal(validRecord(good))},
		{"record without token", other.Encode(), marshal(noToken)},
		{"record without expiry", other.Encode(), marshal(noExpiry)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(t, clock.NewFake(t0))
			s, _, closeS := openStore(t, cfg)
			s.Put(enc(good), record(good, "tok-good", t0.Add(time.Hour)))
			closeS()
			writeRaw(t, cfg.Path, map[string][]byte{string(tt.k): tt.v})

			s, stats, closeS := openStore(t, cfg)
			if want := (LoadStats{Loaded: 1, Undecodable: 1}); stats != want {
				t.Errorf("LoadStats = %+v, want %+v", stats, want)
			}
			if got := s.Loaded(); len(got) != 1 || got[0].Token != "tok-good" {
				t.Errorf("Loaded = %+v, want only the good record", got)
			}
			closeS()

			// The bad record was dropped from the file.
			if _, ok := fileValues(t, cfg.Path)[string(tt.k)]; ok {
				t.Error("undecodable record is still in the file after Open")
			}
			if _, stats, _ = openStore(t, cfg); stats != (LoadStats{Loaded: 1}) {
				t.Errorf("second reopen: LoadStats = %+v, want %+v", stats, LoadStats{Loaded: 1})
			}
		})
	}
}

// TestDamagedFileMovedAside: a file bbolt cannot use gives up every record
// that still decodes, is kept for a post-mortem under a .corrupt- name, and
// a fresh file takes its place holding the salvaged records. Lost is what
// the file's own count says is missing, -1 when the count went with the
// damage.
func TestDamagedFileMovedAside(t *testing.T) {
	page := os.Getpagesize()
	tests := []struct {
		name      string
		damage    func(good []byte) []byte
		movedAway bool
		// salvaged and lost are the LoadStats expected of a moved-aside file.
		salvaged, lost int
	}{
		{"garbage", func([]byte) []byte { return bytes.Repeat([]byte{0xa5}, 4*page) }, true, 0, -1},
		{"shorter than a header", func([]byte) []byte { return []byte("bolt") }, true, 0, -1},
		{"truncated after the meta pages", func(good []byte) []byte { return bytes.Clone(good[:3*page]) }, true, 0, -1},
		// The pages the last commit wrote are beyond the end of the file
		// but inside bbolt's mapping: reading them faults. The leaves survive
		// (a commit writes its leaves before the root page); the count, in the
		// root, did not.
		{"truncated before the root page", func(good []byte) []byte { return bytes.Clone(good[:rootPage(t, good)*page]) }, true, 200, -1},
		{"data pages overwritten", func(good []byte) []byte {
			b := bytes.Clone(good)
			for i := 2 * page; i < len(b); i++ {
				b[i] = 0xff
			}
			return b
		}, true, 0, -1},
		// No meta page to trust: every page is scanned, the count is in
		// the root's inline meta bucket.
		{"both meta pages damaged", func(good []byte) []byte {
			b := bytes.Clone(good)
			for _, off := range []int{0, page} {
				for i := off + 16; i < off+64; i++ { // inside the meta, under its checksum
					b[i] ^= 0xff
				}
			}
			return b
		}, true, 200, 0},
		// bbolt initialises an empty file in place: nothing to keep.
		{"empty", func([]byte) []byte { return nil }, false, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(t, clock.NewFake(t0))
			s, _, closeS := openStore(t, cfg)
			for i := range 200 { // several pages of records
				k := NewKey("cred", fmt.Sprintf("biz_%d", i), "", []string{"read", "write"})
				s.Put(enc(k), record(k, strings.Repeat("t", 100), t0.Add(time.Hour)))
			}
			closeS()
			good, err := os.ReadFile(cfg.Path)
			if err != nil {
				t.Fatal(err)
			}
			if len(good) < 4*page {
				t.Fatalf("seed file is %d bytes, want more than %d to damage its data pages", len(good), 4*page)
			}
			damaged := tt.damage(good)
			if err := os.WriteFile(cfg.Path, damaged, 0o600); err != nil {
				t.Fatal(err)
			}

			s, stats, closeS := openStore(t, cfg)
			if !tt.movedAway {
				if stats != (LoadStats{Empty: true}) {
					t.Errorf("LoadStats = %+v, want only Empty", stats)
				}
			} else {
				if !strings.HasPrefix(stats.MovedAside, cfg.Path+".corrupt-") {
					t.Fatalf("LoadStats.MovedAside = %q, want %s.corrupt-*", stats.MovedAside, cfg.Path)
				}
				rest := stats
				rest.MovedAside = ""
				if want := (LoadStats{Loaded: tt.salvaged, Salvaged: tt.salvaged, Lost: tt.lost}); rest != want {
					t.Errorf("LoadStats = %+v, want %+v", stats, want)
				}
				kept, err := os.ReadFile(stats.MovedAside)
				if err != nil {
					t.Fatalf("moved-aside file: %v", err)
				}
				if !bytes.Equal(kept, damaged) {
					t.Errorf("moved-aside file is %d bytes, not the damaged file's %d as it was", len(kept), len(damaged))
				}
			}
			if got := s.Loaded(); len(got) != tt.salvaged {
				t.Errorf("Loaded %d records from a damaged file, want %d", len(got), tt.salvaged)
			}
			if len(s.Salt()) != 32 {
				t.Errorf("fresh file: len(Salt) = %d, want 32", len(s.Salt()))
			}

			// The fresh file works.
			k := NewKey("cred", "biz_after", "", nil)
			s.Put(enc(k), record(k, "tok-after", t0.Add(time.Hour)))
			closeS()
			if fi, err := os.Stat(cfg.Path); err != nil {
				t.Errorf("fresh file: %v", err)
			} else if fi.Mode().Perm() != 0o600 {
				t.Errorf("fresh file: mode %v, want 0600", fi.Mode().Perm())
			}
			s, stats, _ = openStore(t, cfg)
			got := s.Loaded()
			after := 0
			for _, r := range got {
				if r.Token == "tok-after" {
					after++
				}
			}
			if stats != (LoadStats{Loaded: tt.salvaged + 1}) || len(got) != tt.salvaged+1 || after != 1 {
				t.Errorf("reopen fresh file: LoadStats = %+v, %d records, %d tok-after; want the %d salvaged and the one written after", stats, len(got), after, tt.salvaged)
			}
		})
	}
}

// rootPage returns the page id of the root bucket in the live meta page of
// a bbolt file: of the two meta pages, the one with the higher txid. After
// its 16-byte page header a meta holds magic, version, page size and flags
// (4 bytes each), then the root page id, the root sequence, the freelist
// page id, the high-water page id and the txid (8 bytes each, in the
// machine's byte order; tokend runs on little-endian machines).
func rootPage(t *testing.T, file []byte) int {
	t.Helper()
	page := os.Getpagesize()
	var root, txid uint64
	for _, off := range []int{0, page} {
		m := file[off+16:]
		if id := binary.LittleEndian.Uint64(m[48:]); id >= txid {
			root, txid = binary.LittleEndian.Uint64(m[16:]), id
		}
	}
	if root < 2 || int(root+1)*page > len(file) {
		t.Fatalf("root page %d is not inside the %d-page file", root, len(file)/page)
	}
	return int(root)
}

func TestFileModes(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, dir, path string)
	}{
		{"new nested directory", func(t *testing.T, dir, path string) {}},
		{"directory exists 0755", func(t *testing.T, dir, path string) {
			if err := os.Mkdir(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(dir, 0o755); err != nil { // regardless of umask
				t.Fatal(err)
			}
		}},
		{"directory exists 0777", func(t *testing.T, dir, path string) {
			if err := os.Mkdir(dir, 0o777); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(dir, 0o777); err != nil {
				t.Fatal(err)
			}
		}},
		{"file exists 0644", func(t *testing.T, dir, path string) {
			db, err := bolt.Open(filepath.Join(t.TempDir(), "seed.db"), 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			seed := db.Path()
			db.Close()
			data, err := os.ReadFile(seed)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, data, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(path, 0o644); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "var", "lib", "tokend")
			if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, "cache.db")
			tt.setup(t, dir, path)
			openStore(t, Config{Path: path, Clock: clock.NewFake(t0)})

			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if got := fi.Mode().Perm(); got != 0o600 {
				t.Errorf("file mode = %v, want 0600", got)
			}
			di, err := os.Stat(dir)
			if err != nil {
				t.Fatal(err)
			}
			if got := di.Mode().Perm(); got != 0o700 {
				t.Errorf("directory mode = %v, want 0700", got)
			}
		})
	}
}

// TestOpenLocked runs in a synctest bubble, so bbolt's lock polling
// spends virtual time: the test checks the timeout without waiting for it.
func TestOpenLocked(t *testing.T) {
	const timeout = 3 * time.Second
	tests := []struct {
		name       string
		removePID  bool
		wantHolder string
	}{
		{"pid file names the holder", false, "process " + strconv.Itoa(os.Getpid())},
		{"pid file missing", true, "another process"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				cfg := testConfig(t, clock.Real{})
				_, _, closeHolder := openStore(t, cfg)
				pid, err := os.ReadFile(pidPath(cfg.Path))
				if err != nil || strings.TrimSpace(string(pid)) != strconv.Itoa(os.Getpid()) {
					t.Fatalf("pid file %s = %q, %v; want %d", pidPath(cfg.Path), pid, err, os.Getpid())
				}
				if tt.removePID {
					if err := os.Remove(pidPath(cfg.Path)); err != nil {
						t.Fatal(err)
					}
				}

				cfg2 := cfg
				cfg2.OpenTimeout = timeout
				start := time.Now()
				s2, _, err := Open(cfg2)
				elapsed := time.Since(start)
				if err == nil {
					s2.Close()
					t.Fatal("second Open of a held file succeeded")
				}
				if elapsed < timeout*9/10 || elapsed > timeout*11/10 {
					t.Errorf("second Open gave up after %v, want about %v", elapsed, timeout)
				}
				for _, want := range []string{cfg.Path, tt.wantHolder, timeout.String()} {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("error %q does not say %q", err, want)
					}
				}

				// Once the holder closes, the file is free and the pid file gone.
				closeHolder()
				if _, err := os.Stat(pidPath(cfg.Path)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("pid file after Close: %v, want it removed", err)
				}
				openStore(t, cfg2)
			})
		})
	}
}

func TestSalt(t *testing.T) {
	cfg := testConfig(t, clock.NewFake(t0))
	s, _, closeS := openStore(t, cfg)
	salt := bytes.Clone(s.Salt())
	if len(salt) != 32 {
		t.Fatalf("len(Salt) = %d, want 32", len(salt))
	}
	if bytes.Equal(salt, make([]byte, 32)) {
		t.Fatal("Salt is all zeros")
	}
	closeS()

	s, _, _ = openStore(t, cfg)
	if !bytes.Equal(s.Salt(), salt) {
		t.Errorf("Salt changed across reopen: %x then %x", salt, s.Salt())
	}

	other, _, _ := openStore(t, testConfig(t, clock.NewFake(t0)))
	if bytes.Equal(other.Salt(), salt) {
		t.Errorf("two files share salt %x", salt)
	}
}

func TestLoadedOnce(t *testing.T) {
	cfg := testConfig(t, clock.NewFake(t0))
	s, _, closeS := openStore(t, cfg)
	want := make(map[string]Record)
	for i := range 3 {
		k := NewKey("cred", fmt.Sprintf("biz_%d", i), "", nil)
		r := record(k, fmt.Sprintf("tok-%d", i), t0.Add(time.Hour))
		s.Put(enc(k), r)
		want[enc(k)] = r
	}
	closeS()

	s, _, _ = openStore(t, cfg)
	got := byKey(t, s.Loaded())
	if len(got) != len(want) {
		t.Errorf("first Loaded: %d records, want %d", len(got), len(want))
	}
	for e, w := range want {
		sameRecord(t, w.Key.Subject(), got[e], w)
	}
	if again := s.Loaded(); again != nil {
		t.Errorf("second Loaded = %d records, want nil", len(again))
	}
	k := NewKey("cred", "biz_new", "", nil)
	s.Put(enc(k), record(k, "tok-new", t0.Add(time.Hour)))
	mustFlush(t, s)
	if again := s.Loaded(); again != nil {
		t.Errorf("Loaded after a Put = %d records, want nil: it hands over what Open read, once", len(again))
	}
}

func TestWriteStatusCounts(t *testing.T) {
	s, _, _ := openStore(t, testConfig(t, clock.NewFake(t0))) // the flusher never fires
	a, b, c := NewKey("cred", "a", "", nil), NewKey("cred", "b", "", nil), NewKey("cred", "c", "", nil)
	steps := []struct {
		name string
		do   func()
		want int
	}{
		{"put a", func() { s.Put(enc(a), record(a, "1", t0.Add(time.Hour))) }, 1},
		{"put b", func() { s.Put(enc(b), record(b, "1", t0.Add(time.Hour))) }, 2},
		{"put a again", func() { s.Put(enc(a), record(a, "2", t0.Add(time.Hour))) }, 2},
		{"delete a", func() { s.Delete(enc(a)) }, 2},
		{"delete c, never written", func() { s.Delete(enc(c)) }, 3},
		{"put c", func() { s.Put(enc(c), record(c, "1", t0.Add(time.Hour))) }, 3},
		{"flush", func() { mustFlush(t, s) }, 0},
		{"delete b", func() { s.Delete(enc(b)) }, 1},
	}
	for _, st := range steps {
		st.do()
		if pending, err := s.WriteStatus(); pending != st.want || err != nil {
			t.Fatalf("after %s: WriteStatus = %d, %v; want %d, nil", st.name, pending, err, st.want)
		}
	}
}

// TestBatching: changes gather for FlushDelay and go out in one
// transaction. It runs in a synctest bubble, so the flusher's timer is on
// virtual time.
func TestBatching(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := testConfig(t, clock.Real{})
		cfg.FlushDelay = 50 * time.Millisecond
		s, _, _ := openStore(t, cfg)
		time.Sleep(cfg.FlushDelay) // let Open's own wake-up pass
		synctest.Wait()

		bursts := []struct {
			name         string
			puts, delete int // delete the first n of the previous burst's keys
		}{
			{"puts", 100, 0},
			{"puts and deletes", 50, 30},
		}
		var prev []Key
		for bi, burst := range bursts {
			before := txID(t, s)
			var keys []Key
			for i := range burst.puts {
				k := NewKey("cred", fmt.Sprintf("biz_%d_%d", bi, i), "", []string{"read"})
				s.Put(enc(k), record(k, "tok", time.Now().Add(time.Hour)))
				keys = append(keys, k)
			}
			for _, k := range prev[:burst.delete] {
				s.Delete(enc(k))
			}
			want := burst.puts + burst.delete

			time.Sleep(cfg.FlushDelay - 1)
			synctest.Wait()
			if pending, err := s.WriteStatus(); pending != want || err != nil {
				t.Fatalf("%s: before FlushDelay: WriteStatus = %d, %v; want %d, nil", burst.name, pending, err, want)
			}
			if got := txID(t, s); got != before {
				t.Fatalf("%s: %d transactions before FlushDelay, want none", burst.name, got-before)
			}

			time.Sleep(1)
			synctest.Wait()
			if pending, err := s.WriteStatus(); pending != 0 || err != nil {
				t.Fatalf("%s: after FlushDelay: WriteStatus = %d, %v; want 0, nil", burst.name, pending, err)
			}
			if got := txID(t, s); got != before+1 {
				t.Errorf("%s: %d changes took %d transactions, want 1", burst.name, want, got-before)
			}
			for _, k := range keys {
				if _, ok := liveToken(t, s, enc(k)); !ok {
					t.Errorf("%s: %s not in the file after the flusher ran", burst.name, k.ID())
				}
			}
			for _, k := range prev[:burst.delete] {
				if _, ok := liveToken(t, s, enc(k)); ok {
					t.Errorf("%s: deleted %s still in the file after the flusher ran", burst.name, k.ID())
				}
			}
			prev = keys
		}
	})
}

// TestPutDeleteLastWins: of the changes queued for one key, the last one
// is what the file holds after Flush.
func TestPutDeleteLastWins(t *testing.T) {
	tests := []struct {
		name   string
		onDisk bool     // the key is in the file with token "old" first
		ops    []string // "put TOKEN", "delete", "flush"
		want   string   // token in the file at the end; "" for none
	}{
		{"delete then put, on disk", true, []string{"delete", "put new"}, "new"},
		{"put then delete, on disk", true, []string{"put new", "delete"}, ""},
		{"delete then put, never written", false, []string{"delete", "put new"}, "new"},
		{"put then delete, never written", false, []string{"put new", "delete"}, ""},
		{"put twice", false, []string{"put first", "put second"}, "second"},
		{"delete, put, delete", true, []string{"delete", "put new", "delete"}, ""},
		{"put, delete, put", true, []string{"put a", "delete", "put b"}, "b"},
		{"delete twice", true, []string{"delete", "delete"}, ""},
		{"delete, flush, put", true, []string{"delete", "flush", "put new"}, "new"},
		{"put, flush, delete", false, []string{"put new", "flush", "delete"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(t, clock.NewFake(t0))
			s, _, closeS := openStore(t, cfg)
			k := NewKey("cred", "biz", "", []string{"read"})
			keep := NewKey("cred", "biz_keep", "", nil)
			s.Put(enc(keep), record(keep, "keep", t0.Add(time.Hour)))
			if tt.onDisk {
				s.Put(enc(k), record(k, "old", t0.Add(time.Hour)))
			}
			mustFlush(t, s)

			for _, op := range tt.ops {
				switch {
				case op == "delete":
					s.Delete(enc(k))
				case op == "flush":
					mustFlush(t, s)
				case strings.HasPrefix(op, "put "):
					s.Put(enc(k), record(k, strings.TrimPrefix(op, "put "), t0.Add(time.Hour)))
				default:
					t.Fatalf("unknown op %q", op)
				}
			}
			mustFlush(t, s)
			if got, _ := liveToken(t, s, enc(k)); got != tt.want {
				t.Errorf("file holds %q after %v, want %q", got, tt.ops, tt.want)
			}
			if got, _ := liveToken(t, s, enc(keep)); got != "keep" {
				t.Errorf("another key's record = %q, want it untouched", got)
			}
			closeS()

			s, _, _ = openStore(t, cfg)
			got := byKey(t, s.Loaded())
			if r, ok := got[enc(k)]; r.Token != tt.want || ok != (tt.want != "") {
				t.Errorf("after reopen: record %q (present %v), want %q", r.Token, ok, tt.want)
			}
		})
	}
}

// TestFlushFailureDatabaseClosed: a write that cannot start leaves every
// change pending and the file as it was.
func TestFlushFailureDatabaseClosed(t *testing.T) {
	cfg := testConfig(t, clock.NewFake(t0))
	s, _, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a, b := NewKey("cred", "biz_a", "", nil), NewKey("cred", "biz_b", "", nil)
	s.Put(enc(b), record(b, "tok-b", t0.Add(time.Hour)))
	mustFlush(t, s)

	// Close the file underneath the store.
	if err := s.db.Close(); err != nil {
		t.Fatal(err)
	}
	s.Put(enc(a), record(a, "tok-a", t0.Add(time.Hour)))
	s.Delete(enc(b))
	for i := range 2 { // a retry fails the same way
		err := s.Flush()
		if !errors.Is(err, berrors.ErrDatabaseNotOpen) || !strings.Contains(err.Error(), cfg.Path) {
			t.Fatalf("Flush %d on a closed db = %v, want %v naming %s", i, err, berrors.ErrDatabaseNotOpen, cfg.Path)
		}
		if pending, werr := s.WriteStatus(); pending != 2 || werr == nil || werr.Error() != err.Error() {
			t.Errorf("after failed Flush %d: WriteStatus = %d, %v; want 2, %v", i, pending, werr, err)
		}
	}
	s.Put(enc(a), record(a, "tok-a2", t0.Add(time.Hour))) // supersedes the queued put
	if pending, _ := s.WriteStatus(); pending != 2 {
		t.Errorf("after a newer Put: pending = %d, want 2", pending)
	}
	cerr := s.Close()
	if cerr == nil {
		t.Fatal("Close with unwritable changes returned nil")
	}
	if again := s.Close(); again != cerr {
		t.Errorf("second Close = %v, want the first call's %v", again, cerr)
	}

	vals := fileValues(t, cfg.Path)
	if _, ok := vals[enc(a)]; ok {
		t.Error("a change from a failed write reached the file")
	}
	if _, ok := vals[enc(b)]; !ok {
		t.Error("a delete from a failed write reached the file")
	}
	checkDB(t, cfg.Path)
}

// TestFlushFailureNewerChangeWins: when a write fails, its changes go back
// in the queue unless a newer change for the same key was queued while it
// ran, and a change queued after it supersedes them. The write fails for
// real: a key longer than bbolt's MaxKeySize makes the transaction roll
// back. The test holds bbolt's write lock so that the failing Flush has
// taken its batch and waits while the newer change is queued.
func TestFlushFailureNewerChangeWins(t *testing.T) {
	tests := []struct {
		name      string
		batch     string // the change in the failing batch: "put A", "delete"
		meanwhile string // queued while it runs: "", "put B", "delete"
		after     string // queued after it failed
		want      string // token in the file once writes succeed; "" for none
	}{
		{"failed put, restored", "put A", "", "", "A"},
		{"failed put, newer put", "put A", "put B", "", "B"},
		{"failed put, newer delete", "put A", "delete", "", ""},
		{"failed put, later put", "put A", "", "put C", "C"},
		{"failed put, later delete", "put A", "", "delete", ""},
		{"failed delete, restored", "delete", "", "", ""},
		{"failed delete, newer put", "delete", "put B", "", "B"},
		{"failed delete, later put", "delete", "", "put C", "C"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(t, clock.NewFake(t0)) // the flusher never fires
			s, _, _ := openStore(t, cfg)
			k := NewKey("cred", "biz", "", nil)
			poison := strings.Repeat("k", bolt.MaxKeySize+1)
			apply := func(op string) {
				switch {
				case op == "":
				case op == "delete":
					s.Delete(enc(k))
				case strings.HasPrefix(op, "put "):
					s.Put(enc(k), record(k, strings.TrimPrefix(op, "put "), t0.Add(time.Hour)))
				default:
					t.Fatalf("unknown op %q", op)
				}
			}
			s.Put(enc(k), record(k, "old", t0.Add(time.Hour)))
			mustFlush(t, s)

			apply(tt.batch)
			s.Put(poison, record(k, "poison", t0.Add(time.Hour)))
			tx, err := s.db.Begin(true)
			if err != nil {
				t.Fatal(err)
			}
			flushed := make(chan error)
			go func() { flushed <- s.Flush() }()
			for taken := false; !taken; runtime.Gosched() { // until Flush holds its batch
				s.wmu.Lock()
				taken = s.writing > 0
				s.wmu.Unlock()
			}
			if pending, _ := s.WriteStatus(); pending != 2 {
				t.Errorf("during Flush: pending = %d, want 2: a batch being written is still pending", pending)
			}
			apply(tt.meanwhile)
			if err := tx.Rollback(); err != nil {
				t.Fatal(err)
			}
			err = <-flushed
			if !errors.Is(err, berrors.ErrKeyTooLarge) || !strings.Contains(err.Error(), cfg.Path) {
				t.Fatalf("Flush = %v, want %v naming %s", err, berrors.ErrKeyTooLarge, cfg.Path)
			}
			if pending, werr := s.WriteStatus(); pending != 2 || werr == nil {
				t.Errorf("after failed Flush: WriteStatus = %d, %v; want 2 (the key and the poison) and the error", pending, werr)
			}
			if got, _ := liveToken(t, s, enc(k)); got != "old" {
				t.Errorf("after failed Flush: file holds %q, want \"old\": a failed transaction must change nothing", got)
			}

			apply(tt.after)
			s.Delete(poison) // a newer change for the poisoned key too
			mustFlush(t, s)
			if got, _ := liveToken(t, s, enc(k)); got != tt.want {
				t.Errorf("file holds %q, want %q", got, tt.want)
			}
		})
	}
}

// TestConcurrentPutDeleteFlush races Puts, Deletes, Flushes and the real
// flusher. Each key has one writer, as each entry has one owner in the
// refresher, so the last change per key is known, and the file must hold
// exactly that.
func TestConcurrentPutDeleteFlush(t *testing.T) {
	cfg := testConfig(t, clock.Real{})
	cfg.FlushDelay = time.Millisecond // let the real flusher race the test
	s, _, closeS := openStore(t, cfg)
	salt := bytes.Clone(s.Salt())

	const writers, keysPerWriter, rounds = 16, 4, 300
	exp := time.Now().Add(time.Hour)
	want := make([]map[string]string, writers) // per writer: enc -> token, "" for deleted
	var wg sync.WaitGroup
	for w := range writers {
		want[w] = make(map[string]string)
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			for i := range rounds {
				k := NewKey("cred", fmt.Sprintf("biz_%d_%d", w, rng.IntN(keysPerWriter)), "", []string{"read", "write"})
				if rng.IntN(3) == 0 {
					s.Delete(enc(k))
					want[w][enc(k)] = ""
				} else {
					tok := fmt.Sprintf("tok-%d-%d", w, i)
					s.Put(enc(k), record(k, tok, exp))
					want[w][enc(k)] = tok
				}
			}
		})
	}
	done := make(chan struct{})
	var side sync.WaitGroup
	for range 2 {
		side.Go(func() {
			for {
				select {
				case <-done:
					return
				default:
				}
				if err := s.Flush(); err != nil {
					t.Errorf("Flush: %v", err)
				}
				if _, err := s.WriteStatus(); err != nil {
					t.Errorf("WriteStatus: %v", err)
				}
				if !bytes.Equal(s.Salt(), salt) {
					t.Error("Salt changed")
				}
			}
		})
	}
	wg.Wait()
	close(done)
	side.Wait()
	mustFlush(t, s)
	closeS()

	s, stats, _ := openStore(t, cfg)
	got := byKey(t, s.Loaded())
	live := 0
	for w := range want {
		for e, tok := range want[w] {
			r, ok := got[e]
			switch {
			case tok == "" && ok:
				t.Errorf("deleted record %s is in the file", idOf([]byte(e)))
			case tok != "" && r.Token != tok:
				t.Errorf("record %s: token %q after reopen, want %q", idOf([]byte(e)), r.Token, tok)
			}
			if tok != "" {
				live++
			}
		}
	}
	if stats != (LoadStats{Loaded: live}) || len(got) != live {
		t.Errorf("reopen: LoadStats = %+v, %d records; want exactly the %d live ones", stats, len(got), live)
	}
}
