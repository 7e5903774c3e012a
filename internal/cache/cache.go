// Package cache is the persistent half of tokend's token cache: the bbolt
// file, the record codec, sealing at rest, write-behind batching, salvaging
// a damaged file before moving it aside, and serving from memory while the
// disk refuses the file. It keeps no index and knows nothing of refresh
// states or schedules; the refresher owns every entry in memory and hands
// the store a Record to keep, or a key to forget.
//
// Writes gather for Config.FlushDelay and go out in one transaction, so a
// restart or a crash loses nothing that had been committed. Only one process
// may hold the file: Open fails after Config.OpenTimeout instead of waiting
// for the lock forever.
package cache

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
	"golang.org/x/sys/unix"

	"github.com/tokend/tokend/internal/clock"
)

var (
	entriesBucket = []byte("entries")
	metaBucket    = []byte("meta")
	saltKey       = []byte("fingerprint-salt")
	// countKey holds how many entries the file holds, big-endian, so a
	// salvage can say how many records the damage cost.
	countKey = []byte("entries-count")
)

// Config configures Open. Zero values mean the defaults.
type Config struct {
	// Path is the bbolt file. Its directory is created 0700 if missing.
	Path   string
	Logger *slog.Logger
	Clock  clock.Clock
	// FlushDelay is how long changes gather before one transaction writes
	// them all. Default 10ms.
	FlushDelay time.Duration
	// RetryDelay is how long to wait before retrying a failed write (or
	// open); it doubles on each failure up to RetryMax. Defaults 1s, 30s.
	RetryDelay, RetryMax time.Duration
	// SealKey, 32 bytes, seals token strings at rest with AES-256-GCM.
	// Nil stores them plain, protected only by the file's mode.
	SealKey []byte
	// OpenTimeout bounds the wait for the file lock. Default 500ms, so a
	// second tokend gives up within a second.
	OpenTimeout time.Duration
}

// Store is the bbolt file and the queue of changes waiting to be written.
// While the file cannot be used (a full disk, a read-only or failing
// filesystem) db is nil: the changes wait in memory and every write tries
// to open the file again.
type Store struct {
	cfg Config
	log *slog.Logger
	db  *bolt.DB // nil while the file is unavailable; changed only under flushMu
	// dir is the state directory, which files are opened relative to; nil
	// until it could be created and opened (a disk may refuse at first).
	dir  *os.File
	salt []byte
	aead cipher.AEAD // nil: tokens stored plain

	// loaded holds what Open read until Loaded takes it.
	loaded []Record

	// Under flushMu once the flusher runs. saltDirty: the salt is not in
	// the file yet. wipe: the file's entries are not the ones Loaded handed
	// over, so the next write replaces them with what memory holds.
	saltDirty, wipe bool

	flushMu      sync.Mutex // one Flush at a time
	wmu          sync.Mutex // guards dirty, deletes, writing and the write status; never held across I/O
	writing      int        // changes in the transaction being written
	dirty        map[string]Record
	deletes      map[string]struct{}
	lastWriteErr error
	kick         chan struct{}
	stop         chan struct{}
	done         chan struct{}
	closeOnce    sync.Once
	closeErr     error
}

// LoadStats says what Open found in the file.
type LoadStats struct {
	Loaded, Expired, Undecodable int
	// Unsealable counts sealed records the cache key could not open.
	Unsealable int
	// MovedAside is where a damaged file was moved, if it was.
	MovedAside string
	// Salvaged counts the records (among Loaded) read back from a damaged
	// file. Lost counts those the file last held that could not be: -1 if
	// the damage took the file's count with it.
	Salvaged, Lost int
	// Empty: the file was there with 0 bytes, a cache lost before this start.
	Empty bool
	// Unavailable is why the file could not be opened for writing, if it
	// could not: the store serves from memory and keeps trying.
	Unavailable error
}

// ErrUnavailable marks WriteStatus's error while the file cannot be opened
// for writing; tokend serves from memory and keeps trying to open it.
var ErrUnavailable = errors.New("cache file unavailable, serving from memory")

