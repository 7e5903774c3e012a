package whop

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
	"unicode"
)

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct {
		name string
		in   string
		want time.Duration
	}{
		{"absent", "", 0},
		{"seconds", "2", 2 * time.Second},
		{"zero", "0", 0},
		{"padded", " 7 ", 7 * time.Second},
		{"negative", "-1", 0},
		{"fraction", "1.5", 1500 * time.Millisecond},
		{"small fraction", "0.001", time.Millisecond},
		{"fraction beyond ns truncates", "1.0000000019", time.Second + time.Nanosecond},
		{"bare dot", "1.", 0},
		{"leading dot", ".5", 0},
		{"two dots", "1.5.5", 0},
		{"comma", "1,5", 0},
		{"exponent", "1e3", 0},
		{"plus", "+1", 0},
		{"unit", "1s", 0},
		{"garbage", "soon", 0},
		{"huge clamps", "99999999999999999999999", time.Duration(maxRetryAfterSeconds) * time.Second},
		{"huge fraction clamps", "99999999999999999999999.5", maxWait},
		{"largest whole", "9223372036", maxWait},
		{"fraction past the cap clamps", "9223372036.5", maxWait},
		{"fraction under the cap", "9223372035.5", maxWait - 500*time.Millisecond},
		{"http date", now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
		{"http date past", now.Add(-time.Minute).Format(http.TimeFormat), 0},
		{"rfc850 date", now.Add(time.Hour).Format("Monday, 02-Jan-06 15:04:05 GMT"), time.Hour},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := parseRetryAfter(tt.in, now); got != tt.want {
				t.Errorf("parseRetryAfter(%q) = %v, want %v", tt.in, got, tt.want)
			}
		})
	}
}

func TestWaitHint(t *testing.T) {
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct {
		name     string
		ms, secs string
		want     time.Duration
		from     string
	}{
		{name: "none", want: 0, from: ""},
		{name: "ms", ms: "1500", want: 1500 * time.Millisecond, from: "retry-after-ms"},
		{name: "fractional ms", ms: "250.5", want: 250*time.Millisecond + 500*time.Microsecond, from: "retry-after-ms"},
		{name: "ms wins", ms: "100", secs: "5", want: 100 * time.Millisecond, from: "retry-after-ms"},
		{name: "garbage ms falls back", ms: "soon", secs: "5", want: 5 * time.Second, from: "retry-after"},
		{name: "negative ms falls back", ms: "-100", secs: "1.5", want: 1500 * time.Millisecond, from: "retry-after"},
		{name: "zero ms falls back", ms: "0", secs: "2", want: 2 * time.Second, from: "retry-after"},
		{name: "seconds", secs: "2", want: 2 * time.Second, from: "retry-after"},
		{name: "date", secs: now.Add(time.Minute).Format(http.TimeFormat), want: time.Minute, from: "retry-after"},
		{name: "zero seconds is no hint", secs: "0", want: 0, from: ""},
		{name: "both garbage", ms: "x", secs: "y", want: 0, from: ""},
		{name: "huge ms clamps", ms: "1" + strings.Repeat("0", 30), want: maxWait, from: "retry-after-ms"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := http.Header{}
			if tt.ms != "" {
				h.Set("retry-after-ms", tt.ms)
			}
			if tt.secs != "" {
				h.Set("Retry-After", tt.secs)
			}
			if d, from := waitHint(h, now); d != tt.want || from != tt.from {
				t.Errorf("waitHint = %v, %q; want %v, %q", d, from, tt.want, tt.from)
			}
		})
	}
}

