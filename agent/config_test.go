package agent

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const goodConfig = `
node:
  adminSocket: /tmp/x.sock
pods:
  - name: web
    startup: {timeout: 30s, onTimeout: failOpen}
    containers:
      - name: proxy
        role: sidecar
        command: /bin/proxy
        readiness: {http: "http://127.0.0.1:15000/ready", period: 2s}
        restart: {maxBackoff: 10s}
        stop: {signal: SIGQUIT, grace: 5s}
      - name: app
        role: app
        command: /bin/app
        env: {MODE: prod}
`

func TestParseConfigDefaults(t *testing.T) {
	c, err := ParseConfig([]byte(goodConfig))
	require.NoError(t, err)
	assert.Equal(t, "/tmp/x.sock", c.Node.AdminSocket)
	assert.Equal(t, DefaultStateDir, c.Node.StateDir)
	assert.Equal(t, "stop", c.Node.OnExit)
	p := c.Pods[0]
	assert.Equal(t, FailOpen, p.Startup.OnTimeout)
	assert.Equal(t, 30*time.Second, p.Startup.Timeout.D())
	proxy := p.Containers[0]
	assert.Equal(t, 2*time.Second, proxy.Readiness.Period.D())
	assert.Equal(t, time.Millisecond, proxy.Readiness.StartupInterval.D())
	assert.Equal(t, 3, proxy.Readiness.FailureThreshold)
	assert.Equal(t, 10*time.Second, proxy.Restart.MaxBackoff.D())
	assert.Equal(t, 100*time.Millisecond, proxy.Restart.InitialBackoff.D())
	assert.Equal(t, "always", p.Containers[1].Restart.Policy)
	assert.Equal(t, "SIGTERM", p.Containers[1].Stop.Signal)
}

func TestParseConfigErrorsNameTheField(t *testing.T) {
	for _, tc := range []struct {
		name, yaml, want string
	}{
		{"unknown field", "pods:\n  - name: a\n    containers:\n      - name: b\n        role: app\n        cmd: x\n", "pods[0].containers[0].cmd (line 6): unknown field"},
		{"bad role", "pods:\n  - name: a\n    containers:\n      - {name: b, role: boss, command: x}\n", "pods[0].containers[0].role: want sidecar or app"},
		{"bad duration", "pods:\n  - name: a\n    startup: {timeout: soon}\n    containers: [{name: b, role: app, command: x}]\n", "pods[0].startup.timeout (line 3)"},
		{"bad policy", "pods:\n  - name: a\n    startup: {onTimeout: maybe}\n    containers: [{name: b, role: app, command: x}]\n", "pods[0].startup.onTimeout: want failOpen or failClosed"},
		{"two probes", "pods:\n  - name: a\n    containers: [{name: b, role: sidecar, command: x, readiness: {tcp: 'a:1', unix: /x}}]\n", "pods[0].containers[0].readiness: give exactly one"},
		{"duplicate pod", "pods:\n  - {name: a, containers: [{name: b, role: app, command: x}]}\n  - {name: a, containers: [{name: b, role: app, command: x}]}\n", "pods[1].name: pod \"a\" is defined twice"},
		{"missing command", "pods:\n  - {name: a, containers: [{name: b, role: app}]}\n", "pods[0].containers[0].command: required"},
		{"bad signal", "pods:\n  - {name: a, containers: [{name: b, role: app, command: x, stop: {signal: SIGNOPE}}]}\n", "pods[0].containers[0].stop.signal: unknown signal"},
		{"list for map", "pods:\n  - {name: a, containers: [{name: b, role: app, command: x, env: [A]}]}\n", "pods[0].containers[0].env (line 2): want a mapping"},
		{"bad name", "pods:\n  - {name: A_B, containers: [{name: b, role: app, command: x}]}\n", "pods[0].name: \"A_B\" is not a valid name"},
		{"wrong type", "pods:\n  - {name: a, containers: [{name: b, role: app, command: x, restart: {maxRestarts: many}}]}\n", "pods[0].containers[0].restart.maxRestarts (line 2): want int"},
		{"bad url", "pods:\n  - {name: a, containers: [{name: b, role: sidecar, command: x, readiness: {http: 'localhost:80'}}]}\n", "readiness.http: want an http:// or https:// URL"},
		{"empty", "", "empty config"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tc.yaml))
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestLoadConfigResolvesPathsAgainstItsFolder(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "c.yaml")
	require.NoError(t, os.WriteFile(p, []byte("pods:\n  - {name: a, containers: [{name: b, role: app, command: ./bin/app}, {name: c, role: app, command: sleep}]}\n"), 0o600))
	c, err := LoadConfig(p)
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(dir, "bin/app"), c.Pods[0].Containers[0].Command)
	assert.Equal(t, "sleep", c.Pods[0].Containers[1].Command, "PATH lookups stay as they are")
}

func TestExampleConfigsLoad(t *testing.T) {
	files, _ := filepath.Glob("../examples/*.yaml")
	if len(files) == 0 {
		t.Skip("no examples/*.yaml in this checkout")
	}
	for _, f := range files {
		_, err := LoadConfig(f)
		assert.NoError(t, err, f)
	}
}

func TestParseSignal(t *testing.T) {
	for in, want := range map[string]int{"SIGTERM": 15, "term": 15, "9": 9, "SIGQUIT": 3} {
		s, err := ParseSignal(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, int(s), in)
	}
	for _, bad := range []string{"", "SIGFOO", "99", "-1"} {
		_, err := ParseSignal(bad)
		assert.Error(t, err, bad)
	}
}
