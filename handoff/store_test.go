package handoff

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestParseSpec(t *testing.T) {
	for _, tc := range []struct {
		spec string
		want Spec
		err  string
	}{
		{"tcp://0.0.0.0:8080", Spec{"tcp", "0.0.0.0:8080"}, ""},
		{"tcp://[::1]:9000", Spec{"tcp", "[::1]:9000"}, ""},
		{"tcp4://127.0.0.1:0", Spec{"tcp4", "127.0.0.1:0"}, ""},
		{"tcp6://[::]:80", Spec{"tcp6", "[::]:80"}, ""},
		{"tcp://:8080", Spec{"tcp", ":8080"}, ""},
		{"unix:///run/pod/web.sock", Spec{"unix", "/run/pod/web.sock"}, ""},
		{"", Spec{}, "missing scheme"},
		{"0.0.0.0:8080", Spec{}, "missing scheme"},
		{"udp://0.0.0.0:53", Spec{}, `unknown scheme "udp"`},
		{"tcp://0.0.0.0", Spec{}, "missing port"},
		{"tcp://0.0.0.0:", Spec{}, "missing port"},
		{"tcp://0.0.0.0:99999", Spec{}, "bad port"},
		{"tcp://localhost:80", Spec{}, "not an IP address"},
		{"tcp://0.0.0.0:80/path", Spec{}, "has a path"},
		{"tcp://0.0.0.0:80?x=1", Spec{}, "only scheme://address"},
		{"unix://relative/sock", Spec{}, "absolute path"},
		{"unix:///run/../x.sock", Spec{}, "not absolute and clean"},
	} {
		t.Run(tc.spec, func(t *testing.T) {
			got, err := ParseSpec(tc.spec)
			if tc.err != "" {
				if !errors.Is(err, ErrBadSpec) || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("ParseSpec(%q) = %v, %v; want ErrBadSpec containing %q", tc.spec, got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseSpec(%q) = %v, %v; want %v", tc.spec, got, err, tc.want)
			}
			if again, err := ParseSpec(got.String()); err != nil || again != got {
				t.Fatalf("String() = %q does not parse back: %v, %v", got.String(), again, err)
			}
		})
	}
}

// storeAddr returns the address of the listener the store holds at index i.
func storeAddr(t *testing.T, s *Store, i int) string {
	t.Helper()
	a, err := s.Activation()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	l, err := net.FileListener(a.Files[i])
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// portFree reports whether addr can be bound again, i.e. nobody holds it.
func portFree(addr string) bool {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	l.Close()
	return true
}

func TestStoreListenHoldsAndRemoveReleases(t *testing.T) {
	checkFDs(t)
	ctx := context.Background()
	dir := shortDir(t)
	s := New("pod/side", Options{})
	defer s.Close()
	sock := filepath.Join(dir, "web.sock")
	if err := s.Listen(ctx, "web", "tcp://127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	if err := s.Listen(ctx, "local", "unix://"+sock); err != nil {
		t.Fatal(err)
	}
	addr := storeAddr(t, s, 0)
	// Connections are queued by the kernel although nobody accepts yet.
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatalf("dial held listener with no sidecar: %v", err)
	}
	c.Close()
	u, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("dial held unix listener: %v", err)
	}
	u.Close()

	// Same name and spec again: no-op. Same name, other spec: refused.
	if err := s.Listen(ctx, "web", "tcp://127.0.0.1:0"); err != nil {
		t.Fatalf("re-listen same spec: %v", err)
	}
	if got := s.Names(); strings.Join(got, ",") != "web,local" {
		t.Fatalf("names %v", got)
	}
	if err := s.Listen(ctx, "web", "tcp://127.0.0.1:1"); !errors.Is(err, ErrExists) {
		t.Fatalf("re-listen other spec: %v, want ErrExists", err)
	}
	if portFree(addr) {
		t.Fatalf("port %s free while held", addr)
	}
	if n, err := s.Remove("web"); n != 1 || err != nil {
		t.Fatalf("Remove = %d, %v", n, err)
	}
	if !portFree(addr) {
		t.Fatalf("port %s still held after Remove", addr)
	}
	if n, err := s.Remove("local"); n != 1 || err != nil {
		t.Fatalf("Remove = %d, %v", n, err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("unix socket file after Remove: %v", err)
	}
	if n, _ := s.Remove("nothing"); n != 0 {
		t.Fatalf("Remove(nothing) = %d", n)
	}
}

func TestStoreListenErrors(t *testing.T) {
	checkFDs(t)
	ctx := context.Background()
	s := New("pod/side", Options{MaxFiles: 1})
	defer s.Close()
	if err := s.Listen(ctx, "bad:name", "tcp://127.0.0.1:0"); !errors.Is(err, ErrInvalidName) || !strings.Contains(err.Error(), "pod/side") {
		t.Errorf("bad name: %v", err)
	}
	if err := s.Listen(ctx, "web", "udp://127.0.0.1:0"); !errors.Is(err, ErrBadSpec) {
		t.Errorf("bad spec: %v", err)
	}
	if err := s.Listen(ctx, "web", "tcp://127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	if err := s.Listen(ctx, "more", "tcp://127.0.0.1:0"); !errors.Is(err, ErrFull) {
		t.Errorf("over MaxFiles: %v, want ErrFull", err)
	}
	taken := storeAddr(t, s, 0)
	s2 := New("pod/other", Options{})
	defer s2.Close()
	if err := s2.Listen(ctx, "web", "tcp://"+taken); err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("port in use: %v", err)
	}
	file := filepath.Join(shortDir(t), "plain")
	os.WriteFile(file, nil, 0o600)
	if err := s2.Listen(ctx, "u", "unix://"+file); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("unix path is a file: %v", err)
	}
	s.Close()
	if err := s.Listen(ctx, "x", "tcp://127.0.0.1:0"); !errors.Is(err, ErrClosed) {
		t.Errorf("after Close: %v, want ErrClosed", err)
	}
	if _, err := s.Activation(); !errors.Is(err, ErrClosed) {
		t.Errorf("Activation after Close: %v", err)
	}
}

