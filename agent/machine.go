package agent

import (
	"fmt"
	"syscall"
	"time"
)

// The pod state machine is pure: Handle takes an input and the time, and
// returns what to do. It never starts a process, sleeps or reads a clock,
// so every rule below is a table test. The pod runner (pod.go) feeds it
// process events and executes its actions through a Runtime.

// State is where one container is in its life.
type State string

const (
	StateWaiting  State = "waiting"  // not started: gated behind the sidecars, or pod not started
	StateStarting State = "starting" // start requested, no pid yet
	StateRunning  State = "running"  // process alive, not (yet) ready
	StateReady    State = "ready"    // process alive and passing readiness
	StateBackoff  State = "backoff"  // exited, restart scheduled
	StateStopping State = "stopping" // stop signal sent
	StateExited   State = "exited"   // exited, will not be restarted
)

// Phase is where the pod as a whole is.
type Phase string

const (
	PhasePending  Phase = "pending"  // sidecars starting, apps held at the gate
	PhaseRunning  Phase = "running"  // gate open, apps started
	PhaseFailed   Phase = "failed"   // startup timed out with failClosed: apps held
	PhaseStopping Phase = "stopping" // ordered stop under way
	PhaseStopped  Phase = "stopped"
)

// Restart causes, as recorded in events and metrics.
const (
	CauseCrash    = "crash"
	CauseOOM      = "oom"
	CauseHang     = "hang"
	CauseOperator = "operator"
	CauseUpgrade  = "upgrade"
)

// Input is something that happened to a pod.
type Input interface{ input() }

type (
	// InStart asks the pod to start (sidecars first).
	InStart struct{}
	// InStop asks for an ordered stop: apps, then sidecars.
	InStop struct{}
	// InRestartPod is an ordered stop followed by a fresh start.
	InRestartPod struct{}
	// InRestart restarts one container alone.
	InRestart struct {
		Container string
		Cause     string
	}
	// InStarted reports the outcome of a start.
	InStarted struct {
		Container string
		PID       int
		Err       error
	}
	// InExited reports that a container's process exited.
	InExited struct {
		Container string
		PID       int
		Status    string // "exit status 1", "signal: killed", "unknown" for adopted
		Failed    bool   // non-zero exit or killed by a signal
	}
	// InProbe reports one readiness check.
	InProbe struct {
		Container string
		PID       int // the process the check was made for
		OK        bool
		Failures  int // consecutive failures
		Err       string
	}
	// InOOM reports that the kernel OOM-killed a process of the container.
	InOOM struct{ Container string }
	// InTimer is a timer set by an ActTimer going off.
	InTimer struct {
		Kind      TimerKind
		Container string
		Gen       int
	}
)

func (InStart) input()      {}
func (InStop) input()       {}
func (InRestartPod) input() {}
func (InRestart) input()    {}
func (InStarted) input()    {}
func (InExited) input()     {}
func (InProbe) input()      {}
func (InOOM) input()        {}
func (InTimer) input()      {}

// TimerKind names what a timer is for.
type TimerKind string

const (
	TimerStartup TimerKind = "startup-timeout"
	TimerBackoff TimerKind = "backoff"
	TimerGrace   TimerKind = "grace"
	TimerStable  TimerKind = "stable"
)

// Action is something the runner must do.
type Action interface{ action() }

type (
	// ActStart starts the container's process.
	ActStart struct{ Container string }
	// ActSignal sends Sig to the container's process group.
	ActSignal struct {
		Container string
		PID       int
		Sig       syscall.Signal
	}
	// ActProbe starts (On) or stops probing a container's readiness.
	ActProbe struct {
		Container string
		PID       int
		On        bool
	}
	// ActTimer asks for an InTimer after After.
	ActTimer struct {
		After time.Duration
		Timer InTimer
	}
	// ActEvent records an event (log, event list, metrics).
	ActEvent struct{ Event Event }
)

func (ActStart) action()  {}
func (ActSignal) action() {}
func (ActProbe) action()  {}
func (ActTimer) action()  {}
func (ActEvent) action()  {}

