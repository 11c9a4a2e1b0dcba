package cgroup

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/meshagent/meshagent/internal/execshim"
)

// Children of these tests are this test binary re-executed with roleEnv set;
// TestMain runs the role instead of the tests. startChild starts them the
// way the agent starts a container: through the exec shim (internal/execshim),
// which joins the cgroups and sets oom_score_adj, then execs this binary
// again as the role, keeping its PID.
const roleEnv = "MESHAGENT_CGROUP_TEST_ROLE"

func TestMain(m *testing.M) {
	execshim.RunIfRequested()
	if role, ok := os.LookupEnv(roleEnv); ok {
		runRole(role)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func runRole(role string) {
	name, arg, _ := strings.Cut(role, ":")
	switch name {
	case "report":
		// The first thing the exec'ed command does: say where it runs.
		b, _ := os.ReadFile("/proc/self/cgroup")
		adj, _ := os.ReadFile("/proc/self/oom_score_adj")
		fmt.Printf("pid %d\noom %s", os.Getpid(), adj)
		os.Stdout.Write(b)
	case "busy":
		n, _ := strconv.Atoi(arg)
		for i := 0; i < n; i++ {
			go spin()
		}
		spin()
	case "hold":
		// Allocate and touch arg MiB, say so, then wait to be killed.
		mib, _ := strconv.Atoi(arg)
		touch(mib)
		fmt.Println("ready")
		io.Copy(io.Discard, os.Stdin)
	case "grow":
		// Allocate 1 MiB at a time until the OOM killer ends it (or arg MiB).
		mib, _ := strconv.Atoi(arg)
		fmt.Println("ready")
		for i := 0; i < mib; i++ {
			touch(1)
			time.Sleep(2 * time.Millisecond)
		}
		io.Copy(io.Discard, os.Stdin)
	default:
		fmt.Fprintln(os.Stderr, "unknown role", role)
		os.Exit(2)
	}
}

// spin burns a CPU until the process is killed.
func spin() {
	n := 0
	for {
		n++
	}
}

var held [][]byte

// touch maps anonymous memory and has the kernel fault every page in
// (MAP_POPULATE), so it is charged to the group. The kernel does it, not Go
// code, so a -race build does not add shadow memory on top.
func touch(mib int) {
	if mib == 0 {
		return
	}
	b, err := unix.Mmap(-1, 0, mib<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mmap:", err)
		os.Exit(4)
	}
	held = append(held, b)
}

// child is a re-executed test binary running a role inside a group.
type child struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stdout *bufio.Reader
	done   chan struct{}
	err    error
	ended  time.Time // when Wait returned
}

// startChild starts role through the exec shim: it joins the groups of
// shim.CgroupProcs and sets shim.OOMScoreAdj before it execs into the role.
func startChild(t *testing.T, shim execshim.Spec, role string) *child {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	shim.Path, shim.Argv = exe, []string{exe, "-test.run=^$"}
	// The shim's error fd is a copy of stderr (close-on-exec in the shim),
	// so why it failed shows in the test output.
	shim.ErrFD = 3
	raw, err := json.Marshal(shim)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), roleEnv+"="+role, execshim.Env+"="+string(raw))
	cmd.Stderr = os.Stderr
	cmd.ExtraFiles = []*os.File{os.Stderr}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	// A pipe of our own rather than StdoutPipe: Wait (in the goroutine
	// below) closes StdoutPipe's read end, which could lose output that
	// was written just before the child exited.
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = pw
	if err := cmd.Start(); err != nil {
		pr.Close()
		pw.Close()
		t.Fatal(err)
	}
	pw.Close()
	c := &child{cmd: cmd, stdin: stdin, stdout: bufio.NewReader(pr), done: make(chan struct{})}
	go func() {
		c.err = cmd.Wait()
		c.ended = time.Now()
		close(c.done)
	}()
	t.Cleanup(func() {
		c.kill()
		pr.Close()
	})
	return c
}

