package whoptest_test

import (
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/whop/whoptest"
)

const (
	keyAll     = "sk_all_0123456789"
	keyLimited = "sk_limited_0123456789"
)

// clock is a settable clock for Config.Now.
type clock struct{ ns atomic.Int64 }

func newClock(t time.Time) *clock {
	c := &clock{}
	c.ns.Store(t.UnixNano())
	return c
}

func (c *clock) Now() time.Time      { return time.Unix(0, c.ns.Load()).UTC() }
func (c *clock) Add(d time.Duration) { c.ns.Add(int64(d)) }

func newServer(t *testing.T, now func() time.Time) *whoptest.Server {
	t.Helper()
	s, err := whoptest.NewServer(whoptest.Config{
		Keys: map[string][]string{
			keyAll:     nil,
			keyLimited: {"chat:read", "chat:message:create"},
		},
		Now: now,
	})
	if err != nil {
		t.Fatalf("NewServer: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}

type response struct {
	Status     int
	RetryAfter string
	Token      string `json:"token"`
	ExpiresAt  string `json:"expires_at"`
	Error      *struct {
		Type, Message, Code, Param string
	} `json:"error"`
}

// rawResponse is an answer as it came, for bodies that are not Whop's.
type rawResponse struct {
	Status int
	Header http.Header
	Body   string
}

func roundTrip(t *testing.T, method, url string, header http.Header, body string) (rawResponse, error) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if header != nil {
		req.Header = header.Clone()
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return rawResponse{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return rawResponse{}, err
	}
	return rawResponse{Status: resp.StatusCode, Header: resp.Header, Body: string(b)}, nil
}

func do(t *testing.T, method, url, auth, body string) (response, error) {
	t.Helper()
	h := http.Header{}
	if auth != "" {
		h.Set("Authorization", auth)
	}
	raw, err := roundTrip(t, method, url, h, body)
	if err != nil {
		return response{}, err
	}
	var r response
	if err := json.Unmarshal([]byte(raw.Body), &r); err != nil {
		t.Fatalf("response %d is not json: %q", raw.Status, raw.Body)
	}
	r.Status = raw.Status
	r.RetryAfter = raw.Header.Get("Retry-After")
	return r, nil
}

// postRaw posts body with key and any extra headers, and returns the answer
// undecoded.
func postRaw(t *testing.T, s *whoptest.Server, key, body string, extra http.Header) rawResponse {
	t.Helper()
	h := http.Header{"Authorization": {"Bearer " + key}}
	for k, v := range extra {
		h[k] = v
	}
	r, err := roundTrip(t, http.MethodPost, s.URL()+"/access_tokens", h, body)
	if err != nil {
		t.Fatalf("post: %v", err)
	}
	return r
}

func post(t *testing.T, s *whoptest.Server, key, body string) response {
	t.Helper()
	r, err := do(t, http.MethodPost, s.URL()+"/access_tokens", "Bearer "+key, body)
	if err != nil {
		t.Fatalf("post: %v", err)
	}
	return r
}

func TestValidation(t *testing.T) {
	clk := newClock(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC))
	s := newServer(t, clk.Now)
	future := func(d time.Duration) string { return clk.Now().Add(d).Format(time.RFC3339) }

	tests := []struct {
		name   string
		method string
		path   string
		auth   string
		body   string
		status int
		typ    string
		code   string
		param  string
	}{
		{name: "wrong path", path: "/api/v1/tokens", body: `{"company_id":"biz_1"}`, status: 404, typ: "not_found"},
		{name: "wrong method", method: http.MethodGet, status: 404, typ: "not_found"},
		{name: "no auth", auth: "-", body: `{"company_id":"biz_1"}`, status: 401, typ: "unauthorized"},
		{name: "not bearer", auth: "Basic " + keyAll, body: `{"company_id":"biz_1"}`, status: 401, typ: "unauthorized"},
		{name: "unknown key", auth: "Bearer sk_nope", body: `{"company_id":"biz_1"}`, status: 401, typ: "unauthorized"},
		{name: "auth before json", auth: "Bearer sk_nope", body: `{`, status: 401, typ: "unauthorized"},
		{name: "bad json", body: `{"company_id":`, status: 400, typ: "invalid_request_error", code: "invalid_json"},
		{name: "trailing garbage", body: `{"company_id":"biz_1"} x`, status: 400, code: "invalid_json"},
		{name: "empty body", body: ``, status: 400, code: "parameter_missing", param: "company_id"},
		{name: "no subject", body: `{"scoped_actions":["chat:read"]}`, status: 400, code: "parameter_missing", param: "company_id"},
		{name: "null subject", body: `{"company_id":null,"user_id":null}`, status: 400, code: "parameter_missing", param: "company_id"},
		{name: "bad company prefix", body: `{"company_id":"usr_1"}`, status: 400, code: "parameter_invalid", param: "company_id"},
		{name: "bad user prefix", body: `{"user_id":"biz_1"}`, status: 400, code: "parameter_invalid", param: "user_id"},
		{name: "company checked before user", body: `{"company_id":"x","user_id":"y"}`, status: 400, code: "parameter_invalid", param: "company_id"},
		{name: "expires not rfc3339", body: `{"company_id":"biz_1","expires_at":"tomorrow"}`, status: 400, code: "parameter_invalid", param: "expires_at"},
		{name: "expires in past", body: `{"company_id":"biz_1","expires_at":"` + future(-time.Minute) + `"}`, status: 400, code: "parameter_invalid", param: "expires_at"},
		{name: "expires now", body: `{"company_id":"biz_1","expires_at":"` + future(0) + `"}`, status: 400, code: "parameter_invalid", param: "expires_at"},
		{name: "expires beyond 3h", body: `{"company_id":"biz_1","expires_at":"` + future(3*time.Hour+time.Second) + `"}`, status: 400, code: "parameter_invalid", param: "expires_at"},
		{name: "expires exactly 3h", body: `{"company_id":"biz_1","expires_at":"` + future(3*time.Hour) + `"}`, status: 200},
		{name: "scope not allowed", auth: "Bearer " + keyLimited, body: `{"user_id":"user_1","scoped_actions":["chat:read","admin:all"]}`, status: 403, typ: "forbidden", param: "scoped_actions"},
		{name: "scope subset", auth: "Bearer " + keyLimited, body: `{"user_id":"user_1","scoped_actions":["chat:read"]}`, status: 200},
		{name: "limited key no scopes inherits", auth: "Bearer " + keyLimited, body: `{"user_id":"user_1"}`, status: 200},
		{name: "all-permission key any scope", body: `{"company_id":"biz_1","scoped_actions":["admin:all"]}`, status: 200},
		{name: "both subjects", body: `{"company_id":"biz_1","user_id":"user_1"}`, status: 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			method, path, auth := tt.method, tt.path, tt.auth
			if method == "" {
				method = http.MethodPost
			}
			if path == "" {
				path = "/api/v1/access_tokens"
			}
			switch auth {
			case "":
				auth = "Bearer " + keyAll
			case "-":
				auth = ""
			}
			base := strings.TrimSuffix(s.URL(), "/api/v1")
			r, err := do(t, method, base+path, auth, tt.body)
			if err != nil {
				t.Fatal(err)
			}
			if r.Status != tt.status {
				t.Fatalf("status = %d, want %d (body error %+v)", r.Status, tt.status, r.Error)
			}
			if tt.status == 200 {
				if r.Token == "" || r.ExpiresAt == "" {
					t.Fatalf("success without token or expires_at: %+v", r)
				}
				return
			}
			if r.Error == nil || r.Error.Message == "" {
				t.Fatalf("error body missing type/message: %+v", r)
			}
			if tt.typ != "" && r.Error.Type != tt.typ {
				t.Errorf("type = %q, want %q", r.Error.Type, tt.typ)
			}
			if r.Error.Code != tt.code {
				t.Errorf("code = %q, want %q", r.Error.Code, tt.code)
			}
			if r.Error.Param != tt.param {
				t.Errorf("param = %q, want %q", r.Error.Param, tt.param)
			}
		})
	}
}

func TestMintAndVerify(t *testing.T) {
	start := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	clk := newClock(start)
	s := newServer(t, clk.Now)

	t.Run("default expiry and claims", func(t *testing.T) {
		r := post(t, s, keyAll, `{"company_id":"biz_1","user_id":"user_2"}`)
		if r.Status != 200 {
			t.Fatalf("status %d", r.Status)
		}
		if want := "2030-01-02T04:04:05.000Z"; r.ExpiresAt != want {
			t.Errorf("expires_at = %q, want %q (now+1h, millis)", r.ExpiresAt, want)
		}
		c, err := s.Verify(r.Token)
		if err != nil {
			t.Fatalf("Verify: %v", err)
		}
		if c.Sub != "user_2" || c.CompanyID != "biz_1" || c.UserID != "user_2" || c.Scopes != nil {
			t.Errorf("claims = %+v", c)
		}
		if c.Iat != start.Unix() || c.Exp != start.Add(time.Hour).Unix() || c.Jti == "" {
			t.Errorf("claims times/jti = %+v", c)
		}
	})

	t.Run("explicit expiry, scopes, company subject", func(t *testing.T) {
		exp := start.Add(90 * time.Minute)
		r := post(t, s, keyAll, `{"company_id":"biz_9","scoped_actions":["a","b"],"expires_at":"`+exp.Format(time.RFC3339)+`"}`)
		c, err := s.Verify(r.Token)
		if err != nil {
			t.Fatalf("Verify: %v", err)
		}
		if c.Sub != "biz_9" || c.UserID != "" || c.Exp != exp.Unix() || strings.Join(c.Scopes, ",") != "a,b" {
			t.Errorf("claims = %+v", c)
		}
		if got, _ := time.Parse(time.RFC3339, r.ExpiresAt); !got.Equal(exp) {
			t.Errorf("expires_at = %q, want %v", r.ExpiresAt, exp)
		}
	})

	t.Run("jti differs within a second", func(t *testing.T) {
		a := post(t, s, keyAll, `{"company_id":"biz_1"}`)
		b := post(t, s, keyAll, `{"company_id":"biz_1"}`)
		if a.Token == b.Token {
			t.Fatal("two tokens minted at the same instant are identical")
		}
	})

	t.Run("rejects tampering and expiry", func(t *testing.T) {
		r := post(t, s, keyAll, `{"user_id":"user_1"}`)
		parts := strings.Split(r.Token, ".")
		forged, _ := json.Marshal(map[string]any{"sub": "user_admin", "exp": start.Add(time.Hour).Unix()})
		none := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","typ":"JWT"}`))
		flip := func(s string) string {
			b := []byte(s)
			if b[0] == 'A' {
				b[0] = 'B'
			} else {
				b[0] = 'A'
			}
			return string(b)
		}
		bad := map[string]string{
			"empty":          "",
			"two parts":      parts[0] + "." + parts[1],
			"payload swap":   parts[0] + "." + base64.RawURLEncoding.EncodeToString(forged) + "." + parts[2],
			"signature flip": parts[0] + "." + parts[1] + "." + flip(parts[2]),
			"alg none":       none + "." + parts[1] + ".",
			"other server":   mintElsewhere(t),
		}
		for name, tok := range bad {
			if _, err := s.Verify(tok); err == nil {
				t.Errorf("%s: Verify accepted a bad token", name)
			}
		}
		if _, err := s.Verify(r.Token); err != nil {
			t.Fatalf("Verify good token: %v", err)
		}
		clk.Add(time.Hour)
		if _, err := s.Verify(r.Token); err == nil || !strings.Contains(err.Error(), "expired") {
			t.Errorf("Verify after exp: err = %v, want expired", err)
		}
	})
}

func mintElsewhere(t *testing.T) string {
	other := newServer(t, nil)
	return post(t, other, keyAll, `{"user_id":"user_1"}`).Token
}

func TestFaults(t *testing.T) {
	s := newServer(t, nil)
	body := `{"company_id":"biz_1"}`

	t.Run("enqueue order then default", func(t *testing.T) {
		s.Enqueue(whoptest.Fault{Status: 500}, whoptest.Fault{Status: 429, RetryAfter: "2"}, whoptest.Fault{Status: 503})
		want := []struct {
			status int
			typ    string
			ra     string
		}{{500, "internal_server_error", ""}, {429, "rate_limited", "2"}, {503, "service_unavailable", ""}, {200, "", ""}}
		for i, w := range want {
			r := post(t, s, keyAll, body)
			if r.Status != w.status || r.RetryAfter != w.ra {
				t.Fatalf("request %d: status %d retry-after %q, want %d %q", i, r.Status, r.RetryAfter, w.status, w.ra)
			}
			if w.typ != "" && (r.Error == nil || r.Error.Type != w.typ) {
				t.Fatalf("request %d: error body %+v, want type %q", i, r.Error, w.typ)
			}
		}
	})

	t.Run("fault applies before auth", func(t *testing.T) {
		s.Enqueue(whoptest.Fault{Status: 502})
		if r := post(t, s, "sk_unknown", body); r.Status != 502 {
			t.Fatalf("status %d, want 502", r.Status)
		}
	})

	t.Run("set default and restore", func(t *testing.T) {
		s.SetDefault(whoptest.Fault{Status: 503})
		for range 3 {
			if r := post(t, s, keyAll, body); r.Status != 503 {
				t.Fatalf("status %d, want 503", r.Status)
			}
		}
		s.Enqueue(whoptest.Fault{Status: 400})
		if r := post(t, s, keyAll, body); r.Status != 400 {
			t.Fatalf("queue should beat default: status %d", r.Status)
		}
		s.SetDefault(whoptest.Fault{})
		if r := post(t, s, keyAll, body); r.Status != 200 {
			t.Fatalf("after restore: status %d", r.Status)
		}
	})

	t.Run("drop", func(t *testing.T) {
		s.ResetCounters()
		s.Enqueue(whoptest.Fault{Drop: true})
		if _, err := do(t, http.MethodPost, s.URL()+"/access_tokens", "Bearer "+keyAll, body); err == nil {
			t.Fatal("dropped request succeeded")
		}
		calls := s.Calls()
		if len(calls) != 1 || !calls[0].Dropped || calls[0].Status != 0 {
			t.Fatalf("calls = %+v, want one dropped", calls)
		}
	})

	t.Run("latency", func(t *testing.T) {
		s.SetLatency(30 * time.Millisecond)
		s.Enqueue(whoptest.Fault{Latency: 40 * time.Millisecond})
		start := time.Now()
		post(t, s, keyAll, body)
		if d := time.Since(start); d < 70*time.Millisecond {
			t.Errorf("first request took %v, want >= 70ms (base + fault)", d)
		}
		start = time.Now()
		post(t, s, keyAll, body)
		if d := time.Since(start); d < 30*time.Millisecond {
			t.Errorf("second request took %v, want >= 30ms (base)", d)
		}
		s.SetLatency(0)
	})

	t.Run("latency ends when client leaves", func(t *testing.T) {
		s.ResetCounters()
		s.Enqueue(whoptest.Fault{Latency: 10 * time.Second})
		c := &http.Client{Timeout: 50 * time.Millisecond}
		req, _ := http.NewRequest(http.MethodPost, s.URL()+"/access_tokens", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+keyAll)
		if _, err := c.Do(req); err == nil {
			t.Fatal("expected client timeout")
		}
		// The handler leaves the in-flight set only once it has noticed the
		// hang-up; MaxInFlight restarts from the in-flight count on reset.
		deadline := time.Now().Add(2 * time.Second)
		for {
			s.ResetCounters()
			if s.MaxInFlight() == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("handler still waiting 2s after the client left")
			}
			time.Sleep(5 * time.Millisecond)
		}
	})
}

