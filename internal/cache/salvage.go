package cache

import (
	"encoding/binary"
	"golang.org/x/sys/unix"
	"hash/fnv"
	"io"
	"os"
	"path/filepath"
)

// Salvage reads a damaged bbolt file by its on-disk layout, without bbolt,
// every access bounds-checked, so a bad page costs the records on it and
// nothing else. The layout (bbolt's internal/common: page.go, meta.go) is
// stable across bbolt 1.x: a page starts with a 16-byte header (id,
// flags, element count, overflow pages); two meta pages at the start name
// the root bucket, the freelist and the high-water mark; leaf elements are
// 16 bytes (flags, offset, key size, value size) and point at their key and
// value inside the page; a bucket's value is its root page id and sequence,
// followed by the bucket's own page when it is small enough to be inline.
// Byte order is the machine's; tokend runs on little-endian machines.

const (
	boltMagic        = 0xED0CDAED
	boltVersion      = 2
	pageHeaderSize   = 16
	elemSize         = 16 // leaf and branch elements alike
	branchPageFlag   = 0x01
	leafPageFlag     = 0x02
	freelistPageFlag = 0x10
	bucketLeafFlag   = 0x01
	noFreelist       = ^uint64(0)
	// maxTreeDepth stops a walk that a damaged branch sends in circles.
	maxTreeDepth = 64
)

// salvaged is what could be read out of a damaged file.
type salvaged struct {
	// entries are key/value pairs that look like records; decodeRecord
	// decides. When the same key turns up on several pages (an old copy on
	// a page bbolt had freed, if the freelist was unreadable), all are kept.
	entries []kv
	salt    []byte
	// count is the entries count the file last recorded; -1 if unknown.
	count int64
	// damaged counts pages that could not be read.
	damaged int
}

type kv struct{ k, v []byte }

// pageFile is a damaged file's bytes and the geometry its meta page gave.
type pageFile struct {
	b        []byte
	pageSize int
	hwm      uint64 // pages below it are allocated
	visited  map[uint64]bool
	out      *salvaged
}

// salvageFile reads every record that still decodes from the file at path,
// opened in dir without following a link. A read error is returned as it
// is, for the caller to tell an environmental error from damage.
func salvageFile(dir *os.File, path string) (*salvaged, error) {
	fd, err := unix.Openat(int(dir.Fd()), filepath.Base(path), unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, err
	}
	return salvageBytes(b), nil
}

func salvageBytes(b []byte) *salvaged {
	out := &salvaged{count: -1}
	f := &pageFile{b: b, visited: map[uint64]bool{}, out: out}
	root, freelist, ok := f.readMeta()
	if !ok {
		// No meta page to trust: guess the page size and scan every page.
		f.pageSize = os.Getpagesize()
		f.hwm = uint64(len(b) / f.pageSize)
		out.damaged++
		f.scanOrphans(nil)
		return out
	}
	before := out.damaged
	f.walk(root, 0)
	if out.damaged > before || len(out.entries) == 0 {
		// A damaged branch hides its whole subtree from the walk; its
		// leaves are still in the file. Pages on the freelist hold old
		// copies and are skipped when the freelist can be read.
		f.scanOrphans(f.freePages(freelist))
	}
	return out
}

func (f *pageFile) u16(off int) uint16 { return binary.LittleEndian.Uint16(f.b[off:]) }
func (f *pageFile) u32(off int) uint32 { return binary.LittleEndian.Uint32(f.b[off:]) }
func (f *pageFile) u64(off int) uint64 { return binary.LittleEndian.Uint64(f.b[off:]) }

// readMeta picks the valid meta page with the higher transaction id.
func (f *pageFile) readMeta() (root, freelist uint64, ok bool) {
	var txid uint64
	metaAt := func(off int) {
		m := off + pageHeaderSize
		if m+64 > len(f.b) || f.u32(m) != boltMagic || f.u32(m+4) != boltVersion {
			return
		}
		h := fnv.New64a()
		h.Write(f.b[m : m+56])
		if h.Sum64() != f.u64(m+56) {
			return
		}
		ps := int(f.u32(m + 8))
		if ps < 512 || ps&(ps-1) != 0 {
			return
		}
		if t := f.u64(m + 48); !ok || t > txid {
			f.pageSize, root, freelist, f.hwm, txid, ok = ps, f.u64(m+16), f.u64(m+32), f.u64(m+40), t, true
		}
	}
	metaAt(0)
	ps := os.Getpagesize()
	if ok {
		ps = f.pageSize
	}
	metaAt(ps)
	return root, freelist, ok
}

