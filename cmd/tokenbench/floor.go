package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// floorCommand is the hidden subcommand that runs the floor server; the
// benchmark re-executes its own binary with it so the floor is a separate
// process, as tokend is.
const floorCommand = "floor-server"

// floorService answers every GetToken with the same pre-built Token: what
// remains is the cost of gRPC over a Unix socket, the floor tokend is
// measured against.
type floorService struct {
	tokendv1.UnimplementedTokenServiceServer
	answer *tokendv1.Token
}

var _ tokendv1.TokenServiceServer = (*floorService)(nil)

func (f *floorService) GetToken(context.Context, *tokendv1.GetTokenRequest) (*tokendv1.Token, error) {
	return f.answer, nil
}

// runFloor serves the floor on --socket until ctx ends. --answer is a file
// holding a serialized Token, one of tokend's real answers, so both servers
// send responses of the same size.
func runFloor(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet(floorCommand, flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", "", "Unix socket to serve on")
	answerFile := fs.String("answer", "", "file holding the serialized tokend.v1.Token to return")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *socket == "" || *answerFile == "" {
		return errors.New("--socket and --answer are required")
	}
	b, err := os.ReadFile(*answerFile)
	if err != nil {
		return err
	}
	answer := &tokendv1.Token{}
	if err := proto.Unmarshal(b, answer); err != nil {
		return fmt.Errorf("decode %s: %w", *answerFile, err)
	}
	ln, err := net.Listen("unix", *socket)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	tokendv1.RegisterTokenServiceServer(srv, &floorService{answer: answer})
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve on %s: %w", *socket, err)
	case <-ctx.Done():
		srv.Stop()
		return nil
	}
}
