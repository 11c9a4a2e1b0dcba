package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/meshagent/meshagent/agent/containerd"
)

// environOf returns pid's environment as it was exec'd.
func environOf(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	require.NoError(t, err)
	out := map[string]string{}
	for _, kv := range bytes.Split(b, []byte{0}) {
		if k, v, ok := strings.Cut(string(kv), "="); ok {
			out[k] = v
		}
	}
	return out
}

func portFree(addr string) bool {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	l.Close()
	return true
}

func TestSwitchHandoffStoreOffReleasesAndOnResumes(t *testing.T) {
	d := newDemoPod(t, "hs", demoPodOpts{store: true, watch: 50 * time.Millisecond, readyTimeout: 5 * time.Second})
	// The sidecar also offers its listener to the store (FDSTORE=1): while
	// the switch is off, that must be refused too.
	d.spec.Containers[0].Args = d.sidecarArgs(50*time.Millisecond, "v1", "--fdstore")
	fdsBefore := countFDs(t)
	ignore := goleak.IgnoreCurrent()
	da := startDemoAgent(t, d.spec)
	c := NewClient(da.socket)
	h := da.runner("hs").hx.get("proxy")
	gauge := func() float64 {
		return scrapeSocket(t, da.socket)[`meshagent_fdstore_held_fds{container="proxy",pod="hs"}`]
	}
	require.Equal(t, 2, h.store.Len(), "listen and admin held")
	assert.Equal(t, 2.0, gauge())

	// Off: released before the command returns, well within a second.
	began := time.Now()
	st, err := c.SetSwitch(context.Background(), SwitchHandoffStore, false)
	require.NoError(t, err)
	assert.False(t, st.On)
	assert.Less(t, time.Since(began), time.Second)
	assert.Zero(t, h.store.Len(), "fds still held after the switch went off")
	assert.Zero(t, gauge())

	// A hot upgrade is refused with the reason (409 through the socket).
	_, err = c.Upgrade(context.Background(), "hs", "proxy", UpgradeRequest{Command: d.sidecarBin, Args: d.sidecarArgs(0, "v2")})
	var apiErr *APIError
	require.True(t, errors.As(err, &apiErr), "%v", err)
	assert.Equal(t, http.StatusConflict, apiErr.Status)
	assert.Contains(t, apiErr.Message, "handoff-store switch is off")

	// A crashed sidecar: meshagent no longer pins its ports (held down by
	// auto-restart off to look), and the restart binds them itself.
	_, err = c.SetSwitch(context.Background(), SwitchAutoRestart, false)
	require.NoError(t, err)
	old := da.status(t, "hs", "proxy").PID
	require.NoError(t, syscall.Kill(old, syscall.SIGKILL))
	eventually(t, 5*time.Second, "crash seen", func() bool { return da.status(t, "hs", "proxy").State == StateExited })
	assert.True(t, portFree(d.listen), "port %s still pinned with the sidecar down", d.listen)
	assert.True(t, portFree(d.admin), "port %s still pinned with the sidecar down", d.admin)
	_, err = c.SetSwitch(context.Background(), SwitchAutoRestart, true)
	require.NoError(t, err)
	now := da.waitReady(t, "hs", "proxy", old)
	waitServing(t, d.listen)
	env := environOf(t, now.PID)
	assert.NotContains(t, env, "LISTEN_FDS", "a start passed held fds with the switch off")
	assert.Contains(t, env, "NOTIFY_SOCKET", "READY=1 still counts with the switch off")
	time.Sleep(200 * time.Millisecond) // its FDSTORE=1 went through the notify socket meanwhile
	assert.Zero(t, h.store.Len(), "FDSTORE=1 accepted with the switch off")
	assert.Zero(t, gauge())

	// On: the running sidecar bound its ports itself, so nothing is held
	// until its next start, and upgrades say so.
	_, err = c.SetSwitch(context.Background(), SwitchHandoffStore, true)
	require.NoError(t, err)
	assert.Zero(t, h.store.Len())
	_, err = da.Upgrade(context.Background(), "hs", "proxy", UpgradeRequest{Command: d.sidecarBin, Args: d.sidecarArgs(0, "v2")})
	require.ErrorIs(t, err, ErrUpgradeState)
	assert.Contains(t, err.Error(), "not held since the handoff-store switch was off")

	require.NoError(t, c.Restart(context.Background(), "hs", "proxy"))
	now = da.waitReady(t, "hs", "proxy", now.PID)
	assert.Equal(t, "2", environOf(t, now.PID)["LISTEN_FDS"], "holding resumed at the next start")
	assert.Equal(t, 2, h.store.Len())
	assert.Equal(t, 2.0, gauge())
	res := upgradeTo(t, da, d, "v2")
	assert.Equal(t, UpgradeSucceeded, res.Outcome, res.Reason)

	var flips []string
	for _, e := range da.rec.all() {
		if e.Type == EvSwitch {
			flips = append(flips, e.Reason)
		}
	}
	assert.Len(t, flips, 4)

	da.stop()
	goleak.VerifyNone(t, ignore, goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"))
	eventually(t, 2*time.Second, "fds back to the baseline", func() bool { return countFDs(t) <= fdsBefore })
}

// An agent started with the switch already off holds nothing from the
// pod's creation, and the restart gets no fds.
func TestSwitchHandoffStoreOffAtStart(t *testing.T) {
	h := newHostPod(t, "web", nil)
	h.spec.Containers[0].Handoff = &HandoffSpec{Listeners: []ListenerSpec{{Name: "web", Address: "tcp://" + freeAddr(t)}}}
	cfg := testConfig(t, h.spec)
	require.NoError(t, os.MkdirAll(cfg.Node.StateDir, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(cfg.Node.StateDir, "switches.json"),
		[]byte(`{"handoff-store": {"on": false, "changed": "2025-01-01T00:00:00Z", "uid": 0}}`), 0o600))
	ra := startAgent(t, cfg)
	ra.waitPhase(t, "web", PhaseRunning)
	hx := ra.runner("web").hx.get("proxy")
	assert.Zero(t, hx.store.Len())
	pid := ra.container(t, "web", "proxy").PID
	assert.NotContains(t, environOf(t, pid), "LISTEN_FDS")
	_, err := ra.Upgrade(context.Background(), "web", "proxy", UpgradeRequest{Command: "/bin/true"})
	require.ErrorIs(t, err, ErrUpgradeState)
	assert.Contains(t, err.Error(), "handoff-store switch is off")
}

func TestInspectFindsFDStoreFaults(t *testing.T) {
	extra := freeAddr(t)
	h := newHostPod(t, "web", map[string]string{"STORE_EXTRA": extra})
	webAddr := freeAddr(t)
	h.spec.Containers[0].Handoff = &HandoffSpec{FDStore: true, Listeners: []ListenerSpec{{Name: "web", Address: "tcp://" + webAddr}}}
	cfg := testConfig(t, h.spec)
	cfg.Node.Inspect.FSMaxUsedPercent = 100
	ra := startAgent(t, cfg)
	ra.waitPhase(t, "web", PhaseRunning)
	hx := ra.runner("web").hx.get("proxy")
	eventually(t, 5*time.Second, "the sidecar stored its extra listener", func() bool { return hx.store.Len() == 2 })
	pid := ra.container(t, "web", "proxy").PID

	// Fault 1 is the sidecar's own: it stored "extra" and closed its copy,
	// so meshagent alone pins that port. Fault 2: a holder shuts the held
	// "web" listener down (shutdown(2) acts on the socket every duplicate
	// shares), as a sidecar draining its inherited sockets might.
	act, err := hx.store.Activation()
	require.NoError(t, err)
	require.NoError(t, unix.Shutdown(int(act.Files[0].Fd()), unix.SHUT_RDWR))
	act.Close()

	rep, err := NewClient(ra.socket).Inspect(context.Background())
	require.NoError(t, err)
	var got []Finding
	for _, f := range rep.Findings {
		if f.Check == "fd-store" {
			got = append(got, f)
		}
	}
	require.Len(t, got, 2, "%+v", rep.Findings)
	byFD := map[string]Finding{}
	for _, f := range got {
		assert.Equal(t, "web", f.Pod)
		assert.Equal(t, "proxy", f.Container)
		byFD[strings.Fields(f.Expected)[2]] = f
	}
	f := byFD[`"web"`]
	assert.Equal(t, fmt.Sprintf(`held fd "web" (tcp %s) listening`, webAddr), f.Expected)
	assert.Contains(t, f.Found, "not listening")
	f = byFD[`"extra"`]
	assert.Equal(t, fmt.Sprintf(`held fd "extra" (tcp %s) in use by the sidecar`, extra), f.Expected)
	assert.Contains(t, f.Found, fmt.Sprintf("no process of the sidecar (pid %d) has it open", pid))
	assert.Len(t, rep.Findings, 2, "only the injected faults: %+v", rep.Findings)

	// The config no longer matching what is held, on the same real
	// stores: a listener removed, then the container gone.
	for _, tc := range []struct {
		name  string
		spec  func() *PodSpec
		found []string
	}{
		{"listener removed", func() *PodSpec {
			s := h.spec
			s.Containers = append([]ContainerSpec(nil), h.spec.Containers...)
			hs := *s.Containers[0].Handoff
			hs.Listeners = []ListenerSpec{{Name: "web", Address: "tcp://127.0.0.1:1"}}
			s.Containers[0].Handoff = &hs
			return &s
		}, []string{`held listener "web"`, "is no longer declared and pins its port"}},
		{"container gone", func() *PodSpec {
			s := h.spec
			s.Containers = h.spec.Containers[1:]
			return &s
		}, []string{"pins its port for a container the config no longer has"}},
		{"pod gone", func() *PodSpec { return nil }, []string{"pins its port for a container the config no longer has"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := inspectPodStores("web", ra.runner("web").hx, tc.spec())
			var hit bool
			for _, f := range fs {
				ok := true
				for _, want := range tc.found {
					ok = ok && strings.Contains(f.Found, want)
				}
				hit = hit || ok
			}
			assert.True(t, hit, "no finding with %q in %+v", tc.found, fs)
		})
	}
}

func TestInspectFindsStuckUpgrade(t *testing.T) {
	h := newHostPod(t, "web", nil)
	// A notify socket: the new version must say READY=1 itself, which
	// sleep never does, within an hour.
	h.spec.Containers[0].Handoff = &HandoffSpec{FDStore: true}
	h.spec.Containers[0].Upgrade = UpgradePolicy{ReadyTimeout: Duration(time.Hour), Watch: Duration(time.Second)}
	cfg := testConfig(t, h.spec)
	cfg.Node.Inspect.FSMaxUsedPercent = 100
	cfg.Node.Inspect.UpgradeMaxDuration = Duration(300 * time.Millisecond)
	ra := startAgent(t, cfg)
	ra.waitPhase(t, "web", PhaseRunning)
	eventually(t, 5*time.Second, "proxy ready", func() bool { return ra.container(t, "web", "proxy").Ready })

	rep := ra.Inspect(context.Background())
	assert.Empty(t, rep.Findings, "before the upgrade")

	done := make(chan error, 1)
	go func() {
		_, err := ra.Upgrade(context.Background(), "web", "proxy", UpgradeRequest{Command: "/bin/sleep", Args: []string{"3600"}})
		done <- err
	}()
	t.Cleanup(func() {
		ra.stop(t) // the upgrade ends with the agent
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("upgrade did not end with the agent")
		}
	})
	eventually(t, 5*time.Second, "upgrade waiting for readiness", func() bool {
		u := ra.upgradesInFlight()
		return len(u) == 1 && u[0].Stage == stageReady
	})
	time.Sleep(400 * time.Millisecond)

	for _, tc := range []struct {
		name  string
		limit time.Duration
		want  bool
	}{
		{"over node.inspect.upgradeMaxDuration", 300 * time.Millisecond, true},
		{"within its own timeouts", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			view := &NodeView{Config: &Config{Node: Node{Inspect: InspectPolicy{UpgradeMaxDuration: Duration(tc.limit)}}}}
			fs, err := upgradeCheck{a: ra.Agent}.Check(context.Background(), view)
			require.NoError(t, err)
			if !tc.want {
				assert.Empty(t, fs)
				return
			}
			require.Len(t, fs, 1)
			assert.Equal(t, "web", fs[0].Pod)
			assert.Equal(t, "proxy", fs[0].Container)
			assert.Equal(t, "an upgrade over within 300ms (node.inspect.upgradeMaxDuration)", fs[0].Expected)
			assert.Regexp(t, `^under way for \S+, waiting for the new version to be ready \(new pid \d+\); further upgrades`, fs[0].Found)
		})
	}
	// Through the admin socket, as `meshagent ctl inspect` sees it.
	rep, err := NewClient(ra.socket).Inspect(context.Background())
	require.NoError(t, err)
	require.Len(t, rep.Findings, 1, "%+v", rep.Findings)
	assert.Equal(t, "upgrade", rep.Findings[0].Check)
}

