package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/timestamppb"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// termWidth is the terminal the list table is laid out for.
const termWidth = 80

// column is one column of a table: a header, its cells, and how it may be
// squeezed to fit termWidth.
type column struct {
	header string
	cells  []string
	right  bool // right-aligned, for numbers
	// A column with a cut function may be narrowed: first down to soft
	// runes, then, if the table is still too wide, down to hard.
	soft, hard int
	cut        func(s string, n int) string
}

func (c *column) width() int {
	return max(utf8.RuneCountInString(c.header), c.cellWidth())
}

func (c *column) cellWidth() int {
	w := 0
	for _, s := range c.cells {
		w = max(w, utf8.RuneCountInString(s))
	}
	return w
}

// writeTable prints cols so that cells stand at least two spaces apart.
// Headers may stand one apart: after a column whose header is wider than
// its cells, a one-space gap still leaves two after every cell. When that
// is wider than termWidth, the columns that can be cut give up runes, the
// widest (rightmost of equals) first, down to their soft minimum, then
// down to their hard one.
func writeTable(w io.Writer, cols []*column) error {
	widths := make([]int, len(cols))
	gaps := make([]int, len(cols)) // before each column
	total := 0
	for i, c := range cols {
		widths[i] = c.width()
		total += widths[i]
		if i > 0 {
			gaps[i] = 2
			if prev := cols[i-1]; !prev.right && prev.cellWidth() < widths[i-1] {
				gaps[i] = 1
			}
			total += gaps[i]
		}
	}
	for _, floor := range []func(*column) int{
		func(c *column) int { return c.soft },
		func(c *column) int { return c.hard },
	} {
		for total > termWidth {
			widest := -1
			for i, c := range cols {
				if c.cut != nil && widths[i] > floor(c) && (widest < 0 || widths[i] >= widths[widest]) {
					widest = i
				}
			}
			if widest < 0 {
				break
			}
			widths[widest]--
			total--
		}
	}
	var (
		b   strings.Builder
		err error
	)
	line := func(cell func(c *column) string) {
		b.Reset()
		for i, c := range cols {
			s := cell(c)
			if n := utf8.RuneCountInString(s); n > widths[i] {
				s = c.cut(s, widths[i])
			}
			pad := strings.Repeat(" ", widths[i]-utf8.RuneCountInString(s))
			b.WriteString(strings.Repeat(" ", gaps[i]))
			if c.right {
				b.WriteString(pad + s)
			} else {
				b.WriteString(s + pad)
			}
		}
		if _, werr := fmt.Fprintln(w, strings.TrimRight(b.String(), " ")); err == nil {
			err = werr
		}
	}
	line(func(c *column) string { return c.header })
	rows := 0
	if len(cols) > 0 {
		rows = len(cols[0].cells)
	}
	for r := range rows {
		line(func(c *column) string { return c.cells[r] })
	}
	return err
}

// writeEntries prints the list table in the given order. The CRED column
// appears only when the entries use more than one credential.
func writeEntries(w io.Writer, entries []*tokendv1.Entry, now time.Time) error {
	var (
		key     = &column{header: "KEY"}
		subj    = &column{header: "SUBJECT", soft: 14, hard: 8, cut: truncateMiddle}
		scope   = &column{header: "SCOPES", soft: 9, hard: 6, cut: truncate}
		cred    = &column{header: "CRED", soft: 8, hard: 4, cut: truncate}
		state   = &column{header: "STATE"}
		expires = &column{header: "EXPIRES"}
		refresh = &column{header: "REFRESH"}
		reqd    = &column{header: "REQUESTED"}
		hits    = &column{header: "HITS", right: true}
	)
	creds := map[string]bool{}
	for _, e := range entries {
		key.cells = append(key.cells, e.GetKeyId())
		subj.cells = append(subj.cells, subject(e))
		scope.cells = append(scope.cells, scopes(e.GetScopedActions(), ","))
		cred.cells = append(cred.cells, orDash(e.GetCredential()))
		creds[e.GetCredential()] = true
		state.cells = append(state.cells, stateLabel(e))
		expires.cells = append(expires.cells, until(e.GetExpiresAt(), now))
		refresh.cells = append(refresh.cells, until(e.GetNextRefreshAt(), now))
		reqd.cells = append(reqd.cells, ago(e.GetLastRequestedAt(), now))
		hits.cells = append(hits.cells, strconv.FormatUint(e.GetHits(), 10))
	}
	cols := []*column{key, subj, scope}
	if len(creds) > 1 {
		cols = append(cols, cred)
	}
	cols = append(cols, state, expires, refresh, reqd, hits)
	return writeTable(w, cols)
}

