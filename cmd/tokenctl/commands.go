package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

func (c *cli) newGetCmd(opts *options) *cobra.Command {
	var (
		req    tokendv1.GetTokenRequest
		scopes []string
	)
	cmd := &cobra.Command{
		Use:   "get --company ID | --user ID [--scope S]... [--min-ttl D]",
		Short: "Print a token, as services get it",
		Long: `get asks tokend for a token the way a service does, through the cache.
In table mode it prints only the token, so this works:

  curl -H "Authorization: Bearer $(tokenctl get --company biz_x --scope chat:read)" ...`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if req.CompanyId == "" && req.UserId == "" && req.Credential == "" {
				return usagef("get needs --company, --user, or both (or --credential of a user OAuth token)")
			}
			if cmd.Flags().Changed("min-ttl") {
				d, _ := cmd.Flags().GetDuration("min-ttl")
				if d <= 0 {
					return usagef("invalid --min-ttl %v: must be positive, such as 5m", d)
				}
				req.MinTtl = durationpb.New(d)
			}
			req.ScopedActions = scopes
			return c.withDaemon(cmd.Context(), opts, func(ctx context.Context, d *daemon) error {
				tok, err := tokendv1.NewTokenServiceClient(d.conn).GetToken(ctx, &req)
				if err != nil {
					return err
				}
				if opts.json() {
					return c.printJSON(tok)
				}
				_, err = fmt.Fprintln(c.stdout, tok.GetToken())
				return err
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.CompanyId, "company", "", `company to mint for ("biz_...")`)
	f.StringVar(&req.UserId, "user", "", `user to mint for ("user_..."); with --company, a user within it`)
	f.StringVar(&req.Credential, "credential", "", "the daemon's credential to mint with (default: default)")
	f.StringSliceVar(&scopes, "scope", nil, `permission scope such as "chat:read"; repeatable; none means every permission`)
	f.Duration("min-ttl", 0, "the token stays valid at least this long (daemon default 1m, at most 3h)")
	return cmd
}

func (c *cli) newInspectCmd(opts *options) *cobra.Command {
	return &cobra.Command{
		Use:   "inspect KEY",
		Short: "Show one cache entry in detail (never its token)",
		Args:  keyArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.withDaemon(cmd.Context(), opts, func(ctx context.Context, d *daemon) error {
				e, err := tokendv1.NewAdminServiceClient(d.conn).GetEntry(ctx, &tokendv1.GetEntryRequest{KeyId: args[0]})
				if err != nil {
					return err
				}
				return c.printEntry(opts, e)
			})
		},
	}
}

func (c *cli) newRefreshCmd(opts *options) *cobra.Command {
	return &cobra.Command{
		Use:   "refresh KEY",
		Short: "Fetch a new token for a cache entry now, and show the entry",
		Args:  keyArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.withDaemon(cmd.Context(), opts, func(ctx context.Context, d *daemon) error {
				e, err := tokendv1.NewAdminServiceClient(d.conn).RefreshEntry(ctx, &tokendv1.RefreshEntryRequest{KeyId: args[0]})
				if err != nil {
					return err
				}
				return c.printEntry(opts, e)
			})
		},
	}
}

func (c *cli) newEvictCmd(opts *options) *cobra.Command {
	var (
		subject string
		all     bool
	)
	cmd := &cobra.Command{
		Use:   "evict KEY | --subject ID | --all",
		Short: "Drop cache entries; the next request fetches a new token",
		Args:  cobra.ArbitraryArgs, // checked with the flags in RunE
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usagef("evict takes one KEY, got %d arguments", len(args))
			}
			targets := len(args)
			if cmd.Flags().Changed("subject") {
				if subject == "" {
					return usagef("--subject is empty: pass a company or user id")
				}
				targets++
			}
			if all {
				targets++
			}
			if targets != 1 {
				return usagef("evict needs exactly one target: a KEY, --subject ID, or --all")
			}
			req := &tokendv1.EvictEntriesRequest{}
			switch {
			case len(args) == 1:
				if args[0] == "" {
					return usagef("evict needs a non-empty KEY")
				}
				req.Target = &tokendv1.EvictEntriesRequest_KeyId{KeyId: args[0]}
			case all:
				req.Target = &tokendv1.EvictEntriesRequest_All{All: true}
			default:
				req.Target = &tokendv1.EvictEntriesRequest_Subject{Subject: subject}
			}
			return c.withDaemon(cmd.Context(), opts, func(ctx context.Context, d *daemon) error {
				resp, err := tokendv1.NewAdminServiceClient(d.conn).EvictEntries(ctx, req)
				if err != nil {
					return err
				}
				if opts.json() {
					return c.printJSON(resp)
				}
				if len(resp.GetKeyIds()) == 0 {
					_, err := fmt.Fprintln(c.stdout, "no entries evicted")
					return err
				}
				for _, id := range resp.GetKeyIds() {
					if _, err := fmt.Fprintln(c.stdout, id); err != nil {
						return err
					}
				}
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&subject, "subject", "", "evict every entry whose company or user id equals ID")
	cmd.Flags().BoolVar(&all, "all", false, "evict every entry")
	return cmd
}

func (c *cli) newStatusCmd(opts *options) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show the daemon's version, counters and last upstream error",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return c.withDaemon(cmd.Context(), opts, func(ctx context.Context, d *daemon) error {
				s, err := tokendv1.NewAdminServiceClient(d.conn).GetStatus(ctx, &tokendv1.GetStatusRequest{})
				if err != nil {
					return err
				}
				if opts.json() {
					return c.printJSON(s)
				}
				return writeStatus(c.stdout, s, c.now())
			})
		},
	}
}

func (c *cli) printEntry(opts *options, e *tokendv1.Entry) error {
	if opts.json() {
		return c.printJSON(e)
	}
	return writeEntry(c.stdout, e, c.now())
}

// printJSON writes m as indented protojson with the .proto field names and
// every field present, zero or not, so that scripts can rely on the shape.
func (c *cli) printJSON(m proto.Message) error {
	b, err := marshalJSON(m)
	if err != nil {
		return err
	}
	var out bytes.Buffer
	// protojson varies its whitespace on purpose; re-indenting makes the
	// output byte-stable.
	if err := json.Indent(&out, b, "", "  "); err != nil {
		return fmt.Errorf("indent %s json: %w", m.ProtoReflect().Descriptor().Name(), err)
	}
	out.WriteByte('\n')
	_, err = c.stdout.Write(out.Bytes())
	return err
}

// marshalJSON encodes m as compact protojson with every field present.
func marshalJSON(m proto.Message) ([]byte, error) {
	b, err := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encode %s as json: %w", m.ProtoReflect().Descriptor().Name(), err)
	}
	var out bytes.Buffer
	if err := json.Compact(&out, b); err != nil {
		return nil, fmt.Errorf("compact %s json: %w", m.ProtoReflect().Descriptor().Name(), err)
	}
	return out.Bytes(), nil
}
