package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/meshagent/meshagent/agent/containerd"
	"github.com/meshagent/meshagent/startup"
)

// Kubernetes mode. The kube supervisor is the same agent's second runtime:
// kubelet owns the Kubernetes pods (it creates, starts and restarts their
// containers), and meshagent follows them through containerd's event stream
// and acts only where kubelet cannot:
//
//   - it probes each sidecar's readiness itself, from the node, inside the
//     pod's network namespace, and holds the pod's gate (startup.Gate) open
//     while every sidecar is ready; `meshagent gate`, the sidecar's postStart
//     hook, waits behind it so kubelet starts the apps only then;
//   - `meshagent hold`, the sidecar's preStop hook, waits until the pod's
//     apps have exited;
//   - a hung sidecar, an operator's restart and a finished Job's sidecars
//     are stopped through containerd (stop signal, grace, SIGKILL); kubelet
//     then recreates what its restart policy says. meshagent never creates
//     a container.
//
// The model is rebuilt from containerd alone (containerd.Client.Run reports
// every container once, pre-existing ones included, and again only what
// changed after a reconnect), so an agent restart or a containerd restart
// loses nothing and repeats nothing.

// kubeRuntime is what the supervisor needs of containerd.
type kubeRuntime interface {
	Run(ctx context.Context, handle func(containerd.Event)) error
	StopContainer(ctx context.Context, id string, sig syscall.Signal, grace time.Duration) error
	SandboxAnnotations(ctx context.Context, sandboxID string) (annotations, labels map[string]string, err error)
	ContainerExit(ctx context.Context, id string) (exited bool, code int32, err error)
}

// Kubernetes event types, besides the host mode's (EvRestart, EvHang,
// EvOOMKill, EvGateOpen, EvStartupTimeout, EvState).
const (
	EvStop          = "stop"           // the agent stops a container (cause in Reason)
	EvBadAnnotation = "bad-annotation" // a meshagent.io annotation did not parse
	EvContainerd    = "containerd"     // connection to containerd lost or regained
)

// criTimeout bounds a CRI question asked on the event loop: a stuck CRI
// must not stall every pod's events.
const criTimeout = 5 * time.Second

// CauseJob is the cause of a Job's sidecars being stopped.
const CauseJob = "job"

type kubeSupervisor struct {
	a   *Agent
	cfg *KubeConfig
	rt  kubeRuntime
	log *slog.Logger

	mu      sync.Mutex
	pods    map[string]*kubePod // by sandbox id
	owner   map[string]*kubePod // container id (the sandbox's too) → its pod
	changed chan struct{}       // closed and replaced on every change
	synced  startup.Gate        // open after the first Synced
	down    bool                // containerd stream broken

	wg sync.WaitGroup // probes and stops

	// life is the context of Run: stops an operator asks for through the
	// admin API must outlive the request that asked.
	life    context.Context
	closeRT func() error
}

type kubePod struct {
	id      string
	ref     containerd.PodRef
	ann     map[string]string // nil until CRI told us
	pol     kubePodPolicy
	sandbox *kubeContainer
	ctrs    []*kubeContainer // creation order; old incarnations kept until deleted

	gate       startup.Gate // open while every sidecar is ready
	timedOut   map[time.Time]bool
	failed     bool // a failClosed startup timeout since the gate last opened
	jobStopped bool
}

type kubeContainer struct {
	id, name string
	role     containerd.Role
	created  time.Time
	started  time.Time
	pid      uint32
	status   containerd.Status
	exit     uint32
	restarts int

	ready, everReady bool
	failures         int
	oom              bool
	hangHeld         bool   // hang seen with auto-restart off
	stopCause        string // an agent stop under way
	exitCause        string // why the last task exited

	probeCancel context.CancelFunc
	probePID    uint32
}

func newKubeSupervisor(a *Agent, cfg *KubeConfig, rt kubeRuntime) *kubeSupervisor {
	return &kubeSupervisor{
		a: a, cfg: cfg, rt: rt, log: a.log.With("runtime", "kubernetes"),
		pods: map[string]*kubePod{}, owner: map[string]*kubePod{}, changed: make(chan struct{}),
	}
}

