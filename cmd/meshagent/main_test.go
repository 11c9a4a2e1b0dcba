package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/meshagent/meshagent/agent"
)

// The test binary doubles as the meshagent binary: with MESHAGENT_TEST_MAIN
// set it runs main's code on its arguments.
func TestMain(m *testing.M) {
	agent.RunShimIfRequested()
	if os.Getenv("MESHAGENT_TEST_MAIN") == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// notifySocket collects what is sent to a NOTIFY_SOCKET.
type notifySocket struct {
	path string
	conn *net.UnixConn
	mu   sync.Mutex
	msgs []string
	done chan struct{}
}

func listenNotify(t *testing.T) *notifySocket {
	t.Helper()
	n := &notifySocket{path: filepath.Join(t.TempDir(), "notify.sock"), done: make(chan struct{})}
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	require.NoError(t, err)
	n.conn = c
	go func() {
		defer close(n.done)
		buf := make([]byte, 4096)
		for {
			k, err := c.Read(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, string(buf[:k]))
			n.mu.Unlock()
		}
	}()
	t.Cleanup(func() { c.Close(); <-n.done })
	return n
}

func (n *notifySocket) all() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]string(nil), n.msgs...)
}

// kinds reduces the messages to their kind (READY, RELOADING, STOPPING,
// WATCHDOG), runs of WATCHDOG folded into one, STATUS left out.
func kinds(msgs []string) []string {
	var out []string
	for _, m := range msgs {
		k, _, _ := strings.Cut(strings.SplitN(m, "\n", 2)[0], "=")
		if k == "STATUS" {
			continue
		}
		if k == "WATCHDOG" && len(out) > 0 && out[len(out)-1] == k {
			continue
		}
		out = append(out, k)
	}
	return out
}

func (n *notifySocket) waitFor(t *testing.T, what string, count int) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		c := 0
		for _, m := range n.all() {
			if strings.HasPrefix(m, what) {
				c++
			}
		}
		if c >= count {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("no %d× %q in %q", count, what, n.all())
}

func writeTestConfig(t *testing.T, dir, envFile string) (cfgPath, socket string) {
	t.Helper()
	socket = filepath.Join(dir, "admin.sock")
	cfgPath = filepath.Join(dir, "config.yaml")
	cfg := fmt.Sprintf(`node:
  adminSocket: %q
  stateDir: %q
  metricsAddr: "off"
  inspect: {logMaxBytes: 4096, fsMaxUsedPercent: 100}
pods:
  - name: web
    containers:
      - name: proxy
        role: sidecar
        command: /bin/sh
        args: ["-c", "env > %s; exec sleep 1000"]
        stop: {grace: 2s}
      - name: app
        role: app
        command: /bin/sleep
        args: ["1000"]
        env: {NOTIFY_SOCKET: /configured/by/mistake}
        stop: {grace: 2s}
`, socket, filepath.Join(dir, "state"), envFile)
	require.NoError(t, os.WriteFile(cfgPath, []byte(cfg), 0o600))
	return cfgPath, socket
}

func ctl(t *testing.T, socket string, args ...string) (int, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(append([]string{"ctl", "--socket", socket}, args...), &out, &errb)
	return code, out.String() + errb.String()
}

func TestRunSpeaksSdNotifyInOrder(t *testing.T) {
	n := listenNotify(t)
	dir := t.TempDir()
	envFile := filepath.Join(dir, "proxy.env")
	cfgPath, socket := writeTestConfig(t, dir, envFile)
	self, err := os.Executable()
	require.NoError(t, err)
	cmd := exec.Command(self, "run", "--config", cfgPath)
	cmd.Env = append(os.Environ(), "MESHAGENT_TEST_MAIN=1", "NOTIFY_SOCKET="+n.path, "WATCHDOG_USEC=200000")
	if testing.Verbose() {
		cmd.Stderr = os.Stderr
	}
	require.NoError(t, cmd.Start())
	var waitErr error
	exited := make(chan struct{})
	go func() { waitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})

	n.waitFor(t, "READY=1", 1)
	// READY=1 means supervising: the admin socket answers and lists the pod.
	pods, err := agent.NewClient(socket).Pods(context.Background())
	require.NoError(t, err, "the admin socket answers once READY=1 was sent")
	require.Len(t, pods, 1)
	assert.NotEqual(t, agent.PhaseStopped, pods[0].Phase)
	n.waitFor(t, "WATCHDOG=1", 2)

	// Reload by signal, then by ctl.
	require.NoError(t, cmd.Process.Signal(syscall.SIGHUP))
	n.waitFor(t, "READY=1", 2)
	code, out := ctl(t, socket, "reload")
	require.Equal(t, 0, code, out)
	assert.Contains(t, out, "unchanged (not touched):  web")
	n.waitFor(t, "READY=1", 3)
	n.waitFor(t, "WATCHDOG=1", 4)

	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	select {
	case <-exited:
		require.NoError(t, waitErr, "a clean stop exits 0")
	case <-time.After(20 * time.Second):
		t.Fatal("agent did not stop")
	}
	msgs := n.all()
	k := kinds(msgs)
	assert.Equal(t, []string{"READY", "WATCHDOG", "RELOADING", "READY", "RELOADING", "READY", "WATCHDOG", "STOPPING"},
		compactWatchdogs(k), "%q", msgs)
	assert.Equal(t, "STOPPING", k[len(k)-1], "nothing after STOPPING=1")
	for _, m := range msgs {
		if strings.HasPrefix(m, "RELOADING=1") {
			assert.Regexp(t, `^RELOADING=1\nMONOTONIC_USEC=\d+$`, m)
		}
	}

	// The children never saw the agent's notify socket.
	env, err := os.ReadFile(envFile)
	require.NoError(t, err)
	assert.NotContains(t, string(env), "NOTIFY_SOCKET")
	assert.NotContains(t, string(env), "WATCHDOG_USEC")
	assert.Contains(t, string(env), "MESHAGENT_POD=web")
}

