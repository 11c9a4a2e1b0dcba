package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshagent/meshagent/internal/proctest"
)

// bins holds the binaries TestMain builds once for every test.
var bins struct {
	sidecar, app string
}

func TestMain(m *testing.M) {
	dir, err := proctest.Build("github.com/meshagent/meshagent/cmd/demo-sidecar", "github.com/meshagent/meshagent/cmd/demo-app")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bins.sidecar = filepath.Join(dir, "demo-sidecar")
	bins.app = filepath.Join(dir, "demo-app")
	os.Exit(proctest.Run(m, dir))
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
func waitMark(t *testing.T, p *proctest.Proc, path, event string, within time.Duration) mark {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		for _, m := range readMarks(t, path) {
			if m.event == event {
				return m
			}
		}
		select {
		case <-p.Done():
			t.Fatalf("pid %d exited before %q: %v", p.PID(), event, p.Err())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q line in %s after %s", event, path, within)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// startApp starts a demo-app on a free port and waits until it serves.
func startApp(t *testing.T, name string) (*proctest.Proc, string) {
	t.Helper()
	addr := proctest.FreeAddr(t)
	p := proctest.Start(t, name, bins.app, []string{"--listen", addr, "--name", name, "--drain", "10s"}, proctest.Options{})
	proctest.WaitAccepting(t, "demo-app", addr, 10*time.Second)
	return p, addr
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
