package server

import (
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tokend/tokend/internal/peercred"
)

// Connection defaults. PostgreSQL's model: a per-user connection limit that
// does not bind superusers (CONNECTION LIMIT), and slots only superusers
// may take (superuser_reserved_connections).
const (
	// DefaultMaxConnections bounds the connections open at once.
	DefaultMaxConnections = 1024
	// DefaultMaxConnsPerUID bounds one non-administrator uid's connections:
	// a service needs a handful, so 64 leaves room for many at once.
	DefaultMaxConnsPerUID = 64
	// DefaultAdminReserve is how many of DefaultMaxConnections only
	// administrators may take, so that `tokenctl status` answers while
	// other uids hold every other slot.
	DefaultAdminReserve = 16
	// DefaultHandshakeTimeout closes a connection that has not finished
	// the HTTP/2 handshake: a local client sends it at once.
	DefaultHandshakeTimeout = 5 * time.Second
	// DefaultIdleTimeout closes a connection without calls; a client
	// reconnects on its next call. An open WatchToken stream is a call.
	DefaultIdleTimeout = 5 * time.Minute
	// refusalLogEvery bounds the log to one line per uid per interval.
	refusalLogEvery = 10 * time.Second
)

// ConnLimits configures the caps Serve applies at accept time.
type ConnLimits struct {
	// Total is the most connections open at once. Default
	// DefaultMaxConnections.
	Total int
	// PerUID is the most connections one uid that is not an administrator
	// may hold. Default DefaultMaxConnsPerUID.
	PerUID int
	// Reserve is how many of Total only administrators may use; zero
	// means DefaultAdminReserve, negative means none. It must be below
	// Total.
	Reserve int
	// HandshakeTimeout closes a connection that has not finished the
	// HTTP/2 handshake by then. Default DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// IdleTimeout closes a connection that has had no call for that long.
	// Default DefaultIdleTimeout.
	IdleTimeout time.Duration
}

