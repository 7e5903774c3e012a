package server

import (
	"errors"
	"io"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// MaxSubscriptions bounds the keys one WatchTokens stream may watch at once.
const MaxSubscriptions = 10_000

// WatchTokens serves many watches on one stream: a client with thousands
// of subjects holds one stream, not one per subject (which would also use
// up the connection's stream limit and block its unary calls). One
// goroutine sends; subscriptions that need a mint first get it in their
// own goroutine, so one slow key never delays the others' updates.
func (t *tokenService) WatchTokens(stream tokendv1.TokenService_WatchTokensServer) error {
	ctx := stream.Context()
	m := &mux{signal: make(chan struct{}, 1), changed: make(map[uint64]struct{})}
	reqs := make(chan *tokendv1.WatchTokensRequest)
	recvErr := make(chan error, 1)
	go func() {
		for {
			req, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case reqs <- req:
			case <-ctx.Done():
				return
			}
		}
	}()
	subs := make(map[uint64]*subscription)
	starting := make(map[uint64]bool) // id -> still wanted
	started := make(chan startedSub)
	defer func() {
		for _, sub := range subs {
			sub.stop()
		}
	}()
	end := func(id uint64, err error) error {
		st := status.Convert(err)
		return stream.Send(&tokendv1.WatchTokensResponse{Id: id, EndCode: int32(st.Code()), EndMessage: st.Message()})
	}
	for {
		select {
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return nil // the client is done
			}
			return err
		case req := <-reqs:
			switch op := req.GetOp().(type) {
			case *tokendv1.WatchTokensRequest_Subscribe:
				id := op.Subscribe.GetId()
				_, live := subs[id]
				switch {
				case live || starting[id]:
					if err := end(id, status.Errorf(codes.InvalidArgument, "subscribe: id %d is already in use on this stream", id)); err != nil {
						return err
					}
					continue
				case len(subs)+len(starting) >= MaxSubscriptions:
					if err := end(id, status.Errorf(codes.ResourceExhausted, "subscribe: a stream watches at most %d keys; open another stream", MaxSubscriptions)); err != nil {
						return err
					}
					continue
				case op.Subscribe.GetRequest() == nil:
					if err := end(id, status.Error(codes.InvalidArgument, "subscribe: request is required")); err != nil {
						return err
					}
					continue
				}
				starting[id] = true
				go func() {
					sub, first, err := t.s.subscribe(ctx, op.Subscribe.GetRequest(), func() { m.mark(id) })
					select {
					case started <- startedSub{id, sub, first, err}:
					case <-ctx.Done():
						if sub != nil {
							sub.stop()
						}
					}
				}()
			case *tokendv1.WatchTokensRequest_Unsubscribe:
				id := op.Unsubscribe
				if sub := subs[id]; sub != nil {
					sub.stop()
					delete(subs, id)
				} else if starting[id] {
					starting[id] = false
				}
			case *tokendv1.WatchTokensRequest_Touch:
				for _, id := range op.Touch.GetIds() {
					if sub := subs[id]; sub != nil {
						sub.w.Touch()
					}
				}
			}
		case r := <-started:
			wanted := starting[r.id]
			delete(starting, r.id)
			switch {
			case !wanted:
				if r.sub != nil {
					r.sub.stop()
				}
			case r.err != nil:
				if err := end(r.id, r.err); err != nil {
					return err
				}
			default:
				subs[r.id] = r.sub
				if err := stream.Send(&tokendv1.WatchTokensResponse{Id: r.id, Token: r.first}); err != nil {
					return err
				}
				m.mark(r.id) // anything that changed since
			}
		case <-m.signal:
			for _, id := range m.take() {
				sub := subs[id]
				if sub == nil {
					continue
				}
				for {
					tok, endErr, ok := sub.next()
					if !ok {
						break
					}
					if endErr != nil {
						sub.stop()
						delete(subs, id)
						if err := end(id, endErr); err != nil {
							return err
						}
						break
					}
					if err := stream.Send(&tokendv1.WatchTokensResponse{Id: id, Token: tok}); err != nil {
						return err
					}
				}
			}
		}
	}
}

type startedSub struct {
	id    uint64
	sub   *subscription
	first *tokendv1.Token
	err   error
}

// mux collects which subscriptions of a stream changed, for its sender.
// mark is called by the refresher's notifications and never blocks.
type mux struct {
	signal  chan struct{}
	mu      sync.Mutex
	changed map[uint64]struct{}
}

func (m *mux) mark(id uint64) {
	m.mu.Lock()
	m.changed[id] = struct{}{}
	m.mu.Unlock()
	select {
	case m.signal <- struct{}{}:
	default:
	}
}

func (m *mux) take() []uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	ids := make([]uint64, 0, len(m.changed))
	for id := range m.changed {
		ids = append(ids, id)
	}
	clear(m.changed)
	return ids
}