func TestCloseCutsLatency(t *testing.T) {
	s, err := whoptest.NewServer(whoptest.Config{Keys: map[string][]string{keyAll: nil}})
	if err != nil {
		t.Fatal(err)
	}
	s.SetDefault(whoptest.Fault{Latency: time.Minute})
	errc := make(chan error, 1)
	go func() {
		// Not do(): it may call t.Fatal, which must stay on the test goroutine.
		resp, err := http.Post(s.URL()+"/access_tokens", "application/json", strings.NewReader(`{"company_id":"biz_1"}`))
		if err == nil {
			resp.Body.Close()
		}
		errc <- err
	}()
	for s.CallCount() == 0 {
		time.Sleep(time.Millisecond)
	}
	start := time.Now()
	s.Close()
	if d := time.Since(start); d > time.Second {
		t.Errorf("Close took %v with a request in its latency wait", d)
	}
	if err := <-errc; err == nil {
		t.Error("request to a closed server succeeded")
	}
	s.Close() // idempotent
}

func TestCallLogAndCounters(t *testing.T) {
	s := newServer(t, nil)
	bodies := []string{
		`{"company_id":"biz_1"}`,
		`{"company_id":"biz_1"}`,
		`{"user_id":"user_1"}`,
		`{"company_id":"biz_1","user_id":"user_1","scoped_actions":["x"],"expires_at":"2099-01-01T00:00:00Z"}`,
		`{"company_id":"nope"}`,
	}
	for _, b := range bodies {
		post(t, s, keyAll, b)
	}
	s.Enqueue(whoptest.Fault{Status: 500})
	post(t, s, "sk_someone_else", `{"company_id":"biz_1"}`)

	for subject, want := range map[string]int{
		"biz_1": 3, "user_1": 1, "biz_1/user_1": 1, "nope": 1, "biz_2": 0,
	} {
		if got := s.CallsFor(subject); got != want {
			t.Errorf("CallsFor(%q) = %d, want %d", subject, got, want)
		}
	}
	calls := s.Calls()
	if len(calls) != 6 || s.CallCount() != 6 {
		t.Fatalf("got %d calls, CallCount %d, want 6", len(calls), s.CallCount())
	}
	c := calls[3]
	if calls[0].Status != 200 {
		t.Errorf("call 0 status = %d, want 200", calls[0].Status)
	}
	// expires_at 2099 is beyond 3h: rejected, but logged as sent.
	if c.Key != keyAll || c.Status != 400 || c.ExpiresAt != "2099-01-01T00:00:00Z" || len(c.ScopedActions) != 1 || c.At.IsZero() {
		t.Errorf("call 3 = %+v", c)
	}
	if calls[4].Status != 400 {
		t.Errorf("invalid call status = %d, want 400", calls[4].Status)
	}
	if calls[5].Status != 500 || calls[5].Key != "sk_someone_else" {
		t.Errorf("fault call = %+v", calls[5])
	}
	calls[0].ScopedActions = append(calls[0].ScopedActions, "mutated")
	if len(s.Calls()[0].ScopedActions) != 0 {
		t.Error("Calls returned shared memory")
	}

	s.ResetCounters()
	if s.CallCount() != 0 || s.CallsFor("biz_1") != 0 || s.MaxInFlight() != 0 {
		t.Error("ResetCounters left counts behind")
	}
}

