package whop_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/whop"
	"github.com/tokend/tokend/internal/whop/whoptest"
)

const (
	testKey    = "sk_test_SUPERSECRET_4f9a2c"
	otherKey   = "sk_test_OTHERSECRET_77e1d0"
	limitedKey = "sk_test_LIMITEDSECRET_19bb"
)

func newFake(t *testing.T) *whoptest.Server {
	t.Helper()
	s, err := whoptest.NewServer(whoptest.Config{Keys: map[string][]string{
		testKey:    nil,
		otherKey:   nil,
		limitedKey: {"chat:read"},
	}})
	if err != nil {
		t.Fatalf("start fake: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}

func newClient(t *testing.T, base, key string, timeout time.Duration) *whop.Client {
	t.Helper()
	c, err := whop.New(whop.Config{BaseURL: base, APIKey: key, Timeout: timeout, UserAgent: "tokend/test", FingerprintSalt: []byte("salt")})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return c
}

func asError(t *testing.T, err error) *whop.Error {
	t.Helper()
	var e *whop.Error
	if !errors.As(err, &e) {
		t.Fatalf("error %T %v is not a *whop.Error", err, err)
	}
	return e
}

func TestNew(t *testing.T) {
	tests := []struct {
		name    string
		cfg     whop.Config
		wantErr string
	}{
		{name: "defaults", cfg: whop.Config{APIKey: testKey}},
		{name: "trailing slash", cfg: whop.Config{APIKey: testKey, BaseURL: "http://127.0.0.1:1/api/v1/"}},
		{name: "no key", cfg: whop.Config{}, wantErr: "api key"},
		{name: "key with newline", cfg: whop.Config{APIKey: testKey + "\n"}, wantErr: "api key"},
		{name: "relative url", cfg: whop.Config{APIKey: testKey, BaseURL: "api.whop.com"}, wantErr: "base url"},
		{name: "ftp url", cfg: whop.Config{APIKey: testKey, BaseURL: "ftp://x/y"}, wantErr: "base url"},
		{name: "http to 127.0.0.1", cfg: whop.Config{APIKey: testKey, BaseURL: "http://127.0.0.1:8080/api/v1"}},
		{name: "http to localhost by name", cfg: whop.Config{APIKey: testKey, BaseURL: "http://localhost:8080/api/v1"}, wantErr: "loopback address such as 127.0.0.1"},
		{name: "http to ::1", cfg: whop.Config{APIKey: testKey, BaseURL: "http://[::1]:8080/api/v1"}},
		{name: "https anywhere", cfg: whop.Config{APIKey: testKey, BaseURL: "https://whop.internal.example/api/v1"}},
		{name: "http to a remote host", cfg: whop.Config{APIKey: testKey, BaseURL: "http://api.whop.com/api/v1"}, wantErr: "plain http is allowed only to a loopback address"},
		{name: "http to a LAN address", cfg: whop.Config{APIKey: testKey, BaseURL: "http://10.0.0.5/api/v1"}, wantErr: "use https"},
		{name: "credentials in url", cfg: whop.Config{APIKey: testKey, BaseURL: "https://u:p@api.whop.com/api/v1"}, wantErr: "must not carry credentials"},
		{name: "negative timeout", cfg: whop.Config{APIKey: testKey, Timeout: -time.Second}, wantErr: "timeout"},
		{name: "api version date", cfg: whop.Config{APIKey: testKey, APIVersionDate: "2025-06-01"}},
		{name: "api version date newest", cfg: whop.Config{APIKey: testKey, APIVersionDate: whop.NewestAPIVersionDate}},
		{name: "api version date later", cfg: whop.Config{APIKey: testKey, APIVersionDate: "2027-01-01"},
			wantErr: `new whop client: api version date "2027-01-01": later than 2026-12-01, the newest Whop API version this tokend understands`},
		{name: "api version date not a day", cfg: whop.Config{APIKey: testKey, APIVersionDate: "2025-02-29"}, wantErr: `new whop client: api version date "2025-02-29": want a calendar date YYYY-MM-DD`},
		{name: "api version date format", cfg: whop.Config{APIKey: testKey, APIVersionDate: "2025/06/01"}, wantErr: "api version date"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := whop.New(tt.cfg)
			if tt.wantErr == "" {
				if err != nil || c == nil {
					t.Fatalf("New: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err = %v, want mention of %q", err, tt.wantErr)
			}
			if strings.Contains(err.Error(), testKey) {
				t.Fatalf("error reveals the key: %v", err)
			}
		})
	}
}

func TestCreateAccessTokenSuccess(t *testing.T) {
	s := newFake(t)
	c := newClient(t, s.URL()+"/", testKey, 0)
	exp := time.Now().Add(30 * time.Minute).Truncate(time.Second)

	tok, err := c.CreateAccessToken(context.Background(), whop.Request{CompanyID: "biz_1", UserID: "user_1", ScopedActions: []string{"chat:read"}, ExpiresAt: exp})
	if err != nil {
		t.Fatalf("CreateAccessToken: %v", err)
	}
	if !tok.ExpiresAt.Equal(exp) {
		t.Errorf("ExpiresAt = %v, want %v", tok.ExpiresAt, exp)
	}
	claims, err := s.Verify(tok.Token)
	if err != nil {
		t.Fatalf("token does not verify: %v", err)
	}
	if claims.Sub != "user_1" || claims.CompanyID != "biz_1" || claims.Exp != exp.Unix() {
		t.Errorf("claims = %+v", claims)
	}

	tok, err = c.CreateAccessToken(context.Background(), whop.Request{UserID: "user_2"})
	if err != nil {
		t.Fatalf("CreateAccessToken default expiry: %v", err)
	}
	if d := time.Until(tok.ExpiresAt); d < 59*time.Minute || d > 61*time.Minute {
		t.Errorf("default expiry in %v, want ~1h", d)
	}
}

func TestRequestBody(t *testing.T) {
	exp := time.Date(2030, 1, 2, 3, 4, 5, 999, time.FixedZone("X", 3600))
	tests := []struct {
		name string
		req  whop.Request
		want map[string]any
	}{
		{name: "company only", req: whop.Request{CompanyID: "biz_1"}, want: map[string]any{"company_id": "biz_1"}},
		{name: "user only", req: whop.Request{UserID: "user_1"}, want: map[string]any{"user_id": "user_1"}},
		{name: "empty scopes omitted", req: whop.Request{UserID: "user_1", ScopedActions: []string{}}, want: map[string]any{"user_id": "user_1"}},
		{
			name: "everything",
			req:  whop.Request{CompanyID: "biz_1", UserID: "user_1", ScopedActions: []string{"a", "b"}, ExpiresAt: exp},
			want: map[string]any{"company_id": "biz_1", "user_id": "user_1", "scoped_actions": []any{"a", "b"}, "expires_at": "2030-01-02T02:04:05Z"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got map[string]any
			var hdr http.Header
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				hdr = r.Header.Clone()
				b, _ := io.ReadAll(r.Body)
				if err := json.Unmarshal(b, &got); err != nil {
					t.Errorf("body %q: %v", b, err)
				}
				if r.Method != http.MethodPost || r.URL.Path != "/api/v1/access_tokens" {
					t.Errorf("%s %s, want POST /api/v1/access_tokens", r.Method, r.URL.Path)
				}
				_, _ = io.WriteString(w, `{"token":"e30.e30.c2ln","expires_at":"2030-01-02T03:04:05.000Z"}`)
			}))
			defer srv.Close()
			c := newClient(t, srv.URL+"/api/v1", testKey, 0)
			if _, err := c.CreateAccessToken(context.Background(), tt.req); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("body = %v, want %v", got, tt.want)
			}
			for k, v := range map[string]string{
				"Authorization": "Bearer " + testKey,
				"Content-Type":  "application/json",
				"Accept":        "application/json",
				"User-Agent":    "tokend/test",
			} {
				if hdr.Get(k) != v {
					t.Errorf("header %s = %q, want %q", k, hdr.Get(k), v)
				}
			}
		})
	}
}