// environmental reports whether err comes from the disk or the filesystem
// (full, read-only, failing, not permitted) rather than from the file's
// content. Such a file is never moved aside: it is fine once the disk is.
func environmental(err error) bool {
	for _, e := range []error{unix.ENOSPC, unix.EDQUOT, unix.EFBIG, unix.EROFS, unix.EIO, unix.EACCES, unix.EPERM} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// Open opens or creates the cache file and reads every unexpired record,
// which Loaded hands over once. A damaged file gives up what still decodes
// and is moved aside; a file the disk will not let it use leaves the store
// serving from memory until it can. Only a held lock or a configuration
// error fails Open.
func Open(cfg Config) (*Store, LoadStats, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.Real{}
	}
	if cfg.FlushDelay <= 0 {
		cfg.FlushDelay = 10 * time.Millisecond
	}
	if cfg.RetryDelay <= 0 {
		cfg.RetryDelay = time.Second
	}
	if cfg.RetryMax < cfg.RetryDelay {
		cfg.RetryMax = max(cfg.RetryDelay, 30*time.Second)
	}
	if cfg.OpenTimeout <= 0 {
		cfg.OpenTimeout = 500 * time.Millisecond
	}
	if cfg.SealKey != nil && len(cfg.SealKey) != 32 {
		return nil, LoadStats{}, fmt.Errorf("cache key: %d bytes, want 32", len(cfg.SealKey))
	}
	c := &Store{
		cfg:     cfg,
		log:     cfg.Logger,
		dirty:   make(map[string]Record),
		deletes: make(map[string]struct{}),
		kick:    make(chan struct{}, 1),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	if cfg.SealKey != nil {
		block, err := aes.NewCipher(cfg.SealKey)
		if err != nil {
			return nil, LoadStats{}, fmt.Errorf("cache key: %w", err)
		}
		if c.aead, err = cipher.NewGCM(block); err != nil {
			return nil, LoadStats{}, fmt.Errorf("cache key: %w", err)
		}
	}
	stats, err := c.openAtStart()
	if err != nil {
		return nil, LoadStats{}, err
	}
	go c.flusher()
	c.wake() // the salt, records to re-seal or drop, salvaged records
	return c, stats, nil
}

// openAtStart opens the file and loads it, salvaging a damaged file and
// falling back to memory when the disk refuses.
func (c *Store) openAtStart() (stats LoadStats, err error) {
	path := c.cfg.Path
	if fi, serr := os.Lstat(path); serr == nil && fi.Mode().IsRegular() && fi.Size() == 0 {
		c.log.Warn("cache file is empty (0 bytes): the previous cache was lost; starting empty", "file", path)
		stats.Empty = true
	}
	db, err := c.openDB()
	if err == nil {
		var lerr error
		if stats, lerr = c.safeLoad(db, stats); lerr == nil {
			c.db = db
			return stats, nil
		}
		closeQuietly(db)
		err = &corruptError{fmt.Errorf("load: %w", lerr)}
	}
	var corrupt *corruptError
	switch {
	case errors.As(err, &corrupt):
		return c.salvageAndReplace(corrupt.err, stats)
	case environmental(err):
		// Read what the file holds, if the disk lets us, and serve it.
		if rdb, rerr := boltOpenReadOnly(c.cfg, c.dir); rerr == nil {
			var lerr error
			stats, lerr = c.safeLoad(rdb, stats)
			closeQuietly(rdb)
			if lerr != nil {
				return c.salvageAndReplace(lerr, stats)
			}
		} else {
			c.wipe = true
		}
		c.unavailable(err, &stats)
		return stats, nil
	default:
		return LoadStats{}, err
	}
}

// unavailable leaves the store serving from memory while the file cannot be
// opened for writing; the flusher keeps trying.
func (c *Store) unavailable(err error, stats *LoadStats) {
	if len(c.salt) != 32 {
		c.salt = newSalt()
		c.saltDirty = true
	}
	stats.Unavailable = err
	c.lastWriteErr = fmt.Errorf("%w: %w", ErrUnavailable, err)
	c.log.Error("cache file unavailable (disk full, read-only or failing?); serving from memory and retrying to open it; nothing was moved aside", "file", c.cfg.Path, "loaded", stats.Loaded, "err", err)
}

func newSalt() []byte {
	b := make([]byte, 32)
	rand.Read(b)
	return b
}

// salvageAndReplace reads every record that still decodes from the damaged
// file, moves the file aside for a post-mortem and queues the records for a
// fresh file: a cache is not worth an outage, and every record kept is a
// token not fetched again.
func (c *Store) salvageAndReplace(reason error, stats LoadStats) (LoadStats, error) {
	c.loaded, c.dirty, c.deletes = nil, make(map[string]Record), make(map[string]struct{})
	stats = LoadStats{Empty: stats.Empty, Lost: -1}
	sv, err := salvageFile(c.dir, c.cfg.Path)
	if err != nil {
		if environmental(err) {
			c.wipe = true
			c.unavailable(fmt.Errorf("read damaged cache %s: %w", c.cfg.Path, err), &stats)
			return stats, nil
		}
		sv = &salvaged{count: -1}
	}
	c.adopt(sv, &stats)
	c.wipe, c.saltDirty = true, true
	aside, err := c.moveAside()
	if err != nil {
		if environmental(err) {
			c.unavailable(err, &stats)
			return stats, nil
		}
		return LoadStats{}, fmt.Errorf("open cache %s: %v; %w", c.cfg.Path, reason, err)
	}
	stats.MovedAside = aside
	c.log.Error("cache file is damaged; salvaged what still decodes, moved it aside and starting a fresh file",
		"file", c.cfg.Path, "moved_to", aside, "reason", reason, "salvaged", stats.Salvaged, "lost", stats.Lost, "damaged_pages", sv.damaged)
	db, err := c.openDB()
	switch {
	case err == nil:
		c.db = db
	case environmental(err):
		c.unavailable(err, &stats)
	default:
		return LoadStats{}, err
	}
	return stats, nil
}

// adopt keeps the salvaged records that decode and have not expired, the
// newest of each key, and the salvaged salt so their fingerprints still
// match.
func (c *Store) adopt(sv *salvaged, stats *LoadStats) {
	c.salt = sv.salt
	if len(c.salt) != 32 {
		c.salt = newSalt()
	}
	now := c.cfg.Clock.Now()
	best := map[string]Record{}
	for _, e := range sv.entries {
		r, _, err := decodeRecord(e.k, e.v, c.aead)
		if err != nil {
			if !errors.Is(err, errUnsealable) {
				stats.Undecodable++
			} else {
				stats.Unsealable++
			}
			continue
		}
		if old, ok := best[string(e.k)]; !ok || r.ObtainedAt.After(old.ObtainedAt) {
			best[string(e.k)] = r
		}
	}
	for k, r := range best {
		if !now.Before(r.ExpiresAt) {
			stats.Expired++
			continue
		}
		c.loaded = append(c.loaded, r)
		c.dirty[k] = r
	}
	stats.Loaded = len(c.loaded)
	stats.Salvaged = len(c.loaded)
	if sv.count >= 0 {
		stats.Lost = max(0, int(sv.count)-len(best)-stats.Unsealable)
	}
}

// moveAside renames the damaged file to a .corrupt- name kept for a
// post-mortem.
func (c *Store) moveAside() (string, error) {
	aside := fmt.Sprintf("%s.corrupt-%s", c.cfg.Path, c.cfg.Clock.Now().UTC().Format("20060102T150405.000Z"))
	dfd := int(c.dir.Fd())
	if err := unix.Renameat(dfd, filepath.Base(c.cfg.Path), dfd, filepath.Base(aside)); err != nil {
		return "", fmt.Errorf("move damaged cache %s aside: %w", c.cfg.Path, err)
	}
	return aside, nil
}

// reopen is a write's attempt to open the file while the store serves from
// memory. A file found damaged now is moved aside: memory already holds
// everything, and the next write replaces the file's entries with it.
func (c *Store) reopen() error {
	db, err := c.openDB()
	var corrupt *corruptError
	if errors.As(err, &corrupt) {
		aside, merr := c.moveAside()
		if merr != nil {
			return merr
		}
		c.log.Error("cache file is not a usable database; moved it aside and writing memory's entries to a fresh file", "file", c.cfg.Path, "moved_to", aside, "reason", corrupt.err)
		c.wipe, c.saltDirty = true, true
		db, err = c.openDB()
	}
	if err != nil {
		return err
	}
	c.db = db
	return nil
}

// pidPath names the file that records which process holds the cache open.
func pidPath(dbPath string) string { return dbPath + ".pid" }

// corruptError means the file exists and can be read but is not a usable
// bbolt database.
type corruptError struct{ err error }

func (e *corruptError) Error() string { return e.err.Error() }

// openDB opens the file for writing. Damage to the file, including a fault
// on a truncated mapping or a panic inside bbolt, is a *corruptError; a
// held lock, a full disk or a permission problem is not. A file it created
// (or found empty) and could not initialise is removed again, so that a
// half-written header is not mistaken for damage on the next try.
func (c *Store) openDB() (*bolt.DB, error) {
	cfg := c.cfg
	if c.dir == nil {
		dir, err := openStateDir(filepath.Dir(cfg.Path))
		if err != nil {
			return nil, err
		}
		c.dir = dir
	}
	fi, serr := os.Lstat(cfg.Path)
	fresh := errors.Is(serr, os.ErrNotExist) || (serr == nil && fi.Mode().IsRegular() && fi.Size() == 0)
	db, err := boltOpen(cfg, c.dir)
	switch {
	case err != nil && environmental(err):
		if fresh {
			unix.Unlinkat(int(c.dir.Fd()), filepath.Base(cfg.Path), 0)
		}
		return nil, fmt.Errorf("open cache %s: %w", cfg.Path, err)
	case errors.Is(err, errDamaged):
		return nil, &corruptError{err}
	case errors.Is(err, berrors.ErrTimeout):
		holder := "another process"
		if pid := readPID(c.dir, cfg.Path); pid != "" {
			holder = "process " + pid
		}
		return nil, fmt.Errorf("open cache %s: %s holds its lock (is another tokend using this state directory?); gave up after %v", cfg.Path, holder, cfg.OpenTimeout)
	case errors.Is(err, berrors.ErrInvalid), errors.Is(err, berrors.ErrVersionMismatch), errors.Is(err, berrors.ErrChecksum):
		return nil, &corruptError{err}
	case err != nil && !errors.Is(err, os.ErrNotExist):
		if fi, serr := os.Lstat(cfg.Path); serr == nil && fi.Mode().IsRegular() {
			return nil, &corruptError{err} // e.g. a file too short to hold a header
		}
		return nil, fmt.Errorf("open cache %s: %w", cfg.Path, err)
	case err != nil:
		return nil, fmt.Errorf("open cache %s: %w", cfg.Path, err)
	}
	// Only for the message a second tokend prints; the lock is bbolt's.
	if err := writePID(c.dir, cfg.Path); err != nil {
		c.log.Warn("cannot write the pid file; a second tokend will not name this process", "file", pidPath(cfg.Path), "err", err)
	}
	return db, nil
}

var errDamaged = errors.New("damaged database")

// boltOpen is bolt.Open with its panics on a damaged or truncated file
// turned into errDamaged. A DB abandoned that way keeps its descriptor; the
// caller moves the file aside and opens a new one.
// The file is opened in dir, without following a link (dbOpener).
func boltOpen(cfg Config, dir *os.File) (db *bolt.DB, err error) {
	return boltOpenWith(cfg, &bolt.Options{Timeout: cfg.OpenTimeout, OpenFile: dbOpener(dir)})
}

// boltOpenReadOnly opens an existing, non-empty file for reading only, to
// serve what it holds while the disk refuses writes.
func boltOpenReadOnly(cfg Config, dir *os.File) (*bolt.DB, error) {
	if dir == nil {
		return nil, fmt.Errorf("open cache %s read-only: its directory could not be opened", cfg.Path)
	}
	if fi, err := os.Lstat(cfg.Path); err != nil || !fi.Mode().IsRegular() || fi.Size() == 0 {
		return nil, fmt.Errorf("open cache %s read-only: nothing to read", cfg.Path)
	}
	return boltOpenWith(cfg, &bolt.Options{Timeout: cfg.OpenTimeout, ReadOnly: true, OpenFile: dbOpener(dir)})
}

func boltOpenWith(cfg Config, opts *bolt.Options) (db *bolt.DB, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if p := recover(); p != nil {
			db, err = nil, fmt.Errorf("%w: %v", errDamaged, p)
		}
	}()
	return bolt.Open(cfg.Path, 0o600, opts)
}

