package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/meshagent/meshagent/agent"
)

// ctlAgent runs an agent with one pod whose sidecar is `sleep`, without a
// readiness check (started is ready), and returns its socket.
func ctlAgent(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	cfg, err := agent.ParseConfig([]byte(`
node: {adminSocket: ` + filepath.Join(dir, "a.sock") + `, stateDir: ` + filepath.Join(dir, "state") + `, metricsAddr: "off"}
pods:
  - name: shop
    containers:
      - {name: proxy, role: sidecar, command: sleep, args: ["1000"], version: v1,
         upgrade: {watch: 100ms}, stop: {grace: 1s}}
      - {name: app, role: app, command: sleep, args: ["1000"], stop: {grace: 1s}}
`))
	require.NoError(t, err)
	a, err := agent.New(cfg, agent.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	<-a.Ready()
	wctx, wcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer wcancel()
	require.NoError(t, a.WaitPod(wctx, "shop", agent.PhaseRunning))
	t.Cleanup(func() { cancel(); <-done })
	return cfg.Node.AdminSocket
}

func TestCtlUpgrade(t *testing.T) {
	sock := ctlAgent(t)
	var out bytes.Buffer
	err := cmdCtl([]string{"--socket", sock, "upgrade", "shop/proxy", "--command", "sleep", "--arg", "2000", "--version", "v2"}, &out)
	require.NoError(t, err, out.String())
	assert.Contains(t, out.String(), "succeeded")
	assert.Contains(t, out.String(), "v1")
	assert.Contains(t, out.String(), "v2")

	out.Reset()
	require.NoError(t, cmdCtl([]string{"--socket", sock, "upgrade", "shop/proxy", "--command=sleep", "--arg=3000", "--json"}, &out))
	var res agent.UpgradeResult
	require.NoError(t, json.Unmarshal(out.Bytes(), &res), out.String())
	assert.Equal(t, agent.UpgradeSucceeded, res.Outcome)
	assert.Equal(t, "v2", res.FromVersion)
	assert.NotEqual(t, res.OldPID, res.NewPID)
	cmdline, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(res.NewPID), "cmdline"))
	require.NoError(t, err)
	argv := strings.Split(string(cmdline), "\x00")
	require.GreaterOrEqual(t, len(argv), 2)
	assert.Equal(t, "3000", argv[1], "the new process runs the new args")
}

func TestCtlUpgradeErrors(t *testing.T) {
	sock := ctlAgent(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"upgrade"}, "want POD/SIDECAR"},
		{[]string{"upgrade", "shop"}, "want POD/SIDECAR"},
		{[]string{"upgrade", "shop/proxy"}, "--command: required"},
		{[]string{"upgrade", "shop/app", "--command", "sleep"}, "only sidecars"},
		{[]string{"upgrade", "nope/proxy", "--command", "sleep"}, "HTTP 404"},
		{[]string{"upgrade", "shop/proxy", "--command", "/nonexistent"}, "HTTP 400"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			err := cmdCtl(append([]string{"--socket", sock}, tc.args...), io.Discard)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}