func TestStatusMapping(t *testing.T) {
	s := newFake(t)
	c := newClient(t, s.URL(), testKey, 0)
	tests := []struct {
		status    int
		retryable bool
	}{
		{400, false}, {401, false}, {403, false}, {404, false}, {422, false},
		{408, true}, {409, true}, {429, true}, {500, true}, {502, true}, {503, true}, {504, true},
		{200, true}, // a 2xx without a token is an upstream fault
	}
	for _, tt := range tests {
		t.Run(fmt.Sprint(tt.status), func(t *testing.T) {
			s.Enqueue(whoptest.Fault{Status: tt.status})
			_, err := c.CreateAccessToken(context.Background(), whop.Request{CompanyID: "biz_1"})
			e := asError(t, err)
			if e.StatusCode != tt.status || e.Retryable() != tt.retryable || whop.IsRetryable(err) != tt.retryable {
				t.Errorf("StatusCode %d Retryable %v IsRetryable %v, want %d %v", e.StatusCode, e.Retryable(), whop.IsRetryable(err), tt.status, tt.retryable)
			}
			if e.Message == "" || (tt.status != 200 && e.Type == "") {
				t.Errorf("missing type/message: %+v", e)
			}
			if !strings.HasPrefix(err.Error(), fmt.Sprintf("whop: create access token: %d ", tt.status)) {
				t.Errorf("Error() = %q", err.Error())
			}
		})
	}
}

