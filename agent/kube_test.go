package agent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/meshagent/meshagent/internal/critest"
	"github.com/meshagent/meshagent/internal/testimages"
)

// forLanes runs f on containerd v2.2.9 and on 1.6.
func forLanes(t *testing.T, f func(*testing.T, critest.Lane)) {
	for _, lane := range []critest.Lane{critest.V2, critest.V16} {
		t.Run(lane.Arg, func(t *testing.T) { f(t, lane) })
	}
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// TestKubeDiscovery: pods that existed before the agent and pods created
// after it are in the model with their roles, pids and states, and the
// admin API lists them as namespace/name. Both lanes (1.6 has no NRI; the
// discovery and events do not need it).
func TestKubeDiscovery(t *testing.T) {
	for _, lane := range []critest.Lane{critest.V2, critest.V16} {
		t.Run(lane.Arg, func(t *testing.T) {
			critest.CheckLeaks(t)
			env := newKubeEnv(t, critest.Socket(t, lane))
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()

			// Host network and no readiness check: a sidecar is ready when it
			// runs, which is all the quick lane needs.
			spec := func(name string) critest.PodSpec {
				return critest.PodSpec{
					Name: name, Annotations: map[string]string{AnnoSidecars: "proxy"},
					Containers: []critest.ContainerSpec{
						{Name: "proxy", Image: testimages.Sidecar, Env: map[string]string{"SIDECAR_PORT": "0"}},
						{Name: "app", Image: testimages.App},
					},
				}
			}
			before := env.rt.StartPod(t, spec("before"))
			a, rec := env.startAgent()
			after := env.rt.StartPod(t, spec("after"))

			for _, pod := range []*critest.Pod{before, after} {
				var st PodStatus
				waitUntil(t, 30*time.Second, podKey(pod)+" ready in the model", func() bool {
					var ok bool
					st, ok = kubeStatus(a, pod)
					return ok && st.Phase == PhaseRunning && len(st.Containers) == 2
				})
				require.NotNil(t, st.Kubernetes)
				assert.Equal(t, pod.SandboxID, st.Kubernetes.SandboxID)
				assert.Equal(t, pod.UID, st.Kubernetes.UID)
				for name, role := range map[string]Role{"proxy": RoleSidecar, "app": RoleApp} {
					c := containerOf(st, name)
					assert.Equal(t, role, c.Role, "%s/%s role", podKey(pod), name)
					pid, err := env.rt.PID(ctx, pod.ContainerID(name))
					require.NoError(t, err)
					assert.Equal(t, pid, c.PID, "%s/%s pid", podKey(pod), name)
				}
				assert.Equal(t, StateReady, containerOf(st, "proxy").State)
				assert.Equal(t, StateRunning, containerOf(st, "app").State)
				assert.Len(t, rec.find(EvGateOpen, podKey(pod), ""), 1, "gate of %s opened once", podKey(pod))
			}

			// An exit is seen through the event stream.
			require.NoError(t, env.rt.StopContainer(ctx, after.ContainerID("app"), 5*time.Second))
			waitUntil(t, 30*time.Second, "app exit in the model", func() bool {
				st, _ := kubeStatus(a, after)
				return containerOf(st, "app").State == StateExited
			})

			// The admin API (what `meshagent ctl pods --json` prints).
			pods, err := NewClient(env.config().Node.AdminSocket).Pods(ctx)
			require.NoError(t, err)
			names := map[string]bool{}
			for _, p := range pods {
				names[p.Name] = true
			}
			assert.True(t, names[podKey(before)] && names[podKey(after)], "admin API lists %v", names)

			// And `meshagent ctl pods`, the human table.
			table, err := exec.CommandContext(ctx, env.bin+"/meshagent", "ctl", "--socket", env.config().Node.AdminSocket, "pods").CombinedOutput()
			require.NoError(t, err, "%s", table)
			t.Logf("meshagent ctl pods:\n%s", table)
			for _, line := range []string{podKey(before) + "  running  proxy", podKey(after) + "  running  app"} {
				assert.Contains(t, strings.Join(strings.Fields(string(table)), "  "), line)
			}
		})
	}
}

// TestKubeGate: `meshagent gate`, run in the sidecar as its postStart hook
// (CRI ExecSync, like kubelet), blocks until the agent's own readiness probe
// (HTTP inside the pod's network namespace) passes and then returns at
// once; a gate in another pod learns only about its own pod; a process
// outside any pod is refused; --probe answers at once.
func TestKubeGate(t *testing.T) { forLanes(t, testKubeGate) }

func testKubeGate(t *testing.T, lane critest.Lane) {
	critest.CheckLeaks(t)
	env := newKubeEnv(t, critest.Socket(t, lane))
	a, rec := env.startAgent()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// Pod A: the sidecar takes 3s to listen. Only the sidecar starts (as
	// kubelet starts nothing after it until its postStart hook returns).
	specA, outA := env.podSpec("gate", 3*time.Second, nil)
	specA.Containers = specA.Containers[:1]
	podA := env.rt.StartPod(t, specA)
	proxyA := podA.ContainerID("proxy")

	type result struct {
		out  string
		code int32
		err  error
	}
	gateA := make(chan result, 1)
	go func() {
		out, code, err := env.hook(ctx, proxyA, "gate", "--json")
		gateA <- result{out, code, err}
	}()

	// --probe answers at once: not ready yet.
	out, code, err := env.hook(ctx, proxyA, "gate", "--probe", "--json")
	require.NoError(t, err)
	assert.Equal(t, int32(1), code, "probe before ready: %s", out)
	assert.Equal(t, GateNotReady, parseGate(t, out).Outcome)

	// Pod B has no sidecars: its gate opens at once and names pod B, while
	// pod A is still waiting. Nothing in the request can name another pod.
	specB := critest.PodSpec{Name: "other", Containers: []critest.ContainerSpec{{
		Name: "app", Image: testimages.App, Mounts: env.mounts(t.TempDir()),
	}}}
	podB := env.rt.StartPod(t, specB)
	out, code, err = env.hook(ctx, podB.ContainerID("app"), "gate", "--json")
	require.NoError(t, err)
	require.Equal(t, int32(0), code, out)
	gb := parseGate(t, out)
	assert.Equal(t, podKey(podB), gb.Pod)
	assert.Equal(t, GateReady, gb.Outcome)
	select {
	case r := <-gateA:
		t.Fatalf("pod A's gate returned before its sidecar was ready: %+v", r)
	default:
	}

	// A process outside any pod (this test) is refused.
	_, err = AskGate(ctx, env.config().Node.Kubernetes.GateSocket, true)
	var api *APIError
	require.True(t, errors.As(err, &api), "want an API error, got %v", err)
	assert.Equal(t, http.StatusForbidden, api.Status)
	assert.Contains(t, api.Message, "not in a pod")

	r := <-gateA
	require.NoError(t, r.err)
	require.Equal(t, int32(0), r.code, r.out)
	g := parseGate(t, r.out)
	assert.Equal(t, GateReady, g.Outcome)
	assert.Equal(t, podKey(podA), g.Pod)
	assert.Equal(t, "proxy", g.Container)
	ready := readyAt(t, outA)
	returned := time.Unix(0, g.At)
	assert.False(t, returned.Before(ready), "gate returned at %s, before the sidecar was ready at %s", returned, ready)
	// Generous: the figure is measured by BenchmarkKubeNode.
	assert.Less(t, returned.Sub(ready), time.Second, "gate reaction")
	t.Logf("gate reaction (sidecar ready -> gate returned): %s", returned.Sub(ready))

	out, code, err = env.hook(ctx, proxyA, "gate", "--probe", "--json")
	require.NoError(t, err)
	assert.Equal(t, int32(0), code, "probe after ready: %s", out)
	assert.Len(t, rec.find(EvGateOpen, podKey(podA), ""), 1)
	assert.Empty(t, rec.find(EvStartupTimeout, podKey(podA), ""))
	_ = a
}

// TestKubeGateTimeout: a sidecar that never gets ready makes the gate
// follow the pod's policy, and the agent records one startup-timeout event.
func TestKubeGateTimeout(t *testing.T) {
	critest.CheckLeaks(t)
	env := newKubeEnv(t, critest.Socket(t, critest.V2))
	_, rec := env.startAgent()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, tc := range []struct {
		policy string
		code   int32
		want   string
	}{
		{FailOpen, 0, GateTimeoutOpen},
		{FailClosed, 1, GateTimeoutClosed},
	} {
		t.Run(tc.policy, func(t *testing.T) {
			spec, _ := env.podSpec("timeout", time.Hour, map[string]string{
				AnnoStartupTimeout: "2s", AnnoStartupPolicy: tc.policy,
			})
			spec.Containers = spec.Containers[:1]
			pod := env.rt.StartPod(t, spec)
			out, code, err := env.hook(ctx, pod.ContainerID("proxy"), "gate", "--json")
			require.NoError(t, err)
			assert.Equal(t, tc.code, code, out)
			assert.Equal(t, tc.want, parseGate(t, out).Outcome)
			evs := rec.find(EvStartupTimeout, podKey(pod), "")
			require.Len(t, evs, 1)
			assert.Equal(t, tc.policy, evs[0].Fields["policy"])
		})
	}
}

// TestKubeRestartAlone: a hung sidecar (alive, /ready failing) is stopped
// through containerd while the app's task keeps its pid; the test, playing
// kubelet, recreates it and the agent records the restart with its cause
// and count. An operator restart goes the same way; with the auto-restart
// switch off a hang is only reported.
func TestKubeRestartAlone(t *testing.T) { forLanes(t, testKubeRestartAlone) }

func testKubeRestartAlone(t *testing.T, lane critest.Lane) {
	critest.CheckLeaks(t)
	env := newKubeEnv(t, critest.Socket(t, lane))
	a, rec := env.startAgent()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	spec, _ := env.podSpec("hang", 0, nil)
	pod := env.rt.StartPod(t, spec)
	key := podKey(pod)
	appPID, err := env.rt.PID(ctx, pod.ContainerID("app"))
	require.NoError(t, err)
	waitUntil(t, 30*time.Second, "sidecar ready", func() bool {
		st, _ := kubeStatus(a, pod)
		return containerOf(st, "proxy").Ready
	})
	ip, err := env.rt.PodIP(ctx, pod)
	require.NoError(t, err)
	hang := func() {
		t.Helper()
		resp, err := http.Post("http://"+net.JoinHostPort(ip, "15021")+"/hang", "text/plain", nil)
		require.NoError(t, err)
		resp.Body.Close()
	}
	// kubelet's part: once the sidecar exited, start it again (attempt n).
	recreate := func(attempt uint32) {
		t.Helper()
		old := pod.ContainerID("proxy")
		waitUntil(t, 30*time.Second, "sidecar stopped", func() bool {
			st, err := env.rt.ContainerState(ctx, old)
			return err == nil && st.String() == "CONTAINER_EXITED"
		})
		cs := spec.Containers[0]
		cs.Attempt = attempt
		_, err := env.rt.StartContainer(ctx, pod, cs)
		require.NoError(t, err)
		waitUntil(t, 30*time.Second, "new sidecar ready", func() bool {
			st, _ := kubeStatus(a, pod)
			c := containerOf(st, "proxy")
			return c.Ready && c.Restarts == int(attempt)
		})
	}
	checkApp := func() {
		t.Helper()
		pid, err := env.rt.PID(ctx, pod.ContainerID("app"))
		require.NoError(t, err)
		assert.Equal(t, appPID, pid, "the app's task was touched")
	}

	hang()
	waitUntil(t, 30*time.Second, "hang stop", func() bool { return len(rec.find(EvStop, key, "proxy")) == 1 })
	assert.Equal(t, CauseHang, rec.find(EvStop, key, "proxy")[0].Reason)
	require.Len(t, rec.find(EvHang, key, "proxy"), 1)
	recreate(1)
	checkApp()
	restarts := rec.find(EvRestart, key, "proxy")
	require.Len(t, restarts, 1)
	assert.Equal(t, CauseHang, restarts[0].Fields["cause"])
	assert.Equal(t, "1", restarts[0].Fields["restartCount"])

	// The operator, through the admin API as `meshagent ctl restart ns/pod/proxy`.
	require.NoError(t, NewClient(env.config().Node.AdminSocket).Restart(ctx, key, "proxy"))
	recreate(2)
	checkApp()
	restarts = rec.find(EvRestart, key, "proxy")
	require.Len(t, restarts, 2)
	assert.Equal(t, CauseOperator, restarts[1].Fields["cause"])
	assert.Equal(t, "2", restarts[1].Fields["restartCount"])

	// A crash (killed from the node) is kubelet's restart; the agent
	// records it with its cause.
	st0, _ := kubeStatus(a, pod)
	require.NoError(t, syscall.Kill(containerOf(st0, "proxy").PID, syscall.SIGKILL))
	recreate(3)
	checkApp()
	restarts = rec.find(EvRestart, key, "proxy")
	require.Len(t, restarts, 3)
	assert.Equal(t, CauseCrash, restarts[2].Fields["cause"])
	assert.Equal(t, "3", restarts[2].Fields["restartCount"])
	assert.Len(t, rec.find(EvStop, key, "proxy"), 2, "a crash is not the agent's stop")
	// The restarts are in the metrics too, by cause.
	m, err := NewClient(env.config().Node.AdminSocket).Metrics(ctx)
	require.NoError(t, err)
	for _, cause := range []string{CauseHang, CauseOperator, CauseCrash} {
		assert.Contains(t, string(m), `meshagent_sidecar_restarts_total{cause="`+cause+`",container="proxy",pod="`+key+`"} 1`)
	}

	// auto-restart off: the hang is reported, the sidecar left alone.
	_, err = a.SetSwitch(ctx, SwitchAutoRestart, false, 0)
	require.NoError(t, err)
	hang()
	waitUntil(t, 30*time.Second, "hang report", func() bool { return len(rec.find(EvHang, key, "proxy")) == 2 })
	assert.Contains(t, rec.find(EvHang, key, "proxy")[1].Reason, "auto-restart switch is off")
	time.Sleep(time.Second)
	assert.Len(t, rec.find(EvStop, key, "proxy"), 2, "no stop while auto-restart is off")
	st, err := env.rt.ContainerState(ctx, pod.ContainerID("proxy"))
	require.NoError(t, err)
	assert.Equal(t, "CONTAINER_RUNNING", st.String())
	checkApp()
	assert.Empty(t, rec.find(EvStop, key, "app"))
}

// TestKubeHold: `meshagent hold`, run in the sidecar as its preStop hook,
// returns only once the app has exited.
func TestKubeHold(t *testing.T) { forLanes(t, testKubeHold) }

func testKubeHold(t *testing.T, lane critest.Lane) {
	critest.CheckLeaks(t)
	env := newKubeEnv(t, critest.Socket(t, lane))
	a, _ := env.startAgent()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	spec, _ := env.podSpec("hold", 0, nil)
	pod := env.rt.StartPod(t, spec)
	waitUntil(t, 30*time.Second, "pod running", func() bool {
		st, _ := kubeStatus(a, pod)
		return st.Phase == PhaseRunning && containerOf(st, "app").State == StateRunning
	})
	type result struct {
		out string
		at  time.Time
		err error
	}
	held := make(chan result, 1)
	go func() {
		out, _, err := env.hook(ctx, pod.ContainerID("proxy"), "hold", "--json")
		held <- result{out, time.Now(), err}
	}()
	select {
	case r := <-held:
		t.Fatalf("hold returned while the app runs: %+v", r)
	case <-time.After(2 * time.Second):
	}
	require.NoError(t, env.rt.StopContainer(ctx, pod.ContainerID("app"), 10*time.Second))
	stopped := time.Now()
	r := <-held
	require.NoError(t, r.err)
	assert.Contains(t, r.out, `"drained":true`)
	assert.False(t, r.at.Before(stopped.Add(-time.Second)), "hold returned before the app stopped")
}

// TestKubeJob: once a Job's app has exited, the agent stops its sidecar so
// the Job can complete.
func TestKubeJob(t *testing.T) { forLanes(t, testKubeJob) }

func testKubeJob(t *testing.T, lane critest.Lane) {
	critest.CheckLeaks(t)
	env := newKubeEnv(t, critest.Socket(t, lane))
	a, rec := env.startAgent()
	spec, _ := env.podSpec("job", 0, map[string]string{AnnoJob: "true"})
	spec.Containers[1].Env["APP_EXIT_AFTER"] = "2s"
	pod := env.rt.StartPod(t, spec)
	key := podKey(pod)
	waitUntil(t, 30*time.Second, "job's sidecar stopped", func() bool {
		st, _ := kubeStatus(a, pod)
		return containerOf(st, "proxy").State == StateExited
	})
	st, _ := kubeStatus(a, pod)
	assert.Equal(t, StateExited, containerOf(st, "app").State)
	stops := rec.find(EvStop, key, "proxy")
	require.Len(t, stops, 1)
	assert.Equal(t, CauseJob, stops[0].Reason)
	assert.Contains(t, containerOf(st, "proxy").LastExit, "("+CauseJob+")")
}

// TestKubeSurvivesRestarts: the agent killed (SIGKILL, a separate process)
// and started again, then containerd restarted: the pod model comes back,
// no stop is repeated, the app keeps its pid and the gate still answers.
func TestKubeSurvivesRestarts(t *testing.T) {
	critest.CheckLeaks(t)
	d := critest.StartDaemon(t, critest.V2)
	env := newKubeEnv(t, d.Socket)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	spec, _ := env.podSpec("survive", 0, map[string]string{AnnoJob: "true"})
	spec.Containers[1].Env["APP_EXIT_AFTER"] = "1s"
	job := env.rt.StartPod(t, spec)
	spec2, _ := env.podSpec("steady", 0, nil)
	steady := env.rt.StartPod(t, spec2)
	appPID, err := env.rt.PID(ctx, steady.ContainerID("app"))
	require.NoError(t, err)

	cfgPath := writeKubeConfig(t, env)
	admin := NewClient(env.config().Node.AdminSocket)
	stops := func() int { // by the agent now answering, for any pod
		evs, err := admin.Events(ctx, 0, 10000, "")
		require.NoError(t, err)
		n := 0
		for _, e := range evs {
			if e.Type == EvStop {
				n++
			}
		}
		return n
	}
	jobDone := func() bool {
		p, err := admin.Pod(ctx, podKey(job))
		return err == nil && containerOf(p, "proxy").State == StateExited
	}

	agent1 := startAgentProcess(t, cfgPath)
	waitUntil(t, 30*time.Second, "job's sidecar stopped by agent 1", jobDone)
	assert.Equal(t, 1, stops())
	agent1.kill()

	agent2 := startAgentProcess(t, cfgPath)
	waitUntil(t, 30*time.Second, "agent 2 sees both pods", func() bool {
		p, err := admin.Pod(ctx, podKey(steady))
		return err == nil && containerOf(p, "proxy").Ready && jobDone()
	})
	assert.Equal(t, 0, stops(), "agent 2 stopped something again")

	d.Restart(t)
	waitUntil(t, 60*time.Second, "agent 2 back on containerd", func() bool {
		evs, err := admin.Events(ctx, 0, 10000, "")
		if err != nil {
			return false
		}
		for _, e := range evs {
			if e.Type == EvContainerd && strings.Contains(e.Reason, "resynchronised") {
				return true
			}
		}
		return false
	})
	assert.Equal(t, 0, stops(), "containerd restart made agent 2 act again")
	pid, err := env.rt.PID(ctx, steady.ContainerID("app"))
	require.NoError(t, err)
	assert.Equal(t, appPID, pid)
	out, code, err := env.hook(ctx, steady.ContainerID("proxy"), "gate", "--json")
	require.NoError(t, err)
	require.Equal(t, int32(0), code, out)
	assert.Equal(t, GateReady, parseGate(t, out).Outcome)
	agent2.stop()
}

func writeKubeConfig(t *testing.T, env *kubeEnv) string {
	t.Helper()
	c := env.config()
	y := "node:\n" +
		"  adminSocket: " + c.Node.AdminSocket + "\n" +
		"  stateDir: " + c.Node.StateDir + "\n" +
		"  metricsAddr: \"off\"\n" +
		"  kubernetes:\n" +
		"    containerd: " + c.Node.Kubernetes.Containerd + "\n" +
		"    gateSocket: " + c.Node.Kubernetes.GateSocket + "\n" +
		"pods: []\n"
	path := env.dir + "/config.yaml"
	require.NoError(t, os.WriteFile(path, []byte(y), 0o600))
	return path
}

// agentProcess is an agent in a child process (the test binary, see
// TestMain), so it can be SIGKILLed.
type agentProcess struct {
	t   *testing.T
	cmd *exec.Cmd
}

func startAgentProcess(t *testing.T, cfgPath string) *agentProcess {
	t.Helper()
	self, err := os.Executable()
	require.NoError(t, err)
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), "MESHAGENT_TEST_CHILD=agent", "AGENT_CONFIG="+cfgPath)
	if testing.Verbose() {
		cmd.Stderr = os.Stderr
	}
	require.NoError(t, cmd.Start())
	p := &agentProcess{t: t, cmd: cmd}
	t.Cleanup(p.kill)
	cfg, err := LoadConfig(cfgPath)

	require.NoError(t, err)
	waitUntil(t, 30*time.Second, "agent process serves its admin socket", func() bool {
		_, err := NewClient(cfg.Node.AdminSocket).Pods(context.Background())
		return err == nil
	})
	return p
}