// page returns page id with its overflow pages, or false if it is outside
// the file or its header does not carry its own id, as every page bbolt
// writes does.
func (f *pageFile) page(id uint64) ([]byte, bool) {
	if id < 2 || id >= f.hwm || id > uint64(len(f.b)/f.pageSize) {
		return nil, false
	}
	off := int(id) * f.pageSize
	if off+pageHeaderSize > len(f.b) || f.u64(off) != id {
		return nil, false
	}
	end := uint64(off) + (uint64(f.u32(off+12))+1)*uint64(f.pageSize)
	if end > uint64(len(f.b)) {
		return nil, false
	}
	return f.b[off:end], true
}

// walk follows a bucket's tree from page id, collecting from every leaf.
func (f *pageFile) walk(id uint64, depth int) {
	if depth > maxTreeDepth || f.visited[id] {
		f.out.damaged++
		return
	}
	f.visited[id] = true
	p, ok := f.page(id)
	if !ok {
		f.out.damaged++
		return
	}
	switch binary.LittleEndian.Uint16(p[8:]) {
	case leafPageFlag:
		if !f.leaf(p, depth, true) {
			f.out.damaged++
		}
	case branchPageFlag:
		n := int(binary.LittleEndian.Uint16(p[10:]))
		if pageHeaderSize+n*elemSize > len(p) {
			f.out.damaged++
			return
		}
		for i := range n {
			f.walk(binary.LittleEndian.Uint64(p[pageHeaderSize+i*elemSize+8:]), depth+1)
		}
	default:
		f.out.damaged++
	}
}

// leaf collects a leaf page's pairs and its inline buckets', and walks the
// buckets it points at when follow is set. It reports false if the page's
// elements point outside it.
func (f *pageFile) leaf(p []byte, depth int, follow bool) bool {
	n := int(binary.LittleEndian.Uint16(p[10:]))
	if pageHeaderSize+n*elemSize > len(p) {
		return false
	}
	for i := range n {
		e := pageHeaderSize + i*elemSize
		flags := binary.LittleEndian.Uint32(p[e:])
		pos, ks, vs := uint64(binary.LittleEndian.Uint32(p[e+4:])), uint64(binary.LittleEndian.Uint32(p[e+8:])), uint64(binary.LittleEndian.Uint32(p[e+12:]))
		start := uint64(e) + pos
		if start+ks+vs > uint64(len(p)) {
			return false
		}
		k, v := p[start:start+ks], p[start+ks:start+ks+vs]
		switch {
		case flags&bucketLeafFlag != 0:
			if len(v) < 16 {
				return false
			}
			if root := binary.LittleEndian.Uint64(v); root != 0 {
				if follow {
					f.walk(root, depth+1)
				}
			} else if inline := v[16:]; len(inline) < pageHeaderSize || binary.LittleEndian.Uint16(inline[8:]) != leafPageFlag || !f.leaf(inline, depth+1, follow) {
				f.out.damaged++
			}
		case string(k) == string(saltKey) && len(v) == 32:
			f.out.salt = append([]byte(nil), v...)
		case string(k) == string(countKey) && len(v) == 8:
			f.out.count = int64(binary.BigEndian.Uint64(v))
		default:
			f.out.entries = append(f.out.entries, kv{append([]byte(nil), k...), append([]byte(nil), v...)})
		}
	}
	return true
}

// freePages reads the freelist; nil if it cannot be read.
func (f *pageFile) freePages(id uint64) map[uint64]bool {
	if id == noFreelist {
		return nil
	}
	p, ok := f.page(id)
	if !ok || binary.LittleEndian.Uint16(p[8:]) != freelistPageFlag {
		return nil
	}
	n, start := uint64(binary.LittleEndian.Uint16(p[10:])), uint64(pageHeaderSize)
	if n == 0xFFFF { // the real count is the first element
		if len(p) < pageHeaderSize+8 {
			return nil
		}
		n, start = binary.LittleEndian.Uint64(p[pageHeaderSize:]), pageHeaderSize+8
	}
	if start+n*8 > uint64(len(p)) {
		return nil
	}
	free := make(map[uint64]bool, n)
	for i := range n {
		free[binary.LittleEndian.Uint64(p[start+i*8:])] = true
	}
	return free
}

// scanOrphans reads every leaf page the walk did not reach and that is not
// free. Overflow pages are skipped through their first page's header.
func (f *pageFile) scanOrphans(free map[uint64]bool) {
	for id := uint64(2); id < f.hwm; id++ {
		if f.visited[id] || free[id] {
			continue
		}
		p, ok := f.page(id)
		if !ok {
			continue
		}
		if binary.LittleEndian.Uint16(p[8:]) == leafPageFlag {
			f.visited[id] = true
			f.leaf(p, 0, false) // the pages of buckets it names are scanned here too
		}
		id += uint64(len(p)/f.pageSize) - 1
	}
}
