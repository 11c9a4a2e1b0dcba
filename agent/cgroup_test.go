package agent

import (
	"context"
	"fmt"
	"io"
	"net/http/httptest"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/meshagent/meshagent/cgroup"
)

// needCgroupV1 skips unless the test can create cgroups on a v1 (or
// hybrid) host, which is what CI has.
func needCgroupV1(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	if _, err := os.Stat("/sys/fs/cgroup/memory/cgroup.procs"); err != nil {
		t.Skip("needs a cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")
	}
}

// cgPodName is unique per test process: cgroup trees are node-wide and
// other test binaries may run at the same time.
func cgPodName(t *testing.T, base string) string {
	t.Helper()
	return fmt.Sprintf("%s-%d", base, os.Getpid())
}

// testHog allocates $HOG_MB MiB, 1 MiB at a time with every page touched
// (unless the file $HOG_ONCE exists; it is created first), then waits for
// SIGTERM.
func testHog() {
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	stamp("start")
	mb, _ := strconv.Atoi(os.Getenv("HOG_MB"))
	if once := os.Getenv("HOG_ONCE"); once != "" {
		if _, err := os.Stat(once); err == nil {
			mb = 0
		} else {
			os.WriteFile(once, nil, 0o600)
		}
	}
	var keep [][]byte
	for i := 0; i < mb; i++ {
		b := make([]byte, 1<<20)
		for j := 0; j < len(b); j += 4096 {
			b[j] = 1
		}
		keep = append(keep, b)
		time.Sleep(2 * time.Millisecond)
	}
	stamp("allocated")
	<-term
	_ = keep
	os.Exit(0)
}

// reportScript is a sidecar that records, as its very first actions (shell
// builtins, no child process), its own oom_score_adj and memory cgroup,
// then sleeps. The shim has already exec'd it: these are the values it ran
// its first instruction with.
const reportScript = `read adj < /proc/self/oom_score_adj; echo "adj $adj" >> "$OUT"
while IFS= read -r l; do case "$l" in *:memory:*) echo "cg $l" >> "$OUT";; esac; done < /proc/self/cgroup
exec sleep 1000`

func readFileT(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	return strings.TrimSpace(string(b))
}

func writeFileT(t *testing.T, p, v string) {
	t.Helper()
	require.NoError(t, os.WriteFile(p, []byte(v), 0))
}

func cgFile(controller, pod, container, file string) string {
	g := "/sys/fs/cgroup/" + controller + "/meshagent/" + pod
	if container != "" {
		g += "/" + container
	}
	return filepath.Join(g, file)
}

func scriptPod(name, out string, res PodResources, policy map[string]string) PodSpec {
	return PodSpec{
		Name: name, Resources: res, SidecarPolicy: policy,
		Containers: []ContainerSpec{
			{Name: "proxy", Role: RoleSidecar, Command: "/bin/sh", Args: []string{"-c", reportScript},
				Env: map[string]string{"OUT": out}, Stop: StopPolicy{Grace: Duration(time.Second)}},
			{Name: "app", Role: RoleApp, Command: "sleep", Args: []string{"1000"},
				Stop: StopPolicy{Grace: Duration(time.Second)}},
		},
	}
}

func agentAdj(t *testing.T) int {
	t.Helper()
	v, err := cgroup.ReadOOMScoreAdj(os.Getpid())
	require.NoError(t, err)
	return v
}

// scrape returns the metrics exposition.
func scrape(t *testing.T, a *Agent) string {
	t.Helper()
	rec := httptest.NewRecorder()
	a.Metrics().Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	b, _ := io.ReadAll(rec.Body)
	return string(b)
}

func cgEvents(a *Agent, typ, pod string) []Event {
	var out []Event
	for _, e := range a.Events(0, 10000) {
		if e.Type == typ && (pod == "" || e.Pod == pod) {
			out = append(out, e)
		}
	}
	return out
}

