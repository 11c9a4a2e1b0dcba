package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/meshagent/meshagent/agent"
)

func TestCtlStatusAndPlan(t *testing.T) {
	dir := t.TempDir()
	socket := filepath.Join(dir, "admin.sock")
	pod := fmt.Sprintf("ctlplan-%d", os.Getpid()) // cgroups are node-wide
	cfgPath := filepath.Join(dir, "config.yaml")
	require.NoError(t, os.WriteFile(cfgPath, []byte(fmt.Sprintf(`node:
  adminSocket: %q
  stateDir: %q
  metricsAddr: "off"
pods:
  - name: %s
    resources: {cpu: "1"}
    sidecarPolicy: {cpu: 250m}
    containers:
      - {name: proxy, role: sidecar, command: /bin/sleep, args: ["1000"], stop: {grace: 1s}}
      - {name: app, role: app, command: /bin/sleep, args: ["1000"], stop: {grace: 1s}}
`, socket, filepath.Join(dir, "state"), pod)), 0o600))
	cfg, err := agent.LoadConfig(cfgPath)
	require.NoError(t, err)
	a, err := agent.New(cfg, agent.WithCgroups(), agent.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	<-a.Ready()
	require.NoError(t, a.WaitPod(context.Background(), pod, agent.PhaseRunning))

	code, out := ctl(t, socket, "status")
	require.Equal(t, 0, code, out)
	assert.Contains(t, out, "kubernetes sidecar policy:  task-start")
	assert.Contains(t, out, "node.nri.socket is not set")
	if os.Geteuid() != 0 {
		assert.Contains(t, out, "not root")
		code, out = ctl(t, socket, "plan")
		assert.Equal(t, 1, code)
		assert.Contains(t, out, "cgroup policy off")
		return
	}
	assert.Contains(t, out, "cgroup policy:              on (hybrid at /sys/fs/cgroup")

	code, out = ctl(t, socket, "plan")
	require.Equal(t, 0, code, out)
	assert.Regexp(t, pod+`\s+proxy\s+cpu.quota\s+25000\s+25000\s+/sys/fs/cgroup/cpu/meshagent/`+pod+`/proxy/cpu.cfs_quota_us`, out)
	code, out = ctl(t, socket, "plan", "--json")
	require.Equal(t, 0, code, out)
	var plans []agent.PlanPod
	require.NoError(t, json.Unmarshal([]byte(out), &plans))
	require.Len(t, plans, 1)
	assert.Equal(t, pod, plans[0].Pod)
	for _, s := range plans[0].Settings {
		assert.False(t, s.Change, "%s/%s applied at start: %+v", s.Container, s.Knob, s)
	}
}
