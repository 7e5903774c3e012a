package cache

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/tokend/tokend/internal/safefile"
)

// openStateDir creates dir 0700, or narrows an existing one to 0700,
// because the file below it holds bearer tokens, and returns it open: the
// files in it are opened, written and removed relative to that handle, so
// swapping the path afterwards changes nothing. A directory another
// non-root user owns is refused.
func openStateDir(dir string) (*os.File, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory %s: %w", dir, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("state directory %s: %w", dir, err)
	}
	fi, err := d.Stat()
	if err == nil && fi.IsDir() && fi.Mode().Perm()&0o077 != 0 {
		if err = d.Chmod(0o700); err != nil {
			err = fmt.Errorf("state directory %s is mode %v and cannot be made 0700: %w", dir, fi.Mode().Perm(), err)
		} else {
			fi, err = d.Stat()
		}
	}
	if err == nil {
		err = safefile.CheckDir(dir, fi, "state directory")
	}
	if err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// dbOpener is bbolt's Options.OpenFile: the cache file is opened in dir
// without following a symbolic link, must be a regular file tokend's user
// (or root) owns, and is made 0600 through its descriptor.
func dbOpener(dir *os.File) func(string, int, os.FileMode) (*os.File, error) {
	return func(name string, flag int, perm os.FileMode) (*os.File, error) {
		fd, err := unix.Openat(int(dir.Fd()), filepath.Base(name), flag|unix.O_NOFOLLOW|unix.O_CLOEXEC, uint32(perm.Perm()))
		if errors.Is(err, unix.ELOOP) {
			return nil, fmt.Errorf("%s is a symbolic link; tokend does not follow links in its state directory: remove it", name)
		}
		if err != nil {
			return nil, &os.PathError{Op: "open", Path: name, Err: err}
		}
		f := os.NewFile(uintptr(fd), name)
		fi, err := f.Stat()
		if err == nil && !fi.Mode().IsRegular() {
			err = fmt.Errorf("%s is not a regular file (%v)", name, fi.Mode().Type())
		}
		if err == nil {
			err = safefile.CheckFile(name, fi, safefile.Rules{What: "cache file"})
		}
		if err == nil && flag&(os.O_WRONLY|os.O_RDWR) != 0 {
			// Read-only opens (a read-only disk) leave the mode alone.
			err = f.Chmod(0o600)
		}
		if err != nil {
			f.Close()
			return nil, err
		}
		return f, nil
	}
}

// writePID records this process in the pid file next to the cache: written
// to a new file and renamed over the old name, so a link planted there is
// replaced, never written through.
func writePID(dir *os.File, dbPath string) error {
	name := filepath.Base(pidPath(dbPath))
	tmp := name + ".new"
	dfd := int(dir.Fd())
	unix.Unlinkat(dfd, tmp, 0) // left by a crash; we hold the cache lock
	fd, err := unix.Openat(dfd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), tmp)
	_, werr := f.WriteString(strconv.Itoa(os.Getpid()) + "\n")
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = unix.Renameat(dfd, tmp, dfd, name)
	}
	if werr != nil {
		unix.Unlinkat(dfd, tmp, 0)
	}
	return werr
}

// readPID returns the pid in the pid file next to the cache, or "" when
// there is none or the file is not a short run of digits: its content goes
// into an error message, so nothing else is shown.
func readPID(dir *os.File, dbPath string) string {
	fd, err := unix.Openat(int(dir.Fd()), filepath.Base(pidPath(dbPath)), unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return ""
	}
	f := os.NewFile(uintptr(fd), "pid")
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return ""
	}
	b, _ := io.ReadAll(io.LimitReader(f, 16))
	b = bytes.TrimSpace(b)
	if _, err := strconv.ParseUint(string(b), 10, 32); err != nil {
		return ""
	}
	return string(b)
}

// removePID removes the pid file, not what a link there points to.
func removePID(dir *os.File, dbPath string) {
	unix.Unlinkat(int(dir.Fd()), filepath.Base(pidPath(dbPath)), 0)
}
