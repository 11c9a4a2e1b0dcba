// Package proctest is for tests that run this repository's commands as real
// processes (cmd/demo-app, cmd/demo-sidecar): TestMain builds them once
// (Build, Run), a test starts one (Start) and waits for its port
// (WaitAccepting), and CheckFDs fails a test that leaves an fd open. A
// process a test starts is killed at the test's cleanup if it still runs,
// and its stderr is logged when the test failed.
package proctest

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// Build builds the commands pkgs (import paths) into a new temporary folder
// and returns it; each binary is named after its package's folder. The
// caller removes the folder (Run does).
func Build(pkgs ...string) (string, error) {
	dir, err := os.MkdirTemp("", "proctest-")
	if err != nil {
		return "", fmt.Errorf("temp dir: %w", err)
	}
	out, err := exec.Command("go", append([]string{"build", "-o", dir + "/"}, pkgs...)...).CombinedOutput()
	if err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("go build: %w\n%s", err, out)
	}
	return dir, nil
}

// Run runs the tests, removes dir (from Build) and, when they passed, fails
// on goroutines left running. It returns the exit code for os.Exit.
func Run(m *testing.M, dir string) int {
	code := m.Run()
	os.RemoveAll(dir)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	return code
}

// Buffer collects a child's output while the child writes it.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *Buffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *Buffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Proc is a child process a test started.
type Proc struct {
	Cmd    *exec.Cmd
	Stderr *Buffer
	done   chan struct{}
	err    error // valid after done
}

// Options are the extras of a child: environment variables added to the
// test's own, files passed from fd 3 on.
type Options struct {
	Env   []string
	Files []*os.File
	// ShellPID wraps the command in sh so LISTEN_PID is the pid of the
	// program itself, as systemd sets it after fork.
	ShellPID bool
}

// Start starts bin as a real child process and makes sure it is gone at the
// end of the test, logging its stderr (as name) if the test failed.
func Start(t *testing.T, name, bin string, args []string, o Options) *Proc {
	t.Helper()
	var cmd *exec.Cmd
	if o.ShellPID {
		cmd = exec.Command("/bin/sh", append([]string{"-c", `export LISTEN_PID=$$; exec "$0" "$@"`, bin}, args...)...)
	} else {
		cmd = exec.Command(bin, args...)
	}
	p := &Proc{Cmd: cmd, Stderr: &Buffer{}, done: make(chan struct{})}
	cmd.Env = append(os.Environ(), o.Env...)
	cmd.ExtraFiles = o.Files
	cmd.Stderr = p.Stderr
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
			t.Logf("%s (pid %d) stderr:\n%s", name, cmd.Process.Pid, p.Stderr.String())
		}
	})
	return p
}

// PID is the child's pid.
func (p *Proc) PID() int { return p.Cmd.Process.Pid }

// Done is closed once the child has exited and been reaped.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Err is what Wait of os/exec returned; valid once Done is closed.
func (p *Proc) Err() error { return p.err }

// Signal sends sig to the child.
func (p *Proc) Signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.Cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v to pid %d: %v", sig, p.PID(), err)
	}
}

// Wait waits for the child to exit and returns its exit code.
func (p *Proc) Wait(t *testing.T, within time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(within):
		t.Fatalf("pid %d still running after %s", p.PID(), within)
	}
	if p.err == nil {
		return 0
	}
	if ee, ok := p.err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	t.Fatalf("pid %d: %v", p.PID(), p.err)
	return -1
}

// FreeAddr returns a loopback address nobody listens on right now.
func FreeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("reserve port: %v", err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// WaitAccepting waits until addr accepts a connection; name says who should
// be listening there.
func WaitAccepting(t *testing.T, name, addr string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s on %s not accepting: %v", name, addr, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// CheckFDs fails the test if it ends with more open fds than it started
// with. Call it first so its cleanup runs last.
func CheckFDs(t *testing.T) {
	t.Helper()
	before := CountFDs(t)
	t.Cleanup(func() {
		// Idle keep-alive connections of the default client are not the
		// test's to count.
		http.DefaultClient.CloseIdleConnections()
		var after int
		for range 50 { // closes by the runtime poller may lag a little
			if after = CountFDs(t); after <= before {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Errorf("fd leak: %d open fds before the test, %d after", before, after)
	})
}

// CountFDs is how many fds this process has open.
func CountFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("count fds: %v", err)
	}
	return len(ents)
}