// safeLoad runs load, turning bbolt's panics on damaged pages and memory
// faults on a truncated mapping into errors.
func (c *Store) safeLoad(db *bolt.DB, in LoadStats) (stats LoadStats, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%w: %v", errDamaged, p)
		}
	}()
	stats, err = c.load(db)
	stats.Empty = in.Empty
	return stats, err
}

func closeQuietly(db *bolt.DB) {
	defer func() { _ = recover() }()
	db.Close()
}

// load reads the file without writing to it, so that a full disk cannot
// fail a start: what needs writing (a new salt, records to drop or to
// re-seal) is queued for the flusher.
func (c *Store) load(db *bolt.DB) (LoadStats, error) {
	var stats LoadStats
	now := c.cfg.Clock.Now()
	c.loaded, c.dirty, c.deletes = nil, make(map[string]Record), make(map[string]struct{})
	c.salt, c.saltDirty = nil, false
	err := db.View(func(tx *bolt.Tx) error {
		if mb := tx.Bucket(metaBucket); mb != nil {
			c.salt = bytes.Clone(mb.Get(saltKey))
		}
		if len(c.salt) != 32 {
			c.salt, c.saltDirty = newSalt(), true
		}
		b := tx.Bucket(entriesBucket)
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, v []byte) error {
			r, sealed, err := decodeRecord(k, v, c.aead)
			if errors.Is(err, errUnsealable) {
				stats.Unsealable++
				c.deletes[string(k)] = struct{}{}
				return nil
			}
			if err != nil {
				stats.Undecodable++
				c.log.Warn("dropping undecodable cache record", "key", fmt.Sprintf("%x", k), "err", err)
				c.deletes[string(k)] = struct{}{}
				return nil
			}
			if !now.Before(r.ExpiresAt) {
				stats.Expired++
				c.deletes[string(k)] = struct{}{}
				return nil
			}
			c.loaded = append(c.loaded, r)
			stats.Loaded++
			if c.aead != nil && !sealed {
				c.dirty[string(k)] = r // written before a key was configured: seal it
			}
			return nil
		})
	})
	return stats, err
}

