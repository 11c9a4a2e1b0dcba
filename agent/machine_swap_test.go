package agent

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMachineSwap(t *testing.T) {
	d := newDriver(t, testPod())
	d.ready()
	acts := d.in(InSwap{Container: "proxy", Old: 10, PID: 11})
	c, _ := d.m.Container("proxy")
	assert.Equal(t, 11, c.PID)
	assert.Equal(t, StateReady, c.State)
	assert.Equal(t, 1, c.Restarts)
	rs := eventsOf(acts, EvRestart)
	require.Len(t, rs, 1)
	assert.Equal(t, CauseUpgrade, rs[0].Fields["cause"])
	assert.Equal(t, "10", rs[0].Fields["oldPid"])
	probes := actionsOf[ActProbe](acts)
	require.Len(t, probes, 2)
	assert.Equal(t, ActProbe{Container: "proxy", PID: 10, On: false}, probes[0])
	assert.Equal(t, ActProbe{Container: "proxy", PID: 11, On: true}, probes[1])
	assert.Empty(t, actionsOf[ActSignal](acts), "stopping the old process is the runner's business")

	// The old process's exit is stale; the new one's is a crash.
	assert.Empty(t, d.in(InExited{Container: "proxy", PID: 10, Status: "exit status 0"}))
	assert.Equal(t, 11, func() int { c, _ := d.m.Container("proxy"); return c.PID }())
	acts = d.in(InExited{Container: "proxy", PID: 11, Status: "exit status 3", Failed: true})
	assert.Equal(t, []string{"proxy"}, starts(acts))
	app, _ := d.m.Container("app")
	assert.Equal(t, 20, app.PID, "the app is not touched")
}

func TestMachineSwapRefused(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(d *driver)
		in    InSwap
	}{
		{"old pid no longer the container's", func(d *driver) {}, InSwap{Container: "proxy", Old: 9, PID: 11}},
		{"same pid", func(d *driver) {}, InSwap{Container: "proxy", Old: 10, PID: 10}},
		{"unknown container", func(d *driver) {}, InSwap{Container: "nope", Old: 10, PID: 11}},
		{"pod stopping", func(d *driver) { d.in(InStop{}) }, InSwap{Container: "proxy", Old: 10, PID: 11}},
		{"sidecar stopping", func(d *driver) { d.in(InRestart{Container: "proxy", Cause: CauseOperator}) }, InSwap{Container: "proxy", Old: 10, PID: 11}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDriver(t, testPod())
			d.ready()
			tc.setup(d)
			before, _ := d.m.Container("proxy")
			assert.Empty(t, d.in(tc.in))
			after, _ := d.m.Container("proxy")
			assert.Equal(t, before.PID, after.PID)
			assert.Equal(t, before.Restarts, after.Restarts)
		})
	}
}
