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
	"unicode"
	"unicode/utf8"
)

// DefaultBaseURL is Whop's production API root.
const DefaultBaseURL = "https://api.whop.com/api/v1"

const (
	defaultTimeout   = 10 * time.Second
	defaultUserAgent = "tokend/dev"
	// maxBodyBytes bounds what a misbehaving upstream can make us buffer.
	maxBodyBytes = 1 << 20
	// maxMessageBytes and maxFieldBytes bound upstream text in an Error,
	// which ends up in logs and in answers to local callers.
	maxMessageBytes = 512
	maxFieldBytes   = 128
)

// NewestAPIVersionDate is the newest Api-Version-Date this build was written
// and tested against. Whop pins behaviour by that header, and a later date
// may change the contract (newer SDKs speak of account_id where the
// reference speaks of company_id), so New refuses a later date rather than
// misreading the answers.
const NewestAPIVersionDate = "2026-12-01"

// ErrTimeout is the cause of an *Error when a timeout of this client, not
// the caller's context, ended the request. It deliberately does not match
// context.DeadlineExceeded: the caller still has time, and may retry.
var ErrTimeout = errors.New("whop: request timed out")

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
	// Default 10s. Its expiry is reported as ErrTimeout, never as the
	// caller's context.DeadlineExceeded.
	Timeout time.Duration
	// UserAgent defaults to "tokend/dev"; callers pass "tokend/<version>".
	UserAgent string
	// FingerprintSalt keys KeyFingerprint; may be nil.
	FingerprintSalt []byte
	// APIVersionDate, when set, is sent as Api-Version-Date (YYYY-MM-DD),
	// which pins the API's behaviour as Whop's SDKs do; empty sends none.
	// See ValidateAPIVersionDate.
	APIVersionDate string
}

// ValidateAPIVersionDate checks a Config.APIVersionDate: empty, or a real
// calendar date YYYY-MM-DD no later than NewestAPIVersionDate. The daemon's
// config validation calls it too, so a bad value fails at load time.
func ValidateAPIVersionDate(v string) error {
	if v == "" {
		return nil
	}
	if _, err := time.Parse(time.DateOnly, v); err != nil {
		return fmt.Errorf("api version date %q: want a calendar date YYYY-MM-DD", truncate(v, 32))
	}
	// Both are YYYY-MM-DD, so text order is date order.
	if v > NewestAPIVersionDate {
		return fmt.Errorf("api version date %q: later than %s, the newest Whop API version this tokend understands", v, NewestAPIVersionDate)
	}
	return nil
}