// Event is a thing worth telling an operator.
type Event struct {
	Seq       uint64            `json:"seq"`
	Time      time.Time         `json:"time"`
	Pod       string            `json:"pod"`
	Container string            `json:"container,omitempty"`
	Type      string            `json:"type"`
	PID       int               `json:"pid,omitempty"`
	From      State             `json:"from,omitempty"`
	To        State             `json:"to,omitempty"`
	Reason    string            `json:"reason,omitempty"`
	Fields    map[string]string `json:"fields,omitempty"`
	// Duration carries a measured time where the event has one (gate
	// wait, time to ready).
	Duration time.Duration `json:"durationNs,omitempty"`
}

// Event types.
const (
	EvState          = "state"
	EvGateOpen       = "gate-open"
	EvStartupTimeout = "startup-timeout"
	EvRestart        = "restart"
	EvCrashLoop      = "crash-loop"
	EvHang           = "hang"
	EvOOMKill        = "oom-kill"
	EvStartFailed    = "start-failed"
	EvPodPhase       = "pod-phase"
)

// ContainerStatus is the machine's view of one container.
type ContainerStatus struct {
	Name     string    `json:"name"`
	Role     Role      `json:"role"`
	State    State     `json:"state"`
	PID      int       `json:"pid"`
	Ready    bool      `json:"ready"`
	Restarts int       `json:"restarts"`
	Started  time.Time `json:"started,omitzero"`
	LastExit string    `json:"lastExit,omitempty"`
	// CrashLoop is set while the container restarts more often than its
	// policy allows.
	CrashLoop bool `json:"crashLoop"`

	spec     *ContainerSpec
	gen      int
	streak   int         // restarts since the last stable run
	recent   []time.Time // restart times within the policy window
	pending  string      // cause of the restart an exit will trigger
	adopted  bool
	held     string // cause of an exit left down by the auto-restart switch
	hangSeen bool   // a hang already reported while auto-restart is off
	lastPID  int    // the pid that just exited, for the exit's state event

	// A probe counts failures from its own last success, but a sidecar
	// can also be made ready by READY=1 while its probe is still failing
	// from the start-up. lastFail is the probe's last count seen, and
	// failBase the part of it from before the latest success of any kind,
	// which must not count towards a hang.
	lastFail, failBase int
}

// Machine is one pod's state machine.
type Machine struct {
	Spec  *PodSpec
	Phase Phase

	containers []*ContainerStatus
	startedAt  time.Time // when the current start began
	startupGen int
	restartPod bool // start again once stopped

	// Runtime switches (InSwitches), negated so the zero value is "on".
	noAutoRestart bool
	gateOff       bool
}

// NewMachine returns the machine of a pod that has not started.
func NewMachine(spec *PodSpec) *Machine {
	m := &Machine{Spec: spec, Phase: PhaseStopped}
	for i := range spec.Containers {
		c := &spec.Containers[i]
		m.containers = append(m.containers, &ContainerStatus{Name: c.Name, Role: c.Role, State: StateWaiting, spec: c})
	}
	return m
}

// Adopt records that a container's process is already running (found in
// the state directory after an agent restart). Call before InStart.
func (m *Machine) Adopt(name string, pid, restarts int, started time.Time) {
	if c := m.get(name); c != nil {
		c.State, c.PID, c.Restarts, c.Started, c.adopted = StateRunning, pid, restarts, started, true
	}
}

// Containers returns a copy of every container's status.
func (m *Machine) Containers() []ContainerStatus {
	out := make([]ContainerStatus, len(m.containers))
	for i, c := range m.containers {
		out[i] = *c
		out[i].recent = nil
		out[i].Ready = c.State == StateReady
	}
	return out
}

// Container returns one container's status.
func (m *Machine) Container(name string) (ContainerStatus, bool) {
	c := m.get(name)
	if c == nil {
		return ContainerStatus{}, false
	}
	s := *c
	s.Ready = c.State == StateReady
	return s, true
}

func (m *Machine) get(name string) *ContainerStatus {
	for _, c := range m.containers {
		if c.Name == name {
			return c
		}
	}
	return nil
}

// out collects the actions of one Handle call.
type out struct {
	m   *Machine
	now time.Time
	a   []Action
}

