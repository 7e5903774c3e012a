package peercred

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

type echoHealth struct {
	healthpb.UnimplementedHealthServer
	got chan *Info
}

func (h *echoHealth) Check(ctx context.Context, _ *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	info, _ := FromContext(ctx)
	h.got <- info
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

// TestHandshakeOverRealSocket: a real gRPC server on a real Unix socket sees
// this process's uid, gid and pid, once per connection.
func TestHandshakeOverRealSocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "pc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(Credentials{}))
	h := &echoHealth{got: make(chan *Info, 2)}
	healthpb.RegisterHealthServer(srv, h)
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)

	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := healthpb.NewHealthClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for range 2 {
		if _, err := c.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	first, second := <-h.got, <-h.got
	if first == nil {
		t.Fatal("handler saw no peer Info")
	}
	if first != second {
		t.Fatal("credentials were read per call, not once per connection")
	}
	if first.UID != uint32(os.Getuid()) || first.GID != uint32(os.Getgid()) || first.PID != int32(os.Getpid()) {
		t.Fatalf("Info = uid %d gid %d pid %d; want %d %d %d", first.UID, first.GID, first.PID, os.Getuid(), os.Getgid(), os.Getpid())
	}
	if !first.InGroup(uint32(os.Getgid())) {
		t.Fatal("InGroup(primary gid) = false")
	}
	exe, err := first.Exe()
	if err != nil {
		t.Fatal(err)
	}
	self, _ := os.Executable()
	if exe != self {
		t.Fatalf("Exe = %q, want %q", exe, self)
	}
}

// TestExeDetectsExitedProcess: once the process behind a pid is gone, Exe
// refuses instead of naming whatever holds the pid now.
func TestExeDetectsExitedProcess(t *testing.T) {
	cmd := exec.Command("sleep", "10")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := int32(cmd.Process.Pid)
	st, err := startTime(pid)
	if err != nil {
		t.Fatal(err)
	}
	exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	info := &Info{PID: pid, startTime: st, exe: exe}
	if _, err := info.Exe(); err != nil {
		t.Fatalf("Exe of a live process: %v", err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	if _, err := info.Exe(); err == nil {
		t.Fatal("Exe succeeded for a process that has exited")
	}
	// A different start time for the same pid is a reused pid.
	self := &Info{PID: int32(os.Getpid()), startTime: 1}
	if _, err := self.Exe(); err == nil {
		t.Fatal("Exe accepted a pid whose start time changed")
	}
}

// TestExeDetectsExec: a process that executes another binary after
// connecting keeps its pid and start time, but not its identity.
func TestExeDetectsExec(t *testing.T) {
	self := &Info{PID: int32(os.Getpid()), exe: "/usr/bin/allowed"}
	self.startTime, _ = startTime(self.PID)
	if _, err := self.Exe(); err == nil {
		t.Fatal("Exe accepted an executable that differs from the one that connected")
	}
}
