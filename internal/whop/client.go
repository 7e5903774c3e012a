// Package whop is a client for Whop's access-token endpoint, the one upstream
// call tokend makes. The API key it holds must never leak: it is kept out of
// every error, String and %v output, and only a salted fingerprint is exposed.
package whop

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"time"
)

// DefaultBaseURL is Whop's production API root.
const DefaultBaseURL = "https://api.whop.com/api/v1"

const (
	defaultTimeout   = 10 * time.Second
	defaultUserAgent = "tokend/dev"
	// maxBodyBytes bounds what a misbehaving upstream can make us buffer.
	maxBodyBytes = 1 << 20
)

// Request asks Whop to mint an access token for a company, a user, or both.
type Request struct {
	CompanyID string
	UserID    string
	// ScopedActions narrows the token; nil or empty inherits every
	// permission of the API key, so the field is then omitted on the wire.
	ScopedActions []string
	// ExpiresAt of zero lets Whop choose (1h); Whop rejects more than 3h.
	// It is sent in whole seconds, truncated, so never later than asked.
	ExpiresAt time.Time
}

// AccessToken is a minted token and the instant Whop says it stops working,
// on Whop's clock.
type AccessToken struct {
	Token     string
	ExpiresAt time.Time
	// ServerDate is the response's Date header, zero if none: with it a
	// caller can tell how far its clock is from Whop's.
	ServerDate time.Time
}

// Config configures a Client; zero values mean the documented defaults.
type Config struct {
	// BaseURL defaults to DefaultBaseURL; a trailing slash is tolerated.
	BaseURL string
	// APIKey is required. It is sent only in the Authorization header.
	APIKey string
	// HTTPClient defaults to a pooled client that does not follow
	// redirects, so the key is never replayed to another location.
	HTTPClient *http.Client
	// Timeout bounds each request, body read included, through its context
	// so a stuck connection is cut even if HTTPClient has no timeout.
	// Default 10s.
	Timeout time.Duration
	// UserAgent defaults to "tokend/dev"; callers pass "tokend/<version>".
	UserAgent string
	// FingerprintSalt keys KeyFingerprint; may be nil.
	FingerprintSalt []byte
	// APIVersionDate, when set, is sent as Api-Version-Date (YYYY-MM-DD),
	// which pins the API's behaviour as Whop's SDKs do; empty sends none.
	APIVersionDate string
}

// Client calls Whop. It is safe for concurrent use, including SetAPIKey
// while requests are in flight.
type Client struct {
	endpoint  string
	hc        *http.Client
	timeout   time.Duration
	userAgent string
	salt      []byte
	// key is behind a pointer so that printing a Client with %v shows an
	// address, never the key, and reloads swap it atomically.
	key atomic.Pointer[apiKey]
}

// New validates cfg and returns a Client.
func New(cfg Config) (*Client, error) {
	base := cfg.BaseURL
	if base == "" {
		base = DefaultBaseURL
	}
	base = strings.TrimRight(base, "/")
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("new whop client: base url %q: must be an absolute http or https url", cfg.BaseURL)
	}
	if u.User != nil {
		return nil, errors.New("new whop client: base url must not carry credentials")
	}
	if u.Scheme == "http" && !isLoopback(u.Hostname()) {
		return nil, fmt.Errorf("new whop client: base url %q: plain http is allowed only to a loopback address such as 127.0.0.1 or [::1] (the API key would cross the network in clear text); use https", cfg.BaseURL)
	}
	if err := checkKey(cfg.APIKey); err != nil {
		return nil, fmt.Errorf("new whop client: %w", err)
	}
	if cfg.Timeout < 0 {
		return nil, fmt.Errorf("new whop client: timeout %v is negative", cfg.Timeout)
	}
	c := &Client{
		endpoint:  base + "/access_tokens",
		hc:        cfg.HTTPClient,
		timeout:   cfg.Timeout,
		userAgent: cfg.UserAgent,
		salt:      bytes.Clone(cfg.FingerprintSalt),
	}
	if c.hc == nil {
		c.hc = defaultHTTPClient()
	}
	if c.timeout == 0 {
		c.timeout = defaultTimeout
	}
	if c.userAgent == "" {
		c.userAgent = defaultUserAgent
	}
	key := cfg.APIKey
	c.key.Store(c.newKey(key))
	return c, nil
}