func TestParseResponseHeaders(t *testing.T) {
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	date := now.Add(-time.Hour) // the server's clock an hour behind ours
	yes, no := true, false
	tests := []struct {
		name       string
		status     int
		header     http.Header
		should     *bool
		retryable  bool
		serverDate time.Time
		retryAfter time.Duration
	}{
		{name: "x-should-retry true", status: 400, header: http.Header{"X-Should-Retry": {"true"}}, should: &yes, retryable: true},
		{name: "x-should-retry TRUE", status: 400, header: http.Header{"X-Should-Retry": {"TRUE"}}, should: &yes, retryable: true},
		{name: "x-should-retry false", status: 503, header: http.Header{"X-Should-Retry": {"False"}}, should: &no, retryable: false},
		{name: "x-should-retry other", status: 503, header: http.Header{"X-Should-Retry": {"1"}}, should: nil, retryable: true},
		{name: "x-should-retry absent", status: 400, header: http.Header{}, should: nil, retryable: false},
		{name: "ignored on a 2xx", status: 200, header: http.Header{"X-Should-Retry": {"false"}, "Retry-After": {"5"}}, retryable: true},
		{name: "date", status: 500, header: http.Header{"Date": {date.Format(http.TimeFormat)}}, retryable: true, serverDate: date},
		{name: "date on a 2xx", status: 200, header: http.Header{"Date": {date.Format(http.TimeFormat)}}, retryable: true, serverDate: date},
		{name: "invalid date", status: 500, header: http.Header{"Date": {"yesterday"}}, retryable: true},
		{
			name:   "http-date hint measured from the server's date",
			status: 503, retryable: true, serverDate: date, retryAfter: 30 * time.Second,
			header: http.Header{"Date": {date.Format(http.TimeFormat)}, "Retry-After": {date.Add(30 * time.Second).Format(http.TimeFormat)}},
		},
		{name: "retry-after on a 503", status: 503, header: http.Header{"Retry-After": {"3"}}, retryable: true, retryAfter: 3 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, e := parseResponse(tt.status, tt.header, []byte(`{"token":""}`), now)
			if e == nil {
				t.Fatal("no error")
			}
			if (e.ShouldRetry == nil) != (tt.should == nil) || e.ShouldRetry != nil && *e.ShouldRetry != *tt.should {
				t.Errorf("ShouldRetry = %v, want %v", e.ShouldRetry, tt.should)
			}
			if e.Retryable() != tt.retryable || !e.ServerDate.Equal(tt.serverDate) || e.RetryAfter != tt.retryAfter {
				t.Errorf("got retryable %v ServerDate %v RetryAfter %v; want %v %v %v",
					e.Retryable(), e.ServerDate, e.RetryAfter, tt.retryable, tt.serverDate, tt.retryAfter)
			}
		})
	}
	tok, e := parseResponse(200, http.Header{"Date": {date.Format(http.TimeFormat)}}, []byte(`{"token":"e30.e30.c2ln","expires_at":"2030-01-02T03:04:05Z"}`), now)
	if e != nil || !tok.ServerDate.Equal(date) {
		t.Errorf("success ServerDate = %v (%v), want %v", tok.ServerDate, e, date)
	}
	if tok, _ := parseResponse(200, http.Header{}, []byte(`{"token":"e30.e30.c2ln","expires_at":"2030-01-02T03:04:05Z"}`), now); !tok.ServerDate.IsZero() {
		t.Errorf("ServerDate without a Date header = %v, want zero", tok.ServerDate)
	}
}

