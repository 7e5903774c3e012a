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
	// one; Message falls back to the HTTP status text, or says what was
	// wrong with a 2xx body.
	Type, Message, Code, Param string
	// RetryAfter is the upstream's Retry-After hint, 0 if absent or invalid.
	RetryAfter time.Duration
	// Err is the underlying cause for network and decoding errors.
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
		if e.Err != nil {
			b.WriteString(": ")
			b.WriteString(e.Err.Error())
		}
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
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

func (e *Error) Unwrap() error { return e.Err }

// Retryable reports whether the same request may succeed later: transport
// failures, timeouts, throttling and upstream faults (5xx, or a 2xx we could
// not use) are; client errors such as a bad key or a forbidden scope are not.
func (e *Error) Retryable() bool {
	switch c := e.StatusCode; {
	case c == 0:
		return true
	case c >= 200 && c < 300:
		return true
	case c == http.StatusRequestTimeout, c == http.StatusTooManyRequests:
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

// RetryAfterOf returns the upstream's Retry-After hint carried by err, or 0.
func RetryAfterOf(err error) time.Duration {
	var e *Error
	if errors.As(err, &e) {
		return e.RetryAfter
	}
	return 0
}
