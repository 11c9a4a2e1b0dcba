package agent

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

// fileAgent runs an agent from a config file it can reload.
func fileAgent(t *testing.T, pods ...PodSpec) (*runningAgent, string) {
	t.Helper()
	base := testConfig(t, pods...)
	path := filepath.Join(t.TempDir(), "config.yaml")
	writeConfig(t, path, base)
	cfg, err := LoadConfig(path)
	require.NoError(t, err)
	return startAgent(t, cfg, WithConfigPath(path)), path
}

func writeConfig(t *testing.T, path string, cfg *Config) {
	t.Helper()
	require.NoError(t, os.WriteFile(path+".tmp", []byte(configYAML(t, cfg)), 0o600))
	require.NoError(t, os.Rename(path+".tmp", path))
}

func pidsOf(t *testing.T, ra *runningAgent, pod string) map[string]int {
	t.Helper()
	p, err := ra.Pod(pod)
	require.NoError(t, err)
	out := map[string]int{}
	for _, c := range p.Containers {
		out[c.Name] = c.PID
	}
	return out
}

func runningPod(t *testing.T, ra *runningAgent, pod string) map[string]int {
	t.Helper()
	ra.waitPhase(t, pod, PhaseRunning)
	var pids map[string]int
	eventually(t, 10*time.Second, pod+" ready", func() bool {
		p, err := ra.Pod(pod)
		if err != nil {
			return false
		}
		for _, c := range p.Containers {
			if c.State != StateReady {
				return false
			}
		}
		pids = pidsOf(t, ra, pod)
		return true
	})
	return pids
}

func TestReloadAppliesPodChangesAndLeavesTheRestAlone(t *testing.T) {
	keep, gone, changed := newHostPod(t, "keep", nil), newHostPod(t, "gone", nil), newHostPod(t, "changed", nil)
	gone.spec.Containers[1].Env["DRAIN"] = "200ms"
	ra, path := fileAgent(t, keep.spec, gone.spec, changed.spec)
	keepPIDs := runningPod(t, ra, "keep")
	gonePIDs := runningPod(t, ra, "gone")
	changedPIDs := runningPod(t, ra, "changed")
	for _, h := range []*hostPod{keep, gone, changed} {
		eventually(t, 5*time.Second, "apps started", func() bool { return len(readStamps(h.appStamps)["start"]) == 1 })
	}
	stateFile := filepath.Join(ra.cfg.Node.StateDir, "pods", "gone.json")
	require.FileExists(t, stateFile)

	added := newHostPod(t, "added", nil)
	changed.spec.Containers[1].Env["MODE"] = "v2"
	next := testConfig(t, keep.spec, changed.spec, added.spec)
	next.Node = ra.cfg.Node
	writeConfig(t, path, next)

	res, err := NewClient(ra.socket).Reload(context.Background())
	require.NoError(t, err)
	assert.Equal(t, []string{"added"}, res.Added)
	assert.Equal(t, []string{"gone"}, res.Removed)
	assert.Equal(t, []string{"changed"}, res.Restarted)
	assert.Equal(t, []string{"keep"}, res.Unchanged)
	assert.Empty(t, res.NotApplied)
	assert.Empty(t, res.Errors)

	// Unchanged: not disturbed.
	assert.Equal(t, keepPIDs, pidsOf(t, ra, "keep"))
	assert.Len(t, readStamps(keep.sidecarStamps)["start"], 1)
	assert.Len(t, readStamps(keep.appStamps)["start"], 1)

	// Removed: ordered stop, then forgotten.
	sc, app := readStamps(gone.sidecarStamps), readStamps(gone.appStamps)
	require.Len(t, app["exit"], 1, "the app drained and exited")
	require.Len(t, sc["term"], 1)
	assert.True(t, sc["term"][0].After(app["exit"][0]), "sidecar signalled only after the app exited")
	for name, pid := range gonePIDs {
		assert.False(t, alive(pid) && !isZombie(pid), "%s of the removed pod is gone", name)
	}
	_, err = ra.Pod("gone")
	assert.ErrorIs(t, err, ErrNotFound)
	assert.NoFileExists(t, stateFile)
	assert.Empty(t, withPod(scrapeSocket(t, ra.socket), "gone"), "no metrics left for the removed pod")

	// Changed: stopped in order, started again with the new spec.
	newPIDs := runningPod(t, ra, "changed")
	for name := range changedPIDs {
		assert.NotEqual(t, changedPIDs[name], newPIDs[name], name)
	}
	r := ra.runner("changed")
	assert.Equal(t, "v2", r.spec.Container("app").Env["MODE"])
	eventually(t, 5*time.Second, "new app started", func() bool { return len(readStamps(changed.appStamps)["start"]) == 2 })
	cs := readStamps(changed.sidecarStamps)
	require.Len(t, cs["start"], 2)
	assert.True(t, readStamps(changed.appStamps)["start"][1].After(cs["listen"][1]), "sidecar first again")

	// Added: started, sidecar first.
	runningPod(t, ra, "added")
	eventually(t, 5*time.Second, "added app started", func() bool { return len(readStamps(added.appStamps)["start"]) == 1 })
	assert.True(t, readStamps(added.appStamps)["start"][0].After(readStamps(added.sidecarStamps)["listen"][0]))

	var names []string
	for _, p := range ra.Pods() {
		names = append(names, p.Name)
	}
	assert.Equal(t, []string{"keep", "changed", "added"}, names, "config order")

	var reloads []Event
	for _, e := range ra.Events(0, 0) {
		if e.Type == EvReload {
			reloads = append(reloads, e)
		}
	}
	require.Len(t, reloads, 1)
	assert.Equal(t, "taken", reloads[0].Fields["result"])
	assert.Contains(t, reloads[0].Reason, "restarted with a changed spec: changed")
}

