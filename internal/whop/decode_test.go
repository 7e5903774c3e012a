package whop

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
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
		{"fraction", "1.5", 0},
		{"garbage", "soon", 0},
		{"huge clamps", "99999999999999999999999", time.Duration(maxRetryAfterSeconds) * time.Second},
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

func TestParseResponse(t *testing.T) {
	tests := []struct {
		name      string
		status    int
		body      string
		wantErr   bool
		retryable bool
		message   string
		param     string
	}{
		{name: "ok", status: 200, body: `{"token":"t","expires_at":"2030-01-02T03:04:05.401Z"}`},
		{name: "ok 201", status: 201, body: `{"token":"t","expires_at":"2030-01-02T03:04:05Z"}`},
		{name: "2xx not json", status: 200, body: `<html>`, wantErr: true, retryable: true, message: "not a valid"},
		{name: "2xx no token", status: 200, body: `{"expires_at":"2030-01-02T03:04:05Z"}`, wantErr: true, retryable: true, message: "missing token"},
		{name: "2xx no expiry", status: 200, body: `{"token":"t"}`, wantErr: true, retryable: true, message: "missing expires_at"},
		{name: "2xx bad expiry", status: 200, body: `{"token":"t","expires_at":"tomorrow"}`, wantErr: true, retryable: true, message: "not RFC 3339"},
		{name: "400 whop body", status: 400, body: `{"error":{"type":"invalid_request_error","code":"parameter_invalid","message":"Bad id","param":"user_id"}}`, wantErr: true, message: "Bad id", param: "user_id"},
		{name: "422 null error", status: 422, body: `{"error":null}`, wantErr: true, message: "Unprocessable Entity"},
		{name: "502 html", status: 502, body: `<html>bad gateway</html>`, wantErr: true, retryable: true, message: "Bad Gateway"},
		{name: "429 empty", status: 429, body: ``, wantErr: true, retryable: true, message: "Too Many Requests"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tok, e := parseResponse(tt.status, http.Header{}, []byte(tt.body), time.Now())
			if !tt.wantErr {
				if e != nil || tok.Token != "t" || tok.ExpiresAt.IsZero() {
					t.Fatalf("got %+v, %v", tok, e)
				}
				return
			}
			if e == nil {
				t.Fatalf("no error for %s", tt.body)
			}
			if e.StatusCode != tt.status || e.Retryable() != tt.retryable || e.Param != tt.param || !strings.Contains(e.Message, tt.message) {
				t.Errorf("got %+v (retryable %v), want status %d retryable %v message ~%q param %q",
					e, e.Retryable(), tt.status, tt.retryable, tt.message, tt.param)
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
// never panic, must return either a token or an *Error, and a 2xx it cannot
// use is always retryable.
func FuzzParseError(f *testing.F) {
	f.Add(200, "", `{"token":"t","expires_at":"2030-01-02T03:04:05.401Z"}`)
	f.Add(200, "", `{"token":"","expires_at":null}`)
	f.Add(400, "", `{"error":{"type":"invalid_request_error","message":"x","code":"parameter_missing","param":"company_id"}}`)
	f.Add(429, "2", `{"error":{"type":"rate_limited","message":"slow down"}}`)
	f.Add(503, "Wed, 21 Oct 2015 07:28:00 GMT", `<html>`)
	f.Add(422, "", `{"error":null}`)
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	f.Fuzz(func(t *testing.T, status int, retryAfter, body string) {
		h := http.Header{}
		h.Set("Retry-After", retryAfter)
		tok, e := parseResponse(status, h, []byte(body), now)
		if e == nil {
			if status < 200 || status > 299 || tok.Token == "" || tok.ExpiresAt.IsZero() {
				t.Fatalf("status %d accepted as token %+v", status, tok)
			}
			return
		}
		if e.StatusCode != status || e.Message == "" && http.StatusText(status) != "" || e.RetryAfter < 0 {
			t.Fatalf("status %d: bad error %+v", status, e)
		}
		if status >= 200 && status < 300 && !e.Retryable() {
			t.Fatalf("unusable 2xx not retryable: %+v", e)
		}
		_ = e.Error()
	})
}
