package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/tokend/tokend/internal/daemontest"
)

// startTimeout bounds how long a process may take to answer on its socket.
const startTimeout = 30 * time.Second

// stopTimeout is how long a process may take to exit after SIGTERM before it
// is killed.
const stopTimeout = 10 * time.Second

// proc is a child process serving gRPC on a Unix socket.
type proc struct {
	*daemontest.Process
	socket string
}

// startProc starts bin with args. The last 64 KiB of its output are kept
// for error messages.
func startProc(name, socket, bin string, args ...string) (*proc, error) {
	// A small, explicit environment: no TOKEND_* or WHOP_API_KEY from the
	// caller's shell changes what is measured.
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.TempDir()}
	p, err := daemontest.Start(bin, args, env, daemontest.NewOutput(64<<10))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	p.Name = name
	return &proc{Process: p, socket: socket}, nil
}

// stop sends SIGTERM and waits; a process that does not exit within
// stopTimeout is killed. It is safe to call more than once.
func (p *proc) stop() error { return p.Stop(stopTimeout) }

// waitReady waits until ready returns nil and reports the time since the
// process was started (see daemontest.WaitReady).
func (p *proc) waitReady(ctx context.Context, ready func(context.Context, *grpc.ClientConn) error) (time.Duration, error) {
	return daemontest.WaitReady(ctx, p.Process, p.socket, startTimeout, ready)
}

// memStatus is a process's resident memory from /proc/PID/status, in KiB.
type memStatus struct {
	RSS, Anon, File int64
}

func readMemStatus(pid int) (memStatus, error) {
	f, err := os.Open(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return memStatus{}, err
	}
	defer f.Close()
	var m memStatus
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fields := strings.Fields(value)
		if len(fields) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(fields[0], 10, 64)
		switch name {
		case "VmRSS":
			m.RSS = n
		case "RssAnon":
			m.Anon = n
		case "RssFile":
			m.File = n
		}
	}
	if m.RSS == 0 {
		return m, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
	}
	return m, sc.Err()
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat times; it is 100 on
// every Linux architecture Go supports.
const clockTicks = 100

// cpuTime is a process's user plus system CPU time: from the kernel's
// process CPU clock, in nanoseconds, or where that cannot be read from
// /proc/PID/stat, at its 10 ms resolution.
func cpuTime(pid int) (time.Duration, error) {
	// MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED) of linux/posix-timers.h.
	var ts unix.Timespec
	if err := unix.ClockGettime(int32(^pid<<3|2), &ts); err == nil {
		return time.Duration(ts.Nano()), nil
	}
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	// The command name may hold spaces and parentheses; fields resume
	// after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("unexpected /proc stat format")
	}
	fields := strings.Fields(string(b[i+1:]))
	// fields[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(fields) < 13 {
		return 0, errors.New("unexpected /proc stat format")
	}
	utime, err1 := strconv.ParseInt(fields[11], 10, 64)
	stime, err2 := strconv.ParseInt(fields[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(utime+stime) * time.Second / clockTicks, nil
}