func TestInspectKubeVersionAnnotations(t *testing.T) {
	if _, err := exec.LookPath("nsenter"); err != nil {
		t.Skip("nsenter not in PATH: the exec version check runs through it")
	}
	if os.Geteuid() != 0 {
		t.Skip("nsenter into a process's namespaces needs root")
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/version" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintln(w, "1.27.0")
		fmt.Fprintln(w, "built by the test")
	}))
	defer srv.Close()
	port := srv.Listener.Addr().(*net.TCPAddr).Port
	// The containers' processes: real ones, in the node's namespaces (a
	// host-network pod), so the checks' setns and nsenter are exercised.
	proc := exec.Command("/bin/sleep", "3600")
	require.NoError(t, proc.Start())
	t.Cleanup(func() { proc.Process.Kill(); proc.Wait() })
	pid := uint32(proc.Process.Pid)

	for _, tc := range []struct {
		name string
		ann  map[string]string
		want []Finding
	}{
		{"clean", map[string]string{
			AnnoVersionPrefix + "proxy": "1.27.0", AnnoVersionCheckPrefix + "proxy": fmt.Sprintf("http:127.0.0.1:%d/version", port),
			AnnoVersionPrefix + "app": "2.0", AnnoVersionCheckPrefix + "app": "exec:/bin/echo 2.0",
		}, nil},
		{"mismatches", map[string]string{
			AnnoVersionPrefix + "proxy": "1.28.0", AnnoVersionCheckPrefix + "proxy": fmt.Sprintf("http:%d/version", port),
			AnnoVersionPrefix + "app": "2.1", AnnoVersionCheckPrefix + "app": "exec:/bin/echo 2.0",
		}, []Finding{
			{Pod: "default/web", Container: "app", Expected: "2.1", Found: "2.0"},
			{Pod: "default/web", Container: "proxy", Expected: "1.28.0", Found: "1.27.0"},
		}},
		{"declared, no way to read it: skipped", map[string]string{AnnoVersionPrefix + "proxy": "9"}, nil},
		{"unreadable", map[string]string{
			AnnoVersionPrefix + "proxy": "1.27.0", AnnoVersionCheckPrefix + "proxy": fmt.Sprintf("http:%d/nope", port),
		}, []Finding{{Pod: "default/web", Container: "proxy", Expected: "1.27.0",
			Found: fmt.Sprintf("unreadable: http://127.0.0.1:%d/nope (pod network): HTTP 404", port)}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := kubeAgentWithPod(t, tc.ann, pid)
			fs, err := versionCheck{a: a}.Check(context.Background(), &NodeView{Config: a.cfg, Pods: a.Pods()})
			require.NoError(t, err)
			assert.Equal(t, tc.want, fs)
		})
	}
}

