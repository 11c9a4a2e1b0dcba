package agent

import (
	"context"
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
	"go.uber.org/goleak"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	return ln.Addr().String()
}

// hostPod is a pod of the test binary as sidecar and app.
type hostPod struct {
	spec                     PodSpec
	sidecarStamps, appStamps string
	addr                     string
}

func newHostPod(t *testing.T, name string, sidecarEnv map[string]string) *hostPod {
	t.Helper()
	dir := t.TempDir()
	self, err := os.Executable()
	require.NoError(t, err)
	h := &hostPod{addr: freeAddr(t), sidecarStamps: filepath.Join(dir, "sidecar"), appStamps: filepath.Join(dir, "app")}
	env := map[string]string{"MESHAGENT_TEST_CHILD": "sidecar", "STAMP_FILE": h.sidecarStamps, "LISTEN_ADDR": h.addr}
	for k, v := range sidecarEnv {
		env[k] = v
	}
	h.spec = PodSpec{
		Name:    name,
		Startup: StartupPolicy{Timeout: Duration(10 * time.Second)},
		Containers: []ContainerSpec{
			{Name: "proxy", Role: RoleSidecar, Command: self, Env: env,
				Readiness: &Readiness{TCP: h.addr},
				Stop:      StopPolicy{Grace: Duration(5 * time.Second)}},
			{Name: "app", Role: RoleApp, Command: self,
				Env:  map[string]string{"MESHAGENT_TEST_CHILD": "app", "STAMP_FILE": h.appStamps},
				Stop: StopPolicy{Grace: Duration(5 * time.Second)}},
		},
	}
	return h
}

// runningAgent is an in-process agent for a test.
type runningAgent struct {
	*Agent
	cancel   context.CancelFunc
	done     chan error
	socket   string
	stopOnce sync.Once
}

func testConfig(t *testing.T, pods ...PodSpec) *Config {
	t.Helper()
	dir := t.TempDir()
	// No TCP metrics: tests run side by side and must not fight over a port.
	cfg := &Config{Node: Node{AdminSocket: filepath.Join(dir, "admin.sock"), StateDir: filepath.Join(dir, "state"), MetricsAddr: "off"}, Pods: pods}
	cfg.setDefaults()
	require.NoError(t, cfg.Validate())
	return cfg
}

func startAgent(t *testing.T, cfg *Config, opts ...Option) *runningAgent {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	a, err := New(cfg, append([]Option{WithLogger(log)}, opts...)...)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	ra := &runningAgent{Agent: a, cancel: cancel, done: make(chan error, 1), socket: cfg.Node.AdminSocket}
	go func() { ra.done <- a.Run(ctx) }()
	select {
	case <-a.Ready():
	case err := <-ra.done:
		t.Fatalf("agent exited at start: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("agent not ready after 10s")
	}
	t.Cleanup(func() { ra.stop(t) })
	return ra
}

// stop stops the agent (pods in order) and waits for Run to return.
func (ra *runningAgent) stop(t *testing.T) {
	t.Helper()
	ra.stopOnce.Do(func() {
		ra.cancel()
		select {
		case <-ra.done:
		case <-time.After(30 * time.Second):
			t.Error("agent did not stop within 30s")
		}
	})
}

func (ra *runningAgent) waitPhase(t *testing.T, pod string, phases ...Phase) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	require.NoError(t, ra.WaitPod(ctx, pod, phases...))
}

func (ra *runningAgent) container(t *testing.T, pod, name string) ContainerStatus {
	t.Helper()
	p, err := ra.Pod(pod)
	require.NoError(t, err)
	for _, c := range p.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %s in pod %s", name, pod)
	return ContainerStatus{}
}

// eventually polls cond for up to d.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("after %s: %s", d, what)
}

func alive(pid int) bool { return pid > 0 && syscall.Kill(pid, 0) == nil }

