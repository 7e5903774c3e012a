package main

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

func (c *cli) newPolicyCmd(opts *options) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Ask the daemon about its access policy",
		Args:  noArgs,
	}
	var (
		req    tokendv1.CheckPolicyRequest
		scopes []string
	)
	check := &cobra.Command{
		Use:   "check --as USER --company ID | --user ID [--scope S]...",
		Short: "Would local USER (name or uid) be allowed this token, and by which rule?",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if req.User == "" {
				return usagef("policy check needs --as USER (a local user name or uid)")
			}
			if req.CompanyId == "" && req.UserId == "" {
				return usagef("policy check needs --company, --user, or both")
			}
			req.ScopedActions = scopes
			return c.withDaemon(cmd.Context(), opts, func(ctx context.Context, d *daemon) error {
				r, err := tokendv1.NewAdminServiceClient(d.conn).CheckPolicy(ctx, &req)
				if err != nil {
					return err
				}
				if opts.json() {
					return c.printJSON(r)
				}
				switch {
				case !r.GetPolicyLoaded():
					_, err = fmt.Fprintf(c.stdout, "allowed: %s\n", r.GetReason())
				case r.GetAllowed():
					_, err = fmt.Fprintf(c.stdout, "allowed by rule %q\n", r.GetRule())
				default:
					_, err = fmt.Fprintf(c.stdout, "denied: %s\n", r.GetReason())
				}
				return err
			})
		},
	}
	f := check.Flags()
	f.StringVar(&req.User, "as", "", "local user name or uid making the request")
	f.StringVar(&req.Credential, "credential", "", "the credential asked for (default: as GetToken resolves it)")
	f.StringVar(&req.CompanyId, "company", "", `company asked for ("biz_...")`)
	f.StringVar(&req.UserId, "user", "", `user asked for ("user_...")`)
	f.StringSliceVar(&scopes, "scope", nil, "scope asked for; repeatable; none means every permission")
	cmd.AddCommand(check)
	return cmd
}
