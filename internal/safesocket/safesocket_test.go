package safesocket

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// shortDir is a directory with a path short enough for sun_path.
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "tss")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func serve(ln net.Listener) {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
}

// TestListen covers what may be in the way and what is left behind.
func TestListen(t *testing.T) {
	dir := shortDir(t)
	path := filepath.Join(dir, "sub", "t.sock")
	ln, err := Listen(path, 0o660)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(path); err != nil || fi.Mode().Perm() != 0o660 || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("socket = %v, %v; want a 0660 socket", fi.Mode(), err)
	}
	if ln.Addr().String() != path {
		t.Fatalf("Addr = %s, want %s", ln.Addr(), path)
	}
	serve(ln)
	if c, err := net.Dial("unix", path); err != nil {
		t.Fatalf("dial the moved socket: %v", err)
	} else {
		c.Close()
	}
	if _, err := Listen(path, 0o660); err == nil || !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("second Listen on a live socket: %v, want address already in use", err)
	}
	if fi, err := os.Lstat(path); err != nil || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("the refused Listen touched the live socket: %v, %v", fi, err)
	}
	ln.Close()
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("socket file left after Close: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Dir(path)); len(ents) != 0 {
		t.Fatalf("Listen left %d entries behind (%v), want none", len(ents), ents)
	}

	// A stale socket (nobody answering) is replaced.
	stale := filepath.Join(dir, "stale.sock")
	l2, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l2.(*net.UnixListener).SetUnlinkOnClose(false)
	l2.Close()
	ln3, err := Listen(stale, 0o600)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	// A file renamed over the socket after Listen is not the listener's
	// to remove.
	other := filepath.Join(dir, "other")
	must(t, os.WriteFile(other, []byte("keep"), 0o600))
	must(t, os.Rename(other, stale))
	ln3.Close()
	if b, err := os.ReadFile(stale); err != nil || string(b) != "keep" {
		t.Fatalf("Close removed a file that replaced the socket: %q, %v", b, err)
	}
}

// TestListenRefuses: nothing in the way is followed, removed or changed.
func TestListenRefuses(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, dir, path string) (check func())
		want  string
	}{
		{"regular file", func(t *testing.T, dir, path string) func() {
			must(t, os.WriteFile(path, []byte("x"), 0o644))
			return unchanged(t, path, "x", 0o644)
		}, "not a socket"},
		{"symbolic link to a 0600 file", func(t *testing.T, dir, path string) func() {
			target := filepath.Join(dir, "target")
			must(t, os.WriteFile(target, []byte("secret"), 0o600))
			must(t, os.Symlink(target, path))
			return unchanged(t, target, "secret", 0o600)
		}, "symbolic link"},
		{"dangling symbolic link", func(t *testing.T, dir, path string) func() {
			target := filepath.Join(dir, "nothing")
			must(t, os.Symlink(target, path))
			return func() {
				if _, err := os.Lstat(target); !os.IsNotExist(err) {
					t.Errorf("Listen created the link's target: %v", err)
				}
			}
		}, "symbolic link"},
		{"world-writable directory", func(t *testing.T, dir, path string) func() {
			must(t, os.Chmod(dir, 0o777))
			return func() {}
		}, "writable by others (its group and everyone) without the sticky bit"},
		{"group-writable directory", func(t *testing.T, dir, path string) func() {
			must(t, os.Chmod(dir, 0o770))
			return func() {}
		}, "writable by others (its group)"},
		{"directory of another user", func(t *testing.T, dir, path string) func() {
			if os.Geteuid() != 0 {
				t.Skip("needs root to give the directory to another uid")
			}
			must(t, os.Chown(dir, 65534, 65534))
			return func() {}
		}, "owned by uid 65534"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(shortDir(t), "d")
			must(t, os.Mkdir(dir, 0o755))
			path := filepath.Join(dir, "t.sock")
			check := tt.setup(t, dir, path)
			ln, err := Listen(path, 0o666)
			if err == nil {
				ln.Close()
				t.Fatalf("Listen succeeded; want an error saying %q", tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), dir) {
				t.Fatalf("Listen: %v; want an error naming %s and saying %q", err, dir, tt.want)
			}
			check()
			ents, _ := os.ReadDir(dir)
			for _, e := range ents {
				if strings.HasPrefix(e.Name(), ".tk") {
					t.Errorf("Listen left its private directory %s behind", e.Name())
				}
			}
		})
	}
}

// TestListenModes: the socket at its path has exactly the mode asked for,
// whatever the umask, in a sticky shared directory too, and with a path
// too long to bind in a private directory beside it.
func TestListenModes(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	tests := []struct {
		name string
		path func(t *testing.T) string
		mode os.FileMode
	}{
		{"umask 000, 0600", func(t *testing.T) string { return filepath.Join(shortDir(t), "a.sock") }, 0o600},
		{"umask 000, 0660", func(t *testing.T) string { return filepath.Join(shortDir(t), "a.sock") }, 0o660},
		{"sticky world-writable directory", func(t *testing.T) string {
			d := shortDir(t)
			must(t, os.Chmod(d, os.ModeSticky|0o777))
			return filepath.Join(d, "a.sock")
		}, 0o600},
		{"path near the sun_path limit", func(t *testing.T) string {
			d := shortDir(t)
			name := strings.Repeat("s", maxPath-len(d)-1)
			return filepath.Join(d, name)
		}, 0o640},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := tt.path(t)
			ln, err := Listen(path, tt.mode)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			fi, err := os.Lstat(path)
			if err != nil || fi.Mode().Perm() != tt.mode {
				t.Fatalf("socket mode %v, %v; want %v", fi.Mode().Perm(), err, tt.mode)
			}
			serve(ln)
			c, err := net.Dial("unix", path)
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			c.Close()
		})
	}
}

func unchanged(t *testing.T, path, content string, mode os.FileMode) func() {
	return func() {
		t.Helper()
		fi, err := os.Lstat(path)
		if err != nil || fi.Mode() != mode {
			t.Errorf("%s: mode %v, %v; want %v unchanged", path, fi.Mode(), err, mode)
		}
		if b, err := os.ReadFile(path); err != nil || string(b) != content {
			t.Errorf("%s: content %q, %v; want %q unchanged", path, b, err, content)
		}
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