func TestStoreAddDeduplicatesSameSocket(t *testing.T) {
	checkFDs(t)
	s := New("pod/side", Options{})
	defer s.Close()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	f1, _ := dupConn(l.(*net.TCPListener), "a")
	f2, _ := dupConn(l.(*net.TCPListener), "b")
	defer f1.Close()
	defer f2.Close()
	if ok, err := s.Add("web", f1); !ok || err != nil {
		t.Fatalf("Add = %v, %v", ok, err)
	}
	// Another fd for the same socket (a sidecar storing again after a
	// restart) is not stored twice.
	if ok, err := s.Add("web", f2); ok || err != nil {
		t.Fatalf("Add of the same socket = %v, %v; want false, nil", ok, err)
	}
	// The store holds its own duplicate: closing ours keeps the port.
	addr := l.Addr().String()
	l.Close()
	f1.Close()
	f2.Close()
	if portFree(addr) {
		t.Fatal("store did not keep its own duplicate")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if !portFree(addr) {
		t.Fatal("port held after Close")
	}
}

func TestActivationEnv(t *testing.T) {
	checkFDs(t)
	s := New("pod/side", Options{})
	defer s.Close()
	ctx := context.Background()
	for _, n := range []string{"web", "admin"} {
		if err := s.Listen(ctx, n, "tcp://127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	a, err := s.Activation()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if got := strings.Join(a.Env(), " "); got != "LISTEN_FDS=2 LISTEN_FDNAMES=web:admin" {
		t.Fatalf("Env = %q", got)
	}
	if (&Activation{}).Env() != nil {
		t.Fatal("empty activation has env")
	}
	env := []string{"A=1", "LISTEN_FDS=2", "LISTEN_PID=1"}
	got := WithListenPID(env)
	if strings.Join(got, " ") != "A=1 LISTEN_FDS=2 LISTEN_PID="+strconv.Itoa(os.Getpid()) {
		t.Fatalf("WithListenPID = %q", got)
	}
	if got := WithListenPID([]string{"A=1"}); strings.Join(got, " ") != "A=1" {
		t.Fatalf("WithListenPID without LISTEN_FDS = %q", got)
	}
}

func TestInheritRejectsBadEnvironment(t *testing.T) {
	pid := strconv.Itoa(os.Getpid())
	for _, tc := range []struct {
		name, fds, pid, names string
		want                  string
	}{
		{"unset", "", pid, "", "LISTEN_FDS unset"},
		{"other pid", "1", "1", "", "LISTEN_PID"},
		{"bad count", "x", pid, "", `LISTEN_FDS="x"`},
		{"huge count", "100000", pid, "", "from 0 to 1024"},
		{"names mismatch", "2", pid, "a", "1 names but LISTEN_FDS=2"},
		{"fds not open", "900", pid, "", "from LISTEN_FDS=900"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(EnvListenFDs, tc.fds)
			t.Setenv(EnvListenPID, tc.pid)
			t.Setenv(EnvListenFDNames, tc.names)
			files, err := Inherit()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				closeFiles(files)
				t.Fatalf("Inherit = %v, %v; want error containing %q", files, err, tc.want)
			}
		})
	}
}

