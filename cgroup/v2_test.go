package cgroup

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeV2 lays out a cgroup v2 tree in a temporary directory, as the kernel
// would show it, so the v2 code paths run where the machine has no v2 cpu
// and memory controllers.
func fakeV2(t *testing.T) (*Manager, string) {
	t.Helper()
	root := t.TempDir()
	seedV2(t, root)
	m, err := Open(Options{Root: root, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if m.Mode() != ModeV2 {
		t.Fatalf("detected %s for a v2 tree", m.Mode())
	}
	m.afterMkdir = func(dir string) { seedV2(t, dir) }
	t.Cleanup(func() { m.Close() })
	return m, root
}

// seedV2 creates the knob files a v2 group directory has. mkdir on tmpfs
// does not, unlike cgroupfs.
func seedV2(t *testing.T, dir string) {
	t.Helper()
	for f, v := range map[string]string{
		"cgroup.controllers": "cpu memory", "cgroup.subtree_control": "", "cgroup.procs": "",
		"cpu.max": "max 100000", "cpu.max.burst": "0", "cpu.weight": "100", "memory.max": "max",
		"memory.events":  "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
		"cpu.stat":       "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 40\nnr_throttled 7\nthrottled_usec 900\n",
		"memory.current": "4096\n", "memory.stat": "anon 4096\n",
	} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func v2Pod(t *testing.T, m *Manager, root string) (string, Group, map[string]Group) {
	t.Helper()
	pod := podName(t)
	pg, err := m.EnsurePod(pod)
	if err != nil {
		t.Fatal(err)
	}
	gs := map[string]Group{}
	for _, c := range []string{"sidecar", "app"} {
		g, err := m.EnsureContainer(pod, c)
		if err != nil {
			t.Fatal(err)
		}
		gs[c] = g
	}
	return pod, pg, gs
}

func TestV2Tree(t *testing.T) {
	m, root := fakeV2(t)
	pod, pg, gs := v2Pod(t, m, root)
	// EnsureContainer enabled cpu and memory for the children of every ancestor.
	for _, d := range []string{root, filepath.Join(root, HostParent)} {
		if got, _ := os.ReadFile(filepath.Join(d, "cgroup.subtree_control")); !strings.Contains(string(got), "+cpu") || !strings.Contains(string(got), "+memory") {
			t.Errorf("%s/cgroup.subtree_control = %q, want +cpu +memory", d, got)
		}
	}
	files, err := m.ProcsFiles(gs["sidecar"])
	if err != nil || len(files) != 1 || files[0] != filepath.Join(root, string(gs["sidecar"]), "cgroup.procs") {
		t.Fatalf("ProcsFiles = %v, %v", files, err)
	}

	tg := Target{Pod: pod, PodGroup: pg, Sidecar: Container{"sidecar", gs["sidecar"]}, Apps: []Container{{"app", gs["app"]}},
		PodCPULimit: 1000, PodMemoryLimit: 512 << 20, OwnPod: true,
		Policy: Policy{CPU: CPUAmount{Percent: 20}, Mode: CPUAdd, Burst: CPUAmount{Millis: 100}, MemoryMax: 128 << 20}}
	ctx := context.Background()
	res := m.Reconcile(ctx, []Target{tg})
	if len(res.Errors) > 0 {
		t.Fatal(res.Errors)
	}
	for f, want := range map[string]string{
		string(gs["sidecar"]) + "/cpu.max":       "20000 100000",
		string(gs["sidecar"]) + "/cpu.max.burst": "10000",
		string(gs["sidecar"]) + "/cpu.weight":    "29", // 200m -> 204 shares -> 29
		string(gs["sidecar"]) + "/memory.max":    "134217728",
		string(pg) + "/cpu.max":                  "120000 100000",
		string(pg) + "/memory.max":               "536870912",
	} {
		if got := readFile(t, filepath.Join(root, f)); got != want {
			t.Errorf("%s = %q, want %q", f, got, want)
		}
	}
	if r := m.Reconcile(ctx, []Target{tg}); r.Writes != 0 {
		t.Fatalf("steady state made %d writes: %+v", r.Writes, r.Corrections)
	}
	writeFile(t, filepath.Join(root, string(gs["sidecar"]), "cpu.weight"), "100")
	if r := m.Reconcile(ctx, []Target{tg}); r.Writes != 1 || r.Drift != 1 || r.Corrections[0].Knob != KnobCPUShares {
		t.Fatalf("drift on cpu.weight: %+v", r)
	}

	st, err := m.Stats(gs["sidecar"])
	if err != nil {
		t.Fatal(err)
	}
	if st.CPUUsageNanos != 1500000 || st.NrPeriods != 40 || st.NrThrottled != 7 || st.ThrottledNanos != 900000 || st.MemoryUsage != 4096 {
		t.Fatalf("Stats = %+v", st)
	}
	if err := m.Remove(pg); err != nil {
		t.Fatal(err)
	}
	if exists(filepath.Join(root, string(pg))) {
		t.Fatal("pod group still there after Remove")
	}
}

func TestV2OOMWatch(t *testing.T) {
	checkLeaks(t)
	m, root := fakeV2(t)
	pod, pg, gs := v2Pod(t, m, root)
	w, err := m.NewOOMWatcher()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if err := w.Add(pod, pg, []Container{{"sidecar", gs["sidecar"]}, {"app", gs["app"]}}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := make(chan OOMEvent, 1)
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx, events) }()

	// The kernel bumps oom_kill in the victim's memory.events.
	writeFile(t, filepath.Join(root, string(gs["app"]), "memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
	select {
	case e := <-events:
		if e.Pod != pod || e.Container != "app" || e.Kills != 1 || e.Group != gs["app"] {
			t.Fatalf("event %+v, want one kill of app in %s", e, pod)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no OOM event within 5s")
	}
	w.Remove(pod)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}

// TestV2Real runs the v2 host-mode path on the machine's own v2 mount when
// that mount offers the cpu and memory controllers.
func TestV2Real(t *testing.T) {
	root := DefaultRoot
	m, err := Open(Options{Logger: testLogger(t)})
	if err == nil && m.Mode() == ModeHybrid {
		root = filepath.Join(DefaultRoot, "unified")
	}
	b, err := os.ReadFile(filepath.Join(root, "cgroup.controllers"))
	if err != nil {
		t.Skipf("no cgroup v2 mount at %s: %v", root, err)
	}
	ctrls := strings.Fields(string(b))
	if !contains(ctrls, "cpu") || !contains(ctrls, "memory") {
		t.Skipf("the v2 mount at %s offers controllers %v; cpu and memory are bound to v1 on this host", root, ctrls)
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	m, err = Open(Options{Root: root, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	pod, pg, gs := testPod(t, m, "sidecar")
	tg := Target{Pod: pod, PodGroup: pg, Sidecar: Container{"sidecar", gs["sidecar"]}, OwnPod: true,
		Policy: Policy{CPU: CPUAmount{Millis: 200}}}
	if _, err := m.Apply(context.Background(), tg); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, filepath.Join(root, string(gs["sidecar"]), "cpu.max")); got != "20000 100000" {
		t.Fatalf("cpu.max = %q", got)
	}
	if r := m.Reconcile(context.Background(), []Target{tg}); r.Writes != 0 {
		t.Fatalf("steady state made %d writes", r.Writes)
	}
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}
