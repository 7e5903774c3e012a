// Package cache keeps tokend's tokens: an in-memory index that serves every
// lookup, written through to a bbolt file in batches so that a restart or a
// crash loses nothing that had been committed.
//
// Lookups never touch bbolt. Only one process may hold the file: Open fails
// after Config.OpenTimeout instead of waiting for the lock forever.
package cache

import (
	"bytes"
	"container/heap"
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
	"strconv"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
	"google.golang.org/protobuf/proto"

	"github.com/tokend/tokend/internal/clock"
	storev1 "github.com/tokend/tokend/proto/tokend/store/v1"
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

// Cache is the index of entries and its persistent copy.
type Cache struct {
	cfg Config
	log *slog.Logger
	db  *bolt.DB

	mu    sync.RWMutex
	index map[string]*Entry // by encoded key
	salt  []byte
	aead  cipher.AEAD // nil: tokens stored plain

	flushMu      sync.Mutex // one Flush at a time
	wmu          sync.Mutex // guards dirty, deletes, writing and the write status
	writing      int        // changes in the transaction being written
	dirty        map[*Entry]struct{}
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

// Open opens or creates the cache file and loads every unexpired record.
func Open(cfg Config) (*Cache, LoadStats, error) {
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
	if err := ensurePrivateDir(filepath.Dir(cfg.Path)); err != nil {
		return nil, LoadStats{}, err
	}
	c, stats, err := openFile(cfg)
	var corrupt *corruptError
	if errors.As(err, &corrupt) {
		// A cache is not worth an outage: keep the file for a post-mortem
		// and start empty; tokens are fetched again.
		aside := fmt.Sprintf("%s.corrupt-%s", cfg.Path, cfg.Clock.Now().UTC().Format("20060102T150405.000Z"))
		if rerr := os.Rename(cfg.Path, aside); rerr != nil {
			return nil, LoadStats{}, fmt.Errorf("open cache %s: %v; moving it aside failed: %w", cfg.Path, corrupt.err, rerr)
		}
		cfg.Logger.Error("cache file is not a usable database; moved it aside and starting empty", "file", cfg.Path, "moved_to", aside, "reason", corrupt.err)
		c, stats, err = openFile(cfg)
		stats.MovedAside = aside
	}
	if err != nil {
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
func openFile(cfg Config) (c *Cache, stats LoadStats, err error) {
	db, err := boltOpen(cfg)
	switch {
	case errors.Is(err, errDamaged):
		return nil, stats, &corruptError{err}
	case errors.Is(err, berrors.ErrTimeout):
		holder := "another process"
		if pid, rerr := os.ReadFile(pidPath(cfg.Path)); rerr == nil && len(bytes.TrimSpace(pid)) > 0 {
			holder = "process " + string(bytes.TrimSpace(pid))
		}
		return nil, stats, fmt.Errorf("open cache %s: %s holds its lock (is another tokend using this state directory?); gave up after %v", cfg.Path, holder, cfg.OpenTimeout)
	case errors.Is(err, berrors.ErrInvalid), errors.Is(err, berrors.ErrVersionMismatch), errors.Is(err, berrors.ErrChecksum):
		return nil, stats, &corruptError{err}
	case err != nil && !errors.Is(err, os.ErrPermission) && !errors.Is(err, os.ErrNotExist):
		if fi, serr := os.Stat(cfg.Path); serr == nil && fi.Mode().IsRegular() {
			return nil, stats, &corruptError{err} // e.g. a file too short to hold a header
		}
		return nil, stats, fmt.Errorf("open cache %s: %w", cfg.Path, err)
	case err != nil:
		return nil, stats, fmt.Errorf("open cache %s: %w", cfg.Path, err)
	}
	if err := os.Chmod(cfg.Path, 0o600); err != nil {
		db.Close()
		return nil, stats, fmt.Errorf("open cache %s: %w", cfg.Path, err)
	}
	c = &Cache{
		cfg:     cfg,
		log:     cfg.Logger,
		db:      db,
		index:   make(map[string]*Entry),
		dirty:   make(map[*Entry]struct{}),
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
	_ = os.WriteFile(pidPath(cfg.Path), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600)
	return c, stats, nil
}

var errDamaged = errors.New("damaged database")

// boltOpen is bolt.Open with its panics on a damaged or truncated file
// turned into errDamaged. A DB abandoned that way keeps its descriptor; the
// caller moves the file aside and opens a new one.
func boltOpen(cfg Config) (db *bolt.DB, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if p := recover(); p != nil {
			db, err = nil, fmt.Errorf("%w: %v", errDamaged, p)
		}
	}()
	return bolt.Open(cfg.Path, 0o600, &bolt.Options{Timeout: cfg.OpenTimeout})
}

// safeLoad runs load, turning bbolt's panics on damaged pages and memory
// faults on a truncated mapping into errors.
func (c *Cache) safeLoad() (stats LoadStats, err error) {
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

// ensurePrivateDir creates dir 0700, or narrows an existing one to 0700,
// because the file below it holds bearer tokens.
func ensurePrivateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create state directory %s: %w", dir, err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("state directory %s: %w", dir, err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("state directory %s is mode %v and cannot be made 0700: %w", dir, fi.Mode().Perm(), err)
		}
	}
	return nil
}

func (c *Cache) load() (LoadStats, error) {
	var stats LoadStats
	now := c.cfg.Clock.Now()
	var drop [][]byte
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
			e, sealed, err := decodeEntry(k, v, c.aead)
			if errors.Is(err, errUnsealable) {
				stats.Unsealable++
				drop = append(drop, append([]byte(nil), k...))
				return nil
			}
			if err != nil {
				stats.Undecodable++
				c.log.Warn("dropping undecodable cache record", "key", fmt.Sprintf("%x", k), "err", err)
				drop = append(drop, append([]byte(nil), k...))
				return nil
			}
			if t := e.Token(); t == nil || !now.Before(t.ExpiresAt) {
				stats.Expired++
				drop = append(drop, append([]byte(nil), k...))
				return nil
			}
			c.index[e.enc] = e
			stats.Loaded++
			if c.aead != nil && !sealed {
				c.dirty[e] = struct{}{} // written before a key was configured: seal it
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

// Salt is this cache file's random secret for keying API key fingerprints,
// so a fingerprint read from the file cannot be checked against guesses
// without it.
func (c *Cache) Salt() []byte { return c.salt }

// Len is the number of entries.
func (c *Cache) Len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.index)
}

// Get returns the entry for an encoded key, or nil. It is the hit path: one
// read lock and a map lookup.
func (c *Cache) Get(enc []byte) *Entry {
	c.mu.RLock()
	e := c.index[string(enc)]
	c.mu.RUnlock()
	return e
}

// Ensure returns the entry for k, creating an empty one (no token, not yet
// persisted) if there is none.
func (c *Cache) Ensure(k Key) (e *Entry, created bool) {
	enc := k.Encode()
	if e := c.Get(enc); e != nil {
		return e, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.index[string(enc)]; e != nil {
		return e, false
	}
	e = newEntry(k, enc)
	c.index[e.enc] = e
	return e, true
}

// Entries returns every entry, sorted by id.
func (c *Cache) Entries() []*Entry {
	c.mu.RLock()
	out := make([]*Entry, 0, len(c.index))
	for _, e := range c.index {
		out = append(out, e)
	}
	c.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].id < out[j].id })
	return out
}

