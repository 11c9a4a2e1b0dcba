package agent

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var (
	switchesOn       = InSwitches{AutoRestart: true, StartupGate: true}
	autoRestartOff   = InSwitches{AutoRestart: false, StartupGate: true}
	startupGateOff   = InSwitches{AutoRestart: true, StartupGate: false}
	restartCausesFor = func(acts []Action) []string {
		var out []string
		for _, e := range eventsOf(acts, EvRestart) {
			out = append(out, e.Fields["cause"])
		}
		return out
	}
)

func TestMachineAutoRestartOffLeavesExitsDown(t *testing.T) {
	for _, tc := range []struct {
		name string
		exit Input
	}{
		{"sidecar crash", InExited{Container: "proxy", PID: 10, Status: "killed by SIGKILL", Failed: true}},
		{"app crash", InExited{Container: "app", PID: 20, Status: "exit status 1", Failed: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDriver(t, testPod())
			d.ready()
			d.in(autoRestartOff)
			acts := d.in(tc.exit)
			name := tc.exit.(InExited).Container
			assert.Empty(t, starts(acts), "nothing restarts while auto-restart is off")
			assert.Empty(t, actionsOf[ActTimer](acts), "no backoff either")
			held := eventsOf(acts, EvRestartHeld)
			require.Len(t, held, 1, "the held restart is visible")
			assert.Equal(t, CauseCrash, held[0].Fields["cause"])
			assert.Equal(t, StateExited, d.state(name))

			// Back on: what was held starts again, recorded as a restart.
			acts = d.in(switchesOn)
			assert.Equal(t, []string{name}, starts(acts))
			assert.Equal(t, []string{CauseCrash}, restartCausesFor(acts))
		})
	}
}

func TestMachineAutoRestartOffStillObeysOperator(t *testing.T) {
	d := newDriver(t, testPod())
	d.ready()
	d.in(autoRestartOff)
	d.in(InRestart{Container: "proxy", Cause: CauseOperator})
	acts := d.in(InExited{Container: "proxy", PID: 10, Failed: true})
	assert.Equal(t, []string{"proxy"}, starts(acts), "an operator restart is not automatic")

	// A held container restarted by hand is no longer held.
	d.in(InStarted{Container: "proxy", PID: 11})
	d.in(InExited{Container: "proxy", PID: 11, Failed: true})
	assert.Equal(t, StateExited, d.state("proxy"))
	acts = d.in(InRestart{Container: "proxy", Cause: CauseOperator})
	assert.Equal(t, []string{"proxy"}, starts(acts))
	d.in(InStarted{Container: "proxy", PID: 12})
	assert.Empty(t, starts(d.in(switchesOn)), "nothing left to release")
}

func TestMachineAutoRestartOffCancelsPendingBackoff(t *testing.T) {
	d := newDriver(t, testPod())
	d.ready()
	d.in(InExited{Container: "proxy", PID: 10, Failed: true})
	d.in(InStarted{Container: "proxy", PID: 11})
	acts := d.after(time.Second, InExited{Container: "proxy", PID: 11, Failed: true})
	require.Equal(t, StateBackoff, d.state("proxy"))
	timer := actionsOf[ActTimer](acts)[0].Timer
	d.in(autoRestartOff)
	acts = d.after(time.Second, timer)
	assert.Empty(t, starts(acts))
	assert.Equal(t, StateExited, d.state("proxy"))
	assert.Len(t, eventsOf(acts, EvRestartHeld), 1)
}

func TestMachineAutoRestartOffLeavesHungSidecarAlone(t *testing.T) {
	d := newDriver(t, testPod())
	d.ready()
	d.in(autoRestartOff)
	var hangs int
	for i := 1; i <= 6; i++ {
		acts := d.in(InProbe{Container: "proxy", PID: 10, OK: false, Failures: i, Err: "timeout"})
		assert.Empty(t, actionsOf[ActSignal](acts), "no stop signal")
		hangs += len(eventsOf(acts, EvHang))
	}
	assert.Equal(t, 1, hangs, "the hang is reported once")
}

func TestMachineStartupGateOff(t *testing.T) {
	t.Run("before start", func(t *testing.T) {
		d := newDriver(t, testPod())
		d.in(startupGateOff)
		acts := d.in(InStart{})
		assert.Equal(t, []string{"proxy", "app"}, starts(acts), "sidecar first, app without waiting")
		gate := eventsOf(acts, EvGateOpen)
		require.Len(t, gate, 1)
		assert.Equal(t, "true", gate[0].Fields["forced"])
		assert.Equal(t, PhaseRunning, d.m.Phase)
	})
	for _, phase := range []Phase{PhasePending, PhaseFailed} {
		t.Run("while "+string(phase), func(t *testing.T) {
			d := newDriver(t, testPod(func(p *PodSpec) { p.Startup.OnTimeout = FailClosed }))
			timer := actionsOf[ActTimer](d.in(InStart{}))[0].Timer
			d.in(InStarted{Container: "proxy", PID: 10})
			if phase == PhaseFailed {
				d.after(10*time.Second, timer)
			}
			require.Equal(t, phase, d.m.Phase)
			acts := d.in(startupGateOff)
			assert.Equal(t, []string{"app"}, starts(acts))
			assert.Equal(t, PhaseRunning, d.m.Phase)
		})
	}
	t.Run("back on does not stop apps", func(t *testing.T) {
		d := newDriver(t, testPod())
		d.in(startupGateOff)
		d.in(InStart{})
		acts := d.in(switchesOn)
		assert.Empty(t, actionsOf[ActSignal](acts))
		assert.Equal(t, PhaseRunning, d.m.Phase)
	})
}
