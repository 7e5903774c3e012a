package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	tokendv1 "github.com/tokend/tokend/proto/tokend/v1"
)

// A burst child is this test binary run again as another uid, so that a
// test can load tokend as a neighbour would: TOKEND_E2E_CHILD=burst makes
// TestMain run burstChild instead of the tests.
const childEnv = "TOKEND_E2E_CHILD"

// burstSpec is what a burst child does: Calls cold misses of distinct
// companies named Prefix+i, each with Deadline, spread evenly over Spread.
type burstSpec struct {
	Socket   string
	Prefix   string
	Calls    int
	Deadline time.Duration
	Spread   time.Duration
}

// burstResult counts the child's answers by gRPC code name.
type burstResult struct {
	Codes map[string]int
}

// runChild runs the child this process was started as, if any, and
// reports whether it was one.
func runChild() bool {
	if os.Getenv(childEnv) != "burst" {
		return false
	}
	var spec burstSpec
	if err := json.Unmarshal([]byte(os.Getenv(childEnv+"_SPEC")), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "burst child:", err)
		os.Exit(2)
	}
	res, err := burst(spec)
	if err != nil {
		fmt.Fprintln(os.Stderr, "burst child:", err)
		os.Exit(1)
	}
	_ = json.NewEncoder(os.Stdout).Encode(res)
	return true
}

func burst(spec burstSpec) (burstResult, error) {
	conn, err := grpc.NewClient("unix:"+spec.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return burstResult{}, err
	}
	defer conn.Close()
	tc := tokendv1.NewTokenServiceClient(conn)
	res := burstResult{Codes: map[string]int{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	gap := spec.Spread / time.Duration(max(spec.Calls, 1))
	for i := range spec.Calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), spec.Deadline)
			defer cancel()
			_, err := tc.GetToken(ctx, &tokendv1.GetTokenRequest{CompanyId: spec.Prefix + strconv.Itoa(i)})
			mu.Lock()
			res.Codes[status.Code(err).String()]++
			mu.Unlock()
		}()
		time.Sleep(gap)
	}
	wg.Wait()
	return res, nil
}

// startBurst starts a burst child as uid/gid and returns a func that waits
// for its result.
func (e *env) startBurst(uid, gid uint32, spec burstSpec) func() burstResult {
	e.t.Helper()
	spec.Socket = e.socket
	js, err := json.Marshal(spec)
	must(e.t, err)
	cmd := exec.Command(helperBinary(e.t), "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=burst", childEnv+"_SPEC="+string(js))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	must(e.t, err)
	must(e.t, cmd.Start())
	return func() burstResult {
		e.t.Helper()
		var res burstResult
		if err := json.NewDecoder(out).Decode(&res); err != nil {
			e.t.Fatalf("burst child: %v", err)
		}
		must(e.t, cmd.Wait())
		return res
	}
}

// TestNeighbourAbandonedMisses: one uid's 3-second burst of 1,000 cold
// misses with 300 ms deadlines (the reported attack blocked new keys for
// everyone for 99 s with 1,040 upstream calls) costs the credential no more
// than that uid's share, and root's new key is served at once.
func TestNeighbourAbandonedMisses(t *testing.T) {
	e := newEnv(t)
	e.openToOthers()
	e.start("--socket-mode", "0666") // the default upstream budget: 1.5/s, burst 5
	wait := e.startBurst(nobodyUID, nobodyUID, burstSpec{Prefix: "biz_flood", Calls: 1000, Deadline: 300 * time.Millisecond, Spread: 3 * time.Second})
	time.Sleep(time.Second) // into the burst
	mid := e.status(t)
	start := time.Now()
	rootCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := e.tokens().GetToken(rootCtx, &tokendv1.GetTokenRequest{CompanyId: "biz_root"})
	took := time.Since(start)
	must(t, err)
	res := wait()
	st := e.status(t)
	calls := e.fake.CallCount()
	t.Logf("nobody: 1000 misses with 300ms deadlines over 3s: %v; root's new key served in %v during the burst; %d upstream calls in all; status: %d misses rate-limited, %d abandoned, queue mid-burst %d %v",
		res.Codes, took.Round(time.Millisecond), calls, st.MissesRateLimited, st.AbandonedCalls, mid.Credentials[0].Queued, mid.Credentials[0].QueuedBy)
	if took > 2*time.Second {
		t.Fatalf("root's new key took %v behind nobody's burst", took)
	}
	// nobody's share: half the burst (3) and half the rate (0.75/s) over
	// the 3 s, plus root's own call.
	if calls > 10 {
		t.Fatalf("%d upstream calls: the burst spent more than its uid's share", calls)
	}
	if n := st.Credentials[0].Queued; n != 0 {
		t.Fatalf("%d calls still queued after every caller left", n)
	}
}

// TestNeighbourCapacity: with --max-entries 100 and no policy, nobody
// minting 200 keys evicts its own entries, not root's 20; after a restart
// the owners are remembered.
func TestNeighbourCapacity(t *testing.T) {
	e := newEnv(t)
	e.openToOthers()
	flags := append(fast, "--socket-mode", "0666", "--max-entries", "100")
	d := e.start(flags...)
	tc := e.tokens()
	warm(t, tc, 20)
	res := e.startBurst(nobodyUID, nobodyUID, burstSpec{Prefix: "biz_fill", Calls: 200, Deadline: 10 * time.Second, Spread: time.Second})()
	if res.Codes["OK"] != 200 {
		t.Fatalf("nobody's 200 keys: %v", res.Codes)
	}
	check := func(when string) {
		t.Helper()
		before := e.fake.CallCount()
		warm(t, tc, 20)
		st := e.status(t)
		t.Logf("%s: root's 20 keys cost %d upstream calls; %d entries, %d evicted over capacity", when, e.fake.CallCount()-before, st.Entries, st.EvictedOverCapacity)
		if n := e.fake.CallCount() - before; n != 0 {
			t.Fatalf("%s: %d of root's 20 keys had been evicted by nobody's", when, n)
		}
	}
	check("after nobody's 200 keys")
	d.stop()
	e.start(flags...)
	e.startBurst(nobodyUID, nobodyUID, burstSpec{Prefix: "biz_more", Calls: 100, Deadline: 10 * time.Second, Spread: time.Second})()
	check("after a restart and 100 more of nobody's")
}