// LeastRecentlyRequested returns the n entries requested longest ago, never
// keep. It scans the index once, keeping the n oldest in a small max-heap.
func (c *Cache) LeastRecentlyRequested(n int, keep *Entry) []*Entry {
	if n <= 0 {
		return nil
	}
	h := make(lruHeap, 0, n)
	c.mu.RLock()
	for _, e := range c.index {
		if e == keep {
			continue
		}
		at := e.lastRequested.Load()
		if len(h) < n {
			heap.Push(&h, lruItem{e, at})
		} else if at < h[0].at {
			h[0] = lruItem{e, at}
			heap.Fix(&h, 0)
		}
	}
	c.mu.RUnlock()
	out := make([]*Entry, len(h))
	for i, it := range h {
		out[i] = it.e
	}
	return out
}

type lruItem struct {
	e  *Entry
	at int64
}

// lruHeap is a max-heap on last request time: its top is the newest of the
// oldest n seen so far.
type lruHeap []lruItem

func (h lruHeap) Len() int           { return len(h) }
func (h lruHeap) Less(i, j int) bool { return h[i].at > h[j].at }
func (h lruHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *lruHeap) Push(x any)        { *h = append(*h, x.(lruItem)) }
func (h *lruHeap) Pop() any {
	old := *h
	it := old[len(old)-1]
	*h = old[:len(old)-1]
	return it
}

// ErrNotFound and ErrAmbiguous are returned by Find.
var (
	ErrNotFound  = errors.New("no entry has that key id")
	ErrAmbiguous = errors.New("key id prefix matches more than one entry")
)