// compactWatchdogs drops a WATCHDOG that follows a RELOADING (a ping may
// land while a reload runs) and folds repeated ones.
func compactWatchdogs(k []string) []string {
	var out []string
	for _, s := range k {
		if s == "WATCHDOG" && len(out) > 0 && (out[len(out)-1] == "WATCHDOG" || out[len(out)-1] == "RELOADING") {
			continue
		}
		out = append(out, s)
	}
	return out
}

func TestCtlOps(t *testing.T) {
	dir := t.TempDir()
	cfgPath, socket := writeTestConfig(t, dir, filepath.Join(dir, "env"))
	cfg, err := agent.LoadConfig(cfgPath)
	require.NoError(t, err)
	a, err := agent.New(cfg, agent.WithConfigPath(cfgPath), agent.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	<-a.Ready()
	require.NoError(t, a.WaitPod(context.Background(), "web", agent.PhaseRunning))

	t.Run("inspect clean", func(t *testing.T) {
		code, out := ctl(t, socket, "inspect")
		assert.Equal(t, 0, code, out)
		assert.Contains(t, out, "no findings")
	})
	t.Run("inspect finding", func(t *testing.T) {
		log := filepath.Join(dir, "state", "logs", "web", "proxy.log")
		require.NoError(t, os.WriteFile(log, make([]byte, 8192), 0o600))
		defer os.Truncate(log, 0)
		code, out := ctl(t, socket, "inspect")
		assert.Equal(t, 1, code, out)
		assert.Contains(t, out, "log-volume  web  proxy")
		code, out = ctl(t, socket, "inspect", "--json")
		assert.Equal(t, 1, code, out)
		var rep agent.InspectReport
		require.NoError(t, json.Unmarshal([]byte(out), &rep))
		require.Len(t, rep.Findings, 1)
		assert.Equal(t, agent.Finding{Check: "log-volume", Pod: "web", Container: "proxy",
			Expected: "logs at most 4.0 KiB", Found: "8.0 KiB in " + filepath.Join(dir, "state", "logs", "web", "proxy.log*")}, rep.Findings[0])
	})
	t.Run("switch", func(t *testing.T) {
		code, out := ctl(t, socket, "switch", "set", "auto-restart", "off")
		require.Equal(t, 0, code, out)
		assert.Equal(t, "auto-restart is off\n", out)
		code, out = ctl(t, socket, "switch", "list", "--json")
		require.Equal(t, 0, code, out)
		var sw []agent.SwitchState
		require.NoError(t, json.Unmarshal([]byte(out), &sw))
		for _, s := range sw {
			assert.Equal(t, s.Name != "auto-restart", s.On, s.Name)
		}
		code, out = ctl(t, socket, "switch", "list")
		require.Equal(t, 0, code, out)
		assert.Regexp(t, `auto-restart\s+off\s+\S+ \S+\s+`+strconv.Itoa(os.Geteuid()), out)
		code, out = ctl(t, socket, "switch", "set", "warp", "off")
		assert.Equal(t, 1, code)
		assert.Contains(t, out, `unknown switch`)
		code, out = ctl(t, socket, "switch", "set", "nri", "maybe")
		assert.Equal(t, 1, code)
		assert.Contains(t, out, `want on or off, got "maybe"`)
		code, out = ctl(t, socket, "events", "--json")
		require.Equal(t, 0, code, out)
		assert.Contains(t, out, `"switch": "auto-restart"`)
	})
	t.Run("metrics", func(t *testing.T) {
		code, out := ctl(t, socket, "metrics")
		require.Equal(t, 0, code, out)
		assert.Contains(t, out, `meshagent_switch_enabled{switch="auto-restart"} 0`)
	})
	t.Run("reload refused", func(t *testing.T) {
		good, err := os.ReadFile(cfgPath)
		require.NoError(t, err)
		defer os.WriteFile(cfgPath, good, 0o600)
		require.NoError(t, os.WriteFile(cfgPath, append(good, "oops: true\n"...), 0o600))
		code, out := ctl(t, socket, "reload")
		assert.Equal(t, 1, code)
		assert.Contains(t, out, "reload refused")
		assert.Contains(t, out, "oops (line")
	})
}
