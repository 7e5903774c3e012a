package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

func (c *cli) newWatchCmd(opts *options) *cobra.Command {
	var interval time.Duration
	cmd := &cobra.Command{
		Use:   "watch KEY [--interval D]",
		Short: "Follow an entry's refreshes and errors live",
		Long: `watch polls the entry every --interval and prints a line when it gets a new
token, fails a refresh or changes state:

  2026-11-29T14:03:05Z  refreshed  expires in 59m58s  refreshes 3
  2026-11-29T14:52:10Z  retrying 2  503 Service unavailable

It stops at Ctrl-C, or when the entry is evicted. With -o json it prints one
JSON object per line: {"time", "event", "key_id", "entry"}.`,
		Args: keyArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			if interval <= 0 {
				return usagef("invalid --interval %v: must be positive, such as 1s", interval)
			}
			d, err := dialDaemon(opts.socket)
			if err != nil {
				return err
			}
			defer d.Close()
			return c.watch(cmd.Context(), opts, d, args[0], interval)
		},
	}
	cmd.Flags().DurationVar(&interval, "interval", time.Second, "how often to ask the daemon about the entry")
	return cmd
}

// watchEvent is one line of "watch -o json".
type watchEvent struct {
	Time  string          `json:"time"`
	Event string          `json:"event"`
	KeyID string          `json:"key_id"`
	Entry json.RawMessage `json:"entry,omitempty"`
}

// watch polls key until ctx ends (a clean stop) or the entry goes away. Each
// poll has its own --timeout.
func (c *cli) watch(ctx context.Context, opts *options, d *daemon, key string, interval time.Duration) error {
	admin := tokendv1.NewAdminServiceClient(d.conn)
	var prev *tokendv1.Entry
	for {
		callCtx, cancel := context.WithTimeout(ctx, opts.timeout)
		e, err := admin.GetEntry(callCtx, &tokendv1.GetEntryRequest{KeyId: key})
		timedOut := callCtx.Err() != nil
		cancel()
		switch {
		case ctx.Err() != nil:
			return nil
		case err != nil && prev != nil && status.Code(err) == codes.NotFound:
			return c.printWatch(opts.json(), c.now(), "evicted", prev.GetKeyId(), nil)
		case err != nil:
			return d.explain(err, timedOut, opts.timeout)
		}
		if prev == nil {
			// From now on the full id: a prefix could match a later entry.
			key = e.GetKeyId()
			if err := c.printWatch(opts.json(), c.now(), "watching", key, e); err != nil {
				return err
			}
		} else if err := c.printChanges(opts.json(), prev, e); err != nil {
			return err
		}
		prev = e
		if c.sleep(ctx, interval) != nil {
			return nil
		}
	}
}

// printChanges prints what happened to the entry between two polls, in the
// order it happened: a new token, a new error, or else a change of state.
func (c *cli) printChanges(asJSON bool, prev, e *tokendv1.Entry) error {
	type event struct {
		at   time.Time
		name string
	}
	var events []event
	if !proto.Equal(prev.GetObtainedAt(), e.GetObtainedAt()) && e.GetObtainedAt() != nil {
		events = append(events, event{e.GetObtainedAt().AsTime(), "refreshed"})
	}
	if !proto.Equal(prev.GetLastError(), e.GetLastError()) && e.GetLastError() != nil {
		at := c.now()
		if t := e.GetLastError().GetAt(); t != nil {
			at = t.AsTime()
		}
		events = append(events, event{at, "error"})
	}
	if len(events) == 0 && (prev.GetState() != e.GetState() || prev.GetFailures() != e.GetFailures()) {
		events = append(events, event{c.now(), "state"})
	}
	slices.SortStableFunc(events, func(a, b event) int { return a.at.Compare(b.at) })
	for _, ev := range events {
		if err := c.printWatch(asJSON, ev.at, ev.name, e.GetKeyId(), e); err != nil {
			return err
		}
	}
	return nil
}

func (c *cli) printWatch(asJSON bool, at time.Time, name, key string, e *tokendv1.Entry) error {
	now := c.now()
	when := formatTime(timestamppb.New(at), now)
	if asJSON {
		ev := watchEvent{Time: when, Event: name, KeyID: key}
		if e != nil {
			b, err := marshalJSON(e)
			if err != nil {
				return err
			}
			ev.Entry = b
		}
		b, err := json.Marshal(ev)
		if err != nil {
			return fmt.Errorf("encode watch event: %w", err)
		}
		_, err = fmt.Fprintf(c.stdout, "%s\n", b)
		return err
	}
	parts := []string{when}
	switch name {
	case "watching":
		parts = append(parts, "watching "+key, stateLabel(e), expiresIn(e, now), "refreshes "+strconv.FormatUint(e.GetRefreshes(), 10))
	case "refreshed":
		parts = append(parts, "refreshed", expiresIn(e, now), "refreshes "+strconv.FormatUint(e.GetRefreshes(), 10))
	case "error":
		le := e.GetLastError()
		msg := "network error: " + le.GetMessage()
		if le.GetHttpStatus() != 0 {
			msg = strings.TrimSpace(strconv.Itoa(int(le.GetHttpStatus())) + " " + le.GetMessage())
		}
		// The state says what follows the failure; an entry that already
		// got a token again is just "refresh failed".
		label := "refresh failed"
		if st := e.GetState(); st == tokendv1.EntryState_ENTRY_STATE_RETRYING || st == tokendv1.EntryState_ENTRY_STATE_FAILING {
			label = stateLabel(e)
		}
		parts = append(parts, label, msg)
	case "state":
		parts = append(parts, stateLabel(e))
	case "evicted":
		parts = append(parts, "entry evicted")
	}
	_, err := fmt.Fprintln(c.stdout, strings.Join(parts, "  "))
	return err
}

// sleep waits d or until ctx ends, through c.wait when a test set one.
func (c *cli) sleep(ctx context.Context, d time.Duration) error {
	if c.wait != nil {
		return c.wait(ctx, d)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func expiresIn(e *tokendv1.Entry, now time.Time) string {
	if e.GetExpiresAt() == nil {
		return "no token"
	}
	return "expires " + relative(e.GetExpiresAt().AsTime(), now)
}