func (p *agentProcess) kill() {
	if p.cmd.ProcessState != nil {
		return
	}
	_ = p.cmd.Process.Kill()
	_ = p.cmd.Wait()
}

func (p *agentProcess) stop() {
	if p.cmd.ProcessState != nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	_ = p.cmd.Wait()
}

// TestKubeProbeKinds: each kind of readiness check works against a real
// container: tcp inside the pod's network namespace, exec in the
// container's namespaces (nsenter; the binary exists only in the
// container's mounts), unix through the container's root (the pod's view of
// the node's gate socket), and a failing exec keeps its sidecar, and so the
// pod's gate, not ready.
func TestKubeProbeKinds(t *testing.T) {
	critest.CheckLeaks(t)
	env := newKubeEnv(t, critest.Socket(t, critest.V2))
	a, _ := env.startAgent()
	out := t.TempDir()
	sidecar := func(name, port string) critest.ContainerSpec {
		return critest.ContainerSpec{Name: name, Image: testimages.Sidecar, Env: map[string]string{"SIDECAR_PORT": port}, Mounts: env.mounts(out)}
	}
	pod := env.rt.StartPod(t, critest.PodSpec{
		Name: "probes", PodNetwork: true,
		Annotations: map[string]string{
			AnnoSidecars:                 "tcp,exec,unix,bad",
			AnnoReadinessPrefix + "tcp":  "tcp:15031",
			AnnoReadinessPrefix + "exec": "exec:" + gatePortal + " version",
			AnnoReadinessPrefix + "unix": "unix:" + podRunDir + "/gate.sock",
			AnnoReadinessPrefix + "bad":  "exec:" + gatePortal + " no-such-command",
			AnnoStartupInterval:          "50ms",
		},
		Containers: []critest.ContainerSpec{sidecar("tcp", "15031"), sidecar("exec", "15032"), sidecar("unix", "15033"), sidecar("bad", "15034")},
	})
	waitUntil(t, 30*time.Second, "tcp, exec and unix checks pass", func() bool {
		st, _ := kubeStatus(a, pod)
		return containerOf(st, "tcp").Ready && containerOf(st, "exec").Ready && containerOf(st, "unix").Ready
	})
	time.Sleep(time.Second) // the failing check has run many times by now
	st, _ := kubeStatus(a, pod)
	assert.False(t, containerOf(st, "bad").Ready, "a failing exec check passed")
	assert.Equal(t, StateRunning, containerOf(st, "bad").State)
	assert.Equal(t, PhasePending, st.Phase)
}

