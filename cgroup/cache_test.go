package cgroup

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/meshagent/meshagent/internal/execshim"
)

// A pass right after another must see a process that joined the sidecar in
// between: the v1 pid list a kept-open cgroup.procs serves is up to a second
// old, so the listing is opened afresh (through a kept directory fd).
func TestReconcileSeesNewSidecarProcess(t *testing.T) {
	checkLeaks(t)
	m := needRealV1(t)
	pod, pg, gs := testPod(t, m, "sidecar", "app")
	files, _ := m.ProcsFiles(gs["sidecar"])
	first := startChild(t, execshim.Spec{CgroupProcs: files}, "hold:0")
	first.waitLine(t, "ready", 20*time.Second)
	tg := Target{Pod: pod, PodGroup: pg, Sidecar: Container{"sidecar", gs["sidecar"]}, Apps: []Container{{"app", gs["app"]}}}
	ctx := context.Background()
	if r := m.Reconcile(ctx, []Target{tg}); r.Writes != 1 || len(r.Errors) > 0 {
		t.Fatalf("first pass: %+v, want the one oom_score_adj write", r)
	}
	if r := m.Reconcile(ctx, []Target{tg}); r.Writes != 0 {
		t.Fatalf("steady pass: %d writes", r.Writes)
	}
	// The second process starts at the test's own value, not the sidecar's.
	second := startChild(t, execshim.Spec{CgroupProcs: files}, "hold:0")
	second.waitLine(t, "ready", 20*time.Second)
	r := m.Reconcile(ctx, []Target{tg})
	if r.Writes != 1 || r.Drift != 0 || r.Corrections[0].PID != second.cmd.Process.Pid {
		t.Fatalf("pass after a new sidecar process: %+v, want one first write for pid %d", r, second.cmd.Process.Pid)
	}
	// A process whose kept /proc fd outlives it: no error, nothing to write,
	// and the one left is still checked.
	first.kill()
	if err := SetOOMScoreAdj(second.cmd.Process.Pid, 700); err != nil {
		t.Fatal(err)
	}
	r = m.Reconcile(ctx, []Target{tg})
	if len(r.Errors) > 0 || r.Writes != 1 || r.Drift != 1 || r.Corrections[0].PID != second.cmd.Process.Pid {
		t.Fatalf("pass after an exit and a drift: %+v, want one drift correction for pid %d", r, second.cmd.Process.Pid)
	}
}

