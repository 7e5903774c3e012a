// Package policy is tokend's local access policy: which local users and
// groups may ask for tokens of which credentials, subjects and scopes. A
// loaded Policy denies everything it does not allow, so an empty rules list
// (`rules: []`) denies every request; without any policy, tokend does not
// call this package and the socket's mode and group are the only boundary.
//
// # File format
//
// The policy is a YAML file. Unknown fields, duplicate fields, anchors that
// expand beyond reason and more than one YAML document are errors, and every
// error names the file and line ("/etc/tokend/policy.yaml:12: ..."). A
// complete example:
//
//	# /etc/tokend/policy.yaml
//	rules:
//	  - name: billing-service          # required, unique; named in decisions and denials
//	    users: [billing, 1001]         # local user names or numeric uids
//	    groups: [payments]             # local group names or numeric gids
//	    exe: /usr/local/bin/billing    # optional: the caller's executable must be exactly this path
//	    credentials: [default]         # optional: absent = only "default"; ["*"] = every credential
//	    subjects:
//	      companies: ["biz_*"]         # company_id patterns; absent = naming a company is not allowed
//	      users: ["user_abc123"]       # user_id patterns; absent = naming a user is not allowed
//	    scopes: ["chat:read", "dms:*"] # every requested scoped_action must match one pattern
//	    all_scopes: false              # true allows an empty scope list (= all permissions of the key)
//
//	  - name: support-oauth            # a rule for an oauth_user credential, which names no ids
//	    groups: [support]
//	    credentials: [support-oauth]
//	    scopes: ["chat:*"]
//
// # Matching
//
// A rule applies to a caller whose uid is in users, or whose primary gid or
// any supplementary gid is in groups; every rule must list at least one of
// the two. User and group names are resolved to ids when the file is
// parsed, so renaming or creating accounts takes effect on the next reload.
// Numbers, quoted or not, are ids and need not exist in /etc/passwd.
//
// A request is allowed when some applicable rule allows all of:
//   - the credential (an empty credential in the Request means "default");
//   - the company_id, when one is given, by a companies pattern;
//   - the user_id, when one is given, by a users pattern (a request naming
//     both needs both to match the same rule);
//   - every requested scope, each matching some scopes pattern; an empty
//     scope list asks for every permission of the key and needs
//     all_scopes: true. Since such a token is a superset of any scoped
//     one, all_scopes: true also allows any non-empty scope list;
//   - the caller's executable, when the rule names exe.
//
// Patterns use path.Match syntax (*, ?, [a-z], \ escapes) and are checked
// when the file is parsed; * does not match "/". The exe must be an
// absolute, clean path as the kernel reports it in /proc/PID/exe: symlinks
// resolved, and a binary replaced on disk since the caller started no longer
// matches ("... (deleted)"). A rule whose subjects are both absent still
// allows requests that name no ids, as an oauth_user credential requires.
//
// Check is safe for concurrent use and does not allocate when it allows a
// request. A Policy never changes; reload by parsing a new one and swapping
// the pointer.
package policy
