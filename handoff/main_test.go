package handoff

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// The test binary doubles as every second process the tests need
// (tableflip-style): a sidecar that serves on inherited listeners, an exec
// shim, independent MOSN peers, an unauthorized process. helperEnv selects
// the role.
const (
	helperEnv = "HANDOFF_TEST_HELPER"
	nextEnv   = "HANDOFF_TEST_NEXT"
)

var helpers = map[string]func() int{
	"shim":          helperShim,
	"serve":         helperServe,
	"hold":          helperHold,
	"plant":         helperPlant,
	"obtain":        helperObtain,
	"snapshot":      helperSnapshot,
	"mosn-new-peer": mosnNewPeer,
	"mosn-old-peer": mosnOldPeer,
	"mosn-new-prod": helperMOSNNewProduction,
	"listen-sock":   helperListenSock,
}

func TestMain(m *testing.M) {
	if role := os.Getenv(helperEnv); role != "" {
		h, ok := helpers[role]
		if !ok {
			fmt.Fprintf(os.Stderr, "unknown helper role %q\n", role)
			os.Exit(100)
		}
		os.Exit(h())
	}
	warmUp()
	goleak.VerifyTestMain(m)
}

// warmUp opens, once, the fds the Go runtime keeps for the life of the
// process (netpoller, pidfd probe), so that per-test fd counts compare like
// with like.
func warmUp() {
	if l, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		l.Close()
	}
	exec.Command("/bin/true").Run()
}

// helperShim is the exec shim: it sets LISTEN_PID to its own pid and execs
// the real role, which keeps the pid (what the agent's shim does).
func helperShim() int {
	next := os.Getenv(nextEnv)
	env := WithListenPID(os.Environ())
	env = slices.DeleteFunc(env, func(kv string) bool { return strings.HasPrefix(kv, helperEnv+"=") })
	env = append(env, helperEnv+"="+next)
	err := syscall.Exec(os.Args[0], os.Args, env)
	fmt.Fprintln(os.Stderr, "shim exec:", err)
	return 101
}

// pidServer serves each connection by writing the server's pid and a
// newline, so clients see which process accepted them. stop closes the
// listeners (the fds only: the sockets live on in other holders) and waits
// for connections in flight.
type pidServer struct {
	ls []net.Listener
	wg sync.WaitGroup
}

func servePID(ls ...net.Listener) *pidServer {
	s := &pidServer{ls: ls}
	msg := []byte(strconv.Itoa(os.Getpid()) + "\n")
	for _, l := range ls {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				s.wg.Add(1)
				go func() {
					defer s.wg.Done()
					c.SetDeadline(time.Now().Add(5 * time.Second))
					c.Write(msg)
					c.Close()
				}()
			}
		}()
	}
	return s
}

func (s *pidServer) stop() {
	for _, l := range s.ls {
		l.Close()
	}
	s.wg.Wait()
}

// helperServe is a sidecar: it serves on inherited listeners, or opens
// HANDOFF_TEST_ADDR itself and stores it with FDSTORE=1 when there are
// none; then says READY=1 and "ready" on stdout; SIGTERM stops it
// gracefully.
func helperServe() int {
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	ls, err := InheritListeners()
	if errors.Is(err, ErrNoActivation) {
		l, lerr := net.Listen("tcp", os.Getenv("HANDOFF_TEST_ADDR"))
		if lerr != nil {
			fmt.Fprintln(os.Stderr, "listen:", lerr)
			return 1
		}
		f, ferr := dupConn(l.(*net.TCPListener), "web")
		if ferr != nil {
			fmt.Fprintln(os.Stderr, "dup:", ferr)
			return 1
		}
		if err := SdNotify("FDSTORE=1\nFDNAME=web", f); err != nil && !errors.Is(err, ErrNoNotifySocket) {
			fmt.Fprintln(os.Stderr, "fdstore:", err)
			return 1
		}
		f.Close()
		ls, err = map[string]net.Listener{"web": l}, nil
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "inherit:", err)
		return 1
	}
	var all []net.Listener
	var names []string
	for n, l := range ls {
		all = append(all, l)
		names = append(names, n+"="+l.Addr().String())
	}
	slices.Sort(names)
	s := servePID(all...)
	if err := SdNotify("READY=1\nSTATUS=serving " + strings.Join(names, ",")); err != nil && !errors.Is(err, ErrNoNotifySocket) {
		fmt.Fprintln(os.Stderr, "ready:", err)
	}
	fmt.Printf("ready %s\n", strings.Join(names, ","))
	<-term
	s.stop()
	return 0
}

