package e2e

import (
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

func scrape(t *testing.T, sock string) string {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	resp, err := hc.Get("http://tokend/metrics")
	must(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	must(t, err)
	return string(b)
}

// TestMetricsScenario: hits, a miss, an upstream error, a negative-cache
// answer and an operator refresh show up as exact counter values.
func TestMetricsScenario(t *testing.T) {
	e := newEnv(t)
	msock := filepath.Join(e.dir, "metrics.sock")
	e.start("--metrics-addr", "unix:"+msock)
	tc := e.tokens()
	tok, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_m1"})
	must(t, err)
	for range 4 {
		_, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_m1"})
		must(t, err)
	}
	e.fake.Enqueue(faultStatus(403))
	for range 2 {
		if _, err := tc.GetToken(ctx(t), &tokendv1.GetTokenRequest{CompanyId: "biz_m2"}); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("got %v, want PermissionDenied", err)
		}
	}
	e.mustCtl("refresh", tok.KeyId)

	text := scrape(t, msock)
	for _, want := range []string{
		`tokend_gettoken_total{code="OK",result="miss"} 1`,
		`tokend_gettoken_total{code="OK",result="hit"} 4`,
		`tokend_gettoken_total{code="PermissionDenied",result="error"} 2`,
		`tokend_upstream_requests_total{status="200"} 2`,
		`tokend_upstream_requests_total{status="403"} 1`,
		`tokend_upstream_request_duration_seconds_count 3`,
		`tokend_refreshes_total{cause="miss",outcome="ok"} 1`,
		`tokend_refreshes_total{cause="miss",outcome="failed"} 1`,
		`tokend_refreshes_total{cause="admin",outcome="ok"} 1`,
		`tokend_entries{state="fresh"} 1`,
		`tokend_entries{state="failing"} 1`,
		`tokend_upstream_in_flight 0`,
		`tokend_earliest_expiry_seconds `,
	} {
		if !strings.Contains(text, want+"\n") && !strings.Contains(text, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if strings.Contains(text, "biz_m1") || strings.Contains(text, tok.Token) || strings.Contains(text, testKey) {
		t.Fatal("metrics carry a subject, a token or the API key")
	}
	if t.Failed() {
		t.Logf("metrics:\n%s", grepLines(text, "tokend_"))
	}
}
