// Package whoptest is a fake Whop upstream: a real HTTP server on loopback
// that validates POST /api/v1/access_tokens the way Whop documents it, mints
// verifiable HS256 tokens, and injects faults on demand. Tests, benchmarks and
// the daemon's dev mode use it; it is not a _test package, so keep it free of
// testing dependencies. Tokens it mints are signed with a per-server key and
// mean nothing to the real Whop.
package whoptest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	accessTokensPath = "/api/v1/access_tokens"
	defaultExpiry    = time.Hour
	maxExpiry        = 3 * time.Hour
	maxBodyBytes     = 1 << 20
)

// Config configures a Server; zero values mean the documented defaults.
type Config struct {
	// Addr defaults to "127.0.0.1:0" (a free loopback port).
	Addr string
	// Keys maps each accepted API key to the scopes it may grant. A nil
	// slice grants every scope; an empty non-nil slice grants none.
	Keys map[string][]string
	// Now is the clock for expiry checks, token claims and the Date header,
	// before any SetSkew; default time.Now.
	Now func() time.Time
	// Logger receives one debug record per request; keys and tokens are
	// never logged. Default: discard.
	Logger *slog.Logger
}

// Fault makes the server misbehave for one request (Enqueue) or for all of
// them (SetDefault). Latency applies first, then Drop, then Status. No wait
// hint is sent unless asked for, as Whop promises none.
type Fault struct {
	// Status, if non-zero, is answered with a Whop-shaped error body
	// instead of processing the request.
	Status int
	// RetryAfter is sent as the Retry-After header along with Status.
	RetryAfter string
	// RetryAfterMs is sent as the retry-after-ms header along with Status.
	RetryAfterMs string
	// ShouldRetry is sent as the x-should-retry header along with Status.
	ShouldRetry string
	// Body, if non-empty, is sent verbatim along with Status instead of
	// the Whop-shaped body: an HTML page from a proxy, {"error": null}, a
	// token with an odd expires_at under Status 200. ContentType defaults
	// to application/json.
	Body        string
	ContentType string
	// Drop closes the connection without answering.
	Drop bool
	// Latency delays the answer; the wait ends early if the client goes
	// away or the server closes.
	Latency time.Duration
}

// RateLimited is Whop's documented rate-limit answer (API v5 docs): 429
// with {"message": "You are being rate limited"} and no Retry-After.
func RateLimited() Fault {
	return Fault{Status: http.StatusTooManyRequests, Body: `{"message": "You are being rate limited"}`}
}

// Call records one request that reached the handler, faults included.
type Call struct {
	At             time.Time // on the fake's clock, skew included
	Key            string    // the bearer credential presented, known or not
	APIVersionDate string    // the Api-Version-Date header, "" if none
	CompanyID      string
	UserID         string
	ScopedActions  []string
	ExpiresAt      string
	Status         int  // 0 until answered, and if the client left first
	Dropped        bool // the connection was closed by a Drop fault
}

// Server is the fake upstream. All methods are safe for concurrent use.
type Server struct {
	now     func() time.Time
	skew    atomic.Int64 // time.Duration added to now
	log     *slog.Logger
	signKey []byte
	ln      net.Listener
	srv     *http.Server
	cancel  context.CancelFunc
	done    chan struct{} // closed when Serve returns

	mu          sync.Mutex
	closed      bool
	handlers    sync.WaitGroup
	keys        map[string][]string
	oauth       map[string]string // user OAuth token -> the user it belongs to
	queue       []Fault
	def         Fault
	latency     time.Duration
	calls       []*Call
	inFlight    int
	maxInFlight int
}