// A group removed and re-created behind the Manager's back, under the same
// name, is listed through its new directory, not the kept fd of the old one.
func TestProcsAfterGroupRecreated(t *testing.T) {
	checkLeaks(t)
	m := needRealV1(t)
	_, _, gs := testPod(t, m, "sidecar")
	g := gs["sidecar"]
	if pids, err := m.Procs(g); err != nil || len(pids) != 0 {
		t.Fatalf("Procs of a new group = %v, %v", pids, err)
	}
	for _, d := range m.dirs(g) {
		if err := unix.Rmdir(d); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	files, _ := m.ProcsFiles(g)
	c := startChild(t, execshim.Spec{CgroupProcs: files}, "hold:0")
	c.waitLine(t, "ready", 20*time.Second)
	pids, err := m.Procs(g)
	if err != nil || len(pids) != 1 || pids[0] != c.cmd.Process.Pid {
		t.Fatalf("Procs of the re-created group = %v, %v; want [%d]", pids, err, c.cmd.Process.Pid)
	}
}

// The memo of a pod's translation only saves computing: a changed target,
// a changed observed value or a caller reusing its Target's slices and
// pointers gives the new settings, and drift is still found.
func TestMemoNeverServesStaleSettings(t *testing.T) {
	checkLeaks(t)
	m := needRealV1(t)
	pod, pg, gs := testPod(t, m, "sidecar", "app")
	adj := 100
	tg := Target{Pod: pod, PodGroup: pg, Sidecar: Container{"sidecar", gs["sidecar"]},
		Apps: []Container{{"app", gs["app"]}}, PodCPULimit: 1000, OwnPod: true,
		Policy: Policy{CPU: CPUAmount{Millis: 300}, OOMScoreAdj: &adj}}
	ctx := context.Background()
	sideQuota := filepath.Join(m.dir("cpu", gs["sidecar"]), "cpu.cfs_quota_us")
	pass := func(what string, writes int) Result {
		t.Helper()
		r := m.Reconcile(ctx, []Target{tg})
		if len(r.Errors) > 0 || r.Writes != writes {
			t.Fatalf("%s: %d writes (%v), want %d", what, r.Writes, r.Errors, writes)
		}
		return r
	}
	pass("first", 3) // sidecar quota and shares, pod quota (period and burst are the defaults)
	pass("steady", 0)

	tg.Policy.CPU = CPUAmount{Millis: 400}
	pass("policy changed", 2) // quota and shares
	if got := readFile(t, sideQuota); got != "40000" {
		t.Fatalf("sidecar quota %s after a policy change, want 40000", got)
	}

	// The pod's period is observed, not set: a new one changes the quotas.
	writeFile(t, filepath.Join(m.dir("cpu", pg), "cpu.cfs_period_us"), "50000")
	pass("pod period changed", 3) // sidecar period, sidecar quota, pod quota
	if got := readFile(t, sideQuota); got != "20000" {
		t.Fatalf("sidecar quota %s after the pod period became 50000, want 20000", got)
	}

	files, _ := m.ProcsFiles(gs["sidecar"])
	c := startChild(t, execshim.Spec{CgroupProcs: files}, "hold:0")
	c.waitLine(t, "ready", 20*time.Second)
	pass("new sidecar process", 1)
	pass("steady again", 0)

	// A caller that edits its Target in place: the memo kept its own copy.
	adj = 200
	r := pass("oom value edited in place", 1)
	if v, _ := ReadOOMScoreAdj(c.cmd.Process.Pid); v != 200 || r.Corrections[0].Value != "200" {
		t.Fatalf("sidecar oom_score_adj %d (wrote %q), want 200", v, r.Corrections[0].Value)
	}
	tg.Apps[0].Name = "renamed" // the memo must not share the Apps array either
	pass("apps edited in place", 0)
	if memo := m.memo[pod]; memo == nil || memo.t.Apps[0].Name != "renamed" {
		t.Fatalf("memo after an in-place edit of Apps: %+v", memo)
	}

	writeFile(t, sideQuota, "10000")
	if r := pass("drift", 1); r.Drift != 1 || r.Corrections[0].File != sideQuota {
		t.Fatalf("drift: %+v", r)
	}
}

// A pass large enough to spread over workers counts each pod's writes
// once and reports them in target order.
func TestParallelPassInTargetOrder(t *testing.T) {
	checkLeaks(t)
	m := needRealV1(t)
	const pods = 80
	if reconcileWorkers(pods) < 2 {
		t.Logf("GOMAXPROCS=1: the pass runs on one worker")
	}
	var targets []Target
	for i := range pods {
		pod, pg, gs := testPodNamed(t, m, podName(t)+"-"+strconv.Itoa(i), "sidecar")
		targets = append(targets, Target{Pod: pod, PodGroup: pg, Sidecar: Container{"sidecar", gs["sidecar"]},
			PodCPULimit: 1000, Policy: Policy{CPU: CPUAmount{Millis: 100}}})
	}
	ctx := context.Background()
	if r := m.Reconcile(ctx, targets); len(r.Errors) > 0 || r.Pods != pods {
		t.Fatalf("first pass: %d pods, errors %v", r.Pods, r.Errors)
	}
	if r := m.Reconcile(ctx, targets); r.Writes != 0 {
		t.Fatalf("steady pass: %d writes", r.Writes)
	}
	var want []string
	for i := pods - 1; i >= 0; i -= 7 {
		f := filepath.Join(m.dir("cpu", targets[i].Sidecar.Group), "cpu.cfs_quota_us")
		writeFile(t, f, "5000")
		want = append([]string{f}, want...)
	}
	r := m.Reconcile(ctx, targets)
	if r.Drift != len(want) || len(r.Corrections) != len(want) {
		t.Fatalf("%d drift corrections, want %d", r.Drift, len(want))
	}
	for i, c := range r.Corrections {
		if c.File != want[i] || c.Value != "10000" {
			t.Errorf("correction %d: %s = %s, want %s = 10000", i, c.File, c.Value, want[i])
		}
	}
	if s := fmt.Sprint(m.Reconcile(ctx, targets).Writes); s != "0" {
		t.Fatalf("steady pass after the corrections: %s writes", s)
	}
}

// TestKnobFilesKeepWithinBudget: past its budget the cache reads files by
// open and close instead of keeping more fds, so it cannot take the fds the
// agent's starts and sockets need; the values read are the same either way.
func TestKnobFilesKeepWithinBudget(t *testing.T) {
	dir := t.TempDir()
	k := &knobFiles{budget: 3}
	defer k.closeAll()
	fdsBefore := openFDs(t)
	for i := range 10 {
		p := filepath.Join(dir, strconv.Itoa(i))
		require.NoError(t, os.WriteFile(p, []byte(strconv.Itoa(i*7)), 0o600))
		b, err := k.read(p, make([]byte, 64))
		require.NoError(t, err)
		assert.Equal(t, strconv.Itoa(i*7), string(b))
	}
	assert.EqualValues(t, 3, k.kept.Load())
	assert.LessOrEqual(t, openFDs(t)-fdsBefore, 3, "no more fds kept than the budget")
	// A kept file and one read past the budget both see a rewrite.
	for _, i := range []int{0, 9} {
		p := filepath.Join(dir, strconv.Itoa(i))
		require.NoError(t, os.WriteFile(p, []byte("changed"), 0o600))
		b, err := k.read(p, make([]byte, 64))
		require.NoError(t, err)
		assert.Equal(t, "changed", string(b))
	}
	k.closeAll()
	assert.Zero(t, k.kept.Load())
	assert.Equal(t, fdsBefore, openFDs(t))
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	return len(ents)
}
