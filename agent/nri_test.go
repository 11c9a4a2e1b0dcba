package agent

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/meshagent/meshagent/internal/critest"
	"github.com/meshagent/meshagent/internal/testimages"
)

func TestSidecarValuesFor(t *testing.T) {
	for _, tc := range []struct {
		name      string
		ann       map[string]string
		adj       int
		podMillis int64
		period    uint64
		want      SidecarValues
		err       string
	}{
		{name: "default: first OOM victim only", adj: 300, want: SidecarValues{OOMScoreAdj: 1000}},
		{name: "guaranteed pod", adj: -997, want: SidecarValues{OOMScoreAdj: 3}},
		{name: "millicores", adj: 0, ann: map[string]string{"sidecar.meshagent.io/cpu": "300m"},
			want: SidecarValues{OOMScoreAdj: 1000, CPUQuota: 30000, CPUPeriod: 100000, CPUShares: 307}},
		{name: "percent of pod limit, own period", ann: map[string]string{"sidecar.meshagent.io/cpu": "25%"}, podMillis: 2000, period: 50000,
			want: SidecarValues{OOMScoreAdj: 1000, CPUQuota: 25000, CPUPeriod: 50000, CPUShares: 512}},
		{name: "overrides", ann: map[string]string{"sidecar.meshagent.io/cpu": "1", "sidecar.meshagent.io/cpu-shares": "4096",
			"sidecar.meshagent.io/oom-score-adj": "700", "sidecar.meshagent.io/memory": "64Mi"},
			want: SidecarValues{OOMScoreAdj: 700, CPUQuota: 100000, CPUPeriod: 100000, CPUShares: 4096, MemoryLimit: 64 << 20}},
		{name: "percent without pod limit", ann: map[string]string{"sidecar.meshagent.io/cpu": "25%"},
			err: "share of the pod's cpu limit, but the pod has none"},
		{name: "above pod limit", ann: map[string]string{"sidecar.meshagent.io/cpu": "2"}, podMillis: 1000,
			err: "above the pod's cpu limit 1000m"},
		{name: "above pod limit in add mode", ann: map[string]string{"sidecar.meshagent.io/cpu": "2", "sidecar.meshagent.io/cpu-mode": "add"}, podMillis: 1000,
			want: SidecarValues{OOMScoreAdj: 1000, CPUQuota: 200000, CPUPeriod: 100000, CPUShares: 2048}},
		{name: "unparsable", ann: map[string]string{"sidecar.meshagent.io/cpu": "abc"}, err: `cpu: cpu "abc"`},
		{name: "other annotations ignored", ann: map[string]string{"example.com/x": "y", AnnotationSidecarContainers: "proxy"},
			want: SidecarValues{OOMScoreAdj: 1000}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := SidecarValuesFor(tc.ann, tc.adj, tc.podMillis, tc.period)
			if tc.err != "" {
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestIsSidecar(t *testing.T) {
	ann := map[string]string{AnnotationSidecarContainers: "mosn, envoy"}
	assert.True(t, isSidecar(ann, "mosn"))
	assert.True(t, isSidecar(ann, "envoy"))
	assert.False(t, isSidecar(ann, "app"))
	assert.False(t, isSidecar(map[string]string{AnnotationSidecarContainers: ""}, ""))
	assert.False(t, isSidecar(nil, "mosn"))
}

// kubeRes is what kubelet gives a burstable container: its own oom_score_adj
// between the QoS extremes, so the sidecar's raised value is visible.
func kubeRes() *runtimeapi.LinuxContainerResources {
	return &runtimeapi.LinuxContainerResources{CpuPeriod: 100000, CpuShares: 2, OomScoreAdj: 300}
}

func nriPodSpec(name string) critest.PodSpec {
	return critest.PodSpec{
		Name: critest.UniqueName(name),
		Annotations: map[string]string{
			AnnotationSidecarContainers: "proxy",
			"sidecar.meshagent.io/cpu":  "300m",
		},
		Containers: []critest.ContainerSpec{
			{Name: "proxy", Image: testimages.Sidecar, Env: map[string]string{"SIDECAR_PORT": "0"}, Resources: kubeRes()},
			{Name: "app", Image: testimages.App, Resources: kubeRes()},
		},
	}
}

// checkKubeValues asserts the sidecar's first process has meshagent's
// values and the app kubelet's.
func checkKubeValues(t *testing.T, rt *critest.Runtime, pod *critest.Pod) {
	t.Helper()
	ctx := context.Background()
	for _, tc := range []struct {
		name, oom, quota, shares string
	}{
		{"proxy", "1000", "30000", "307"},
		{"app", "300", "-1", "2"},
	} {
		pid, err := rt.PID(ctx, pod.ContainerID(tc.name))
		require.NoError(t, err)
		assert.Equal(t, tc.oom, readFileT(t, fmt.Sprintf("/proc/%d/oom_score_adj", pid)), "%s oom_score_adj", tc.name)
		dir := cpuDirOf(t, pid)
		assert.Equal(t, tc.quota, readFileT(t, filepath.Join(dir, "cpu.cfs_quota_us")), "%s cpu quota", tc.name)
		assert.Equal(t, tc.shares, readFileT(t, filepath.Join(dir, "cpu.shares")), "%s cpu shares", tc.name)
	}
}

// cpuDirOf is the v1 cpu cgroup folder of pid.
func cpuDirOf(t *testing.T, pid int) string {
	t.Helper()
	for _, line := range strings.Split(readFileT(t, "/proc/"+strconv.Itoa(pid)+"/cgroup"), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) == 3 && strings.Contains(","+f[1]+",", ",cpu,") {
			return filepath.Join("/sys/fs/cgroup/cpu", f[2])
		}
	}
	t.Skipf("pid %d has no cgroup v1 cpu controller", pid)
	return ""
}

func nriConfig(t *testing.T, socket string) *Config {
	t.Helper()
	cfg := testConfig(t)
	cfg.Node.NRI.Socket = socket
	cfg.Node.NRI.PluginName = critest.UniqueName("meshagent")
	return cfg
}

func waitNRI(t *testing.T, a *Agent, connected bool) {
	t.Helper()
	eventually(t, 30*time.Second, fmt.Sprintf("NRI connected=%v", connected), func() bool { return a.NRIStatus().Connected == connected })
}

func TestNRISetsSidecarValuesBeforeItRuns(t *testing.T) {
	critest.CheckLeaks(t)
	sock := critest.Socket(t, critest.V2)
	ra := startAgent(t, nriConfig(t, critest.NRISocket(t)))
	waitNRI(t, ra.Agent, true)
	st, err := NewClient(ra.socket).Status(context.Background())
	require.NoError(t, err)
	assert.Equal(t, ModeNRI, st.NRI.Mode, st.NRI.Reason)

	rt := critest.Connect(t, sock)
	pod := rt.StartPod(t, nriPodSpec("nri"))
	checkKubeValues(t, rt, pod)
	var adjusted []string
	for _, e := range cgEvents(ra.Agent, EvNRIAdjust, "") {
		if e.Pod == pod.Namespace+"/"+pod.Name {
			adjusted = append(adjusted, e.Container)
		}
	}
	assert.Equal(t, []string{"proxy"}, adjusted, "only the sidecar is adjusted")

	// An update (e.g. a resize by kubelet) would reset the sidecar's CPU;
	// the plugin re-asserts it.
	ctx := context.Background()
	_, err = rt.RS.UpdateContainerResources(ctx, &runtimeapi.UpdateContainerResourcesRequest{
		ContainerId: pod.ContainerID("proxy"),
		Linux:       &runtimeapi.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 90000, CpuShares: 2, OomScoreAdj: 300},
	})
	require.NoError(t, err)
	checkKubeValues(t, rt, pod)
	assert.GreaterOrEqual(t, ra.NRIStatus().Updated, uint64(1))

	// The task-start path stands aside while NRI is in force.
	pid, err := rt.PID(ctx, pod.ContainerID("proxy"))
	require.NoError(t, err)
	require.NoError(t, ra.ApplyKubeSidecar(ctx, KubeSidecar{Pod: pod.Name, Annotations: nriPodSpec("x").Annotations, Container: "proxy", PID: pid}))
	assert.Equal(t, uint64(0), ra.NRIStatus().TaskStart)

	// CFS burst has no NRI field: the task-start path writes it, and keeps
	// the oom_score_adj NRI set.
	burst := nriPodSpec("nriburst")
	burst.Annotations["sidecar.meshagent.io/cpu-burst"] = "100m"
	bp := rt.StartPod(t, burst)
	pid, err = rt.PID(ctx, bp.ContainerID("proxy"))
	require.NoError(t, err)
	require.NoError(t, ra.ApplyKubeSidecar(ctx, KubeSidecar{Pod: bp.Name, Annotations: burst.Annotations, Container: "proxy", PID: pid}))
	assert.Equal(t, uint64(1), ra.NRIStatus().TaskStart)
	assert.Equal(t, "10000", readFileT(t, filepath.Join(cpuDirOf(t, pid), "cpu.cfs_burst_us")))
	checkKubeValues(t, rt, bp)
}

func TestNRISwitchOffLeavesContainersAlone(t *testing.T) {
	sock := critest.Socket(t, critest.V2)
	ra := startAgent(t, nriConfig(t, critest.NRISocket(t)))
	waitNRI(t, ra.Agent, true)
	_, err := ra.SetSwitch(context.Background(), SwitchNRI, false, 0)
	require.NoError(t, err)
	st := ra.NRIStatus()
	assert.Equal(t, ModeTaskStart, st.Mode)
	assert.Equal(t, "switch nri is off", st.Reason)

	rt := critest.Connect(t, sock)
	pod := rt.StartPod(t, nriPodSpec("nrioff"))
	pid, err := rt.PID(context.Background(), pod.ContainerID("proxy"))
	require.NoError(t, err)
	assert.Equal(t, "300", readFileT(t, fmt.Sprintf("/proc/%d/oom_score_adj", pid)), "no NRI adjustment with the switch off")
}

func TestNRIReconnectsWhenContainerdRestarts(t *testing.T) {
	critest.CheckLeaks(t)
	d := critest.StartDaemon(t, critest.V2)
	ra := startAgent(t, nriConfig(t, d.NRISocket))
	waitNRI(t, ra.Agent, true)
	d.Restart(t)
	eventually(t, 60*time.Second, "reconnected after the restart", func() bool {
		return len(cgEvents(ra.Agent, EvNRIConnect, "")) >= 2 && ra.NRIStatus().Connected
	})
	assert.NotEmpty(t, cgEvents(ra.Agent, EvNRILost, ""))
	rt := critest.Connect(t, d.Socket)
	pod := rt.StartPod(t, nriPodSpec("nrire"))
	checkKubeValues(t, rt, pod)
}

func TestTaskStartFallbackSetsTheSameValues(t *testing.T) {
	critest.CheckLeaks(t)
	sock := critest.Socket(t, critest.V16)
	// An NRI socket that does not exist, as on containerd 1.6.
	ra := startAgent(t, nriConfig(t, filepath.Join(t.TempDir(), "nri.sock")))
	eventually(t, 5*time.Second, "a failed NRI attempt", func() bool { return ra.NRIStatus().LastError != "" })
	st := ra.NRIStatus()
	assert.Equal(t, ModeTaskStart, st.Mode)
	assert.Contains(t, st.Reason, "not connected to NRI")

	rt := critest.Connect(t, sock)
	spec := nriPodSpec("fallback")
	pod := rt.StartPod(t, spec)
	ctx := context.Background()
	for _, c := range []string{"proxy", "app"} {
		pid, err := rt.PID(ctx, pod.ContainerID(c))
		require.NoError(t, err)
		// What the Kubernetes supervisor does on TaskStarted.
		require.NoError(t, ra.ApplyKubeSidecar(ctx, KubeSidecar{Pod: pod.Namespace + "/" + pod.Name,
			Annotations: spec.Annotations, Container: c, PID: pid}))
	}
	checkKubeValues(t, rt, pod)
	assert.Equal(t, uint64(1), ra.NRIStatus().TaskStart)
	evs := cgEvents(ra.Agent, EvPolicyApply, pod.Namespace+"/"+pod.Name)
	require.Len(t, evs, 1)
	assert.Equal(t, "proxy", evs[0].Container)
	assert.Equal(t, "oom_score_adj=1000 cpu quota=30000 period=100000 shares=307", evs[0].Reason)

	// A bad policy is reported for that pod, and nothing is written.
	bad := nriPodSpec("fallbackbad")
	bad.Annotations["sidecar.meshagent.io/cpu"] = "abc"
	bp := rt.StartPod(t, bad)
	pid, err := rt.PID(ctx, bp.ContainerID("proxy"))
	require.NoError(t, err)
	err = ra.ApplyKubeSidecar(ctx, KubeSidecar{Pod: bp.Namespace + "/" + bp.Name, Annotations: bad.Annotations, Container: "proxy", PID: pid})
	require.ErrorContains(t, err, `cpu "abc"`)
	assert.Equal(t, "300", readFileT(t, fmt.Sprintf("/proc/%d/oom_score_adj", pid)))
	assert.Len(t, cgEvents(ra.Agent, EvCgroupError, bp.Namespace+"/"+bp.Name), 1)
}