// Loaded hands over the records Open read, once; later calls return nil.
func (c *Store) Loaded() []Record {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	r := c.loaded
	c.loaded = nil
	return r
}

// Salt is this cache file's random secret for keying API key fingerprints,
// so a fingerprint read from the file cannot be checked against guesses
// without it.
func (c *Store) Salt() []byte { return c.salt }

// Put queues r to be written under the encoded key enc, replacing any
// change still queued for it. It takes a short lock and does no I/O, so the
// refresher may call it while it holds its own lock: that keeps the order
// of a key's puts and deletes the order in which the refresher decided them.
func (c *Store) Put(enc string, r Record) {
	c.wmu.Lock()
	c.dirty[enc] = r
	delete(c.deletes, enc)
	c.wmu.Unlock()
	c.wake()
}

// Delete queues the removal of the record under enc, replacing any change
// still queued for it. Like Put, it does no I/O.
func (c *Store) Delete(enc string) {
	c.wmu.Lock()
	delete(c.dirty, enc)
	c.deletes[enc] = struct{}{}
	c.wmu.Unlock()
	c.wake()
}

func (c *Store) wake() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// WriteStatus reports the last failed write, nil once a later one succeeds,
// and how many changes wait to be written.
func (c *Store) WriteStatus() (pending int, lastErr error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return len(c.dirty) + len(c.deletes) + c.writing, c.lastWriteErr
}