// stateLabel is the entry's state as tables show it: "retrying 3" with the
// failure count, "failing: 403" with the reason, else the state's name.
func stateLabel(e *tokendv1.Entry) string {
	name := stateName(e.GetState())
	switch e.GetState() {
	case tokendv1.EntryState_ENTRY_STATE_RETRYING:
		if e.GetFailures() > 0 {
			return name + " " + strconv.FormatUint(uint64(e.GetFailures()), 10)
		}
	case tokendv1.EntryState_ENTRY_STATE_FAILING:
		if le := e.GetLastError(); le != nil {
			if le.GetHttpStatus() != 0 {
				return name + ": " + strconv.Itoa(int(le.GetHttpStatus()))
			}
			return name + ": network"
		}
	}
	return name
}

// writeEntry prints one entry as a "field: value" block, then its token's
// decoded JWT header and claims.
func writeEntry(w io.Writer, e *tokendv1.Entry, now time.Time) error {
	sc := scopes(e.GetScopedActions(), ", ")
	if len(e.GetScopedActions()) == 0 {
		sc += " (all permissions)"
	}
	failures := strconv.FormatUint(uint64(e.GetFailures()), 10)
	if e.GetFailures() > 0 {
		failures += " in a row"
	}
	if err := writeFields(w, [][2]string{
		{"key", e.GetKeyId()},
		{"company", orDash(e.GetCompanyId())},
		{"user", orDash(e.GetUserId())},
		{"scopes", sc},
		{"credential", orDash(e.GetCredential())},
		{"state", stateLabel(e)},
		{"expires at", timeAndRel(e.GetExpiresAt(), now)},
		{"next refresh at", timeAndRel(e.GetNextRefreshAt(), now)},
		{"last requested", timeAndRel(e.GetLastRequestedAt(), now)},
		{"hits", strconv.FormatUint(e.GetHits(), 10)},
		{"obtained at", timeAndRel(e.GetObtainedAt(), now)},
		{"last refresh", lastRefresh(e, now)},
		{"refreshes", strconv.FormatUint(e.GetRefreshes(), 10)},
		{"failures", failures},
		{"last error", upstreamError(e.GetLastError(), now)},
	}); err != nil {
		return err
	}
	if err := writeJWTPart(w, "jwt header", e.GetJwtHeaderJson(), nil, now); err != nil {
		return err
	}
	return writeJWTPart(w, "jwt claims", e.GetJwtClaimsJson(), []string{"iat", "nbf", "exp"}, now)
}

// lastRefresh is the latest refresh attempt: the failed one in last_error
// when that came after the current token was obtained.
func lastRefresh(e *tokendv1.Entry, now time.Time) string {
	ok, le := e.GetObtainedAt(), e.GetLastError()
	if le.GetAt() != nil && (ok == nil || le.GetAt().AsTime().After(ok.AsTime())) {
		return timeAndRel(le.GetAt(), now) + ": failed, " + errorStatus(le)
	}
	if ok == nil {
		return "-"
	}
	return timeAndRel(ok, now) + ": ok"
}

// writeJWTPart prints a decoded JWT part as indented JSON under a title,
// followed by the named numeric-date claims as RFC 3339 times.
func writeJWTPart(w io.Writer, title, js string, dates []string, now time.Time) error {
	if js == "" {
		_, err := fmt.Fprintf(w, "\n%s: -\n", title)
		return err
	}
	var ind bytes.Buffer
	if err := json.Indent(&ind, []byte(js), "  ", "  "); err != nil {
		// The daemon only sends valid JSON; show what came rather than fail.
		_, err := fmt.Fprintf(w, "\n%s: %s\n", title, js)
		return err
	}
	if _, err := fmt.Fprintf(w, "\n%s:\n  %s\n", title, ind.String()); err != nil {
		return err
	}
	var claims map[string]any
	d := json.NewDecoder(strings.NewReader(js))
	d.UseNumber()
	if d.Decode(&claims) != nil {
		return nil
	}
	var fields [][2]string
	for _, name := range dates {
		n, ok := claims[name].(json.Number)
		if !ok {
			continue
		}
		f, err := n.Float64()
		if err != nil {
			continue
		}
		t := time.Unix(0, 0).Add(time.Duration(f * float64(time.Second)))
		fields = append(fields, [2]string{"  " + name, timeAndRel(timestamppb.New(t), now)})
	}
	return writeFields(w, fields)
}

