package containerd_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/meshagent/meshagent/agent/containerd"
	"github.com/meshagent/meshagent/internal/critest"
	"github.com/meshagent/meshagent/internal/testimages"
)

var lanes = []critest.Lane{critest.V2, critest.V16}

// recorder collects the events Run reports.
type recorder struct {
	mu   sync.Mutex
	evs  []containerd.Event
	wake chan struct{}
}

func newRecorder() *recorder { return &recorder{wake: make(chan struct{}, 1)} }

func (r *recorder) handle(e containerd.Event) {
	r.mu.Lock()
	r.evs = append(r.evs, e)
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

func (r *recorder) events() []containerd.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]containerd.Event(nil), r.evs...)
}

// waitFor waits until some recorded event satisfies match and returns it.
func (r *recorder) waitFor(t *testing.T, what string, match func(containerd.Event) bool) containerd.Event {
	t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		for _, e := range r.events() {
			if match(e) {
				return e
			}
		}
		select {
		case <-r.wake:
		case <-deadline:
			t.Fatalf("timed out waiting for %s; events:\n%s", what, r.dump())
		}
	}
}

func (r *recorder) dump() string {
	var b strings.Builder
	for _, e := range r.events() {
		fmt.Fprintf(&b, "  %s\n", e)
	}
	return b.String()
}

// count returns how many events of kind concern container id.
func (r *recorder) count(kind containerd.EventKind, id string) int {
	n := 0
	for _, e := range r.events() {
		if e.Kind == kind && e.Container.ID == id {
			n++
		}
	}
	return n
}

func (r *recorder) countKind(kind containerd.EventKind) int {
	n := 0
	for _, e := range r.events() {
		if e.Kind == kind {
			n++
		}
	}
	return n
}

// run starts c.Run in a goroutine and stops it when the test ends.
func run(t *testing.T, c *containerd.Client) *recorder {
	t.Helper()
	rec := newRecorder()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx, rec.handle) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run returned %v after cancel, want nil", err)
		}
	})
	return rec
}

