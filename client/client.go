// Package client gets Whop access tokens from a local tokend over its Unix
// socket, as one-off calls or as a self-refreshing oauth2.TokenSource that
// plugs into oauth2.NewClient and gRPC per-RPC credentials. A Client watches
// all its sources over one stream, and a source nobody calls for
// [WithIdleAfter] stops being kept fresh until it is called again.
//
// Tokens are bearer secrets: nothing in this package logs them, and a
// [Token] prints without its value. Keep it that way in your code.
package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokend/tokend/internal/clock"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// DefaultSocket is where tokend listens unless configured otherwise.
const DefaultSocket = "/run/tokend/tokend.sock"

// maxMessageSize bounds what either side may send: a token is at most a few
// KiB and a request at most 64 scopes of 128 bytes.
const maxMessageSize = 64 << 10

// defaultTimeout bounds each call a TokenSource makes on its own, since
// oauth2.TokenSource.Token takes no context.
const defaultTimeout = 30 * time.Second

// ErrClosed is returned by calls on a closed Client or TokenSource.
var ErrClosed = errors.New("tokend client: closed")

// Client is a connection to tokend. It is safe for concurrent use; make one
// per process and share it.
type Client struct {
	conn      *grpc.ClientConn
	tokens    tokendv1.TokenServiceClient
	log       *slog.Logger
	timeout   time.Duration
	idleAfter time.Duration
	clock     clock.Clock
	epoch     time.Time // origin of TokenSource.lastUsed

	// ctx ends the watch stream and every GetToken a source started when
	// the client closes.
	ctx    context.Context
	cancel context.CancelFunc
	closed atomic.Bool
	wg     sync.WaitGroup // the mux's goroutines

	mux mux

	mu     sync.Mutex
	shared map[string]*TokenSource // TokenSource(subject, scopes...) by request
}

// Option configures a Client.
type Option func(*options)

type options struct {
	log       *slog.Logger
	timeout   time.Duration
	idleAfter time.Duration
	clock     clock.Clock
	dial      []grpc.DialOption
}

// WithLogger sets where the client reports watch-stream breaks and
// fallbacks (never a token). By default it logs nothing.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) { o.log = l }
}

// WithTimeout bounds each GetToken a TokenSource makes (default 30s).
// Client.Token uses the caller's context instead.
func WithTimeout(d time.Duration) Option {
	return func(o *options) { o.timeout = d }
}

// WithIdleAfter sets how long a TokenSource may go without a Token call
// before it stops watching its token (default [DefaultIdleAfter]); zero or
// less means the default. Make it at least tokend's token lifetime:
// oauth2.ReuseTokenSource, which oauth2.NewClient uses, calls a source
// about once per token.
func WithIdleAfter(d time.Duration) Option {
	return func(o *options) { o.idleAfter = d }
}

// WithDialOptions adds gRPC dial options after the client's own, so they
// win where they overlap.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dial = append(o.dial, opts...) }
}

