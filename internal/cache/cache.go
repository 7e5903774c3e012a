// Package cache is the persistent half of tokend's token cache: the bbolt
// file, the record codec, sealing at rest, write-behind batching and moving
// a damaged file aside. It keeps no index and knows nothing of refresh
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

	"github.com/tokend/tokend/internal/clock"
)

var (
	entriesBucket = []byte("entries")
	metaBucket    = []byte("meta")
	saltKey       = []byte("fingerprint-salt")
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
	// RetryDelay is how long to wait before retrying a failed write.
	// Default 1s.
	RetryDelay time.Duration
	// SealKey, 32 bytes, seals token strings at rest with AES-256-GCM.
	// Nil stores them plain, protected only by the file's mode.
	SealKey []byte
	// OpenTimeout bounds the wait for the file lock. Default 500ms, so a
	// second tokend gives up within a second.
	OpenTimeout time.Duration
}

// Store is the bbolt file and the queue of changes waiting to be written.
type Store struct {
	cfg  Config
	log  *slog.Logger
	db   *bolt.DB
	dir  *os.File // the state directory, which files are opened relative to
	salt []byte
	aead cipher.AEAD // nil: tokens stored plain

	// loaded holds what Open read until Loaded takes it.
	loaded []Record

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
}

// Open opens or creates the cache file and reads every unexpired record,
// which Loaded hands over once.
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
	if cfg.OpenTimeout <= 0 {
		cfg.OpenTimeout = 500 * time.Millisecond
	}
	if cfg.SealKey != nil && len(cfg.SealKey) != 32 {
		return nil, LoadStats{}, fmt.Errorf("cache key: %d bytes, want 32", len(cfg.SealKey))
	}
	dir, err := openStateDir(filepath.Dir(cfg.Path))
	if err != nil {
		return nil, LoadStats{}, err
	}
	c, stats, err := openFile(cfg, dir)
	var corrupt *corruptError
	if errors.As(err, &corrupt) {
		// A cache is not worth an outage: keep the file for a post-mortem
		// and start empty; tokens are fetched again.
		aside := fmt.Sprintf("%s.corrupt-%s", cfg.Path, cfg.Clock.Now().UTC().Format("20060102T150405.000Z"))
		if rerr := os.Rename(cfg.Path, aside); rerr != nil {
			dir.Close()
			return nil, LoadStats{}, fmt.Errorf("open cache %s: %v; moving it aside failed: %w", cfg.Path, corrupt.err, rerr)
		}
		cfg.Logger.Error("cache file is not a usable database; moved it aside and starting empty", "file", cfg.Path, "moved_to", aside, "reason", corrupt.err)
		c, stats, err = openFile(cfg, dir)
		stats.MovedAside = aside
	}
	if err != nil {
		dir.Close()
		return nil, LoadStats{}, err
	}
	go c.flusher()
	c.wake() // records to re-seal, if any
	return c, stats, nil
}

// pidPath names the file that records which process holds the cache open.
func pidPath(dbPath string) string { return dbPath + ".pid" }

// corruptError means the file exists but bbolt cannot use it.
type corruptError struct{ err error }

func (e *corruptError) Error() string { return e.err.Error() }

// openFile opens the bbolt file and loads it. Damage to the file, including
// a fault on a truncated mapping or a panic inside bbolt, is a
// *corruptError; a held lock or a permission problem is not.
func openFile(cfg Config, dir *os.File) (c *Store, stats LoadStats, err error) {
	db, err := boltOpen(cfg, dir)
	switch {
	case errors.Is(err, errDamaged):
		return nil, stats, &corruptError{err}
	case errors.Is(err, berrors.ErrTimeout):
		holder := "another process"
		if pid := readPID(dir, cfg.Path); pid != "" {
			holder = "process " + pid
		}
		return nil, stats, fmt.Errorf("open cache %s: %s holds its lock (is another tokend using this state directory?); gave up after %v", cfg.Path, holder, cfg.OpenTimeout)
	case errors.Is(err, berrors.ErrInvalid), errors.Is(err, berrors.ErrVersionMismatch), errors.Is(err, berrors.ErrChecksum):
		return nil, stats, &corruptError{err}
	case err != nil && !errors.Is(err, os.ErrPermission) && !errors.Is(err, os.ErrNotExist):
		if fi, serr := os.Lstat(cfg.Path); serr == nil && fi.Mode().IsRegular() {
			return nil, stats, &corruptError{err} // e.g. a file too short to hold a header
		}
		return nil, stats, fmt.Errorf("open cache %s: %w", cfg.Path, err)
	case err != nil:
		return nil, stats, fmt.Errorf("open cache %s: %w", cfg.Path, err)
	}
	c = &Store{
		cfg:     cfg,
		dir:     dir,
		log:     cfg.Logger,
		db:      db,
		dirty:   make(map[string]Record),
		deletes: make(map[string]struct{}),
		kick:    make(chan struct{}, 1),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	if cfg.SealKey != nil {
		block, err := aes.NewCipher(cfg.SealKey)
		if err != nil {
			closeQuietly(db)
			return nil, stats, fmt.Errorf("cache key: %w", err)
		}
		if c.aead, err = cipher.NewGCM(block); err != nil {
			closeQuietly(db)
			return nil, stats, fmt.Errorf("cache key: %w", err)
		}
	}
	if stats, err = c.safeLoad(); err != nil {
		closeQuietly(db)
		return nil, LoadStats{}, &corruptError{fmt.Errorf("load: %w", err)}
	}
	// Only for the message a second tokend prints; the lock is bbolt's.
	if err := writePID(dir, cfg.Path); err != nil {
		cfg.Logger.Warn("cannot write the pid file; a second tokend will not name this process", "file", pidPath(cfg.Path), "err", err)
	}
	return c, stats, nil
}

var errDamaged = errors.New("damaged database")

// boltOpen is bolt.Open with its panics on a damaged or truncated file
// turned into errDamaged. A DB abandoned that way keeps its descriptor; the
// caller moves the file aside and opens a new one.
func boltOpen(cfg Config, dir *os.File) (db *bolt.DB, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if p := recover(); p != nil {
			db, err = nil, fmt.Errorf("%w: %v", errDamaged, p)
		}
	}()
	return bolt.Open(cfg.Path, 0o600, &bolt.Options{Timeout: cfg.OpenTimeout, OpenFile: dbOpener(dir)})
}

