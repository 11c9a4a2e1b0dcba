package agent

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/meshagent/meshagent/agent/containerd"
)

// fakeKube is a scripted containerd for the supervisor's bookkeeping rules
// (pure logic: which events mean a restart, with which cause, and which
// stops the agent sends). The real containerd tests are in kube_test.go.
type fakeKube struct {
	mu    sync.Mutex
	stops []string
	exits map[string]int32
}

func (f *fakeKube) Run(ctx context.Context, _ func(containerd.Event)) error {
	<-ctx.Done()
	return nil
}

func (f *fakeKube) StopContainer(_ context.Context, id string, _ syscall.Signal, _ time.Duration) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stops = append(f.stops, id)
	return nil
}

func (f *fakeKube) SandboxAnnotations(context.Context, string) (map[string]string, map[string]string, error) {
	return nil, nil, errors.New("not in this script")
}

func (f *fakeKube) ContainerExit(_ context.Context, id string) (bool, int32, error) {
	code, ok := f.exits[id]
	return ok, code, nil
}

func (f *fakeKube) stopped() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.stops...)
}

func TestKubeSupervisorBookkeeping(t *testing.T) {
	dir := t.TempDir()
	cfg := &Config{Node: Node{AdminSocket: filepath.Join(dir, "a.sock"), StateDir: dir, MetricsAddr: "off"}}
	cfg.setDefaults()
	rec := &eventRec{}
	a, err := New(cfg, WithEventHook(rec.add), WithLogger(testLogger(t)))
	require.NoError(t, err)
	fk := &fakeKube{exits: map[string]int32{"app-0": 0}}
	s := newKubeSupervisor(a, &KubeConfig{}, fk)
	a.kube = s
	ctx := context.Background()
	t.Cleanup(s.wg.Wait)

	ref := containerd.PodRef{Namespace: "default", Name: "web", UID: "u1"}
	t0 := time.Unix(1000, 0)
	ctr := func(id, name string, kind containerd.Kind, at time.Duration, st containerd.Status, pid uint32) containerd.Container {
		return containerd.Container{ID: id, Name: name, Kind: kind, SandboxID: "sb", Pod: ref, CreatedAt: t0.Add(at), Status: st, PID: pid}
	}
	ev := func(k containerd.EventKind, c containerd.Container, resync bool) {
		s.handle(ctx, containerd.Event{Kind: k, Container: c, Resync: resync, Time: time.Now()})
	}
	sandbox := ctr("sb", "", containerd.KindSandbox, 0, containerd.StatusRunning, 99999910)
	proxy0 := ctr("proxy-0", "proxy", containerd.KindContainer, time.Second, containerd.StatusStopped, 99999911)
	proxy0.ExitStatus = 1
	proxy1 := ctr("proxy-1", "proxy", containerd.KindContainer, 2*time.Second, containerd.StatusRunning, 99999912)
	app0 := ctr("app-0", "app", containerd.KindContainer, 3*time.Second, containerd.StatusNone, 0)
	ann := map[string]string{AnnoSidecars: "proxy", AnnoJob: "true"}

	// First sync: history from before the agent is no restart of ours; the
	// app's task was reaped already (CRI says it exited 0).
	for _, c := range []containerd.Container{sandbox, proxy0, proxy1, app0} {
		ev(containerd.ContainerCreated, c, true)
	}
	ev(containerd.TaskStarted, proxy1, true)
	p1 := proxy1
	p1.Attempt = 1
	s.handle(ctx, containerd.Event{Kind: containerd.Synced, Resync: true, Pods: []containerd.Pod{{
		SandboxID: "sb", PodRef: ref, Annotations: ann, Sandbox: &sandbox,
		Containers: []containerd.Container{proxy0, p1, app0},
	}}})
	assert.Empty(t, rec.find(EvRestart, "default/web", ""), "restarts before the agent started are not news")
	st, err := a.Pod("default/web")
	require.NoError(t, err)
	assert.Equal(t, 1, containerOf(st, "proxy").Restarts)
	assert.Equal(t, StateExited, containerOf(st, "app").State, "a reaped app is exited, not waiting")
	assert.Equal(t, PhaseRunning, st.Phase, "a sidecar without a readiness check is ready when running")
	// The Job's app is done: the sidecar is stopped, once.
	s.wg.Wait() // stops run beside the event loop
	assert.Equal(t, []string{"proxy-1"}, fk.stopped())

	// The stop lands: cause job; kubelet would not restart it for a Job,
	// but say a second app exit event comes: no second stop.
	p1.Status, p1.ExitStatus = containerd.StatusStopped, 0
	ev(containerd.TaskExited, p1, false)
	ev(containerd.TaskExited, app0, false)
	s.wg.Wait()
	assert.Equal(t, []string{"proxy-1"}, fk.stopped())
	assert.Contains(t, containerOf(mustPod(t, a, "default/web"), "proxy").LastExit, "(job)")

	// Live: a new incarnation after an OOM kill is a restart caused by oom.
	proxy2 := ctr("proxy-2", "proxy", containerd.KindContainer, 4*time.Second, containerd.StatusNone, 0)
	ev(containerd.ContainerCreated, proxy2, false)
	r := rec.find(EvRestart, "default/web", "proxy")
	require.Len(t, r, 1)
	assert.Equal(t, map[string]string{"cause": CauseJob, "restartCount": "2", "role": "sidecar"}, r[0].Fields)
	proxy2.Status, proxy2.PID = containerd.StatusRunning, 99999913
	ev(containerd.TaskStarted, proxy2, false)
	ev(containerd.TaskOOM, proxy2, false)
	proxy2.Status, proxy2.ExitStatus = containerd.StatusStopped, 137
	ev(containerd.TaskExited, proxy2, false)

	// The stream breaks; the restart happened meanwhile and is found by the
	// resync: recorded, marked as seen on resync.
	s.handle(ctx, containerd.Event{Kind: containerd.Disconnected, Err: errors.New("EOF")})
	proxy3 := ctr("proxy-3", "proxy", containerd.KindContainer, 5*time.Second, containerd.StatusNone, 0)
	ev(containerd.ContainerCreated, proxy3, true)
	r = rec.find(EvRestart, "default/web", "proxy")
	require.Len(t, r, 2)
	assert.Equal(t, map[string]string{"cause": CauseOOM, "restartCount": "3", "role": "sidecar", "seen": "resync"}, r[1].Fields)
	s.handle(ctx, containerd.Event{Kind: containerd.Synced, Resync: true, Pods: []containerd.Pod{{
		SandboxID: "sb", PodRef: ref, Annotations: ann, Sandbox: &sandbox,
		Containers: []containerd.Container{proxy0, p1, app0, proxy2, proxy3},
	}}})
	require.Len(t, rec.find(EvContainerd, "", ""), 2, "lost, then back")

	// A crash (non-zero exit the agent did not cause).
	proxy3.Status, proxy3.PID = containerd.StatusRunning, 99999914
	ev(containerd.TaskStarted, proxy3, false)
	proxy3.Status, proxy3.ExitStatus = containerd.StatusStopped, 2
	ev(containerd.TaskExited, proxy3, false)
	ev(containerd.ContainerCreated, ctr("proxy-4", "proxy", containerd.KindContainer, 6*time.Second, containerd.StatusNone, 0), false)
	r = rec.find(EvRestart, "default/web", "proxy")
	require.Len(t, r, 3)
	assert.Equal(t, CauseCrash, r[2].Fields["cause"])
	s.wg.Wait()
	assert.Equal(t, []string{"proxy-1"}, fk.stopped(), "nothing else was stopped")

	// kubelet removes the pod: it is forgotten.
	for _, id := range []string{"proxy-0", "proxy-1", "proxy-2", "proxy-3", "proxy-4", "app-0", "sb"} {
		ev(containerd.ContainerDeleted, containerd.Container{ID: id, SandboxID: "sb"}, false)
	}
	_, err = a.Pod("default/web")
	assert.ErrorIs(t, err, ErrNotFound)
}

func mustPod(t *testing.T, a *Agent, name string) PodStatus {
	t.Helper()
	st, err := a.Pod(name)
	require.NoError(t, err)
	return st
}
