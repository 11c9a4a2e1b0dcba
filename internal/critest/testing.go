package critest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// Lane is one containerd set up by scripts/ci-containerd.sh.
type Lane struct {
	Name string // for messages
	// Env names the variable holding the daemon's socket.
	Env string
	// Arg is the script's lane argument.
	Arg string
}

var (
	// V2 is containerd v2.2.9 built from source, with NRI.
	V2 = Lane{Name: "containerd v2.2.9", Env: "MESHAGENT_TEST_CONTAINERD", Arg: "v2"}
	// V16 is Debian's containerd 1.6, without NRI.
	V16 = Lane{Name: "containerd 1.6", Env: "MESHAGENT_TEST_CONTAINERD16", Arg: "v1"}
)

const (
	// EnvNRISocket holds the NRI socket of the V2 lane.
	EnvNRISocket = "MESHAGENT_TEST_NRI_SOCKET"
	// EnvScript holds the absolute path of scripts/ci-containerd.sh, for
	// tests that start their own daemon.
	EnvScript = "MESHAGENT_TEST_CONTAINERD_SCRIPT"
)

// Socket returns the lane's containerd socket. It skips the test when the
// lane's variable is unset (run scripts/ci-containerd.sh and eval its env
// output), and fails it when the variable names no socket: CI sets the
// variables only after the daemons answer.
func Socket(t testing.TB, lane Lane) string {
	t.Helper()
	return envSocket(t, lane.Env, lane.Name)
}

// NRISocket returns the V2 lane's NRI socket, skipping like Socket.
func NRISocket(t testing.TB) string {
	t.Helper()
	return envSocket(t, EnvNRISocket, "containerd NRI")
}

func envSocket(t testing.TB, env, what string) string {
	t.Helper()
	path := os.Getenv(env)
	if path == "" {
		t.Skipf("%s not set: needs %s (run scripts/ci-containerd.sh and eval \"$(scripts/ci-containerd.sh env)\")", env, what)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("%s=%s: %v (is %s running?)", env, path, err, what)
	}
	return path
}

// Connect dials the CRI service on socket, waits until it is ready and closes
// the connection when the test ends.
func Connect(t testing.TB, socket string) *Runtime {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := Dial(ctx, socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// StartPod runs a pod and removes it (and its cgroups) when the test ends.
// Name gets a unique suffix so parallel tests and reruns never collide.
func (r *Runtime) StartPod(t testing.TB, spec PodSpec) *Pod {
	t.Helper()
	spec.Name = UniqueName(spec.Name)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pod, err := r.RunPod(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := r.RemovePod(ctx, pod); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return pod
}

var uniq atomic.Int64

// UniqueName returns base with the test process id and a counter appended.
func UniqueName(base string) string {
	return fmt.Sprintf("%s-%d-%d", base, os.Getpid(), uniq.Add(1))
}

// Daemon is a private containerd instance owned by one test, for tests that
// stop or restart containerd. It has its own root, state and sockets and the
// test images already imported.
type Daemon struct {
	Lane      Lane
	Instance  string
	Socket    string
	NRISocket string // empty for the 1.6 lane
	script    string
}

// StartDaemon starts a private instance of lane through
// scripts/ci-containerd.sh and destroys it (tasks, daemon, root, state) when
// the test ends. It skips like Socket when the lane is not set up.
func StartDaemon(t testing.TB, lane Lane) *Daemon {
	t.Helper()
	Socket(t, lane) // the lane must be set up: binaries built, images built
	script := os.Getenv(EnvScript)
	if script == "" {
		t.Skipf("%s not set: needs scripts/ci-containerd.sh to start a private %s", EnvScript, lane.Name)
	}
	inst := fmt.Sprintf("t%d-%d", os.Getpid(), uniq.Add(1))
	d := &Daemon{
		Lane: lane, Instance: inst, script: script,
		Socket: "/run/meshagent-ci/" + inst + "/containerd.sock",
	}
	if lane.Arg == "v2" {
		d.NRISocket = "/run/meshagent-ci/" + inst + "/nri.sock"
	}
	t.Cleanup(func() {
		if out, err := d.run("destroy"); err != nil {
			t.Errorf("destroy private containerd %s: %v\n%s", inst, err, out)
		}
	})
	if out, err := d.run("start"); err != nil {
		t.Fatalf("start private containerd %s: %v\n%s", inst, err, out)
	}
	return d
}

// Restart stops the daemon (its shims and containers keep running, as on a
// node) and starts it again, returning once it answers.
func (d *Daemon) Restart(t testing.TB) {
	t.Helper()
	if out, err := d.run("restart"); err != nil {
		t.Fatalf("restart private containerd %s: %v\n%s", d.Instance, err, out)
	}
}

// Stop stops the daemon; Start brings it back.
func (d *Daemon) Stop(t testing.TB) {
	t.Helper()
	if out, err := d.run("stop"); err != nil {
		t.Fatalf("stop private containerd %s: %v\n%s", d.Instance, err, out)
	}
}

// Start starts a stopped daemon again.
func (d *Daemon) Start(t testing.TB) {
	t.Helper()
	if out, err := d.run("restart"); err != nil {
		t.Fatalf("start private containerd %s: %v\n%s", d.Instance, err, out)
	}
}

func (d *Daemon) run(action string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, d.script, d.Lane.Arg, action, d.Instance).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// CheckLeaks records the open fds and running goroutines now and, when the
// test ends (after every cleanup registered later), fails the test if either
// grew. Call it first in a test. Connections close asynchronously, so both
// checks retry for a few seconds before failing.
func CheckLeaks(t testing.TB) {
	t.Helper()
	before := fdCount(t)
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			n := fdCount(t)
			if n <= before {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("fd leak: %d open fds before the test, %d after", before, n)
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err := goleak.Find(ignore); err != nil {
			t.Errorf("goroutine leak: %v", err)
		}
	})
}

func fdCount(t testing.TB) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("count fds: %v", err)
	}
	return len(entries)
}
