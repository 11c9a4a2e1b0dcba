package agent

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const cgroupConfig = `
node:
  cgroup: {reconcileInterval: 5s}
  nri: {socket: /var/run/nri/nri.sock}
pods:
  - name: web
    resources: {cpu: "2", memory: 512Mi}
    sidecarPolicy: {cpu: 25%, cpu-mode: add, oom-score-adj: 900}
    containers:
      - {name: proxy, role: sidecar, command: /bin/proxy}
      - {name: app, role: app, command: /bin/app}
`

func TestParseConfigCgroup(t *testing.T) {
	c, err := ParseConfig([]byte(cgroupConfig))
	require.NoError(t, err)
	assert.Equal(t, CgroupNode{Enabled: "auto", Root: "/sys/fs/cgroup", ReconcileInterval: Duration(5 * time.Second)}, c.Node.Cgroup)
	assert.Equal(t, "/var/run/nri/nri.sock", c.Node.NRI.Socket)
	tgt, ok, err := hostTarget(&c.Pods[0])
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, int64(2000), tgt.PodCPULimit)
	assert.Equal(t, int64(512<<20), tgt.PodMemoryLimit)
	assert.True(t, tgt.OwnPod)
	assert.Equal(t, "proxy", tgt.Sidecar.Name)
	assert.Equal(t, "meshagent/web/proxy", string(tgt.Sidecar.Group))
	assert.Equal(t, 25.0, tgt.Policy.CPU.Percent)
	require.NotNil(t, tgt.Policy.OOMScoreAdj)
	assert.Equal(t, 900, *tgt.Policy.OOMScoreAdj)
}

func TestParseConfigCgroupErrorsNameTheField(t *testing.T) {
	pod := func(extra string) string {
		return "pods:\n  - name: a\n" + extra + "    containers: [{name: p, role: sidecar, command: x}, {name: b, role: app, command: x}]\n"
	}
	for _, tc := range []struct{ name, yaml, want string }{
		{"bad cpu", pod("    resources: {cpu: abc}\n"), `pods[0].resources: cpu: cpu "abc"`},
		{"percent pod limit", pod("    resources: {cpu: 50%}\n"), "pods[0].resources: cpu: \"50%\": a pod's limit is an amount"},
		{"bad memory", pod("    resources: {memory: lots}\n"), `pods[0].resources: memory: memory "lots": not a size`},
		{"unknown resource", pod("    resources: {gpu: 1}\n"), "pods[0].resources.gpu (line 3): unknown field"},
		{"bad policy value", pod("    sidecarPolicy: {cpu: abc}\n"), `pods[0].sidecarPolicy: cpu: cpu "abc"`},
		{"unknown policy key", pod("    sidecarPolicy: {cpus: 1}\n"), `pods[0].sidecarPolicy: cpus: unknown policy key "cpus"`},
		{"negative oom", pod("    sidecarPolicy: {oom-score-adj: -2000}\n"), "pods[0].sidecarPolicy: oom-score-adj: oom score adj \"-2000\""},
		{"burst above quota", pod("    sidecarPolicy: {cpu: 100m, cpu-burst: 200m}\n"), "pods[0].sidecarPolicy: cpu-burst 200m is above cpu 100m"},
		{"policy without sidecar", "pods:\n  - name: a\n    sidecarPolicy: {cpu: 1}\n    containers: [{name: b, role: app, command: x}]\n", "pods[0].sidecarPolicy: the pod has no sidecar"},
		{"cgroup enabled", "node: {cgroup: {enabled: yes-please}}\n", `node.cgroup.enabled: want auto or off, got "yes-please"`},
		{"nri index", "node: {nri: {pluginIndex: '7'}}\n", `node.nri.pluginIndex: want two digits like 40, got "7"`},
		{"nri name", "node: {nri: {pluginName: 'Mesh Agent'}}\n", `node.nri.pluginName: "Mesh Agent" is not a valid name`},
		{"bad interval", "node: {cgroup: {reconcileInterval: often}}\n", "node.cgroup.reconcileInterval (line 1)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tc.yaml))
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

// A policy only the pod's limits can judge is not a config error: it is
// reported for that pod at run time, and the other pods are applied.
func TestHostTargetImpossiblePolicyIsThePodsError(t *testing.T) {
	c, err := ParseConfig([]byte(pod2("200m", "500m")))
	require.NoError(t, err)
	_, ok, err := hostTarget(&c.Pods[0])
	require.NoError(t, err, "translation, not the target, judges the combination")
	assert.True(t, ok)
}

func pod2(podCPU, sideCPU string) string {
	return "pods:\n  - name: a\n    resources: {cpu: " + podCPU + "}\n    sidecarPolicy: {cpu: " + sideCPU + "}\n" +
		"    containers: [{name: p, role: sidecar, command: x}]\n"
}
