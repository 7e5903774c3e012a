package client_test

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"time"

	"golang.org/x/oauth2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/local"

	"github.com/tokend/tokend/client"
)

// The three-line integration: a client of the local tokend, a token source
// for one company and scope, and an HTTP client that sends
// "Authorization: Bearer <token>" on every request, always with a valid token.
func ExampleClient_TokenSource() {
	ctx := context.Background()
	c, err := client.New(os.Getenv("TOKEND_SOCKET"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ts := c.TokenSource("biz_123", "chat:read")
	httpClient := oauth2.NewClient(ctx, ts)

	// A stand-in for the Whop API that reports what credentials it got.
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Println("got a bearer token:", strings.HasPrefix(r.Header.Get("Authorization"), "Bearer ey"))
	}))
	defer api.Close()
	resp, err := httpClient.Get(api.URL + "/api/v1/me")
	if err != nil {
		log.Fatal(err)
	}
	resp.Body.Close()
	// Output: got a bearer token: true
}

// One GetToken call, for code that manages tokens itself.
func ExampleClient_Token() {
	c, err := client.New(os.Getenv("TOKEND_SOCKET"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tok, err := c.Token(ctx, client.Request{CompanyID: "biz_123", UserID: "user_456", Scopes: []string{"chat:read"}, MinTTL: 5 * time.Minute})
	if err != nil {
		log.Fatal(err)
	}
	// Printing a Token shows its key id and expiry, never its value.
	fmt.Println("got a token:", tok.Value != "")
	fmt.Println("valid for 5 minutes:", time.Until(tok.ExpiresAt) >= 5*time.Minute)
	// Output:
	// got a token: true
	// valid for 5 minutes: true
}

// A source the caller owns, with a longer margin, closed when done.
func ExampleClient_NewTokenSource() {
	c, err := client.New(os.Getenv("TOKEND_SOCKET"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ts := c.NewTokenSource(client.Request{UserID: "user_456", MinTTL: 10 * time.Minute})
	defer ts.Close()
	tok, err := ts.Token()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("got a token:", tok.Valid(), tok.Type())
	// Output: got a token: true Bearer
}

// Bearer tokens on a gRPC connection to another local service. The
// credentials insist on a private channel: credentials/local on a Unix
// socket qualifies, plain insecure credentials do not.
func ExamplePerRPCCredentials() {
	c, err := client.New(os.Getenv("TOKEND_SOCKET"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	conn, err := grpc.NewClient("unix:///run/myservice/api.sock",
		grpc.WithTransportCredentials(local.NewCredentials()),
		grpc.WithPerRPCCredentials(client.PerRPCCredentials(c.TokenSource("biz_123", "chat:read"))),
	)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	// Every call on conn now carries "authorization: Bearer <token>".
}
