package main

import (
	"cmp"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// maxScopesWidth keeps the list table within 80 columns for typical entries.
const maxScopesWidth = 24

// writeEntries prints the list table, sorted by subject then key.
func writeEntries(w io.Writer, entries []*tokendv1.Entry, now time.Time) error {
	sorted := slices.Clone(entries)
	slices.SortFunc(sorted, func(a, b *tokendv1.Entry) int {
		return cmp.Or(cmp.Compare(subject(a), subject(b)), cmp.Compare(a.GetKeyId(), b.GetKeyId()))
	})
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tSUBJECT\tSCOPES\tSTATE\tEXPIRES\tHITS")
	for _, e := range sorted {
		state := stateName(e.GetState())
		if e.GetState() == tokendv1.EntryState_ENTRY_STATE_RETRYING && e.GetFailures() > 0 {
			state += " " + strconv.FormatUint(uint64(e.GetFailures()), 10)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\n",
			e.GetKeyId(), subject(e), truncate(scopes(e.GetScopedActions(), ","), maxScopesWidth),
			state, expires(e.GetExpiresAt(), now), e.GetHits())
	}
	return tw.Flush()
}

// writeEntry prints one entry as a "field: value" block.
func writeEntry(w io.Writer, e *tokendv1.Entry, now time.Time) error {
	sc := scopes(e.GetScopedActions(), ", ")
	if len(e.GetScopedActions()) == 0 {
		sc += " (all permissions)"
	}
	return writeFields(w, [][2]string{
		{"key", e.GetKeyId()},
		{"company", orDash(e.GetCompanyId())},
		{"user", orDash(e.GetUserId())},
		{"scopes", sc},
		{"state", stateName(e.GetState())},
		{"expires at", timeAndRel(e.GetExpiresAt(), now)},
		{"obtained at", timeAndRel(e.GetObtainedAt(), now)},
		{"next refresh at", timeAndRel(e.GetNextRefreshAt(), now)},
		{"last requested", timeAndRel(e.GetLastRequestedAt(), now)},
		{"hits", strconv.FormatUint(e.GetHits(), 10)},
		{"refreshes", strconv.FormatUint(e.GetRefreshes(), 10)},
		{"failures", strconv.FormatUint(uint64(e.GetFailures()), 10)},
		{"last error", upstreamError(e.GetLastError(), now)},
	})
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

// writeStatus prints the daemon status as a "field: value" block.
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
	case s.GetUpstreamPausedUntil() != nil && s.GetUpstreamPausedUntil().AsTime().After(now):
		upstream = "paused after a 429 for " + humanDuration(s.GetUpstreamPausedUntil().AsTime().Sub(now))
	}
	limiter := fmt.Sprintf("%d/%d in flight, %g calls/s", s.GetUpstreamInFlight(), s.GetUpstreamMaxInFlight(), s.GetUpstreamRatePerSecond())
	capacity := fmt.Sprintf("max %d; evicted %d over capacity, dropped %d idle", s.GetMaxEntries(), s.GetEvictedOverCapacity(), s.GetDroppedIdle())
	writes := "ok"
	if e := s.GetCacheWriteError(); e != "" {
		writes = fmt.Sprintf("FAILING, serving from memory (%d pending): %s", s.GetCachePendingWrites(), e)
	}

	return writeFields(w, [][2]string{
		{"version", orDash(s.GetVersion())},
		{"uptime", uptime},
		{"socket", orDash(s.GetSocket())},
		{"state dir", orDash(s.GetStateDir())},
		{"entries", entries},
		{"hits", strconv.FormatUint(s.GetHits(), 10)},
		{"misses", strconv.FormatUint(s.GetMisses(), 10)},
		{"hit ratio", ratio},
		{"upstream calls", strconv.FormatUint(s.GetUpstreamCalls(), 10)},
		{"upstream errors", strconv.FormatUint(s.GetUpstreamErrors(), 10)},
		{"last upstream error", upstreamError(s.GetLastUpstreamError(), now)},
		{"upstream", upstream},
		{"limiter", limiter},
		{"capacity", capacity},
		{"cache writes", writes},
	})
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

// stateName is "fresh", "retrying", ...: the enum name without its prefix,
// which is also how Status.entries_by_state keys it.
func stateName(s tokendv1.EntryState) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "ENTRY_STATE_"))
}

func expires(ts *timestamppb.Timestamp, now time.Time) string {
	if ts == nil {
		return "-"
	}
	d := ts.AsTime().Sub(now)
	if d <= 0 {
		return "expired " + humanDuration(-d) + " ago"
	}
	return humanDuration(d)
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
	if e.GetHttpStatus() == 0 {
		b.WriteString("network error")
	} else {
		fmt.Fprintf(&b, "http %d", e.GetHttpStatus())
	}
	if e.GetMessage() != "" {
		b.WriteString(": " + e.GetMessage())
	}
	if e.GetRetryable() {
		b.WriteString(" (retryable)")
	} else {
		b.WriteString(" (not retryable)")
	}
	return b.String()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
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
