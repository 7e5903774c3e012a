// Package safefile reads the files that decide who gets which token (the
// policy, API keys, configuration) and checks the directories tokend writes
// in. Whoever can change such a file can grant themselves tokens, so a file
// or directory that anyone but root or tokend's own user can change is
// refused. Checks are made on the opened descriptor, never on a path that
// could be swapped between the check and the read.
package safefile

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
)

// Rules say what Read accepts.
type Rules struct {
	// What names the file in errors: "policy", "API key file".
	What string
	// Secret also refuses a file that group or others may read.
	Secret bool
	// MaxSize bounds what is read; 0 means 1 MiB.
	MaxSize int64
}

const defaultMaxSize = 1 << 20

// Read opens path (following a symbolic link to its target, as a mounted
// secret often is), checks the opened file against r and reads it whole.
// Errors name the file, what was found and what is expected; they never
// show the content.
func Read(path string, r Rules) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", r.What, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", r.What, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s %s: not a regular file (%v)", r.What, path, fi.Mode().Type())
	}
	if err := CheckFile(path, fi, r); err != nil {
		return nil, err
	}
	limit := r.MaxSize
	if limit <= 0 {
		limit = defaultMaxSize
	}
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s %s: %w", r.What, path, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("%s %s: larger than %d bytes", r.What, path, limit)
	}
	return data, nil
}

// CheckFile refuses a file, described by fi as found at path, that another
// non-root user owns, that group or others may write, or (for a secret)
// that group or others may read.
func CheckFile(path string, fi os.FileInfo, r Rules) error {
	uid, err := owner(fi)
	if err != nil {
		return fmt.Errorf("%s %s: %w", r.What, path, err)
	}
	mode := fi.Mode().Perm()
	self := os.Geteuid()
	switch {
	case !trusted(uid):
		return fmt.Errorf("%s %s is owned by uid %d (mode %04o); want a file owned by root or tokend's uid %d, since its owner could change it: chown %d %s",
			r.What, path, uid, mode, self, self, path)
	case mode&0o022 != 0:
		return fmt.Errorf("%s %s is mode %04o: writable by others (%s); want a file only root or uid %d can write: chmod go-w %s",
			r.What, path, mode, whoWrites(mode), self, path)
	case r.Secret && mode&0o077 != 0:
		return fmt.Errorf("%s %s is mode %04o, readable by group or others; run chmod 600 %s", r.What, path, mode, path)
	}
	return nil
}

// CheckDir refuses a directory tokend creates files in, described by fi as
// found at path, when someone else could swap those files: one owned by
// another non-root user, or writable by group or others without the sticky
// bit. A sticky directory such as /tmp is accepted, since there only an
// entry's owner may rename or remove it.
func CheckDir(path string, fi os.FileInfo, what string) error {
	uid, err := owner(fi)
	if err != nil {
		return fmt.Errorf("%s %s: %w", what, path, err)
	}
	mode := fi.Mode()
	self := os.Geteuid()
	switch {
	case !fi.IsDir():
		return fmt.Errorf("%s %s is not a directory", what, path)
	case !trusted(uid):
		return fmt.Errorf("%s %s is owned by uid %d (mode %04o); want a directory owned by root or tokend's uid %d, since its owner could replace what tokend creates in it",
			what, path, uid, mode.Perm(), self)
	case mode.Perm()&0o022 != 0 && mode&os.ModeSticky == 0:
		return fmt.Errorf("%s %s is mode %04o: writable by others (%s) without the sticky bit, so they could replace what tokend creates in it; want chmod go-w %s (or chmod +t)",
			what, path, mode.Perm(), whoWrites(mode.Perm()), path)
	}
	return nil
}

// trusted says whether files owned by uid may steer tokend.
func trusted(uid uint32) bool { return uid == 0 || int(uid) == os.Geteuid() }

func owner(fi os.FileInfo) (uint32, error) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, errors.New("cannot read the file's owner")
	}
	return st.Uid, nil
}

func whoWrites(mode os.FileMode) string {
	switch {
	case mode&0o022 == 0o022:
		return "its group and everyone"
	case mode&0o020 != 0:
		return "its group"
	}
	return "everyone"
}