// helperHold is an unmodified sidecar for snapshots: it listens on
// HANDOFF_TEST_ADDRS (comma-separated) on its own, serves, prints the
// addresses and waits for SIGTERM.
func helperHold() int {
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	var ls []net.Listener
	var addrs []string
	for _, a := range strings.Split(os.Getenv("HANDOFF_TEST_ADDRS"), ",") {
		l, err := net.Listen("tcp", a)
		if err != nil {
			fmt.Fprintln(os.Stderr, "listen:", err)
			return 1
		}
		ls = append(ls, l)
		addrs = append(addrs, l.Addr().String())
	}
	s := servePID(ls...)
	fmt.Printf("ready %s\n", strings.Join(addrs, ","))
	<-term
	s.stop()
	return 0
}

// helperPlant is a process outside the allowed set trying to plant a
// listener in a store through the notify socket, with a datagram built by
// hand as any sd_notify client would.
func helperPlant() int {
	l, err := net.Listen("tcp", os.Getenv("HANDOFF_TEST_ADDR"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		return 1
	}
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		return 1
	}
	sock, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_DGRAM, 0)
	if err != nil {
		return 1
	}
	err = syscall.Sendmsg(sock, []byte("FDSTORE=1\nFDNAME=planted"), syscall.UnixRights(int(f.Fd())),
		&syscall.SockaddrUnix{Name: os.Getenv("NOTIFY_SOCKET")}, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, "send:", err)
		if errors.Is(err, syscall.EACCES) {
			return 13
		}
		return 1
	}
	fmt.Println("sent", l.Addr())
	return 0
}

// helperObtain is a process outside the allowed set dialing a store's
// reconfig.sock to obtain fds as a new MOSN would. Exit 0: refused (EOF,
// no start byte); 3: it got the start byte; 13: could not even connect.
func helperObtain() int {
	c, err := net.Dial("unix", filepath.Join(os.Getenv("HANDOFF_TEST_DIR"), MOSNReconfigSocket))
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		if errors.Is(err, syscall.EACCES) {
			return 13
		}
		return 1
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var b [1]byte
	n, err := c.Read(b[:])
	if n == 1 {
		return 3
	}
	if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
		return 0
	}
	fmt.Fprintln(os.Stderr, "read:", err)
	return 1
}

// helperListenSock owns listen.sock in HANDOFF_TEST_DIR without being
// authorized. Exit 0: the connection closed without fds; 3: fds arrived.
func helperListenSock() int {
	path := filepath.Join(os.Getenv("HANDOFF_TEST_DIR"), MOSNListenSocket)
	os.Remove(path)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		return 1
	}
	l.SetDeadline(time.Now().Add(20 * time.Second))
	c, err := l.AcceptUnix()
	if err != nil {
		fmt.Fprintln(os.Stderr, "accept:", err)
		return 1
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 16)
	oob := make([]byte, syscall.CmsgSpace(4*MaxFiles))
	_, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
	if oobn > 0 {
		return 3
	}
	if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
		return 0
	}
	fmt.Fprintln(os.Stderr, "read:", err)
	return 1
}

// helperSnapshot tries to snapshot HANDOFF_TEST_PID. Exit 0: it got fds;
// 10: ErrSnapshotDenied; 11: ErrSnapshotUnsupported; 1: other error.
func helperSnapshot() int {
	pid, _ := strconv.Atoi(os.Getenv("HANDOFF_TEST_PID"))
	s := New("test/snapshot", Options{})
	defer s.Close()
	names, err := s.Snapshot(context.Background(), pid)
	switch {
	case errors.Is(err, ErrSnapshotDenied):
		fmt.Fprintln(os.Stderr, err)
		return 10
	case errors.Is(err, ErrSnapshotUnsupported):
		return 11
	case err != nil:
		fmt.Fprintln(os.Stderr, err)
		return 1
	case len(names) == 0:
		return 12
	}
	return 0
}

