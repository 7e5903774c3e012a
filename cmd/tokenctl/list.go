package main

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/timestamppb"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// entryOrders are the --sort keys of list. Each is a full order: ties fall
// back to subject, then key.
var entryOrders = map[string]func(a, b *tokendv1.Entry) int{
	"key":     func(a, b *tokendv1.Entry) int { return 0 },
	"subject": func(a, b *tokendv1.Entry) int { return cmp.Compare(subject(a), subject(b)) },
	// Soonest first; entries without the time last.
	"expires": func(a, b *tokendv1.Entry) int { return compareTimes(a.GetExpiresAt(), b.GetExpiresAt(), false) },
	"refresh": func(a, b *tokendv1.Entry) int { return compareTimes(a.GetNextRefreshAt(), b.GetNextRefreshAt(), false) },
	// Most recently requested first.
	"requested": func(a, b *tokendv1.Entry) int {
		return compareTimes(a.GetLastRequestedAt(), b.GetLastRequestedAt(), true)
	},
	// Most hits first.
	"hits": func(a, b *tokendv1.Entry) int { return cmp.Compare(b.GetHits(), a.GetHits()) },
	// Those that need attention first.
	"state": func(a, b *tokendv1.Entry) int { return cmp.Compare(stateRank(a.GetState()), stateRank(b.GetState())) },
}

// stateRanks orders states for --sort state, the ones that need an operator
// first.
var stateRanks = []tokendv1.EntryState{
	tokendv1.EntryState_ENTRY_STATE_FAILING,
	tokendv1.EntryState_ENTRY_STATE_EXPIRED,
	tokendv1.EntryState_ENTRY_STATE_RETRYING,
	tokendv1.EntryState_ENTRY_STATE_REFRESHING,
	tokendv1.EntryState_ENTRY_STATE_IDLE,
	tokendv1.EntryState_ENTRY_STATE_FRESH,
}

func stateRank(s tokendv1.EntryState) int {
	if i := slices.Index(stateRanks, s); i >= 0 {
		return i
	}
	return len(stateRanks)
}

// compareTimes orders set times before unset ones; newest first if desc.
func compareTimes(a, b *timestamppb.Timestamp, desc bool) int {
	switch {
	case a == nil && b == nil:
		return 0
	case a == nil:
		return 1
	case b == nil:
		return -1
	}
	c := a.AsTime().Compare(b.AsTime())
	if desc {
		return -c
	}
	return c
}

func sortKeys() string {
	return "key, subject, expires, refresh, requested, hits or state"
}

func sortEntries(entries []*tokendv1.Entry, by string) {
	order := entryOrders[by]
	slices.SortStableFunc(entries, func(a, b *tokendv1.Entry) int {
		return cmp.Or(order(a, b), cmp.Compare(subject(a), subject(b)), cmp.Compare(a.GetKeyId(), b.GetKeyId()))
	})
}

// parseStates turns --state values into the set of states to keep.
func parseStates(names []string) (map[tokendv1.EntryState]bool, error) {
	if len(names) == 0 {
		return nil, nil
	}
	keep := map[tokendv1.EntryState]bool{}
	var valid []string
	for _, s := range stateOrder {
		valid = append(valid, stateName(s))
	}
	for _, n := range names {
		v, ok := tokendv1.EntryState_value["ENTRY_STATE_"+strings.ToUpper(strings.TrimSpace(n))]
		st := tokendv1.EntryState(v)
		if !ok || !slices.Contains(stateOrder, st) {
			return nil, usagef("invalid --state %q: use %s", n, strings.Join(valid, ", "))
		}
		keep[st] = true
	}
	return keep, nil
}

func (c *cli) newListCmd(opts *options) *cobra.Command {
	var (
		req    tokendv1.ListEntriesRequest
		by     string
		states []string
	)
	cmd := &cobra.Command{
		Use:   "list [--subject ID] [--credential NAME] [--state STATE]... [--sort KEY]",
		Short: "List cache entries",
		Long: `list shows one line per cache entry: its key id, subject, scopes, state,
when its token expires, when it is refreshed next, when a client last asked
for it, and its cache hits. A CRED column appears when entries use more than
one credential. Long subjects and scope lists are shortened with "…" to fit
80 columns; "inspect KEY" or "-o json" shows them whole.

STATE is fresh, refreshing, retrying N (N failures in a row), failing: REASON
(the HTTP status or "network"; not retried), idle or expired.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, ok := entryOrders[by]; !ok {
				return usagef("invalid --sort %q: use %s", by, sortKeys())
			}
			keep, err := parseStates(states)
			if err != nil {
				return err
			}
			return c.withDaemon(cmd.Context(), opts, func(ctx context.Context, d *daemon) error {
				resp, err := tokendv1.NewAdminServiceClient(d.conn).ListEntries(ctx, &req)
				if err != nil {
					return err
				}
				if keep != nil {
					resp.Entries = slices.DeleteFunc(resp.Entries, func(e *tokendv1.Entry) bool { return !keep[e.GetState()] })
				}
				sortEntries(resp.Entries, by)
				if opts.json() {
					return c.printJSON(resp)
				}
				if len(resp.GetEntries()) == 0 {
					_, err := fmt.Fprintln(c.stdout, "no entries")
					return err
				}
				return writeEntries(c.stdout, resp.GetEntries(), c.now())
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.Subject, "subject", "", "only entries whose company or user id equals ID")
	f.StringVar(&req.Credential, "credential", "", "only entries minted with the credential NAME")
	f.StringSliceVar(&states, "state", nil, "only entries in STATE (fresh, refreshing, retrying, failing, idle, expired); repeatable")
	f.StringVar(&by, "sort", "subject", "order by "+sortKeys())
	return cmd
}