// kubeAgentWithPod is an agent whose Kubernetes supervisor knows one pod,
// default/web, with a running sidecar proxy and app whose processes are pid.
func kubeAgentWithPod(t *testing.T, ann map[string]string, pid uint32) *Agent {
	t.Helper()
	dir := t.TempDir()
	cfg := &Config{Node: Node{AdminSocket: filepath.Join(dir, "a.sock"), StateDir: dir, MetricsAddr: "off"}}
	cfg.setDefaults()
	a, err := New(cfg, WithLogger(testLogger(t)))
	require.NoError(t, err)
	s := newKubeSupervisor(a, &KubeConfig{}, &fakeKube{})
	a.kube = s
	t.Cleanup(s.wg.Wait)
	ann = mergeMaps(map[string]string{AnnoSidecars: "proxy"}, ann)
	ref := containerd.PodRef{Namespace: "default", Name: "web", UID: "u1"}
	t0 := time.Unix(1000, 0)
	sandbox := containerd.Container{ID: "sb", Kind: containerd.KindSandbox, SandboxID: "sb", Pod: ref, CreatedAt: t0,
		Status: containerd.StatusRunning, PID: uint32(os.Getpid())}
	proxy := containerd.Container{ID: "proxy-0", Name: "proxy", Kind: containerd.KindContainer, SandboxID: "sb", Pod: ref,
		CreatedAt: t0.Add(time.Second), Status: containerd.StatusRunning, PID: pid}
	app := containerd.Container{ID: "app-0", Name: "app", Kind: containerd.KindContainer, SandboxID: "sb", Pod: ref,
		CreatedAt: t0.Add(2 * time.Second), Status: containerd.StatusRunning, PID: pid}
	ctx := context.Background()
	for _, c := range []containerd.Container{sandbox, proxy, app} {
		s.handle(ctx, containerd.Event{Kind: containerd.ContainerCreated, Container: c, Resync: true, Time: time.Now()})
	}
	s.handle(ctx, containerd.Event{Kind: containerd.Synced, Resync: true, Pods: []containerd.Pod{{
		SandboxID: "sb", PodRef: ref, Annotations: ann, Sandbox: &sandbox, Containers: []containerd.Container{proxy, app},
	}}})
	return a
}

