// Package metrics exposes tokend's Prometheus metrics. Label values are
// bounded: results, gRPC codes, HTTP status codes and entry states, never a
// subject or key id.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc/codes"

	"github.com/tokend/tokend/internal/safesocket"
)

// Snapshot is what a scrape reads from the daemon's current state.
type Snapshot struct {
	EntriesByState   map[string]int
	EarliestExpiry   time.Duration // until the earliest token expiry; <0 none
	UpstreamInFlight int
	// OpenConnections are the client connections open now;
	// ConnectionsRefused those closed at accept time by a cap, since start.
	OpenConnections    int
	ConnectionsRefused uint64
	// Fleet is the fleet tier's state; nil without one.
	Fleet *FleetSnapshot
}

// FleetSnapshot is the fleet tier's state: whether Redis answers, and its
// counters since start.
type FleetSnapshot struct {
	Connected bool
	// Events counts by name: adopted, published, lock_wait, lock_takeover,
	// tampered, redis_error, rate_limited, pause_seen, degraded.
	Events map[string]uint64
}

// Metrics holds every metric of one daemon, in its own registry.
type Metrics struct {
	reg *prometheus.Registry

	getToken      *prometheus.CounterVec
	hitOK, missOK prometheus.Counter
	joinedOK      prometheus.Counter
	refreshedOK   prometheus.Counter
	refreshLag    *prometheus.HistogramVec
	upstream      *prometheus.CounterVec
	upstreamTime  prometheus.Histogram
	refreshes     *prometheus.CounterVec
	limiterWaits  prometheus.Counter
	limiterWaited prometheus.Counter
}