func TestHostAppNeverStartsBeforeSidecarAccepts(t *testing.T) {
	h := newHostPod(t, "web", map[string]string{"DELAY": "300ms"})
	ra := startAgent(t, testConfig(t, h.spec))
	ra.waitPhase(t, "web", PhaseRunning)
	eventually(t, 5*time.Second, "app started", func() bool { return len(readStamps(h.appStamps)["start"]) > 0 })
	sc, app := readStamps(h.sidecarStamps), readStamps(h.appStamps)
	require.Len(t, sc["listen"], 1)
	listen, appStart := sc["listen"][0], app["start"][0]
	assert.False(t, appStart.Before(listen), "app started %s before the sidecar's port accepted", listen.Sub(appStart))
	t.Logf("sidecar started, listened %s later; app started %s after the listen",
		listen.Sub(sc["start"][0]).Round(time.Millisecond), appStart.Sub(listen).Round(time.Microsecond))
}

func TestHostStartupTimeout(t *testing.T) {
	for _, policy := range []string{FailOpen, FailClosed} {
		t.Run(policy, func(t *testing.T) {
			h := newHostPod(t, "web", map[string]string{"NEVER_READY": "1"})
			h.spec.Startup = StartupPolicy{Timeout: Duration(300 * time.Millisecond), OnTimeout: policy}
			ra := startAgent(t, testConfig(t, h.spec))
			if policy == FailOpen {
				ra.waitPhase(t, "web", PhaseRunning)
				eventually(t, 5*time.Second, "app started", func() bool { return len(readStamps(h.appStamps)["start"]) > 0 })
			} else {
				ra.waitPhase(t, "web", PhaseFailed)
				time.Sleep(200 * time.Millisecond)
				assert.Empty(t, readStamps(h.appStamps)["start"], "failClosed keeps the app down")
				assert.Equal(t, StateWaiting, ra.container(t, "web", "app").State)
			}
			var timeouts []Event
			for _, e := range ra.Events(0, 0) {
				if e.Type == EvStartupTimeout {
					timeouts = append(timeouts, e)
				}
			}
			require.Len(t, timeouts, 1, "the timeout is recorded")
			assert.Equal(t, policy, timeouts[0].Fields["policy"])
		})
	}
}

func TestHostSidecarCrashRestartsAlone(t *testing.T) {
	h := newHostPod(t, "web", nil)
	ra := startAgent(t, testConfig(t, h.spec))
	ra.waitPhase(t, "web", PhaseRunning)
	eventually(t, 5*time.Second, "app ready", func() bool { return ra.container(t, "web", "app").PID != 0 })
	app := ra.container(t, "web", "app")
	old := ra.container(t, "web", "proxy").PID
	require.NoError(t, syscall.Kill(old, syscall.SIGKILL))
	eventually(t, 5*time.Second, "sidecar restarted and ready", func() bool {
		c := ra.container(t, "web", "proxy")
		return c.PID != 0 && c.PID != old && c.State == StateReady
	})
	after := ra.container(t, "web", "app")
	assert.Equal(t, app.PID, after.PID, "the app kept its pid")
	assert.True(t, alive(app.PID))
	assert.Equal(t, 1, ra.container(t, "web", "proxy").Restarts)
	assert.Equal(t, 0, after.Restarts)
}

