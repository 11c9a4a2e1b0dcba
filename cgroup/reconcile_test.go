package cgroup

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshagent/meshagent/internal/execshim"
)

// kubeletSetsPod plays kubelet: a pod quota of 500m and an app container
// with its own 500m quota, as a Burstable/Guaranteed pod has on v1.
func kubeletSetsPod(t *testing.T, m *Manager, pg, app Group) {
	t.Helper()
	writeFile(t, filepath.Join(m.dir("cpu", pg), "cpu.cfs_quota_us"), "50000")
	writeFile(t, filepath.Join(m.dir("cpu", app), "cpu.cfs_quota_us"), "50000")
}

func TestAddModeWriteOrder(t *testing.T) {
	m := needRealV1(t)
	pod, pg, gs := testPod(t, m, "sidecar", "app")
	kubeletSetsPod(t, m, pg, gs["app"])
	podQuota := filepath.Join(m.dir("cpu", pg), "cpu.cfs_quota_us")
	sideQuota := filepath.Join(m.dir("cpu", gs["sidecar"]), "cpu.cfs_quota_us")
	sideBurst := filepath.Join(m.dir("cpu", gs["sidecar"]), "cpu.cfs_burst_us")

	// The rule is real: a child quota above the parent's is EINVAL, so a
	// naive order (container first when raising) fails.
	if err := writeSmall(sideQuota, "100000"); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("writing a child quota above its parent's: %v, want EINVAL (the kernel rule this test relies on)", err)
	}

	tg := Target{Pod: pod, PodGroup: pg, Sidecar: Container{"sidecar", gs["sidecar"]},
		Apps: []Container{{"app", gs["app"]}}, PodCPULimit: 500}
	steps := []struct {
		name              string
		cpu, burst        int64
		pod, quota, bursv string
		order             []string // container/knob of each write, in order
	}{
		{"raise beyond the pod's old quota", 1000, 800, "150000", "100000", "80000",
			// unlimited -> 100000 counts as falling, so burst goes first
			[]string{"/cpu.quota", "sidecar/cpu.burst", "sidecar/cpu.quota"}},
		{"lower below the old burst", 200, 100, "70000", "20000", "10000",
			[]string{"sidecar/cpu.burst", "sidecar/cpu.quota", "/cpu.quota"}},
		{"raise again, no burst", 2000, 0, "250000", "200000", "0",
			[]string{"/cpu.quota", "sidecar/cpu.quota", "sidecar/cpu.burst"}},
	}
	for _, st := range steps {
		tg.Policy = Policy{CPU: CPUAmount{Millis: st.cpu}, Mode: CPUAdd, Burst: CPUAmount{Millis: st.burst}}
		res, err := m.Apply(context.Background(), tg)
		if err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if got := readFile(t, podQuota); got != st.pod {
			t.Errorf("%s: pod quota %s, want %s", st.name, got, st.pod)
		}
		if got := readFile(t, sideQuota); got != st.quota {
			t.Errorf("%s: sidecar quota %s, want %s", st.name, got, st.quota)
		}
		if got := readFile(t, sideBurst); got != st.bursv {
			t.Errorf("%s: sidecar burst %s, want %s", st.name, got, st.bursv)
		}
		var order []string
		for _, c := range res.Corrections {
			order = append(order, c.Container+"/"+string(c.Knob))
		}
		// shares sit between decreases and increases; compare the bandwidth writes only
		if got, want := bandwidthOnly(order), bandwidthOnly(st.order); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("%s: write order %v, want %v", st.name, got, want)
		}
	}
}

func bandwidthOnly(order []string) []string {
	var out []string
	for _, o := range order {
		if strings.HasSuffix(o, "cpu.quota") || strings.HasSuffix(o, "cpu.burst") {
			out = append(out, o)
		}
	}
	return out
}