func defaultHTTPClient() *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConns = 64
	tr.MaxIdleConnsPerHost = 16
	tr.IdleConnTimeout = 90 * time.Second
	tr.DialContext = (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	return &http.Client{
		Transport: tr,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

// checkKey rejects keys that could not travel in a header; its errors never
// quote the key.
func checkKey(key string) error {
	if key == "" {
		return errors.New("api key is empty")
	}
	for i := 0; i < len(key); i++ {
		if key[i] <= ' ' || key[i] >= 0x7f {
			return errors.New("api key contains whitespace or non-printable characters")
		}
	}
	return nil
}

// SetAPIKey swaps the key used by subsequent requests, for config reloads.
func (c *Client) SetAPIKey(key string) error {
	if err := checkKey(key); err != nil {
		return fmt.Errorf("set whop api key: %w", err)
	}
	c.key.Store(c.newKey(key))
	return nil
}

// apiKey is the key with its fingerprint, computed once per key because the
// cache compares fingerprints on every hit.
type apiKey struct {
	value       string
	fingerprint []byte
}

func (c *Client) newKey(key string) *apiKey {
	return &apiKey{value: key, fingerprint: Fingerprint(c.salt, key)}
}

// KeyFingerprint identifies the current key in logs and metrics without
// revealing it. Callers must not modify the returned slice.
func (c *Client) KeyFingerprint() []byte {
	return c.key.Load().fingerprint
}

// Fingerprint is HMAC-SHA256(salt, key) truncated to 16 bytes: enough to tell
// keys apart, and salted so a fingerprint cannot be checked against guesses
// without the salt.
func Fingerprint(salt []byte, key string) []byte {
	m := hmac.New(sha256.New, salt)
	m.Write([]byte(key))
	return m.Sum(nil)[:16]
}

// SecretExpiresAt is the exp claim of the current secret when it is a JWT,
// as user OAuth tokens are, so status can warn before it runs out; zero
// for API keys. Only the claim leaves this method, never the secret.
func (c *Client) SecretExpiresAt() time.Time {
	parts := strings.Split(c.key.Load().value, ".")
	if len(parts) != 3 {
		return time.Time{}
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return time.Time{}
	}
	var claims struct {
		Exp int64 `json:"exp"`
	}
	if json.Unmarshal(b, &claims) != nil || claims.Exp <= 0 {
		return time.Time{}
	}
	return time.Unix(claims.Exp, 0)
}

// String describes the client without its key.
func (c *Client) String() string {
	return fmt.Sprintf("whop.Client{endpoint: %s, key fingerprint: %x}", c.endpoint, c.KeyFingerprint())
}

// GoString keeps %#v from printing the fields reflectively.
func (c *Client) GoString() string { return c.String() }

type wireRequest struct {
	CompanyID     string   `json:"company_id,omitempty"`
	UserID        string   `json:"user_id,omitempty"`
	ExpiresAt     string   `json:"expires_at,omitempty"`
	ScopedActions []string `json:"scoped_actions,omitempty"`
}

type wireToken struct {
	Token     string `json:"token"`
	ExpiresAt string `json:"expires_at"`
}

type wireError struct {
	Error *struct {
		Type    string `json:"type"`
		Message string `json:"message"`
		Code    string `json:"code"`
		Param   string `json:"param"`
	} `json:"error"`
}

// CreateAccessToken mints a token. Every failure is an *Error; use
// IsRetryable and RetryAfterOf to decide what to do next.
func (c *Client) CreateAccessToken(ctx context.Context, r Request) (AccessToken, error) {
	key := c.key.Load().value
	wr := wireRequest{CompanyID: r.CompanyID, UserID: r.UserID, ScopedActions: r.ScopedActions}
	if !r.ExpiresAt.IsZero() {
		wr.ExpiresAt = r.ExpiresAt.UTC().Format(time.RFC3339)
	}
	body, err := json.Marshal(wr)
	if err != nil {
		return AccessToken{}, &Error{Message: "encode request", Err: err}
	}

	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.endpoint, bytes.NewReader(body))
	if err != nil {
		return AccessToken{}, redact(&Error{Message: "build request", Err: err}, key)
	}
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", c.userAgent)

	resp, err := c.hc.Do(req)
	if err != nil {
		return AccessToken{}, redact(&Error{Err: err}, key)
	}
	defer resp.Body.Close()
	data, readErr := io.ReadAll(io.LimitReader(resp.Body, maxBodyBytes+1))
	// Drain a little so the connection can be reused after small overruns.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))

	if readErr != nil && resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return AccessToken{}, redact(&Error{StatusCode: resp.StatusCode, Message: "read response body", Err: readErr}, key)
	}
	tok, e := parseResponse(resp.StatusCode, resp.Header, data, time.Now())
	if e != nil {
		if readErr != nil {
			e.Err = readErr
		}
		return AccessToken{}, redact(e, key)
	}
	return tok, nil
}