// Client calls Whop. It is safe for concurrent use, including SetAPIKey
// while requests are in flight.
type Client struct {
	endpoint  string
	hc        *http.Client
	timeout   time.Duration
	userAgent string
	// version is the Api-Version-Date, "" for none; a reload of the
	// configuration file may change it under in-flight requests.
	version atomic.Pointer[string]
	salt    []byte
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
	if err := ValidateAPIVersionDate(cfg.APIVersionDate); err != nil {
		return nil, fmt.Errorf("new whop client: %w", err)
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
	version := cfg.APIVersionDate
	c.version.Store(&version)
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

// SetAPIVersionDate changes the Api-Version-Date of subsequent requests
// ("" sends none), for config reloads. See ValidateAPIVersionDate.
func (c *Client) SetAPIVersionDate(v string) error {
	if err := ValidateAPIVersionDate(v); err != nil {
		return err
	}
	c.version.Store(&v)
	return nil
}

// APIVersionDate is the Api-Version-Date sent, "" for none.
func (c *Client) APIVersionDate() string { return *c.version.Load() }

// apiKey is the key with its fingerprint, computed once per key because the
// cache compares fingerprints on every hit.
type apiKey struct {
	value       string
	fingerprint []byte
}

func (c *Client) newKey(key string) *apiKey {
	return &apiKey{value: key, fingerprint: Fingerprint(c.salt, key)}
}

// FingerprintWith is the current key's fingerprint under another salt:
// hosts of a fleet fingerprint with the fleet's salt, so that the same key
// has the same fingerprint on every host (KeyFingerprint's salt is the
// host's own).
func (c *Client) FingerprintWith(salt []byte) []byte {
	return Fingerprint(salt, c.key.Load().value)
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

// wireError holds every error body shape Whop is known to send: the
// reference's {"error": {...}}, {"error": "text"}, {"error": null} (its 422)
// and the rate limit's top-level {"message": "..."}. Fields stay raw so that
// one of an unexpected type, such as a numeric code, cannot lose the rest.
type wireError struct {
	Error   json.RawMessage `json:"error"`
	Message json.RawMessage `json:"message"`
}

type wireErrorObject struct {
	Type    json.RawMessage `json:"type"`
	Message json.RawMessage `json:"message"`
	Code    json.RawMessage `json:"code"`
	Param   json.RawMessage `json:"param"`
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

	parent := ctx
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
	if v := c.APIVersionDate(); v != "" {
		req.Header.Set("Api-Version-Date", v)
	}

	resp, err := c.hc.Do(req)
	if err != nil {
		return AccessToken{}, redact(c.failed(parent, ctx, &Error{}, err), key)
	}
	defer resp.Body.Close()
	data, readErr := io.ReadAll(io.LimitReader(resp.Body, maxBodyBytes+1))
	// Drain a little so the connection can be reused after small overruns.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))

	if readErr != nil && resp.StatusCode >= 200 && resp.StatusCode < 300 {
		e := &Error{StatusCode: resp.StatusCode, Message: "read response body", ServerDate: serverDate(resp.Header)}
		return AccessToken{}, redact(c.failed(parent, ctx, e, readErr), key)
	}
	tok, e := parseResponse(resp.StatusCode, resp.Header, data, time.Now())
	if e != nil {
		if readErr != nil {
			e = c.failed(parent, ctx, e, readErr)
		}
		return AccessToken{}, redact(e, key)
	}
	return tok, nil
}

// failed records cause in e. Only the caller's context ending may match
// context.DeadlineExceeded or Canceled: a timeout of ours (Config.Timeout, or
// a lower layer's such as the dialer's) becomes ErrTimeout, so that a caller
// can tell a slow Whop from its own deadline passing.
func (c *Client) failed(parent, ctx context.Context, e *Error, cause error) *Error {
	switch {
	case parent.Err() != nil:
		e.Err = cause
	case ctx.Err() != nil:
		e.Message = fmt.Sprintf("timed out after %v waiting for Whop", c.timeout)
		e.Err = ErrTimeout
	case errors.Is(cause, context.DeadlineExceeded):
		e.Err = &timeoutError{cause: cause}
	default:
		e.Err = cause
	}
	return e
}

// timeoutError keeps a lower layer's timeout text but matches ErrTimeout
// instead of context.DeadlineExceeded; it has no Unwrap for that reason.
type timeoutError struct{ cause error }

func (t *timeoutError) Error() string        { return t.cause.Error() }
func (t *timeoutError) Is(target error) bool { return target == ErrTimeout }

// MaxTokenBytes bounds an access token: Whop's JWTs are well under 2 KiB,
// and 8 KiB is what common HTTP servers accept for a whole header line.
const MaxTokenBytes = 8 << 10

// jwtShape says what makes tok unlike a compact JWT (three non-empty
// base64url segments, at most MaxTokenBytes), or "" when nothing does. The
// description never quotes the token.
func jwtShape(tok string) string {
	if len(tok) > MaxTokenBytes {
		return fmt.Sprintf("is %d bytes, more than the %d a JWT may have here", len(tok), MaxTokenBytes)
	}
	segments, start := 1, 0
	for i := 0; i < len(tok); i++ {
		switch c := tok[i]; {
		case c == '.':
			if i == start {
				return "is not a JWT: an empty segment"
			}
			segments, start = segments+1, i+1
		case c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return fmt.Sprintf("is not a JWT: byte 0x%02x at offset %d is not base64url", c, i)
		}
	}
	if segments != 3 || start == len(tok) {
		return fmt.Sprintf("is not a JWT: %d segments, want 3 non-empty ones", segments)
	}
	return ""
}

// parseResponse turns a complete upstream answer into a token or an *Error.
// It must not panic on any input: the upstream is outside our control.
func parseResponse(status int, h http.Header, body []byte, now time.Time) (AccessToken, *Error) {
	date := serverDate(h)
	if status >= 200 && status < 300 {
		fail := func(msg string, err error) (AccessToken, *Error) {
			return AccessToken{}, &Error{StatusCode: status, Message: msg, ServerDate: date, Err: err}
		}
		if len(body) > maxBodyBytes {
			return fail("response body exceeds 1 MiB", nil)
		}
		var w wireToken
		if err := json.Unmarshal(body, &w); err != nil {
			return fail("response body is not a valid access token json", err)
		}
		if w.Token == "" {
			return fail("response missing token", nil)
		}
		if why := jwtShape(w.Token); why != "" {
			// Served tokens go into HTTP headers and browsers: a token
			// that could split a header or fill memory is not one.
			return fail("response token "+why, nil)
		}
		if w.ExpiresAt == "" {
			return fail("response missing expires_at", nil)
		}
		exp, ok := parseRFC3339(w.ExpiresAt)
		if !ok {
			return fail(fmt.Sprintf("response expires_at %q is not RFC 3339", truncate(w.ExpiresAt, 64)), nil)
		}
		return AccessToken{Token: w.Token, ExpiresAt: exp, ServerDate: date}, nil
	}

	// An HTTP-date hint is the server's instant, so measure it from the
	// server's own Date when there is one: that cancels clock skew.
	ref := now
	if !date.IsZero() {
		ref = date
	}
	e := &Error{StatusCode: status, ServerDate: date, ShouldRetry: shouldRetry(h.Get("X-Should-Retry"))}
	e.RetryAfter, e.RetryAfterFrom = waitHint(h, ref)
	e.Type, e.Message, e.Code, e.Param = parseErrorBody(body)
	if e.Message == "" {
		e.Message = fallbackMessage(status)
	}
	return AccessToken{}, e
}

// parseErrorBody extracts what Whop said from any of the wireError shapes;
// anything else, an HTML page from a proxy say, yields nothing.
func parseErrorBody(body []byte) (typ, msg, code, param string) {
	var w wireError
	if len(body) > maxBodyBytes || json.Unmarshal(body, &w) != nil {
		return "", "", "", ""
	}
	var o wireErrorObject
	if len(w.Error) > 0 && w.Error[0] == '{' && json.Unmarshal(w.Error, &o) == nil {
		typ, msg, code, param = jsonText(o.Type), jsonText(o.Message), jsonText(o.Code), jsonText(o.Param)
	} else if len(w.Error) > 0 && w.Error[0] == '"' {
		msg = jsonText(w.Error)
	}
	if msg == "" && len(w.Message) > 0 && w.Message[0] == '"' {
		msg = jsonText(w.Message)
	}
	return clean(typ, maxFieldBytes), clean(msg, maxMessageBytes), clean(code, maxFieldBytes), clean(param, maxFieldBytes)
}

// jsonText is a JSON string's text or a number as written; "" for null,
// booleans, objects and arrays.
func jsonText(raw json.RawMessage) string {
	if len(raw) == 0 {
		return ""
	}
	switch c := raw[0]; {
	case c == '"':
		var s string
		if json.Unmarshal(raw, &s) != nil {
			return ""
		}
		return s
	case c == '-' || c >= '0' && c <= '9':
		return string(raw)
	}
	return ""
}

// fallbackMessage describes a status that came without a message. For 422
// it uses the reference's own words, whose example body is {"error": null}.
func fallbackMessage(status int) string {
	if status == http.StatusUnprocessableEntity {
		return "Verification required"
	}
	return http.StatusText(status)
}

// clean makes upstream text safe to log and to show: control characters,
// newlines included, become spaces, runs of spaces collapse, and the result
// is cut to at most n bytes.
func clean(s string, n int) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) || r == '\u2028' || r == '\u2029' {
			return ' '
		}
		return r
	}, s)
	s = strings.Join(strings.Fields(s), " ")
	if len(s) <= n {
		return s
	}
	return truncate(s, n-len("..."))
}