// safeLoad runs load, turning bbolt's panics on damaged pages and memory
// faults on a truncated mapping into errors.
func (c *Store) safeLoad() (stats LoadStats, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%w: %v", errDamaged, p)
		}
	}()
	return c.load()
}

func closeQuietly(db *bolt.DB) {
	defer func() { _ = recover() }()
	db.Close()
}

func (c *Store) load() (LoadStats, error) {
	var stats LoadStats
	now := c.cfg.Clock.Now()
	var drop [][]byte
	c.loaded = nil
	err := c.db.Update(func(tx *bolt.Tx) error {
		mb, err := tx.CreateBucketIfNotExists(metaBucket)
		if err != nil {
			return err
		}
		if c.salt = bytes.Clone(mb.Get(saltKey)); len(c.salt) != 32 {
			c.salt = make([]byte, 32)
			rand.Read(c.salt)
			if err := mb.Put(saltKey, c.salt); err != nil {
				return err
			}
		}
		b, err := tx.CreateBucketIfNotExists(entriesBucket)
		if err != nil {
			return err
		}
		err = b.ForEach(func(k, v []byte) error {
			r, sealed, err := decodeRecord(k, v, c.aead)
			if errors.Is(err, errUnsealable) {
				stats.Unsealable++
				drop = append(drop, bytes.Clone(k))
				return nil
			}
			if err != nil {
				stats.Undecodable++
				c.log.Warn("dropping undecodable cache record", "key", fmt.Sprintf("%x", k), "err", err)
				drop = append(drop, bytes.Clone(k))
				return nil
			}
			if !now.Before(r.ExpiresAt) {
				stats.Expired++
				drop = append(drop, bytes.Clone(k))
				return nil
			}
			c.loaded = append(c.loaded, r)
			stats.Loaded++
			if c.aead != nil && !sealed {
				c.dirty[string(k)] = r // written before a key was configured: seal it
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, k := range drop {
			if err := b.Delete(k); err != nil {
				return err
			}
		}
		return nil
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
			retry.Reset(c.cfg.RetryDelay)
		}
	}
}

// Flush writes every pending change in one transaction. On failure the
// changes stay pending, unless a newer change for the same key was queued
// meanwhile. Encoding, sealing and the write run without c.wmu, so a slow
// disk never blocks a Put.
func (c *Store) Flush() error {
	c.flushMu.Lock()
	defer c.flushMu.Unlock()
	c.wmu.Lock()
	dirty, deletes := c.dirty, c.deletes
	c.dirty, c.deletes = make(map[string]Record), make(map[string]struct{})
	c.writing = len(dirty) + len(deletes)
	c.wmu.Unlock()
	if len(dirty) == 0 && len(deletes) == 0 {
		return nil
	}
	type put struct{ k, v []byte }
	puts := make([]put, 0, len(dirty))
	var err error
	for enc, r := range dirty {
		k := []byte(enc)
		v, eerr := encodeRecord(k, &r, c.aead)
		if eerr != nil {
			err = fmt.Errorf("encode cache record %s: %w", idOf(k), eerr)
			break
		}
		puts = append(puts, put{k, v})
	}
	if err == nil {
		// Sorted keys make bbolt's page writes sequential.
		sort.Slice(puts, func(i, j int) bool { return string(puts[i].k) < string(puts[j].k) })
		err = c.db.Update(func(tx *bolt.Tx) error {
			b := tx.Bucket(entriesBucket)
			for k := range deletes {
				if err := b.Delete([]byte(k)); err != nil {
					return err
				}
			}
			for _, p := range puts {
				if err := b.Put(p.k, p.v); err != nil {
					return err
				}
			}
			return nil
		})
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
		if c.lastWriteErr == nil {
			c.log.Error("cache write failed; serving from memory and retrying", "file", c.cfg.Path, "pending", len(c.dirty)+len(c.deletes), "err", err)
		}
		c.lastWriteErr = fmt.Errorf("write cache %s: %w", c.cfg.Path, err)
		return c.lastWriteErr
	}
	if c.lastWriteErr != nil {
		c.log.Info("cache writes recovered", "file", c.cfg.Path)
	}
	c.lastWriteErr = nil
	return nil
}

// Close writes what is pending and closes the file. Later calls return
// the first call's result.
func (c *Store) Close() error {
	c.closeOnce.Do(func() {
		close(c.stop)
		<-c.done
		ferr := c.Flush()
		removePID(c.dir, c.cfg.Path)
		defer c.dir.Close()
		if err := c.db.Close(); err != nil {
			c.closeErr = fmt.Errorf("close cache %s: %w", c.cfg.Path, err)
			return
		}
		c.closeErr = ferr
	})
	return c.closeErr
}