// run follows containerd until ctx ends, then waits for its probes and
// stops to finish.
func (s *kubeSupervisor) run(ctx context.Context) error {
	defer s.wg.Wait()
	defer s.stopProbes()
	return s.rt.Run(ctx, func(e containerd.Event) { s.handle(ctx, e) })
}

// handle applies one containerd event. It runs on Run's goroutine; the only
// call that may wait is CRI's answer about a new pod's annotations.
func (s *kubeSupervisor) handle(ctx context.Context, e containerd.Event) {
	var ann map[string]string
	if e.Kind == containerd.ContainerCreated && !e.Resync && s.needAnnotations(e.Container.SandboxID) {
		cctx, cancel := context.WithTimeout(ctx, criTimeout)
		a, _, err := s.rt.SandboxAnnotations(cctx, e.Container.SandboxID)
		cancel()
		if err == nil {
			ann = a
		} // else: CRI does not know the sandbox yet; the next container or Synced tells
	}
	var exits map[string]int32
	if e.Kind == containerd.Synced {
		exits = s.taskless(ctx, e.Pods)
	}
	// The sidecar's resource policy where containerd has no NRI (and what
	// NRI cannot set): applied once, on the live start of a task, outside
	// the lock (it writes cgroup files). A start seen on resync happened
	// while the agent was away and already got its values.
	var started *KubeSidecar
	defer func() {
		if started != nil {
			_ = s.a.ApplyKubeSidecar(ctx, *started) // errors are recorded as events
		}
	}()
	s.mu.Lock()
	defer s.mu.Unlock()
	defer s.broadcast()
	c := e.Container
	switch e.Kind {
	case containerd.ContainerCreated:
		p := s.podFor(c)
		if ann != nil && p.ann == nil {
			s.setAnnotations(p, ann)
		}
		s.created(p, c, e)
		s.reconcile(ctx, p)
	case containerd.TaskStarted:
		if p, kc := s.find(c.ID); kc != nil {
			kc.pid, kc.status, kc.started = c.PID, containerd.StatusRunning, e.Time
			kc.ready, kc.failures, kc.oom, kc.exitCause, kc.hangHeld = false, 0, false, "", false
			if !e.Resync && p.ann != nil && kc.role != containerd.RoleSandbox {
				started = &KubeSidecar{Pod: p.ref.String(), Annotations: p.ann, Container: kc.name, PID: int(kc.pid)}
			}
			s.reconcile(ctx, p)
		}
	case containerd.TaskExited:
		if p, kc := s.find(c.ID); kc != nil {
			s.exited(p, kc, c, e)
			s.reconcile(ctx, p)
		}
	case containerd.TaskOOM:
		if p, kc := s.find(c.ID); kc != nil {
			kc.oom = true
			s.record(Event{Type: EvOOMKill, Pod: p.ref.String(), Container: kc.name, PID: int(kc.pid), Reason: "kernel OOM killer", Fields: roleField(kc)})
		}
	case containerd.ContainerDeleted:
		if p, kc := s.find(c.ID); kc != nil {
			s.deleted(p, kc)
		}
	case containerd.Synced:
		s.resynced(ctx, e, exits)
	case containerd.Disconnected:
		if !s.down {
			s.down = true
			s.record(Event{Type: EvContainerd, Reason: fmt.Sprintf("event stream lost, reconnecting: %v", e.Err)})
		}
	}
}

// taskless asks CRI about the containers a listing found without a task
// that the model does not already know as exited: have they exited (and
// been reaped) or not started yet? Called without s.mu.
func (s *kubeSupervisor) taskless(ctx context.Context, pods []containerd.Pod) map[string]int32 {
	var ids []string
	s.mu.Lock()
	for _, pod := range pods {
		for _, c := range pod.Containers {
			if c.Status != containerd.StatusNone {
				continue
			}
			if _, kc := s.find(c.ID); kc != nil && kc.status == containerd.StatusNone {
				ids = append(ids, c.ID)
			}
		}
	}
	s.mu.Unlock()
	exits := map[string]int32{}
	for _, id := range ids {
		cctx, cancel := context.WithTimeout(ctx, criTimeout)
		exited, code, err := s.rt.ContainerExit(cctx, id)
		cancel()
		if err == nil && exited {
			exits[id] = code
		}
	}
	return exits
}

