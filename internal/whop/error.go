package whop

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Error is every failure CreateAccessToken returns, network errors included,
// so callers can classify with one errors.As. None of its fields ever holds
// the API key.
type Error struct {
	// StatusCode is 0 when no response arrived (network error, timeout).
	StatusCode int
	// Type, Message, Code and Param come from Whop's error body when it had
	// one, stripped of control characters and bounded in length; Message
	// falls back to the HTTP status text ("Verification required" for 422,
	// the reference's words), or says what was wrong with a 2xx body or
	// that our timeout ran out.
	Type, Message, Code, Param string
	// RetryAfter is the upstream's wait hint, 0 if absent or invalid: the
	// retry-after-ms header if present, else Retry-After (seconds, possibly
	// fractional, or an HTTP-date, counted from the response's Date).
	// RetryAfterFrom names the header used, "retry-after-ms" or
	// "retry-after", and is "" when RetryAfter is 0.
	RetryAfter     time.Duration
	RetryAfterFrom string
	// ShouldRetry is Whop's x-should-retry header, which overrides the
	// status either way (as Whop's SDKs honour it); nil when absent.
	ShouldRetry *bool
	// ServerDate is the response's Date header, zero if none arrived.
	ServerDate time.Time
	// Err is the underlying cause for network and decoding errors; it
	// matches ErrTimeout when a timeout of this client, not the caller's
	// context, ran out.
	Err error
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("whop: create access token: ")
	if e.StatusCode == 0 {
		b.WriteString("request failed")
		if e.Message != "" {
			b.WriteString(": ")
			b.WriteString(e.Message)
		}
		e.writeCause(&b)
		return b.String()
	}
	b.WriteString(strconv.Itoa(e.StatusCode))
	if text := http.StatusText(e.StatusCode); text != "" {
		b.WriteByte(' ')
		b.WriteString(strings.ToLower(text))
	}
	if e.Message != "" {
		b.WriteString(": ")
		b.WriteString(e.Message)
	}
	if e.Param != "" {
		b.WriteString(" (param ")
		b.WriteString(e.Param)
		b.WriteByte(')')
	}
	e.writeCause(&b)
	return b.String()
}

// writeCause appends Err, except ErrTimeout, which Message already says in
// more detail (how long).
func (e *Error) writeCause(b *strings.Builder) {
	if e.Err != nil && e.Err != ErrTimeout {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
}

func (e *Error) Unwrap() error { return e.Err }

// Retryable reports whether the same request may succeed later: transport
// failures, timeouts, throttling, conflicts and upstream faults (5xx, or a
// 2xx we could not use) are, as in Whop's SDKs; client errors such as a bad
// key or a forbidden scope are not. x-should-retry overrides the status.
func (e *Error) Retryable() bool {
	if e.ShouldRetry != nil {
		return *e.ShouldRetry
	}
	switch c := e.StatusCode; {
	case c == 0:
		return true
	case c >= 200 && c < 300:
		return true
	case c == http.StatusRequestTimeout, c == http.StatusConflict, c == http.StatusTooManyRequests:
		return true
	case c >= 500:
		return true
	default:
		return false
	}
}

// IsRetryable classifies any error from this package. A cancelled context is
// the caller giving up, never worth retrying; errors of unknown origin are
// presumed transient.
func IsRetryable(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, context.Canceled) {
		return false
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Retryable()
	}
	return true
}

// ExpiresAtRefused reports a 400 about expires_at: Whop judged the asked
// lifetime out of range by its own clock.
func (e *Error) ExpiresAtRefused() bool {
	return e.StatusCode == http.StatusBadRequest &&
		(e.Param == "expires_at" || strings.Contains(e.Message, "expires_at"))
}

// RetryAfterOf returns the upstream's Retry-After hint carried by err, or 0.
func RetryAfterOf(err error) time.Duration {
	var e *Error
	if errors.As(err, &e) {
		return e.RetryAfter
	}
	return 0
}

// StatusOf returns the HTTP status of Whop's answer carried by err, or 0.
func StatusOf(err error) int {
	var e *Error
	if errors.As(err, &e) {
		return e.StatusCode
	}
	return 0
}