// helperMOSNNewProduction is this package's new MOSN side (ReceiveMOSN) in
// a process of its own, serving on what it receives.
func helperMOSNNewProduction() int {
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	u, err := ReceiveMOSN(ctx, os.Getenv("HANDOFF_TEST_DIR"), Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "receive:", err)
		return 1
	}
	ls, err := Listeners(u.Files)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listeners:", err)
		return 1
	}
	var all []net.Listener
	for _, l := range ls {
		all = append(all, l)
	}
	s := servePID(all...)
	if err := u.Ready(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "ready:", err)
		return 2 // as MOSN does
	}
	u.Close()
	fmt.Println("ready")
	<-term
	s.stop()
	return 0
}

// ---- test-side helpers ----

// child is a helper process started by a test.
type child struct {
	cmd    *exec.Cmd
	lines  chan string
	stderr fileLog
	done   chan struct{} // closed when the process has been waited for
	err    error
	outIno uint64 // inode of the stdout pipe, for diagnostics
}

// fileLog is a helper's stderr, kept in a file: a pipe would tie Wait to
// every process that might inherit it.
type fileLog string

func (f fileLog) String() string {
	b, _ := os.ReadFile(string(f))
	return string(b)
}

// startHelper starts the test binary in role with extra files (fds 3..)
// and env, and registers cleanup that kills it and waits. If shim is true
// it goes through the exec shim, so LISTEN_PID is set.
func startHelper(t *testing.T, role string, shim bool, files []*os.File, env ...string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), env...)
	if shim {
		cmd.Env = append(cmd.Env, helperEnv+"=shim", nextEnv+"="+role)
	} else {
		cmd.Env = append(cmd.Env, helperEnv+"="+role)
	}
	cmd.ExtraFiles = files
	ef, err := os.CreateTemp(t.TempDir(), "stderr")
	if err != nil {
		t.Fatal(err)
	}
	defer ef.Close()
	cmd.Stderr = ef
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = w
	var st syscall.Stat_t
	syscall.Fstat(int(w.Fd()), &st)
	err = cmd.Start()
	w.Close()
	if err != nil {
		r.Close()
		t.Fatalf("start helper %s: %v", role, err)
	}
	c := &child{cmd: cmd, lines: make(chan string, 16), stderr: fileLog(ef.Name()), done: make(chan struct{}), outIno: st.Ino}
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			select {
			case c.lines <- sc.Text():
			default:
			}
		}
	}()
	go func() {
		c.err = cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-c.done
		r.Close() // ends the scanner even if someone else holds the pipe
		<-scanned
	})
	return c
}

func (c *child) pid() int { return c.cmd.Process.Pid }

// waitLine waits for the child's next stdout line.
func (c *child) waitLine(t *testing.T, d time.Duration) string {
	t.Helper()
	select {
	case l := <-c.lines:
		return l
	case <-c.done:
		// It may have printed just before exiting.
		select {
		case l := <-c.lines:
			return l
		case <-time.After(100 * time.Millisecond):
		}
		t.Fatalf("helper %d exited (%v) before printing; stderr: %s", c.pid(), c.err, c.stderr)
	case <-time.After(d):
		t.Fatalf("helper %d printed nothing in %v; %s; stderr: %s", c.pid(), d, c.diagnose(), c.stderr)
	}
	return ""
}

// wait waits for the child to exit and returns its exit code.
func (c *child) wait(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case <-c.done:
	case <-time.After(d):
		t.Fatalf("helper %d still running after %v; %s; stderr: %s", c.pid(), d, c.diagnose(), c.stderr)
	}
	if c.err == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(c.err, &ee) {
		return ee.ExitCode()
	}
	t.Fatalf("helper %d: %v", c.pid(), c.err)
	return -1
}