// NewServer starts listening and serving before it returns.
func NewServer(cfg Config) (*Server, error) {
	addr := cfg.Addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	s := &Server{
		now:     cfg.Now,
		log:     cfg.Logger,
		signKey: make([]byte, 32),
		keys:    make(map[string][]string, len(cfg.Keys)),
		done:    make(chan struct{}),
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if _, err := rand.Read(s.signKey); err != nil {
		return nil, fmt.Errorf("start fake whop: generate signing key: %w", err)
	}
	for k, p := range cfg.Keys {
		s.keys[k] = slices.Clone(p)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("start fake whop: listen on %s: %w", addr, err)
	}
	s.ln = ln
	// Cancelling the base context ends Latency waits when the server closes.
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	s.srv = &http.Server{
		Handler:           http.HandlerFunc(s.serveHTTP),
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return ctx },
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	go func() {
		defer close(s.done)
		_ = s.srv.Serve(ln)
	}()
	return s, nil
}

// URL is the API root to configure a client with, without trailing slash.
func (s *Server) URL() string { return "http://" + s.ln.Addr().String() + "/api/v1" }

// Close stops the server and waits for in-progress handlers. Safe to call
// more than once.
func (s *Server) Close() {
	s.mu.Lock()
	already := s.closed
	s.closed = true
	s.mu.Unlock()
	if already {
		return
	}
	_ = s.srv.Close()
	s.cancel()
	<-s.done
	s.handlers.Wait()
}

// AddOAuthToken makes token a user OAuth token for userID: requests with it
// name no ids, and the minted token is for that user.
func (s *Server) AddOAuthToken(token, userID string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.oauth == nil {
		s.oauth = make(map[string]string)
	}
	s.oauth[token] = userID
}

// AddKey accepts key, replacing its permissions if already known. A nil
// perms grants every scope.
func (s *Server) AddKey(key string, perms []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.keys[key] = slices.Clone(perms)
}

// RemoveKey makes later requests with key fail with 401, as a revoked key.
func (s *Server) RemoveKey(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.keys, key)
}

// SetSkew sets the fake's clock to Config.Now()+d, to play a Whop whose
// clock is off from the caller's: it moves the expires_at checks, the token
// claims, the default expiry and the Date header together.
func (s *Server) SetSkew(d time.Duration) { s.skew.Store(int64(d)) }

// clock is the fake's idea of now.
func (s *Server) clock() time.Time { return s.now().Add(time.Duration(s.skew.Load())) }

// Enqueue queues faults, consumed one per request in order ahead of the
// default.
func (s *Server) Enqueue(f ...Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.queue = append(s.queue, f...)
}

// SetDefault applies f whenever the queue is empty; Fault{} restores normal
// behaviour.
func (s *Server) SetDefault(f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.def = f
}

// SetLatency adds d to every request, on top of any fault's Latency.
func (s *Server) SetLatency(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.latency = d
}

// Calls returns a copy of the call log in arrival order.
func (s *Server) Calls() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Call, len(s.calls))
	for i, c := range s.calls {
		out[i] = *c
		out[i].ScopedActions = slices.Clone(c.ScopedActions)
	}
	return out
}

// CallCount is len(Calls()) without the copy.
func (s *Server) CallCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.calls)
}

// CallsFor counts requests whose subject is subject: the company_id or the
// user_id when only one was sent, "company_id/user_id" when both were.
func (s *Server) CallsFor(subject string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.calls {
		if callSubject(c.CompanyID, c.UserID) == subject {
			n++
		}
	}
	return n
}

func callSubject(company, user string) string {
	switch {
	case company != "" && user != "":
		return company + "/" + user
	case company != "":
		return company
	default:
		return user
	}
}

// MaxInFlight is the highest number of concurrent requests seen since the
// start or the last ResetCounters.
func (s *Server) MaxInFlight() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxInFlight
}

// ResetCounters clears the call log and restarts MaxInFlight from the
// current in-flight count. Faults, keys and latency are kept.
func (s *Server) ResetCounters() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = nil
	s.maxInFlight = s.inFlight
}

// Verify checks a token minted by this server: HS256 signature with the
// server's key, and exp after the fake's clock (skew included).
func (s *Server) Verify(token string) (Claims, error) {
	return verifyJWT(s.signKey, token, s.clock())
}

type wireRequest struct {
	CompanyID     *string  `json:"company_id"`
	UserID        *string  `json:"user_id"`
	ExpiresAt     *string  `json:"expires_at"`
	ScopedActions []string `json:"scoped_actions"`
}

type apiError struct {
	Type    string `json:"type"`
	Message string `json:"message"`
	Code    string `json:"code,omitempty"`
	Param   string `json:"param,omitempty"`
}

func deref(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

// begin registers a request; it reports false once the server is closing.
func (s *Server) begin(call *Call) (Fault, time.Duration, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return Fault{}, 0, false
	}
	s.handlers.Add(1)
	s.inFlight++
	s.maxInFlight = max(s.maxInFlight, s.inFlight)
	s.calls = append(s.calls, call)
	f := s.def
	if len(s.queue) > 0 {
		f = s.queue[0]
		s.queue = s.queue[1:]
	}
	return f, s.latency, true
}

