package cgroup

import (
	"context"
	"path/filepath"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/meshagent/meshagent/internal/execshim"
)

// cpuOver measures the CPUs g used over window, from the kernel's own
// accounting (cpuacct), not from wall-clock progress of a process that
// other load on the machine may delay.
func cpuOver(t *testing.T, m *Manager, g Group, window time.Duration) (float64, Stats, Stats) {
	t.Helper()
	s0, err := m.Stats(g)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	time.Sleep(window)
	s1, err := m.Stats(g)
	if err != nil {
		t.Fatal(err)
	}
	el := time.Since(t0)
	return float64(s1.CPUUsageNanos-s0.CPUUsageNanos) / float64(el.Nanoseconds()), s0, s1
}

// favourTests gives the meshagent parent group the largest cpu.shares for
// the test, so the CPU other jobs on a shared machine use does not decide
// what the test's pod gets; the pod-internal split is what is under test.
func favourTests(t *testing.T, m *Manager) {
	t.Helper()
	f := filepath.Join(m.dir("cpu", HostParent), "cpu.shares")
	old := readFile(t, f)
	writeFile(t, f, "262144")
	t.Cleanup(func() { writeSmall(f, old) })
}

func TestThrottlingAt20Percent(t *testing.T) {
	checkLeaks(t)
	m := needRealV1(t)
	pod, pg, gs := testPod(t, m, "sidecar")
	favourTests(t, m)
	tg := Target{Pod: pod, PodGroup: pg, Sidecar: Container{"sidecar", gs["sidecar"]}, OwnPod: true,
		Policy: Policy{CPU: CPUAmount{Millis: 200}}}
	if _, err := m.Apply(context.Background(), tg); err != nil {
		t.Fatal(err)
	}
	files, _ := m.ProcsFiles(gs["sidecar"])
	startChild(t, execshim.Spec{CgroupProcs: files}, "busy:1") // two spinning threads: demand 2 CPUs
	time.Sleep(500 * time.Millisecond)
	cpu, s0, s1 := cpuOver(t, m, gs["sidecar"], 5*time.Second)
	t.Logf("sidecar used %.3f CPU over 5s; throttled %d of %d periods, %s",
		cpu, s1.NrThrottled-s0.NrThrottled, s1.NrPeriods-s0.NrPeriods, time.Duration(s1.ThrottledNanos-s0.ThrottledNanos))
	if cpu < 0.18 || cpu > 0.22 {
		t.Errorf("sidecar with a 20%% quota used %.3f CPU, want 0.2 ±10%%", cpu)
	}
	if s1.NrThrottled-s0.NrThrottled < 10 || s1.ThrottledNanos <= s0.ThrottledNanos {
		t.Errorf("cpu.stat shows %d throttled periods (%d ns) over 5s, want the quota to throttle",
			s1.NrThrottled-s0.NrThrottled, s1.ThrottledNanos-s0.ThrottledNanos)
	}
}

func TestStarvationFixedByPolicy(t *testing.T) {
	checkLeaks(t)
	m := needRealV1(t)
	pod, pg, gs := testPod(t, m, "sidecar", "app")
	// No favourTests here: the app spins on every CPU, and a parent with
	// the largest shares would starve this test process itself (and the
	// rest of the machine) while it applies the policy and measures.
	side := Container{"sidecar", gs["sidecar"]}
	// Before: the sidecar left at minimal shares, no quota.
	writeFile(t, filepath.Join(m.dir("cpu", side.Group), "cpu.shares"), "2")
	appFiles, _ := m.ProcsFiles(gs["app"])
	sideFiles, _ := m.ProcsFiles(side.Group)
	// The app is busy on every CPU (one spinning thread per CPU, plus one).
	startChild(t, execshim.Spec{CgroupProcs: appFiles}, "busy:"+strconv.Itoa(runtime.NumCPU()))
	startChild(t, execshim.Spec{CgroupProcs: sideFiles}, "busy:0")
	time.Sleep(500 * time.Millisecond)
	starved, _, _ := cpuOver(t, m, side.Group, 3*time.Second)
	t.Logf("sidecar at cpu.shares=2 beside a busy app: %.4f CPU", starved)
	if starved > 0.05 {
		t.Errorf("sidecar at minimal shares got %.3f CPU; the control should show starvation (< 0.05)", starved)
	}

	tg := Target{Pod: pod, PodGroup: pg, Sidecar: side, Apps: []Container{{"app", gs["app"]}}, OwnPod: true,
		Policy: Policy{CPU: CPUAmount{Millis: 200}}}
	if _, err := m.Apply(context.Background(), tg); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	// Up to three windows: load outside this pod (another test's busy
	// processes on the same two cores) can take a window's CPU; the claim
	// is that the policy gives the sidecar its quota, which one clean
	// window shows.
	var fixed float64
	for try := 1; try <= 3 && fixed < 0.8*0.2; try++ {
		got, _, _ := cpuOver(t, m, side.Group, 3*time.Second)
		fixed = max(fixed, got)
		t.Logf("window %d: sidecar with policy cpu=200m beside the same app: %.4f CPU (shares %s)", try, got,
			readFile(t, filepath.Join(m.dir("cpu", side.Group), "cpu.shares")))
	}
	if fixed < 0.8*0.2 {
		t.Errorf("sidecar with a 200m policy got %.3f CPU, want at least 80%% of its quota (0.16)", fixed)
	}
}