// diagnose describes a helper that does not finish: its state and its
// threads' kernel wait channels.
func (c *child) diagnose() string {
	stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", c.pid()))
	wchan, _ := os.ReadFile(fmt.Sprintf("/proc/%d/wchan", c.pid()))
	return fmt.Sprintf("stat %q wchan %q", strings.TrimSpace(string(stat)), wchan)
}

func (c *child) terminate(t *testing.T) int {
	t.Helper()
	c.cmd.Process.Signal(syscall.SIGTERM)
	return c.wait(t, 20*time.Second)
}

// shortDir returns a fresh directory with a short path (unix socket paths
// are limited to 108 bytes, too short for t.TempDir under long test names).
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "ho")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// fdCount counts this process's open fds.
func fdCount(t *testing.T) (int, []string) {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("read /proc/self/fd: %v", err)
	}
	var desc []string
	for _, e := range ents {
		l, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		desc = append(desc, e.Name()+"->"+l)
	}
	return len(ents), desc
}

// checkFDs fails the test if it leaves more fds open than it found. Call
// it first in a test so that its cleanup runs after every other cleanup.
func checkFDs(t *testing.T) {
	t.Helper()
	before, bdesc := fdCount(t)
	t.Cleanup(func() {
		var after int
		var adesc []string
		// Closing is synchronous, but give finalizer-closed files of
		// failed helper code a moment.
		for range 50 {
			if after, adesc = fdCount(t); after <= before {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("fd leak: %d open before, %d after\nbefore: %v\nafter:  %v", before, after, bdesc, adesc)
	})
}

// load is a client that keeps connecting to addr, one connection per
// request, and classifies every outcome.
type load struct {
	addr   string
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	ok      int
	refused int
	lost    int // EOF or reset: accepted by a process that then died
	other   []string
	pids    map[int]int
	order   []int // pids in the order they first answered
}

func startLoad(t *testing.T, addr string, workers int) *load {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	l := &load{addr: addr, cancel: cancel, pids: map[int]int{}}
	for range workers {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for ctx.Err() == nil {
				l.one()
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	t.Cleanup(l.stop)
	return l
}

func (l *load) one() {
	c, err := net.DialTimeout("tcp", l.addr, 10*time.Second)
	if err != nil {
		l.record(0, err)
		return
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(15 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		l.record(0, err)
		return
	}
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	l.record(pid, err)
}

func (l *load) record(pid int, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case err == nil:
		l.ok++
		if l.pids[pid] == 0 {
			l.order = append(l.order, pid)
		}
		l.pids[pid]++
	case errors.Is(err, syscall.ECONNREFUSED):
		l.refused++
	case errors.Is(err, io.EOF), errors.Is(err, syscall.ECONNRESET):
		l.lost++
	default:
		if len(l.other) < 10 {
			l.other = append(l.other, err.Error())
		} else {
			l.other[9] = fmt.Sprintf("... and more: %v", err)
		}
	}
}

// stop ends the load and waits for the workers.
func (l *load) stop() {
	l.cancel()
	l.wg.Wait()
}

// waitFor waits until pid has served at least n requests.
func (l *load) waitFor(t *testing.T, pid, n int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		l.mu.Lock()
		got := l.pids[pid]
		l.mu.Unlock()
		if got >= n {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	t.Fatalf("pid %d served %d requests in 30s, want %d (ok %d refused %d lost %d other %v)", pid, l.pids[pid], n, l.ok, l.refused, l.lost, l.other)
}

func (l *load) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return fmt.Sprintf("ok %d refused %d lost %d other %d %v, by pid %v (order %v)", l.ok, l.refused, l.lost, len(l.other), l.other, l.pids, l.order)
}

// askPID connects once and returns the pid the server reports.
func askPID(network, addr string) (int, error) {
	c, err := net.DialTimeout(network, addr, 10*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(line))
}

func listenProbe(network, addr string) (net.Listener, error) { return net.Listen(network, addr) }