func (c *Store) flusher() {
	defer close(c.done)
	retry := c.cfg.Clock.NewTimer(time.Hour)
	retry.Stop()
	delay := c.cfg.RetryDelay
	for {
		select {
		case <-c.stop:
			return
		case <-c.kick:
			// Let a burst of changes gather into one transaction.
			t := c.cfg.Clock.NewTimer(c.cfg.FlushDelay)
			select {
			case <-t.C():
			case <-c.stop:
				t.Stop()
				return
			}
		case <-retry.C():
		}
		if err := c.Flush(); err != nil {
			retry.Reset(delay)
			delay = min(2*delay, c.cfg.RetryMax)
		} else {
			delay = c.cfg.RetryDelay
		}
	}
}

// Flush writes every pending change in one transaction, opening the file
// first if the store is serving from memory. On failure the changes stay
// pending, unless a newer change for the same key was queued meanwhile.
// Encoding, sealing and the write run without c.wmu, so a slow disk never
// blocks a Put.
func (c *Store) Flush() error {
	c.flushMu.Lock()
	defer c.flushMu.Unlock()
	c.wmu.Lock()
	dirty, deletes := c.dirty, c.deletes
	c.dirty, c.deletes = make(map[string]Record), make(map[string]struct{})
	c.writing = len(dirty) + len(deletes)
	c.wmu.Unlock()
	if len(dirty) == 0 && len(deletes) == 0 && c.db != nil && !c.saltDirty && !c.wipe {
		return nil
	}
	reopened := false
	var err error
	if c.db == nil {
		if err = c.reopen(); err == nil {
			reopened = true
		}
	}
	if err == nil {
		err = c.write(dirty, deletes)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.writing = 0
	if err != nil {
		// Put the batch back where nothing newer replaced it.
		for k := range deletes {
			if _, newer := c.dirty[k]; !newer {
				c.deletes[k] = struct{}{}
			}
		}
		for k, r := range dirty {
			_, put := c.dirty[k]
			_, del := c.deletes[k]
			if !put && !del {
				c.dirty[k] = r
			}
		}
		if c.db == nil {
			c.lastWriteErr = fmt.Errorf("%w: %w", ErrUnavailable, err)
			return c.lastWriteErr
		}
		if c.lastWriteErr == nil {
			c.log.Error("cache write failed; serving from memory and retrying", "file", c.cfg.Path, "pending", len(c.dirty)+len(c.deletes), "err", err)
		}
		c.lastWriteErr = fmt.Errorf("write cache %s: %w", c.cfg.Path, err)
		return c.lastWriteErr
	}
	switch {
	case reopened:
		c.log.Info("cache file opened again; the cache is persistent again", "file", c.cfg.Path, "written", len(dirty), "deleted", len(deletes))
	case c.lastWriteErr != nil:
		c.log.Info("cache writes recovered", "file", c.cfg.Path)
	}
	c.lastWriteErr = nil
	return nil
}

// write runs one transaction for a batch, keeping the file's entry count
// with it. Holds flushMu.
func (c *Store) write(dirty map[string]Record, deletes map[string]struct{}) error {
	type put struct{ k, v []byte }
	puts := make([]put, 0, len(dirty))
	for enc, r := range dirty {
		k := []byte(enc)
		v, err := encodeRecord(k, &r, c.aead)
		if err != nil {
			return fmt.Errorf("encode cache record %s: %w", idOf(k), err)
		}
		puts = append(puts, put{k, v})
	}
	// Sorted keys make bbolt's page writes sequential.
	sort.Slice(puts, func(i, j int) bool { return string(puts[i].k) < string(puts[j].k) })
	err := c.db.Update(func(tx *bolt.Tx) error {
		mb, err := tx.CreateBucketIfNotExists(metaBucket)
		if err != nil {
			return err
		}
		if c.wipe && tx.Bucket(entriesBucket) != nil {
			if err := tx.DeleteBucket(entriesBucket); err != nil {
				return err
			}
		}
		b, err := tx.CreateBucketIfNotExists(entriesBucket)
		if err != nil {
			return err
		}
		if c.saltDirty || c.wipe {
			if err := mb.Put(saltKey, c.salt); err != nil {
				return err
			}
		}
		var n uint64
		if v := mb.Get(countKey); c.wipe || len(v) != 8 {
			n = uint64(b.Stats().KeyN)
		} else {
			n = binary.BigEndian.Uint64(v)
		}
		for k := range deletes {
			if b.Get([]byte(k)) == nil {
				continue
			}
			n--
			if err := b.Delete([]byte(k)); err != nil {
				return err
			}
		}
		for _, p := range puts {
			if b.Get(p.k) == nil {
				n++
			}
			if err := b.Put(p.k, p.v); err != nil {
				return err
			}
		}
		return mb.Put(countKey, binary.BigEndian.AppendUint64(nil, n))
	})
	if err == nil {
		c.wipe, c.saltDirty = false, false
	}
	return err
}

// Close writes what is pending and closes the file. Later calls return
// the first call's result.
func (c *Store) Close() error {
	c.closeOnce.Do(func() {
		close(c.stop)
		<-c.done
		ferr := c.Flush()
		if c.dir != nil {
			defer c.dir.Close()
		}
		if c.db == nil {
			c.closeErr = ferr
			return
		}
		removePID(c.dir, c.cfg.Path)
		if err := c.db.Close(); err != nil {
			c.closeErr = fmt.Errorf("close cache %s: %w", c.cfg.Path, err)
			return
		}
		c.closeErr = ferr
	})
	return c.closeErr
}