// parseResponse turns a complete upstream answer into a token or an *Error.
// It must not panic on any input: the upstream is outside our control.
func parseResponse(status int, h http.Header, body []byte, now time.Time) (AccessToken, *Error) {
	if status >= 200 && status < 300 {
		if len(body) > maxBodyBytes {
			return AccessToken{}, &Error{StatusCode: status, Message: "response body exceeds 1 MiB"}
		}
		var w wireToken
		if err := json.Unmarshal(body, &w); err != nil {
			return AccessToken{}, &Error{StatusCode: status, Message: "response body is not a valid access token json", Err: err}
		}
		if w.Token == "" {
			return AccessToken{}, &Error{StatusCode: status, Message: "response missing token"}
		}
		if w.ExpiresAt == "" {
			return AccessToken{}, &Error{StatusCode: status, Message: "response missing expires_at"}
		}
		exp, err := time.Parse(time.RFC3339, w.ExpiresAt)
		if err != nil {
			return AccessToken{}, &Error{StatusCode: status, Message: fmt.Sprintf("response expires_at %q is not RFC 3339", truncate(w.ExpiresAt, 64))}
		}
		return AccessToken{Token: w.Token, ExpiresAt: exp}, nil
	}

	e := &Error{StatusCode: status, RetryAfter: parseRetryAfter(h.Get("Retry-After"), now)}
	var w wireError
	if len(body) <= maxBodyBytes && json.Unmarshal(body, &w) == nil && w.Error != nil {
		e.Type, e.Message, e.Code, e.Param = w.Error.Type, w.Error.Message, w.Error.Code, w.Error.Param
	}
	if e.Message == "" {
		e.Message = http.StatusText(status)
	}
	return AccessToken{}, e
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// parseRetryAfter accepts delta-seconds or an HTTP-date (RFC 9110 10.2.3).
// Anything else, or a date in the past, means no hint.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if v[0] >= '0' && v[0] <= '9' {
		var secs int64
		for i := 0; i < len(v); i++ {
			if v[i] < '0' || v[i] > '9' {
				return 0
			}
			secs = secs*10 + int64(v[i]-'0')
			if secs > maxRetryAfterSeconds {
				return time.Duration(maxRetryAfterSeconds) * time.Second
			}
		}
		return time.Duration(secs) * time.Second
	}
	t, err := http.ParseTime(v)
	if err != nil {
		return 0
	}
	if d := t.Sub(now); d > 0 {
		return d
	}
	return 0
}

// isLoopback reports whether host is a loopback IP address. Names are
// refused, even localhost: a resolver may send one elsewhere.
func isLoopback(host string) bool {
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// maxRetryAfterSeconds keeps absurd hints from overflowing time.Duration.
const maxRetryAfterSeconds = int64(1<<63-1) / int64(time.Second)

// redact scrubs key from everything an Error can print, in case the upstream
// or a lower layer echoed it back, whole or in part.
func redact(e *Error, key string) *Error {
	if key == "" {
		return e
	}
	e.Type = scrub(e.Type, key)
	e.Message = scrub(e.Message, key)
	e.Code = scrub(e.Code, key)
	e.Param = scrub(e.Param, key)
	if e.Err != nil {
		msg := e.Err.Error()
		if clean := scrub(msg, key); clean != msg {
			e.Err = &redactedError{msg: clean, cause: e.Err}
		}
	}
	return e
}

// minFragment is the shortest run of the key's characters that scrub
// masks: long enough that ordinary text rarely matches it by chance, short
// enough that a key echoed truncated ("sk_live_abcd...") is still caught.
const minFragment = 8

// scrub masks in s every run of at least minFragment bytes that also
// occurs in key (all of the key if it is shorter). A key echoed in pieces
// shorter than that, split by other characters, is not recognised.
func scrub(s, key string) string {
	n := min(minFragment, len(key))
	if n == 0 || len(s) < n {
		return s
	}
	var b strings.Builder
	last := 0 // s[:last] is written
	for i := 0; i+n <= len(s); {
		if !strings.Contains(key, s[i:i+n]) {
			i++
			continue
		}
		j := i + n
		for j < len(s) && strings.Contains(key, s[i:j+1]) {
			j++
		}
		b.WriteString(s[last:i])
		b.WriteString("[redacted]")
		last, i = j, j
	}
	if last == 0 {
		return s
	}
	b.WriteString(s[last:])
	return b.String()
}

// redactedError hides a cause whose text held the key. It supports errors.Is
// (for context errors) but deliberately not Unwrap, which would hand the
// unredacted chain back to a printer.
type redactedError struct {
	msg   string
	cause error
}

func (r *redactedError) Error() string { return r.msg }

func (r *redactedError) Is(target error) bool { return errors.Is(r.cause, target) }