func TestMaxInFlight(t *testing.T) {
	s := newServer(t, nil)
	s.SetLatency(100 * time.Millisecond)
	const n = 5
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			if _, err := do(t, http.MethodPost, s.URL()+"/access_tokens", "Bearer "+keyAll, `{"company_id":"biz_1"}`); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if got := s.MaxInFlight(); got < 2 || got > n {
		t.Errorf("MaxInFlight = %d, want 2..%d", got, n)
	}
}

func TestKeys(t *testing.T) {
	s := newServer(t, nil)
	body := `{"user_id":"user_1","scoped_actions":["x"]}`
	if r := post(t, s, "sk_new", body); r.Status != 401 {
		t.Fatalf("unknown key: %d", r.Status)
	}
	s.AddKey("sk_new", []string{})
	if r := post(t, s, "sk_new", body); r.Status != 403 {
		t.Fatalf("key with no permissions granting a scope: %d", r.Status)
	}
	s.AddKey("sk_new", []string{"x"})
	if r := post(t, s, "sk_new", body); r.Status != 200 {
		t.Fatalf("key with the scope: %d", r.Status)
	}
	s.RemoveKey("sk_new")
	if r := post(t, s, "sk_new", body); r.Status != 401 {
		t.Fatalf("removed key: %d", r.Status)
	}
}

