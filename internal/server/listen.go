package server

import (
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
)

// ConnLimit caps the connections a listener hands out. At the cap, Accept
// waits for one to close: a hostile local process cannot exhaust tokend's
// file descriptors, and the wait is counted for status.
type ConnLimit struct {
	max   int
	slots chan struct{}
	waits atomic.Uint64
}

// DefaultMaxConnections is LimitConns's bound when it is given none.
const DefaultMaxConnections = 1024

// LimitConns wraps ln so that at most max connections are open at once;
// max <= 0 means DefaultMaxConnections.
func LimitConns(ln net.Listener, max int) (net.Listener, *ConnLimit) {
	if max <= 0 {
		max = DefaultMaxConnections
	}
	cl := &ConnLimit{max: max, slots: make(chan struct{}, max)}
	return &limitListener{Listener: ln, cl: cl, done: make(chan struct{})}, cl
}

type limitListener struct {
	net.Listener
	cl        *ConnLimit
	done      chan struct{} // closed by Close: a waiting Accept gives up
	closeOnce sync.Once
}

func (l *limitListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

func (l *limitListener) Accept() (net.Conn, error) {
	select {
	case l.cl.slots <- struct{}{}:
	default:
		l.cl.waits.Add(1)
		select {
		case l.cl.slots <- struct{}{}:
		case <-l.done:
			return nil, net.ErrClosed
		}
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.cl.slots
		return nil, err
	}
	return &limitConn{Conn: c, release: func() { <-l.cl.slots }}, nil
}

type limitConn struct {
	net.Conn
	once    sync.Once
	release func()
}

// SyscallConn exposes the socket so peer credentials can be read.
func (c *limitConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("connection %T has no file descriptor", c.Conn)
	}
	return sc.SyscallConn()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}