func (s *kubeSupervisor) needAnnotations(sandboxID string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.pods[sandboxID]
	return p == nil || p.ann == nil
}

// broadcast wakes everyone waiting for a change (hold, unknown callers).
func (s *kubeSupervisor) broadcast() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *kubeSupervisor) record(e Event) {
	e.Time = time.Now()
	s.a.record(e)
}

func (s *kubeSupervisor) podFor(c containerd.Container) *kubePod {
	p := s.pods[c.SandboxID]
	if p == nil {
		p = &kubePod{id: c.SandboxID, ref: c.Pod, pol: defaultKubePodPolicy(), timedOut: map[time.Time]bool{}}
		s.pods[c.SandboxID] = p
	}
	if p.ref.Name == "" {
		p.ref = c.Pod
	}
	return p
}

func (s *kubeSupervisor) find(id string) (*kubePod, *kubeContainer) {
	p := s.owner[id]
	if p == nil {
		return nil, nil
	}
	if p.sandbox != nil && p.sandbox.id == id {
		return p, p.sandbox
	}
	for _, c := range p.ctrs {
		if c.id == id {
			return p, c
		}
	}
	return nil, nil
}

func (s *kubeSupervisor) setAnnotations(p *kubePod, ann map[string]string) {
	p.ann = ann
	pol, err := parseKubePodPolicy(ann)
	p.pol = pol
	if err != nil {
		s.record(Event{Type: EvBadAnnotation, Pod: p.ref.String(), Reason: err.Error()})
	}
	for _, c := range p.ctrs {
		c.role = p.roleOf(c.name)
	}
}

func (p *kubePod) roleOf(name string) containerd.Role {
	if slices.Contains(p.pol.Sidecars, name) {
		return containerd.RoleSidecar
	}
	return containerd.RoleApp
}

// created records a new container; a new incarnation of a name seen before
// is kubelet's restart of it, recorded with the cause of the last exit.
func (s *kubeSupervisor) created(p *kubePod, c containerd.Container, e containerd.Event) {
	if _, known := s.find(c.ID); known != nil {
		return
	}
	kc := &kubeContainer{id: c.ID, name: c.Name, created: c.CreatedAt, status: c.Status, pid: c.PID, exit: c.ExitStatus, restarts: int(c.Attempt)}
	s.owner[c.ID] = p
	if c.Kind == containerd.KindSandbox {
		kc.role = containerd.RoleSandbox
		p.sandbox = kc
		return
	}
	kc.role = p.roleOf(c.Name)
	prev := p.latest(c.Name)
	p.ctrs = append(p.ctrs, kc)
	if prev == nil || (e.Resync && !s.synced.IsOpen()) {
		// Before the first sync completes, incarnations are history from
		// before the agent started: their count comes from CRI (Synced).
		// A resync after a reconnect, though, reports restarts that
		// happened while the stream was down.
		return
	}
	kc.restarts = max(kc.restarts, prev.restarts+1)
	cause := prev.exitCause
	if cause == "" {
		cause = "unknown"
	}
	fields := map[string]string{"cause": cause, "restartCount": strconv.Itoa(kc.restarts), "role": string(kc.role)}
	if e.Resync {
		fields["seen"] = "resync"
	}
	s.record(Event{Type: EvRestart, Pod: p.ref.String(), Container: c.Name, Reason: cause, Fields: fields})
}

