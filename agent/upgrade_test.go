package agent

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/meshagent/meshagent/internal/loadgen"
)

// runLoad sends open-loop traffic to target in the background; wait returns
// the result.
func runLoad(tb testing.TB, target string, rate float64, d time.Duration) (wait func() loadgen.Result) {
	tb.Helper()
	ch := make(chan loadgen.Result, 1)
	errc := make(chan error, 1)
	go func() {
		res, err := loadgen.Run(context.Background(), loadgen.Config{
			Target: target, Rate: rate, Duration: d, NewConnRatio: 0.5, Timeout: 3 * time.Second})
		errc <- err
		ch <- res
	}()
	return func() loadgen.Result {
		tb.Helper()
		if err := <-errc; err != nil {
			tb.Fatal(err)
		}
		return <-ch
	}
}

func upgradeTo(tb testing.TB, da *demoAgent, d *demoPod, version string, extra ...string) UpgradeResult {
	tb.Helper()
	res, err := da.Upgrade(context.Background(), d.spec.Name, "proxy", UpgradeRequest{
		Command: d.sidecarBin, Args: d.sidecarArgs(50*time.Millisecond, version, extra...), Version: version})
	if err != nil {
		tb.Fatal(err)
	}
	return res
}

func TestUpgradeUnderLoadRefusesNothing(t *testing.T) {
	d := newDemoPod(t, "up", demoPodOpts{store: true})
	da := startDemoAgent(t, d.spec)
	app := da.status(t, "up", "app").PID
	before := da.status(t, "up", "proxy")

	wait := runLoad(t, d.target(), 300, 4*time.Second)
	time.Sleep(500 * time.Millisecond)
	pids := map[int]bool{before.PID: true}
	for i, v := range []string{"v2", "v3", "v4"} {
		res := upgradeTo(t, da, d, v)
		require.Equal(t, UpgradeSucceeded, res.Outcome, "upgrade %d: %s", i, res.Reason)
		assert.False(t, pids[res.NewPID], "upgrade %d reused pid %d", i, res.NewPID)
		pids[res.NewPID] = true
		assert.False(t, running(res.OldPID), "old pid %d still runs after the upgrade", res.OldPID)
		now := da.status(t, "up", "proxy")
		assert.Equal(t, res.NewPID, now.PID)
		assert.True(t, now.Ready)
	}
	res := wait()
	t.Logf("load: %+v p99 %s", res.Counts, res.Latency.P99)
	assert.Zero(t, res.Counts.Refused, "refused connections")
	assert.Zero(t, res.Counts.Failed(), "failed requests: %+v %v", res.Counts, res.OtherErrors)
	assert.Greater(t, res.Counts.OK, int64(1000))

	info, err := getSidecarInfo(d.admin)
	require.NoError(t, err)
	assert.Equal(t, "v4", info.Version)
	assert.Equal(t, "v4", da.cfg.Pods[0].Container("proxy").Version, "later restarts use the new version")
	assert.Equal(t, app, da.status(t, "up", "app").PID, "the app was touched")
	assert.Equal(t, 3, da.count(EvUpgradeSucceeded))
	for _, e := range da.rec.all() {
		if e.Type == EvRestart && e.Fields["cause"] == CauseUpgrade {
			return
		}
	}
	t.Error("no restart event with cause upgrade")
}

func TestUpgradeRollsBackWhenNewVersionNeverReady(t *testing.T) {
	d := newDemoPod(t, "never", demoPodOpts{store: true, readyTimeout: time.Second})
	da := startDemoAgent(t, d.spec)
	before := da.status(t, "never", "proxy")
	wait := runLoad(t, d.target(), 100, 2*time.Second)

	res, err := da.Upgrade(context.Background(), "never", "proxy", UpgradeRequest{
		Command: d.sidecarBin, Args: d.sidecarArgs(time.Hour, "v2"), Version: "v2"})
	require.NoError(t, err)
	assert.Equal(t, UpgradeRolledBack, res.Outcome)
	assert.Contains(t, res.Reason, "not ready within upgrade.readyTimeout 1s")
	require.NotZero(t, res.NewPID)
	assert.False(t, running(res.NewPID), "the unready new process %d was left running", res.NewPID)

	after := da.status(t, "never", "proxy")
	assert.Equal(t, before.PID, after.PID, "the old process was replaced")
	assert.True(t, after.Ready)
	assert.Equal(t, before.Restarts, after.Restarts)
	assert.Equal(t, "v1", da.cfg.Pods[0].Container("proxy").Version)
	load := wait()
	assert.Zero(t, load.Counts.Failed(), "the old version stopped serving: %+v", load.Counts)
	assert.Equal(t, 1, da.count(EvUpgradeRolledBack))
}