// rfc3339Base is the instant most of ExpiresAtCases name.
var rfc3339Base = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// ExpiresAtCases are expires_at strings and the instant each means, zero
// for one to refuse. TestExpiresAtForms (package whop_test) sends them
// through the fake too.
var ExpiresAtCases = []struct {
	In   string
	Want time.Time
}{
	{"2030-01-02T03:04:05Z", rfc3339Base},
	{"2030-01-02t03:04:05z", rfc3339Base},
	{"2030-01-02T03:04:05z", rfc3339Base},
	{"2030-01-02t03:04:05Z", rfc3339Base},
	{"2030-01-02T03:04:05.401Z", rfc3339Base.Add(401 * time.Millisecond)},
	{"2030-01-02T03:04:05.4Z", rfc3339Base.Add(400 * time.Millisecond)},
	{"2030-01-02T03:04:05.123456789Z", rfc3339Base.Add(123456789)},
	{"2030-01-02T03:04:05.1234567891234567Z", rfc3339Base.Add(123456789)},
	{"2030-01-02T05:04:05+02:00", rfc3339Base},
	{"2030-01-01T21:34:05-05:30", rfc3339Base},
	{"2030-01-02T03:04:05-00:00", rfc3339Base},
	{"2030-01-02T05:04:05.5+02:00", rfc3339Base.Add(500 * time.Millisecond)},
	{"2030-01-02T03:04:05.000000000000Z", rfc3339Base},
	{"2030-06-30T23:59:60Z", time.Date(2030, 7, 1, 0, 0, 0, 0, time.UTC)},
	{"2030-01-02 03:04:05Z", time.Time{}},
	{"2030-01-02T03:04:05", time.Time{}},
	{"2030-01-02T03:04:05+0200", time.Time{}},
	{"2030-01-02T03:04:05+02", time.Time{}},
	{"2030-01-02T03:04:05.Z", time.Time{}},
	{"2030-01-02T03:04:05,5Z", time.Time{}},
	{"2030-01-02T3:04:05Z", time.Time{}},
	{"2030-1-02T03:04:05Z", time.Time{}},
	{"2030-01-02T24:00:00Z", time.Time{}},
	{"2030-01-02T03:04:61Z", time.Time{}},
	{"2030-02-30T03:04:05Z", time.Time{}},
	{"2030-01-02T03:04:05+24:00", time.Time{}},
	{"2030-01-02T03:04:05+23:60", time.Time{}},
	{"2030-01-02T03:04:05Zjunk", time.Time{}},
	{"2030-01-02T03:04:05Z ", time.Time{}},
	{"+2030-01-02T03:04:05Z", time.Time{}},
	{"1893553445", time.Time{}},
	{"tomorrow", time.Time{}},
}

func TestParseRFC3339(t *testing.T) {
	for _, tt := range ExpiresAtCases {
		got, ok := parseRFC3339(tt.In)
		if ok != !tt.Want.IsZero() || !got.Equal(tt.Want) {
			t.Errorf("parseRFC3339(%q) = %v, %v; want %v", tt.In, got, ok, tt.Want)
		}
	}
}

func TestClean(t *testing.T) {
	tests := []struct {
		in   string
		n    int
		want string
	}{
		{"plain", 512, "plain"},
		{"  line one\n\tline two\r\n ", 512, "line one line two"},
		{"bell\x07 and del\x7f and nul\x00", 512, "bell and del and nul"},
		{"c1\u0085 and ls\u2028ps\u2029", 512, "c1 and ls ps"},
		{"bad utf-8 \xff", 512, "bad utf-8 \ufffd"},
		{strings.Repeat("a", 600), 512, strings.Repeat("a", 509) + "..."},
		{"ééé", 6, "ééé"},
		{"éééé", 6, "é..."}, // not cut inside a rune
	}
	for _, tt := range tests {
		got := clean(tt.in, tt.n)
		if got != tt.want || len(got) > tt.n {
			t.Errorf("clean(%q, %d) = %q, want %q", tt.in, tt.n, got, tt.want)
		}
	}
}

