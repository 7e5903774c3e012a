package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	sd "github.com/coreos/go-systemd/v22/daemon"

	"github.com/tokend/tokend/internal/refresher"
	"github.com/tokend/tokend/internal/safesocket"
)

// listen returns the socket systemd passed (socket activation, LISTEN_FDS)
// or, when there is none, listens on cfg.Socket itself. An inherited socket
// belongs to the .socket unit: tokend never sets its mode and never removes
// it. cfg.Socket is set to the address actually served.
func listen(cfg *Config, log *slog.Logger) (net.Listener, error) {
	lns, err := activation.Listeners()
	if err != nil {
		return nil, fmt.Errorf("socket activation: %w", err)
	}
	if len(lns) == 0 {
		return safesocket.Listen(cfg.Socket, cfg.SocketMode)
	}
	closeAll := func() {
		for _, ln := range lns {
			if ln != nil {
				ln.Close()
			}
		}
	}
	if len(lns) > 1 {
		closeAll()
		return nil, fmt.Errorf("socket activation passed %d sockets; tokend serves on exactly one (one ListenStream= in tokend.socket)", len(lns))
	}
	ul, ok := lns[0].(*net.UnixListener)
	if !ok {
		closeAll()
		return nil, fmt.Errorf("socket activation passed %s, not a listening Unix stream socket; use ListenStream=/path in tokend.socket", describeListener(lns[0]))
	}
	ul.SetUnlinkOnClose(false)
	addr := ul.Addr().String()
	if cfg.Socket != "" && cfg.Socket != addr {
		log.Info("serving on the socket passed by the service manager, not --socket", "socket", addr, "ignored", cfg.Socket)
	}
	cfg.Socket = addr
	return ul, nil
}

func describeListener(ln net.Listener) string {
	if ln == nil {
		return "a file descriptor that is not a listening socket"
	}
	return ln.Addr().Network() + " socket " + ln.Addr().String()
}

// notifier speaks the sd_notify protocol. Every method is a no-op when
// NOTIFY_SOCKET is unset, that is, when tokend is not run by systemd as a
// Type=notify service.
type notifier struct {
	log     *slog.Logger
	ref     *refresher.Refresher
	enabled bool
	// watchdog is WatchdogSec= (WATCHDOG_USEC), zero when not set.
	watchdog time.Duration
}

// statusEvery bounds how stale the STATUS= line shown by systemctl status
// can be when no watchdog asks for more frequent pings.
const statusEvery = 5 * time.Second

func newNotifier(log *slog.Logger, ref *refresher.Refresher) *notifier {
	n := &notifier{log: log, ref: ref, enabled: os.Getenv("NOTIFY_SOCKET") != ""}
	wd, err := sd.SdWatchdogEnabled(false)
	if err != nil {
		log.Warn("ignoring the service manager's watchdog settings", "err", err)
	}
	n.watchdog = wd
	return n
}

// send writes one notification of one or more VAR=value lines and reports
// whether a service manager is listening.
func (n *notifier) send(lines ...string) bool {
	ok, err := sd.SdNotify(false, strings.Join(lines, "\n"))
	if err != nil {
		n.log.Warn("notify the service manager", "err", err)
	}
	return ok
}

// status is the STATUS= line systemctl status shows: entries and the state
// of the upstream. It carries no token, key or upstream message.
func (n *notifier) status() string {
	st := n.ref.Status()
	var b strings.Builder
	fmt.Fprintf(&b, "STATUS=serving; entries: %d; upstream calls: %d, errors: %d", st.Entries, st.UpstreamCalls, st.UpstreamErrors)
	if st.UpstreamInFlight > 0 {
		fmt.Fprintf(&b, ", in flight: %d", st.UpstreamInFlight)
	}
	if e := st.LastError; e != nil {
		what := "network error"
		if e.Status != 0 {
			what = fmt.Sprintf("HTTP %d", e.Status)
		}
		fmt.Fprintf(&b, ", last error: %s at %s", what, e.At.UTC().Format(time.RFC3339))
	}
	return b.String()
}

// ready tells systemd that tokend serves: at start-up and after a reload.
func (n *notifier) ready() {
	if n.enabled {
		n.send("READY=1", n.status())
	}
}

// reloading starts a reload; MONOTONIC_USEC lets systemd match it to the
// reload request (Type=notify-reload, systemd 253 and later).
func (n *notifier) reloading() {
	if n.enabled {
		n.send("RELOADING=1", strings.TrimSuffix(sd.SdNotifyMonotonicUsec(), "\n"), "STATUS=reloading")
	}
}

// run is the daemon task for systemd: it sends READY=1 (the caller starts
// it once the cache is loaded and the socket accepts), keeps STATUS=
// current, pings the watchdog at half its interval, and sends STOPPING=1
// when ctx ends. A ping reads the cache and the refresher's counters, so a
// daemon wedged on the cache's lock stops pinging and systemd restarts it.
func (n *notifier) run(ctx context.Context) error {
	if !n.enabled {
		return nil
	}
	n.ready()
	every := statusEvery
	if n.watchdog > 0 {
		every = min(every, n.watchdog/2)
		n.send("WATCHDOG=1")
	}
	t := time.NewTicker(every)
	defer t.Stop()
	last := ""
	for {
		select {
		case <-ctx.Done():
			n.send("STOPPING=1", "STATUS=stopping")
			return nil
		case <-t.C:
		}
		lines := make([]string, 0, 2)
		if n.watchdog > 0 {
			lines = append(lines, "WATCHDOG=1")
		}
		if s := n.status(); s != last {
			lines = append(lines, s)
			last = s
		}
		if len(lines) > 0 {
			n.send(lines...)
		}
	}
}