func (o *out) do(a Action) { o.a = append(o.a, a) }

func (o *out) event(e Event) {
	e.Pod = o.m.Spec.Name
	e.Time = o.now
	o.do(ActEvent{Event: e})
}

func (o *out) setState(c *ContainerStatus, to State, reason string) {
	if c.State == to {
		return
	}
	from := c.State
	c.State = to
	pid := c.PID
	if pid == 0 && (to == StateExited || to == StateBackoff || to == StateStarting || to == StateWaiting) {
		pid = c.lastPID
	}
	o.event(Event{Type: EvState, Container: c.Name, PID: pid, From: from, To: to, Reason: reason})
}

func (o *out) setPhase(p Phase, reason string) {
	if o.m.Phase == p {
		return
	}
	from := o.m.Phase
	o.m.Phase = p
	o.event(Event{Type: EvPodPhase, Reason: reason, Fields: map[string]string{"from": string(from), "to": string(p)}})
}

func (o *out) timer(after time.Duration, kind TimerKind, c *ContainerStatus) {
	t := InTimer{Kind: kind}
	if c != nil {
		c.gen++
		t.Container, t.Gen = c.Name, c.gen
	} else {
		o.m.startupGen++
		t.Gen = o.m.startupGen
	}
	o.do(ActTimer{After: after, Timer: t})
}

// Handle applies one input at time now and returns the actions it calls for.
func (m *Machine) Handle(now time.Time, in Input) []Action {
	o := &out{m: m, now: now}
	switch in := in.(type) {
	case InStart:
		m.start(o)
	case InStop:
		m.restartPod = false
		m.stop(o)
	case InRestartPod:
		m.restartPod = true
		m.stop(o)
	case InRestart:
		m.restartOne(o, in)
	case InStarted:
		m.started(o, in)
	case InExited:
		m.exited(o, in)
	case InProbe:
		m.probed(o, in)
	case InOOM:
		if c := m.get(in.Container); c != nil {
			o.event(Event{Type: EvOOMKill, Container: c.Name, PID: c.PID, Fields: map[string]string{"role": string(c.Role)}})
			if c.pending == "" {
				c.pending = CauseOOM
			}
		}
	case InTimer:
		m.timerFired(o, in)
	case InSwitches:
		m.setSwitches(o, in)
	case InSwap:
		m.swap(o, in)
	default:
		panic(fmt.Sprintf("agent: unknown machine input %T", in))
	}
	return o.a
}

func (m *Machine) start(o *out) {
	if m.Phase == PhaseStopping {
		// An ordered stop must finish first; InRestartPod is the way to
		// ask for both.
		return
	}
	if m.Phase == PhasePending || m.Phase == PhaseRunning || m.Phase == PhaseFailed {
		return
	}
	m.startedAt = o.now
	appsAdopted := false
	for _, c := range m.containers {
		if c.Role == RoleApp && c.adopted {
			appsAdopted = true
		}
	}
	if appsAdopted {
		// The apps outlived an agent restart: the gate was open before,
		// and holding the other apps back now would help no one.
		o.setPhase(PhaseRunning, "adopted running apps")
	} else {
		o.setPhase(PhasePending, "start")
	}
	for _, c := range m.containers {
		c.adopted = false
		if c.State == StateExited {
			c.State = StateWaiting
		}
		switch {
		case c.PID != 0:
			// Adopted: probe it again rather than start a duplicate.
			if c.spec.Readiness != nil {
				o.do(ActProbe{Container: c.Name, PID: c.PID, On: true})
			} else {
				o.setState(c, StateReady, "adopted")
			}
			o.timer(c.spec.Restart.ResetAfter.D(), TimerStable, c)
		case c.Role == RoleSidecar || m.Phase == PhaseRunning:
			m.startContainer(o, c, "start")
		}
	}
	if m.Phase == PhasePending && m.gateOff {
		m.forceOpenGate(o)
	}
	if m.Phase == PhasePending {
		if m.Spec.Startup.Timeout > 0 {
			o.timer(m.Spec.Startup.Timeout.D(), TimerStartup, nil)
		}
		m.maybeOpenGate(o)
	}
}