func TestParseResponse(t *testing.T) {
	tests := []struct {
		name      string
		status    int
		body      string
		wantErr   bool
		retryable bool
		message   string
		param     string
		code      string
		typ       string
		notIn     string // must not be in Message
	}{
		{name: "ok", status: 200, body: `{"token":"e30.e30.c2ln","expires_at":"2030-01-02T03:04:05.401Z"}`},
		{name: "ok 201", status: 201, body: `{"token":"e30.e30.c2ln","expires_at":"2030-01-02T03:04:05Z"}`},
		{name: "2xx not json", status: 200, body: `<html>`, wantErr: true, retryable: true, message: "not a valid"},
		{name: "2xx no token", status: 200, body: `{"expires_at":"2030-01-02T03:04:05Z"}`, wantErr: true, retryable: true, message: "missing token"},
		{name: "2xx no expiry", status: 200, body: `{"token":"e30.e30.c2ln"}`, wantErr: true, retryable: true, message: "missing expires_at"},
		{name: "2xx token with a newline", status: 200, body: `{"token":"e30.e30\nX-Evil: 1.c2ln","expires_at":"2030-01-02T03:04:05Z"}`, wantErr: true, retryable: true, message: "byte 0x0a at offset 7 is not base64url", notIn: "Evil"},
		{name: "2xx token with a NUL", status: 200, body: `{"token":"e30.e30.c2ln\u0000","expires_at":"2030-01-02T03:04:05Z"}`, wantErr: true, retryable: true, message: "byte 0x00 at offset 12"},
		{name: "2xx token not a JWT", status: 200, body: `{"token":"opaque-token","expires_at":"2030-01-02T03:04:05Z"}`, wantErr: true, retryable: true, message: "1 segments, want 3"},
		{name: "2xx token with an empty segment", status: 200, body: `{"token":"e30..c2ln","expires_at":"2030-01-02T03:04:05Z"}`, wantErr: true, retryable: true, message: "an empty segment"},
		{name: "2xx token with an empty signature", status: 200, body: `{"token":"e30.e30.","expires_at":"2030-01-02T03:04:05Z"}`, wantErr: true, retryable: true, message: "want 3 non-empty"},
		{name: "2xx token of 9 KiB", status: 200, body: `{"token":"e30.e30.` + strings.Repeat("A", 9<<10) + `","expires_at":"2030-01-02T03:04:05Z"}`, wantErr: true, retryable: true, message: "more than the 8192", notIn: "AAAA"},
		{name: "2xx bad expiry", status: 200, body: `{"token":"e30.e30.c2ln","expires_at":"tomorrow"}`, wantErr: true, retryable: true, message: "not RFC 3339"},
		{name: "400 whop body", status: 400, body: `{"error":{"type":"invalid_request_error","code":"parameter_invalid","message":"Bad id","param":"user_id"}}`, wantErr: true, message: "Bad id", param: "user_id", code: "parameter_invalid", typ: "invalid_request_error"},
		{name: "ok lower case and offset", status: 200, body: `{"token":"e30.e30.c2ln","expires_at":"2030-01-02t05:04:05.123456789123+02:00"}`},
		{name: "2xx expiry without offset", status: 200, body: `{"token":"e30.e30.c2ln","expires_at":"2030-01-02T03:04:05"}`, wantErr: true, retryable: true, message: `"2030-01-02T03:04:05" is not RFC 3339`},
		{name: "2xx expiry a number", status: 200, body: `{"token":"e30.e30.c2ln","expires_at":1893553445}`, wantErr: true, retryable: true, message: "not a valid access token json"},
		{name: "422 null error", status: 422, body: `{"error":null}`, wantErr: true, message: "Verification required"},
		{name: "422 empty", status: 422, body: ``, wantErr: true, message: "Verification required"},
		{name: "422 with a message", status: 422, body: `{"error":{"type":"verification_required","message":"Finish KYC first"}}`, wantErr: true, message: "Finish KYC first", typ: "verification_required"},
		{name: "502 html", status: 502, body: `<html>bad gateway</html>`, wantErr: true, retryable: true, message: "Bad Gateway", notIn: "<"},
		{name: "503 html page", status: 503, body: "<!DOCTYPE html>\n<html><head><title>503</title></head><body>down</body></html>", wantErr: true, retryable: true, message: "Service Unavailable", notIn: "html"},
		{name: "429 empty", status: 429, body: ``, wantErr: true, retryable: true, message: "Too Many Requests"},
		{name: "429 top-level message", status: 429, body: `{"message": "You are being rate limited"}`, wantErr: true, retryable: true, message: "You are being rate limited"},
		{name: "error string", status: 500, body: `{"error": "some string"}`, wantErr: true, retryable: true, message: "some string"},
		{name: "error null with message", status: 403, body: `{"error": null, "message": "nope"}`, wantErr: true, message: "nope"},
		{name: "error object without message uses top-level", status: 403, body: `{"error": {"type": "forbidden"}, "message": "nope"}`, wantErr: true, message: "nope", typ: "forbidden"},
		{name: "numeric code", status: 400, body: `{"error": {"code": 42, "message": "Bad thing", "param": "user_id"}}`, wantErr: true, message: "Bad thing", code: "42", param: "user_id"},
		{name: "float code", status: 400, body: `{"error": {"code": -1.5e3, "message": "Bad thing"}}`, wantErr: true, message: "Bad thing", code: "-1.5e3"},
		{name: "object code ignored", status: 400, body: `{"error": {"code": {"a": 1}, "message": "Bad thing", "type": true}}`, wantErr: true, message: "Bad thing"},
		{name: "null code", status: 400, body: `{"error": {"code": null, "param": null, "message": "Bad thing"}}`, wantErr: true, message: "Bad thing"},
		{name: "error a number falls back", status: 500, body: `{"error": 7}`, wantErr: true, retryable: true, message: "Internal Server Error"},
		{name: "error an array falls back", status: 500, body: `{"error": ["x"]}`, wantErr: true, retryable: true, message: "Internal Server Error"},
		{name: "top-level array falls back", status: 500, body: `["x"]`, wantErr: true, retryable: true, message: "Internal Server Error"},
		{name: "control characters stripped", status: 400, body: `{"error": {"message": "line1\nline2\u0000\u001b[31m"}}`, wantErr: true, message: "line1 line2 [31m", notIn: "\n"},
		{name: "long message cut", status: 400, body: `{"error": {"message": "` + strings.Repeat("x", 4000) + `"}}`, wantErr: true, message: strings.Repeat("x", 509) + "...", notIn: strings.Repeat("x", 510)},
		{name: "unknown status", status: 599, body: ``, wantErr: true, retryable: true, message: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tok, e := parseResponse(tt.status, http.Header{}, []byte(tt.body), time.Now())
			if !tt.wantErr {
				if e != nil || tok.Token != "e30.e30.c2ln" || tok.ExpiresAt.IsZero() {
					t.Fatalf("got %+v, %v", tok, e)
				}
				return
			}
			if e == nil {
				t.Fatalf("no error for %s", tt.body)
			}
			if e.StatusCode != tt.status || e.Retryable() != tt.retryable || e.Param != tt.param || !strings.Contains(e.Message, tt.message) ||
				e.Code != tt.code || e.Type != tt.typ {
				t.Errorf("got %+v (retryable %v), want status %d retryable %v message ~%q param %q code %q type %q",
					e, e.Retryable(), tt.status, tt.retryable, tt.message, tt.param, tt.code, tt.typ)
			}
			if tt.notIn != "" && strings.Contains(e.Message, tt.notIn) {
				t.Errorf("Message %q contains %q", e.Message, tt.notIn)
			}
			if len(e.Message) > maxMessageBytes {
				t.Errorf("Message is %d bytes, over %d", len(e.Message), maxMessageBytes)
			}
		})
	}
}