func TestHostHungSidecarRestartedAlone(t *testing.T) {
	h := newHostPod(t, "web", nil)
	h.spec.Containers[0].Readiness = &Readiness{HTTP: "http://" + h.addr + "/ready",
		Period: Duration(100 * time.Millisecond), Timeout: Duration(100 * time.Millisecond), FailureThreshold: 3}
	h.spec.Containers[0].Stop.Grace = Duration(300 * time.Millisecond)
	ra := startAgent(t, testConfig(t, h.spec))
	ra.waitPhase(t, "web", PhaseRunning)
	eventually(t, 5*time.Second, "app running", func() bool { return ra.container(t, "web", "app").PID != 0 })
	appPID := ra.container(t, "web", "app").PID
	hung := ra.container(t, "web", "proxy").PID
	// Alive but not answering: the kernel still completes TCP handshakes,
	// so only the HTTP check sees it.
	require.NoError(t, syscall.Kill(hung, syscall.SIGSTOP))
	eventually(t, 10*time.Second, "hung sidecar replaced", func() bool {
		c := ra.container(t, "web", "proxy")
		return c.PID != hung && c.State == StateReady
	})
	assert.False(t, alive(hung) && !isZombie(hung), "the hung process is gone")
	assert.Equal(t, appPID, ra.container(t, "web", "app").PID, "the app kept its pid")
	var causes []string
	for _, e := range ra.Events(0, 0) {
		if e.Type == EvRestart && e.Container == "proxy" {
			causes = append(causes, e.Fields["cause"])
		}
	}
	assert.Equal(t, []string{CauseHang}, causes)
}

func isZombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	i := strings.LastIndexByte(string(b), ')')
	return i > 0 && strings.HasPrefix(string(b[i+1:]), " Z")
}

func TestHostOrderedStop(t *testing.T) {
	h := newHostPod(t, "web", nil)
	h.spec.Containers[1].Env["DRAIN"] = "300ms"
	ra := startAgent(t, testConfig(t, h.spec))
	ra.waitPhase(t, "web", PhaseRunning)
	eventually(t, 5*time.Second, "app started", func() bool { return len(readStamps(h.appStamps)["start"]) > 0 })
	ra.stop(t)
	sc, app := readStamps(h.sidecarStamps), readStamps(h.appStamps)
	require.Len(t, app["exit"], 1, "the app drained and exited")
	require.Len(t, sc["term"], 1, "the sidecar got its signal")
	assert.True(t, sc["term"][0].After(app["exit"][0]),
		"sidecar signalled %s before the app exited", app["exit"][0].Sub(sc["term"][0]))
	assert.True(t, app["exit"][0].Sub(app["term"][0]) >= 300*time.Millisecond, "the app had its drain")
}

func TestHostStopKillsAfterGrace(t *testing.T) {
	h := newHostPod(t, "web", nil)
	h.spec.Containers[1].Env["DRAIN"] = "1h"
	h.spec.Containers[1].Stop.Grace = Duration(200 * time.Millisecond)
	ra := startAgent(t, testConfig(t, h.spec))
	ra.waitPhase(t, "web", PhaseRunning)
	eventually(t, 5*time.Second, "app running", func() bool { return len(readStamps(h.appStamps)["start"]) > 0 })
	appPID := ra.container(t, "web", "app").PID
	start := time.Now()
	ra.stop(t)
	assert.Less(t, time.Since(start), 5*time.Second, "SIGKILL after the grace period")
	assert.False(t, alive(appPID) && !isZombie(appPID))
	assert.Contains(t, ra.container(t, "web", "app").LastExit, "SIGKILL")
}

func TestHostGrandchildrenStopped(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "grandchild")
	spec := PodSpec{Name: "tree", Containers: []ContainerSpec{{
		Name: "app", Role: RoleApp, Command: "/bin/sh",
		Args: []string{"-c", "sleep 1000 & echo $! > " + pidFile + "; wait"},
		Stop: StopPolicy{Grace: Duration(time.Second)},
	}}}
	ra := startAgent(t, testConfig(t, spec))
	var gc int
	eventually(t, 5*time.Second, "grandchild started", func() bool {
		b, _ := os.ReadFile(pidFile)
		gc, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		return gc != 0
	})
	ra.stop(t)
	eventually(t, 2*time.Second, "grandchild gone", func() bool { return !alive(gc) || isZombie(gc) })
}