func (m *Machine) startContainer(o *out, c *ContainerStatus, reason string) {
	c.PID = 0
	defer func() { c.lastPID = 0 }()
	c.held, c.hangSeen = "", false
	o.setState(c, StateStarting, reason)
	o.do(ActStart{Container: c.Name})
}

// maybeOpenGate starts the apps once every sidecar is ready.
func (m *Machine) maybeOpenGate(o *out) {
	if m.Phase != PhasePending && m.Phase != PhaseFailed {
		return
	}
	for _, c := range m.containers {
		if c.Role == RoleSidecar && c.State != StateReady {
			return
		}
	}
	reason := "sidecars ready"
	if m.Phase == PhaseFailed {
		reason = "sidecars ready after the startup timeout"
	}
	o.event(Event{Type: EvGateOpen, Reason: reason, Duration: o.now.Sub(m.startedAt)})
	m.openGate(o, reason)
}

func (m *Machine) openGate(o *out, reason string) {
	m.startupGen++ // the startup timer no longer matters
	o.setPhase(PhaseRunning, reason)
	for _, c := range m.containers {
		if c.Role == RoleApp && c.State == StateWaiting {
			m.startContainer(o, c, reason)
		}
	}
}

func (m *Machine) started(o *out, in InStarted) {
	c := m.get(in.Container)
	if c == nil || c.State != StateStarting {
		return
	}
	if in.Err != nil {
		o.event(Event{Type: EvStartFailed, Container: c.Name, Reason: in.Err.Error()})
		m.afterExit(o, c, "start failed: "+in.Err.Error(), true)
		return
	}
	c.PID = in.PID
	c.Started = o.now
	if m.Phase == PhaseStopping {
		// Started while a stop was under way: stop it in turn.
		m.signalStop(o, c)
		return
	}
	if c.spec.Readiness == nil {
		o.setState(c, StateReady, "started, no readiness check")
		m.maybeOpenGate(o)
	} else {
		o.setState(c, StateRunning, "started")
		o.do(ActProbe{Container: c.Name, PID: c.PID, On: true})
	}
	o.timer(c.spec.Restart.ResetAfter.D(), TimerStable, c)
}

func (m *Machine) probed(o *out, in InProbe) {
	c := m.get(in.Container)
	if c == nil || c.PID == 0 || c.PID != in.PID {
		return // a late result for a process that is gone
	}
	if in.OK {
		c.hangSeen = false
		c.failBase = c.lastFail
	} else {
		if in.Failures <= c.lastFail {
			c.failBase = 0 // the probe's count restarted: it saw a success
		}
		c.lastFail = in.Failures
		in.Failures -= c.failBase
	}
	if !in.OK && m.noAutoRestart && (c.State == StateRunning || c.State == StateReady) {
		// Hang detection restarts; with auto-restart off the container
		// is left alone, and the hang reported once.
		if !c.hangSeen && m.hung(c, in, o.now) {
			c.hangSeen = true
			o.event(Event{Type: EvHang, Container: c.Name, PID: c.PID,
				Reason: "readiness failing: " + in.Err + "; auto-restart switch off, left running"})
		}
		return
	}
	switch {
	case in.OK && c.State == StateRunning:
		o.setState(c, StateReady, "readiness passed")
		if c.Role == RoleSidecar {
			o.event(Event{Type: "ready", Container: c.Name, PID: c.PID, Duration: o.now.Sub(c.Started)})
		}
		m.maybeOpenGate(o)
	case !in.OK && c.State == StateRunning && m.Phase == PhaseRunning &&
		m.Spec.Startup.Timeout > 0 && o.now.Sub(c.Started) > m.Spec.Startup.Timeout.D():
		// A restarted sidecar gets the pod's startup budget to become
		// ready again; past it, it is as hung as one that stopped answering.
		o.event(Event{Type: EvHang, Container: c.Name, PID: c.PID,
			Reason: fmt.Sprintf("not ready %s after its start: %s", o.now.Sub(c.Started).Round(time.Millisecond), in.Err)})
		c.pending = CauseHang
		m.signalStop(o, c)
	case !in.OK && c.State == StateReady:
		th := c.spec.Readiness.FailureThreshold
		if in.Failures >= th {
			o.event(Event{Type: EvHang, Container: c.Name, PID: c.PID,
				Reason: fmt.Sprintf("readiness failed %d times in a row: %s", in.Failures, in.Err)})
			c.pending = CauseHang
			m.signalStop(o, c)
		}
	}
}