func TestNewServerBadAddr(t *testing.T) {
	_, err := whoptest.NewServer(whoptest.Config{Addr: "256.0.0.1:http-nope"})
	if err == nil {
		t.Fatal("NewServer accepted a bad address")
	}
}

func TestFaultHeadersAndBodies(t *testing.T) {
	s := newServer(t, nil)
	const html = "<html><body><h1>502 Bad Gateway</h1></body></html>"
	tests := []struct {
		name        string
		fault       whoptest.Fault
		status      int
		headers     map[string]string // "" means the header must be absent
		body        string            // exact, when set
		contentType string
	}{
		{
			name:    "no wait hint by default",
			fault:   whoptest.Fault{Status: 429},
			status:  429,
			headers: map[string]string{"Retry-After": "", "Retry-After-Ms": "", "X-Should-Retry": ""},
		},
		{
			name:    "retry-after-ms",
			fault:   whoptest.Fault{Status: 429, RetryAfterMs: "1500"},
			status:  429,
			headers: map[string]string{"Retry-After-Ms": "1500", "Retry-After": ""},
		},
		{
			name:    "both wait hints",
			fault:   whoptest.Fault{Status: 503, RetryAfter: "2", RetryAfterMs: "250.5"},
			status:  503,
			headers: map[string]string{"Retry-After-Ms": "250.5", "Retry-After": "2"},
		},
		{
			name:    "x-should-retry",
			fault:   whoptest.Fault{Status: 400, ShouldRetry: "true"},
			status:  400,
			headers: map[string]string{"X-Should-Retry": "true"},
		},
		{
			name:        "raw html body",
			fault:       whoptest.Fault{Status: 502, Body: html, ContentType: "text/html; charset=utf-8"},
			status:      502,
			body:        html,
			contentType: "text/html; charset=utf-8",
		},
		{
			name:        "raw json defaults its content type",
			fault:       whoptest.Fault{Status: 422, Body: `{"error": null}`},
			status:      422,
			body:        `{"error": null}`,
			contentType: "application/json",
		},
		{
			name:        "raw token under 200",
			fault:       whoptest.Fault{Status: 200, Body: `{"token":"e30.e30.c2ln","expires_at":"2030-01-02t03:04:05.5z"}`},
			status:      200,
			body:        `{"token":"e30.e30.c2ln","expires_at":"2030-01-02t03:04:05.5z"}`,
			contentType: "application/json",
		},
		{
			name:        "rate limited preset",
			fault:       whoptest.RateLimited(),
			status:      429,
			body:        `{"message": "You are being rate limited"}`,
			contentType: "application/json",
			headers:     map[string]string{"Retry-After": "", "Retry-After-Ms": "", "X-Should-Retry": ""},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s.Enqueue(tt.fault)
			r := postRaw(t, s, keyAll, `{"company_id":"biz_1"}`, nil)
			if r.Status != tt.status {
				t.Fatalf("status %d, want %d", r.Status, tt.status)
			}
			for name, want := range tt.headers {
				if got, ok := r.Header[http.CanonicalHeaderKey(name)]; want == "" && ok || want != "" && (len(got) != 1 || got[0] != want) {
					t.Errorf("header %s = %q, want %q", name, got, want)
				}
			}
			if tt.body != "" && r.Body != tt.body {
				t.Errorf("body = %q, want %q", r.Body, tt.body)
			}
			if tt.contentType != "" && r.Header.Get("Content-Type") != tt.contentType {
				t.Errorf("Content-Type = %q, want %q", r.Header.Get("Content-Type"), tt.contentType)
			}
		})
	}
}