func TestDriftRestoredAndCounted(t *testing.T) {
	checkLeaks(t)
	m := needRealV1(t)
	var logs bytes.Buffer
	m.log = slog.New(slog.NewTextHandler(&logs, nil))
	pod, pg, gs := testPod(t, m, "sidecar", "app")
	files, _ := m.ProcsFiles(gs["sidecar"])
	side := startChild(t, execshim.Spec{CgroupProcs: files}, "hold:0")
	side.waitLine(t, "ready", 20*time.Second)
	tg := Target{Pod: pod, PodGroup: pg, Sidecar: Container{"sidecar", gs["sidecar"]},
		Apps: []Container{{"app", gs["app"]}}, PodCPULimit: 1000, PodMemoryLimit: 256 << 20, OwnPod: true,
		Policy: Policy{CPU: CPUAmount{Millis: 300}, MemoryMax: 128 << 20}}
	ctx := context.Background()
	first := m.Reconcile(ctx, []Target{tg})
	if len(first.Errors) > 0 || first.Writes == 0 || first.Drift != 0 {
		t.Fatalf("first pass: %+v, want writes, no drift, no errors", first)
	}
	if steady := m.Reconcile(ctx, []Target{tg}); steady.Writes != 0 || steady.Checked == 0 {
		t.Fatalf("steady state pass made %d writes (checked %d), want 0", steady.Writes, steady.Checked)
	}

	quota := filepath.Join(m.dir("cpu", gs["sidecar"]), "cpu.cfs_quota_us")
	writeFile(t, quota, "50000") // someone else rewrites it
	res := m.Reconcile(ctx, []Target{tg})
	if res.Writes != 1 || res.Drift != 1 || len(res.Corrections) != 1 {
		t.Fatalf("after drift: %d writes, %d drift, want 1 and 1: %+v", res.Writes, res.Drift, res.Corrections)
	}
	c := res.Corrections[0]
	if c.Pod != pod || c.Container != "sidecar" || c.Knob != KnobCPUQuota || c.Was != "50000" || c.Value != "30000" || !c.Drift {
		t.Fatalf("correction = %+v", c)
	}
	if got := readFile(t, quota); got != "30000" {
		t.Fatalf("quota after the pass = %s, want 30000 restored", got)
	}
	if !strings.Contains(logs.String(), `msg="cgroup drift corrected" pod=`+pod+" container=sidecar knob=cpu.quota") {
		t.Fatalf("drift not logged with pod, container and knob:\n%s", logs.String())
	}

	// The sidecar's OOM score is a knob too.
	if err := SetOOMScoreAdj(side.cmd.Process.Pid, 500); err != nil {
		t.Fatal(err)
	}
	res = m.Reconcile(ctx, []Target{tg})
	if res.Drift != 1 || res.Corrections[0].Knob != KnobOOMScoreAdj {
		t.Fatalf("oom_score_adj drift: %+v", res)
	}
	if v, _ := ReadOOMScoreAdj(side.cmd.Process.Pid); v != 1000 {
		t.Fatalf("sidecar oom_score_adj = %d, want 1000 restored", v)
	}
	if steady := m.Reconcile(ctx, []Target{tg}); steady.Writes != 0 {
		t.Fatalf("steady state after the correction made %d writes", steady.Writes)
	}
}