func TestUpgradeRollsBackOnCrashInWatchWindow(t *testing.T) {
	d := newDemoPod(t, "crashy", demoPodOpts{store: true, watch: 5 * time.Second})
	da := startDemoAgent(t, d.spec)
	wait := runLoad(t, d.target(), 100, 3*time.Second)

	res := upgradeTo(t, da, d, "v2", "--crash-after", "300ms")
	assert.Equal(t, UpgradeRolledBack, res.Outcome)
	assert.Contains(t, res.Reason, "exited within the watch window")
	assert.Contains(t, res.Reason, "exit status 3")
	after := da.waitReady(t, "crashy", "proxy", res.NewPID)
	info, err := getSidecarInfo(d.admin)
	require.NoError(t, err)
	assert.Equal(t, "v1", info.Version, "the old version is back")
	assert.Equal(t, after.PID, info.PID)
	assert.Equal(t, "v1", da.cfg.Pods[0].Container("proxy").Version)
	load := wait()
	assert.Zero(t, load.Counts.Refused, "refused during the rollback: %+v", load.Counts)
}

func TestUpgradeSecondConcurrentRefused(t *testing.T) {
	d := newDemoPod(t, "busy", demoPodOpts{store: true, watch: 100 * time.Millisecond})
	da := startDemoAgent(t, d.spec)
	first := make(chan UpgradeResult, 1)
	go func() {
		res, _ := da.Upgrade(context.Background(), "busy", "proxy", UpgradeRequest{
			Command: d.sidecarBin, Args: d.sidecarArgs(time.Second, "v2"), Version: "v2"})
		first <- res
	}()
	deadline := time.Now().Add(5 * time.Second)
	for da.count(EvUpgradeStarted) == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	_, err := da.Upgrade(context.Background(), "busy", "proxy", UpgradeRequest{Command: d.sidecarBin, Version: "v3"})
	assert.ErrorIs(t, err, ErrUpgradeBusy)

	// The same through the admin socket: 409 with the reason.
	_, err = NewClient(da.socket).Upgrade(context.Background(), "busy", "proxy", UpgradeRequest{Command: d.sidecarBin})
	var apiErr *APIError
	require.True(t, errors.As(err, &apiErr), "%v", err)
	assert.Equal(t, http.StatusConflict, apiErr.Status)
	assert.Contains(t, apiErr.Message, "already running")

	res := <-first
	assert.Equal(t, UpgradeSucceeded, res.Outcome, res.Reason)
	// Once over, the next one is accepted.
	res = upgradeTo(t, da, d, "v3")
	assert.Equal(t, UpgradeSucceeded, res.Outcome, res.Reason)
}

func TestUpgradeBadRequests(t *testing.T) {
	d := newDemoPod(t, "bad", demoPodOpts{store: true})
	da := startDemoAgent(t, d.spec)
	c := NewClient(da.socket)
	for _, tc := range []struct {
		name, pod, container string
		req                  UpgradeRequest
		status               int
		msg                  string
	}{
		{"no command", "bad", "proxy", UpgradeRequest{}, 400, "command: required"},
		{"missing binary", "bad", "proxy", UpgradeRequest{Command: "/nonexistent/sidecar"}, 400, "no such file"},
		{"app", "bad", "app", UpgradeRequest{Command: d.sidecarBin}, 400, "only sidecars"},
		{"unknown pod", "nope", "proxy", UpgradeRequest{Command: d.sidecarBin}, 404, "not found"},
		{"unknown container", "bad", "nope", UpgradeRequest{Command: d.sidecarBin}, 404, "not found"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := c.Upgrade(context.Background(), tc.pod, tc.container, tc.req)
			var apiErr *APIError
			require.True(t, errors.As(err, &apiErr), "%v", err)
			assert.Equal(t, tc.status, apiErr.Status)
			assert.Contains(t, apiErr.Message, tc.msg)
		})
	}
	// Malformed JSON.
	err := c.Do(context.Background(), http.MethodPost, "/v1/pods/bad/containers/proxy/upgrade", map[string]any{"command": 3}, nil)
	var apiErr *APIError
	require.True(t, errors.As(err, &apiErr), "%v", err)
	assert.Equal(t, 400, apiErr.Status)
	assert.Zero(t, da.count(EvUpgradeStarted))
}