// exited records a task's exit and why it happened.
func (s *kubeSupervisor) exited(p *kubePod, kc *kubeContainer, c containerd.Container, e containerd.Event) {
	kc.status, kc.exit, kc.ready = containerd.StatusStopped, c.ExitStatus, false
	if c.PID != 0 {
		kc.pid = c.PID
	}
	switch {
	case kc.stopCause != "":
		kc.exitCause = kc.stopCause
	case kc.oom:
		kc.exitCause = CauseOOM
	case c.ExitStatus == containerd.UnknownExitStatus:
		kc.exitCause = "unknown" // its task went away while we were not looking
	case c.ExitStatus != 0:
		kc.exitCause = CauseCrash
	default:
		kc.exitCause = "completed"
	}
	kc.stopCause = ""
	if kc.role == containerd.RoleSandbox {
		return
	}
	reason := exitText(c.ExitStatus) + " (" + kc.exitCause + ")"
	if e.Resync {
		reason += ", seen on resync"
	}
	s.record(Event{Type: EvState, Pod: p.ref.String(), Container: kc.name, PID: int(kc.pid), From: StateRunning, To: StateExited, Reason: reason, Fields: roleField(kc)})
}

// roleField marks an event with its container's role, which the metrics
// read (a Kubernetes pod has no spec in the config to look it up in).
func roleField(c *kubeContainer) map[string]string {
	return map[string]string{"role": string(c.role)}
}

func exitText(status uint32) string {
	if status == containerd.UnknownExitStatus {
		return "exit status unknown"
	}
	return "exit status " + strconv.Itoa(int(int32(status)))
}

func (s *kubeSupervisor) deleted(p *kubePod, kc *kubeContainer) {
	delete(s.owner, kc.id)
	s.stopProbe(kc)
	if kc == p.sandbox {
		// kubelet removed the pod: its containers were deleted before.
		for _, c := range p.ctrs {
			s.stopProbe(c)
			delete(s.owner, c.id)
		}
		delete(s.pods, p.id)
		s.a.forgetPodMetrics(p.ref.String())
		return
	}
	p.ctrs = slices.DeleteFunc(p.ctrs, func(c *kubeContainer) bool { return c == kc })
}

// resynced takes what a listing says about pods: their annotations (the
// first sync discovers pods that existed before the agent) and kubelet's
// restart counts; pods that are gone are forgotten.
func (s *kubeSupervisor) resynced(ctx context.Context, e containerd.Event, exits map[string]int32) {
	if s.down {
		s.down = false
		s.record(Event{Type: EvContainerd, Reason: "event stream back; resynchronised"})
	}
	if e.Err != nil {
		s.log.Warn("pods with bad meshagent annotations", "err", e.Err)
	}
	seen := map[string]bool{}
	for _, pod := range e.Pods {
		seen[pod.SandboxID] = true
		p := s.pods[pod.SandboxID]
		if p == nil {
			continue // only sandbox-less leftovers; their containers made no pod
		}
		if pod.Annotations != nil && p.ann == nil {
			s.setAnnotations(p, pod.Annotations)
		}
		for _, c := range pod.Containers {
			_, kc := s.find(c.ID)
			if kc == nil {
				continue
			}
			if int(c.Attempt) > kc.restarts {
				kc.restarts = int(c.Attempt)
			}
			if code, ok := exits[c.ID]; ok && kc.status == containerd.StatusNone {
				// Exited and reaped before we looked: CRI keeps the exit.
				kc.status, kc.exit, kc.exitCause = containerd.StatusStopped, uint32(code), "exited before the agent looked"
			}
		}
		s.reconcile(ctx, p)
	}
	for id, p := range s.pods {
		if !seen[id] {
			for _, c := range append(p.ctrs, p.sandbox) {
				if c != nil {
					s.stopProbe(c)
					delete(s.owner, c.id)
				}
			}
			delete(s.pods, id)
		}
	}
	s.synced.Open()
}

// latest returns the newest container called name.
func (p *kubePod) latest(name string) *kubeContainer {
	var out *kubeContainer
	for _, c := range p.ctrs {
		if c.name == name && (out == nil || !c.created.Before(out.created)) {
			out = c
		}
	}
	return out
}

// current returns the newest container of every name, in creation order.
func (p *kubePod) current() []*kubeContainer {
	var out []*kubeContainer
	for _, c := range p.ctrs {
		if p.latest(c.name) == c {
			out = append(out, c)
		}
	}
	return out
}

func taskRunning(st containerd.Status) bool {
	return st == containerd.StatusRunning || st == containerd.StatusPaused
}

