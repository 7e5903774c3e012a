// Package peercred identifies the local process on the other end of a Unix
// socket. It reads SO_PEERCRED once per connection, in gRPC's transport
// handshake, and hands the result to handlers as the peer's AuthInfo.
//
// The hazard is PID reuse: a pid read at connect time may name another
// process later. Info.Exe re-checks the process start time so a decision
// that depends on the executable cannot be fooled by a recycled pid.
package peercred

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// Info is what the kernel says about the peer, captured at connect time.
type Info struct {
	credentials.CommonAuthInfo
	UID, GID uint32
	PID      int32
	// Groups are the peer's supplementary groups from /proc at connect
	// time; nil if /proc could not be read.
	Groups []uint32
	// startTime is the process start time (clock ticks since boot) that
	// pins PID to one process.
	startTime uint64
	// exe is the executable at connect time. A process may exec another
	// binary (same pid and start time) after connecting; Exe then refuses.
	exe string
	// Local is the server's own per-connection state, set by a wrapping
	// handshake before the connection serves calls and read-only after.
	Local any
}

// AuthType implements credentials.AuthInfo.
func (*Info) AuthType() string { return "peercred" }

// InGroup reports whether gid is the peer's primary or a supplementary group.
func (i *Info) InGroup(gid uint32) bool {
	if i.GID == gid {
		return true
	}
	for _, g := range i.Groups {
		if g == gid {
			return true
		}
	}
	return false
}

// ErrProcessGone means the pid no longer belongs to the process that
// connected.
var ErrProcessGone = errors.New("the connecting process has exited or its pid was reused")

// Exe returns the peer's executable path, failing if the pid now belongs to
// another process.
func (i *Info) Exe() (string, error) {
	if i.PID <= 0 {
		return "", fmt.Errorf("peer pid unknown: %w", ErrProcessGone)
	}
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", i.PID))
	if err != nil {
		return "", fmt.Errorf("read executable of pid %d: %w", i.PID, err)
	}
	// Checked after the read: if the pid was recycled before or during it,
	// the start time differs.
	if st, err := startTime(i.PID); err != nil || st != i.startTime {
		return "", fmt.Errorf("pid %d: %w", i.PID, ErrProcessGone)
	}
	if exe != i.exe {
		return "", fmt.Errorf("pid %d executed %s after connecting as %s: %w", i.PID, exe, i.exe, ErrProcessGone)
	}
	return exe, nil
}

// FromContext returns the peer's Info in a handler, if the connection came
// through Credentials.
func FromContext(ctx context.Context) (*Info, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, false
	}
	info, ok := p.AuthInfo.(*Info)
	return info, ok
}

// Credentials is a server-side credentials.TransportCredentials for Unix
// sockets. It adds no encryption: the kernel is the channel.
type Credentials struct{}

var _ credentials.TransportCredentials = Credentials{}

// Ucred is what SO_PEERCRED says of the peer.
type Ucred struct {
	UID, GID uint32
	PID      int32
}

// Read reads SO_PEERCRED of a Unix socket connection: one syscall on its
// file descriptor, with no I/O on the connection.
func Read(conn net.Conn) (Ucred, error) {
	sc, ok := conn.(syscall.Conn)
	if _, unix := conn.LocalAddr().(*net.UnixAddr); !ok || !unix {
		return Ucred{}, fmt.Errorf("peercred: connection from %v is not a Unix socket", conn.RemoteAddr())
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return Ucred{}, fmt.Errorf("peercred: %w", err)
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Ucred{}, fmt.Errorf("peercred: %w", err)
	}
	if serr != nil {
		return Ucred{}, fmt.Errorf("peercred: read SO_PEERCRED: %w", serr)
	}
	return Ucred{UID: cred.Uid, GID: cred.Gid, PID: cred.Pid}, nil
}

// ServerHandshake reads the peer's credentials. A connection that is not a
// Unix socket, or whose credentials cannot be read, is refused.
func (Credentials) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	cred, err := Read(conn)
	if err != nil {
		return nil, nil, err
	}
	info := &Info{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity},
		UID:            cred.UID,
		GID:            cred.GID,
		PID:            cred.PID,
	}
	if cred.PID > 0 {
		info.startTime, _ = startTime(cred.PID)
		info.Groups, _ = Groups(cred.PID)
		info.exe, _ = os.Readlink(fmt.Sprintf("/proc/%d/exe", cred.PID))
	}
	return conn, info, nil
}

// ClientHandshake is not used: clients dial with insecure credentials.
func (Credentials) ClientHandshake(_ context.Context, _ string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return conn, &Info{}, nil
}

func (Credentials) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}

func (c Credentials) Clone() credentials.TransportCredentials { return c }

func (Credentials) OverrideServerName(string) error { return nil }

// startTime reads field 22 of /proc/PID/stat. The command name (field 2)
// may hold spaces and parentheses, so fields are counted after its last ')'.
func startTime(pid int32) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat: no command field", pid)
	}
	f := strings.Fields(s[i+1:])
	// After ')' come field 3 (state) onward; starttime is field 22.
	if len(f) < 20 {
		return 0, fmt.Errorf("parse /proc/%d/stat: %d fields", pid, len(f)+2)
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// Groups reads the supplementary groups of pid from /proc/PID/status.
func Groups(pid int32) ([]uint32, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		rest, ok := strings.CutPrefix(line, "Groups:")
		if !ok {
			continue
		}
		var out []uint32
		for _, g := range strings.Fields(rest) {
			n, err := strconv.ParseUint(g, 10, 32)
			if err != nil {
				return nil, fmt.Errorf("parse groups of pid %d: %w", pid, err)
			}
			out = append(out, uint32(n))
		}
		return out, nil
	}
	return nil, nil
}
