package agent

import (
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseConfigOpsFields(t *testing.T) {
	c, err := ParseConfig([]byte(goodConfig))
	require.NoError(t, err)
	assert.Equal(t, DefaultMetricsAddr, c.Node.MetricsAddr)
	assert.Equal(t, int64(100<<20), c.Node.Inspect.LogMaxBytes)
	assert.Equal(t, 90, c.Node.Inspect.FSMaxUsedPercent)

	for _, tc := range []struct {
		name, node, container, want string
	}{
		{"metrics off", "metricsAddr: \"off\"", "", ""},
		{"metrics addr", "metricsAddr: \"[::1]:9100\"", "", ""},
		{"bad metrics addr", "metricsAddr: localhost", "", `node.metricsAddr: want host:port or off, got "localhost"`},
		{"fs percent", "inspect: {fsMaxUsedPercent: 101}", "", "node.inspect.fsMaxUsedPercent: want 1 to 100, got 101"},
		{"log bytes", "inspect: {logMaxBytes: -1}", "", "node.inspect.logMaxBytes: negative"},
		{"upgrade bound", "inspect: {upgradeMaxDuration: 5m}", "", ""},
		{"negative upgrade bound", "inspect: {upgradeMaxDuration: -1s}", "", "node.inspect.upgradeMaxDuration (line 3): negative duration"},
		{"version url", "", "versionURL: ftp://x/v", `pods[0].containers[0].versionURL: want an http:// or https:// URL, got "ftp://x/v"`},
		{"version both", "", "versionURL: http://x/v\n        versionCommand: [v]", "pods[0].containers[0].versionURL: give versionURL or versionCommand, not both"},
		{"version command", "", "version: \"1.0\"\n        versionCommand: [/bin/echo, \"1.0\"]", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			y := strings.Replace(goodConfig, "node:\n", "node:\n  "+tc.node+"\n", 1)
			if tc.container != "" {
				y = strings.Replace(y, "        role: sidecar\n", "        role: sidecar\n        "+tc.container+"\n", 1)
			}
			_, err := ParseConfig([]byte(y))
			if tc.want == "" {
				assert.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestMetricsForgetRemovedPods(t *testing.T) {
	a, err := New(testConfig(t))
	require.NoError(t, err)
	series := func() int {
		mfs, err := a.Metrics().Registry().Gather()
		require.NoError(t, err)
		n := 0
		for _, mf := range mfs {
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "pod" {
						n++
					}
				}
			}
		}
		return n
	}
	for i := range 1000 {
		pod := "pod-" + strconv.Itoa(i)
		a.observe(Event{Pod: pod, Container: "proxy", Type: EvRestart, Fields: map[string]string{"cause": CauseCrash, "role": "sidecar"}})
		a.observe(Event{Pod: pod, Container: "proxy", Type: EvState, To: StateReady, Fields: map[string]string{"role": "sidecar"}})
		a.observe(Event{Pod: pod, Container: "proxy", Type: "ready"})
		a.observe(Event{Pod: pod, Type: EvGateOpen})
		a.observe(Event{Pod: pod, Type: EvStartupTimeout, Fields: map[string]string{"policy": FailClosed}})
		a.observe(Event{Pod: pod, Container: "app", Type: EvOOMKill, Fields: map[string]string{"role": "app"}})
	}
	assert.Equal(t, 1000*7, series())
	for i := range 1000 {
		a.forgetPodMetrics("pod-" + strconv.Itoa(i))
	}
	assert.Zero(t, series(), "no series left behind")
	assert.Empty(t, a.mstate.sidecars)
}
