package fleet_test

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/tokend/tokend/internal/fleet"
	"github.com/tokend/tokend/internal/fleet/redistest"
)

var (
	fleetKey = bytes.Repeat([]byte{0x5a}, fleet.KeySize)
	credA    = []byte("fingerprint-of-key-A")
	credB    = []byte("fingerprint-of-key-B")
)

// TestMain keeps go-redis's process-wide log (a line per failed dial) out
// of the output, as tokend's main does with fleet.LibraryLogger.
func TestMain(m *testing.M) {
	redis.SetLogger(fleet.LibraryLogger{L: slog.New(slog.DiscardHandler)})
	os.Exit(m.Run())
}

// logs records what a Fleet logs, to count the lines of an outage.
type logs struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (l *logs) Enabled(context.Context, slog.Level) bool { return true }
func (l *logs) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.recs = append(l.recs, r.Clone())
	return nil
}
func (l *logs) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logs) WithGroup(string) slog.Handler      { return l }

// lines returns the messages logged at level.
func (l *logs) lines(level slog.Level) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, r := range l.recs {
		if r.Level == level {
			line := r.Message
			r.Attrs(func(a slog.Attr) bool { line += " " + a.String(); return true })
			out = append(out, line)
		}
	}
	return out
}

// all is every line with its attributes, for checking what is never logged.
func (l *logs) all() string {
	var b strings.Builder
	for _, lv := range []slog.Level{slog.LevelDebug, slog.LevelInfo, slog.LevelWarn, slog.LevelError} {
		for _, s := range l.lines(lv) {
			b.WriteString(s + "\n")
		}
	}
	return b.String()
}

// host is one tokend's fleet tier on a shared redis-server.
func host(t testing.TB, srv *redistest.Server, mod ...func(*fleet.Config)) (*fleet.Fleet, *logs) {
	t.Helper()
	l := &logs{}
	// A generous timeout: CI runs these beside the e2e suite on two cores,
	// where a 50 ms Redis round trip is not guaranteed; the tests of the
	// timeout itself set fleet.DefaultTimeout.
	cfg := fleet.Config{URL: srv.URL(), Key: fleetKey, Logger: slog.New(l), Timeout: time.Second}
	for _, m := range mod {
		m(&cfg)
	}
	f, err := fleet.New(cfg)
	if err != nil {
		t.Fatalf("fleet.New: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return f, l
}

func token(value string, life time.Duration) fleet.Token {
	now := time.Now()
	return fleet.Token{Value: value, ExpiresAt: now.Add(life), ObtainedAt: now}
}

func TestNewRefusesBadConfig(t *testing.T) {
	cases := []struct {
		name string
		cfg  fleet.Config
		want string
	}{
		{"short key", fleet.Config{URL: "unix:///x.sock", Key: make([]byte, 16)}, "fleet key: 16 bytes, want exactly 32"},
		{"no key", fleet.Config{URL: "unix:///x.sock"}, "fleet key: 0 bytes"},
		{"no URL", fleet.Config{Key: fleetKey}, "fleet redis URL: empty"},
		{"bad scheme", fleet.Config{URL: "http://localhost:6379", Key: fleetKey}, `scheme "http", want redis, rediss or unix`},
		{"password in URL", fleet.Config{URL: "redis://u:hunter2@localhost:6379", Key: fleetKey}, "carries a password"},
		{"negative timeout", fleet.Config{URL: "unix:///x.sock", Key: fleetKey, Timeout: -1}, "fleet timeout"},
		{"negative lease", fleet.Config{URL: "unix:///x.sock", Key: fleetKey, LockLease: -1}, "fleet lock lease"},
		{"lease under 10ms", fleet.Config{URL: "unix:///x.sock", Key: fleetKey, LockLease: time.Millisecond}, "fleet lock lease: 1ms, want at least 10ms"},
		{"bad db", fleet.Config{URL: "redis://localhost:6379/notanumber", Key: fleetKey}, "fleet redis URL redis://localhost:6379/notanumber"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f, err := fleet.New(c.cfg)
			if err == nil {
				f.Close()
				t.Fatalf("New accepted %s", c.name)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q, want it to contain %q", err, c.want)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Fatalf("error %q carries the password", err)
			}
		})
	}
}

func TestRoundTrip(t *testing.T) {
	srv := redistest.Start(t)
	a, _ := host(t, srv)
	b, _ := host(t, srv)
	ctx := context.Background()
	want := token("tok_round_trip", time.Hour)
	a.Put(ctx, credA, "key-1", want)
	cases := []struct {
		name   string
		f      *fleet.Fleet
		cred   []byte
		key    string
		wantOK bool
	}{
		{"same host", a, credA, "key-1", true},
		{"other host", b, credA, "key-1", true},
		{"other key", b, credA, "key-2", false},
		{"other credential", b, credB, "key-1", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, ok := c.f.Get(ctx, c.cred, c.key)
			if ok != c.wantOK {
				t.Fatalf("Get ok = %v, want %v", ok, c.wantOK)
			}
			if ok && (got.Value != want.Value || !got.ExpiresAt.Equal(want.ExpiresAt) || !got.ObtainedAt.Equal(want.ObtainedAt)) {
				t.Fatalf("Get returned a different token (expires %v obtained %v, want %v %v)", got.ExpiresAt, got.ObtainedAt, want.ExpiresAt, want.ObtainedAt)
			}
		})
	}
	if s := b.Status(); s.Adopted != 1 || s.Misses != 2 || s.Tampered != 0 {
		t.Fatalf("host b status: adopted %d misses %d tampered %d, want 1 2 0", s.Adopted, s.Misses, s.Tampered)
	}
	if s := a.Status(); s.Published != 1 || !s.Connected {
		t.Fatalf("host a status: published %d connected %v, want 1 true", s.Published, s.Connected)
	}
}

