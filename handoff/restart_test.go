package handoff

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// startSidecar starts the "serve" helper through the exec shim with the
// store's listeners, closes the activation's duplicates as the agent does,
// and waits for it to serve. It returns the child and its "ready" line.
func startSidecar(t *testing.T, s *Store, env ...string) (*child, string) {
	t.Helper()
	a, err := s.Activation()
	if err != nil {
		t.Fatal(err)
	}
	c := startHelper(t, "serve", true, a.Files, append(a.Env(), env...)...)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	return c, c.waitLine(t, 30*time.Second)
}

// TestActivationPassesListenersToSidecar: agent-opened listeners (tcp and
// unix) reach a sidecar started through the shim as LISTEN_FDS with their
// names, and the sidecar serves on them.
func TestActivationPassesListenersToSidecar(t *testing.T) {
	checkFDs(t)
	ctx := context.Background()
	s := New("pod/side", Options{})
	defer s.Close()
	sock := filepath.Join(shortDir(t), "web.sock")
	if err := s.Listen(ctx, "web", "tcp://127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	if err := s.Listen(ctx, "local", "unix://"+sock); err != nil {
		t.Fatal(err)
	}
	addr := storeAddr(t, s, 0)
	c, ready := startSidecar(t, s)
	if want := "ready local=" + sock + ",web=" + addr; ready != want {
		t.Fatalf("sidecar says %q, want %q", ready, want)
	}
	for _, target := range []struct{ network, addr string }{{"tcp", addr}, {"unix", sock}} {
		pid, err := askPID(target.network, target.addr)
		if err != nil || pid != c.pid() {
			t.Errorf("%s %s served by pid %d (%v), want sidecar %d", target.network, target.addr, pid, err, c.pid())
		}
	}
	if code := c.terminate(t); code != 0 {
		t.Fatalf("sidecar exit %d: %s", code, c.stderr)
	}
}

// TestSidecarWithoutShimGetsNoListeners: without the shim LISTEN_PID is
// missing, so the sidecar must not take fds meant for another process.
func TestSidecarWithoutShimGetsNoListeners(t *testing.T) {
	checkFDs(t)
	s := New("pod/side", Options{})
	defer s.Close()
	if err := s.Listen(context.Background(), "web", "tcp://127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	a, err := s.Activation()
	if err != nil {
		t.Fatal(err)
	}
	// LISTEN_PID names the test process, not the child.
	env := append(a.Env(), "LISTEN_PID="+strconv.Itoa(os.Getpid()), "HANDOFF_TEST_ADDR=127.0.0.1:0")
	c := startHelper(t, "serve", false, a.Files, env...)
	a.Close()
	ready := c.waitLine(t, 30*time.Second)
	if ready == "ready web="+storeAddr(t, s, 0) {
		t.Fatalf("sidecar took the fds although LISTEN_PID is not its pid")
	}
	c.terminate(t)
}

// TestCrashRestartWithNotifyStore is the fd-store path end to end: a
// sidecar stores its own listener with FDSTORE=1, is killed with SIGKILL
// under load, and its successor gets the listener back through LISTEN_FDS.
// No client connection is refused; only requests the killed process had
// already accepted can fail.
func TestCrashRestartWithNotifyStore(t *testing.T) {
	checkFDs(t)
	h := startNotify(t, Options{Authorize: ProcessTree(os.Getpid)})
	// First start: nothing held yet, the sidecar listens itself.
	a := startHelper(t, "serve", true, nil, h.notify.Env(), "HANDOFF_TEST_ADDR=127.0.0.1:0")
	ready := a.waitLine(t, 30*time.Second)
	addr := strings.TrimPrefix(ready, "ready web=")
	if got := h.waitLine(t, "READY=1"); int(got) != a.pid() {
		t.Fatalf("READY=1 from pid %d, want %d", got, a.pid())
	}
	if got := h.store.Names(); strings.Join(got, ",") != "web" {
		t.Fatalf("store holds %v after FDSTORE", got)
	}
	l := startLoad(t, addr, 4)
	l.waitFor(t, a.pid(), 50)

	a.cmd.Process.Signal(syscall.SIGKILL)
	a.wait(t, 10*time.Second)
	time.Sleep(200 * time.Millisecond) // connections queue meanwhile
	b, _ := startSidecar(t, h.store, h.notify.Env())
	l.waitFor(t, b.pid(), 50)
	l.stop()
	t.Logf("load: %s", l)
	l.mu.Lock()
	refused, other := l.refused, l.other
	l.mu.Unlock()
	if refused != 0 || len(other) != 0 {
		t.Fatalf("clients saw %d refused connections and errors %v across the crash", refused, other)
	}
	// The successor stored the same socket again: still one fd.
	h.sync(t)
	if n := h.store.Len(); n != 1 {
		t.Fatalf("store holds %d fds after the restart, want 1", n)
	}
	if code := b.terminate(t); code != 0 {
		t.Fatalf("sidecar exit %d: %s", code, b.stderr)
	}
}

// TestCrashRestartWithoutStoreRefuses is the control for the test above:
// the same crash without a held listener must show refused connections,
// which proves the load client can see them.
func TestCrashRestartWithoutStoreRefuses(t *testing.T) {
	checkFDs(t)
	a := startHelper(t, "serve", false, nil, "NOTIFY_SOCKET=", "HANDOFF_TEST_ADDR=127.0.0.1:0")
	addr := strings.TrimPrefix(a.waitLine(t, 30*time.Second), "ready web=")
	l := startLoad(t, addr, 4)
	l.waitFor(t, a.pid(), 50)
	a.cmd.Process.Signal(syscall.SIGKILL)
	a.wait(t, 10*time.Second)
	time.Sleep(300 * time.Millisecond)
	b := startHelper(t, "serve", false, nil, "NOTIFY_SOCKET=", "HANDOFF_TEST_ADDR="+addr)
	b.waitLine(t, 30*time.Second)
	l.waitFor(t, b.pid(), 50)
	l.stop()
	t.Logf("load: %s", l)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.refused == 0 {
		t.Fatalf("no refused connections without a held listener: the load client cannot see refusals")
	}
	b.terminate(t)
}