func TestHostOperatorRestartThroughAdminSocket(t *testing.T) {
	h := newHostPod(t, "web", nil)
	ra := startAgent(t, testConfig(t, h.spec))
	ra.waitPhase(t, "web", PhaseRunning)
	eventually(t, 5*time.Second, "app running", func() bool { return ra.container(t, "web", "app").PID != 0 })
	app := ra.container(t, "web", "app").PID
	old := ra.container(t, "web", "proxy").PID
	c := NewClient(ra.socket)
	require.NoError(t, c.Restart(context.Background(), "web", "proxy"))
	eventually(t, 5*time.Second, "sidecar restarted", func() bool {
		s := ra.container(t, "web", "proxy")
		return s.PID != old && s.State == StateReady
	})
	assert.Equal(t, app, ra.container(t, "web", "app").PID)

	// Whole pod: apps stop first, sidecars start first.
	require.NoError(t, c.RestartPod(context.Background(), "web"))
	eventually(t, 10*time.Second, "pod restarted", func() bool {
		s := ra.container(t, "web", "app")
		return s.PID != 0 && s.PID != app && s.State == StateReady
	})
	eventually(t, 5*time.Second, "second app start recorded", func() bool { return len(readStamps(h.appStamps)["start"]) == 2 })
	st := readStamps(h.appStamps)
	sc := readStamps(h.sidecarStamps)
	require.GreaterOrEqual(t, len(sc["listen"]), 3)
	assert.True(t, st["start"][1].After(sc["listen"][len(sc["listen"])-1]), "after a pod restart the app waits for the sidecar again")
}

// buildExecShim builds cmd/meshagent-exec, the small shim binary.
func buildExecShim(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "meshagent-exec")
	out, err := exec.Command("go", "build", "-o", bin, "../cmd/meshagent-exec").CombinedOutput()
	require.NoError(t, err, string(out))
	return bin
}

func TestHostExecShim(t *testing.T) {
	// The shim sets oom_score_adj and LISTEN_PID in the child before the
	// command runs, and passes files as fds from 3: the agent's own binary
	// as the shim, and meshagent-exec.
	for _, tc := range []struct {
		name string
		self func(t *testing.T) string
	}{
		{"agent binary", func(*testing.T) string { return "" }},
		{"meshagent-exec", buildExecShim},
	} {
		t.Run(tc.name, func(t *testing.T) { testExecShim(t, tc.self(t)) })
	}
}

func testExecShim(t *testing.T, self string) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	lf, err := ln.(*net.TCPListener).File()
	require.NoError(t, err)
	defer lf.Close()
	adj := 500
	rt := &HostRuntime{Self: self, Preparers: []Preparer{prepFunc(func(s *StartSpec) {
		s.OOMScoreAdj = &adj
		s.ListenFDs = true
		s.Files = []*os.File{lf}
		s.Env = append(s.Env, "LISTEN_FDS=1")
	})}}
	pod := &PodSpec{Name: "shim"}
	c := &ContainerSpec{Name: "c", Command: "/bin/sh", Args: []string{"-c",
		"echo $$ $LISTEN_PID $LISTEN_FDS > " + out + "; cat /proc/self/oom_score_adj >> " + out + "; sh -c 'cat /proc/self/oom_score_adj' >> " + out + "; ls -l /proc/self/fd/3 >> " + out}}
	p, err := rt.Start(context.Background(), pod, c)
	require.NoError(t, err)
	<-p.Done()
	assert.Equal(t, ExitStatus{Known: true}, p.Exit())
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	require.Len(t, lines, 4, string(b))
	f := strings.Fields(lines[0])
	assert.Equal(t, strconv.Itoa(p.PID()), f[0], "the shim execs in place: same pid")
	assert.Equal(t, f[0], f[1], "LISTEN_PID is the final pid")
	assert.Equal(t, "1", f[2])
	assert.Equal(t, "500", lines[1])
	assert.Equal(t, "500", lines[2], "children inherit the score")
	assert.Contains(t, lines[3], "socket:")
}