func TestCgroupSidecarConfinedFromFirstInstructionAndAfterRestart(t *testing.T) {
	needCgroupV1(t)
	pod := cgPodName(t, "cgfirst")
	out := filepath.Join(t.TempDir(), "report")
	spec := scriptPod(pod, out, PodResources{CPU: "1", Memory: "256Mi"}, map[string]string{"cpu": "200m"})
	ra := startAgent(t, testConfig(t, spec), WithCgroups())
	require.True(t, ra.CgroupStatus().Enabled, ra.CgroupStatus().Reason)
	ra.waitPhase(t, pod, PhaseRunning)
	want := cgroup.SidecarOOMScoreAdj(agentAdj(t))
	wantLines := []string{fmt.Sprintf("adj %d", want), "cg "}
	eventually(t, 5*time.Second, "sidecar reported", func() bool {
		b, _ := os.ReadFile(out)
		return strings.Count(string(b), "\n") >= 2
	})
	checkReport := func(n int) {
		lines := strings.Split(readFileT(t, out), "\n")
		require.Len(t, lines, 2*n, "report: %q", lines)
		l := lines[2*(n-1):]
		assert.Equal(t, wantLines[0], l[0], "oom_score_adj at the first instruction of run %d", n)
		assert.True(t, strings.HasSuffix(l[1], ":/meshagent/"+pod+"/proxy"), "memory cgroup at the first instruction of run %d: %s", n, l[1])
	}
	checkReport(1)

	// Values applied before the sidecar ran: pod limits and sidecar quota.
	assert.Equal(t, "100000", readFileT(t, cgFile("cpu", pod, "", "cpu.cfs_quota_us")))
	assert.Equal(t, "268435456", readFileT(t, cgFile("memory", pod, "", "memory.limit_in_bytes")))
	assert.Equal(t, "20000", readFileT(t, cgFile("cpu", pod, "proxy", "cpu.cfs_quota_us")))
	eventually(t, 5*time.Second, "app started", func() bool { return ra.container(t, pod, "app").PID != 0 })
	app := ra.container(t, pod, "app")
	assert.Equal(t, strconv.Itoa(agentAdj(t)), readFileT(t, fmt.Sprintf("/proc/%d/oom_score_adj", app.PID)), "the app keeps its value")
	assert.Contains(t, readFileT(t, fmt.Sprintf("/proc/%d/cgroup", app.PID)), ":/meshagent/"+pod+"/app")

	old := ra.container(t, pod, "proxy").PID
	require.NoError(t, ra.RestartContainer(context.Background(), pod, "proxy", CauseOperator))
	eventually(t, 10*time.Second, "sidecar restarted and reported", func() bool {
		c := ra.container(t, pod, "proxy")
		b, _ := os.ReadFile(out)
		return c.PID != 0 && c.PID != old && strings.Count(string(b), "\n") >= 4
	})
	checkReport(2)
	assert.Equal(t, app.PID, ra.container(t, pod, "app").PID, "the app is untouched by the sidecar's restart")

	// Removing the pod (ordered stop at agent exit) removes its groups.
	ra.stop(t)
	_, err := os.Stat(filepath.Dir(cgFile("memory", pod, "", "x")))
	assert.True(t, os.IsNotExist(err), "pod group removed after stop: %v", err)
}