// stateOrder is the order "entries by state" lists states in.
var stateOrder = []tokendv1.EntryState{
	tokendv1.EntryState_ENTRY_STATE_FRESH,
	tokendv1.EntryState_ENTRY_STATE_REFRESHING,
	tokendv1.EntryState_ENTRY_STATE_RETRYING,
	tokendv1.EntryState_ENTRY_STATE_FAILING,
	tokendv1.EntryState_ENTRY_STATE_IDLE,
	tokendv1.EntryState_ENTRY_STATE_EXPIRED,
}

// writeStatus prints the daemon status as a "field: value" block, then one
// line per credential.
func writeStatus(w io.Writer, s *tokendv1.Status, now time.Time) error {
	uptime := "-"
	switch {
	case s.GetUptime() != nil:
		uptime = humanDuration(s.GetUptime().AsDuration())
	case s.GetStartedAt() != nil:
		uptime = humanDuration(now.Sub(s.GetStartedAt().AsTime()))
	}
	if s.GetStartedAt() != nil {
		uptime += " (since " + formatTime(s.GetStartedAt(), now) + ")"
	}

	entries := strconv.FormatUint(s.GetEntries(), 10)
	if by := s.GetEntriesByState(); len(by) > 0 {
		var parts []string
		seen := map[string]bool{}
		for _, st := range stateOrder {
			name := stateName(st)
			if n, ok := by[name]; ok {
				parts = append(parts, fmt.Sprintf("%s %d", name, n))
				seen[name] = true
			}
		}
		for _, name := range slices.Sorted(maps.Keys(by)) {
			if !seen[name] {
				parts = append(parts, fmt.Sprintf("%s %d", name, by[name]))
			}
		}
		entries += " (" + strings.Join(parts, ", ") + ")"
	}

	ratio := "-"
	if total := s.GetHits() + s.GetMisses(); total > 0 {
		ratio = fmt.Sprintf("%.1f%%", 100*float64(s.GetHits())/float64(total))
	}

	upstream := "ok"
	switch {
	case s.GetApiKeyRejected():
		upstream = "API KEY REJECTED by Whop (401): no calls until the key is reloaded or tokend restarts"
	case pausedFor(s.GetUpstreamPausedUntil(), now) != "":
		upstream = "paused after a 429 for " + pausedFor(s.GetUpstreamPausedUntil(), now)
	}
	limiter := fmt.Sprintf("%d/%d in flight, %g calls/s", s.GetUpstreamInFlight(), s.GetUpstreamMaxInFlight(), s.GetUpstreamRatePerSecond())
	if p := pausedFor(s.GetUpstreamPausedUntil(), now); p != "" {
		limiter += ", paused for " + p
	}
	capacity := fmt.Sprintf("max %d; evicted %d over capacity, dropped %d idle", s.GetMaxEntries(), s.GetEvictedOverCapacity(), s.GetDroppedIdle())
	writes := "ok"
	if e := s.GetCacheWriteError(); e != "" {
		writes = fmt.Sprintf("FAILING, serving from memory (%d pending): %s", s.GetCachePendingWrites(), e)
	}
	conns := fmt.Sprintf("%d (max %d)", s.GetConnectionsAtLimit(), s.GetMaxConnections())
	if s.GetMaxConnections() == 0 {
		conns = fmt.Sprintf("%d (no max)", s.GetConnectionsAtLimit())
	}

	if err := writeFields(w, [][2]string{
		{"version", orDash(s.GetVersion())},
		{"uptime", uptime},
		{"socket", orDash(s.GetSocket())},
		{"state dir", orDash(s.GetStateDir())},
		{"entries", entries},
		{"hits", strconv.FormatUint(s.GetHits(), 10)},
		{"misses", strconv.FormatUint(s.GetMisses(), 10)},
		{"hit ratio", ratio},
		{"misses rate-limited", strconv.FormatUint(s.GetMissesRateLimited(), 10)},
		{"misses abandoned", strconv.FormatUint(s.GetAbandonedCalls(), 10) + " (every caller gone before the limiter let the call through)"},
		{"upstream", upstream},
		{"upstream calls", strconv.FormatUint(s.GetUpstreamCalls(), 10)},
		{"upstream errors", strconv.FormatUint(s.GetUpstreamErrors(), 10)},
		{"last upstream error", upstreamError(s.GetLastUpstreamError(), now)},
		{"limiter", limiter},
		{"capacity", capacity},
		{"connections at limit", conns},
		{"cache writes", writes},
		{"cache sealed", yesNo(s.GetCacheSealed())},
		{"policy loaded", yesNo(s.GetPolicyLoaded())},
		{"fleet", fleetLine(s.GetFleet(), now)},
	}); err != nil {
		return err
	}
	return writeCredentials(w, s.GetCredentials(), now)
}