func TestReloadInvalidFileChangesNothing(t *testing.T) {
	h := newHostPod(t, "web", nil)
	ra, path := fileAgent(t, h.spec)
	before := runningPod(t, ra, "web")
	good, err := os.ReadFile(path)
	require.NoError(t, err)

	for _, tc := range []struct {
		name, body, want string
	}{
		{"unknown field", string(good) + "bogus: 1\n", "bogus (line"},
		{"bad value", string(good) + "  - name: other\n    containers: [{name: a, role: boss, command: /bin/true}]\n", "pods[1].containers[0].role: want sidecar or app"},
		{"not yaml", "node: [\n", "config " + path},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.NoError(t, os.WriteFile(path, []byte(tc.body), 0o600))
			_, err := NewClient(ra.socket).Reload(context.Background())
			var api *APIError
			require.True(t, errors.As(err, &api), "%v", err)
			assert.Equal(t, 422, api.Status)
			assert.Contains(t, api.Message, "reload refused")
			assert.Contains(t, api.Message, tc.want)
		})
	}
	assert.Equal(t, before, pidsOf(t, ra, "web"), "same processes")
	var names []string
	for _, p := range ra.Pods() {
		names = append(names, p.Name)
	}
	assert.Equal(t, []string{"web"}, names)
	assert.Len(t, readStamps(h.sidecarStamps)["start"], 1)
	m := scrapeSocket(t, ra.socket)
	assert.Equal(t, 0.0, m["meshagent_config_last_reload_successful"])
	assert.Equal(t, 3.0, m[`meshagent_config_reloads_total{result="failure"}`])

	// The old config is still the one in force: putting it back is a no-op.
	require.NoError(t, os.WriteFile(path, good, 0o600))
	res, err := NewClient(ra.socket).Reload(context.Background())
	require.NoError(t, err)
	assert.Equal(t, []string{"web"}, res.Unchanged)
	assert.Empty(t, res.Added)
	assert.Empty(t, res.Removed)
	assert.Empty(t, res.Restarted)
	assert.Equal(t, before, pidsOf(t, ra, "web"))
}

func TestReloadReportsNodeChangesItCannotApply(t *testing.T) {
	h := newHostPod(t, "web", nil)
	ra, path := fileAgent(t, h.spec)
	before := runningPod(t, ra, "web")
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	other := filepath.Join(t.TempDir(), "elsewhere.sock")
	cfg, err := ParseConfig(raw)
	require.NoError(t, err)
	cfg.Node.AdminSocket = other
	writeConfig(t, path, cfg)
	res, err := NewClient(ra.socket).Reload(context.Background())
	require.NoError(t, err)
	sort.Strings(res.NotApplied)
	require.Len(t, res.NotApplied, 1)
	assert.Contains(t, res.NotApplied[0], "node.adminSocket")
	assert.Equal(t, before, pidsOf(t, ra, "web"))
	assert.NoFileExists(t, other, "the socket stays where it was")
}

