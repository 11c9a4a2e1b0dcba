package handoff

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseListenInodes(t *testing.T) {
	const header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
	for _, tc := range []struct {
		name string
		in   string
		want []uint64
		err  string
	}{
		{"listen and established", header +
			"   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n" +
			"   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 12346 1 0000000000000000 20 4 30 10 -1\n",
			[]uint64{12345}, ""},
		{"tcp6 listen", header +
			"   0: 00000000000000000000000001000000:2328 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0\n",
			[]uint64{777}, ""},
		{"listen with inode 0 (closing)", header +
			"   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 0 1\n",
			nil, ""},
		{"header only", header, nil, ""},
		{"short row", header + "   0: 0100007F:1F90 00000000:0000 0A\n", nil, "line 2: 4 fields"},
		{"bad inode", header +
			"   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 x 1\n",
			nil, `inode "x"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseListenInodes(strings.NewReader(tc.in))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %v, %v; want error containing %q", got, err, tc.err)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Fatalf("got %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

func TestSocketInode(t *testing.T) {
	for in, want := range map[string]uint64{"socket:[123]": 123, "pipe:[5]": 0, "socket:[x]": 0, "socket:[9": 0} {
		got, ok := socketInode(in)
		if got != want || ok != (want != 0) {
			t.Errorf("socketInode(%q) = %d, %v", in, got, ok)
		}
	}
}

// TestSnapshotOfUnmodifiedProcess: a process that knows nothing about
// meshagent listens on IPv4 and IPv6 ports; the store snapshots its
// listeners, the process exits, and a new sidecar started with the
// snapshot serves the same ports while a client connecting throughout sees
// no refused connection.
func TestSnapshotOfUnmodifiedProcess(t *testing.T) {
	checkFDs(t)
	addrs := "127.0.0.1:0"
	if l, err := listenProbe("tcp6", "[::1]:0"); err == nil {
		l.Close()
		addrs += ",[::1]:0"
	} else {
		t.Logf("no IPv6 loopback, tcp6 part not exercised: %v", err)
	}
	old := startHelper(t, "hold", false, nil, "HANDOFF_TEST_ADDRS="+addrs)
	held := strings.Split(strings.TrimPrefix(old.waitLine(t, 30*time.Second), "ready "), ",")

	s := New("pod/envoy", Options{})
	defer s.Close()
	names, err := s.Snapshot(context.Background(), old.pid())
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	if len(names) != len(held) {
		t.Fatalf("snapshot took %v, process listens on %v", names, held)
	}
	for _, a := range held {
		want := sanitizeName("tcp-" + a)
		if !slices.Contains(names, want) {
			t.Errorf("snapshot names %v lack %q", names, want)
		}
	}
	// Snapshotting again adds nothing: the store already holds them.
	if again, err := s.Snapshot(context.Background(), old.pid()); err != nil || len(again) != 0 {
		t.Fatalf("second snapshot = %v, %v", again, err)
	}

	l := startLoad(t, held[0], 4)
	l.waitFor(t, old.pid(), 50)
	if code := old.terminate(t); code != 0 {
		t.Fatalf("old process exit %d: %s", code, old.stderr)
	}
	nw, _ := startSidecar(t, s)
	l.waitFor(t, nw.pid(), 50)
	l.stop()
	t.Logf("load: %s", l)
	assertNoFailures(t, l)
	for _, a := range held[1:] {
		if pid, err := askPID("tcp", a); err != nil || pid != nw.pid() {
			t.Errorf("%s served by %d (%v), want %d", a, pid, err, nw.pid())
		}
	}
	nw.terminate(t)
}

// TestSnapshotDeniedWithoutPtrace runs the snapshot as an unprivileged user
// against a root process: the kernel refuses and the error says why.
func TestSnapshotDeniedWithoutPtrace(t *testing.T) {
	checkFDs(t)
	bin := copyTestBinary(t)
	target := startHelper(t, "hold", false, nil, "HANDOFF_TEST_ADDRS=127.0.0.1:0")
	target.waitLine(t, 30*time.Second)
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=snapshot", "HANDOFF_TEST_PID="+strconv.Itoa(target.pid()))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 10 {
		t.Fatalf("snapshot as uid 65534: %v (want exit 10, ErrSnapshotDenied): %s", err, out)
	}
	t.Logf("unprivileged snapshot: %s", strings.TrimSpace(string(out)))
	target.terminate(t)
}

// TestSnapshotUnsupportedKernel checks the error on kernels without the
// pidfd calls. This kernel has them, so the calls are replaced by ones that
// fail as old kernels do (ENOSYS).
func TestSnapshotUnsupportedKernel(t *testing.T) {
	checkFDs(t)
	saved := sys
	t.Cleanup(func() { sys = saved })
	s := New("pod/old-kernel", Options{})
	defer s.Close()

	sys.pidfdOpen = func(int, int) (int, error) { return -1, unix.ENOSYS }
	if _, err := s.Snapshot(context.Background(), os.Getpid()); !errors.Is(err, ErrSnapshotUnsupported) || !strings.Contains(err.Error(), "pod/old-kernel") {
		t.Fatalf("pidfd_open ENOSYS: %v", err)
	}
	// pidfd_open exists (5.3) but pidfd_getfd does not (5.6).
	sys.pidfdOpen = saved.pidfdOpen
	sys.pidfdGetfd = func(int, int, int) (int, error) { return -1, unix.ENOSYS }
	l, err := listenProbe("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := s.Snapshot(context.Background(), os.Getpid()); !errors.Is(err, ErrSnapshotUnsupported) {
		t.Fatalf("pidfd_getfd ENOSYS: %v", err)
	}
}

func TestSnapshotOfMissingProcess(t *testing.T) {
	checkFDs(t)
	cmd := exec.Command("/bin/true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	s := New("pod/gone", Options{})
	defer s.Close()
	_, err := s.Snapshot(context.Background(), cmd.Process.Pid)
	if !errors.Is(err, unix.ESRCH) || errors.Is(err, ErrSnapshotDenied) {
		t.Fatalf("snapshot of exited pid: %v, want ESRCH", err)
	}
}