func TestUpstreamValidationErrors(t *testing.T) {
	s := newFake(t)
	tests := []struct {
		name   string
		key    string
		req    whop.Request
		status int
		param  string
	}{
		{name: "unknown key", key: "sk_unknown_XYZ", req: whop.Request{CompanyID: "biz_1"}, status: 401},
		{name: "no subject", key: testKey, req: whop.Request{}, status: 400, param: "company_id"},
		{name: "bad user", key: testKey, req: whop.Request{UserID: "u1"}, status: 400, param: "user_id"},
		{name: "too long", key: testKey, req: whop.Request{UserID: "user_1", ExpiresAt: time.Now().Add(4 * time.Hour)}, status: 400, param: "expires_at"},
		{name: "scope not granted", key: limitedKey, req: whop.Request{UserID: "user_1", ScopedActions: []string{"admin"}}, status: 403, param: "scoped_actions"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newClient(t, s.URL(), tt.key, 0)
			_, err := c.CreateAccessToken(context.Background(), tt.req)
			e := asError(t, err)
			if e.StatusCode != tt.status || e.Param != tt.param || whop.IsRetryable(err) {
				t.Errorf("got %+v, want status %d param %q not retryable", e, tt.status, tt.param)
			}
		})
	}
}

func TestRetryAfter(t *testing.T) {
	s := newFake(t)
	c := newClient(t, s.URL(), testKey, 0)
	tests := []struct {
		name     string
		header   string
		min, max time.Duration
	}{
		{name: "seconds", header: "2", min: 2 * time.Second, max: 2 * time.Second},
		{name: "http date", header: time.Now().Add(10 * time.Second).UTC().Format(http.TimeFormat), min: 8 * time.Second, max: 10 * time.Second},
		{name: "absent", header: "", min: 0, max: 0},
		{name: "invalid", header: "later", min: 0, max: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s.Enqueue(whoptest.Fault{Status: 429, RetryAfter: tt.header})
			_, err := c.CreateAccessToken(context.Background(), whop.Request{CompanyID: "biz_1"})
			got := whop.RetryAfterOf(err)
			if got < tt.min || got > tt.max {
				t.Errorf("RetryAfterOf = %v, want in [%v, %v]", got, tt.min, tt.max)
			}
		})
	}
	if whop.RetryAfterOf(errors.New("other")) != 0 {
		t.Error("RetryAfterOf a foreign error is not 0")
	}
}

func TestTimeoutCutsStuckServer(t *testing.T) {
	s := newFake(t)
	c := newClient(t, s.URL(), testKey, 100*time.Millisecond)
	s.Enqueue(whoptest.Fault{Latency: 2 * time.Second})
	start := time.Now()
	_, err := c.CreateAccessToken(context.Background(), whop.Request{CompanyID: "biz_1"})
	if d := time.Since(start); d > time.Second {
		t.Fatalf("took %v with a 100ms timeout", d)
	}
	e := asError(t, err)
	if e.StatusCode != 0 || !e.Retryable() || !errors.Is(err, whop.ErrTimeout) || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %+v (%v), want StatusCode 0, retryable, ErrTimeout and not the caller's deadline", e, err)
	}
	// The next request, without the fault, still works on the same client.
	if _, err := c.CreateAccessToken(context.Background(), whop.Request{CompanyID: "biz_1"}); err != nil {
		t.Fatalf("after timeout: %v", err)
	}
}

func TestCallerCancelNotRetryable(t *testing.T) {
	s := newFake(t)
	c := newClient(t, s.URL(), testKey, 0)
	s.Enqueue(whoptest.Fault{Latency: 2 * time.Second})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { time.Sleep(20 * time.Millisecond); cancel() }()
	_, err := c.CreateAccessToken(ctx, whop.Request{CompanyID: "biz_1"})
	if !errors.Is(err, context.Canceled) || whop.IsRetryable(err) {
		t.Fatalf("err = %v, IsRetryable %v; want canceled, not retryable", err, whop.IsRetryable(err))
	}
	if !whop.IsRetryable(errors.New("something else")) {
		t.Error("unknown errors should be presumed retryable")
	}
}