// reconcile brings probes, the gate and a Job's sidecars in line with what
// the pod's containers are doing now. Called with s.mu held.
func (s *kubeSupervisor) reconcile(ctx context.Context, p *kubePod) {
	if p.ann == nil {
		return // roles unknown until CRI tells
	}
	for _, c := range p.ctrs {
		if c.role != containerd.RoleSidecar || !taskRunning(c.status) || p.latest(c.name) != c {
			s.stopProbe(c)
			if !taskRunning(c.status) {
				c.ready = false
			}
			continue
		}
		spec, probed := p.pol.Readiness[c.name]
		if !probed {
			if !c.ready {
				c.ready, c.everReady = true, true // running is all it promises
				s.record(Event{Type: EvState, Pod: p.ref.String(), Container: c.name, PID: int(c.pid), From: StateRunning, To: StateReady, Reason: "running (no readiness check)", Fields: roleField(c)})
			}
			continue
		}
		if c.probePID != c.pid {
			s.startProbe(ctx, p, c, spec)
		}
	}
	s.updateGate(p)
	s.checkJob(ctx, p)
}

// sidecarsReady reports whether every sidecar the pod names runs and is
// ready (true for a pod without sidecars).
func (p *kubePod) sidecarsReady() bool {
	for _, name := range p.pol.Sidecars {
		c := p.latest(name)
		if c == nil || !taskRunning(c.status) || !c.ready {
			return false
		}
	}
	return true
}

// startupAnchor is when the pod's current sidecars were created: the
// startup timeout counts from there, so it survives an agent restart.
func (p *kubePod) startupAnchor() time.Time {
	var at time.Time
	for _, name := range p.pol.Sidecars {
		if c := p.latest(name); c != nil && c.created.After(at) {
			at = c.created
		}
	}
	return at
}

func (s *kubeSupervisor) updateGate(p *kubePod) {
	ready := p.sidecarsReady()
	switch {
	case ready && !p.gate.IsOpen():
		p.gate.Open()
		p.failed = false
		e := Event{Type: EvGateOpen, Pod: p.ref.String(), Reason: "every sidecar is ready"}
		if at := p.startupAnchor(); !at.IsZero() {
			e.Duration = time.Since(at)
		}
		s.record(e)
	case !ready && p.gate.IsOpen():
		p.gate.Close()
	}
}

// startProbe watches a sidecar's readiness from inside the pod's network
// namespace, for as long as this incarnation (pid) runs.
func (s *kubeSupervisor) startProbe(ctx context.Context, p *kubePod, c *kubeContainer, spec kubeProbeSpec) {
	s.stopProbe(c)
	c.probePID = c.pid
	nsPID := c.pid
	if p.sandbox != nil && taskRunning(p.sandbox.status) && p.sandbox.pid != 0 {
		nsPID = p.sandbox.pid
	}
	ns, err := openNetns(nsPID)
	if err != nil && nsPID != c.pid {
		ns, err = openNetns(c.pid)
	}
	if err != nil {
		s.log.Warn("cannot probe sidecar", "pod", p.ref.String(), "container", c.name, "err", err)
		return
	}
	probe, err := newKubeProbe(spec, probeTarget{ns: ns, pid: c.pid})
	if err != nil {
		ns.Close()
		return
	}
	pctx, cancel := context.WithCancel(ctx)
	c.probeCancel = cancel
	sched := startup.Schedule{Period: p.pol.Period, Timeout: p.pol.Timeout, Fast: p.pol.StartupInterval}
	podID, ctrID, pid := p.id, c.id, c.pid
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer ns.Close()
		defer closeKubeProbe(probe)
		last := -1
		startup.Watch(pctx, probe, sched, func(r startup.Result) {
			ok := 0
			if r.OK() {
				ok = 1
			}
			if ok == 1 && last == 1 {
				return // a healthy sidecar takes no lock
			}
			last = ok
			s.onProbe(pctx, podID, ctrID, pid, r)
		})
	}()
}

func (s *kubeSupervisor) stopProbe(c *kubeContainer) {
	if c.probeCancel != nil {
		c.probeCancel()
		c.probeCancel = nil
	}
	c.probePID = 0
}

