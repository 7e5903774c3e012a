package safefile

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRead(t *testing.T) {
	root := os.Geteuid() == 0
	tests := []struct {
		name   string
		mode   os.FileMode
		owner  int // -1: this process
		rules  Rules
		link   bool // read through a symbolic link to the file
		size   int
		want   string // "" means accepted
		noRoot bool   // the case needs root (chown)
	}{
		{"policy 0644", 0o644, -1, Rules{What: "policy"}, false, 10, "", false},
		{"systemd credential 0400", 0o400, -1, Rules{What: "API key file", Secret: true}, false, 10, "", false},
		{"secret through a link", 0o600, -1, Rules{What: "API key file", Secret: true}, true, 10, "", false},
		{"group-writable 0620", 0o620, -1, Rules{What: "API key file", Secret: true}, false, 10, "mode 0620: writable by others (its group)", false},
		{"world-writable 0646", 0o646, -1, Rules{What: "policy"}, false, 10, "mode 0646: writable by others (everyone)", false},
		{"secret readable 0640", 0o640, -1, Rules{What: "cache key file", Secret: true}, false, 10, "mode 0640, readable by group or others", false},
		{"owned by uid 1234", 0o600, 1234, Rules{What: "policy"}, false, 10, "owned by uid 1234 (mode 0600)", true},
		{"owned by uid 1234 through a link", 0o644, 1234, Rules{What: "config file"}, true, 10, "owned by uid 1234", true},
		{"too large", 0o600, -1, Rules{What: "policy", MaxSize: 8}, false, 9, "larger than 8 bytes", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.noRoot && !root {
				t.Skip("needs root to give the file to another uid")
			}
			dir := t.TempDir()
			path := filepath.Join(dir, "f")
			if err := os.WriteFile(path, []byte(strings.Repeat("x", tt.size)), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(path, tt.mode); err != nil {
				t.Fatal(err)
			}
			if tt.owner >= 0 {
				if err := os.Chown(path, tt.owner, tt.owner); err != nil {
					t.Fatal(err)
				}
			}
			read := path
			if tt.link {
				read = filepath.Join(dir, "link")
				if err := os.Symlink(path, read); err != nil {
					t.Fatal(err)
				}
			}
			data, err := Read(read, tt.rules)
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("Read: %v", err)
			case tt.want == "" && len(data) != tt.size:
				t.Fatalf("Read returned %d bytes, want %d", len(data), tt.size)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), read) || !strings.HasPrefix(err.Error(), tt.rules.What)):
				t.Fatalf("Read: %v; want an error naming the %s %s and saying %q", err, tt.rules.What, read, tt.want)
			}
		})
	}
	if _, err := Read(t.TempDir(), Rules{What: "policy"}); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Fatalf("Read(dir) = %v, want a 'not a regular file' error", err)
	}
}
