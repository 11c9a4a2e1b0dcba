package handoff

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// logRecorder is a slog handler that keeps messages for assertions.
type logRecorder struct {
	mu   sync.Mutex
	recs []string
}

func (l *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecorder) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *logRecorder) WithGroup(string) slog.Handler            { return l }
func (l *logRecorder) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	l.mu.Lock()
	l.recs = append(l.recs, b.String())
	l.mu.Unlock()
	return nil
}

func (l *logRecorder) find(sub string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, r := range l.recs {
		if strings.Contains(r, sub) {
			return r
		}
	}
	return ""
}

func (l *logRecorder) all() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.recs, "\n")
}

// notifyHarness runs a store's notify socket for one test.
type notifyHarness struct {
	store  *Store
	notify *Notify
	log    *logRecorder
	mu     sync.Mutex
	lines  []string
	pids   []int32 // pids[i] sent lines[i]
}

func startNotify(t *testing.T, opts Options) *notifyHarness {
	t.Helper()
	h := &notifyHarness{log: &logRecorder{}}
	opts.Logger = slog.New(h.log)
	opts.OnNotify = func(pid int32, lines []string) {
		h.mu.Lock()
		for _, l := range lines {
			h.lines = append(h.lines, l)
			h.pids = append(h.pids, pid)
		}
		h.mu.Unlock()
	}
	h.store = New("pod/side", opts)
	// As on a node: the base directory is traversable, the per-pod
	// directory below it is the owner-only fence.
	base := shortDir(t)
	if err := os.Chmod(base, 0o711); err != nil {
		t.Fatal(err)
	}
	n, err := h.store.ListenNotify(filepath.Join(base, "pod", "side.notify"))
	if err != nil {
		t.Fatal(err)
	}
	h.notify = n
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		n.Close()
		h.store.Close()
	})
	return h
}

// send writes one datagram to the notify socket from this process.
func (h *notifyHarness) send(t *testing.T, data string, files ...*os.File) {
	t.Helper()
	sock, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(sock)
	if err := syscall.Sendmsg(sock, []byte(data), rights(files), &syscall.SockaddrUnix{Name: h.notify.Path()}, 0); err != nil {
		t.Fatalf("send %.40q: %v", data, err)
	}
}

// sync sends a STATUS line and waits until OnNotify has seen it: datagrams
// are handled in order, so everything sent before has been handled.
func (h *notifyHarness) sync(t *testing.T) {
	t.Helper()
	tag := fmt.Sprintf("STATUS=sync-%d", time.Now().UnixNano())
	h.send(t, tag)
	h.waitLine(t, tag)
}

func (h *notifyHarness) waitLine(t *testing.T, line string) int32 {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		h.mu.Lock()
		for i, l := range h.lines {
			if l == line {
				pid := h.pids[i]
				h.mu.Unlock()
				return pid
			}
		}
		h.mu.Unlock()
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("notify line %q not seen; log:\n%s", line, h.log.all())
	return 0
}

func tcpListenerFile(t *testing.T) (*os.File, string) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	f, err := dupConn(l.(*net.TCPListener), "l")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, l.Addr().String()
}

func TestNotifySocketIsOwnerOnly(t *testing.T) {
	checkFDs(t)
	h := startNotify(t, Options{})
	fi, err := os.Stat(h.notify.Path())
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 || fi.Mode().Type() != os.ModeSocket {
		t.Errorf("socket mode %v, want socket 0600", fi.Mode())
	}
	di, err := os.Stat(filepath.Dir(h.notify.Path()))
	if err != nil {
		t.Fatal(err)
	}
	if di.Mode().Perm() != 0o700 {
		t.Errorf("dir mode %v, want 0700", di.Mode())
	}
	if h.notify.Env() != "NOTIFY_SOCKET="+h.notify.Path() {
		t.Errorf("Env = %q", h.notify.Env())
	}
}

