package e2e

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokend/tokend/internal/whop/whoptest"
	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// TestFaultRateLimitPause: any 429 pauses the whole credential, for the
// wait Whop hinted or, with no hint (Whop's documented answer), for
// --rate-limit-cooldown; status says which; the next call of any key waits
// the pause out, and no longer.
func TestFaultRateLimitPause(t *testing.T) {
	const pause = 1500 * time.Millisecond
	for _, tc := range []struct {
		name     string
		fault    whoptest.Fault
		cooldown string // --rate-limit-cooldown: 60s unless the case is about it
		reason   string
	}{
		{"no wait hint", whoptest.RateLimited(), "1500ms", "default cooldown (no Retry-After)"},
		{"retry-after-ms", whoptest.Fault{Status: 429, RetryAfterMs: "1500"}, "60s", "retry-after-ms header"},
		{"fractional Retry-After", whoptest.Fault{Status: 429, RetryAfter: "1.5"}, "60s", "retry-after header"},
		{"retry-after-ms wins", whoptest.Fault{Status: 429, RetryAfter: "30", RetryAfterMs: "1500"}, "60s", "retry-after-ms header"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.start(append(fast, "--rate-limit-cooldown", tc.cooldown)...)
			tc2 := e.tokens()
			e.fake.Enqueue(tc.fault)

			// Shorter than the pause: the call answers with the 429 at once
			// rather than waiting.
			short, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			defer cancel()
			_, err := tc2.GetToken(short, companyKey(0))
			if status.Code(err) != codes.Unavailable {
				t.Fatalf("429: got %v, want Unavailable", err)
			}
			st := e.status(t)
			if len(st.Credentials) != 1 {
				t.Fatalf("status lists %d credentials", len(st.Credentials))
			}
			c := st.Credentials[0]
			left := time.Until(c.PausedUntil.AsTime())
			if c.PauseReason != tc.reason || left <= 0 || left > pause {
				t.Fatalf("status: paused for %v by %q; want up to %v by %q", left, c.PauseReason, pause, tc.reason)
			}
			if out, _, _ := e.ctl("status"); !strings.Contains(out, tc.reason) {
				t.Fatalf("tokenctl status does not say %q:\n%s", tc.reason, out)
			}

			// Other keys of the credential wait the pause out, then mint.
			var wg sync.WaitGroup
			for i := 1; i <= 5; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					if _, err := tc2.GetToken(ctx(t), companyKey(i)); err != nil {
						t.Errorf("key %d after the pause: %v", i, err)
					}
				}()
			}
			wg.Wait()
			calls := e.fake.Calls()
			if len(calls) != 6 {
				t.Fatalf("%d upstream calls, want the 429 and 5 mints", len(calls))
			}
			gap := calls[1].At.Sub(calls[0].At)
			t.Logf("429 (%s): status said %q, paused %v; the next upstream call came %v later", tc.name, c.PauseReason, left.Round(time.Millisecond), gap.Round(time.Millisecond))
			if gap < pause || gap > pause+time.Second {
				t.Fatalf("next upstream call %v after the 429; want the %v pause and no longer", gap, pause)
			}
		})
	}
}