// TestKubeGateAcrossAgentRestart: a postStart hook waiting while the agent
// is SIGKILLed and started again reconnects and opens when the sidecar is
// ready, as seen by the new agent.
func TestKubeGateAcrossAgentRestart(t *testing.T) {
	critest.CheckLeaks(t)
	env := newKubeEnv(t, critest.Socket(t, critest.V2))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cfgPath := writeKubeConfig(t, env)
	agent1 := startAgentProcess(t, cfgPath)

	spec, out := env.podSpec("regate", 4*time.Second, nil)
	spec.Containers = spec.Containers[:1]
	pod := env.rt.StartPod(t, spec)
	type result struct {
		out  string
		code int32
		err  error
	}
	done := make(chan result, 1)
	go func() {
		out, code, err := env.hook(ctx, pod.ContainerID("proxy"), "gate", "--json")
		done <- result{out, code, err}
	}()
	time.Sleep(time.Second)
	agent1.kill()
	agent2 := startAgentProcess(t, cfgPath)
	defer agent2.stop()

	r := <-done
	require.NoError(t, r.err)
	require.Equal(t, int32(0), r.code, r.out)
	g := parseGate(t, r.out)
	assert.Equal(t, GateReady, g.Outcome)
	assert.False(t, time.Unix(0, g.At).Before(readyAt(t, out)), "gate opened before the sidecar was ready")
}