func TestDroppedConnection(t *testing.T) {
	s := newFake(t)
	c := newClient(t, s.URL(), testKey, 0)
	s.Enqueue(whoptest.Fault{Drop: true})
	_, err := c.CreateAccessToken(context.Background(), whop.Request{CompanyID: "biz_1"})
	e := asError(t, err)
	if e.StatusCode != 0 || !whop.IsRetryable(err) || e.Err == nil {
		t.Fatalf("got %+v, want StatusCode 0 retryable with cause", e)
	}
	if !strings.HasPrefix(err.Error(), "whop: create access token: request failed: ") {
		t.Errorf("Error() = %q", err.Error())
	}
	if n := s.CallCount(); n != 1 {
		t.Errorf("upstream saw %d calls, want 1 (no silent retry)", n)
	}
}

func TestNonJSONErrorBodies(t *testing.T) {
	tests := []struct {
		name    string
		status  int
		body    string
		message string
		retry   bool
	}{
		{name: "html 502", status: 502, body: "<html>oops</html>", message: "Bad Gateway", retry: true},
		{name: "2xx garbage", status: 200, body: "not json", message: "not a valid", retry: true},
		{name: "2xx huge", status: 200, body: `{"token":"` + strings.Repeat("a", 2<<20) + `"}`, message: "exceeds", retry: true},
		{name: "redirect not followed", status: 302, body: "", message: "Found", retry: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if tt.status == 302 {
					w.Header().Set("Location", "http://example.invalid/steal")
				}
				w.WriteHeader(tt.status)
				_, _ = io.WriteString(w, tt.body)
			}))
			defer srv.Close()
			c := newClient(t, srv.URL, testKey, 0)
			_, err := c.CreateAccessToken(context.Background(), whop.Request{CompanyID: "biz_1"})
			e := asError(t, err)
			if e.StatusCode != tt.status || !strings.Contains(e.Message, tt.message) || e.Retryable() != tt.retry {
				t.Errorf("got %+v retryable %v, want status %d message ~%q retryable %v", e, e.Retryable(), tt.status, tt.message, tt.retry)
			}
		})
	}
}

func TestKeyNeverInErrors(t *testing.T) {
	s := newFake(t)
	keys := []string{testKey, "sk_test_UNKNOWNSECRET_000"}
	faults := []whoptest.Fault{
		{}, // normal: invalid request below
		{Status: 400}, {Status: 401}, {Status: 403}, {Status: 404}, {Status: 408}, {Status: 422},
		{Status: 429, RetryAfter: "1"}, {Status: 500}, {Status: 502}, {Status: 503}, {Status: 200},
		{Drop: true},
		{Latency: time.Second}, // cut by the client timeout
	}
	for _, key := range keys {
		c := newClient(t, s.URL(), key, 50*time.Millisecond)
		for _, f := range faults {
			s.Enqueue(f)
			_, err := c.CreateAccessToken(context.Background(), whop.Request{UserID: "bad"})
			if err == nil {
				t.Fatalf("fault %+v: no error", f)
			}
			checkNoKey(t, key, fmt.Sprintf("fault %+v", f), err)
		}
		// Echoing the key back must not leak it either.
		echo := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(401)
			fmt.Fprintf(w, `{"error":{"type":"unauthorized","message":"bad key %s","param":"%s"}}`, key, r.Header.Get("Authorization"))
		}))
		ce := newClient(t, echo.URL, key, 0)
		_, err := ce.CreateAccessToken(context.Background(), whop.Request{UserID: "user_1"})
		checkNoKey(t, key, "echoing upstream", err)
		echo.Close()

		// Nothing listening any more.
		_, err = ce.CreateAccessToken(context.Background(), whop.Request{UserID: "user_1"})
		checkNoKey(t, key, "connection refused", err)
		if asError(t, err).StatusCode != 0 || !whop.IsRetryable(err) {
			t.Errorf("connection refused: %+v", err)
		}

		for _, out := range []string{
			fmt.Sprintf("%v %+v %s", c, c, c),
			fmt.Sprintf("%#v", c),
			fmt.Sprintf("%+v %#v", reflect.ValueOf(c).Elem(), reflect.ValueOf(c).Elem()),
			string(c.KeyFingerprint()),
		} {
			if strings.Contains(out, key) {
				t.Errorf("client formatting reveals the key: %s", out)
			}
		}
	}
}

