package systemd

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	// Start the runtime's network poller (it keeps an epoll fd and an
	// eventfd for the life of the process) before any test counts fds.
	if c, err := net.ListenPacket("udp", "127.0.0.1:0"); err == nil {
		c.Close()
	}
	goleak.VerifyTestMain(m)
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// notifySocket is a stand-in for systemd's notify socket: a unixgram socket
// the test listens on, collecting every datagram in arrival order.
type notifySocket struct {
	path string
	msgs chan string
}

// listenNotify listens on a fresh unixgram socket and points NOTIFY_SOCKET
// at it for the test. watchdog, if non-zero, sets WATCHDOG_USEC to it and
// WATCHDOG_PID to this process.
func listenNotify(t *testing.T, watchdog time.Duration) *notifySocket {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatalf("listen %s: %v", path, err)
	}
	s := &notifySocket{path: path, msgs: make(chan string, 1024)}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return // closed by cleanup
			}
			s.msgs <- string(buf[:n])
		}
	}()
	t.Cleanup(func() {
		conn.Close()
		wg.Wait()
	})
	t.Setenv("NOTIFY_SOCKET", path)
	if watchdog > 0 {
		t.Setenv("WATCHDOG_USEC", strconv.FormatInt(watchdog.Microseconds(), 10))
		t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	} else {
		t.Setenv("WATCHDOG_USEC", "")
		t.Setenv("WATCHDOG_PID", "")
	}
	return s
}

// next returns the next message, failing the test after d.
func (s *notifySocket) next(t *testing.T, d time.Duration) string {
	t.Helper()
	select {
	case m := <-s.msgs:
		return m
	case <-time.After(d):
		t.Fatalf("no notify message within %v", d)
		return ""
	}
}

// within returns the messages that arrive within d.
func (s *notifySocket) within(d time.Duration) []string {
	var got []string
	deadline := time.After(d)
	for {
		select {
		case m := <-s.msgs:
			got = append(got, m)
		case <-deadline:
			return got
		}
	}
}

// runWatchdog starts n.Watchdog and returns a stop function that cancels it
// and returns its result.
func runWatchdog(t *testing.T, n *Notifier, health func(context.Context) error) func() error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Watchdog(ctx, health) }()
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(10 * time.Second):
			return errors.New("Watchdog did not return within 10s of cancel")
		}
	}
	t.Cleanup(func() { _ = stop() })
	return stop
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// checkFDs fails the test if it ends with more or fewer open fds than it
// started with. Call it first: cleanups run last-registered first, so the
// count is taken after every other cleanup has closed its sockets.
func checkFDs(t *testing.T) {
	t.Helper()
	before := openFDs(t)
	t.Cleanup(func() {
		if after := openFDs(t); after != before {
			t.Errorf("open fds: %d before, %d after", before, after)
		}
	})
}

// TestNotifyOrder checks the sequence systemd sees: nothing before Ready
// (not even a watchdog ping), READY=1, then WATCHDOG=1 pings, then
// STOPPING=1 and no ping after it.
func TestNotifyOrder(t *testing.T) {
	checkFDs(t)
	const wd = 200 * time.Millisecond // pings every 100ms
	sock := listenNotify(t, wd)
	n := NewNotifier(quiet)
	var checks atomic.Int32
	stop := runWatchdog(t, n, func(context.Context) error { checks.Add(1); return nil })

	if got := sock.within(3 * wd); len(got) != 0 {
		t.Fatalf("messages before Ready: %q", got)
	}
	if checks.Load() != 0 {
		t.Fatalf("health checked %d times before Ready", checks.Load())
	}
	if err := n.Ready(); err != nil {
		t.Fatalf("Ready: %v", err)
	}
	if got := sock.next(t, 5*time.Second); got != "READY=1" {
		t.Fatalf("first message %q, want READY=1", got)
	}
	for i := range 3 {
		if got := sock.next(t, 5*time.Second); got != "WATCHDOG=1" {
			t.Fatalf("message %d after READY=1 is %q, want WATCHDOG=1", i+1, got)
		}
	}
	if err := n.Stopping(); err != nil {
		t.Fatalf("Stopping: %v", err)
	}
	// A ping sent while Stopping was being called may precede STOPPING=1;
	// nothing but STOPPING=1 may follow it.
	var after []string
	for _, m := range sock.within(4 * wd) {
		if m == "STOPPING=1" || len(after) > 0 {
			after = append(after, m)
		} else if m != "WATCHDOG=1" {
			t.Fatalf("unexpected message %q before STOPPING=1", m)
		}
	}
	if !slices.Equal(after, []string{"STOPPING=1"}) {
		t.Fatalf("from STOPPING=1 on got %q, want only STOPPING=1", after)
	}
	if err := stop(); err != nil {
		t.Fatalf("Watchdog: %v", err)
	}
}