func TestHostShimFailureIsAStartError(t *testing.T) {
	adj := 500
	rt := &HostRuntime{Preparers: []Preparer{prepFunc(func(s *StartSpec) {
		s.OOMScoreAdj = &adj
		s.CgroupProcs = []string{"/nonexistent/cgroup.procs"}
	})}}
	_, err := rt.Start(context.Background(), &PodSpec{Name: "p"}, &ContainerSpec{Name: "c", Command: "/bin/true"})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "pod p container c: enter cgroup: open /nonexistent/cgroup.procs")
}

type prepFunc func(*StartSpec)

func (f prepFunc) Prepare(_ context.Context, _ *PodSpec, _ *ContainerSpec, s *StartSpec) error {
	f(s)
	return nil
}

func TestAgentAdoptsAfterSIGKILL(t *testing.T) {
	h := newHostPod(t, "web", nil)
	cfg := testConfig(t, h.spec)
	cfgFile := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(cfgFile, []byte(configYAML(t, cfg)), 0o600))
	self, _ := os.Executable()
	startProc := func() *exec.Cmd {
		cmd := exec.Command(self)
		cmd.Env = append(os.Environ(), "MESHAGENT_TEST_CHILD=agent", "AGENT_CONFIG="+cfgFile)
		if testing.Verbose() {
			cmd.Stderr = os.Stderr
		}
		require.NoError(t, cmd.Start())
		return cmd
	}
	c := NewClient(cfg.Node.AdminSocket)
	pids := func() map[string]int {
		p, err := c.Pod(context.Background(), "web")
		if err != nil {
			return nil
		}
		out := map[string]int{}
		for _, ct := range p.Containers {
			if ct.State == StateReady {
				out[ct.Name] = ct.PID
			}
		}
		return out
	}
	first := startProc()
	var before map[string]int
	eventually(t, 10*time.Second, "pod running under the first agent", func() bool {
		before = pids()
		return len(before) == 2
	})
	// An app without a readiness check is ready at its exec; wait until
	// it runs its main (and can take SIGTERM) before killing the agent,
	// or the ordered stop below finds it still starting.
	eventually(t, 10*time.Second, "app running its main", func() bool { return len(readStamps(h.appStamps)["start"]) == 1 })
	require.NoError(t, first.Process.Kill())
	_ = first.Wait()
	for name, pid := range before {
		assert.True(t, alive(pid), "%s survived the agent's SIGKILL", name)
	}

	second := startProc()
	t.Cleanup(func() {
		_ = second.Process.Signal(syscall.SIGTERM)
		_ = second.Wait()
	})
	var after map[string]int
	eventually(t, 10*time.Second, "pod adopted by the second agent", func() bool {
		after = pids()
		return len(after) == 2
	})
	assert.Equal(t, before, after, "same pids: adopted, not restarted")
	sc, app := readStamps(h.sidecarStamps), readStamps(h.appStamps)
	assert.Len(t, sc["start"], 1, "no duplicate sidecar")
	assert.Len(t, app["start"], 1, "no duplicate app")

	// The adopted processes are still supervised: an ordered stop works.
	require.NoError(t, second.Process.Signal(syscall.SIGTERM))
	require.NoError(t, second.Wait())
	for name, pid := range after {
		eventually(t, 5*time.Second, name+" stopped", func() bool { return !alive(pid) || isZombie(pid) })
	}
	sc, app = readStamps(h.sidecarStamps), readStamps(h.appStamps)
	require.Len(t, app["exit"], 1)
	require.Len(t, sc["term"], 1)
	assert.True(t, sc["term"][0].After(app["exit"][0]), "ordered stop of adopted processes")
}