func checkNoKey(t *testing.T, key, what string, err error) {
	t.Helper()
	for _, s := range []string{err.Error(), fmt.Sprintf("%+v", err), fmt.Sprintf("%#v", err)} {
		if strings.Contains(s, key) {
			t.Errorf("%s: error reveals the key: %s", what, s)
		}
	}
	for e := err; e != nil; e = errors.Unwrap(e) {
		if strings.Contains(e.Error(), key) {
			t.Errorf("%s: wrapped error reveals the key: %s", what, e)
		}
	}
}

func TestSetAPIKey(t *testing.T) {
	s := newFake(t)
	salt := []byte("salt")
	c := newClient(t, s.URL(), testKey, 0)
	before := c.KeyFingerprint()
	if !bytes.Equal(before, whop.Fingerprint(salt, testKey)) || len(before) != 16 {
		t.Fatalf("KeyFingerprint = %x, want Fingerprint(salt, key)", before)
	}
	req := whop.Request{CompanyID: "biz_1"}
	if _, err := c.CreateAccessToken(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if err := c.SetAPIKey(otherKey); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateAccessToken(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	calls := s.Calls()
	if len(calls) != 2 || calls[0].Key != testKey || calls[1].Key != otherKey {
		t.Fatalf("keys sent: %+v", calls)
	}
	if bytes.Equal(c.KeyFingerprint(), before) || !bytes.Equal(c.KeyFingerprint(), whop.Fingerprint(salt, otherKey)) {
		t.Error("fingerprint did not follow the key")
	}
	if bytes.Equal(whop.Fingerprint(nil, otherKey), whop.Fingerprint(salt, otherKey)) {
		t.Error("salt does not affect the fingerprint")
	}
	fleetSalt := []byte("fleet")
	if got := c.FingerprintWith(fleetSalt); !bytes.Equal(got, whop.Fingerprint(fleetSalt, otherKey)) || bytes.Equal(got, c.KeyFingerprint()) {
		t.Errorf("FingerprintWith = %x, want Fingerprint(fleet salt, key)", got)
	}

	for _, bad := range []string{"", "has space", "new\nline"} {
		if err := c.SetAPIKey(bad); err == nil || !strings.Contains(err.Error(), "api key") {
			t.Errorf("SetAPIKey(%q) err = %v", bad, err)
		}
	}
	if _, err := c.CreateAccessToken(context.Background(), req); err != nil {
		t.Fatalf("a rejected SetAPIKey changed the key: %v", err)
	}

	s.RemoveKey(otherKey)
	_, err := c.CreateAccessToken(context.Background(), req)
	if e := asError(t, err); e.StatusCode != 401 || e.Retryable() {
		t.Fatalf("revoked key: %+v", e)
	}
}

func TestConcurrentUse(t *testing.T) {
	s := newFake(t)
	c := newClient(t, s.URL(), testKey, 0)
	s.SetLatency(20 * time.Millisecond)
	errc := make(chan error, 8)
	for i := range 8 {
		go func() {
			if i%4 == 0 {
				_ = c.SetAPIKey(otherKey)
			}
			_, err := c.CreateAccessToken(context.Background(), whop.Request{UserID: fmt.Sprintf("user_%d", i)})
			errc <- err
		}()
	}
	for range 8 {
		if err := <-errc; err != nil {
			t.Error(err)
		}
	}
	if s.MaxInFlight() < 2 {
		t.Errorf("MaxInFlight = %d: requests were serialized", s.MaxInFlight())
	}
}

// TestFaultAnswers drives the client against the fake for the answers Whop
// and the proxies before it are known to give.
func TestFaultAnswers(t *testing.T) {
	s := newFake(t)
	c := newClient(t, s.URL(), testKey, 0)
	yes, no := true, false
	const html = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body><center><h1>502 Bad Gateway</h1></center></body></html>"
	tests := []struct {
		name       string
		fault      whoptest.Fault
		status     int
		message    string // exact
		code, typ  string
		retryAfter time.Duration
		from       string
		should     *bool
		retryable  bool
	}{
		{name: "429 without header", fault: whoptest.Fault{Status: 429}, status: 429, message: "Too many requests", typ: "rate_limited", retryable: true},
		{name: "retry-after-ms", fault: whoptest.Fault{Status: 429, RetryAfterMs: "1500"}, status: 429, message: "Too many requests", typ: "rate_limited",
			retryAfter: 1500 * time.Millisecond, from: "retry-after-ms", retryable: true},
		{name: "retry-after-ms beats retry-after", fault: whoptest.Fault{Status: 503, RetryAfter: "30", RetryAfterMs: "250.5"}, status: 503, message: "Service unavailable", typ: "service_unavailable",
			retryAfter: 250*time.Millisecond + 500*time.Microsecond, from: "retry-after-ms", retryable: true},
		{name: "fractional retry-after", fault: whoptest.Fault{Status: 429, RetryAfter: "1.5"}, status: 429, message: "Too many requests", typ: "rate_limited",
			retryAfter: 1500 * time.Millisecond, from: "retry-after", retryable: true},
		{name: "negative retry-after", fault: whoptest.Fault{Status: 429, RetryAfter: "-3"}, status: 429, message: "Too many requests", typ: "rate_limited", retryable: true},
		{name: "x-should-retry true on a 400", fault: whoptest.Fault{Status: 400, ShouldRetry: "true"}, status: 400, message: "Bad request", typ: "invalid_request_error", should: &yes, retryable: true},
		{name: "x-should-retry false on a 503", fault: whoptest.Fault{Status: 503, ShouldRetry: "FALSE"}, status: 503, message: "Service unavailable", typ: "service_unavailable", should: &no, retryable: false},
		{name: "x-should-retry other", fault: whoptest.Fault{Status: 503, ShouldRetry: "maybe"}, status: 503, message: "Service unavailable", typ: "service_unavailable", retryable: true},
		{name: "html 502", fault: whoptest.Fault{Status: 502, Body: html, ContentType: "text/html"}, status: 502, message: "Bad Gateway", retryable: true},
		{name: "422 error null", fault: whoptest.Fault{Status: 422, Body: `{"error": null}`}, status: 422, message: "Verification required"},
		{name: "rate limited v5 body", fault: whoptest.RateLimited(), status: 429, message: "You are being rate limited", retryable: true},
		{name: "error string", fault: whoptest.Fault{Status: 500, Body: `{"error": "some string"}`}, status: 500, message: "some string", retryable: true},
		{name: "numeric code", fault: whoptest.Fault{Status: 400, Body: `{"error": {"type": "invalid_request_error", "code": 42, "message": "Company is suspended."}}`},
			status: 400, message: "Company is suspended.", code: "42", typ: "invalid_request_error"},
		{name: "object code", fault: whoptest.Fault{Status: 403, Body: `{"error": {"code": {"x": 1}, "message": "No."}}`}, status: 403, message: "No."},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s.Enqueue(tt.fault)
			_, err := c.CreateAccessToken(context.Background(), whop.Request{CompanyID: "biz_1"})
			e := asError(t, err)
			if e.StatusCode != tt.status || e.Message != tt.message || e.Code != tt.code || e.Type != tt.typ {
				t.Errorf("got status %d message %q code %q type %q; want %d %q %q %q", e.StatusCode, e.Message, e.Code, e.Type, tt.status, tt.message, tt.code, tt.typ)
			}
			if e.RetryAfter != tt.retryAfter || e.RetryAfterFrom != tt.from || whop.RetryAfterOf(err) != tt.retryAfter {
				t.Errorf("RetryAfter %v from %q, want %v from %q", e.RetryAfter, e.RetryAfterFrom, tt.retryAfter, tt.from)
			}
			if (e.ShouldRetry == nil) != (tt.should == nil) || e.ShouldRetry != nil && *e.ShouldRetry != *tt.should {
				t.Errorf("ShouldRetry = %v, want %v", e.ShouldRetry, tt.should)
			}
			if e.Retryable() != tt.retryable || whop.IsRetryable(err) != tt.retryable {
				t.Errorf("Retryable %v, want %v", e.Retryable(), tt.retryable)
			}
			if e.ServerDate.IsZero() {
				t.Error("no ServerDate from the fake's Date header")
			}
		})
	}
}