func writeCredentials(w io.Writer, creds []*tokendv1.CredentialStatus, now time.Time) error {
	if len(creds) == 0 {
		_, err := fmt.Fprintln(w, "\ncredentials: -")
		return err
	}
	if _, err := fmt.Fprintln(w, "\ncredentials:"); err != nil {
		return err
	}
	var (
		name   = &column{header: "  NAME"}
		kind   = &column{header: "KIND"}
		fp     = &column{header: "FINGERPRINT"}
		health = &column{header: "HEALTH"}
		calls  = &column{header: "CALLS/ERRORS", right: true}
		queue  = &column{header: "QUEUED"}
		ents   = &column{header: "ENTRIES", right: true}
		secret = &column{header: "SECRET EXPIRES"}
	)
	for _, c := range creds {
		h := "ok"
		switch {
		case c.GetRejected():
			h = "REJECTED"
			if t := c.GetNextProbe(); t != nil {
				h += ", probed " + relative(t.AsTime(), now)
			}
		case pausedFor(c.GetPausedUntil(), now) != "":
			h = "paused for " + pausedFor(c.GetPausedUntil(), now)
			if r := c.GetPauseReason(); r != "" {
				h += " (" + r + ")"
			}
		case c.GetClockSkewWarning():
			h = "clock off by " + c.GetClockSkew().AsDuration().Round(time.Second).String()
		}
		name.cells = append(name.cells, "  "+orDash(c.GetName()))
		kind.cells = append(kind.cells, orDash(c.GetKind()))
		fp.cells = append(fp.cells, orDash(c.GetFingerprint()))
		health.cells = append(health.cells, h)
		calls.cells = append(calls.cells, fmt.Sprintf("%d/%d", c.GetUpstreamCalls(), c.GetUpstreamErrors()))
		queue.cells = append(queue.cells, queued(c))
		ents.cells = append(ents.cells, strconv.FormatUint(c.GetEntries(), 10))
		exp := "-"
		if t := c.GetSecretExpiresAt(); t != nil {
			exp = relative(t.AsTime(), now)
		}
		secret.cells = append(secret.cells, exp)
	}
	return writeTable(w, []*column{name, kind, fp, health, calls, queue, ents, secret})
}

// fleetLine is the fleet tier's state: off, connected, or degraded (each
// host alone) with why.
func fleetLine(f *tokendv1.FleetStatus, now time.Time) string {
	if f == nil {
		return "off"
	}
	since := ""
	if t := f.GetSince(); t != nil {
		since = " since " + timeAndRel(t, now)
	}
	state := "connected" + since
	if !f.GetConnected() {
		state = "DEGRADED" + since + ", each host alone: " + orDash(f.GetReason())
	}
	return fmt.Sprintf("%s (fleet key %s); adopted %d, published %d, lock waits %d, takeovers %d, tampered %d, redis errors %d, rate-limited %d, pauses seen %d",
		state, orDash(f.GetKeyId()), f.GetAdopted(), f.GetPublished(), f.GetLockWaits(), f.GetLockTakeovers(), f.GetTampered(), f.GetRedisErrors(), f.GetRateLimited(), f.GetPausesSeen())
}

// queued is a credential's queue and who fills it: "37 (uid 65534: 35,
// uid 0: 2)", or "0".
func queued(c *tokendv1.CredentialStatus) string {
	if c.GetQueued() == 0 {
		return "0"
	}
	by := make([]string, 0, len(c.GetQueuedBy()))
	for _, q := range c.GetQueuedBy() {
		by = append(by, fmt.Sprintf("%s: %d", q.GetBy(), q.GetCalls()))
	}
	return fmt.Sprintf("%d (%s)", c.GetQueued(), strings.Join(by, ", "))
}

// pausedFor is how much longer until lasts, or "" when it has passed.
func pausedFor(until *timestamppb.Timestamp, now time.Time) string {
	if until == nil || !until.AsTime().After(now) {
		return ""
	}
	return humanDuration(until.AsTime().Sub(now))
}

func writeFields(w io.Writer, fields [][2]string) error {
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	for _, f := range fields {
		fmt.Fprintf(tw, "%s:\t%s\n", f[0], f[1])
	}
	return tw.Flush()
}

// subject is "company", "user" or "company/user".
func subject(e *tokendv1.Entry) string {
	switch c, u := e.GetCompanyId(), e.GetUserId(); {
	case c != "" && u != "":
		return c + "/" + u
	case c != "":
		return c
	case u != "":
		return u
	default:
		return "-"
	}
}

// scopes joins a scope list; "*" stands for the empty list, which means
// every permission of the API key.
func scopes(s []string, sep string) string {
	if len(s) == 0 {
		return "*"
	}
	return strings.Join(s, sep)
}