func TestURLForms(t *testing.T) {
	srv := redistest.Start(t)
	for _, u := range []string{srv.URL(), srv.URL() + "?db=2", srv.Socket} {
		t.Run(u, func(t *testing.T) {
			f, _ := host(t, srv, func(c *fleet.Config) { c.URL = u })
			f.Put(context.Background(), credA, "k", token("tok_url", time.Hour))
			if _, ok := f.Get(context.Background(), credA, "k"); !ok || !f.Status().Connected {
				t.Fatalf("no round trip through %s", u)
			}
		})
	}
}

// TestNothingReadableInRedis stores a token, a lock, a pause and a rate
// state whose inputs carry recognisable strings, then reads every key and
// value with a raw client.
func TestNothingReadableInRedis(t *testing.T) {
	srv := redistest.Start(t)
	f, l := host(t, srv)
	ctx := context.Background()
	key := "company=biz_SUBJECT42&user=user_SUBJECT42&scopes=chat:read,SCOPEXYZ"
	f.Put(ctx, credA, key, token("tok_SECRETVALUE", time.Hour))
	lease, held := f.Lock(ctx, credA, key)
	if !held || lease.Local() {
		t.Fatalf("Lock: held %v local %v, want a Redis lock", held, lease != nil && lease.Local())
	}
	f.Pause(ctx, credA, time.Now().Add(time.Minute), "429 from upstream for SUBJECT42")
	if _, ok := f.Allow(ctx, credA, 10, 5); !ok {
		t.Fatal("Allow: not ok on a live Redis")
	}
	raw := srv.Client("")
	keys, err := raw.Keys(ctx, "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 4 {
		t.Fatalf("keys in Redis: %q, want 4 (token, lock, pause, rate)", keys)
	}
	shape := regexp.MustCompile(`^(rate:)?tokend:((tok|lock|pause):)?\{[A-Za-z0-9_-]{24}\}$`)
	secrets := []string{"SUBJECT42", "SCOPEXYZ", "chat:read", "SECRETVALUE", "tok_", string(credA), "429"}
	for _, k := range keys {
		if !shape.MatchString(k) {
			t.Errorf("key %q is not tokend:<kind>:{<keyed hash>}", k)
		}
		v, err := raw.Get(ctx, k).Bytes()
		if err != nil {
			t.Fatalf("GET %s: %v", k, err)
		}
		for _, s := range secrets {
			if strings.Contains(k, s) || bytes.Contains(v, []byte(s)) {
				t.Errorf("%q appears in Redis key %s or its value", s, k)
			}
		}
	}
	for _, s := range append(secrets[:4], string(fleetKey)) {
		if strings.Contains(l.all(), s) {
			t.Errorf("%q appears in the log", s)
		}
	}
	t.Logf("keys in Redis: %q", keys)
}