// TestServerDateAndSkew runs the fake on a fixed clock, off from ours by
// SetSkew. A Whop clock behind ours makes our now+3h more than 3h on its
// clock, so it refuses; ahead, it accepts.
func TestServerDateAndSkew(t *testing.T) {
	ours := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	s, err := whoptest.NewServer(whoptest.Config{Keys: map[string][]string{testKey: nil}, Now: func() time.Time { return ours }})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c := newClient(t, s.URL(), testKey, 0)
	tests := []struct {
		name    string
		skew    time.Duration
		expires time.Time
		refused bool
		date    time.Time
	}{
		{name: "no skew", expires: ours.Add(time.Hour), date: ours},
		{name: "whop 0.3s behind refuses our now+3h", skew: -300 * time.Millisecond, expires: ours.Add(3 * time.Hour), refused: true, date: ours.Add(-time.Second)},
		{name: "whop 0.3s ahead accepts our now+3h", skew: 300 * time.Millisecond, expires: ours.Add(3 * time.Hour), date: ours},
		{name: "whop an hour ahead", skew: time.Hour + 700*time.Millisecond, expires: ours.Add(90 * time.Minute), date: ours.Add(time.Hour)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s.SetSkew(tt.skew)
			tok, err := c.CreateAccessToken(context.Background(), whop.Request{CompanyID: "biz_1", ExpiresAt: tt.expires})
			if tt.refused {
				e := asError(t, err)
				if e.StatusCode != 400 || e.Param != "expires_at" || !e.ExpiresAtRefused() || e.Retryable() || !e.ServerDate.Equal(tt.date) {
					t.Fatalf("got %+v, want a 400 about expires_at dated %v", e, tt.date)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !tok.ExpiresAt.Equal(tt.expires) || !tok.ServerDate.Equal(tt.date) {
				t.Errorf("ExpiresAt %v ServerDate %v, want %v %v", tok.ExpiresAt, tok.ServerDate, tt.expires, tt.date)
			}
		})
	}
}

func TestExpiresAtForms(t *testing.T) {
	s := newFake(t)
	c := newClient(t, s.URL(), testKey, 0)
	for _, tt := range whop.ExpiresAtCases {
		t.Run(tt.In, func(t *testing.T) {
			wire, err := json.Marshal(tt.In)
			if err != nil {
				t.Fatal(err)
			}
			s.Enqueue(whoptest.Fault{Status: 200, Body: `{"token":"e30.e30.c2ln","expires_at":` + string(wire) + `}`})
			tok, err := c.CreateAccessToken(context.Background(), whop.Request{CompanyID: "biz_1"})
			if !tt.Want.IsZero() {
				if err != nil || !tok.ExpiresAt.Equal(tt.Want) {
					t.Fatalf("got %v, %v; want %v", tok.ExpiresAt, err, tt.Want)
				}
				return
			}
			e := asError(t, err)
			if e.StatusCode != 200 || !e.Retryable() || e.Message != fmt.Sprintf("response expires_at %q is not RFC 3339", tt.In) {
				t.Fatalf("got %+v, want a retryable 200 saying expires_at is not RFC 3339", e)
			}
		})
	}
}

func TestAPIVersionDate(t *testing.T) {
	s := newFake(t)
	for _, v := range []string{"", "2025-06-01", whop.NewestAPIVersionDate} {
		c, err := whop.New(whop.Config{BaseURL: s.URL(), APIKey: testKey, APIVersionDate: v})
		if err != nil {
			t.Fatal(err)
		}
		s.ResetCounters()
		if _, err := c.CreateAccessToken(context.Background(), whop.Request{CompanyID: "biz_1"}); err != nil {
			t.Fatal(err)
		}
		if got := s.Calls()[0].APIVersionDate; got != v {
			t.Errorf("APIVersionDate %q: sent %q", v, got)
		}
		// A reload changes it in place; a bad one changes nothing.
		if err := c.SetAPIVersionDate("2099-01-01"); err == nil || c.APIVersionDate() != v {
			t.Errorf("SetAPIVersionDate(2099-01-01): %v, now %q", err, c.APIVersionDate())
		}
		if err := c.SetAPIVersionDate("2024-01-01"); err != nil {
			t.Fatal(err)
		}
		s.ResetCounters()
		if _, err := c.CreateAccessToken(context.Background(), whop.Request{CompanyID: "biz_1"}); err != nil {
			t.Fatal(err)
		}
		if got := s.Calls()[0].APIVersionDate; got != "2024-01-01" {
			t.Errorf("after SetAPIVersionDate: sent %q", got)
		}
	}

	tests := []struct {
		in      string
		wantErr string
	}{
		{"", ""},
		{"2024-02-29", ""},
		{"2026-12-01", ""},
		{"2026-12-02", `api version date "2026-12-02": later than 2026-12-01, the newest Whop API version this tokend understands`},
		{"9999-01-01", "later than"},
		{"2025-02-29", `api version date "2025-02-29": want a calendar date YYYY-MM-DD`},
		{"2025-13-01", "calendar date"},
		{"2025-1-5", "calendar date"},
		{"20250105", "calendar date"},
		{" 2025-01-05", "calendar date"},
		{"2025-01-05T00:00:00Z", "calendar date"},
		{"latest", "calendar date"},
	}
	for _, tt := range tests {
		err := whop.ValidateAPIVersionDate(tt.in)
		if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
			t.Errorf("ValidateAPIVersionDate(%q) = %v, want %q", tt.in, err, tt.wantErr)
		}
	}
}