func TestBadPolicyIsolatedToItsPod(t *testing.T) {
	m := needRealV1(t)
	bad, badG, badCs := testPod(t, m, "sidecar")
	good, goodG, goodCs := testPodNamed(t, m, podName(t)+"-good", "sidecar")
	badQuota := filepath.Join(m.dir("cpu", badCs["sidecar"]), "cpu.cfs_quota_us")
	before := readFile(t, badQuota)
	targets := []Target{
		{Pod: bad, PodGroup: badG, Sidecar: Container{"sidecar", badCs["sidecar"]}, PodCPULimit: 500,
			Policy: Policy{CPU: CPUAmount{Millis: 2000}}},
		{Pod: good, PodGroup: goodG, Sidecar: Container{"sidecar", goodCs["sidecar"]}, PodCPULimit: 500,
			Policy: Policy{CPU: CPUAmount{Millis: 100}}},
	}
	res := m.Reconcile(context.Background(), targets)
	if len(res.Errors) != 1 {
		t.Fatalf("errors = %v, want one for pod %s", res.Errors, bad)
	}
	var pe *PodError
	if !errors.As(res.Errors[0], &pe) || pe.Pod != bad {
		t.Fatalf("error %v is not a PodError for %s", res.Errors[0], bad)
	}
	for _, want := range []string{"pod " + bad, "container sidecar", "2000m", "500m"} {
		if !strings.Contains(res.Errors[0].Error(), want) {
			t.Errorf("error %q does not name %q", res.Errors[0], want)
		}
	}
	if got := readFile(t, badQuota); got != before {
		t.Errorf("bad pod's quota changed to %s; nothing may be written for it", got)
	}
	if got := readFile(t, filepath.Join(m.dir("cpu", goodCs["sidecar"]), "cpu.cfs_quota_us")); got != "10000" {
		t.Errorf("good pod's sidecar quota = %s, want 10000", got)
	}
}

func TestPlanWritesNothing(t *testing.T) {
	m := needRealV1(t)
	pod, pg, gs := testPod(t, m, "sidecar", "app")
	kubeletSetsPod(t, m, pg, gs["app"])
	tg := Target{Pod: pod, PodGroup: pg, Sidecar: Container{"sidecar", gs["sidecar"]}, PodCPULimit: 500,
		Policy: Policy{CPU: CPUAmount{Percent: 20}, Mode: CPUAdd}}
	plans := m.Plan(context.Background(), []Target{tg, {Pod: "broken", PodGroup: pg, Sidecar: Container{"sidecar", gs["sidecar"]},
		Policy: Policy{CPU: CPUAmount{Percent: 20}}}})
	if len(plans) != 2 || plans[0].Err != nil {
		t.Fatalf("plans = %+v", plans)
	}
	if plans[1].Err == nil || !strings.Contains(plans[1].Err.Error(), "pod broken") || !strings.Contains(plans[1].Err.Error(), "no") {
		t.Fatalf("plan of a pod without a cpu limit and a %% policy: err = %v", plans[1].Err)
	}
	got := map[string]PlanEntry{}
	for _, e := range plans[0].Entries {
		got[e.Container+"/"+string(e.Knob)] = e
	}
	for k, want := range map[string][2]string{
		"/cpu.quota":        {"50000", "60000"},
		"sidecar/cpu.quota": {"-1", "10000"},
	} {
		e := got[k]
		if e.Current != want[0] || e.Value != want[1] || !e.Change {
			t.Errorf("plan %s = current %q desired %q change %v, want %q -> %q", k, e.Current, e.Value, e.Change, want[0], want[1])
		}
	}
	if q := readFile(t, filepath.Join(m.dir("cpu", pg), "cpu.cfs_quota_us")); q != "50000" {
		t.Fatalf("Plan wrote the pod quota: %s", q)
	}
	if _, err := m.Apply(context.Background(), tg); err != nil {
		t.Fatal(err)
	}
	for _, e := range m.Plan(context.Background(), []Target{tg})[0].Entries {
		if e.Change {
			t.Errorf("after Apply, plan still wants %s %s: %q -> %q", e.Container, e.Knob, e.Current, e.Value)
		}
	}
}

func TestPodErrorNamesPodOnce(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{&PodError{Pod: "web", Err: errors.New("read cpu period: boom")}, "pod web: read cpu period: boom"},
		{&PodError{Pod: "web", Err: errors.New("pod web container envoy: bad")}, "pod web container envoy: bad"},
		{&PodError{Pod: "web", Err: errors.New("pod webby: bad")}, "pod web: pod webby: bad"},
	} {
		if got := tc.err.Error(); got != tc.want {
			t.Errorf("Error() = %q, want %q", got, tc.want)
		}
	}
}
