// Package safesocket listens on Unix sockets whose file never exists at its
// path with a wider mode than asked for, and is never created, chmod-ed or
// removed through a path another user could swap. The hazard it removes:
// between bind(2) and chmod(2) a socket has the mode the umask allows, and
// a chmod by path follows whatever symbolic link was put there.
package safesocket

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tokend/tokend/internal/safefile"
)

// maxPath is the longest path bind(2) takes (sun_path less its NUL).
const maxPath = 107

// Listen listens on a Unix socket at path with the given mode. The socket
// is bound in a fresh 0700 directory next to path, given its mode there
// and renamed into place, so it appears at path with its final mode. The
// directory of path must be owned by root or this uid and not writable by
// others (unless sticky). A leftover socket is replaced only when nothing
// answers on it; anything else in the way is refused. Closing the listener
// removes the file if it is still the one Listen made.
func Listen(path string, mode os.FileMode) (net.Listener, error) {
	dir, base := filepath.Dir(path), filepath.Base(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create socket directory %s: %w", dir, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("open socket directory %s: %w", dir, err)
	}
	fi, err := d.Stat()
	if err == nil {
		err = safefile.CheckDir(dir, fi, "socket directory")
	}
	if err == nil {
		err = clearStale(d, path, base)
	}
	var ln *listener
	if err == nil {
		ln, err = bindInto(d, path, base, mode)
	}
	if err != nil {
		d.Close()
		return nil, err
	}
	return ln, nil
}

// clearStale refuses what is at path unless it is absent or a socket
// nobody answers on, which the rename will replace.
func clearStale(d *os.File, path, base string) error {
	var st unix.Stat_t
	err := unix.Fstatat(int(d.Fd()), base, &st, unix.AT_SYMLINK_NOFOLLOW)
	switch {
	case errors.Is(err, unix.ENOENT):
		return nil
	case err != nil:
		return fmt.Errorf("listen on %s: %w", path, err)
	case st.Mode&unix.S_IFMT == unix.S_IFLNK:
		return fmt.Errorf("listen on %s: a symbolic link is in the way; tokend does not follow links at its socket path: remove it", path)
	case st.Mode&unix.S_IFMT != unix.S_IFSOCK:
		return fmt.Errorf("listen on %s: a file that is not a socket is in the way; remove it or choose another path", path)
	}
	if c, err := net.DialTimeout("unix", path, 500*time.Millisecond); err == nil {
		c.Close()
		return fmt.Errorf("listen on %s: address already in use: another tokend is answering on it", path)
	}
	return nil
}

// bindInto binds in a private directory under d, sets the mode there,
// where no one else can reach the socket, and renames it to base.
func bindInto(d *os.File, path, base string, mode os.FileMode) (*listener, error) {
	dfd := int(d.Fd())
	priv, privName, err := privateDir(d)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	pfd := int(priv.Fd())
	defer func() {
		unix.Unlinkat(pfd, "s", 0) // only left there on failure
		unix.Unlinkat(dfd, privName, unix.AT_REMOVEDIR)
		priv.Close()
	}()
	bindPath := filepath.Join(filepath.Dir(path), privName, "s")
	if len(bindPath) > maxPath {
		// The descriptor names the same directory in fewer bytes.
		bindPath = fmt.Sprintf("/proc/self/fd/%d/s", pfd)
	}
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: bindPath, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ul.SetUnlinkOnClose(false)
	var st unix.Stat_t
	// Renameat and Fstatat name the private directory by descriptor: if
	// bindPath led elsewhere, they find no "s" and fail.
	if err = unix.Fchmodat(pfd, "s", uint32(mode.Perm()), 0); err != nil {
		err = fmt.Errorf("set mode %04o on socket %s: %w", mode.Perm(), path, err)
	} else if err = unix.Fstatat(pfd, "s", &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		err = fmt.Errorf("listen on %s: %w", path, err)
	} else if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		err = fmt.Errorf("listen on %s: the bound socket was replaced", path)
	} else if err = unix.Renameat(pfd, "s", dfd, base); err != nil {
		err = fmt.Errorf("listen on %s: move the socket into place: %w", path, err)
	}
	if err != nil {
		ul.Close()
		return nil, err
	}
	return &listener{UnixListener: ul, dir: d, base: base, addr: &net.UnixAddr{Name: path, Net: "unix"}, dev: st.Dev, ino: st.Ino}, nil
}

// privateDir creates a 0700 directory with a random name in d.
func privateDir(d *os.File) (*os.File, string, error) {
	dfd := int(d.Fd())
	for range 10 {
		b := make([]byte, 4)
		rand.Read(b)
		name := ".tk" + hex.EncodeToString(b)
		err := unix.Mkdirat(dfd, name, 0o700)
		if errors.Is(err, unix.EEXIST) {
			continue // someone's entry; never touch it
		}
		if err != nil {
			return nil, "", fmt.Errorf("create a private directory in %s: %w", d.Name(), err)
		}
		fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			unix.Unlinkat(dfd, name, unix.AT_REMOVEDIR)
			return nil, "", fmt.Errorf("open private directory %s in %s: %w", name, d.Name(), err)
		}
		// The umask may have narrowed it further than this process can use.
		if err := unix.Fchmod(fd, 0o700); err != nil {
			unix.Close(fd)
			unix.Unlinkat(dfd, name, unix.AT_REMOVEDIR)
			return nil, "", fmt.Errorf("set mode of private directory %s in %s: %w", name, d.Name(), err)
		}
		return os.NewFile(uintptr(fd), filepath.Join(d.Name(), name)), name, nil
	}
	return nil, "", fmt.Errorf("create a private directory in %s: 10 random names were taken", d.Name())
}

// listener is the socket at its final path; Close removes that file only
// while it is still the socket bound here, never a file put there since.
type listener struct {
	*net.UnixListener
	dir       *os.File
	base      string
	addr      net.Addr
	dev, ino  uint64
	closeOnce sync.Once
	closeErr  error
}

// Addr is the path the socket was moved to, not where it was bound.
func (l *listener) Addr() net.Addr { return l.addr }

func (l *listener) Close() error {
	l.closeOnce.Do(func() {
		l.closeErr = l.UnixListener.Close()
		var st unix.Stat_t
		dfd := int(l.dir.Fd())
		if unix.Fstatat(dfd, l.base, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Dev == l.dev && st.Ino == l.ino {
			unix.Unlinkat(dfd, l.base, 0)
		}
		l.dir.Close()
	})
	return l.closeErr
}