func TestNotifyStoreRemoveAndPassThrough(t *testing.T) {
	checkFDs(t)
	h := startNotify(t, Options{})
	f, addr := tcpListenerFile(t)
	h.send(t, "FDSTORE=1\nFDNAME=web", f)
	h.send(t, "FDSTORE=1\nFDNAME=web", f) // again: same socket, kept once
	h.send(t, "READY=1")
	if pid := h.waitLine(t, "READY=1"); int(pid) != os.Getpid() {
		t.Errorf("READY=1 from pid %d, want %d", pid, os.Getpid())
	}
	if got := h.store.Names(); strings.Join(got, ",") != "web" {
		t.Fatalf("store names after FDSTORE twice: %v", got)
	}
	f.Close()
	if portFree(addr) {
		t.Fatal("stored listener's port is free after the sender closed its fd")
	}
	h.send(t, "FDSTOREREMOVE=1\nFDNAME=web")
	h.sync(t)
	if n := h.store.Len(); n != 0 {
		t.Fatalf("store holds %d fds after FDSTOREREMOVE", n)
	}
	if !portFree(addr) {
		t.Fatal("port still held after FDSTOREREMOVE")
	}
	h.send(t, "STATUS=hello\nWATCHDOG=1\nFDPOLL=0")
	h.waitLine(t, "WATCHDOG=1")
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, l := range h.lines {
		if strings.HasPrefix(l, "FD") {
			t.Errorf("fd-store line %q passed to OnNotify", l)
		}
	}
}

func TestNotifyDefaultName(t *testing.T) {
	checkFDs(t)
	h := startNotify(t, Options{})
	f, _ := tcpListenerFile(t)
	h.send(t, "FDSTORE=1", f)
	h.sync(t)
	if got := h.store.Names(); strings.Join(got, ",") != "stored" {
		t.Fatalf("names %v, want [stored]", got)
	}
}

// TestNotifyRejectsMalformed sends bad datagrams and checks that each is
// logged with its reason, stores nothing, and has all of its fds closed.
func TestNotifyRejectsMalformed(t *testing.T) {
	for _, tc := range []struct {
		name   string
		data   string
		nfds   int
		reason string
	}{
		{"fds without FDSTORE", "READY=1", 2, "without FDSTORE=1"},
		{"FDSTORE=2", "FDSTORE=2\nFDNAME=x", 1, `FDSTORE="2"`},
		{"store and remove", "FDSTORE=1\nFDSTOREREMOVE=1\nFDNAME=x", 1, "in one message"},
		{"remove without name", "FDSTOREREMOVE=1", 0, "without FDNAME"},
		{"name with colon", "FDSTORE=1\nFDNAME=a:b", 1, "invalid fd name"},
		{"name too long", "FDSTORE=1\nFDNAME=" + strings.Repeat("n", 256), 1, "256 bytes"},
		{"two names", "FDSTORE=1\nFDNAME=a\nFDNAME=b", 1, "twice"},
		{"nul byte", "FDSTORE=1\x00\nFDNAME=a", 1, "NUL byte"},
		{"too many fds", "FDSTORE=1\nFDNAME=a", MaxFiles + 20, "truncated"},
		{"too long", "FDSTORE=1\nFDNAME=a\nSTATUS=" + strings.Repeat("x", 5000), 1, "longer than 4096"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkFDs(t)
			h := startNotify(t, Options{})
			files := pipes(t, max(tc.nfds, 1))[:tc.nfds]
			h.send(t, tc.data, files...)
			h.sync(t)
			if n := h.store.Len(); n != 0 {
				t.Errorf("store holds %d fds", n)
			}
			if r := h.log.find("rejected"); !strings.Contains(r, tc.reason) {
				t.Errorf("log has no rejection with %q:\n%s", tc.reason, h.log.all())
			}
			// Our copies are closed by the pipes cleanup; checkFDs then
			// finds any copy the notify socket kept.
		})
	}
}