// truncate shortens s to at most max runes, marking the cut with "…".
func truncate(s string, max int) string {
	r := []rune(s)
	if len(r) <= max {
		return s
	}
	return string(r[:max-1]) + "…"
}

// truncateMiddle shortens s to at most max runes by cutting out its middle,
// which keeps both the kind of an id ("biz_") and its distinctive end.
func truncateMiddle(s string, max int) string {
	r := []rune(s)
	if len(r) <= max {
		return s
	}
	head := (max - 1) / 2
	tail := max - 1 - head
	return string(r[:head]) + "…" + string(r[len(r)-tail:])
}

// stateName is "fresh", "retrying", ...: the enum name without its prefix,
// which is also how Status.entries_by_state keys it.
func stateName(s tokendv1.EntryState) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "ENTRY_STATE_"))
}

// until is the time left until ts for a table: "41m12s", or "3m ago" once
// passed; "-" when unset.
func until(ts *timestamppb.Timestamp, now time.Time) string {
	if ts == nil {
		return "-"
	}
	d := ts.AsTime().Sub(now)
	if d < 0 {
		return ago(ts, now)
	}
	return humanDuration(d)
}

// ago is the time since ts for a table, in its largest unit only ("3m ago",
// not "3m12s ago"), which is precise enough for the past and keeps columns
// narrow; "-" when unset.
func ago(ts *timestamppb.Timestamp, now time.Time) string {
	if ts == nil {
		return "-"
	}
	s := humanDuration(now.Sub(ts.AsTime()))
	if i := strings.IndexFunc(s, func(r rune) bool { return r < '0' || r > '9' }); i >= 0 {
		s = s[:i+1]
	}
	return s + " ago"
}

func formatTime(ts *timestamppb.Timestamp, now time.Time) string {
	return ts.AsTime().In(now.Location()).Format(time.RFC3339)
}

// relative is "in 41m12s" or "3m ago".
func relative(t, now time.Time) string {
	d := t.Sub(now)
	if d < 0 {
		return humanDuration(-d) + " ago"
	}
	return "in " + humanDuration(d)
}

func timeAndRel(ts *timestamppb.Timestamp, now time.Time) string {
	if ts == nil {
		return "-"
	}
	return formatTime(ts, now) + " (" + relative(ts.AsTime(), now) + ")"
}

func upstreamError(e *tokendv1.UpstreamError, now time.Time) string {
	if e == nil {
		return "-"
	}
	var b strings.Builder
	if e.GetAt() != nil {
		b.WriteString(timeAndRel(e.GetAt(), now) + ": ")
	}
	b.WriteString(errorStatus(e))
	if e.GetMessage() != "" {
		b.WriteString(": " + e.GetMessage())
	}
	// Whop's own names for the error, for searching its docs and logs.
	var names []string
	for _, n := range [][2]string{{"type", e.GetType()}, {"code", e.GetCode()}, {"param", e.GetParam()}} {
		if n[1] != "" {
			names = append(names, n[0]+" "+n[1])
		}
	}
	if len(names) > 0 {
		b.WriteString(" [" + strings.Join(names, ", ") + "]")
	}
	if e.GetRetryable() {
		b.WriteString(" (retryable)")
	} else {
		b.WriteString(" (not retryable)")
	}
	return b.String()
}

// errorStatus is "http 502" or "network error".
func errorStatus(e *tokendv1.UpstreamError) string {
	if e.GetHttpStatus() == 0 {
		return "network error"
	}
	return fmt.Sprintf("http %d", e.GetHttpStatus())
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// humanDuration formats d, rounded to seconds, with its two largest units:
// 59s, 41m12s, 2h3m, 1d2h. A zero second unit is dropped (2h, not 2h0m).
// The sign is ignored; callers say "in" or "ago".
func humanDuration(d time.Duration) string {
	if d < 0 {
		d = -d
	}
	s := int64(d.Round(time.Second) / time.Second)
	days, s := s/86400, s%86400
	hours, s := s/3600, s%3600
	mins, secs := s/60, s%60
	two := func(a int64, au string, b int64, bu string) string {
		if b == 0 {
			return fmt.Sprintf("%d%s", a, au)
		}
		return fmt.Sprintf("%d%s%d%s", a, au, b, bu)
	}
	switch {
	case days > 0:
		return two(days, "d", hours, "h")
	case hours > 0:
		return two(hours, "h", mins, "m")
	case mins > 0:
		return two(mins, "m", secs, "s")
	default:
		return fmt.Sprintf("%ds", secs)
	}
}
