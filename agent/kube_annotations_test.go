package agent

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"
)

func TestParseKubeProbe(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want kubeProbeSpec
		err  string
	}{
		{in: "tcp:15001", want: kubeProbeSpec{Kind: "tcp", Addr: "127.0.0.1:15001"}},
		{in: "tcp:10.0.0.1:80", want: kubeProbeSpec{Kind: "tcp", Addr: "10.0.0.1:80"}},
		{in: "http:15021/ready", want: kubeProbeSpec{Kind: "http", Addr: "127.0.0.1:15021", Path: "/ready"}},
		{in: "http:15000", want: kubeProbeSpec{Kind: "http", Addr: "127.0.0.1:15000", Path: "/"}},
		{in: "http:[::1]:15000/healthz/ready", want: kubeProbeSpec{Kind: "http", Addr: "[::1]:15000", Path: "/healthz/ready"}},
		{in: "unix:/run/envoy/admin.sock", want: kubeProbeSpec{Kind: "unix", Path: "/run/envoy/admin.sock"}},
		{in: "exec:/bin/check --quick", want: kubeProbeSpec{Kind: "exec", Cmd: []string{"/bin/check", "--quick"}}},
		{in: "tcp:0", err: "out of range"},
		{in: "tcp:70000", err: "out of range"},
		{in: "tcp:localhost:80", err: "want an IP address"},
		{in: "http:abc/ready", err: "want PORT or HOST:PORT"},
		{in: "unix:relative.sock", err: "absolute path"},
		{in: "exec:   ", err: "want tcp:PORT"},
		{in: "grpc:15000", err: `unknown check "grpc"`},
		{in: "15001", err: "want tcp:PORT"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := parseKubeProbe(tc.in)
			if tc.err != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestParseKubePodPolicy(t *testing.T) {
	def := defaultKubePodPolicy()
	for _, tc := range []struct {
		name  string
		ann   map[string]string
		check func(t *testing.T, p kubePodPolicy)
		errs  []string // substrings, each naming the bad key
	}{
		{name: "defaults", ann: nil, check: func(t *testing.T, p kubePodPolicy) {
			assert.Equal(t, def, p)
		}},
		{name: "everything", ann: map[string]string{
			AnnoSidecars: "envoy, log-agent", AnnoReadinessPrefix + "envoy": "http:15021/healthz/ready",
			AnnoStartupTimeout: "0", AnnoStartupPolicy: FailOpen, AnnoStartupInterval: "10ms",
			AnnoReadinessPeriod: "2s", AnnoReadinessTimeout: "500ms", AnnoFailureThreshold: "5",
			AnnoRestartGrace: "15s", AnnoHoldTimeout: "1m", AnnoJob: "on-success",
		}, check: func(t *testing.T, p kubePodPolicy) {
			assert.Equal(t, []string{"envoy", "log-agent"}, p.Sidecars)
			assert.Equal(t, kubeProbeSpec{Kind: "http", Addr: "127.0.0.1:15021", Path: "/healthz/ready"}, p.Readiness["envoy"])
			assert.Zero(t, p.StartupTimeout)
			assert.Equal(t, FailOpen, p.OnTimeout)
			assert.Equal(t, 10*time.Millisecond, p.StartupInterval)
			assert.Equal(t, 2*time.Second, p.Period)
			assert.Equal(t, 500*time.Millisecond, p.Timeout)
			assert.Equal(t, 5, p.FailureThreshold)
			assert.Equal(t, 15*time.Second, p.RestartGrace)
			assert.Equal(t, time.Minute, p.HoldTimeout)
			assert.Equal(t, JobOnSuccess, p.Job)
		}},
		{name: "startup interval never above the period", ann: map[string]string{AnnoReadinessPeriod: "100ms", AnnoStartupInterval: "1s"},
			check: func(t *testing.T, p kubePodPolicy) { assert.Equal(t, 100*time.Millisecond, p.StartupInterval) }},
		{name: "bad values keep defaults", ann: map[string]string{
			AnnoSidecars: "Envoy", AnnoStartupTimeout: "soon", AnnoStartupPolicy: "failSoft",
			AnnoFailureThreshold: "0", AnnoJob: "yes", AnnoReadinessPrefix + "envoy": "tcp:x",
			AnnoStartupInterval: "0s",
		}, check: func(t *testing.T, p kubePodPolicy) {
			assert.Nil(t, p.Sidecars)
			assert.Equal(t, def.StartupTimeout, p.StartupTimeout)
			assert.Equal(t, def.OnTimeout, p.OnTimeout)
			assert.Equal(t, def.FailureThreshold, p.FailureThreshold)
			assert.Equal(t, def.StartupInterval, p.StartupInterval)
			assert.Equal(t, JobOff, p.Job)
			assert.Empty(t, p.Readiness)
		}, errs: []string{AnnoSidecars, AnnoStartupTimeout, AnnoStartupPolicy, AnnoFailureThreshold, AnnoJob, AnnoReadinessPrefix + "envoy", AnnoStartupInterval}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := parseKubePodPolicy(tc.ann)
			tc.check(t, p)
			if len(tc.errs) == 0 {
				require.NoError(t, err)
				return
			}
			require.Error(t, err)
			for _, key := range tc.errs {
				assert.Contains(t, err.Error(), key)
			}
		})
	}
}

func TestKubeConfig(t *testing.T) {
	base := "node:\n  metricsAddr: \"off\"\n  kubernetes:\n"
	for _, tc := range []struct {
		name, yaml string
		err        string
		check      func(t *testing.T, k *KubeConfig)
	}{
		{name: "defaults", yaml: "node:\n  kubernetes: {}\n", check: func(t *testing.T, k *KubeConfig) {
			assert.Equal(t, &KubeConfig{Containerd: DefaultContainerdSocket, Namespace: KubeNamespace,
				GateSocket: DefaultGateSocket, Resync: Duration(time.Minute)}, k)
		}},
		{name: "set", yaml: base + "    containerd: /run/k3s/containerd/containerd.sock\n    namespace: k8s.io\n    gateSocket: /var/run/mesh/gate.sock\n    resync: 30s\n",
			check: func(t *testing.T, k *KubeConfig) {
				assert.Equal(t, "/run/k3s/containerd/containerd.sock", k.Containerd)
				assert.Equal(t, "/var/run/mesh/gate.sock", k.GateSocket)
				assert.Equal(t, 30*time.Second, k.Resync.D())
			}},
		{name: "off", yaml: "node:\n  metricsAddr: \"off\"\n", check: func(t *testing.T, k *KubeConfig) { assert.Nil(t, k) }},
		{name: "unknown field", yaml: base + "    socket: /x\n", err: "node.kubernetes.socket (line 4): unknown field"},
		{name: "namespace", yaml: base + "    namespace: default\n", err: `node.kubernetes.namespace: the CRI plugin keeps pods in k8s.io, got "default"`},
		{name: "relative", yaml: base + "    gateSocket: gate.sock\n", err: `node.kubernetes.gateSocket: want an absolute path, got "gate.sock"`},
		{name: "long", yaml: base + "    gateSocket: /" + strings.Repeat("x", 120) + "\n", err: "node.kubernetes.gateSocket: "},
		{name: "resync", yaml: base + "    resync: 10ms\n", err: "node.kubernetes.resync: want at least 1s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tc.yaml))
			if tc.err != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.err)
				return
			}
			require.NoError(t, err)
			tc.check(t, c.Node.Kubernetes)
		})
	}
}