// New registers tokend's metrics; snapshot is called on every scrape for
// the gauges that describe current state.
func New(snapshot func() Snapshot) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.getToken = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tokend_gettoken_total",
		Help: "GetToken calls by result (hit: from the cache; joined: waited for a mint another caller started; miss: minted for the call; refreshed: replaced a token the caller reported rejected; error) and gRPC code.",
	}, []string{"result", "code"})
	m.hitOK = m.getToken.WithLabelValues("hit", "OK")
	m.missOK = m.getToken.WithLabelValues("miss", "OK")
	m.joinedOK = m.getToken.WithLabelValues("joined", "OK")
	m.refreshedOK = m.getToken.WithLabelValues("refreshed", "OK")
	m.upstream = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tokend_upstream_requests_total",
		Help: "Requests to Whop's access_tokens endpoint by HTTP status; status 0 means a network error or timeout.",
	}, []string{"status"})
	m.upstreamTime = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "tokend_upstream_request_duration_seconds",
		Help:    "Latency of requests to Whop, including failed ones.",
		Buckets: []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
	})
	m.refreshes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tokend_refreshes_total",
		Help: "Upstream mints by cause (miss, refresh, rejected, admin) and outcome (ok, failed).",
	}, []string{"cause", "outcome"})
	m.limiterWaits = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "tokend_upstream_limiter_waits_total",
		Help: "Upstream calls that had to wait for the limiter (rate, in-flight bound or a 429 pause).",
	})
	m.limiterWaited = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "tokend_upstream_limiter_wait_seconds_total",
		Help: "Time upstream calls spent waiting for the limiter.",
	})
	m.refreshLag = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "tokend_refresh_lag_seconds",
		Help:    "How late scheduled refreshes, retries and drops start after they fall due, by credential: a credential whose rate cannot keep its entries fresh shows a growing lag.",
		Buckets: []float64{.001, .01, .1, 1, 10, 60, 300, 900},
	}, []string{"credential"})
	state := func(name, help string, labels []string, f func(Snapshot, func(float64, ...string))) prometheus.Collector {
		return &gaugeFunc{desc: prometheus.NewDesc(name, help, labels, nil), snapshot: snapshot, collect: f, typ: prometheus.GaugeValue}
	}
	counted := func(name, help string, f func(Snapshot) float64) prometheus.Collector {
		return &gaugeFunc{desc: prometheus.NewDesc(name, help, nil, nil), snapshot: snapshot, typ: prometheus.CounterValue,
			collect: func(s Snapshot, emit func(float64, ...string)) { emit(f(s)) }}
	}
	m.reg.MustRegister(
		m.getToken, m.upstream, m.upstreamTime, m.refreshes, m.limiterWaits, m.limiterWaited, m.refreshLag,
		state("tokend_entries", "Cache entries by state.", []string{"state"}, func(s Snapshot, emit func(float64, ...string)) {
			for _, st := range []string{"fresh", "refreshing", "retrying", "failing", "idle", "expired"} {
				emit(float64(s.EntriesByState[st]), st)
			}
		}),
		state("tokend_earliest_expiry_seconds", "Seconds until the earliest cached token expires (absent with no tokens).", nil, func(s Snapshot, emit func(float64, ...string)) {
			if s.EarliestExpiry >= 0 {
				emit(s.EarliestExpiry.Seconds())
			}
		}),
		state("tokend_upstream_in_flight", "Upstream calls in flight.", nil, func(s Snapshot, emit func(float64, ...string)) {
			emit(float64(s.UpstreamInFlight))
		}),
		state("tokend_connections_open", "Client connections open on the socket.", nil, func(s Snapshot, emit func(float64, ...string)) {
			emit(float64(s.OpenConnections))
		}),
		counted("tokend_connections_refused_total", "Client connections closed as they were accepted because a cap (per uid, or --max-connections) was reached; the log names the uid.", func(s Snapshot) float64 {
			return float64(s.ConnectionsRefused)
		}),
		state("tokend_fleet_connected", "1 while the fleet's Redis answers, 0 while each host carries on alone (absent without --fleet-redis).", nil, func(s Snapshot, emit func(float64, ...string)) {
			if s.Fleet != nil {
				emit(map[bool]float64{false: 0, true: 1}[s.Fleet.Connected])
			}
		}),
		&gaugeFunc{desc: prometheus.NewDesc("tokend_fleet_events_total", "Fleet tier events: adopted (a token another host minted, a mint avoided), published, lock_wait (another host was minting), lock_takeover (it died), tampered (a Redis value ignored), redis_error, rate_limited (the fleet-wide budget made a call wait), pause_seen (another host's 429 pause), degraded (Redis stopped answering).", []string{"event"}, nil),
			snapshot: snapshot, typ: prometheus.CounterValue, collect: func(s Snapshot, emit func(float64, ...string)) {
				if s.Fleet == nil {
					return
				}
				for name, n := range s.Fleet.Events {
					emit(float64(n), name)
				}
			}},
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

// GetToken counts one GetToken call. Hits and misses that succeed use
// pre-resolved counters: the hit path pays one atomic add.
func (m *Metrics) GetToken(result string, code codes.Code) {
	if m == nil {
		return
	}
	if code == codes.OK {
		switch result {
		case "hit":
			m.hitOK.Inc()
			return
		case "miss":
			m.missOK.Inc()
			return
		case "joined":
			m.joinedOK.Inc()
			return
		case "refreshed":
			m.refreshedOK.Inc()
			return
		}
	}
	m.getToken.WithLabelValues(result, code.String()).Inc()
}

// Upstream counts one request to Whop.
func (m *Metrics) Upstream(status int, d time.Duration) {
	if m == nil {
		return
	}
	m.upstream.WithLabelValues(strconv.Itoa(status)).Inc()
	m.upstreamTime.Observe(d.Seconds())
}

// Minted counts one mint attempt.
func (m *Metrics) Minted(cause string, ok bool) {
	if m == nil {
		return
	}
	outcome := "ok"
	if !ok {
		outcome = "failed"
	}
	m.refreshes.WithLabelValues(cause, outcome).Inc()
}

// LimiterWait counts a wait for the upstream limiter.
func (m *Metrics) LimiterWait(d time.Duration) {
	if m == nil {
		return
	}
	m.limiterWaits.Inc()
	m.limiterWaited.Add(d.Seconds())
}

// RefreshLag records how late a scheduled action of credential started.
func (m *Metrics) RefreshLag(credential string, d time.Duration) {
	if m == nil {
		return
	}
	m.refreshLag.WithLabelValues(credential).Observe(max(d, 0).Seconds())
}

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// SocketMode is the mode of a unix: metrics socket: tokend's user and root
// may scrape it.
const SocketMode os.FileMode = 0o600

// Listen opens addr for the metrics endpoint: a loopback TCP address such
// as 127.0.0.1:9464, or unix:/path. Anything else is refused: metrics
// describe the host's use of Whop and stay on the host. A unix: path is
// listened on like the gRPC socket (safesocket.Listen): a live socket or
// any other file in the way is refused, never removed.
func Listen(addr string) (net.Listener, error) {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		ln, err := safesocket.Listen(path, SocketMode)
		if err != nil {
			return nil, fmt.Errorf("--metrics-addr %s: %w", addr, err)
		}
		return ln, nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-addr %q: want host:port on loopback or unix:/path: %w", addr, err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return nil, fmt.Errorf("--metrics-addr %q: only loopback addresses (127.0.0.1, ::1, localhost) or unix:/path are allowed", addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-addr %s: %w", addr, err)
	}
	return ln, nil
}

// Serve answers /metrics on ln until ctx ends.
func (m *Metrics) Serve(ctx context.Context, ln net.Listener) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", m.Handler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve metrics on %s: %w", ln.Addr(), err)
	}
	return nil
}

// gaugeFunc is a collector whose values come from a Snapshot at scrape
// time: gauges, or counters kept by the daemon.
type gaugeFunc struct {
	desc     *prometheus.Desc
	snapshot func() Snapshot
	collect  func(Snapshot, func(float64, ...string))
	typ      prometheus.ValueType
}

func (g *gaugeFunc) Describe(ch chan<- *prometheus.Desc) { ch <- g.desc }

func (g *gaugeFunc) Collect(ch chan<- prometheus.Metric) {
	g.collect(g.snapshot(), func(v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(g.desc, g.typ, v, labels...)
	})
}