func TestCrashRestartWithStoreRefusesNothing(t *testing.T) {
	d := newDemoPod(t, "crash", demoPodOpts{store: true})
	da := startDemoAgent(t, d.spec)
	app := da.status(t, "crash", "app").PID
	wait := runLoad(t, d.target(), 300, 3*time.Second)
	time.Sleep(300 * time.Millisecond)
	for i := 0; i < 3; i++ {
		c := da.status(t, "crash", "proxy")
		require.NoError(t, syscall.Kill(c.PID, syscall.SIGKILL))
		da.waitReady(t, "crash", "proxy", c.PID)
		time.Sleep(300 * time.Millisecond)
	}
	res := wait()
	t.Logf("load: %+v", res.Counts)
	assert.Zero(t, res.Counts.Refused, "refused connections with the fd store")
	assert.Zero(t, res.Counts.Timeout+res.Counts.Non2xx+res.Counts.Other, "%+v %v", res.Counts, res.OtherErrors)
	assert.Equal(t, app, da.status(t, "crash", "app").PID)
}

func TestSidecarStoredFDsSurviveRestart(t *testing.T) {
	// The sidecar binds its own listener and stores it (FDSTORE=1): the
	// agent declares no listeners, only the notify socket.
	d := newDemoPod(t, "self", demoPodOpts{})
	sc := &d.spec.Containers[0]
	sc.Handoff = &HandoffSpec{FDStore: true}
	sc.Args = append(sc.Args, "--fdstore")
	da := startDemoAgent(t, d.spec)
	pid := da.status(t, "self", "proxy").PID
	wait := runLoad(t, d.target(), 200, 2*time.Second)
	time.Sleep(300 * time.Millisecond)
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	da.waitReady(t, "self", "proxy", pid)
	res := wait()
	h := da.runner("self").hx.get("proxy")
	assert.Equal(t, []string{"listen"}, h.store.Names(), "the fds the sidecar stored")
	assert.Zero(t, res.Counts.Refused, "%+v", res.Counts)
}

func TestReadyNotifyOpensGate(t *testing.T) {
	// No readiness check that could pass: only READY=1 makes the sidecar
	// ready (an exec check that always fails would keep the gate shut).
	d := newDemoPod(t, "notify", demoPodOpts{store: true})
	d.spec.Containers[0].Readiness = &Readiness{Exec: []string{"false"}, Period: Duration(time.Hour), Timeout: Duration(time.Second),
		StartupInterval: Duration(time.Hour), FailureThreshold: 1000}
	da := startDemoAgent(t, d.spec)
	info, err := getSidecarInfo(d.admin)
	require.NoError(t, err)
	assert.True(t, info.Ready)
	assert.Equal(t, info.PID, da.status(t, "notify", "proxy").PID)
	for _, e := range da.rec.all() {
		if e.Type == EvGateOpen {
			return
		}
	}
	t.Error("no gate-open event")
}