func configYAML(t *testing.T, cfg *Config) string {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "node: {adminSocket: %q, stateDir: %q, metricsAddr: off}\npods:\n", cfg.Node.AdminSocket, cfg.Node.StateDir)
	for _, p := range cfg.Pods {
		fmt.Fprintf(&b, "  - name: %s\n    containers:\n", p.Name)
		for _, c := range p.Containers {
			fmt.Fprintf(&b, "      - name: %s\n        role: %s\n        command: %q\n        stop: {grace: %s}\n", c.Name, c.Role, c.Command, c.Stop.Grace.D())
			if c.Readiness != nil && c.Readiness.TCP != "" {
				fmt.Fprintf(&b, "        readiness: {tcp: %q}\n", c.Readiness.TCP)
			}
			if c.Version != "" {
				fmt.Fprintf(&b, "        version: %q\n        versionURL: %q\n", c.Version, c.VersionURL)
			}
			b.WriteString("        env:\n")
			for k, v := range c.Env {
				fmt.Fprintf(&b, "          %s: %q\n", k, v)
			}
		}
	}
	return b.String()
}

func TestAgentLeavesNoGoroutinesOrFDs(t *testing.T) {
	fdsBefore := countFDs(t)
	ignore := goleak.IgnoreCurrent()
	h := newHostPod(t, "web", nil)
	cfg := testConfig(t, h.spec)
	ra := startAgent(t, cfg)
	ra.waitPhase(t, "web", PhaseRunning)
	_, err := NewClient(ra.socket).Pods(context.Background())
	require.NoError(t, err)
	ra.stop(t)
	// Idle keep-alive connections of the test's own HTTP clients are not
	// the agent's.
	goleak.VerifyNone(t, ignore, goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"))
	eventually(t, 2*time.Second, "fds back to the baseline", func() bool { return countFDs(t) <= fdsBefore })
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	return len(ents)
}

// TestHostStagedStart: a staged start has forked the shim, which has set its
// oom_score_adj but runs no command until Go; Go execs the command in the
// same process; Cancel ends it without running the command; a container
// that needs no shim has nothing to stage.
func TestHostStagedStart(t *testing.T) {
	adj := 500
	rt := &HostRuntime{Preparers: []Preparer{prepFunc(func(s *StartSpec) { s.OOMScoreAdj = &adj })}}
	pod := &PodSpec{Name: "staged"}
	out := filepath.Join(t.TempDir(), "out")
	c := &ContainerSpec{Name: "app", Command: "/bin/sh", Args: []string{"-c", "echo $$ > " + out}}

	st, err := rt.Stage(context.Background(), pod, c)
	require.NoError(t, err)
	require.NotNil(t, st)
	pid := st.(*hostStaged).l.p.PID()
	eventually(t, 5*time.Second, "shim set up and waiting", func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/oom_score_adj", pid))
		return err == nil && strings.TrimSpace(string(b)) == "500"
	})
	time.Sleep(50 * time.Millisecond)
	_, err = os.Stat(out)
	assert.True(t, os.IsNotExist(err), "the command must not run before Go")

	p, err := st.Go(context.Background())
	require.NoError(t, err)
	assert.Equal(t, pid, p.PID(), "the staged process runs the command: same pid")
	<-p.Done()
	assert.Equal(t, ExitStatus{Known: true}, p.Exit())
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.Equal(t, strconv.Itoa(pid), strings.TrimSpace(string(b)))

	// Called off: the shim exits, the command never runs.
	os.Remove(out)
	st, err = rt.Stage(context.Background(), pod, c)
	require.NoError(t, err)
	sp := st.(*hostStaged).l.p
	st.Cancel()
	select {
	case <-sp.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("cancelled staged process still running")
	}
	assert.Equal(t, ExitStatus{Known: true}, sp.Exit())
	_, err = os.Stat(out)
	assert.True(t, os.IsNotExist(err), "a cancelled stage runs nothing")

	// A staged process killed while it waits: Go says so.
	st, err = rt.Stage(context.Background(), pod, c)
	require.NoError(t, err)
	sp = st.(*hostStaged).l.p
	require.NoError(t, sp.Signal(syscall.SIGKILL))
	<-sp.Done()
	_, err = st.Go(context.Background())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "gone before its start")

	// Nothing to stage without a shim.
	plain := &HostRuntime{}
	st, err = plain.Stage(context.Background(), pod, c)
	assert.NoError(t, err)
	assert.Nil(t, st)
}
