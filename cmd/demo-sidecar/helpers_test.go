package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

// bins holds the binaries TestMain builds once for every test.
var bins struct {
	sidecar, app string
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "demo-sidecar-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "temp dir:", err)
		os.Exit(1)
	}
	bins.sidecar = filepath.Join(dir, "demo-sidecar")
	bins.app = filepath.Join(dir, "demo-app")
	out, err := exec.Command("go", "build", "-o", dir+"/",
		"github.com/meshagent/meshagent/cmd/demo-sidecar",
		"github.com/meshagent/meshagent/cmd/demo-app").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// checkFDs fails the test if it ends with more open fds than it started
// with. Call it first so its cleanup runs last.
func checkFDs(t *testing.T) {
	t.Helper()
	before := countFDs(t)
	t.Cleanup(func() {
		// Idle keep-alive connections of the default client are not ours to
		// count.
		http.DefaultClient.CloseIdleConnections()
		var after int
		for i := 0; i < 50; i++ { // closes by the runtime poller may lag a little
			if after = countFDs(t); after <= before {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Errorf("fd leak: %d open fds before the test, %d after", before, after)
	})
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("count fds: %v", err)
	}
	return len(ents)
}

// syncBuffer collects a child's stderr while the child writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type proc struct {
	cmd    *exec.Cmd
	stderr *syncBuffer
	done   chan struct{}
	err    error // valid after done
}

type procOpts struct {
	env   []string
	files []*os.File
	// shellPID wraps the command in sh so LISTEN_PID is the pid of the
	// program itself, as systemd sets it after fork.
	shellPID bool
}

// startProc starts a real child process and makes sure it is gone at the end
// of the test, logging its stderr if the test failed.
func startProc(t *testing.T, name, bin string, args []string, o procOpts) *proc {
	t.Helper()
	var cmd *exec.Cmd
	if o.shellPID {
		cmd = exec.Command("/bin/sh", append([]string{"-c", `export LISTEN_PID=$$; exec "$0" "$@"`, bin}, args...)...)
	} else {
		cmd = exec.Command(bin, args...)
	}
	p := &proc{cmd: cmd, stderr: &syncBuffer{}, done: make(chan struct{})}
	cmd.Env = append(os.Environ(), o.env...)
	cmd.ExtraFiles = o.files
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("%s (pid %d) stderr:\n%s", name, cmd.Process.Pid, p.stderr.String())
		}
	})
	return p
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v to pid %d: %v", sig, p.pid(), err)
	}
}

// wait waits for the process to exit and returns its exit code.
func (p *proc) wait(t *testing.T, within time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(within):
		t.Fatalf("pid %d still running after %s", p.pid(), within)
	}
	if p.err == nil {
		return 0
	}
	if ee, ok := p.err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	t.Fatalf("pid %d: %v", p.pid(), p.err)
	return -1
}

// freePort returns a loopback address nobody listens on right now.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("reserve port: %v", err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// mark is one line of a sidecar's --ready-file.
type mark struct {
	event  string
	at     time.Time
	fields map[string]string
}

func readMarks(t *testing.T, path string) []mark {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatalf("read ready file: %v", err)
	}
	var ms []mark
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			t.Fatalf("ready file %s: bad line %q", path, sc.Text())
		}
		ns, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			t.Fatalf("ready file %s: bad time in %q: %v", path, sc.Text(), err)
		}
		m := mark{event: f[0], at: time.Unix(0, ns), fields: map[string]string{}}
		for _, kv := range f[2:] {
			k, v, _ := strings.Cut(kv, "=")
			m.fields[k] = v
		}
		ms = append(ms, m)
	}
	return ms
}

// waitMark waits until the ready file has a line for event.
func waitMark(t *testing.T, p *proc, path, event string, within time.Duration) mark {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		for _, m := range readMarks(t, path) {
			if m.event == event {
				return m
			}
		}
		select {
		case <-p.done:
			t.Fatalf("pid %d exited before %q: %v", p.pid(), event, p.err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q line in %s after %s", event, path, within)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// startApp starts a demo-app on a free port and waits until it serves.
func startApp(t *testing.T, name string) (*proc, string) {
	t.Helper()
	addr := freePort(t)
	p := startProc(t, name, bins.app, []string{"--listen", addr, "--name", name, "--drain", "10s"}, procOpts{})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return p, addr
		}
		if time.Now().After(deadline) {
			t.Fatalf("demo-app on %s not accepting: %v", addr, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// socketInodes lists the inodes of the sockets pid holds.
func socketInodes(t *testing.T, pid int) map[uint64]bool {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("read %s: %v", dir, err)
	}
	inodes := map[uint64]bool{}
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		var ino uint64
		if _, err := fmt.Sscanf(target, "socket:[%d]", &ino); err == nil {
			inodes[ino] = true
		}
	}
	return inodes
}

func fdInode(t *testing.T, fd int) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		t.Fatalf("fstat fd %d: %v", fd, err)
	}
	return st.Ino
}

// get sends one request on a fresh connection and returns status, the
// X-Demo-Sidecar header and the body.
func get(t *testing.T, url string) (int, string, string) {
	t.Helper()
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 15 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode, resp.Header.Get("X-Demo-Sidecar"), b.String()
}

// heldListener opens a loopback listening socket the way a supervisor that
// holds sockets for its children should: with raw syscalls, so the socket
// starts in blocking mode and the *os.File wrapping it is not marked
// non-blocking. That matters because O_NONBLOCK belongs to the open file
// description, which every process sharing the socket shares: os/exec calls
// File.Fd() on ExtraFiles, and Fd() on a file Go believes non-blocking (one
// from net.TCPListener.File, say) switches the shared socket to blocking
// mode, stalling the accept loop of a sidecar still running on it.
func heldListener(t *testing.T) (*os.File, string) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socket: %v", err)
	}
	f := os.NewFile(uintptr(fd), "held-listener")
	t.Cleanup(func() { f.Close() })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatalf("bind: %v", err)
	}
	if err := unix.Listen(fd, unix.SOMAXCONN); err != nil {
		t.Fatalf("listen: %v", err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatalf("getsockname: %v", err)
	}
	return f, fmt.Sprintf("127.0.0.1:%d", sa.(*unix.SockaddrInet4).Port)
}