func (s *kubeSupervisor) stopProbes() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.pods {
		for _, c := range p.ctrs {
			s.stopProbe(c)
		}
	}
}

// onProbe takes one readiness result of incarnation pid.
func (s *kubeSupervisor) onProbe(ctx context.Context, podID, ctrID string, pid uint32, r startup.Result) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.pods[podID]
	if p == nil {
		return
	}
	_, c := s.find(ctrID)
	if c == nil || c.pid != pid || !taskRunning(c.status) {
		return
	}
	if r.OK() {
		c.failures = 0
		if !c.ready {
			c.ready, c.everReady = true, true
			e := Event{Type: EvState, Pod: p.ref.String(), Container: c.name, PID: int(pid), From: StateRunning, To: StateReady, Reason: "readiness check passed", Fields: roleField(c)}
			if !c.started.IsZero() {
				e.Duration = time.Since(c.started)
				// meshagent_sidecar_ready_seconds, as in host mode.
				s.record(Event{Type: "ready", Pod: p.ref.String(), Container: c.name, PID: int(pid), Duration: e.Duration, Fields: roleField(c)})
			}
			s.record(e)
			s.updateGate(p)
			s.broadcast()
		}
		return
	}
	c.failures = r.Failures
	if !c.everReady || c.failures < p.pol.FailureThreshold || c.stopCause != "" || c.hangHeld {
		return
	}
	// Ready once, now failing: hung.
	c.ready = false
	s.updateGate(p)
	s.broadcast()
	reason := fmt.Sprintf("readiness failed %d times in a row: %v", c.failures, r.Err)
	if !s.a.Switch(SwitchAutoRestart) {
		c.hangHeld = true
		s.record(Event{Type: EvHang, Pod: p.ref.String(), Container: c.name, PID: int(pid), Reason: reason + "; left running (auto-restart switch is off)"})
		return
	}
	s.record(Event{Type: EvHang, Pod: p.ref.String(), Container: c.name, PID: int(pid), Reason: reason})
	s.stop(ctx, p, c, CauseHang)
}

// stop stops one container through containerd (its stop signal, grace,
// SIGKILL) without waiting; kubelet restarts it per its restart policy.
// Called with s.mu held.
func (s *kubeSupervisor) stop(ctx context.Context, p *kubePod, c *kubeContainer, cause string) {
	if c.stopCause != "" || !taskRunning(c.status) {
		return
	}
	c.stopCause = cause
	grace := p.pol.RestartGrace
	s.record(Event{Type: EvStop, Pod: p.ref.String(), Container: c.name, PID: int(c.pid), Reason: cause,
		Fields: map[string]string{"cause": cause, "grace": grace.String()}})
	id, pid := c.id, c.pid
	if s.life != nil {
		// Not the caller's context: a probe's ends when the container
		// exits, and an admin request's when it is answered, but a stop
		// must run its course (grace, then SIGKILL).
		ctx = s.life
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		err := s.rt.StopContainer(ctx, id, 0, grace)
		if err == nil || errors.Is(err, containerd.ErrNoTask) || errors.Is(err, containerd.ErrNoContainer) || ctx.Err() != nil {
			return
		}
		s.log.Error("stop container", "pod", p.ref.String(), "container", c.name, "cause", cause, "err", err)
		s.mu.Lock()
		defer s.mu.Unlock()
		if c.pid == pid && c.stopCause == cause {
			c.stopCause = "" // let a later check try again
		}
	}()
}

// checkJob stops a Job's sidecars once its apps are done.
func (s *kubeSupervisor) checkJob(ctx context.Context, p *kubePod) {
	if p.pol.Job == JobOff || p.jobStopped {
		return
	}
	apps := 0
	for _, c := range p.current() {
		if c.role != containerd.RoleApp {
			continue
		}
		apps++
		if c.status != containerd.StatusStopped {
			return
		}
		if p.pol.Job == JobOnSuccess && c.exit != 0 {
			return
		}
	}
	if apps == 0 {
		return
	}
	p.jobStopped = true
	for _, c := range p.current() {
		if c.role == containerd.RoleSidecar {
			s.stop(ctx, p, c, CauseJob)
		}
	}
}
