package server

import (
	"bufio"
	"bytes"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/tokend/tokend/internal/peercred"
)

// dialHelperEnv makes the test binary a client that dials as another uid:
// "socket uid gid groups n" (groups comma-separated or "-"). It prints
// "dialed" once its n connections are made and holds them until stdin
// closes.
const dialHelperEnv = "TOKEND_TEST_DIAL_AS"

func TestMain(m *testing.M) {
	if spec := os.Getenv(dialHelperEnv); spec != "" {
		if err := dialHelper(spec); err != nil {
			fmt.Fprintln(os.Stderr, "dial helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func dialHelper(spec string) error {
	f := strings.Fields(spec)
	if len(f) != 5 {
		return fmt.Errorf("%s=%q: want socket uid gid groups n", dialHelperEnv, spec)
	}
	uid, _ := strconv.Atoi(f[1])
	gid, _ := strconv.Atoi(f[2])
	n, _ := strconv.Atoi(f[4])
	groups := []int{}
	if f[3] != "-" {
		for _, g := range strings.Split(f[3], ",") {
			v, _ := strconv.Atoi(g)
			groups = append(groups, v)
		}
	}
	// Go applies these to every thread of the process.
	if err := syscall.Setgroups(groups); err != nil {
		return err
	}
	if err := syscall.Setgid(gid); err != nil {
		return err
	}
	if err := syscall.Setuid(uid); err != nil {
		return err
	}
	var conns []net.Conn
	for range n {
		c, err := net.Dial("unix", f[0])
		if err != nil {
			return err
		}
		conns = append(conns, c)
	}
	fmt.Println("dialed")
	bufio.NewReader(os.Stdin).ReadString('\n')
	for _, c := range conns {
		c.Close()
	}
	return nil
}

// capRig is a capped listener on a real Unix socket that other uids can
// reach, and the connections it has admitted.
type capRig struct {
	t        *testing.T
	sock     string
	cc       *connCounts
	ln       net.Listener
	accepted chan *countedConn
}

func newCapRig(t *testing.T, lim ConnLimits, a admins) *capRig {
	if os.Geteuid() != 0 {
		t.Skip("needs root: helper clients switch to other uids to test per-uid caps")
	}
	dir, err := os.MkdirTemp("", "tokend-caps-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s.sock")
	raw, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(sock, 0o777); err != nil {
		t.Fatal(err)
	}
	r := &capRig{t: t, sock: sock, cc: newConnCounts(lim, a, slog.New(slog.DiscardHandler)), accepted: make(chan *countedConn, 64)}
	r.ln = r.cc.limit(raw)
	go func() {
		defer close(r.accepted)
		for {
			c, err := r.ln.Accept()
			if err != nil {
				return
			}
			r.accepted <- c.(*countedConn)
		}
	}()
	t.Cleanup(func() { r.ln.Close() })
	return r
}

// dialAs opens n connections as uid/gid/groups from a helper process and
// returns those the listener admitted. It dials a marker connection as
// root afterwards: Accept takes connections in order, so once the marker
// is through, every helper connection has been admitted or refused.
func (r *capRig) dialAs(uid, gid uint32, groups string, n int) []*countedConn {
	r.t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %d %d %s %d", dialHelperEnv, r.sock, uid, gid, groups, n))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		r.t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		r.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { stdin.Close(); cmd.Wait() })
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "dialed\n" {
		cmd.Wait()
		r.t.Fatalf("helper as uid %d: %q, %v; stderr: %s", uid, line, err, stderr.String())
	}
	marker, err := net.Dial("unix", r.sock)
	if err != nil {
		r.t.Fatal(err)
	}
	defer marker.Close()
	var got []*countedConn
	for c := range r.accepted {
		if c.uid == 0 {
			c.Close()
			return got
		}
		got = append(got, c)
	}
	r.t.Fatal("listener closed")
	return nil
}

func (r *capRig) wantOpen(step string, want map[uint32]int, refused uint64) {
	r.t.Helper()
	got := r.cc.openByUID()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		r.t.Errorf("%s: open by uid %v, want %v", step, got, want)
	}
	if n := r.cc.refusedTotal.Load(); n != refused {
		r.t.Errorf("%s: refused %d, want %d", step, n, refused)
	}
}

// TestCapListenerOverUnixSocket: uids read from SO_PEERCRED of real
// connections from other processes are held to their cap; a closed
// connection frees its slot exactly once; a member of the admin group by
// a supplementary group (read from /proc) is not held to the per-uid cap.
func TestCapListenerOverUnixSocket(t *testing.T) {
	const adminGID = 4243
	gid := uint32(adminGID)
	r := newCapRig(t, ConnLimits{Total: 16, PerUID: 3, Reserve: 6}, admins{self: 4242, gid: &gid})

	nobody := r.dialAs(65534, 65534, "-", 5)
	if len(nobody) != 3 {
		t.Fatalf("nobody dialed 5 with a cap of 3: %d admitted", len(nobody))
	}
	r.wantOpen("nobody over its cap", map[uint32]int{65534: 3}, 2)

	nobody[0].Close()
	nobody[0].Close()
	r.wantOpen("one closed twice", map[uint32]int{65534: 2}, 2)
	if got := r.dialAs(65534, 65534, "-", 1); len(got) != 1 {
		t.Fatalf("nobody after a close: %d admitted, want 1", len(got))
	}
	r.wantOpen("nobody's freed slot reused", map[uint32]int{65534: 3}, 2)

	// 16 in all, 6 kept for administrators: other uids share 10.
	r.dialAs(65533, 65533, "-", 3)
	r.dialAs(65532, 65532, "-", 5)
	if got := r.dialAs(65530, 65530, "-", 3); len(got) != 1 {
		t.Fatalf("uid 65530 with 9 of 10 shared slots taken: %d admitted, want 1", len(got))
	}
	r.wantOpen("shared slots full", map[uint32]int{65534: 3, 65533: 3, 65532: 3, 65530: 1}, 2+2+2)

	// An operator in the admin group by a supplementary group goes past
	// the per-uid cap into the reserve (the marker takes the last slot).
	if got := r.dialAs(65531, 65531, strconv.Itoa(adminGID), 5); len(got) != 5 {
		t.Fatalf("admin-group member: %d of 5 admitted, want all", len(got))
	}
	r.wantOpen("admin in the reserve", map[uint32]int{65534: 3, 65533: 3, 65532: 3, 65530: 1, 65531: 5}, 6)
}

// TestConnCapsAdmit walks the caps on virtual time: who is refused and
// why, the reserve, and the refusal log (the first refusal of a uid at
// once, the rest as one line with a count per interval).
func TestConnCapsAdmit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var logs bytes.Buffer
		gid := uint32(50)
		cc := newConnCounts(ConnLimits{Total: 6, PerUID: 2, Reserve: 2}, admins{self: 900, gid: &gid}, slog.New(slog.NewTextHandler(&logs, nil)))
		steps := []struct {
			name string
			cred peercred.Ucred
			want string // substring of the refusal; "" admitted
		}{
			{"uid 1000 first", peercred.Ucred{UID: 1000, GID: 1000}, ""},
			{"uid 1000 second", peercred.Ucred{UID: 1000, GID: 1000}, ""},
			{"uid 1000 over its cap", peercred.Ucred{UID: 1000, GID: 1000}, "per-uid cap: uid 1000 holds 2 connections of --max-connections-per-uid 2"},
			{"uid 1001", peercred.Ucred{UID: 1001, GID: 1001}, ""},
			{"uid 1002 fills the shared slots", peercred.Ucred{UID: 1002, GID: 1002}, ""},
			{"uid 1003 meets the reserve", peercred.Ucred{UID: 1003, GID: 1003}, "of which 2 are kept for administrators"},
			{"root takes the reserve", peercred.Ucred{UID: 0, GID: 0}, ""},
			{"admin group by primary gid", peercred.Ucred{UID: 1004, GID: 50}, ""},
			{"root over the total", peercred.Ucred{UID: 0, GID: 0}, "max connections: 6 open of --max-connections 6"},
			{"uid 1000 at the total", peercred.Ucred{UID: 1000, GID: 1000}, "max connections: 6 open"},
		}
		for _, s := range steps {
			if _, got := cc.admit(s.cred); s.want == "" && got != "" || !strings.Contains(got, s.want) {
				t.Errorf("%s: refusal %q, want %q", s.name, got, s.want)
			}
		}
		if n := cc.refusedTotal.Load(); n != 4 {
			t.Errorf("refused %d, want 4", n)
		}
		lines := func(uid string) []string {
			var out []string
			for _, l := range strings.Split(logs.String(), "\n") {
				if strings.Contains(l, "uid="+uid+" ") {
					out = append(out, l)
				}
			}
			return out
		}
		if l := lines("1000"); len(l) != 1 || !strings.Contains(l[0], "refused=1 ") {
			t.Fatalf("uid 1000's lines before the interval ends: %q", l)
		}
		for range 50 {
			if _, why := cc.admit(peercred.Ucred{UID: 1000, GID: 1000}); why == "" {
				t.Fatal("uid 1000 admitted at the total")
			}
		}
		time.Sleep(refusalLogEvery)
		synctest.Wait()
		if l := lines("1000"); len(l) != 2 || !strings.Contains(l[1], "refused=51 ") {
			t.Fatalf("uid 1000's lines after one interval: %q", l)
		}
		// A quiet interval writes nothing and forgets the uid.
		time.Sleep(3 * refusalLogEvery)
		synctest.Wait()
		if l := lines("1000"); len(l) != 2 {
			t.Fatalf("uid 1000's lines after quiet intervals: %q", l)
		}
		cc.mu.Lock()
		left := len(cc.refused)
		cc.mu.Unlock()
		if left != 0 {
			t.Errorf("%d uids still tracked after quiet intervals", left)
		}
		// A released slot is shared again; the reserve stays the
		// administrators'.
		cc.release(1000, false)
		if _, got := cc.admit(peercred.Ucred{UID: 1003, GID: 1003}); got != "" {
			t.Errorf("uid 1003 after uid 1000 closed one: refused %q", got)
		}
		if got := fmt.Sprint(cc.openByUID()); got != "map[0:1 1000:1 1001:1 1002:1 1003:1 1004:1]" {
			t.Errorf("open by uid %s", got)
		}
		cc.release(0, true)
		if _, got := cc.admit(peercred.Ucred{UID: 1005, GID: 1005}); !strings.Contains(got, "4 of them by non-administrators") {
			t.Errorf("uid 1005 with a reserved slot free: refusal %q, want the reserve's", got)
		}
	})
}

// openByUID is a copy of the open connections by uid.
func (cc *connCounts) openByUID() map[uint32]int {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	m := make(map[uint32]int, len(cc.byUID))
	for uid, n := range cc.byUID {
		m[uid] = n
	}
	return m
}
