package agent

import (
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func testPod(mut ...func(*PodSpec)) *PodSpec {
	p := &PodSpec{
		Name:    "web",
		Startup: StartupPolicy{Timeout: Duration(10 * time.Second)},
		Containers: []ContainerSpec{
			{Name: "proxy", Role: RoleSidecar, Command: "proxy", Readiness: &Readiness{TCP: "127.0.0.1:1"}},
			{Name: "app", Role: RoleApp, Command: "app"},
		},
	}
	for _, m := range mut {
		m(p)
	}
	p.setDefaults()
	return p
}

func actionsOf[T Action](acts []Action) []T {
	var out []T
	for _, a := range acts {
		if t, ok := a.(T); ok {
			out = append(out, t)
		}
	}
	return out
}

func eventsOf(acts []Action, typ string) []Event {
	var out []Event
	for _, e := range actionsOf[ActEvent](acts) {
		if e.Event.Type == typ {
			out = append(out, e.Event)
		}
	}
	return out
}

func starts(acts []Action) []string {
	var out []string
	for _, a := range actionsOf[ActStart](acts) {
		out = append(out, a.Container)
	}
	return out
}

// driver feeds a machine and keeps the clock.
type driver struct {
	t   *testing.T
	m   *Machine
	now time.Time
}

func newDriver(t *testing.T, p *PodSpec) *driver {
	return &driver{t: t, m: NewMachine(p), now: time.Unix(1000, 0)}
}

func (d *driver) in(in Input) []Action { return d.m.Handle(d.now, in) }

func (d *driver) after(dt time.Duration, in Input) []Action {
	d.now = d.now.Add(dt)
	return d.in(in)
}

func (d *driver) state(name string) State {
	c, ok := d.m.Container(name)
	require.True(d.t, ok)
	return c.State
}

// ready brings the pod to running: sidecar proxy pid 10 ready, app pid 20.
func (d *driver) ready() {
	d.in(InStart{})
	d.in(InStarted{Container: "proxy", PID: 10})
	acts := d.in(InProbe{Container: "proxy", PID: 10, OK: true})
	require.Equal(d.t, []string{"app"}, starts(acts))
	d.in(InStarted{Container: "app", PID: 20})
	require.Equal(d.t, PhaseRunning, d.m.Phase)
}

func TestMachineSidecarFirst(t *testing.T) {
	d := newDriver(t, testPod())
	acts := d.in(InStart{})
	assert.Equal(t, []string{"proxy"}, starts(acts), "only the sidecar starts")
	assert.Equal(t, PhasePending, d.m.Phase)
	timers := actionsOf[ActTimer](acts)
	require.Len(t, timers, 1)
	assert.Equal(t, TimerStartup, timers[0].Timer.Kind)

	acts = d.in(InStarted{Container: "proxy", PID: 10})
	assert.Empty(t, starts(acts), "started is not ready")
	require.Len(t, actionsOf[ActProbe](acts), 1)

	acts = d.in(InProbe{Container: "proxy", PID: 10, OK: false, Failures: 1})
	assert.Empty(t, starts(acts), "a failing probe keeps the gate shut")

	acts = d.after(300*time.Millisecond, InProbe{Container: "proxy", PID: 10, OK: true})
	assert.Equal(t, []string{"app"}, starts(acts), "ready sidecar opens the gate")
	gate := eventsOf(acts, EvGateOpen)
	require.Len(t, gate, 1)
	assert.Equal(t, 300*time.Millisecond, gate[0].Duration)
	assert.Equal(t, PhaseRunning, d.m.Phase)
}

func TestMachineNoSidecarsStartsAppsAtOnce(t *testing.T) {
	d := newDriver(t, testPod(func(p *PodSpec) { p.Containers = p.Containers[1:] }))
	assert.Equal(t, []string{"app"}, starts(d.in(InStart{})))
	assert.Equal(t, PhaseRunning, d.m.Phase)
}

func TestMachineStartupTimeout(t *testing.T) {
	for _, tc := range []struct {
		policy    string
		wantApps  []string
		wantPhase Phase
	}{
		{FailOpen, []string{"app"}, PhaseRunning},
		{FailClosed, nil, PhaseFailed},
	} {
		t.Run(tc.policy, func(t *testing.T) {
			d := newDriver(t, testPod(func(p *PodSpec) { p.Startup.OnTimeout = tc.policy }))
			timer := actionsOf[ActTimer](d.in(InStart{}))[0].Timer
			d.in(InStarted{Container: "proxy", PID: 10})
			acts := d.after(10*time.Second, timer)
			assert.Equal(t, tc.wantApps, starts(acts))
			assert.Equal(t, tc.wantPhase, d.m.Phase)
			ev := eventsOf(acts, EvStartupTimeout)
			require.Len(t, ev, 1, "a timeout is never silent")
			assert.Equal(t, tc.policy, ev[0].Fields["policy"])
			assert.Contains(t, ev[0].Reason, "proxy")

			// A sidecar that gets ready late still lets a failClosed pod recover.
			acts = d.after(time.Second, InProbe{Container: "proxy", PID: 10, OK: true})
			if tc.policy == FailClosed {
				assert.Equal(t, []string{"app"}, starts(acts))
			} else {
				assert.Empty(t, starts(acts), "apps already run")
			}
			assert.Equal(t, PhaseRunning, d.m.Phase)
		})
	}
}

func TestMachineStaleStartupTimerIgnored(t *testing.T) {
	d := newDriver(t, testPod(func(p *PodSpec) { p.Startup.OnTimeout = FailClosed }))
	timer := actionsOf[ActTimer](d.in(InStart{}))[0].Timer
	d.in(InStarted{Container: "proxy", PID: 10})
	d.in(InProbe{Container: "proxy", PID: 10, OK: true})
	acts := d.after(10*time.Second, timer)
	assert.Empty(t, eventsOf(acts, EvStartupTimeout))
	assert.Equal(t, PhaseRunning, d.m.Phase)
}

func TestMachineSidecarCrashRestartsAlone(t *testing.T) {
	d := newDriver(t, testPod())
	d.ready()
	acts := d.in(InExited{Container: "proxy", PID: 10, Status: "exit status 2", Failed: true})
	assert.Equal(t, []string{"proxy"}, starts(acts), "first restart is immediate and alone")
	assert.Empty(t, actionsOf[ActSignal](acts), "the app is not touched")
	restart := eventsOf(acts, EvRestart)
	require.Len(t, restart, 1)
	assert.Equal(t, CauseCrash, restart[0].Fields["cause"])
	app, _ := d.m.Container("app")
	assert.Equal(t, 20, app.PID)
	assert.Equal(t, StateReady, app.State)

	// Second crash soon after: backoff.
	d.in(InStarted{Container: "proxy", PID: 11})
	acts = d.after(time.Second, InExited{Container: "proxy", PID: 11, Failed: true})
	assert.Empty(t, starts(acts))
	assert.Equal(t, StateBackoff, d.state("proxy"))
	tm := actionsOf[ActTimer](acts)
	require.Len(t, tm, 1)
	assert.Equal(t, 100*time.Millisecond, tm[0].After)
	acts = d.after(100*time.Millisecond, tm[0].Timer)
	assert.Equal(t, []string{"proxy"}, starts(acts))
}

func TestBackoff(t *testing.T) {
	rp := RestartPolicy{InitialBackoff: Duration(100 * time.Millisecond), MaxBackoff: Duration(time.Second)}
	for streak, want := range []time.Duration{0, 100, 200, 400, 800, 1000, 1000} {
		assert.Equal(t, want*time.Millisecond, Backoff(rp, streak), "streak %d", streak)
	}
}

func TestMachineStableRunResetsBackoff(t *testing.T) {
	d := newDriver(t, testPod())
	d.ready()
	d.in(InExited{Container: "proxy", PID: 10, Failed: true})
	acts := d.in(InStarted{Container: "proxy", PID: 11})
	var stable InTimer
	for _, tm := range actionsOf[ActTimer](acts) {
		if tm.Timer.Kind == TimerStable {
			stable = tm.Timer
		}
	}
	require.Equal(t, TimerStable, stable.Kind)
	d.after(61*time.Second, stable)
	acts = d.in(InExited{Container: "proxy", PID: 11, Failed: true})
	assert.Equal(t, []string{"proxy"}, starts(acts), "after a stable run the restart is immediate again")
}

func TestMachineCrashLoopReported(t *testing.T) {
	d := newDriver(t, testPod(func(p *PodSpec) { p.Containers[0].Restart.MaxRestarts = 2 }))
	d.ready()
	pid := 10
	var loops []Event
	for i := 0; i < 4; i++ {
		acts := d.after(time.Second, InExited{Container: "proxy", PID: pid, Failed: true})
		loops = append(loops, eventsOf(acts, EvCrashLoop)...)
		if tm := actionsOf[ActTimer](acts); len(tm) > 0 {
			d.after(tm[0].After, tm[0].Timer)
		}
		pid++
		d.in(InStarted{Container: "proxy", PID: pid})
	}
	require.Len(t, loops, 1, "reported once when it begins")
	c, _ := d.m.Container("proxy")
	assert.True(t, c.CrashLoop)
	assert.Equal(t, 4, c.Restarts)
}

func TestMachineHungSidecarRestartedAlone(t *testing.T) {
	d := newDriver(t, testPod())
	d.ready()
	for f := 1; f < 3; f++ {
		acts := d.in(InProbe{Container: "proxy", PID: 10, OK: false, Failures: f})
		assert.Empty(t, actionsOf[ActSignal](acts), "below the threshold")
	}
	acts := d.in(InProbe{Container: "proxy", PID: 10, OK: false, Failures: 3, Err: "timeout"})
	require.Len(t, eventsOf(acts, EvHang), 1)
	sig := actionsOf[ActSignal](acts)
	require.Len(t, sig, 1)
	assert.Equal(t, ActSignal{Container: "proxy", PID: 10, Sig: syscall.SIGTERM}, sig[0])

	grace := actionsOf[ActTimer](acts)[0]
	assert.Equal(t, TimerGrace, grace.Timer.Kind)
	acts = d.after(grace.After, grace.Timer)
	assert.Equal(t, []Action{ActSignal{Container: "proxy", PID: 10, Sig: syscall.SIGKILL}}, acts)

	acts = d.in(InExited{Container: "proxy", PID: 10, Status: "killed by SIGKILL", Failed: true})
	assert.Equal(t, []string{"proxy"}, starts(acts))
	assert.Equal(t, CauseHang, eventsOf(acts, EvRestart)[0].Fields["cause"])
	app, _ := d.m.Container("app")
	assert.Equal(t, 20, app.PID, "app untouched")
}

// TestMachineStartupFailuresAreNotAHang: a sidecar made ready by READY=1
// while its probe is still failing from the start-up is not hung at the
// probe's next failure; only failures after the readiness count, and a
// real probe success starts the count again.
func TestMachineStartupFailuresAreNotAHang(t *testing.T) {
	d := newDriver(t, testPod())
	d.in(InStart{})
	d.in(InStarted{Container: "proxy", PID: 10})
	for f := 1; f <= 40; f++ { // the fast start-up checks, all failing
		d.in(InProbe{Container: "proxy", PID: 10, OK: false, Failures: f})
	}
	acts := d.in(InProbe{Container: "proxy", PID: 10, OK: true}) // READY=1
	require.Equal(t, []string{"app"}, starts(acts))
	d.in(InStarted{Container: "app", PID: 20})

	for f := 41; f <= 42; f++ {
		acts := d.in(InProbe{Container: "proxy", PID: 10, OK: false, Failures: f})
		assert.Empty(t, eventsOf(acts, EvHang), "failure %d is the %d. since ready", f, f-40)
	}
	acts = d.in(InProbe{Container: "proxy", PID: 10, OK: false, Failures: 43})
	assert.Len(t, eventsOf(acts, EvHang), 1, "three failures since ready are a hang")

	// The same with a probe success in between: its count restarts at 1.
	d = newDriver(t, testPod())
	d.ready()
	d.in(InProbe{Container: "proxy", PID: 10, OK: false, Failures: 1})
	d.in(InProbe{Container: "proxy", PID: 10, OK: false, Failures: 2})
	d.in(InProbe{Container: "proxy", PID: 10, OK: true})
	acts = d.in(InProbe{Container: "proxy", PID: 10, OK: false, Failures: 1})
	assert.Empty(t, eventsOf(acts, EvHang))
	d.in(InProbe{Container: "proxy", PID: 10, OK: false, Failures: 2})
	acts = d.in(InProbe{Container: "proxy", PID: 10, OK: false, Failures: 3})
	assert.Len(t, eventsOf(acts, EvHang), 1)
}

func TestMachineOrderedStop(t *testing.T) {
	d := newDriver(t, testPod())
	d.ready()
	acts := d.in(InStop{})
	sig := actionsOf[ActSignal](acts)
	require.Len(t, sig, 1)
	assert.Equal(t, "app", sig[0].Container, "apps get their signal first")
	assert.Equal(t, PhaseStopping, d.m.Phase)

	acts = d.in(InExited{Container: "app", PID: 20})
	sig = actionsOf[ActSignal](acts)
	require.Len(t, sig, 1)
	assert.Equal(t, "proxy", sig[0].Container, "sidecar only after every app exited")
	assert.Empty(t, starts(acts), "nothing restarts during a stop")

	acts = d.in(InExited{Container: "proxy", PID: 10})
	assert.Empty(t, starts(acts))
	assert.Equal(t, PhaseStopped, d.m.Phase)
}

func TestMachineRestartPod(t *testing.T) {
	d := newDriver(t, testPod())
	d.ready()
	d.in(InRestartPod{})
	d.in(InExited{Container: "app", PID: 20})
	acts := d.in(InExited{Container: "proxy", PID: 10})
	assert.Equal(t, []string{"proxy"}, starts(acts), "starts again, sidecar first")
	assert.Equal(t, PhasePending, d.m.Phase)
	assert.Equal(t, StateWaiting, d.state("app"))
}

func TestMachineOperatorRestart(t *testing.T) {
	d := newDriver(t, testPod())
	d.ready()
	acts := d.in(InRestart{Container: "proxy", Cause: CauseOperator})
	require.Len(t, actionsOf[ActSignal](acts), 1)
	acts = d.in(InExited{Container: "proxy", PID: 10, Status: "exit status 0"})
	assert.Equal(t, []string{"proxy"}, starts(acts))
	assert.Equal(t, CauseOperator, eventsOf(acts, EvRestart)[0].Fields["cause"])
}

func TestMachineOOMCause(t *testing.T) {
	d := newDriver(t, testPod())
	d.ready()
	acts := d.in(InOOM{Container: "proxy"})
	require.Len(t, eventsOf(acts, EvOOMKill), 1)
	acts = d.in(InExited{Container: "proxy", PID: 10, Status: "killed by SIGKILL", Failed: true})
	assert.Equal(t, CauseOOM, eventsOf(acts, EvRestart)[0].Fields["cause"])
	assert.Equal(t, []string{"proxy"}, starts(acts))
}

func TestMachineAppRestartPolicy(t *testing.T) {
	for _, tc := range []struct {
		policy string
		failed bool
		want   []string
	}{
		{"always", false, []string{"app"}},
		{"on-failure", false, nil},
		{"on-failure", true, []string{"app"}},
		{"never", true, nil},
	} {
		t.Run(tc.policy, func(t *testing.T) {
			d := newDriver(t, testPod(func(p *PodSpec) { p.Containers[1].Restart.Policy = tc.policy }))
			d.ready()
			acts := d.in(InExited{Container: "app", PID: 20, Failed: tc.failed})
			assert.Equal(t, tc.want, starts(acts))
			assert.Empty(t, actionsOf[ActSignal](acts), "the sidecar is not touched")
		})
	}
}

func TestMachineIgnoresStaleInputs(t *testing.T) {
	d := newDriver(t, testPod())
	d.ready()
	d.in(InExited{Container: "proxy", PID: 10, Failed: true})
	d.in(InStarted{Container: "proxy", PID: 11})
	assert.Empty(t, d.in(InProbe{Container: "proxy", PID: 10, OK: true}), "probe of the old process")
	assert.Empty(t, d.in(InExited{Container: "proxy", PID: 10}), "second exit of the old process")
	assert.Empty(t, d.in(InExited{Container: "nope", PID: 10}))
}

func TestMachineAdoptedAppsKeepRunning(t *testing.T) {
	d := newDriver(t, testPod())
	d.m.Adopt("app", 20, 3, d.now)
	acts := d.in(InStart{})
	assert.Equal(t, []string{"proxy"}, starts(acts), "dead sidecar restarted, adopted app not duplicated")
	assert.Equal(t, PhaseRunning, d.m.Phase)
	app, _ := d.m.Container("app")
	assert.Equal(t, 20, app.PID)
	assert.Equal(t, 3, app.Restarts)
}

func TestMachineStartFailure(t *testing.T) {
	d := newDriver(t, testPod())
	d.in(InStart{})
	acts := d.in(InStarted{Container: "proxy", Err: errors.New("no such file")})
	require.Len(t, eventsOf(acts, EvStartFailed), 1)
	assert.Equal(t, []string{"proxy"}, starts(acts), "a failed start is retried like a crash")
}