// record sets the outcome in the call log before the client can see it, so a
// test that inspects Calls right after a response finds it there.
func (s *Server) record(call *Call, status int, dropped bool) {
	s.mu.Lock()
	call.Status = status
	call.Dropped = dropped
	s.mu.Unlock()
	s.log.Debug("whoptest: access token request",
		"company_id", call.CompanyID, "user_id", call.UserID,
		"status", status, "dropped", dropped)
}

func (s *Server) end() {
	s.mu.Lock()
	s.inFlight--
	s.mu.Unlock()
	s.handlers.Done()
}

func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	// Read everything up front so the call log has the fields whatever the
	// fault, and so a client hang-up is noticed during Latency.
	body, readErr := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	var req wireRequest
	bodyErr := readErr
	if bodyErr == nil && len(strings.TrimSpace(string(body))) > 0 {
		bodyErr = json.Unmarshal(body, &req)
	}
	key, hasBearer := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	call := &Call{
		At:             s.clock(),
		Key:            key,
		APIVersionDate: r.Header.Get("Api-Version-Date"),
		CompanyID:      deref(req.CompanyID),
		UserID:         deref(req.UserID),
		ScopedActions:  slices.Clone(req.ScopedActions),
		ExpiresAt:      deref(req.ExpiresAt),
	}
	fault, latency, ok := s.begin(call)
	if !ok {
		s.stampDate(w)
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	defer s.end()

	if d := latency + fault.Latency; d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-r.Context().Done():
			// The client left or the server is closing: answer nothing, as
			// a real server that never got round to it would.
			t.Stop()
			panic(http.ErrAbortHandler)
		}
	}
	if fault.Drop {
		s.record(call, 0, true)
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				_ = conn.Close()
				return
			}
		}
		// Not hijackable (HTTP/2): abort the stream instead.
		panic(http.ErrAbortHandler)
	}
	s.stampDate(w)
	if fault.Status != 0 {
		for name, v := range map[string]string{
			"Retry-After":    fault.RetryAfter,
			"Retry-After-Ms": fault.RetryAfterMs,
			"X-Should-Retry": fault.ShouldRetry,
		} {
			if v != "" {
				w.Header().Set(name, v)
			}
		}
		s.record(call, fault.Status, false)
		if fault.Body != "" {
			writeRaw(w, fault.Status, fault.ContentType, []byte(fault.Body))
			return
		}
		writeJSON(w, fault.Status, errorBody(faultError(fault.Status)))
		return
	}

	status, resp := s.handle(r, key, hasBearer, req, bodyErr)
	s.record(call, status, false)
	writeJSON(w, status, resp)
}

// stampDate sends the fake's clock as Date, in whole seconds as real
// servers do; net/http would otherwise send the real time.
func (s *Server) stampDate(w http.ResponseWriter) {
	w.Header().Set("Date", s.clock().UTC().Format(http.TimeFormat))
}