// TestWatchdogWithheldWhileUnhealthy checks pings stop while health fails,
// the reason shows as the status, and pings and status come back with
// health.
func TestWatchdogWithheldWhileUnhealthy(t *testing.T) {
	checkFDs(t)
	const wd = 200 * time.Millisecond
	sock := listenNotify(t, wd)
	n := NewNotifier(quiet)
	var sick atomic.Bool
	stop := runWatchdog(t, n, func(context.Context) error {
		if sick.Load() {
			return errors.New("pod web-1: supervisor loop stuck")
		}
		return nil
	})
	if err := n.Status("supervising 2 pods"); err != nil {
		t.Fatal(err)
	}
	if err := n.Ready(); err != nil {
		t.Fatal(err)
	}
	want := []string{"STATUS=supervising 2 pods", "READY=1", "WATCHDOG=1"}
	for _, w := range want {
		if got := sock.next(t, 5*time.Second); got != w {
			t.Fatalf("got %q, want %q", got, w)
		}
	}

	sick.Store(true)
	// Pings already decided on may still arrive; the first failed check
	// announces itself with a status, and no ping may follow it.
	for {
		m := sock.next(t, 5*time.Second)
		if m == "WATCHDOG=1" {
			continue
		}
		if want := "STATUS=unhealthy, watchdog pings withheld: pod web-1: supervisor loop stuck"; m != want {
			t.Fatalf("got %q, want %q", m, want)
		}
		break
	}
	if got := sock.within(5 * wd); len(got) != 0 {
		t.Fatalf("messages while unhealthy for 5 watchdog periods: %q", got)
	}

	sick.Store(false)
	if got := sock.next(t, 5*time.Second); got != "WATCHDOG=1" {
		t.Fatalf("after recovery got %q, want WATCHDOG=1", got)
	}
	if got := sock.next(t, 5*time.Second); got != "STATUS=supervising 2 pods" {
		t.Fatalf("after recovery got %q, want the previous status back", got)
	}
	if got := sock.next(t, 5*time.Second); got != "WATCHDOG=1" {
		t.Fatalf("pings did not resume: got %q", got)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

// TestWatchdogHealthDeadline checks a health check that hangs counts as a
// failure: the check gets half the watchdog interval, not forever.
func TestWatchdogHealthDeadline(t *testing.T) {
	const wd = 200 * time.Millisecond
	sock := listenNotify(t, wd)
	n := NewNotifier(quiet)
	stop := runWatchdog(t, n, func(ctx context.Context) error {
		<-ctx.Done()
		return ctx.Err()
	})
	if err := n.Ready(); err != nil {
		t.Fatal(err)
	}
	if got := sock.next(t, 5*time.Second); got != "READY=1" {
		t.Fatalf("got %q", got)
	}
	if got := sock.next(t, 5*time.Second); !strings.HasPrefix(got, "STATUS=unhealthy") || !strings.Contains(got, "deadline exceeded") {
		t.Fatalf("got %q, want an unhealthy status naming the deadline", got)
	}
	if got := sock.within(4 * wd); len(got) != 0 {
		t.Fatalf("messages while health hangs: %q", got)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

// TestWithoutServiceManager checks every method is a no-op without
// NOTIFY_SOCKET, and the watchdog neither pings nor checks health.
func TestWithoutServiceManager(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("WATCHDOG_USEC", "100000")
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	n := NewNotifier(quiet)
	if n.Enabled() {
		t.Fatal("Enabled without NOTIFY_SOCKET")
	}
	var checks atomic.Int32
	stop := runWatchdog(t, n, func(context.Context) error { checks.Add(1); return nil })
	for name, f := range map[string]func() error{
		"Ready": n.Ready, "Reloading": n.Reloading, "Stopping": n.Stopping,
		"Status": func() error { return n.Status("x") },
	} {
		if err := f(); err != nil {
			t.Errorf("%s without NOTIFY_SOCKET: %v", name, err)
		}
	}
	time.Sleep(300 * time.Millisecond)
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if c := checks.Load(); c != 0 {
		t.Errorf("health checked %d times without a service manager", c)
	}
}

// TestWatchdogNotArmed covers a service manager without a watchdog for this
// process, and malformed watchdog variables.
func TestWatchdogNotArmed(t *testing.T) {
	tests := []struct {
		name, usec, pid string
		wantErr         string // "" means: no pings, nil on cancel
	}{
		{"no WatchdogSec", "", "", ""},
		{"watchdog for another pid", "100000", "1", ""},
		{"malformed WATCHDOG_USEC", "abc", "", `WATCHDOG_USEC="abc"`},
		{"negative WATCHDOG_USEC", "-5", "", `WATCHDOG_USEC="-5"`},
		{"malformed WATCHDOG_PID", "100000", "me", `WATCHDOG_PID="me"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock := listenNotify(t, 0)
			t.Setenv("WATCHDOG_USEC", tt.usec)
			t.Setenv("WATCHDOG_PID", tt.pid)
			n := NewNotifier(quiet)
			if err := n.Ready(); err != nil {
				t.Fatal(err)
			}
			if got := sock.next(t, 5*time.Second); got != "READY=1" {
				t.Fatalf("got %q", got)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 400*time.Millisecond)
			defer cancel()
			err := n.Watchdog(ctx, nil)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Watchdog: %v", err)
				}
				if got := sock.within(0); len(got) != 0 {
					t.Fatalf("pings without an armed watchdog: %q", got)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Watchdog error %v, want one naming %s", err, tt.wantErr)
			}
		})
	}
}

func TestMessages(t *testing.T) {
	tests := []struct {
		name  string
		call  func(n *Notifier) error
		check func(t *testing.T, msg string)
	}{
		{"status", func(n *Notifier) error { return n.Status("supervising 3 pods") }, equals("STATUS=supervising 3 pods")},
		{"status stays one assignment", func(n *Notifier) error { return n.Status("bad\nREADY=1\r\nSTOPPING=1") },
			equals("STATUS=bad READY=1 STOPPING=1")},
		{"stopping", (*Notifier).Stopping, equals("STOPPING=1")},
		{"reloading", (*Notifier).Reloading, func(t *testing.T, msg string) {
			t.Helper()
			lines := strings.Split(msg, "\n")
			if len(lines) != 2 || lines[0] != "RELOADING=1" || !strings.HasPrefix(lines[1], "MONOTONIC_USEC=") {
				t.Fatalf("got %q, want RELOADING=1 and MONOTONIC_USEC", msg)
			}
			usec, err := strconv.ParseInt(strings.TrimPrefix(lines[1], "MONOTONIC_USEC="), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			var ts unix.Timespec
			if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
				t.Fatal(err)
			}
			if now := ts.Nano() / 1e3; usec > now || now-usec > 5e6 {
				t.Fatalf("MONOTONIC_USEC=%d, monotonic now %d", usec, now)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock := listenNotify(t, 0)
			if err := tt.call(NewNotifier(quiet)); err != nil {
				t.Fatal(err)
			}
			tt.check(t, sock.next(t, 5*time.Second))
		})
	}
}

func equals(want string) func(*testing.T, string) {
	return func(t *testing.T, got string) {
		t.Helper()
		if got != want {
			t.Fatalf("got %q, want %q", got, want)
		}
	}
}

// TestNotifyError checks a socket nobody listens on is reported, naming it.
func TestNotifyError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gone.sock")
	t.Setenv("NOTIFY_SOCKET", path)
	err := NewNotifier(quiet).Ready()
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "READY=1") {
		t.Fatalf("Ready to a missing socket: %v, want an error naming READY=1 and %s", err, path)
	}
}

func TestChildEnv(t *testing.T) {
	in := []string{"PATH=/bin", "NOTIFY_SOCKET=/run/systemd/notify", "WATCHDOG_USEC=30000000",
		"WATCHDOG_PID=1", "NOTIFY_SOCKETX=keep", "HOME=/root"}
	orig := slices.Clone(in)
	got := ChildEnv(in)
	want := []string{"PATH=/bin", "NOTIFY_SOCKETX=keep", "HOME=/root"}
	if !slices.Equal(got, want) {
		t.Fatalf("ChildEnv = %q, want %q", got, want)
	}
	if !slices.Equal(in, orig) {
		t.Fatalf("ChildEnv modified its input: %q", in)
	}
}
