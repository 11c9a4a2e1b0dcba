package handoff

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMOSNOldRoleHandsOverToIndependentNewSide: the store holds a listener
// that sidecar A serves on; A stops (its MOSN is gone), and the store, as
// MOSN's old process, hands the listener to an independent implementation
// of MOSN's new process. A client connecting throughout sees no error, and
// the serving pid changes from A to the new process.
func TestMOSNOldRoleHandsOverToIndependentNewSide(t *testing.T) {
	checkFDs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dir := filepath.Join(shortDir(t), "uds")
	s := New("pod/mosn", Options{Authorize: ProcessTree(os.Getpid)})
	defer s.Close()
	if err := s.Listen(ctx, "web", "tcp://127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	addr := storeAddr(t, s, 0)
	a, _ := startSidecar(t, s)
	l := startLoad(t, addr, 4)
	l.waitFor(t, a.pid(), 50)

	if code := a.terminate(t); code != 0 {
		t.Fatalf("sidecar A exit %d: %s", code, a.stderr)
	}
	done := make(chan error, 1)
	go func() { done <- s.HandOverMOSN(ctx, dir) }()
	// reconfig.sock must exist before the new MOSN looks for it.
	waitPath(t, filepath.Join(dir, MOSNReconfigSocket))
	b := startHelper(t, "mosn-new-peer", false, nil, "HANDOFF_TEST_DIR="+dir)
	if got := b.waitLine(t, 30*time.Second); got != "ready "+addr {
		t.Fatalf("new MOSN says %q, want ready %s", got, addr)
	}
	if err := <-done; err != nil {
		t.Fatalf("HandOverMOSN: %v", err)
	}
	l.waitFor(t, b.pid(), 50)
	l.stop()
	t.Logf("load: %s", l)
	assertNoFailures(t, l)
	if _, err := os.Lstat(filepath.Join(dir, MOSNReconfigSocket)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("reconfig.sock left behind: %v", err)
	}
	if n := s.Len(); n != 1 {
		t.Errorf("store holds %d fds after the hand-over, want its 1", n)
	}
	if code := b.terminate(t); code != 0 {
		t.Fatalf("new MOSN exit %d: %s", code, b.stderr)
	}
}

// TestMOSNNewRoleTakesOverFromIndependentOldSide: an independent
// implementation of MOSN's old process serves on its own listener; this
// package's new side (ReceiveMOSN, in a process of its own) takes the
// listener over under load, the old process exits cleanly after the
// exchange, and no client sees an error.
func TestMOSNNewRoleTakesOverFromIndependentOldSide(t *testing.T) {
	checkFDs(t)
	dir := shortDir(t)
	old := startHelper(t, "mosn-old-peer", false, nil, "HANDOFF_TEST_DIR="+dir, "HANDOFF_TEST_ADDR=127.0.0.1:0")
	addr := strings.TrimPrefix(old.waitLine(t, 30*time.Second), "ready ")
	l := startLoad(t, addr, 4)
	l.waitFor(t, old.pid(), 50)

	nw := startHelper(t, "mosn-new-prod", false, nil, "HANDOFF_TEST_DIR="+dir)
	if got := nw.waitLine(t, 30*time.Second); got != "ready" {
		t.Fatalf("new side says %q", got)
	}
	if code := old.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("old MOSN exit %d: %s", code, old.stderr)
	}
	l.waitFor(t, nw.pid(), 50)
	l.stop()
	t.Logf("load: %s", l)
	assertNoFailures(t, l)
	if code := nw.terminate(t); code != 0 {
		t.Fatalf("new side exit %d: %s", code, nw.stderr)
	}
}

func assertNoFailures(t *testing.T, l *load) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.refused != 0 || l.lost != 0 || len(l.other) != 0 {
		t.Fatalf("clients saw %d refused, %d lost, errors %v", l.refused, l.lost, l.other)
	}
	if len(l.order) < 2 {
		t.Fatalf("serving pid never changed: %v", l.order)
	}
}