// Find returns the one entry whose id starts with prefix.
func (c *Cache) Find(prefix string) (*Entry, error) {
	prefix = strings.ToLower(prefix)
	if prefix == "" {
		return nil, ErrNotFound
	}
	var found *Entry
	c.mu.RLock()
	defer c.mu.RUnlock()
	for _, e := range c.index {
		if strings.HasPrefix(e.id, prefix) {
			if found != nil {
				return nil, ErrAmbiguous
			}
			found = e
		}
	}
	if found == nil {
		return nil, ErrNotFound
	}
	return found, nil
}

// SetToken installs a newly minted token on e and schedules the write.
// An entry that was removed meanwhile stays removed.
func (c *Cache) SetToken(e *Entry, t *Token, update func(*Meta)) {
	e.mu.Lock()
	e.tok.Store(t)
	if update != nil {
		update(&e.meta)
	}
	e.idle.Store(e.meta.State == StateIdle)
	e.mu.Unlock()
	c.markDirty(e)
}

// UpdateMeta changes e's refresh state and schedules the write.
func (c *Cache) UpdateMeta(e *Entry, update func(*Meta)) {
	e.mu.Lock()
	update(&e.meta)
	e.idle.Store(e.meta.State == StateIdle)
	e.mu.Unlock()
	c.markDirty(e)
}

// Remove drops entries from the index and the file. An entry that is no
// longer the indexed one for its key is ignored, so a stale handle cannot
// delete its replacement.
func (c *Cache) Remove(es ...*Entry) {
	// c.mu then c.wmu, as in markDirty: a write cannot slip in between the
	// index change and the queued delete.
	c.mu.Lock()
	c.wmu.Lock()
	for _, e := range es {
		if c.index[e.enc] != e {
			continue
		}
		delete(c.index, e.enc)
		delete(c.dirty, e)
		c.deletes[e.enc] = struct{}{}
	}
	c.wmu.Unlock()
	c.mu.Unlock()
	c.wake()
}

func (c *Cache) markDirty(e *Entry) {
	if e.Token() == nil {
		return // nothing worth persisting until a token arrives
	}
	c.mu.RLock()
	live := c.index[e.enc] == e
	if live {
		c.wmu.Lock()
		c.dirty[e] = struct{}{}
		c.wmu.Unlock()
	}
	c.mu.RUnlock()
	if live {
		c.wake()
	}
}

func (c *Cache) wake() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// WriteStatus reports the last failed write, nil once a later one succeeds,
// and how many changes wait to be written.
func (c *Cache) WriteStatus() (pending int, lastErr error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return len(c.dirty) + len(c.deletes) + c.writing, c.lastWriteErr
}

func (c *Cache) flusher() {
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
// changes stay pending and the in-memory index keeps serving. The write
// itself runs without c.wmu, so a slow disk never blocks a lookup.
func (c *Cache) Flush() error {
	c.flushMu.Lock()
	defer c.flushMu.Unlock()
	c.wmu.Lock()
	dirty, deletes := c.dirty, c.deletes
	c.dirty, c.deletes = make(map[*Entry]struct{}), make(map[string]struct{})
	c.writing = len(dirty) + len(deletes)
	c.wmu.Unlock()
	if len(dirty) == 0 && len(deletes) == 0 {
		return nil
	}
	type put struct{ k, v []byte }
	puts := make([]put, 0, len(dirty))
	var err error
	for e := range dirty {
		var rec *storev1.Record
		if rec, err = e.record(c.aead); err != nil {
			err = fmt.Errorf("encode cache record %s: %w", e.id, err)
			break
		}
		v, merr := proto.Marshal(rec)
		if merr != nil {
			err = fmt.Errorf("encode cache record %s: %w", e.id, merr)
			break
		}
		puts = append(puts, put{[]byte(e.enc), v})
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
	c.mu.RLock()
	c.wmu.Lock()
	defer c.wmu.Unlock()
	defer c.mu.RUnlock()
	c.writing = 0
	if err != nil {
		// Put the batch back: deletes first (they are applied before puts),
		// and the entries that are still live.
		for k := range deletes {
			c.deletes[k] = struct{}{}
		}
		for e := range dirty {
			if c.index[e.enc] == e {
				c.dirty[e] = struct{}{}
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
func (c *Cache) Close() error {
	c.closeOnce.Do(func() {
		close(c.stop)
		<-c.done
		ferr := c.Flush()
		os.Remove(pidPath(c.cfg.Path))
		if err := c.db.Close(); err != nil {
			c.closeErr = fmt.Errorf("close cache %s: %w", c.cfg.Path, err)
			return
		}
		c.closeErr = ferr
	})
	return c.closeErr
}