func (c *child) kill() {
	c.cmd.Process.Kill()
	c.stdin.Close()
	<-c.done
}

// waitLine waits for a line from the child's stdout.
func (c *child) waitLine(t *testing.T, want string, timeout time.Duration) {
	t.Helper()
	got := make(chan string, 1)
	go func() {
		l, _ := c.stdout.ReadString('\n')
		got <- strings.TrimSpace(l)
	}()
	select {
	case l := <-got:
		if l != want {
			t.Fatalf("child %d said %q, want %q (exit: %v)", c.cmd.Process.Pid, l, want, c.waitErr())
		}
	case <-time.After(timeout):
		t.Fatalf("child %d did not say %q within %s", c.cmd.Process.Pid, want, timeout)
	}
}

func (c *child) waitErr() error {
	select {
	case <-c.done:
		return c.err
	case <-time.After(2 * time.Second):
		return errors.New("still running")
	}
}

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// killedBy reports whether the child died of sig.
func (c *child) killedBy(sig syscall.Signal) bool {
	var ee *exec.ExitError
	if !errors.As(c.err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == sig
}

// needRealV1 skips unless the machine has v1 cpu, cpuacct and memory
// hierarchies and we may create groups in them.
func needRealV1(t testing.TB) *Manager {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups on the real cgroup fs")
	}
	m, err := Open(Options{Logger: testLogger(t)})
	if err != nil {
		t.Skipf("no cgroup fs at %s: %v", DefaultRoot, err)
	}
	if !m.Mode().v1() {
		t.Skipf("host cgroup mode is %s; these tests need the v1 cpu and memory hierarchies", m.Mode())
	}
	for _, c := range v1Controllers {
		if !exists(filepath.Join(DefaultRoot, c, "cgroup.procs")) {
			t.Skipf("v1 %s hierarchy not mounted at %s", c, filepath.Join(DefaultRoot, c))
		}
	}
	t.Cleanup(func() { m.Close() })
	return m
}

var unsafeChars = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

// podName is unique per process and test, so parallel runs never share a group.
func podName(t testing.TB) string {
	return fmt.Sprintf("t%d-%s", os.Getpid(), unsafeChars.ReplaceAllString(t.Name(), "_"))
}

// testPod creates a host-mode pod with the named containers and removes it
// (and the meshagent parent, when empty) at cleanup.
func testPod(t *testing.T, m *Manager, containers ...string) (string, Group, map[string]Group) {
	t.Helper()
	return testPodNamed(t, m, podName(t), containers...)
}

// testPodNamed is testPod for a pod of the given name (podName(t) and a
// suffix), for tests that need more than one pod.
func testPodNamed(t *testing.T, m *Manager, pod string, containers ...string) (string, Group, map[string]Group) {
	t.Helper()
	pg, err := m.EnsurePod(pod)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Remove(pg); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		// Another test or run may still use it: ENOTEMPTY/EBUSY are fine.
		for _, d := range m.dirs(HostParent) {
			unix.Rmdir(d)
		}
	})
	gs := map[string]Group{}
	for _, c := range containers {
		g, err := m.EnsureContainer(pod, c)
		if err != nil {
			t.Fatal(err)
		}
		gs[c] = g
	}
	return pod, pg, gs
}

// checkLeaks fails the test if goroutines or fds outlive it.
func checkLeaks(t *testing.T) {
	t.Helper()
	fds := countFDs(t)
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() {
		deadline := time.Now().Add(2 * time.Second)
		for countFDs(t) > fds && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if n := countFDs(t); n > fds {
			t.Errorf("fd leak: %d open fds after the test, %d before", n, fds)
		}
		goleak.VerifyNone(t, before)
	})
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	s, err := readSmall(p)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func writeFile(t *testing.T, p, v string) {
	t.Helper()
	if err := writeSmall(p, v); err != nil {
		t.Fatal(err)
	}
}

// testLogger sends the Manager's log lines to the test log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlog{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tlog struct{ t testing.TB }

func (l tlog) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