// TestDeployManifests: the DaemonSet's config loads, and every pod template
// of the example parses without a bad annotation.
func TestDeployManifests(t *testing.T) {
	docs := func(path string) []map[string]any {
		t.Helper()
		f, err := os.Open(path)
		require.NoError(t, err)
		defer f.Close()
		dec := yaml.NewDecoder(f)
		var out []map[string]any
		for {
			var d map[string]any
			if err := dec.Decode(&d); errors.Is(err, io.EOF) {
				return out
			} else if err != nil {
				t.Fatalf("%s: %v", path, err)
			}
			out = append(out, d)
		}
	}
	var config string
	for _, d := range docs("../deploy/kubernetes/daemonset.yaml") {
		if d["kind"] == "ConfigMap" {
			config = d["data"].(map[string]any)["config.yaml"].(string)
		}
	}
	require.NotEmpty(t, config, "daemonset.yaml has no ConfigMap with config.yaml")
	c, err := ParseConfig([]byte(config))
	require.NoError(t, err)
	require.NotNil(t, c.Node.Kubernetes)
	assert.Equal(t, DefaultGateSocket, c.Node.Kubernetes.GateSocket)
	assert.NotEqual(t, filepath.Dir(c.Node.AdminSocket), filepath.Dir(c.Node.Kubernetes.GateSocket),
		"the admin socket must not sit in the folder shared with pods")

	n := 0
	for _, d := range docs("../deploy/kubernetes/example-pod.yaml") {
		meta := d["metadata"].(map[string]any)
		if d["kind"] == "Job" {
			meta = d["spec"].(map[string]any)["template"].(map[string]any)["metadata"].(map[string]any)
		}
		ann := map[string]string{}
		for k, v := range meta["annotations"].(map[string]any) {
			ann[k] = v.(string)
		}
		p, err := parseKubePodPolicy(ann)
		require.NoError(t, err, "%s %v", d["kind"], meta["name"])
		assert.NotEmpty(t, p.Sidecars)
		assert.NotEmpty(t, p.Readiness)
		n++
	}
	assert.Equal(t, 3, n)
}
