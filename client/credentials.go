package client

import (
	"context"
	"fmt"

	"golang.org/x/oauth2"
	"google.golang.org/grpc/credentials"
)

// PerRPCCredentials sends ts's token as "authorization: Bearer ..." metadata
// on every gRPC call, for grpc.WithPerRPCCredentials. It asks ts on each
// call, so a [TokenSource] refreshed by tokend takes effect at once.
//
// It requires a connection with privacy and integrity, as bearer tokens
// must not travel in the clear: TLS, or credentials/local on a Unix socket
// or loopback. It is what credentials/oauth.TokenSource{TokenSource: ts}
// does, without that package's Google dependencies, and with the call's
// context bounding the wait for a token.
func PerRPCCredentials(ts oauth2.TokenSource) credentials.PerRPCCredentials {
	return perRPC{ts}
}

type perRPC struct{ ts oauth2.TokenSource }

func (p perRPC) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	ri, _ := credentials.RequestInfoFromContext(ctx)
	if err := credentials.CheckSecurityLevel(ri.AuthInfo, credentials.PrivacyAndIntegrity); err != nil {
		return nil, fmt.Errorf("tokend: refusing to send a token on this connection: %w", err)
	}
	var tok *oauth2.Token
	var err error
	if tc, ok := p.ts.(interface {
		TokenContext(context.Context) (*oauth2.Token, error)
	}); ok {
		tok, err = tc.TokenContext(ctx)
	} else {
		tok, err = p.ts.Token()
	}
	if err != nil {
		return nil, err
	}
	return map[string]string{"authorization": tok.Type() + " " + tok.AccessToken}, nil
}

func (perRPC) RequireTransportSecurity() bool { return true }