func TestSkew(t *testing.T) {
	start := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	s := newServer(t, newClock(start).Now)
	expires := func(at time.Time) string {
		return `{"company_id":"biz_1","expires_at":"` + at.Format(time.RFC3339Nano) + `"}`
	}
	tests := []struct {
		name    string
		skew    time.Duration
		body    string
		status  int
		expires string // expires_at answered, when 200
		date    string
	}{
		// Whop's clock 0.3s behind ours: our now+3h is more than 3h on its.
		{name: "behind refuses our now+3h", skew: -300 * time.Millisecond, body: expires(start.Add(3 * time.Hour)), status: 400, date: "Wed, 02 Jan 2030 03:04:04 GMT"},
		{name: "ahead accepts our now+3h", skew: 300 * time.Millisecond, body: expires(start.Add(3 * time.Hour)), status: 200, expires: "2030-01-02T06:04:05.000Z", date: "Wed, 02 Jan 2030 03:04:05 GMT"},
		{name: "limit on the fake's clock", skew: 90 * time.Minute, body: expires(start.Add(90*time.Minute + 3*time.Hour + time.Millisecond)), status: 400, date: "Wed, 02 Jan 2030 04:34:05 GMT"},
		{name: "exactly 3h on the fake's clock", skew: 90 * time.Minute, body: expires(start.Add(90*time.Minute + 3*time.Hour)), status: 200, expires: "2030-01-02T07:34:05.000Z", date: "Wed, 02 Jan 2030 04:34:05 GMT"},
		{name: "past on the fake's clock", skew: 2 * time.Hour, body: expires(start.Add(time.Hour)), status: 400, date: "Wed, 02 Jan 2030 05:04:05 GMT"},
		{name: "default expiry from the fake's clock", skew: 90*time.Minute + 300*time.Millisecond, body: `{"company_id":"biz_1"}`, status: 200, expires: "2030-01-02T05:34:05.300Z", date: "Wed, 02 Jan 2030 04:34:05 GMT"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s.SetSkew(tt.skew)
			defer s.SetSkew(0)
			raw := postRaw(t, s, keyAll, tt.body, nil)
			if got := raw.Header.Get("Date"); got != tt.date {
				t.Errorf("Date = %q, want %q", got, tt.date)
			}
			var r response
			if err := json.Unmarshal([]byte(raw.Body), &r); err != nil || raw.Status != tt.status {
				t.Fatalf("status %d body %q, want %d", raw.Status, raw.Body, tt.status)
			}
			if tt.status != 200 {
				if r.Error == nil || r.Error.Param != "expires_at" || !strings.Contains(r.Error.Message, "expires_at") {
					t.Fatalf("error %+v, want one about expires_at", r.Error)
				}
				return
			}
			if r.ExpiresAt != tt.expires {
				t.Errorf("expires_at = %q, want %q", r.ExpiresAt, tt.expires)
			}
			c, err := s.Verify(r.Token)
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if now := start.Add(tt.skew); c.Iat != now.Unix() {
				t.Errorf("iat = %d, want %d (the fake's clock)", c.Iat, now.Unix())
			}
			if calls := s.Calls(); !calls[len(calls)-1].At.Equal(start.Add(tt.skew)) {
				t.Errorf("Call.At = %v, want %v", calls[len(calls)-1].At, start.Add(tt.skew))
			}
		})
	}

	t.Run("verify follows the skew", func(t *testing.T) {
		r := post(t, s, keyAll, `{"company_id":"biz_1"}`)
		if _, err := s.Verify(r.Token); err != nil {
			t.Fatal(err)
		}
		s.SetSkew(time.Hour)
		defer s.SetSkew(0)
		if _, err := s.Verify(r.Token); err == nil || !strings.Contains(err.Error(), "expired") {
			t.Errorf("Verify an hour later on the fake's clock: %v, want expired", err)
		}
	})

	t.Run("concurrent", func(t *testing.T) {
		var wg sync.WaitGroup
		for i := range 4 {
			wg.Go(func() {
				for j := range 20 {
					s.SetSkew(time.Duration(i*j) * time.Millisecond)
				}
			})
			wg.Go(func() { post(t, s, keyAll, `{"company_id":"biz_1"}`) })
		}
		wg.Wait()
		s.SetSkew(0)
	})
}