// truncate cuts s to at most n bytes, on a rune boundary, marking the cut.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "..."
}

// shouldRetry reads x-should-retry, Whop's override of the status: "true" or
// "false" in any case; anything else is no override.
func shouldRetry(v string) *bool {
	v = strings.TrimSpace(v)
	switch {
	case strings.EqualFold(v, "true"):
		b := true
		return &b
	case strings.EqualFold(v, "false"):
		b := false
		return &b
	}
	return nil
}

// serverDate is the Date header, zero when absent or invalid.
func serverDate(h http.Header) time.Time {
	t, err := http.ParseTime(h.Get("Date"))
	if err != nil {
		return time.Time{}
	}
	return t
}

// waitHint picks the upstream's wait hint as Whop's SDKs do: retry-after-ms
// first, then Retry-After. It returns the header used, "" when no positive
// hint was found.
func waitHint(h http.Header, now time.Time) (time.Duration, string) {
	if d, ok := parseDecimal(strings.TrimSpace(h.Get("Retry-After-Ms")), time.Millisecond); ok && d > 0 {
		return d, "retry-after-ms"
	}
	if d := parseRetryAfter(h.Get("Retry-After"), now); d > 0 {
		return d, "retry-after"
	}
	return 0, ""
}

// parseRetryAfter accepts delta-seconds, fractional too as some servers
// send, or an HTTP-date (RFC 9110 10.2.3). Anything else, or a date in the
// past, means no hint.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if v[0] >= '0' && v[0] <= '9' {
		d, _ := parseDecimal(v, time.Second)
		return d
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