// TestStoreDoesNotPollHeldSockets: held listeners must not be registered
// with meshagent's netpoller, or every connection a sidecar receives would
// wake meshagent up. The epoll fd's fdinfo lists what it watches.
func TestStoreDoesNotPollHeldSockets(t *testing.T) {
	checkFDs(t)
	s := New("pod/side", Options{})
	defer s.Close()
	if err := s.Listen(context.Background(), "web", "tcp://127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	f, _ := tcpListenerFile(t)
	if _, err := s.Add("stored", f); err != nil {
		t.Fatal(err)
	}
	watched := epollTargets(t)
	if len(watched) == 0 {
		t.Fatal("found no epoll registrations at all: cannot check")
	}
	for _, e := range s.entries {
		if watched[e.fd] {
			t.Errorf("held fd %d (%s) is registered with the netpoller", e.fd, e.name)
		}
	}
	// The check can fail: the file from tcpListenerFile is registered.
	if fd, _ := rawFD(f); !watched[fd] {
		t.Errorf("os.NewFile'd socket fd %d not seen in epoll: the check is blind", fd)
	}
}

// epollTargets returns the fds registered in this process's epoll sets.
func epollTargets(t *testing.T) map[int]bool {
	t.Helper()
	out := map[int]bool{}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l != "anon_inode:[eventpoll]" {
			continue
		}
		info, err := os.ReadFile("/proc/self/fdinfo/" + e.Name())
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(info), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "tfd:" {
				if n, err := strconv.Atoi(f[1]); err == nil {
					out[n] = true
				}
			}
		}
	}
	return out
}

// TestStoreConcurrentUse exercises the store from several goroutines (run
// with -race): stores, removals and activations interleaved.
func TestStoreConcurrentUse(t *testing.T) {
	checkFDs(t)
	s := New("pod/side", Options{})
	defer s.Close()
	f, _ := tcpListenerFile(t)
	g, _ := tcpListenerFile(t)
	var wg sync.WaitGroup
	errs := make(chan error, 300)
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 50 {
				switch i {
				case 0:
					if _, err := s.Add("a", f); err != nil {
						errs <- err
					}
					s.Remove("a")
				case 1:
					if _, err := s.Add("b", g); err != nil {
						errs <- err
					}
				case 2:
					a, err := s.Activation()
					if err != nil {
						errs <- err
						continue
					}
					if len(a.Files) != len(a.Names) {
						errs <- fmt.Errorf("activation with %d files and %d names", len(a.Files), len(a.Names))
					}
					a.Close()
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := s.Names(); !slices.Contains(got, "b") || slices.Contains(got, "a") {
		t.Errorf("names after the dust settles: %v", got)
	}
}