func newClient(t *testing.T, socket string, opts ...containerd.Option) *containerd.Client {
	t.Helper()
	c, err := containerd.New(socket, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

func findPod(pods []containerd.Pod, sandboxID string) (containerd.Pod, bool) {
	for _, p := range pods {
		if p.SandboxID == sandboxID {
			return p, true
		}
	}
	return containerd.Pod{}, false
}

func cmdline(pid uint32) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return strings.TrimRight(string(b), "\x00")
}

// waitCmdline waits until pid runs want: a task counts as running from `runc
// start`, a moment before runc init executes the container's program.
func waitCmdline(t *testing.T, pid uint32, want string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for cmdline(pid) != want {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d runs %q, want %q", pid, cmdline(pid), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// podDir is a host folder mounted at /out in every test container; the test
// programs announce there that they are up (with signal handling in place),
// so a test never signals a process that is still starting.
type podDir string

func newPodDir(t *testing.T) podDir { return podDir(t.TempDir()) }

func (d podDir) mount() []*runtimeapi.Mount {
	return []*runtimeapi.Mount{{ContainerPath: "/out", HostPath: string(d)}}
}

func (d podDir) sidecar(name string, env map[string]string) critest.ContainerSpec {
	e := map[string]string{
		"SIDECAR_PORT":       "0", // any free port: pods share the host network
		"SIDECAR_READY_FILE": "/out/" + name + ".ready",
	}
	for k, v := range env {
		e[k] = v
	}
	return critest.ContainerSpec{Name: name, Image: testimages.Sidecar, Env: e, Mounts: d.mount()}
}

func (d podDir) app(name string) critest.ContainerSpec {
	return critest.ContainerSpec{
		Name: name, Image: testimages.App, Mounts: d.mount(),
		Env: map[string]string{"APP_START_FILE": "/out/" + name + ".start", "APP_NAME": name},
	}
}

// waitUp waits until the named containers have announced themselves.
func (d podDir) waitUp(t *testing.T, names ...string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for _, n := range names {
		for {
			_, errReady := os.Stat(filepath.Join(string(d), n+".ready"))
			_, errStart := os.Stat(filepath.Join(string(d), n+".start"))
			if errReady == nil || errStart == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("container %s never announced itself in %s", n, d)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// TestDiscoverExistingPods: pods running before the client exists are found
// by Snapshot and by Run's first sync, with their pod identity, containers in
// start order, roles from meshagent.io/sidecars and the real host PIDs.
func TestDiscoverExistingPods(t *testing.T) {
	for _, lane := range lanes {
		t.Run(lane.Arg, func(t *testing.T) {
			critest.CheckLeaks(t)
			sock := critest.Socket(t, lane)
			rt := critest.Connect(t, sock)
			dir := newPodDir(t)
			meshed := rt.StartPod(t, critest.PodSpec{
				Name:        "meshed",
				Namespace:   "shop",
				Annotations: map[string]string{containerd.AnnotationSidecars: "proxy"},
				Containers:  []critest.ContainerSpec{dir.sidecar("proxy", nil), dir.app("app")},
			})
			plain := rt.StartPod(t, critest.PodSpec{Name: "plain", Containers: []critest.ContainerSpec{newPodDir(t).app("app")}})
			dir.waitUp(t, "proxy", "app")

			c := newClient(t, sock)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			pods, err := c.Snapshot(ctx)
			require.NoError(t, err)

			p, ok := findPod(pods, meshed.SandboxID)
			require.True(t, ok, "pod %s not discovered", meshed.Name)
			assert.Equal(t, containerd.PodRef{Name: meshed.Name, Namespace: "shop", UID: meshed.UID}, p.PodRef)
			assert.Equal(t, "proxy", p.Annotations[containerd.AnnotationSidecars])
			require.NotNil(t, p.Sandbox)
			assert.Equal(t, meshed.SandboxID, p.Sandbox.ID)
			assert.Equal(t, containerd.StatusRunning, p.Sandbox.Status)
			waitCmdline(t, p.Sandbox.PID, "/pause")
			require.Len(t, p.Containers, 2)
			for i, want := range []struct {
				name, id, cmd string
				role          containerd.Role
			}{
				{"proxy", meshed.ContainerID("proxy"), "/sidecar", containerd.RoleSidecar},
				{"app", meshed.ContainerID("app"), "/app", containerd.RoleApp},
			} {
				got := p.Containers[i]
				assert.Equal(t, want.name, got.Name)
				assert.Equal(t, want.id, got.ID)
				assert.Equal(t, want.role, got.Role, got.Name)
				assert.Equal(t, containerd.KindContainer, got.Kind)
				assert.Equal(t, containerd.StatusRunning, got.Status, got.Name)
				assert.Equal(t, want.cmd, cmdline(got.PID), "pid %d of %s (up, so past runc init)", got.PID, got.Name)
			}

			pp, ok := findPod(pods, plain.SandboxID)
			require.True(t, ok, "pod %s not discovered", plain.Name)
			require.Len(t, pp.Containers, 1)
			assert.Equal(t, containerd.RoleApp, pp.Containers[0].Role)

			// Run's first sync reports the same pods as resync events.
			rec := run(t, c)
			synced := rec.waitFor(t, "first sync", func(e containerd.Event) bool { return e.Kind == containerd.Synced })
			_, ok = findPod(synced.Pods, meshed.SandboxID)
			assert.True(t, ok, "Synced lacks pod %s", meshed.Name)
			proxyID := meshed.ContainerID("proxy")
			assert.Equal(t, 1, rec.count(containerd.ContainerCreated, proxyID))
			started := rec.waitFor(t, "proxy started", func(e containerd.Event) bool {
				return e.Kind == containerd.TaskStarted && e.Container.ID == proxyID
			})
			assert.True(t, started.Resync)
			assert.Equal(t, containerd.RoleSidecar, started.Container.Role)
			assert.Equal(t, p.Containers[0].PID, started.Container.PID)
			assert.Equal(t, meshed.SandboxID, started.Container.SandboxID)
		})
	}
}

// TestEventsReportedOnce: a pod started, one container stopped and the pod
// removed while Run follows containerd produce each change exactly once,
// although resyncs run every few hundred milliseconds meanwhile.
func TestEventsReportedOnce(t *testing.T) {
	for _, lane := range lanes {
		t.Run(lane.Arg, func(t *testing.T) {
			critest.CheckLeaks(t)
			sock := critest.Socket(t, lane)
			rt := critest.Connect(t, sock)
			c := newClient(t, sock, containerd.WithResync(100*time.Millisecond, 250*time.Millisecond))
			rec := run(t, c)
			rec.waitFor(t, "first sync", func(e containerd.Event) bool { return e.Kind == containerd.Synced })

			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			dir := newPodDir(t)
			pod, err := rt.RunPod(ctx, critest.PodSpec{
				Name:        critest.UniqueName("events"),
				Annotations: map[string]string{containerd.AnnotationSidecars: "proxy"},
				Containers:  []critest.ContainerSpec{dir.sidecar("proxy", nil), dir.app("app")},
			})
			require.NoError(t, err)
			removed := false
			t.Cleanup(func() {
				if !removed {
					_ = rt.RemovePod(context.Background(), pod)
				}
			})
			appID := pod.ContainerID("app")
			proxy := rec.waitFor(t, "proxy started", func(e containerd.Event) bool {
				return e.Kind == containerd.TaskStarted && e.Container.ID == pod.ContainerID("proxy")
			})
			assert.Equal(t, containerd.RoleSidecar, proxy.Container.Role)
			assert.Equal(t, "proxy", proxy.Container.Name)
			assert.Equal(t, pod.Name, proxy.Container.Pod.Name)
			app := rec.waitFor(t, "app started", func(e containerd.Event) bool {
				return e.Kind == containerd.TaskStarted && e.Container.ID == appID
			})
			assert.Equal(t, containerd.RoleApp, app.Container.Role)
			dir.waitUp(t, "proxy", "app")
			assert.Equal(t, "/app", cmdline(app.Container.PID))

			require.NoError(t, rt.StopContainer(ctx, appID, 10*time.Second))
			exit := rec.waitFor(t, "app exited", func(e containerd.Event) bool {
				return e.Kind == containerd.TaskExited && e.Container.ID == appID
			})
			assert.Equal(t, uint32(0), exit.Container.ExitStatus, "the app exits 0 on SIGTERM")
			assert.Equal(t, app.Container.PID, exit.Container.PID)
			st, err := rt.RS.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: appID})
			require.NoError(t, err)
			assert.Equal(t, st.Status.ExitCode, int32(exit.Container.ExitStatus), "event and CRI disagree on the exit code")

			require.NoError(t, rt.RemovePod(ctx, pod))
			removed = true
			ids := []string{pod.SandboxID, pod.ContainerID("proxy"), appID}
			for _, id := range ids {
				rec.waitFor(t, "delete of "+id, func(e containerd.Event) bool {
					return e.Kind == containerd.ContainerDeleted && e.Container.ID == id
				})
			}
			// Let several resyncs pass, then count.
			n := rec.countKind(containerd.Synced)
			rec.waitFor(t, "three more resyncs", func(containerd.Event) bool { return rec.countKind(containerd.Synced) >= n+3 })
			for _, id := range ids {
				for _, k := range []containerd.EventKind{containerd.ContainerCreated, containerd.TaskStarted, containerd.TaskExited, containerd.ContainerDeleted} {
					assert.Equal(t, 1, rec.count(k, id), "%s of %s; events:\n%s", k, id, rec.dump())
				}
			}
		})
	}
}

// TestStopContainer: the stop signal is honoured, SIGKILL follows only after
// the grace period, and the other containers' tasks keep their PIDs.
func TestStopContainer(t *testing.T) {
	for _, lane := range lanes {
		t.Run(lane.Arg, func(t *testing.T) {
			critest.CheckLeaks(t)
			sock := critest.Socket(t, lane)
			rt := critest.Connect(t, sock)
			dir := newPodDir(t)
			pod := rt.StartPod(t, critest.PodSpec{
				Name:        "stop",
				Annotations: map[string]string{containerd.AnnotationSidecars: "polite,stubborn"},
				Containers: []critest.ContainerSpec{
					dir.sidecar("polite", nil),
					dir.sidecar("stubborn", map[string]string{"SIDECAR_IGNORE_TERM": "1"}),
					dir.app("app"),
				},
			})
			dir.waitUp(t, "polite", "stubborn", "app")
			c := newClient(t, sock)
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			appPID := func() uint32 {
				pods, err := c.Snapshot(ctx)
				require.NoError(t, err)
				p, ok := findPod(pods, pod.SandboxID)
				require.True(t, ok)
				for _, ct := range p.Containers {
					if ct.Name == "app" {
						require.Equal(t, containerd.StatusRunning, ct.Status)
						return ct.PID
					}
				}
				t.Fatal("app container not found")
				return 0
			}
			before := appPID()

			// CRI records the exit from the same event stream, a moment after
			// the task's Wait returned.
			exitCode := func(name string) int32 {
				for {
					resp, err := rt.RS.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: pod.ContainerID(name)})
					require.NoError(t, err)
					if resp.Status.State == runtimeapi.ContainerState_CONTAINER_EXITED {
						return resp.Status.ExitCode
					}
					require.NoError(t, ctx.Err(), "%s: CRI never saw the exit", name)
					time.Sleep(20 * time.Millisecond)
				}
			}

			require.NoError(t, c.StopContainer(ctx, pod.ContainerID("polite"), 0, 30*time.Second))
			assert.Equal(t, int32(0), exitCode("polite"), "SIGTERM (default stop signal) ends polite cleanly")

			const grace = 1500 * time.Millisecond
			start := time.Now()
			require.NoError(t, c.StopContainer(ctx, pod.ContainerID("stubborn"), syscall.SIGTERM, grace))
			assert.GreaterOrEqual(t, time.Since(start), grace, "SIGKILL came before the grace period ended")
			assert.Equal(t, int32(137), exitCode("stubborn"), "stubborn ignores SIGTERM, so SIGKILL ends it")

			assert.Equal(t, before, appPID(), "the app's task was disturbed")

			// CRI reaped the exited tasks; an unknown id is another error.
			assert.ErrorIs(t, c.StopContainer(ctx, pod.ContainerID("polite"), 0, time.Second), containerd.ErrNoTask)
			err := c.StopContainer(ctx, "no-such-container", 0, time.Second)
			assert.ErrorIs(t, err, containerd.ErrNoContainer)
			assert.Contains(t, err.Error(), "no-such-container")
		})
	}
}

// TestContainerdRestart: containerd stops while Run follows it; an app
// container is killed while containerd is down; containerd comes back. Run
// reconnects, reports the exit once (whether it learns it from the resync or
// from the events the shim delivers late), and follows new changes live.
func TestContainerdRestart(t *testing.T) {
	for _, lane := range lanes {
		t.Run(lane.Arg, func(t *testing.T) {
			critest.CheckLeaks(t)
			d := critest.StartDaemon(t, lane)
			rt := critest.Connect(t, d.Socket)
			dir := newPodDir(t)
			pod := rt.StartPod(t, critest.PodSpec{
				Name:        "restart",
				Annotations: map[string]string{containerd.AnnotationSidecars: "proxy"},
				Containers:  []critest.ContainerSpec{dir.sidecar("proxy", nil), dir.app("app")},
			})
			dir.waitUp(t, "proxy", "app")
			c := newClient(t, d.Socket,
				containerd.WithBackoff(50*time.Millisecond, 500*time.Millisecond),
				containerd.WithResync(200*time.Millisecond, 300*time.Millisecond))
			rec := run(t, c)
			appID := pod.ContainerID("app")
			started := rec.waitFor(t, "app discovered running", func(e containerd.Event) bool {
				return e.Kind == containerd.TaskStarted && e.Container.ID == appID
			})

			d.Stop(t)
			rec.waitFor(t, "disconnect", func(e containerd.Event) bool { return e.Kind == containerd.Disconnected })
			require.NoError(t, syscall.Kill(int(started.Container.PID), syscall.SIGKILL))
			d.Start(t)

			exit := rec.waitFor(t, "app exit after reconnect", func(e containerd.Event) bool {
				return e.Kind == containerd.TaskExited && e.Container.ID == appID
			})
			assert.Equal(t, started.Container.PID, exit.Container.PID)

			// Live events flow again: kubelet would now restart the app.
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			app2 := newPodDir(t).app("app")
			app2.Attempt = 1
			newID, err := rt.StartContainer(ctx, pod, app2)
			require.NoError(t, err)
			rec.waitFor(t, "restarted app started", func(e containerd.Event) bool {
				return e.Kind == containerd.TaskStarted && e.Container.ID == newID
			})

			// Late events from the shim and further resyncs must not repeat
			// anything.
			n := rec.countKind(containerd.Synced)
			rec.waitFor(t, "more resyncs", func(containerd.Event) bool { return rec.countKind(containerd.Synced) >= n+2 })
			time.Sleep(time.Second)
			assert.Equal(t, 1, rec.count(containerd.TaskExited, appID), "app exit; events:\n%s", rec.dump())
			assert.Equal(t, 1, rec.count(containerd.TaskStarted, appID), "app start; events:\n%s", rec.dump())
			for _, id := range []string{pod.SandboxID, pod.ContainerID("proxy"), newID} {
				assert.Equal(t, 1, rec.count(containerd.ContainerCreated, id), "create of %s; events:\n%s", id, rec.dump())
				assert.Equal(t, 1, rec.count(containerd.TaskStarted, id), "start of %s; events:\n%s", id, rec.dump())
				assert.Equal(t, 0, rec.count(containerd.TaskExited, id), "exit of %s; events:\n%s", id, rec.dump())
			}
		})
	}
}

// TestRunWhileContainerdDown: with nothing listening, Run reports
// Disconnected with growing pauses, never panics, and returns nil when its
// context ends, leaving no goroutines behind.
func TestRunWhileContainerdDown(t *testing.T) {
	critest.CheckLeaks(t)
	sock := filepath.Join(t.TempDir(), "absent.sock")
	c := newClient(t, sock, containerd.WithBackoff(10*time.Millisecond, 40*time.Millisecond))
	rec := newRecorder()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx, rec.handle) }()
	rec.waitFor(t, "three disconnects", func(containerd.Event) bool { return rec.countKind(containerd.Disconnected) >= 3 })
	cancel()
	require.NoError(t, <-done)
	for _, e := range rec.events() {
		require.Equal(t, containerd.Disconnected, e.Kind)
		require.Error(t, e.Err)
		assert.Contains(t, e.Err.Error(), sock)
	}
}

