package agent

import "time"

// The runtime switches the machine obeys arrive as an input like any other,
// so the machine stays pure: the agent posts InSwitches to every pod when an
// operator flips one, and before a new pod's InStart.

// InSwitches sets the runtime switches the machine obeys.
type InSwitches struct {
	// AutoRestart off: a container that exits (or hangs) on its own is
	// left down; restarts an operator asks for still happen. Turned back
	// on, the containers it held down are started again.
	AutoRestart bool
	// StartupGate off: forced fail-open, apps start without waiting for
	// their sidecars (a pod held at the gate opens it at once).
	StartupGate bool
}

func (InSwitches) input() {}

// Event types of the switches.
const (
	// EvRestartHeld: a container exited and stays down because the
	// auto-restart switch is off.
	EvRestartHeld = "restart-held"
)

func (m *Machine) setSwitches(o *out, in InSwitches) {
	wasHolding := m.noAutoRestart
	m.noAutoRestart = !in.AutoRestart
	m.gateOff = !in.StartupGate
	if m.gateOff && (m.Phase == PhasePending || m.Phase == PhaseFailed) {
		m.forceOpenGate(o)
	}
	if !wasHolding || m.noAutoRestart {
		return
	}
	for _, c := range m.containers {
		if c.held == "" {
			continue
		}
		cause := c.held
		c.held = ""
		if m.Phase == PhaseStopping || m.Phase == PhaseStopped {
			continue
		}
		if c.Role == RoleApp && m.Phase != PhaseRunning {
			o.setState(c, StateWaiting, "auto-restart switch on; held at the gate")
			continue
		}
		c.Restarts++
		o.event(Event{Type: EvRestart, Container: c.Name, Reason: "auto-restart switch on",
			Fields: map[string]string{"cause": cause, "role": string(c.Role)}})
		m.startContainer(o, c, "auto-restart switch on")
	}
}

// forceOpenGate starts the apps without waiting: the startup-gate switch
// is off.
func (m *Machine) forceOpenGate(o *out) {
	reason := "startup-gate switch off: apps start without waiting for the sidecars"
	o.event(Event{Type: EvGateOpen, Reason: reason, Duration: o.now.Sub(m.startedAt),
		Fields: map[string]string{"forced": "true"}})
	m.openGate(o, reason)
}

// holdDown leaves an exited container down because auto-restart is off.
func (m *Machine) holdDown(o *out, c *ContainerStatus, cause, status string) {
	c.held = cause
	c.gen++ // a pending backoff timer no longer matters
	o.event(Event{Type: EvRestartHeld, Container: c.Name,
		Reason: status + "; auto-restart switch off, left down",
		Fields: map[string]string{"cause": cause, "role": string(c.Role)}})
	o.setState(c, StateExited, status+" (auto-restart off)")
}

// hung reports whether a failed check makes c hung, by the rules probed
// applies when auto-restart is on.
func (m *Machine) hung(c *ContainerStatus, in InProbe, now time.Time) bool {
	switch c.State {
	case StateReady:
		return in.Failures >= c.spec.Readiness.FailureThreshold
	case StateRunning:
		return m.Phase == PhaseRunning && m.Spec.Startup.Timeout > 0 &&
			now.Sub(c.Started) > m.Spec.Startup.Timeout.D()
	}
	return false
}