// handle validates in the order Whop does and returns the answer.
func (s *Server) handle(r *http.Request, key string, hasBearer bool, req wireRequest, bodyErr error) (int, any) {
	fail := func(status int, e apiError) (int, any) {
		return status, errorBody(e)
	}
	if r.Method != http.MethodPost || r.URL.Path != accessTokensPath {
		return fail(http.StatusNotFound, apiError{Type: "not_found", Message: "Resource not found"})
	}
	s.mu.Lock()
	perms, known := s.keys[key]
	oauthUser, isOAuth := s.oauth[key]
	s.mu.Unlock()
	if !hasBearer || key == "" || !known && !isOAuth {
		return fail(http.StatusUnauthorized, apiError{Type: "unauthorized", Message: "Invalid or missing API key"})
	}
	if bodyErr != nil {
		return fail(http.StatusBadRequest, invalidRequest("invalid_json", "", "Request body is not valid JSON."))
	}
	company, user := deref(req.CompanyID), deref(req.UserID)
	if isOAuth {
		// With OAuth the user is derived from the token.
		if company != "" || user != "" {
			return fail(http.StatusBadRequest, invalidRequest("parameter_invalid", "company_id",
				"Invalid parameter: company_id and user_id are not accepted with a user OAuth token."))
		}
		user = oauthUser
	}
	if company == "" && user == "" {
		return fail(http.StatusBadRequest, invalidRequest("parameter_missing", "company_id",
			"Missing required parameter: company_id or user_id."))
	}
	if company != "" && !strings.HasPrefix(company, "biz_") {
		return fail(http.StatusBadRequest, invalidRequest("parameter_invalid", "company_id",
			"Invalid parameter: company_id must start with 'biz_'."))
	}
	if user != "" && !strings.HasPrefix(user, "user_") {
		return fail(http.StatusBadRequest, invalidRequest("parameter_invalid", "user_id",
			"Invalid parameter: user_id must start with 'user_'."))
	}
	now := s.clock()
	exp := now.Add(defaultExpiry)
	if v := deref(req.ExpiresAt); v != "" {
		t, err := time.Parse(time.RFC3339, v)
		switch {
		case err != nil:
			return fail(http.StatusBadRequest, invalidRequest("parameter_invalid", "expires_at",
				"Invalid parameter: expires_at must be an ISO 8601 date-time."))
		case !t.After(now):
			return fail(http.StatusBadRequest, invalidRequest("parameter_invalid", "expires_at",
				"Invalid parameter: expires_at must be in the future."))
		case t.Sub(now) > maxExpiry:
			return fail(http.StatusBadRequest, invalidRequest("parameter_invalid", "expires_at",
				"Invalid parameter: expires_at must be at most 3 hours from now."))
		}
		exp = t
	}
	if perms != nil {
		for _, sc := range req.ScopedActions {
			if !slices.Contains(perms, sc) {
				return fail(http.StatusForbidden, apiError{Type: "forbidden", Param: "scoped_actions",
					Message: fmt.Sprintf("You do not have permission to grant scope %q.", sc)})
			}
		}
	}

	exp = exp.Truncate(time.Millisecond)
	claims := Claims{
		Sub:       user,
		CompanyID: company,
		UserID:    user,
		Scopes:    slices.Clone(req.ScopedActions),
		Iat:       now.Unix(),
		Exp:       exp.Unix(),
		Jti:       randomID(),
	}
	if claims.Sub == "" {
		claims.Sub = company
	}
	if len(claims.Scopes) == 0 {
		claims.Scopes = nil
	}
	tok, err := signJWT(s.signKey, claims)
	if err != nil {
		return fail(http.StatusInternalServerError, faultError(http.StatusInternalServerError))
	}
	return http.StatusOK, map[string]string{
		"token":      tok,
		"expires_at": exp.UTC().Format("2006-01-02T15:04:05.000Z07:00"),
	}
}

func invalidRequest(code, param, msg string) apiError {
	return apiError{Type: "invalid_request_error", Code: code, Param: param, Message: msg}
}

// faultError is the body Whop would plausibly send for an injected status.
func faultError(status int) apiError {
	switch status {
	case http.StatusBadRequest:
		return invalidRequest("", "", "Bad request")
	case http.StatusUnauthorized:
		return apiError{Type: "unauthorized", Message: "Invalid or missing API key"}
	case http.StatusForbidden:
		return apiError{Type: "forbidden", Message: "You do not have permission to access this resource"}
	case http.StatusNotFound:
		return apiError{Type: "not_found", Message: "Resource not found"}
	case http.StatusRequestTimeout:
		return apiError{Type: "request_timeout", Message: "Request timed out"}
	case http.StatusUnprocessableEntity:
		return apiError{Type: "verification_required", Message: "Verification required"}
	case http.StatusTooManyRequests:
		return apiError{Type: "rate_limited", Message: "Too many requests"}
	case http.StatusInternalServerError:
		return apiError{Type: "internal_server_error", Message: "An unexpected error occurred"}
	case http.StatusBadGateway:
		return apiError{Type: "bad_gateway", Message: "Bad gateway"}
	case http.StatusServiceUnavailable:
		return apiError{Type: "service_unavailable", Message: "Service unavailable"}
	case http.StatusGatewayTimeout:
		return apiError{Type: "gateway_timeout", Message: "Gateway timeout"}
	}
	text := http.StatusText(status)
	if text == "" {
		text = "Status " + strconv.Itoa(status)
	}
	return apiError{Type: strings.ReplaceAll(strings.ToLower(text), " ", "_"), Message: text}
}

func errorBody(e apiError) any { return map[string]apiError{"error": e} }

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		// Only our own fixed types are marshalled; this cannot happen.
		panic(errors.Join(errors.New("whoptest: encode response"), err))
	}
	writeRaw(w, status, "", b)
}

func writeRaw(w http.ResponseWriter, status int, contentType string, b []byte) {
	if contentType == "" {
		contentType = "application/json"
	}
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

func randomID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // crypto/rand.Read never fails on supported platforms
	return hex.EncodeToString(b)
}
