package main

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/tokend/tokend/internal/cache"
	"github.com/tokend/tokend/internal/refresher"
	"github.com/tokend/tokend/internal/whop"
)

// credential is the name tokend's server gives the one API key it serves;
// pre-loaded entries must carry it to be found.
const credential = "default"

var benchScopes = []string{"chat:read"}

func scaleCompany(i int) string { return fmt.Sprintf("biz_s%07d", i) }

// uniqueToken makes the i-th of many distinct tokens of template's length.
func uniqueToken(template string, i int) string {
	suffix := fmt.Sprintf("%08d", i)
	if len(template) < len(suffix) {
		return template + suffix
	}
	return template[:len(template)-len(suffix)] + suffix
}

// populate writes n entries with tokens valid for an hour, minted (as far
// as tokend can tell) by apiKey, none due for refresh during the run. It
// returns the total bytes of token strings.
func populate(path string, n int, apiKey, template string) (tokenBytes int64, err error) {
	// A long FlushDelay leaves every record to the one transaction of Close.
	c, _, err := cache.Open(cache.Config{Path: path, FlushDelay: time.Hour})
	if err != nil {
		return 0, err
	}
	now := time.Now()
	fp := whop.Fingerprint(c.Salt(), apiKey)
	for i := range n {
		k := cache.NewKey(credential, scaleCompany(i), "", benchScopes)
		tok := uniqueToken(template, i)
		tokenBytes += int64(len(tok))
		c.Put(string(k.Encode()), cache.Record{
			Key: k, Token: tok, ExpiresAt: now.Add(time.Hour), ObtainedAt: now, Fingerprint: fp,
			LastRequested: now, NextRefresh: now.Add(30*time.Minute + time.Duration(i%600)*time.Second), Refreshes: 1,
		})
	}
	return tokenBytes, c.Close()
}

// heapResult is the Go heap that n loaded entries hold, in bytes per entry.
type heapResult struct {
	Entries int `json:"entries"`
	// TokenBytes is the average length of the token strings.
	TokenBytes float64 `json:"token_bytes_per_entry"`
	// Cache is what cache.Open holds: the records it read, before the
	// refresher takes them.
	Cache        float64 `json:"cache_bytes_per_entry"`
	CacheNoToken float64 `json:"cache_bytes_per_entry_excluding_token"`
	// Daemon is what refresher.New holds once it has taken the records:
	// the in-process equivalent of what tokend holds.
	Daemon        float64 `json:"daemon_bytes_per_entry"`
	DaemonNoToken float64 `json:"daemon_bytes_per_entry_excluding_token"`
}

// measureHeap loads the file in this process and compares the live heap
// before and after, once for the cache alone and once with a refresher
// scheduling every entry, as tokend does at start.
func measureHeap(path, apiKey, whopURL string, tokenBytes int64) (heapResult, error) {
	live := func() uint64 {
		runtime.GC()
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	before := live()
	c, stats, err := cache.Open(cache.Config{Path: path, FlushDelay: time.Hour})
	if err != nil {
		return heapResult{}, err
	}
	defer c.Close()
	withCache := live()
	client, err := whop.New(whop.Config{BaseURL: whopURL, APIKey: apiKey, FingerprintSalt: c.Salt()})
	if err != nil {
		return heapResult{}, err
	}
	ref, err := refresher.New(refresher.Config{Store: c, Fetcher: client})
	if err != nil {
		return heapResult{}, err
	}
	withRefresher := live()
	runtime.KeepAlive(ref)
	runtime.KeepAlive(c)

	n := float64(stats.Loaded)
	if n == 0 {
		return heapResult{}, fmt.Errorf("%s: no entries loaded", path)
	}
	tok := float64(tokenBytes) / n
	perEntry := func(d int64) float64 { return float64(d) / n }
	r := heapResult{
		Entries:    stats.Loaded,
		TokenBytes: tok,
		Cache:      perEntry(int64(withCache) - int64(before)),
		Daemon:     perEntry(int64(withRefresher) - int64(before)),
	}
	r.CacheNoToken = r.Cache - tok
	r.DaemonNoToken = r.Daemon - tok
	return r, nil
}

// writeResult is the time of one Flush of n dirty records.
type writeResult struct {
	Records int `json:"records"`
	// InsertMs is the first Flush into a fresh file; RefreshMs the second,
	// after every record got a new token (what a wave of refreshes writes).
	InsertMs  float64 `json:"insert_ms"`
	RefreshMs float64 `json:"refresh_ms"`
	FileBytes int64   `json:"file_bytes"`
}

// measureWrites times Cache.Flush, one batched transaction, of n records:
// first inserted, then all refreshed.
func measureWrites(dir string, n int, template string) (writeResult, error) {
	path := filepath.Join(dir, "cache.db")
	c, _, err := cache.Open(cache.Config{Path: path, FlushDelay: time.Hour})
	if err != nil {
		return writeResult{}, err
	}
	defer c.Close()
	fp := whop.Fingerprint(c.Salt(), "whop_bench_write_key")
	keys := make([]cache.Key, n)
	set := func(gen int) {
		now := time.Now()
		for i, k := range keys {
			c.Put(string(k.Encode()), cache.Record{
				Key: k, Token: uniqueToken(template, i+gen*n), ExpiresAt: now.Add(time.Hour), ObtainedAt: now, Fingerprint: fp,
				NextRefresh: now.Add(40 * time.Minute), Refreshes: uint64(gen + 1),
			})
		}
	}
	flush := func() (float64, error) {
		t0 := time.Now()
		if err := c.Flush(); err != nil {
			return 0, err
		}
		ms := float64(time.Since(t0).Microseconds()) / 1000
		if pending, _ := c.WriteStatus(); pending != 0 {
			return 0, fmt.Errorf("%d records still pending after Flush", pending)
		}
		return ms, nil
	}
	for i := range keys {
		keys[i] = cache.NewKey(credential, fmt.Sprintf("biz_w%06d", i), fmt.Sprintf("user_w%06d", i), benchScopes)
	}
	res := writeResult{Records: n}
	set(0)
	if res.InsertMs, err = flush(); err != nil {
		return res, err
	}
	set(1)
	if res.RefreshMs, err = flush(); err != nil {
		return res, err
	}
	if fi, err := os.Stat(path); err == nil {
		res.FileBytes = fi.Size()
	}
	return res, nil
}