func TestCgroupDriftRestoredAndCounted(t *testing.T) {
	needCgroupV1(t)
	pod := cgPodName(t, "cgdrift")
	spec := scriptPod(pod, filepath.Join(t.TempDir(), "r"), PodResources{CPU: "1"}, map[string]string{"cpu": "300m"})
	cfg := testConfig(t, spec)
	cfg.Node.Cgroup.ReconcileInterval = Duration(time.Hour) // passes run when the test says
	ra := startAgent(t, cfg, WithCgroups())
	ra.waitPhase(t, pod, PhaseRunning)
	eventually(t, 5*time.Second, "app started", func() bool { return ra.container(t, pod, "app").PID != 0 })
	quota := cgFile("cpu", pod, "proxy", "cpu.cfs_quota_us")
	require.Equal(t, "30000", readFileT(t, quota))

	res, err := ra.ReconcileCgroups(context.Background())
	require.NoError(t, err)
	assert.Equal(t, 0, res.Writes, "steady state writes nothing: %+v", res.Corrections)

	writeFileT(t, quota, "70000") // someone else
	res, err = ra.ReconcileCgroups(context.Background())
	require.NoError(t, err)
	assert.Equal(t, 1, res.Drift)
	assert.Equal(t, 1, res.Writes)
	assert.Equal(t, "30000", readFileT(t, quota))
	assert.Contains(t, scrape(t, ra.Agent),
		fmt.Sprintf(`meshagent_cgroup_drift_corrections_total{container="proxy",knob="cpu.quota",pod=%q} 1`, pod))
	evs := cgEvents(ra.Agent, EvCgroupDrift, pod)
	require.Len(t, evs, 1)
	assert.Equal(t, "70000", evs[0].Fields["was"])

	// The drift inspection sees a value changed behind the agent's back.
	writeFileT(t, quota, "70000")
	rep := ra.Inspect(context.Background())
	var found bool
	for _, f := range rep.Findings {
		if f.Check == "cgroup-drift" && f.Pod == pod && f.Container == "proxy" {
			found = strings.HasPrefix(f.Found, "70000")
		}
	}
	assert.True(t, found, "inspect findings: %+v", rep.Findings)
}

func TestCgroupPlanWritesNothing(t *testing.T) {
	needCgroupV1(t)
	pod := cgPodName(t, "cgplan")
	spec := scriptPod(pod, filepath.Join(t.TempDir(), "r"), PodResources{CPU: "2", Memory: "128Mi"}, map[string]string{"cpu": "25%"})
	cfg := testConfig(t, spec)
	cfg.Node.Cgroup.ReconcileInterval = Duration(time.Hour)
	ra := startAgent(t, cfg, WithCgroups())
	ra.waitPhase(t, pod, PhaseRunning)
	eventually(t, 5*time.Second, "app started", func() bool { return ra.container(t, pod, "app").PID != 0 })
	quota := cgFile("cpu", pod, "proxy", "cpu.cfs_quota_us")
	require.Equal(t, "50000", readFileT(t, quota)) // 25% of 2 CPUs

	_, err := ra.SetSwitch(context.Background(), SwitchCgroupWrites, false, 0)
	require.NoError(t, err)
	writeFileT(t, quota, "40000")
	plans, err := NewClient(ra.socket).CgroupPlan(context.Background())
	require.NoError(t, err)
	var got *PlanSetting
	knobs := map[string]bool{}
	for _, p := range plans {
		if p.Pod != pod {
			continue
		}
		assert.Empty(t, p.Error)
		for i, s := range p.Settings {
			knobs[s.Container+"/"+s.Knob] = true
			if s.Container == "proxy" && s.Knob == "cpu.quota" {
				got = &p.Settings[i]
			}
		}
	}
	require.NotNil(t, got, "plan: %+v", plans)
	assert.Equal(t, PlanSetting{Container: "proxy", Knob: "cpu.quota", File: quota, Desired: "50000", Current: "40000", Change: true}, *got)
	for _, k := range []string{"/cpu.quota", "/memory.max", "proxy/cpu.shares", "proxy/oom_score_adj"} {
		assert.True(t, knobs[k], "plan has %s: %v", k, knobs)
	}
	res, err := ra.ReconcileCgroups(context.Background())
	require.NoError(t, err)
	assert.Equal(t, 0, res.Writes, "cgroup-writes off: no pass writes")
	assert.Equal(t, "40000", readFileT(t, quota), "plan and a pass with writes off leave the value")
	st, err := NewClient(ra.socket).Status(context.Background())
	require.NoError(t, err)
	assert.False(t, st.Cgroup.Writes)
	assert.Contains(t, st.Cgroup.Reason, "cgroup-writes")
}