// parseDecimal reads digits with an optional fraction ("2", "1.5") as a
// count of unit, truncated to the nanosecond and capped at maxWait. Signs,
// exponents and a bare dot are refused.
func parseDecimal(v string, unit time.Duration) (time.Duration, bool) {
	whole, frac, dot := strings.Cut(v, ".")
	if !isDigits(whole) || dot && !isDigits(frac) {
		return 0, false
	}
	limit := int64(maxWait / unit)
	var n int64
	for i := 0; i < len(whole); i++ {
		if n = n*10 + int64(whole[i]-'0'); n > limit {
			return maxWait, true
		}
	}
	d := time.Duration(n) * unit
	step := unit
	for i := 0; i < len(frac) && step >= 10; i++ {
		step /= 10
		add := time.Duration(frac[i]-'0') * step
		if d > maxWait-add {
			return maxWait, true
		}
		d += add
	}
	return d, true
}

func isDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}

// parseRFC3339 accepts exactly RFC 3339's date-time (section 5.6): "T" and
// "Z" in either case, a fraction of any length (truncated to nanoseconds),
// numeric offsets, a leap second. time.Parse alone is both stricter (no
// lower case) and looser (a comma for the dot, one-digit hours, +24:00).
func parseRFC3339(s string) (time.Time, bool) {
	const dateTime = len("2006-01-02T15:04:05")
	if len(s) < dateTime+1 {
		return time.Time{}, false
	}
	for i := range dateTime {
		switch i {
		case 4, 7:
			if s[i] != '-' {
				return time.Time{}, false
			}
		case 10:
			if s[i] != 'T' && s[i] != 't' {
				return time.Time{}, false
			}
		case 13, 16:
			if s[i] != ':' {
				return time.Time{}, false
			}
		default:
			if s[i] < '0' || s[i] > '9' {
				return time.Time{}, false
			}
		}
	}
	b := append(make([]byte, 0, len(s)), s[:dateTime]...)
	b[10] = 'T'
	rest := s[dateTime:]
	if rest[0] == '.' {
		n := 1
		for n < len(rest) && rest[n] >= '0' && rest[n] <= '9' {
			n++
		}
		if n == 1 {
			return time.Time{}, false
		}
		b = append(b, rest[:min(n, len(".000000000"))]...)
		rest = rest[n:]
	}
	switch {
	case rest == "Z" || rest == "z":
		b = append(b, 'Z')
	case len(rest) == len("+07:00") && (rest[0] == '+' || rest[0] == '-') && rest[3] == ':' &&
		isDigits(rest[1:3]) && isDigits(rest[4:]) && rest[1:3] <= "23" && rest[4:] <= "59":
		b = append(b, rest...)
	default:
		return time.Time{}, false
	}
	// Go has no leap second: 23:59:60 is read as the next second, as POSIX
	// clocks do.
	leap := b[17] == '6' && b[18] == '0'
	if leap {
		b[17], b[18] = '5', '9'
	}
	t, err := time.Parse(time.RFC3339Nano, string(b))
	if err != nil {
		return time.Time{}, false
	}
	if leap {
		t = t.Add(time.Second)
	}
	return t, true
}

// isLoopback reports whether host is a loopback IP address. Names are
// refused, even localhost: a resolver may send one elsewhere.
func isLoopback(host string) bool {
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// maxRetryAfterSeconds and maxWait keep absurd hints from overflowing
// time.Duration.
const (
	maxRetryAfterSeconds = int64(1<<63-1) / int64(time.Second)
	maxWait              = time.Duration(maxRetryAfterSeconds) * time.Second
)

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