// TestTimeoutVsCallerDeadline: only the caller's own context may read as
// context.DeadlineExceeded or Canceled; our timeouts are ErrTimeout.
func TestTimeoutVsCallerDeadline(t *testing.T) {
	s := newFake(t)
	// stall answers with a status and part of a body, then hangs.
	stall := func(status int) string {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(status)
			_, _ = io.WriteString(w, `{"token":`)
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
			case <-time.After(5 * time.Second):
			}
		}))
		t.Cleanup(srv.Close)
		return srv.URL
	}
	tests := []struct {
		name      string
		base      string
		timeout   time.Duration
		hc        *http.Client
		ctx       func() (context.Context, context.CancelFunc)
		status    int
		message   string // contained
		errString string // exact, when set
		ours      bool   // ErrTimeout, not context.DeadlineExceeded
		deadline  bool   // context.DeadlineExceeded
		canceled  bool
		retryable bool
	}{
		{
			name: "our timeout", base: s.URL(), timeout: 100 * time.Millisecond, ctx: background,
			message: "timed out after 100ms waiting for Whop", errString: "whop: create access token: request failed: timed out after 100ms waiting for Whop",
			ours: true, retryable: true,
		},
		{
			name: "our timeout reading a 200 body", base: stall(200), timeout: 100 * time.Millisecond, ctx: background,
			status: 200, message: "timed out after 100ms waiting for Whop", ours: true, retryable: true,
		},
		{
			name: "our timeout reading a 503 body", base: stall(503), timeout: 100 * time.Millisecond, ctx: background,
			status: 503, message: "timed out after 100ms waiting for Whop", errString: "whop: create access token: 503 service unavailable: timed out after 100ms waiting for Whop",
			ours: true, retryable: true,
		},
		{
			name: "the http client's timeout", base: s.URL(), hc: &http.Client{Timeout: 100 * time.Millisecond}, ctx: background,
			message: "", ours: true, retryable: true,
		},
		{
			name: "caller deadline", base: s.URL(), timeout: 10 * time.Second,
			ctx: func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), 100*time.Millisecond)
			},
			message: "", deadline: true, retryable: true,
		},
		{
			name: "caller deadline before ours while reading the body", base: stall(200), timeout: 10 * time.Second,
			ctx: func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), 100*time.Millisecond)
			},
			status: 200, message: "read response body", deadline: true, retryable: true,
		},
		{
			name: "caller cancel", base: s.URL(), timeout: 10 * time.Second,
			ctx: func() (context.Context, context.CancelFunc) {
				ctx, cancel := context.WithCancel(context.Background())
				time.AfterFunc(100*time.Millisecond, cancel)
				return ctx, cancel
			},
			canceled: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s.Enqueue(whoptest.Fault{Latency: 5 * time.Second})
			defer s.ResetCounters()
			c, err := whop.New(whop.Config{BaseURL: tt.base, APIKey: testKey, Timeout: tt.timeout, HTTPClient: tt.hc})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := tt.ctx()
			defer cancel()
			start := time.Now()
			_, err = c.CreateAccessToken(ctx, whop.Request{CompanyID: "biz_1"})
			if d := time.Since(start); d > 2*time.Second {
				t.Fatalf("took %v", d)
			}
			e := asError(t, err)
			if e.StatusCode != tt.status || !strings.Contains(e.Message, tt.message) || tt.errString != "" && err.Error() != tt.errString {
				t.Errorf("got status %d message %q (%v), want %d ~%q %q", e.StatusCode, e.Message, err, tt.status, tt.message, tt.errString)
			}
			if errors.Is(err, whop.ErrTimeout) != tt.ours || errors.Is(err, context.DeadlineExceeded) != tt.deadline || errors.Is(err, context.Canceled) != tt.canceled {
				t.Errorf("%v: Is ErrTimeout %v DeadlineExceeded %v Canceled %v; want %v %v %v", err,
					errors.Is(err, whop.ErrTimeout), errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled), tt.ours, tt.deadline, tt.canceled)
			}
			if whop.IsRetryable(err) != tt.retryable {
				t.Errorf("IsRetryable = %v, want %v", whop.IsRetryable(err), tt.retryable)
			}
		})
	}
}

func background() (context.Context, context.CancelFunc) {
	return context.WithCancel(context.Background())
}