func TestCgroupBadPolicyLeavesOtherPodsApplied(t *testing.T) {
	needCgroupV1(t)
	bad, good := cgPodName(t, "cgbad"), cgPodName(t, "cggood")
	dir := t.TempDir()
	// 500m for the sidecar of a 200m pod: a v1 child cannot exceed its parent.
	badSpec := scriptPod(bad, filepath.Join(dir, "bad"), PodResources{CPU: "200m"}, map[string]string{"cpu": "500m"})
	goodSpec := scriptPod(good, filepath.Join(dir, "good"), PodResources{CPU: "1"}, map[string]string{"cpu": "300m"})
	cfg := testConfig(t, badSpec, goodSpec)
	cfg.Node.Cgroup.ReconcileInterval = Duration(time.Hour)
	ra := startAgent(t, cfg, WithCgroups())
	ra.waitPhase(t, bad, PhaseRunning)
	ra.waitPhase(t, good, PhaseRunning)
	eventually(t, 5*time.Second, "apps started", func() bool {
		return ra.container(t, bad, "app").PID != 0 && ra.container(t, good, "app").PID != 0
	})

	assert.Equal(t, "30000", readFileT(t, cgFile("cpu", good, "proxy", "cpu.cfs_quota_us")))
	assert.Equal(t, "100000", readFileT(t, cgFile("cpu", good, "", "cpu.cfs_quota_us")))
	assert.Equal(t, "-1", readFileT(t, cgFile("cpu", bad, "proxy", "cpu.cfs_quota_us")), "nothing written for the bad pod")
	assert.Equal(t, "-1", readFileT(t, cgFile("cpu", bad, "", "cpu.cfs_quota_us")), "not even its own limit")
	badPID := ra.container(t, bad, "proxy").PID
	assert.Equal(t, strconv.Itoa(agentAdj(t)), readFileT(t, fmt.Sprintf("/proc/%d/oom_score_adj", badPID)), "no oom_score_adj for the bad pod")
	assert.Contains(t, readFileT(t, fmt.Sprintf("/proc/%d/cgroup", badPID)), ":/meshagent/"+bad+"/proxy", "still placed")

	evs := cgEvents(ra.Agent, EvCgroupError, bad)
	require.Len(t, evs, 1, "one event, not one per start")
	assert.Contains(t, evs[0].Reason, "above the pod's cpu limit")
	assert.Empty(t, cgEvents(ra.Agent, EvCgroupError, good))

	res, err := ra.ReconcileCgroups(context.Background())
	require.NoError(t, err)
	assert.Len(t, res.Errors, 1)
	assert.Equal(t, 0, res.Writes)
	assert.Len(t, cgEvents(ra.Agent, EvCgroupError, bad), 1, "the same error is not repeated every pass")

	plans, err := ra.CgroupPlan(context.Background())
	require.NoError(t, err)
	for _, p := range plans {
		switch p.Pod {
		case bad:
			assert.Contains(t, p.Error, "above the pod's cpu limit")
		case good:
			assert.Empty(t, p.Error)
			assert.NotEmpty(t, p.Settings)
		}
	}
}