func TestDateOnEveryResponse(t *testing.T) {
	start := time.Date(2030, 1, 2, 3, 4, 5, 600_000_000, time.UTC)
	s := newServer(t, newClock(start).Now)
	const want = "Wed, 02 Jan 2030 03:04:05 GMT" // whole seconds, as http.TimeFormat
	tests := []struct {
		name  string
		fault *whoptest.Fault
		key   string
		body  string
	}{
		{name: "success", key: keyAll, body: `{"company_id":"biz_1"}`},
		{name: "validation error", key: keyAll, body: `{"company_id":"x"}`},
		{name: "unknown key", key: "sk_nope", body: `{"company_id":"biz_1"}`},
		{name: "injected status", fault: &whoptest.Fault{Status: 503}, key: keyAll},
		{name: "injected body", fault: &whoptest.Fault{Status: 502, Body: "<html></html>", ContentType: "text/html"}, key: keyAll},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.fault != nil {
				s.Enqueue(*tt.fault)
			}
			if got := postRaw(t, s, tt.key, tt.body, nil).Header.Get("Date"); got != want {
				t.Errorf("Date = %q, want %q", got, want)
			}
		})
	}
	base := strings.TrimSuffix(s.URL(), "/api/v1")
	r, err := roundTrip(t, http.MethodGet, base+"/nowhere", nil, "")
	if err != nil || r.Header.Get("Date") != want {
		t.Errorf("404: Date = %q (%v), want %q", r.Header.Get("Date"), err, want)
	}
}

func TestCallAPIVersionDate(t *testing.T) {
	s := newServer(t, nil)
	postRaw(t, s, keyAll, `{"company_id":"biz_1"}`, http.Header{"Api-Version-Date": {"2026-12-01"}})
	postRaw(t, s, keyAll, `{"company_id":"biz_1"}`, nil)
	s.Enqueue(whoptest.Fault{Status: 500})
	postRaw(t, s, keyAll, `{"company_id":"biz_1"}`, http.Header{"Api-Version-Date": {"2025-01-01"}})
	calls := s.Calls()
	if len(calls) != 3 || calls[0].APIVersionDate != "2026-12-01" || calls[1].APIVersionDate != "" || calls[2].APIVersionDate != "2025-01-01" {
		t.Fatalf("calls = %+v, want the header recorded, faults included", calls)
	}
}