func TestTamperedValueIgnoredAndCounted(t *testing.T) {
	srv := redistest.Start(t)
	raw := srv.Client("")
	ctx := context.Background()
	other, _ := host(t, srv, func(c *fleet.Config) { c.Key = bytes.Repeat([]byte{1}, fleet.KeySize) })
	// Each case returns what to write over the value of credA's "key-1".
	cases := []struct {
		name  string
		value func(t *testing.T, f *fleet.Fleet, own []byte) []byte
	}{
		{"garbage", func(*testing.T, *fleet.Fleet, []byte) []byte { return bytes.Repeat([]byte("x"), 80) }},
		{"too short", func(*testing.T, *fleet.Fleet, []byte) []byte { return []byte("x") }},
		{"one bit flipped", func(_ *testing.T, _ *fleet.Fleet, own []byte) []byte {
			own[len(own)/2] ^= 1
			return own
		}},
		{"moved from another key", func(t *testing.T, f *fleet.Fleet, _ []byte) []byte {
			_, v := stored(t, raw, f, credA, "key-2", token("tok_two", time.Hour))
			return v
		}},
		{"sealed with another fleet key", func(t *testing.T, _ *fleet.Fleet, _ []byte) []byte {
			_, v := stored(t, raw, other, credA, "key-1", token("tok_foreign", time.Hour))
			return v
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			raw.FlushAll(ctx)
			f, _ := host(t, srv)
			k, own := stored(t, raw, f, credA, "key-1", token("tok_one", time.Hour))
			raw.Set(ctx, k, c.value(t, f, own), time.Hour)
			if got, ok := f.Get(ctx, credA, "key-1"); ok {
				t.Fatalf("Get served a tampered value (%d bytes)", len(got.Value))
			}
			if n := f.Status().Tampered; n != 1 {
				t.Fatalf("Tampered = %d, want 1", n)
			}
		})
	}
}

// stored Puts tok through f and returns the Redis key and value it wrote.
func stored(t *testing.T, raw *redis.Client, f *fleet.Fleet, cred []byte, key string, tok fleet.Token) (string, []byte) {
	t.Helper()
	before := keySet(t, raw)
	f.Put(context.Background(), cred, key, tok)
	k := newKey(t, raw, before)
	v, err := raw.Get(context.Background(), k).Bytes()
	if err != nil {
		t.Fatalf("GET %s: %v", k, err)
	}
	return k, v
}

// keySet is every key in Redis now.
func keySet(t *testing.T, raw *redis.Client) map[string]bool {
	t.Helper()
	keys, err := raw.Keys(context.Background(), "*").Result()
	if err != nil {
		t.Fatalf("KEYS: %v", err)
	}
	m := map[string]bool{}
	for _, k := range keys {
		m[k] = true
	}
	return m
}

// newKey is the one key that is in Redis now and was not in before.
func newKey(t *testing.T, raw *redis.Client, before map[string]bool) string {
	t.Helper()
	var added []string
	for k := range keySet(t, raw) {
		if !before[k] {
			added = append(added, k)
		}
	}
	if len(added) != 1 {
		t.Fatalf("keys added: %q, want exactly one", added)
	}
	return added[0]
}

func TestOtherCredentialNeverAdopts(t *testing.T) {
	srv := redistest.Start(t)
	raw := srv.Client("")
	a, _ := host(t, srv)
	b, _ := host(t, srv)
	ctx := context.Background()
	_, vA := stored(t, raw, a, credA, "shared-key", token("tok_of_A", time.Hour))
	if _, ok := b.Get(ctx, credB, "shared-key"); ok {
		t.Fatal("a host with another credential adopted the token")
	}
	if s := b.Status(); s.Misses != 1 || s.Tampered != 0 {
		t.Fatalf("status after a plain miss: misses %d tampered %d, want 1 0", s.Misses, s.Tampered)
	}
	// Copy A's value to where B's token for the same key lives.
	kB, _ := stored(t, raw, b, credB, "shared-key", token("tok_of_B", time.Hour))
	raw.Set(ctx, kB, vA, time.Hour)
	if got, ok := b.Get(ctx, credB, "shared-key"); ok {
		t.Fatalf("a host with another credential was served A's token (%d bytes)", len(got.Value))
	}
	if s := b.Status(); s.Tampered != 1 {
		t.Fatalf("Tampered = %d, want 1", s.Tampered)
	}
}