func TestCgroupOOMKillsSidecarAloneAndRestartsIt(t *testing.T) {
	needCgroupV1(t)
	pod := cgPodName(t, "cgoom")
	dir := t.TempDir()
	self, err := os.Executable()
	require.NoError(t, err)
	spec := PodSpec{
		Name: pod, Resources: PodResources{Memory: "384Mi"}, // room for -race's shadow memory
		Containers: []ContainerSpec{
			// The sidecar grows until the pod's limit is hit, on its
			// first run only; the app holds 64 MiB throughout.
			{Name: "proxy", Role: RoleSidecar, Command: self, Env: map[string]string{
				"MESHAGENT_TEST_CHILD": "hog", "HOG_MB": "4000", "HOG_ONCE": filepath.Join(dir, "once"),
				"STAMP_FILE": filepath.Join(dir, "proxy")}},
			{Name: "app", Role: RoleApp, Command: self, Env: map[string]string{
				"MESHAGENT_TEST_CHILD": "hog", "HOG_MB": "64", "STAMP_FILE": filepath.Join(dir, "app")}},
		},
	}
	ra := startAgent(t, testConfig(t, spec), WithCgroups())
	ra.waitPhase(t, pod, PhaseRunning)
	eventually(t, 10*time.Second, "app allocated", func() bool { return len(readStamps(filepath.Join(dir, "app"))["allocated"]) > 0 })
	appPID := ra.container(t, pod, "app").PID

	eventually(t, 30*time.Second, "sidecar restarted after its OOM kill", func() bool {
		return len(readStamps(filepath.Join(dir, "proxy"))["allocated"]) > 0 && ra.container(t, pod, "proxy").Restarts == 1 &&
			ra.container(t, pod, "proxy").PID != 0
	})
	ooms := cgEvents(ra.Agent, EvOOMKill, pod)
	require.Len(t, ooms, 1, "one OOM kill: %+v", ooms)
	assert.Equal(t, "proxy", ooms[0].Container)
	restarts := cgEvents(ra.Agent, EvRestart, pod)
	require.Len(t, restarts, 1)
	assert.Equal(t, "proxy", restarts[0].Container)
	assert.Equal(t, CauseOOM, restarts[0].Fields["cause"])
	assert.Equal(t, appPID, ra.container(t, pod, "app").PID, "the app survives with its pid")
	assert.Equal(t, 0, ra.container(t, pod, "app").Restarts)
	m := scrape(t, ra.Agent)
	assert.Contains(t, m, fmt.Sprintf(`meshagent_oom_kills_total{container="proxy",pod=%q,role="sidecar"} 1`, pod))
	assert.Contains(t, m, fmt.Sprintf(`meshagent_sidecar_restarts_total{cause="oom",container="proxy",pod=%q} 1`, pod))
}

func TestCgroupOffByConfig(t *testing.T) {
	cfg := testConfig(t, PodSpec{Name: "x", Containers: []ContainerSpec{{Name: "a", Role: RoleApp, Command: "true"}}})
	cfg.Node.Cgroup.Enabled = "off"
	a, err := New(cfg, WithCgroups())
	require.NoError(t, err)
	st := a.CgroupStatus()
	assert.False(t, st.Enabled)
	assert.Equal(t, "node.cgroup.enabled is off", st.Reason)
	_, err = a.CgroupPlan(context.Background())
	assert.ErrorContains(t, err, "cgroup policy off: node.cgroup.enabled is off")
	_, isHost := a.rt.(*HostRuntime)
	assert.True(t, isHost, "runtime not wrapped when off")
}