func (m *Machine) restartOne(o *out, in InRestart) {
	c := m.get(in.Container)
	if c == nil || m.Phase == PhaseStopping || m.Phase == PhaseStopped {
		return
	}
	switch c.State {
	case StateRunning, StateReady:
		c.pending = in.Cause
		m.signalStop(o, c)
	case StateBackoff, StateExited:
		if c.Role == RoleApp && m.Phase != PhaseRunning {
			return // still gated
		}
		c.streak = 0
		o.event(Event{Type: EvRestart, Container: c.Name, Reason: in.Cause, Fields: map[string]string{"cause": in.Cause}})
		c.Restarts++
		m.startContainer(o, c, "restart: "+in.Cause)
	}
}

// signalStop sends the container its stop signal and arms the grace timer.
func (m *Machine) signalStop(o *out, c *ContainerStatus) {
	if c.PID == 0 {
		return
	}
	sig, _ := ParseSignal(c.spec.Stop.Signal)
	o.setState(c, StateStopping, "stop")
	o.do(ActProbe{Container: c.Name, PID: c.PID, On: false})
	o.do(ActSignal{Container: c.Name, PID: c.PID, Sig: sig})
	o.timer(c.spec.Stop.Grace.D(), TimerGrace, c)
}

func (m *Machine) exited(o *out, in InExited) {
	c := m.get(in.Container)
	if c == nil || c.PID == 0 || in.PID != c.PID {
		return
	}
	o.do(ActProbe{Container: c.Name, PID: c.PID, On: false})
	c.LastExit = in.Status
	m.afterExit(o, c, in.Status, in.Failed)
}

// afterExit decides what follows an exit (or a failed start).
func (m *Machine) afterExit(o *out, c *ContainerStatus, status string, failed bool) {
	c.lastPID, c.PID = c.PID, 0
	cause := c.pending
	c.pending = ""
	if m.Phase == PhaseStopping || m.Phase == PhaseStopped {
		o.setState(c, StateExited, status)
		m.stopProgress(o)
		return
	}
	if cause == "" {
		cause = CauseCrash
	}
	restart := cause != CauseCrash // operator, hang, oom always restart
	if !restart {
		switch c.spec.Restart.Policy {
		case "always":
			restart = true
		case "on-failure":
			restart = failed
		}
	}
	if !restart {
		o.setState(c, StateExited, status)
		return
	}
	if m.noAutoRestart && cause != CauseOperator && cause != CauseUpgrade {
		m.holdDown(o, c, cause, status)
		return
	}
	rp := c.spec.Restart
	// Crash-loop accounting over the policy window.
	keep := c.recent[:0]
	for _, t := range c.recent {
		if o.now.Sub(t) < rp.Window.D() {
			keep = append(keep, t)
		}
	}
	c.recent = append(keep, o.now)
	if len(c.recent) > rp.MaxRestarts && !c.CrashLoop {
		c.CrashLoop = true
		o.event(Event{Type: EvCrashLoop, Container: c.Name,
			Reason: fmt.Sprintf("%d restarts within %s (limit %d)", len(c.recent), rp.Window.D(), rp.MaxRestarts)})
	}
	delay := Backoff(rp, c.streak)
	if c.CrashLoop {
		delay = rp.MaxBackoff.D()
	}
	if cause == CauseOperator || cause == CauseUpgrade {
		delay = 0 // asked for, not a failure
	} else {
		c.streak++
	}
	c.Restarts++
	o.event(Event{Type: EvRestart, Container: c.Name, Reason: status,
		Fields: map[string]string{"cause": cause, "delay": delay.String(), "role": string(c.Role)}})
	if c.Role == RoleApp && m.Phase != PhaseRunning {
		// An app that exits while the gate is closed waits behind it.
		o.setState(c, StateWaiting, status)
		return
	}
	if delay == 0 {
		m.startContainer(o, c, "restart: "+cause)
		return
	}
	o.setState(c, StateBackoff, fmt.Sprintf("%s, restart in %s", status, delay))
	o.timer(delay, TimerBackoff, c)
}