// New returns a client of the tokend listening on socketPath; an empty path
// means $TOKEND_SOCKET, else [DefaultSocket]. It does no I/O: the
// connection is made on first use and remade with backoff whenever tokend
// restarts.
func New(socketPath string, opts ...Option) (*Client, error) {
	o := options{timeout: defaultTimeout, idleAfter: DefaultIdleAfter, clock: clock.Real{}}
	for _, opt := range opts {
		opt(&o)
	}
	if o.log == nil {
		o.log = slog.New(slog.DiscardHandler)
	}
	if o.timeout <= 0 {
		o.timeout = defaultTimeout
	}
	if o.idleAfter <= 0 {
		o.idleAfter = DefaultIdleAfter
	}
	if socketPath == "" {
		socketPath = os.Getenv("TOKEND_SOCKET")
	}
	if socketPath == "" {
		socketPath = DefaultSocket
	}
	target := "unix:" + socketPath // relative paths
	if filepath.IsAbs(socketPath) {
		target = "unix://" + socketPath
	}
	dial := []grpc.DialOption{
		// A local socket: file permissions (and tokend's peer-credential
		// policy) authenticate, not TLS.
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// Keepalive pings stay off (the default): a Unix socket reports a
		// dead peer at once, and gRPC servers by default refuse frequent pings.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
			MinConnectTimeout: 2 * time.Second,
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessageSize), grpc.MaxCallSendMsgSize(maxMessageSize)),
		grpc.WithDisableServiceConfig(),
		grpc.WithUserAgent("tokend-go-client"),
	}
	conn, err := grpc.NewClient(target, append(dial, o.dial...)...)
	if err != nil {
		return nil, fmt.Errorf("tokend client: dial %s: %w", socketPath, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Client{
		conn:      conn,
		tokens:    tokendv1.NewTokenServiceClient(conn),
		log:       o.log,
		timeout:   o.timeout,
		idleAfter: o.idleAfter,
		clock:     o.clock,
		epoch:     o.clock.Now(),
		ctx:       ctx,
		cancel:    cancel,
		shared:    make(map[string]*TokenSource),
	}
	c.mux.init(c)
	return c, nil
}

// Close stops every TokenSource of the client, waits for the watch stream
// and background calls to end and closes the connection. Calls in flight
// fail with codes.Canceled.
func (c *Client) Close() error {
	if c.closed.Swap(true) {
		return nil
	}
	c.mux.close()
	c.cancel()
	c.wg.Wait()
	return c.conn.Close()
}

// since is now as a TokenSource.lastUsed value.
func (c *Client) since(now time.Time) int64 { return int64(now.Sub(c.epoch)) }

// Request names the token to get.
type Request struct {
	// CompanyID starts with "biz_"; UserID with "user_". At least one is
	// required; both mean a user within a company.
	CompanyID, UserID string
	// Scopes such as "chat:read". Order and duplicates do not matter;
	// none means every permission of tokend's API key (a different token).
	Scopes []string
	// MinTTL is how long the token must stay valid at least. Zero means
	// tokend's default, one minute.
	MinTTL time.Duration
	// Credential names the credential in tokend's configuration to mint
	// with. Empty means its default.
	Credential string
}

// String names the subject and scopes the way tokenctl list does ("*" for
// every permission).
func (r Request) String() string {
	scopes := strings.Join(r.Scopes, ",")
	if scopes == "" {
		scopes = "*"
	}
	if r.Credential != "" {
		return r.Credential + ":" + r.subject() + " " + scopes
	}
	return r.subject() + " " + scopes
}

func (r Request) subject() string {
	switch {
	case r.CompanyID != "" && r.UserID != "":
		return r.CompanyID + "/" + r.UserID
	case r.CompanyID != "":
		return r.CompanyID
	}
	return r.UserID
}

func (r Request) proto() *tokendv1.GetTokenRequest {
	pr := &tokendv1.GetTokenRequest{CompanyId: r.CompanyID, UserId: r.UserID, ScopedActions: r.Scopes, Credential: r.Credential}
	if r.MinTTL != 0 {
		pr.MinTtl = durationpb.New(r.MinTTL)
	}
	return pr
}

// key identifies the token tokend would hand out for r.
func (r Request) key() string {
	scopes := slices.Clone(r.Scopes)
	slices.Sort(scopes)
	scopes = slices.Compact(scopes)
	return fmt.Sprintf("%q %q %q %d %q", r.CompanyID, r.UserID, scopes, r.MinTTL, r.Credential)
}

// Token is an access token from tokend. Its String and GoString omit the
// value, so printing or logging a Token does not leak it.
type Token struct {
	// Value is the JWT to send as "Authorization: Bearer".
	Value     string
	ExpiresAt time.Time
	// KeyID is tokend's id of the cache entry, as tokenctl shows it.
	KeyID string
}

func (t *Token) String() string {
	if t == nil {
		return "<nil>"
	}
	return fmt.Sprintf("token{key_id: %s, expires_at: %s}", t.KeyID, t.ExpiresAt.Format(time.RFC3339))
}

// GoString keeps %#v from printing the value too.
func (t *Token) GoString() string { return t.String() }

func fromProto(p *tokendv1.Token) *Token {
	return &Token{Value: p.GetToken(), ExpiresAt: p.GetExpiresAt().AsTime(), KeyID: p.GetKeyId()}
}

// Token makes one GetToken call. Errors carry tokend's gRPC status, so
// status.Code(err) tells them apart (see the README's table).
func (c *Client) Token(ctx context.Context, req Request) (*Token, error) {
	if c.closed.Load() {
		return nil, ErrClosed
	}
	p, err := c.tokens.GetToken(ctx, req.proto())
	if err != nil {
		return nil, fmt.Errorf("tokend: get token for %s: %w", req, err)
	}
	if p.GetToken() == "" {
		return nil, fmt.Errorf("tokend: get token for %s: empty token in the answer", req)
	}
	return fromProto(p), nil
}