func TestHandoffConfigErrors(t *testing.T) {
	base := func() *Config {
		return &Config{Pods: []PodSpec{{Name: "p", Containers: []ContainerSpec{
			{Name: "s", Role: RoleSidecar, Command: "x", Handoff: &HandoffSpec{}},
			{Name: "a", Role: RoleApp, Command: "x"}}}}}
	}
	for _, tc := range []struct {
		name string
		mut  func(*Config)
		want string
	}{
		{"app", func(c *Config) { c.Pods[0].Containers[1].Handoff = &HandoffSpec{} }, "pods[0].containers[1].handoff: only sidecars"},
		{"bad address", func(c *Config) {
			c.Pods[0].Containers[0].Handoff.Listeners = []ListenerSpec{{Name: "l", Address: "127.0.0.1:80"}}
		}, "pods[0].containers[0].handoff.listeners[0].address: bad listener spec"},
		{"no address", func(c *Config) {
			c.Pods[0].Containers[0].Handoff.Listeners = []ListenerSpec{{Name: "l"}}
		}, "listeners[0].address: required"},
		{"bad name", func(c *Config) {
			c.Pods[0].Containers[0].Handoff.Listeners = []ListenerSpec{{Name: "a:b", Address: "tcp://127.0.0.1:1"}}
		}, "listeners[0].name:"},
		{"duplicate", func(c *Config) {
			c.Pods[0].Containers[0].Handoff.Listeners = []ListenerSpec{{Name: "l", Address: "tcp://127.0.0.1:1"}, {Name: "l", Address: "tcp://127.0.0.1:2"}}
		}, "listeners[1].name: listener \"l\" is declared twice"},
		{"mosn dir", func(c *Config) { c.Pods[0].Containers[0].Handoff.MOSN = &MOSNSpec{} }, "handoff.mosn.udsDir: required"},
		{"snapshot", func(c *Config) { c.Pods[0].Containers[0].Handoff.Snapshot = true }, "handoff.snapshot: needs mosn"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := base()
			tc.mut(c)
			c.setDefaults()
			err := c.Validate()
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
	c := base()
	c.setDefaults()
	require.NoError(t, c.Validate())
	assert.Equal(t, DefaultUpgradeWatch, c.Pods[0].Containers[0].Upgrade.Watch.D())

	// YAML: unknown fields are named with their path.
	_, err := ParseConfig([]byte("pods:\n- name: p\n  containers:\n  - {name: s, role: sidecar, command: x, handoff: {fdstore: true}}\n"))
	require.Error(t, err)
	assert.True(t, strings.Contains(err.Error(), "pods[0].containers[0].handoff.fdstore"), err.Error())
}

func TestHandoffLeavesNoGoroutinesOrFDs(t *testing.T) {
	d := newDemoPod(t, "leak", demoPodOpts{store: true, watch: 50 * time.Millisecond, readyTimeout: time.Second})
	fdsBefore := countFDs(t)
	ignore := goleak.IgnoreCurrent()
	da := startDemoAgent(t, d.spec)
	res := upgradeTo(t, da, d, "v2")
	require.Equal(t, UpgradeSucceeded, res.Outcome, res.Reason)
	res, err := da.Upgrade(context.Background(), "leak", "proxy", UpgradeRequest{
		Command: d.sidecarBin, Args: d.sidecarArgs(time.Hour, "v3"), Version: "v3"})
	require.NoError(t, err)
	require.Equal(t, UpgradeRolledBack, res.Outcome)
	pid := da.status(t, "leak", "proxy").PID
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	da.waitReady(t, "leak", "proxy", pid)
	da.stop()
	goleak.VerifyNone(t, ignore, goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"))
	eventually(t, 2*time.Second, "fds back to the baseline", func() bool { return countFDs(t) <= fdsBefore })
	_, err = os.Stat(podHandoffDir(stateDir{dir: filepath.Dir(da.socket) + "/state"}, "leak"))
	assert.True(t, os.IsNotExist(err), "the pod's socket directory is left: %v", err)
}

func TestUpgradeRefusedWhileSwitchOff(t *testing.T) {
	h := newHostPod(t, "web", nil)
	ra := startAgent(t, testConfig(t, h.spec))
	ra.waitPhase(t, "web", PhaseRunning)
	_, err := ra.SetSwitch(context.Background(), SwitchHotUpgrade, false, 0)
	require.NoError(t, err)
	old := ra.container(t, "web", "proxy").PID
	_, err = ra.Upgrade(context.Background(), "web", "proxy", UpgradeRequest{Command: "/bin/true"})
	require.ErrorIs(t, err, ErrUpgradeState)
	assert.Contains(t, err.Error(), "hot-upgrade switch is off")
	assert.Equal(t, old, ra.container(t, "web", "proxy").PID, "nothing was started or stopped")
}
