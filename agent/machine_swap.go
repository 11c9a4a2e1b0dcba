package agent

import "strconv"

// InSwap hands a container over to a process the runner started beside the
// running one and found ready (a hot upgrade): the machine adopts PID as
// the container's process. The old process's later exit no longer matches
// the container's pid and is ignored, so stopping it is the runner's
// business, not a restart. The swap is refused (no actions, the pid stays)
// unless the container is running or ready with the process Old in a pod
// that is not stopping; the runner then kills the new process.
type InSwap struct {
	Container string
	Old       int // the process the new one replaces
	PID       int
}

func (InSwap) input() {}

func (m *Machine) swap(o *out, in InSwap) {
	c := m.get(in.Container)
	if c == nil || c.PID == 0 || c.PID != in.Old || in.PID <= 0 || in.PID == c.PID ||
		m.Phase == PhaseStopping || m.Phase == PhaseStopped ||
		(c.State != StateRunning && c.State != StateReady) {
		return
	}
	old := c.PID
	o.do(ActProbe{Container: c.Name, PID: old, On: false})
	c.PID, c.Started, c.pending = in.PID, o.now, ""
	c.Restarts++
	o.event(Event{Type: EvRestart, Container: c.Name, PID: in.PID, Reason: "hot upgrade: new process took over",
		Fields: map[string]string{"cause": CauseUpgrade, "delay": "0s", "role": string(c.Role), "oldPid": strconv.Itoa(old)}})
	if c.State == StateReady {
		o.event(Event{Type: EvState, Container: c.Name, PID: in.PID, From: StateReady, To: StateReady, Reason: "upgraded"})
	} else {
		o.setState(c, StateReady, "upgraded")
	}
	if c.spec.Readiness != nil {
		o.do(ActProbe{Container: c.Name, PID: in.PID, On: true})
	}
	o.timer(c.spec.Restart.ResetAfter.D(), TimerStable, c)
	m.maybeOpenGate(o)
}