// Backoff is the delay before restart number streak+1 since the last stable
// run: none for the first, then InitialBackoff doubling up to MaxBackoff.
func Backoff(rp RestartPolicy, streak int) time.Duration {
	if streak <= 0 {
		return 0
	}
	d := rp.InitialBackoff.D()
	for i := 1; i < streak && d < rp.MaxBackoff.D(); i++ {
		d *= 2
	}
	return min(d, rp.MaxBackoff.D())
}

func (m *Machine) timerFired(o *out, in InTimer) {
	if in.Kind == TimerStartup {
		if in.Gen != m.startupGen || m.Phase != PhasePending {
			return
		}
		var waiting []string
		for _, c := range m.containers {
			if c.Role == RoleSidecar && c.State != StateReady {
				waiting = append(waiting, c.Name)
			}
		}
		reason := fmt.Sprintf("sidecars %v not ready after %s", waiting, m.Spec.Startup.Timeout.D())
		o.event(Event{Type: EvStartupTimeout, Reason: reason,
			Fields: map[string]string{"policy": m.Spec.Startup.OnTimeout}, Duration: o.now.Sub(m.startedAt)})
		if m.Spec.Startup.OnTimeout == FailOpen {
			m.openGate(o, "startup timeout, failOpen")
		} else {
			o.setPhase(PhaseFailed, reason+", failClosed: apps held")
		}
		return
	}
	c := m.get(in.Container)
	if c == nil || in.Gen != c.gen {
		return
	}
	switch in.Kind {
	case TimerBackoff:
		if c.State == StateBackoff && m.noAutoRestart {
			m.holdDown(o, c, CauseCrash, c.LastExit)
		} else if c.State == StateBackoff {
			m.startContainer(o, c, "backoff over")
		}
	case TimerGrace:
		if c.State == StateStopping && c.PID != 0 {
			o.do(ActSignal{Container: c.Name, PID: c.PID, Sig: syscall.SIGKILL})
		}
	case TimerStable:
		if (c.State == StateRunning || c.State == StateReady) && c.PID != 0 {
			c.streak = 0
			if c.CrashLoop {
				c.CrashLoop = false
				o.event(Event{Type: "crash-loop-over", Container: c.Name})
			}
		}
	}
}

// stop begins an ordered stop: apps first.
func (m *Machine) stop(o *out) {
	if m.Phase == PhaseStopped {
		if m.restartPod {
			m.restartPod = false
			m.start(o)
		}
		return
	}
	m.startupGen++
	o.setPhase(PhaseStopping, "stop requested")
	for _, c := range m.containers {
		if c.Role == RoleApp {
			m.stopOne(o, c)
		}
	}
	m.stopProgress(o)
}

func (m *Machine) stopOne(o *out, c *ContainerStatus) {
	switch c.State {
	case StateRunning, StateReady:
		m.signalStop(o, c)
	case StateBackoff, StateWaiting:
		c.gen++ // cancel the backoff timer
		o.setState(c, StateExited, "pod stopping")
	}
}

// stopProgress stops the sidecars once every app is down, and ends the
// stop once everything is.
func (m *Machine) stopProgress(o *out) {
	if m.Phase != PhaseStopping {
		return
	}
	for _, c := range m.containers {
		if c.Role == RoleApp && !down(c) {
			return
		}
	}
	for _, c := range m.containers {
		if c.Role == RoleSidecar && c.State != StateStopping {
			m.stopOne(o, c)
		}
	}
	for _, c := range m.containers {
		if !down(c) {
			return
		}
	}
	o.setPhase(PhaseStopped, "every container exited")
	for _, c := range m.containers {
		c.streak, c.recent, c.CrashLoop = 0, nil, false
	}
	if m.restartPod {
		m.restartPod = false
		m.start(o)
	}
}

func down(c *ContainerStatus) bool {
	return c.State == StateExited || c.State == StateWaiting
}