func TestNewRejectsBadOptions(t *testing.T) {
	tests := []struct {
		name string
		addr string
		opt  containerd.Option
		want string
	}{
		{"empty address", "", nil, "empty socket address"},
		{"backoff max below first", "/x.sock", containerd.WithBackoff(time.Second, time.Millisecond), "backoff"},
		{"zero resync", "/x.sock", containerd.WithResync(0, 0), "resync"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var opts []containerd.Option
			if tt.opt != nil {
				opts = append(opts, tt.opt)
			}
			_, err := containerd.New(tt.addr, opts...)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
			assert.False(t, errors.Is(err, context.Canceled))
		})
	}
}

// TestPodOfPID: the processes of a real pod map back to their container ids
// and the pod's UID through their cgroups; the test's own process does not.
func TestPodOfPID(t *testing.T) {
	for _, lane := range lanes {
		t.Run(lane.Arg, func(t *testing.T) {
			critest.CheckLeaks(t)
			sock := critest.Socket(t, lane)
			rt := critest.Connect(t, sock)
			dir := newPodDir(t)
			pod := rt.StartPod(t, critest.PodSpec{Name: "peer", Containers: []critest.ContainerSpec{dir.sidecar("proxy", nil), dir.app("app")}})
			c := newClient(t, sock)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			p, err := c.Pod(ctx, pod.SandboxID)
			require.NoError(t, err)
			require.NotNil(t, p.Sandbox)
			for _, ct := range append([]containerd.Container{*p.Sandbox}, p.Containers...) {
				ref, err := containerd.PodOfPID(int(ct.PID))
				require.NoError(t, err, ct.Name)
				assert.Equal(t, containerd.CgroupRef{PodUID: pod.UID, ContainerID: ct.ID}, ref, "pid %d of %q", ct.PID, ct.Name)
			}
			_, err = containerd.PodOfPID(os.Getpid())
			assert.ErrorIs(t, err, containerd.ErrNotInPod)
			_, err = containerd.PodOfPID(1 << 30)
			assert.ErrorContains(t, err, "pid 1073741824")
		})
	}
}
