// Package cachetest damages and starves real cache files for the cache's
// own tests and the fault tests on the real binaries. It is for tests only.
package cachetest

import (
	crand "crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// DamageLeaf overwrites the middle leaf page holding records in the bbolt
// file at path with random bytes, and returns how many records it held.
// The file must not be open elsewhere.
func DamageLeaf(path string) (held int, err error) {
	db, err := bolt.Open(path, 0o600, nil) // tx.Page needs the freelist, which read-only skips
	if err != nil {
		return 0, err
	}
	var victim, ps int
	err = db.View(func(tx *bolt.Tx) error {
		ps = tx.DB().Info().PageSize
		var leaves []int
		for id := 2; ; id++ {
			p, err := tx.Page(id)
			if err != nil || p == nil {
				break
			}
			if p.Type == "leaf" && p.Count > 2 { // not the root's two buckets
				leaves = append(leaves, id)
			}
		}
		if len(leaves) < 3 {
			return fmt.Errorf("damage %s: %d leaf pages, want several", path, len(leaves))
		}
		victim = leaves[len(leaves)/2]
		p, _ := tx.Page(victim)
		held = p.Count
		return nil
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	junk := make([]byte, ps)
	crand.Read(junk)
	if _, err := f.WriteAt(junk, int64(victim*ps)); err != nil {
		return 0, err
	}
	return held, nil
}

// FillDisk writes a file under dir until its filesystem reports ENOSPC,
// down to the last 512 bytes, and returns the file's path: removing it
// gives the room back.
func FillDisk(dir string) (string, error) {
	p := filepath.Join(dir, "filler")
	f, err := os.Create(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	for n := len(buf); n >= 512; n /= 2 {
		for {
			if _, err := f.Write(buf[:n]); err != nil {
				if !errors.Is(err, unix.ENOSPC) {
					return "", fmt.Errorf("fill %s: %w, want ENOSPC", dir, err)
				}
				break
			}
		}
	}
	return p, nil
}