// TestFaultInCallRetry: a cold miss survives a connection reset and a 5xx
// from a proxy (HTML body) by retrying within the call, as Whop's SDKs do:
// one retrying call however many callers wait, backoff from 0.5 s, never
// past the caller's deadline, and never against x-should-retry: false.
func TestFaultInCallRetry(t *testing.T) {
	t.Run("reset then proxy 503 then a token", func(t *testing.T) {
		e := newEnv(t)
		e.start(fast...)
		tc := e.tokens()
		e.fake.Enqueue(
			whoptest.Fault{Drop: true},
			whoptest.Fault{Status: 503, ContentType: "text/html", Body: "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>"},
		)
		const callers = 50
		tokens := make([]string, callers)
		start := time.Now()
		var wg sync.WaitGroup
		for i := range callers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				tok, err := tc.GetToken(ctx(t), companyKey(0))
				if err != nil {
					t.Errorf("caller %d: %v", i, err)
					return
				}
				tokens[i] = tok.Token
			}()
		}
		wg.Wait()
		took := time.Since(start)
		calls := e.fake.Calls()
		if len(calls) != 3 || !calls[0].Dropped || calls[1].Status != 503 || calls[2].Status != 200 {
			t.Fatalf("upstream calls %+v; want a dropped one, a 503 and a 200", calls)
		}
		for i, tok := range tokens {
			if tok != tokens[0] {
				t.Fatalf("caller %d got another token: the retries were not coalesced", i)
			}
		}
		g1, g2 := calls[1].At.Sub(calls[0].At), calls[2].At.Sub(calls[1].At)
		t.Logf("%d callers of one cold key: 3 upstream calls (reset, 503, 200), retried after %v and %v, all served %v after the first call", callers, g1.Round(time.Millisecond), g2.Round(time.Millisecond), took.Round(time.Millisecond))
		// The SDKs' schedule: 0.5 s then 1 s, each less up to 25% jitter.
		if g1 < 375*time.Millisecond || g1 > 700*time.Millisecond || g2 < 750*time.Millisecond || g2 > 1300*time.Millisecond {
			t.Fatalf("retry gaps %v and %v; want about 0.5s and 1s", g1, g2)
		}
	})

	t.Run("never past the caller's deadline", func(t *testing.T) {
		e := newEnv(t)
		e.start(fast...)
		tc := e.tokens()
		e.fake.Enqueue(whoptestFault503, whoptestFault503, whoptestFault503)
		short, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := tc.GetToken(short, companyKey(0))
		took := time.Since(start)
		t.Logf("503 with 300ms left: %v after %v, %d upstream call(s)", status.Code(err), took.Round(time.Millisecond), e.fake.CallCount())
		if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "503") {
			t.Fatalf("got %v, want Unavailable with Whop's 503", err)
		}
		if took > 300*time.Millisecond+200*time.Millisecond || e.fake.CallCount() != 1 {
			t.Fatalf("answered after %v with %d calls; a retry does not fit in 300ms", took, e.fake.CallCount())
		}
	})

	t.Run("x-should-retry: false", func(t *testing.T) {
		e := newEnv(t)
		e.start(fast...)
		tc := e.tokens()
		e.fake.Enqueue(whoptest.Fault{Status: 503, ShouldRetry: "false"})
		if _, err := tc.GetToken(ctx(t), companyKey(0)); status.Code(err) != codes.Unavailable {
			t.Fatalf("got %v, want Unavailable", err)
		}
		if n := e.fake.CallCount(); n != 1 {
			t.Fatalf("%d upstream calls; x-should-retry: false forbids a retry", n)
		}
	})

	t.Run("x-should-retry: true on a 400", func(t *testing.T) {
		e := newEnv(t)
		e.start(fast...)
		tc := e.tokens()
		e.fake.Enqueue(whoptest.Fault{Status: 400, ShouldRetry: "true"})
		if _, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_sr"}); err != nil {
			t.Fatalf("got %v, want the retry's token", err)
		}
		if n := e.fake.CallCount(); n != 2 {
			t.Fatalf("%d upstream calls, want 2", n)
		}
	})
}

// TestWhopErrorDetails: Whop's type, code and param reach the caller as a
// google.rpc.ErrorInfo and the operator in tokenctl inspect.
func TestWhopErrorDetails(t *testing.T) {
	e := newEnv(t)
	e.start(fast...)
	e.fake.Enqueue(whoptest.Fault{Status: 403, Body: `{"error": {"type": "invalid_request_error", "code": "scope_not_granted", "param": "scoped_actions", "message": "scope forums:write not granted to this app"}}`})
	_, err := e.tokens().GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_det", ScopedActions: []string{"forums:write"}})
	st := status.Convert(err)
	if st.Code() != codes.PermissionDenied || !strings.Contains(st.Message(), "scope forums:write not granted") {
		t.Fatalf("403: got %v, want PermissionDenied with Whop's message", err)
	}
	var info *errdetails.ErrorInfo
	for _, d := range st.Details() {
		if i, ok := d.(*errdetails.ErrorInfo); ok {
			info = i
		}
	}
	want := map[string]string{"http_status": "403", "type": "invalid_request_error", "code": "scope_not_granted", "param": "scoped_actions"}
	if info == nil || info.Domain != "api.whop.com" || info.Reason != "SCOPE_NOT_GRANTED" {
		t.Fatalf("ErrorInfo %v; want reason SCOPE_NOT_GRANTED (AIP-193 form) in domain api.whop.com", info)
	}
	for k, v := range want {
		if info.Metadata[k] != v {
			t.Errorf("ErrorInfo metadata %s = %q, want %q", k, info.Metadata[k], v)
		}
	}
	list, err := tokendv1.NewAdminServiceClient(e.dial()).ListEntries(ctx(t), &tokendv1.ListEntriesRequest{})
	must(t, err)
	if len(list.Entries) != 1 {
		t.Fatalf("%d entries, want the failed one", len(list.Entries))
	}
	out := e.mustCtl("inspect", list.Entries[0].KeyId)
	if !strings.Contains(out, "[type invalid_request_error, code scope_not_granted, param scoped_actions]") {
		t.Fatalf("tokenctl inspect does not show Whop's type, code and param:\n%s", out)
	}
}