func TestRedact(t *testing.T) {
	const key = "sk_live_SECRET123"
	cause := fmt.Errorf("echo %s: %w", key, context.DeadlineExceeded)
	e := redact(&Error{StatusCode: 400, Type: key, Message: "bad key " + key, Code: key, Param: key, Err: cause}, key)
	if s := fmt.Sprintf("%v %+v %#v", e, e, e); strings.Contains(s, key) {
		t.Fatalf("key survived redaction: %s", s)
	}
	if errors.Unwrap(e) != nil && strings.Contains(fmt.Sprint(errors.Unwrap(errors.Unwrap(e))), key) {
		t.Fatal("unwrap chain exposes the key")
	}
	if !errors.Is(e, context.DeadlineExceeded) {
		t.Error("redaction lost errors.Is on the cause")
	}
}

func TestScrub(t *testing.T) {
	const key = "whop_k3y_AbCdEfGhIjKlMnOp"
	tests := []struct{ in, want string }{
		{"bad key " + key + " given", "bad key [redacted] given"},
		{"key whop_k3y_AbCd... is invalid", "key [redacted]... is invalid"},
		{"tail ...GhIjKlMnOp rejected", "tail ...[redacted] rejected"},
		{"twice " + key[:10] + "," + key[5:], "twice [redacted],[redacted]"},
		{"short whop_k3 fragment kept", "short whop_k3 fragment kept"},
		{"nothing here", "nothing here"},
		{"", ""},
	}
	for _, tt := range tests {
		if got := scrub(tt.in, key); got != tt.want {
			t.Errorf("scrub(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
	if got := scrub("k=abc, ab", "abc"); got != "k=[redacted], ab" {
		t.Errorf("a key shorter than the fragment length: %q", got)
	}
	if got := scrub("anything", ""); got != "anything" {
		t.Errorf("empty key: %q", got)
	}
}

// FuzzParseError feeds arbitrary upstream answers to the decoder: it must
// never panic, must return either a token or an *Error, a 2xx it cannot use
// is always retryable, the wait hint names its header, and the message is
// bounded, free of control characters and, for a body that is not JSON,
// only the fallback.
func FuzzParseError(f *testing.F) {
	f.Add(200, "", "", "", `{"token":"e30.e30.c2ln","expires_at":"2030-01-02T03:04:05.401Z"}`)
	f.Add(200, "", "", "", `{"token":"e30.e30.c2ln","expires_at":"2030-01-02t03:04:05.1234567891z"}`)
	f.Add(200, "", "", "false", `{"token":"","expires_at":null}`)
	f.Add(400, "", "", "", `{"error":{"type":"invalid_request_error","message":"x","code":"parameter_missing","param":"company_id"}}`)
	f.Add(400, "", "", "true", `{"error":{"code":42,"message":"x\ny"}}`)
	f.Add(429, "2", "", "", `{"error":{"type":"rate_limited","message":"slow down"}}`)
	f.Add(429, "1.5", "250.5", "", `{"message": "You are being rate limited"}`)
	f.Add(503, "Wed, 21 Oct 2015 07:28:00 GMT", "-1", "TRUE", `<html>`)
	f.Add(422, "", "", "", `{"error":null}`)
	f.Add(500, "", "", "", `{"error":"some string"}`)
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	f.Fuzz(func(t *testing.T, status int, retryAfter, retryAfterMs, shouldRetry, body string) {
		h := http.Header{}
		h.Set("Retry-After", retryAfter)
		h.Set("Retry-After-Ms", retryAfterMs)
		h.Set("X-Should-Retry", shouldRetry)
		tok, e := parseResponse(status, h, []byte(body), now)
		if e == nil {
			if status < 200 || status > 299 || tok.Token == "" || tok.ExpiresAt.IsZero() {
				t.Fatalf("status %d accepted as token %+v", status, tok)
			}
			return
		}
		if e.StatusCode != status || e.Message == "" && fallbackMessage(status) != "" || e.RetryAfter < 0 {
			t.Fatalf("status %d: bad error %+v", status, e)
		}
		if status >= 200 && status < 300 && !e.Retryable() {
			t.Fatalf("unusable 2xx not retryable: %+v", e)
		}
		switch {
		case e.RetryAfter == 0 && e.RetryAfterFrom != "",
			e.RetryAfter > 0 && e.RetryAfterFrom != "retry-after-ms" && e.RetryAfterFrom != "retry-after":
			t.Fatalf("RetryAfter %v from %q", e.RetryAfter, e.RetryAfterFrom)
		}
		if status < 200 || status > 299 {
			if len(e.Message) > maxMessageBytes || strings.IndexFunc(e.Message, unicode.IsControl) >= 0 {
				t.Fatalf("message not cleaned: %q", e.Message)
			}
			if !json.Valid([]byte(body)) && e.Message != fallbackMessage(status) {
				t.Fatalf("message %q from a body that is not JSON", e.Message)
			}
		}
		_ = e.Error()
	})
}

// FuzzParseRFC3339 checks that what parseRFC3339 accepts is one instant
// whatever the case of T and Z, and survives a round trip through Go's own
// RFC 3339 formatting.
func FuzzParseRFC3339(f *testing.F) {
	for _, s := range []string{
		"2030-01-02T03:04:05Z", "2030-01-02t03:04:05.401z", "2030-01-02T03:04:05.1234567891234+02:00",
		"2030-06-30T23:59:60-05:30", "2030-01-02T03:04:05,5Z", "2030-01-02T03:04:05+24:00", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, ok := parseRFC3339(s)
		if !ok {
			return
		}
		if up, ok := parseRFC3339(strings.ToUpper(s)); !ok || !up.Equal(got) {
			t.Fatalf("%q accepted as %v, upper case as %v, %v", s, got, up, ok)
		}
		back, ok := parseRFC3339(got.Format(time.RFC3339Nano))
		if !ok || !back.Equal(got) {
			t.Fatalf("%q = %v does not round-trip: %v, %v", s, got, back, ok)
		}
	})
}
