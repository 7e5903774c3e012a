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

func do(t *testing.T, method, url, auth, body string) (response, error) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return response{}, err
	}
	defer resp.Body.Close()
	var r response
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatalf("response %d is not json: %q", resp.StatusCode, b)
	}
	r.Status = resp.StatusCode
	r.RetryAfter = resp.Header.Get("Retry-After")
	return r, nil
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