// TestNotifyUnauthorizedCannotPlant runs a second process that is not the
// sidecar and tries to store a listener: its datagram is refused with the
// reason logged, its fd closed (the port is free once it exits), and
// nothing reaches the store.
func TestNotifyUnauthorizedCannotPlant(t *testing.T) {
	checkFDs(t)
	self := int32(os.Getpid())
	h := startNotify(t, Options{Authorize: func(pid int32, uid uint32) error {
		if pid != self {
			return fmt.Errorf("pid %d is not the sidecar", pid)
		}
		return nil
	}})
	c := startHelper(t, "plant", false, nil, "NOTIFY_SOCKET="+h.notify.Path(), "HANDOFF_TEST_ADDR=127.0.0.1:0")
	addr, ok := strings.CutPrefix(c.waitLine(t, 20*time.Second), "sent ")
	if !ok {
		t.Fatalf("planter did not report its address")
	}
	if code := c.wait(t, 20*time.Second); code != 0 {
		t.Fatalf("planter exit %d: %s", code, c.stderr)
	}
	h.sync(t)
	if n := h.store.Len(); n != 0 {
		t.Fatalf("unauthorized process planted %d fds: %v", n, h.store.Names())
	}
	r := h.log.find("not authorized")
	if !strings.Contains(r, fmt.Sprintf("pid %d", c.pid())) || !strings.Contains(r, "fds_closed=1") {
		t.Fatalf("refusal not logged with pid %d and closed fd:\n%s", c.pid(), h.log.all())
	}
	if !portFree(addr) {
		t.Fatalf("planted listener %s still open somewhere after the planter exited", addr)
	}
}

// TestNotifyOtherUserCannotConnect runs the planter as another user: the
// owner-only directory keeps it from reaching the socket at all.
func TestNotifyOtherUserCannotConnect(t *testing.T) {
	checkFDs(t)
	h := startNotify(t, Options{})
	bin := copyTestBinary(t)
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=plant", "NOTIFY_SOCKET="+h.notify.Path(), "HANDOFF_TEST_ADDR=127.0.0.1:0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 13 {
		t.Fatalf("planter as uid 65534: %v (want exit 13, EACCES): %s", err, out)
	}
	h.sync(t)
	if h.store.Len() != 0 {
		t.Fatal("store not empty")
	}
}

// copyTestBinary copies the test binary where another user can run it.
func copyTestBinary(t *testing.T) string {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skipf("needs root to run a helper as another user (uid %d)", os.Getuid())
	}
	dir := shortDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "handoff.test")
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

// TestNotifySidecarUser: with a sidecar running as its own user, the
// socket directory belongs to that user (still 0700): the sidecar's user
// can store fds, any other unprivileged user cannot even reach the socket.
func TestNotifySidecarUser(t *testing.T) {
	checkFDs(t)
	bin := copyTestBinary(t)
	h := startNotify(t, Options{
		SidecarUser: &User{UID: 65534, GID: 65534},
		Authorize: func(pid int32, uid uint32) error {
			if uid != 65534 && int(uid) != os.Getuid() {
				return fmt.Errorf("uid %d is not the sidecar's", uid)
			}
			return nil
		},
	})
	st, err := os.Stat(filepath.Dir(h.notify.Path()))
	if err != nil {
		t.Fatal(err)
	}
	if sys := st.Sys().(*syscall.Stat_t); sys.Uid != 65534 || st.Mode().Perm() != 0o700 {
		t.Fatalf("socket dir owned by %d mode %v, want 65534 0700", sys.Uid, st.Mode().Perm())
	}
	run := func(uid uint32) (int, string) {
		cmd := exec.Command(bin, "-test.run=^$")
		cmd.Env = append(os.Environ(), helperEnv+"=plant", "NOTIFY_SOCKET="+h.notify.Path(), "HANDOFF_TEST_ADDR=127.0.0.1:0")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode(), string(out)
		}
		if err != nil {
			t.Fatalf("run as %d: %v", uid, err)
		}
		return 0, string(out)
	}
	if code, out := run(65533); code != 13 {
		t.Fatalf("other user: exit %d, want 13 (EACCES): %s", code, out)
	}
	if code, out := run(65534); code != 0 {
		t.Fatalf("sidecar user: exit %d: %s", code, out)
	}
	h.sync(t)
	if got := h.store.Names(); strings.Join(got, ",") != "planted" {
		t.Fatalf("store holds %v, want the sidecar user's fd", got)
	}
}