func mergeMaps(a, b map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

func TestParseKubeVersionAnnotations(t *testing.T) {
	for _, tc := range []struct {
		name    string
		ann     map[string]string
		version map[string]string
		check   map[string]kubeProbeSpec
		err     string
	}{
		{name: "none", ann: nil},
		{name: "http and exec", ann: map[string]string{
			"meshagent.io/version.envoy": " 1.27.0 ", "meshagent.io/version-check.envoy": "http:15000/server_info",
			"meshagent.io/version.app": "3", "meshagent.io/version-check.app": "exec:/app --version"},
			version: map[string]string{"envoy": "1.27.0", "app": "3"},
			check: map[string]kubeProbeSpec{"envoy": {Kind: "http", Addr: "127.0.0.1:15000", Path: "/server_info"},
				"app": {Kind: "exec", Cmd: []string{"/app", "--version"}}}},
		{name: "empty version", ann: map[string]string{"meshagent.io/version.envoy": " "}, err: `annotation meshagent.io/version.envoy=" ": want a version`},
		{name: "tcp reads no version", ann: map[string]string{"meshagent.io/version-check.envoy": "tcp:15000"},
			err: "meshagent.io/version-check.envoy=\"tcp:15000\": want http:PORT/PATH or exec:COMMAND"},
		{name: "bad check", ann: map[string]string{"meshagent.io/version-check.envoy": "http:x"}, err: "meshagent.io/version-check.envoy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := parseKubePodPolicy(tc.ann)
			if tc.err != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.version, p.Version)
			assert.Equal(t, tc.check, p.VersionCheck)
			assert.Empty(t, p.Readiness, "version keys are not readiness checks")
		})
	}
}