func TestOpsLeaveNoGoroutinesOrFDs(t *testing.T) {
	fdsBefore := countFDs(t)
	ignore := goleak.IgnoreCurrent()
	web := newHostPod(t, "web", nil)
	web.spec.Containers[0].Version = "x"
	web.spec.Containers[0].VersionURL = "http://" + web.addr + "/version"
	base := testConfig(t, web.spec)
	base.Node.MetricsAddr = freeAddr(t)
	path := filepath.Join(t.TempDir(), "config.yaml")
	writeConfig(t, path, base)
	cfg, err := LoadConfig(path)
	require.NoError(t, err)
	cfg.Node.MetricsAddr = base.Node.MetricsAddr
	ra := startAgent(t, cfg, WithConfigPath(path))
	runningPod(t, ra, "web")
	c := NewClient(ra.socket)

	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := hc.Get("http://" + cfg.Node.MetricsAddr + "/metrics")
	require.NoError(t, err)
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	_, err = c.SetSwitch(context.Background(), SwitchNRI, false)
	require.NoError(t, err)
	rep, err := c.Inspect(context.Background())
	require.NoError(t, err)
	require.Len(t, rep.Findings, 1, "the version check read the sidecar over HTTP")
	require.NoError(t, ra.Health(context.Background()))

	other := newHostPod(t, "other", nil)
	next := testConfig(t, other.spec)
	next.Node = cfg.Node
	writeConfig(t, path, next)
	res, err := c.Reload(context.Background())
	require.NoError(t, err)
	require.Equal(t, []string{"web"}, res.Removed)
	runningPod(t, ra, "other")
	ra.stop(t)

	goleak.VerifyNone(t, ignore, goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"))
	eventually(t, 2*time.Second, "fds back to the baseline", func() bool { return countFDs(t) <= fdsBefore })
}

type recordingNotifier struct {
	mu    sync.Mutex
	calls []string
}

func (n *recordingNotifier) add(s string) error {
	n.mu.Lock()
	n.calls = append(n.calls, s)
	n.mu.Unlock()
	return nil
}
func (n *recordingNotifier) Ready() error        { return n.add("READY") }
func (n *recordingNotifier) Reloading() error    { return n.add("RELOADING") }
func (n *recordingNotifier) Stopping() error     { return n.add("STOPPING") }
func (n *recordingNotifier) Status(string) error { return nil }

func TestNotifierOrderAndNoReloadAfterStop(t *testing.T) {
	h := newHostPod(t, "web", nil)
	base := testConfig(t, h.spec)
	path := filepath.Join(t.TempDir(), "config.yaml")
	writeConfig(t, path, base)
	cfg, err := LoadConfig(path)
	require.NoError(t, err)
	n := &recordingNotifier{}
	ra := startAgent(t, cfg, WithConfigPath(path), WithNotifier(n))
	_, err = ra.Reload(context.Background())
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, []byte("pods: 7\n"), 0o600))
	_, err = ra.Reload(context.Background())
	require.ErrorIs(t, err, ErrReloadRefused)
	ra.stop(t)
	_, err = ra.Reload(context.Background())
	require.ErrorIs(t, err, ErrReloadRefused)
	assert.Contains(t, err.Error(), "stopping")
	assert.Equal(t, []string{"READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"}, n.calls)
}

// stuckRuntime blocks the start of one container until released, the way
// a hung runtime call would.
type stuckRuntime struct {
	Runtime
	container string
	release   chan struct{}
}

func (s *stuckRuntime) Start(ctx context.Context, pod *PodSpec, c *ContainerSpec) (Process, error) {
	if c.Name == s.container {
		<-s.release
	}
	return s.Runtime.Start(ctx, pod, c)
}

func TestHealthFailsWhileASupervisorIsStuck(t *testing.T) {
	h := newHostPod(t, "web", nil)
	cfg := testConfig(t, h.spec)
	rt := &stuckRuntime{Runtime: &HostRuntime{LogDir: filepath.Join(cfg.Node.StateDir, "logs")}, container: "app", release: make(chan struct{})}
	ra := startAgent(t, cfg, WithRuntime(rt))
	ctx := context.Background()
	eventually(t, 10*time.Second, "the app's start is stuck", func() bool {
		return ra.container(t, "web", "app").State == StateStarting
	})
	hctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	err := ra.Health(hctx)
	cancel()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "pod web: supervisor does not answer")
	close(rt.release)
	eventually(t, 10*time.Second, "healthy again", func() bool {
		hctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		return ra.Health(hctx) == nil
	})
}