func (l ConnLimits) withDefaults() ConnLimits {
	if l.Total <= 0 {
		l.Total = DefaultMaxConnections
	}
	if l.PerUID <= 0 {
		l.PerUID = DefaultMaxConnsPerUID
	}
	switch {
	case l.Reserve == 0:
		l.Reserve = DefaultAdminReserve
	case l.Reserve < 0:
		l.Reserve = 0
	}
	l.Reserve = min(l.Reserve, l.Total-1)
	if l.HandshakeTimeout <= 0 {
		l.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if l.IdleTimeout <= 0 {
		l.IdleTimeout = DefaultIdleTimeout
	}
	return l
}

// connCounts is the accounting of every listener one server serves on:
// open connections by uid and the refusals. Only Accept and Close touch
// it, never a call.
type connCounts struct {
	lim    ConnLimits
	admins admins
	log    *slog.Logger

	mu         sync.Mutex
	open       int
	privileged int // of open, administrators' connections
	byUID      map[uint32]int
	refused    map[uint32]*refusals // uids refused in the current log interval

	refusedTotal atomic.Uint64
	openNow      atomic.Int64
}

// refusals are one uid's refused connections not yet logged.
type refusals struct {
	n     int
	why   string
	timer *time.Timer
}

func newConnCounts(lim ConnLimits, a admins, log *slog.Logger) *connCounts {
	return &connCounts{lim: lim.withDefaults(), admins: a, log: log, byUID: map[uint32]int{}, refused: map[uint32]*refusals{}}
}

// limit wraps ln so that every connection it accepts is counted against
// these caps.
func (cc *connCounts) limit(ln net.Listener) net.Listener {
	return &capListener{Listener: ln, cc: cc}
}

// admit counts a connection from cred, or says why it is refused, and
// whether it came from an administrator. Non-administrators share
// Total-Reserve slots; an administrator's connections are not counted in
// them, so the reserve stays free for administrators whatever others hold.
// Groups are read from /proc only when a refusal depends on them.
func (cc *connCounts) admit(cred peercred.Ucred) (privileged bool, refusal string) {
	privileged = cc.admins.isAdmin(cred.UID, cred.GID, func() []uint32 { return nil })
	cc.mu.Lock()
	uidOpen, shared := cc.byUID[cred.UID], cc.open-cc.privileged
	why := ""
	switch {
	case cc.open >= cc.lim.Total:
		why = fmt.Sprintf("max connections: %d open of --max-connections %d", cc.open, cc.lim.Total)
	case privileged:
	case uidOpen >= cc.lim.PerUID:
		why = fmt.Sprintf("per-uid cap: uid %d holds %d connections of --max-connections-per-uid %d", cred.UID, uidOpen, cc.lim.PerUID)
	case shared >= cc.lim.Total-cc.lim.Reserve:
		why = fmt.Sprintf("max connections: %d open, %d of them by non-administrators, of --max-connections %d, of which %d are kept for administrators (--admin-connection-reserve)", cc.open, shared, cc.lim.Total, cc.lim.Reserve)
	}
	if why != "" && cc.open < cc.lim.Total {
		// A member of the admin group by a supplementary group: reading
		// them (a /proc read) is left to here, off the common path, and
		// the lock is dropped for it.
		cc.mu.Unlock()
		privileged = cc.admins.isAdmin(cred.UID, cred.GID, func() []uint32 { g, _ := peercred.Groups(cred.PID); return g })
		cc.mu.Lock()
		if privileged && cc.open < cc.lim.Total {
			why = ""
		}
	}
	if why == "" {
		cc.open++
		cc.byUID[cred.UID]++
		if privileged {
			cc.privileged++
		}
		cc.openNow.Store(int64(cc.open))
		cc.mu.Unlock()
		return privileged, ""
	}
	cc.refusedTotal.Add(1)
	r := cc.refused[cred.UID]
	first := r == nil
	if first {
		// The first refusal of an interval is logged at once; the rest are
		// counted and logged together when it ends.
		r = &refusals{}
		cc.refused[cred.UID] = r
		r.timer = time.AfterFunc(refusalLogEvery, func() { cc.flush(cred.UID) })
	} else {
		r.n++
		r.why = why
	}
	cc.mu.Unlock()
	if first {
		cc.logRefused(cred.UID, 1, why)
	}
	return false, why
}

// flush logs uid's refusals of the interval that just ended, and keeps
// counting for another interval if there were any.
func (cc *connCounts) flush(uid uint32) {
	cc.mu.Lock()
	r := cc.refused[uid]
	if r == nil {
		cc.mu.Unlock()
		return
	}
	n, why := r.n, r.why
	if n == 0 {
		delete(cc.refused, uid)
	} else {
		r.n = 0
		r.timer.Reset(refusalLogEvery)
	}
	cc.mu.Unlock()
	if n > 0 {
		cc.logRefused(uid, n, why)
	}
}

// stop logs what is pending; the listener calls it when it closes.
func (cc *connCounts) stop() {
	type pending struct {
		uid uint32
		r   refusals
	}
	var left []pending
	cc.mu.Lock()
	for uid, r := range cc.refused {
		r.timer.Stop()
		if r.n > 0 {
			left = append(left, pending{uid, *r})
		}
		delete(cc.refused, uid)
	}
	cc.mu.Unlock()
	for _, p := range left {
		cc.logRefused(p.uid, p.r.n, p.r.why)
	}
}

func (cc *connCounts) logRefused(uid uint32, n int, why string) {
	cc.log.Warn("connections refused: a connection cap was reached", "uid", uid, "refused", n, "interval", refusalLogEvery, "reason", why)
}

func (cc *connCounts) release(uid uint32, privileged bool) {
	cc.mu.Lock()
	cc.open--
	if privileged {
		cc.privileged--
	}
	if cc.byUID[uid]--; cc.byUID[uid] <= 0 {
		delete(cc.byUID, uid)
	}
	cc.openNow.Store(int64(cc.open))
	cc.mu.Unlock()
}

// capListener refuses, by closing them, the connections over a cap. Accept
// never waits for a slot: it reads the peer's credentials (one syscall on
// the fd) and moves on to the next connection.
type capListener struct {
	net.Listener
	cc *connCounts
}

func (l *capListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		cred, err := peercred.Read(c)
		if err != nil {
			// gRPC's handshake would refuse it too; say so once here.
			l.cc.log.Warn("connection refused: peer credentials unreadable", "err", err)
			c.Close()
			continue
		}
		privileged, why := l.cc.admit(cred)
		if why != "" {
			c.Close()
			continue
		}
		return &countedConn{Conn: c, uid: cred.UID, privileged: privileged, cc: l.cc}, nil
	}
}

func (l *capListener) Close() error {
	err := l.Listener.Close()
	l.cc.stop()
	return err
}

// countedConn gives its slot back when closed, once however often Close is
// called.
type countedConn struct {
	net.Conn
	uid        uint32
	privileged bool
	cc         *connCounts
	once       sync.Once
}

// SyscallConn exposes the socket so gRPC's handshake can read the peer's
// credentials.
func (c *countedConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("connection %T has no file descriptor", c.Conn)
	}
	return sc.SyscallConn()
}

func (c *countedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.cc.release(c.uid, c.privileged) })
	return err
}