func TestCgroupLeavesNoGoroutinesOrFDs(t *testing.T) {
	needCgroupV1(t)
	fdsBefore := countFDs(t)
	ignore := goleak.IgnoreCurrent()
	pod := cgPodName(t, "cgleak")
	spec := scriptPod(pod, filepath.Join(t.TempDir(), "r"), PodResources{CPU: "1"}, map[string]string{"cpu": "300m"})
	cfg := testConfig(t, spec)
	cfg.Node.Cgroup.ReconcileInterval = Duration(20 * time.Millisecond) // the loop runs too
	ra := startAgent(t, cfg, WithCgroups())
	ra.waitPhase(t, pod, PhaseRunning)
	old := ra.container(t, pod, "proxy").PID
	require.NoError(t, ra.RestartContainer(context.Background(), pod, "proxy", CauseOperator))
	eventually(t, 10*time.Second, "sidecar restarted", func() bool {
		c := ra.container(t, pod, "proxy")
		return c.PID != 0 && c.PID != old
	})
	_, err := ra.CgroupPlan(context.Background())
	require.NoError(t, err)
	time.Sleep(100 * time.Millisecond) // a few passes
	ra.stop(t)
	goleak.VerifyNone(t, ignore, goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"))
	eventually(t, 2*time.Second, "fds back to the baseline", func() bool { return countFDs(t) <= fdsBefore })
}

func TestCgroupOffWithoutCgroupFSOrRoot(t *testing.T) {
	cfg := testConfig(t, PodSpec{Name: "x", Containers: []ContainerSpec{{Name: "a", Role: RoleApp, Command: "true"}}})
	cfg.Node.Cgroup.Root = t.TempDir() // no cgroup fs here
	a, err := New(cfg, WithCgroups())
	require.NoError(t, err)
	st := a.CgroupStatus()
	assert.False(t, st.Enabled)
	if os.Geteuid() != 0 {
		assert.Contains(t, st.Reason, "not root")
		return
	}
	assert.Contains(t, st.Reason, cfg.Node.Cgroup.Root)
}

// stagedShims lists the processes of this test binary's children that are
// exec shims still waiting for pod/container (their argv names it).
func stagedShims(t *testing.T, podContainer string) []int {
	t.Helper()
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err == nil && string(b) == "meshagent-exec\x00"+podContainer+"\x00" {
			pids = append(pids, pid)
		}
	}
	return pids
}

// TestCgroupAppsStagedBehindTheGate: with the cgroup policy, an app waits
// behind its sidecar as a staged shim already in its cgroup, runs nothing
// of its own until the gate opens, then runs its command in that same
// process; a stage the pod never used is called off when the pod goes.
func TestCgroupAppsStagedBehindTheGate(t *testing.T) {
	needCgroupV1(t)
	pod := cgPodName(t, "cgstage")
	h := newHostPod(t, pod, map[string]string{"DELAY": "1500ms"})
	never := newHostPod(t, pod+"-never", map[string]string{"NEVER_READY": "1"})
	ra := startAgent(t, testConfig(t, h.spec, never.spec), WithCgroups())

	var staged []int
	eventually(t, 10*time.Second, "app staged while its sidecar starts", func() bool {
		staged = stagedShims(t, pod+"/app")
		return len(staged) == 1
	})
	eventually(t, 5*time.Second, "staged shim placed in the app's cgroup before the gate opens", func() bool {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", staged[0]))
		return strings.Contains(string(b), ":/meshagent/"+pod+"/app") && ra.container(t, pod, "app").PID == 0
	})
	assert.Empty(t, readStamps(h.appStamps)["start"], "the app's own code has not run")

	ra.waitPhase(t, pod, PhaseRunning)
	eventually(t, 10*time.Second, "app running", func() bool { return len(readStamps(h.appStamps)["start"]) == 1 })
	assert.Equal(t, staged[0], ra.container(t, pod, "app").PID, "the staged process runs the app: same pid")
	sc := readStamps(h.sidecarStamps)
	require.Len(t, sc["listen"], 1)
	assert.True(t, readStamps(h.appStamps)["start"][0].After(sc["listen"][0]), "the app started after its sidecar accepted")

	// The other pod's sidecar never gets ready: its app stays staged, and
	// goes when the agent stops, having run nothing.
	var waiting []int
	eventually(t, 10*time.Second, "never-ready pod's app staged", func() bool {
		waiting = stagedShims(t, pod+"-never/app")
		return len(waiting) == 1
	})
	ra.stop(t)
	eventually(t, 10*time.Second, "staged shim gone with its pod", func() bool { return !alive(waiting[0]) || isZombie(waiting[0]) })
	assert.Empty(t, readStamps(never.appStamps)["start"], "a called-off stage runs nothing")
	_, err := os.Stat(cgFile("memory", pod+"-never", "", ""))
	assert.True(t, os.IsNotExist(err), "the pod's groups are removed: no staged process left in them (%v)", err)
}