func waitPath(t *testing.T, path string) {
	t.Helper()
	for range 1000 {
		if _, err := os.Lstat(path); err == nil {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("%s did not appear", path)
}

// TestMOSNReadyWithoutAck: an old process that never answers the ready
// byte makes Ready fail with ErrNoAck after 3 s (MOSN then exits 2).
func TestMOSNReadyWithoutAck(t *testing.T) {
	checkFDs(t)
	dir := shortDir(t)
	old := startHelper(t, "mosn-old-peer", false, nil, "HANDOFF_TEST_DIR="+dir, "HANDOFF_TEST_ADDR=127.0.0.1:0", "HANDOFF_TEST_NOACK=1")
	old.waitLine(t, 30*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	u, err := ReceiveMOSN(ctx, dir, Options{})
	if err != nil {
		t.Fatalf("ReceiveMOSN: %v", err)
	}
	defer u.Close()
	if len(u.Files) != 1 || !strings.HasPrefix(u.Files[0].Name(), "tcp-127.0.0.1_") {
		t.Fatalf("received %v", u.Files)
	}
	start := time.Now()
	err = u.Ready(ctx)
	if !errors.Is(err, ErrNoAck) {
		t.Fatalf("Ready = %v, want ErrNoAck", err)
	}
	if d := time.Since(start); d < 2900*time.Millisecond {
		t.Fatalf("gave up after %v, before the 3s MOSN allows", d)
	}
	old.terminate(t)
}

// TestMOSNOldRoleRefusesUnauthorizedDialer: a process outside the allowed
// set dialing reconfig.sock gets no start byte (so no fds), the refusal is
// logged, and the hand-over keeps waiting for the real new process.
func TestMOSNOldRoleRefusesUnauthorizedDialer(t *testing.T) {
	checkFDs(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir := shortDir(t)
	rec := &logRecorder{}
	s := New("pod/mosn", Options{
		Authorize: func(pid int32, uid uint32) error { return fmt.Errorf("pid %d is not the sidecar", pid) },
		Logger:    slog.New(rec),
	})
	defer s.Close()
	if err := s.Listen(ctx, "web", "tcp://127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.HandOverMOSN(ctx, dir) }()
	waitPath(t, filepath.Join(dir, MOSNReconfigSocket))
	c := startHelper(t, "obtain", false, nil, "HANDOFF_TEST_DIR="+dir)
	if code := c.wait(t, 20*time.Second); code != 0 {
		t.Fatalf("unauthorized dialer exit %d (3 = got the start byte): %s", code, c.stderr)
	}
	if r := rec.find("refused dialer"); !strings.Contains(r, fmt.Sprintf("pid %d", c.pid())) {
		t.Fatalf("refusal not logged:\n%s", rec.all())
	}
	select {
	case err := <-done:
		t.Fatalf("hand-over ended after a refused dialer: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("HandOverMOSN after cancel = %v", err)
	}
}

// TestMOSNOldRoleRefusesUnauthorizedListenSock: if the process listening on
// listen.sock is not authorized, no fds are sent to it.
func TestMOSNOldRoleRefusesUnauthorizedListenSock(t *testing.T) {
	checkFDs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir := shortDir(t)
	self := int32(os.Getpid())
	s := New("pod/mosn", Options{Authorize: func(pid int32, uid uint32) error {
		if pid == self {
			return nil // the dialer of reconfig.sock (this test) is fine
		}
		return fmt.Errorf("pid %d is not the sidecar", pid)
	}})
	defer s.Close()
	if err := s.Listen(ctx, "web", "tcp://127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.HandOverMOSN(ctx, dir) }()
	waitPath(t, filepath.Join(dir, MOSNReconfigSocket))
	// This test process dials reconfig.sock (allowed); another process
	// (not allowed) owns listen.sock.
	rc, err := net.Dial("unix", filepath.Join(dir, MOSNReconfigSocket))
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var b [1]byte
	if _, err := rc.Read(b[:]); err != nil {
		t.Fatalf("read start byte: %v", err)
	}
	ls := startHelper(t, "listen-sock", false, nil, "HANDOFF_TEST_DIR="+dir)
	code := ls.wait(t, 30*time.Second)
	err = <-done
	if !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("HandOverMOSN = %v, want ErrUnauthorized", err)
	}
	if code != 0 {
		t.Fatalf("listen.sock owner exit %d (3 = it received fds): %s", code, ls.stderr)
	}
}

// TestMOSNReceiveRejectsMalformed feeds receiveMOSNFiles bad fd messages
// on a real socket and checks that every fd that came is closed.
func TestMOSNReceiveRejectsMalformed(t *testing.T) {
	for _, tc := range []struct {
		name string
		data []byte
		nfds int
		want error
	}{
		{"two bytes", []byte{0, 0}, 1, ErrTruncated},
		{"wrong byte", []byte{1}, 1, ErrMalformed},
		{"no fds", []byte{0}, 0, ErrMalformed},
		{"101 fds", []byte{0}, 101, ErrTooManyFiles},
		{"control data truncated", []byte{0}, 120, ErrTruncated},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkFDs(t)
			a, b := sendPipes(t, unix.SOCK_STREAM, tc.data, tc.nfds)
			a.Close()
			before, _ := fdCount(t)
			got, err := receiveMOSNFiles(context.Background(), b)
			if !errors.Is(err, tc.want) {
				closeFiles(got)
				t.Fatalf("receive = %v, %v; want %v", got, err, tc.want)
			}
			if after, desc := fdCount(t); after != before {
				t.Fatalf("%d fds before, %d after: received fds not closed: %v", before, after, desc)
			}
		})
	}
}

func TestMOSNHandOverChecks(t *testing.T) {
	checkFDs(t)
	s := New("pod/mosn", Options{})
	defer s.Close()
	if err := s.HandOverMOSN(context.Background(), shortDir(t)); err == nil || !strings.Contains(err.Error(), "no fds held") {
		t.Fatalf("empty store: %v", err)
	}
	files := pipes(t, MaxFiles+1)
	if err := handOverMOSN(context.Background(), shortDir(t), files, Options{}, slog.Default()); !errors.Is(err, ErrTooManyFiles) {
		t.Fatalf("101 fds: %v", err)
	}
	// A regular file where reconfig.sock goes is not removed.
	dir := shortDir(t)
	os.WriteFile(filepath.Join(dir, MOSNReconfigSocket), nil, 0o600)
	if err := handOverMOSN(context.Background(), dir, files[:1], Options{}, slog.Default()); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("file at reconfig.sock: %v", err)
	}
}

func TestAddrName(t *testing.T) {
	checkFDs(t)
	for _, tc := range []struct{ spec, prefix string }{
		{"tcp://127.0.0.1:0", "tcp-127.0.0.1_"},
		{"tcp://[::1]:0", "tcp-[__1]_"},
	} {
		s := New("pod/x", Options{})
		if err := s.Listen(context.Background(), "l", tc.spec); err != nil {
			s.Close()
			if strings.Contains(tc.spec, "::1") {
				t.Logf("no IPv6 loopback here: %v", err)
				continue
			}
			t.Fatal(err)
		}
		a, _ := s.Activation()
		if got := AddrName(a.Files[0]); !strings.HasPrefix(got, tc.prefix) || ValidName(got) != nil {
			t.Errorf("AddrName(%s) = %q, want prefix %q and a valid name", tc.spec, got, tc.prefix)
		}
		a.Close()
		s.Close()
	}
	p := pipes(t, 1)[0]
	if got := AddrName(p); got != "fd" {
		t.Errorf("AddrName(pipe) = %q", got)
	}
}

func TestMOSNHandOverOneAtATime(t *testing.T) {
	checkFDs(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := New("pod/mosn", Options{Logger: slog.New(slog.DiscardHandler)})
	defer s.Close()
	if err := s.Listen(ctx, "web", "tcp://127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	dir := shortDir(t)
	done := make(chan error, 1)
	go func() { done <- s.HandOverMOSN(ctx, dir) }()
	waitPath(t, filepath.Join(dir, MOSNReconfigSocket))
	if err := s.HandOverMOSN(ctx, dir); !errors.Is(err, ErrBusy) {
		t.Fatalf("second hand-over: %v, want ErrBusy", err)
	}
	cancel()
	<-done
	if _, err := os.Lstat(filepath.Join(dir, MOSNReconfigSocket)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("reconfig.sock left after cancel: %v", err)
	}
}
