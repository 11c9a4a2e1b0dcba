package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/meshagent/meshagent/cgroup"
)

// Host-mode cgroup policy. Every container of a host-mode pod runs in
// <root>/meshagent/<pod>/<container>, entered by the exec shim before the
// command's first instruction; the sidecar also gets its oom_score_adj
// there, so every process it forks, and every restart, is the pod's first
// OOM victim. The pod's own limits (pods[].resources) and the sidecar's
// CPU and memory policy (pods[].sidecarPolicy) are applied before each
// start and kept by a periodic reconcile pass that counts drift. An OOM
// kill of a container is fed to its pod's machine (InOOM) before the
// container's exit, so the restart is recorded with cause oom.
//
// The cgroup-writes switch off stops every write (placement, values,
// drift correction); the plan still works. Without root or a writable
// cgroup filesystem the feature is off, said once in the log.

// Event types of the cgroup policy.
const (
	EvCgroupError = "cgroup-error" // the pod's policy cannot be applied; nothing written for it
	EvCgroupDrift = "cgroup-drift" // someone rewrote a value; meshagent restored it
)

// WithCgroups turns on the host-mode cgroup policy (cmd/meshagent does).
// It is off when node.cgroup.enabled is off, when the agent is not root,
// when the cgroup filesystem cannot be written, or when the runtime is not
// the host runtime; CgroupStatus says why.
func WithCgroups() Option {
	return func(a *Agent) error { a.cg = &hostCgroups{a: a}; return nil }
}

// hostCgroups is the cgroup policy of host-mode pods.
type hostCgroups struct {
	a   *Agent
	m   *cgroup.Manager // nil when off
	off string          // why it is off
	w   *cgroup.OOMWatcher
	// appAdj is the agent's own oom_score_adj, which apps inherit.
	appAdj int

	mu      sync.Mutex
	pods    map[string]bool         // pods whose groups exist and are watched
	oomSeen map[podContainer]uint64 // OOM kills already fed to the machine
	lastErr map[string]string       // last error event per pod, so a pass does not repeat it
	groups  map[podContainer]cgroup.Group

	stop func()
}

// CgroupStatus says whether the host-mode cgroup policy is on, and why not.
type CgroupStatus struct {
	Enabled bool   `json:"enabled"`
	Reason  string `json:"reason,omitempty"`
	Mode    string `json:"mode,omitempty"` // v1, hybrid, v2
	Root    string `json:"root,omitempty"`
	// Writes is the cgroup-writes switch.
	Writes            bool   `json:"writes"`
	ReconcileInterval string `json:"reconcileInterval,omitempty"`
}

// initCgroups runs in New once the runtime is known.
func (a *Agent) initCgroups() {
	c := a.cg
	if c == nil {
		return
	}
	cfg := a.cfg.Node.Cgroup
	hr, isHost := a.rt.(*HostRuntime)
	switch {
	case cfg.Enabled == "off":
		c.off = "node.cgroup.enabled is off"
	case !isHost:
		c.off = "the runtime is not the host runtime"
	case os.Geteuid() != 0:
		c.off = fmt.Sprintf("not root (uid %d): cannot create cgroups", os.Geteuid())
	}
	if c.off == "" {
		m, err := cgroup.Open(cgroup.Options{Root: cfg.Root, Logger: a.log})
		if err != nil {
			c.off = err.Error()
		} else if err := probeCgroups(m); err != nil {
			m.Close()
			c.off = err.Error()
		} else {
			w, err := m.NewOOMWatcher()
			if err != nil {
				m.Close()
				c.off = err.Error()
			} else {
				c.m, c.w = m, w
			}
		}
	}
	if c.m == nil {
		a.log.Warn("cgroup policy off: containers run in the agent's cgroup with its oom_score_adj", "reason", c.off)
		return
	}
	c.appAdj, _ = cgroup.ReadOOMScoreAdj(os.Getpid())
	c.pods = map[string]bool{}
	c.oomSeen = map[podContainer]uint64{}
	c.lastErr = map[string]string{}
	c.groups = map[podContainer]cgroup.Group{}
	hr.Preparers = append(hr.Preparers, c)
	a.rt = &cgroupRuntime{Runtime: a.rt, c: c}
	a.checks = append(a.checks, driftCheck{a: a})
	a.log.Info("cgroup policy on", "root", c.m.Root(), "mode", c.m.Mode().String(),
		"reconcileInterval", cfg.ReconcileInterval.D())
}

// probeCgroups creates and removes a group, which proves the filesystem
// takes writes (a read-only or delegated-away mount fails here, once,
// rather than at every start).
func probeCgroups(m *cgroup.Manager) error {
	name := "probe-" + strconv.Itoa(os.Getpid())
	g, err := m.EnsurePod(name)
	if err != nil {
		return fmt.Errorf("cgroup fs at %s not writable: %w", m.Root(), err)
	}
	if err := m.Remove(g); err != nil {
		return fmt.Errorf("cgroup fs at %s: remove probe: %w", m.Root(), err)
	}
	return nil
}

// CgroupStatus reports the host-mode cgroup policy.
func (a *Agent) CgroupStatus() CgroupStatus {
	c := a.cg
	st := CgroupStatus{Writes: a.Switch(SwitchCgroupWrites)}
	switch {
	case c == nil:
		st.Reason = "not enabled in this agent"
	case c.m == nil:
		st.Reason = c.off
	default:
		st.Enabled = true
		st.Mode = c.m.Mode().String()
		st.Root = c.m.Root()
		st.ReconcileInterval = a.config().Node.Cgroup.ReconcileInterval.D().String()
		if !st.Writes {
			st.Reason = "switch cgroup-writes is off: nothing is written"
		}
	}
	return st
}

// Prepare implements Preparer: the container's groups exist, the pod's
// values are applied, and the child enters its group (and, for a sidecar,
// takes its oom_score_adj) before its command runs. A pod whose policy
// cannot be applied still has its containers placed, but nothing is
// written for it, and the error is an event.
func (c *hostCgroups) Prepare(ctx context.Context, pod *PodSpec, ct *ContainerSpec, s *StartSpec) error {
	if !c.a.Switch(SwitchCgroupWrites) {
		return nil
	}
	if err := c.ensurePod(pod); err != nil {
		c.podError(pod.Name, err)
		return nil // unconfined rather than not at all: said in the event
	}
	k := podContainer{pod.Name, ct.Name}
	c.mu.Lock()
	g := c.groups[k]
	c.mu.Unlock()
	files, err := c.m.ProcsFiles(g)
	if err != nil {
		c.podError(pod.Name, err)
		return nil
	}
	s.CgroupProcs = append(s.CgroupProcs, files...)
	t, ok, err := hostTarget(pod)
	if err == nil && ok {
		var res cgroup.Result
		res, err = c.m.Apply(ctx, t)
		c.reportDrift(res)
	}
	if err != nil {
		c.podError(pod.Name, err)
		return nil // nothing written for this pod: no oom_score_adj either
	}
	c.podOK(pod.Name)
	if ct.Role == RoleSidecar {
		adj := cgroup.SidecarOOMScoreAdj(c.appAdj)
		if pol, _ := pod.sidecarPolicy(); pol.OOMScoreAdj != nil {
			adj = *pol.OOMScoreAdj
		}
		s.OOMScoreAdj = &adj
	}
	return nil
}

// ensurePod creates the groups of every container of the pod and watches
// them for OOM kills, once per pod (and again after a reload changed it).
func (c *hostCgroups) ensurePod(pod *PodSpec) error {
	c.mu.Lock()
	done := c.pods[pod.Name]
	for _, ct := range pod.Containers {
		if _, ok := c.groups[podContainer{pod.Name, ct.Name}]; !ok {
			done = false
		}
	}
	c.mu.Unlock()
	if done {
		return nil
	}
	pg, err := c.m.EnsurePod(pod.Name)
	if err != nil {
		return err
	}
	var watch []cgroup.Container
	groups := map[podContainer]cgroup.Group{}
	for _, ct := range pod.Containers {
		g, err := c.m.EnsureContainer(pod.Name, ct.Name)
		if err != nil {
			return err
		}
		groups[podContainer{pod.Name, ct.Name}] = g
		watch = append(watch, cgroup.Container{Name: ct.Name, Group: g})
	}
	if err := c.w.Add(pod.Name, pg, watch); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, g := range groups {
		c.groups[k] = g
		if _, ok := c.oomSeen[k]; !ok {
			if n, err := c.oomKills(g); err == nil {
				c.oomSeen[k] = n
			}
		}
	}
	c.pods[pod.Name] = true
	return nil
}

// hostTarget is a host-mode pod as the cgroup package sees it. ok is false
// for a pod without a sidecar: its containers are placed, no value is set.
func hostTarget(p *PodSpec) (t cgroup.Target, ok bool, err error) {
	sidecars := p.byRole(RoleSidecar)
	if len(sidecars) == 0 {
		return t, false, nil
	}
	lim, err := p.Resources.limits()
	if err != nil {
		return t, false, fmt.Errorf("pod %s: resources: %w", p.Name, err)
	}
	pol, err := p.sidecarPolicy()
	if err != nil {
		return t, false, fmt.Errorf("pod %s: sidecarPolicy: %w", p.Name, err)
	}
	pg, err := cgroup.HostPodGroup(p.Name)
	if err != nil {
		return t, false, err
	}
	sg, err := cgroup.HostContainerGroup(p.Name, sidecars[0].Name)
	if err != nil {
		return t, false, err
	}
	t = cgroup.Target{Pod: p.Name, PodGroup: pg, Sidecar: cgroup.Container{Name: sidecars[0].Name, Group: sg},
		PodCPULimit: lim.CPUMillis, PodMemoryLimit: lim.MemoryBytes, OwnPod: true, Policy: pol}
	for _, ct := range p.byRole(RoleApp) {
		g, err := cgroup.HostContainerGroup(p.Name, ct.Name)
		if err != nil {
			return t, false, err
		}
		t.Apps = append(t.Apps, cgroup.Container{Name: ct.Name, Group: g})
	}
	return t, true, nil
}

// podError records a pod's failure once (until it changes or heals).
func (c *hostCgroups) podError(pod string, err error) {
	msg := err.Error()
	c.mu.Lock()
	same := c.lastErr[pod] == msg
	c.lastErr[pod] = msg
	c.mu.Unlock()
	if !same {
		c.a.record(Event{Time: time.Now(), Pod: pod, Type: EvCgroupError, Reason: msg})
	}
}

func (c *hostCgroups) podOK(pod string) {
	c.mu.Lock()
	delete(c.lastErr, pod)
	c.mu.Unlock()
}

// noteOOM feeds the machine an InOOM for every kill of the container's
// processes not yet fed, judged by the group's own oom_kill counter, so the
// watcher and the exit path never report one kill twice.
func (c *hostCgroups) noteOOM(pod, container string) {
	k := podContainer{pod, container}
	c.mu.Lock()
	g, ok := c.groups[k]
	c.mu.Unlock()
	if !ok {
		return
	}
	kills, err := c.oomKills(g)
	if err != nil {
		return // the group is gone: the pod was removed
	}
	c.mu.Lock()
	seen, known := c.oomSeen[k]
	if kills > seen || !known {
		c.oomSeen[k] = kills
	}
	c.mu.Unlock()
	if !known || kills <= seen {
		return
	}
	c.a.postToPod(pod, InOOM{Container: container})
}

// oomKills reads the group's own OOM kill counter (v1 memory.oom_control,
// v2 memory.events): one small read on every container exit, where the
// full Stats would cost milliseconds.
func (c *hostCgroups) oomKills(g cgroup.Group) (uint64, error) {
	f := filepath.Join(c.m.Root(), string(g), "memory.events")
	if c.m.Mode() != cgroup.ModeV2 {
		f = filepath.Join(c.m.Root(), "memory", string(g), "memory.oom_control")
	}
	b, err := os.ReadFile(f)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "oom_kill "); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("%s: no oom_kill counter", f)
}

// postToPod hands an input to a pod's loop unless the pod is gone.
func (a *Agent) postToPod(pod string, in Input) {
	a.mu.Lock()
	r := a.pods[pod]
	life := a.lives[pod]
	a.mu.Unlock()
	if r == nil || life.done == nil {
		return
	}
	select {
	case r.inbox <- in:
	case <-life.done:
	}
}

// run is the reconcile loop and the OOM watcher, until ctx ends.
func (c *hostCgroups) run(ctx context.Context) {
	every := c.a.config().Node.Cgroup.ReconcileInterval.D()
	if every <= 0 {
		every = DefaultReconcileInterval
	}
	events := make(chan cgroup.OOMEvent, 16)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := c.w.Run(ctx, events); err != nil {
			c.a.log.Error("oom watcher stopped", "err", err)
		}
	}()
	go func() {
		defer wg.Done()
		for {
			select {
			case e := <-events:
				c.noteOOM(e.Pod, e.Container)
			case <-ctx.Done():
				return
			}
		}
	}()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			wg.Wait()
			return
		case <-t.C:
			c.reconcile(ctx)
		}
	}
}

// targets are the pods whose groups exist, with their policy in force.
// Pods whose policy does not translate are returned as errors.
func (c *hostCgroups) targets() ([]cgroup.Target, map[string]error) {
	cfg := c.a.config()
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []cgroup.Target
	bad := map[string]error{}
	for i := range cfg.Pods {
		p := &cfg.Pods[i]
		if !c.pods[p.Name] {
			continue
		}
		t, ok, err := hostTarget(p)
		if err != nil {
			bad[p.Name] = err
			continue
		}
		if ok {
			out = append(out, t)
		}
	}
	return out, bad
}

// reconcile is one pass: drift is restored, counted and recorded.
func (c *hostCgroups) reconcile(ctx context.Context) cgroup.Result {
	if !c.a.Switch(SwitchCgroupWrites) {
		return cgroup.Result{}
	}
	targets, bad := c.targets()
	for pod, err := range bad {
		c.podError(pod, err)
	}
	res := c.m.Reconcile(ctx, targets)
	failed := map[string]bool{}
	for _, err := range res.Errors {
		var pe *cgroup.PodError
		if errors.As(err, &pe) {
			failed[pe.Pod] = true
			c.podError(pe.Pod, err)
		}
	}
	for _, t := range targets {
		if !failed[t.Pod] {
			c.podOK(t.Pod)
		}
	}
	c.reportDrift(res)
	return res
}

// reportDrift counts and records the corrections of drift of a pass.
func (c *hostCgroups) reportDrift(res cgroup.Result) {
	for _, w := range res.Corrections {
		if !w.Drift {
			continue
		}
		c.a.metrics.DriftCorrected(w.Pod, w.Container, string(w.Knob))
		e := Event{Time: time.Now(), Pod: w.Pod, Container: w.Container, Type: EvCgroupDrift,
			Reason: fmt.Sprintf("%s was %q, restored %q", w.Knob, w.Was, w.Value),
			Fields: map[string]string{"knob": string(w.Knob), "file": w.File, "was": w.Was, "now": w.Value}}
		if w.PID != 0 {
			e.PID = w.PID
		}
		c.a.record(e)
	}
}

// ReconcileCgroups runs one reconcile pass now (the loop runs one every
// node.cgroup.reconcileInterval) and returns what it did.
func (a *Agent) ReconcileCgroups(ctx context.Context) (cgroup.Result, error) {
	if a.cg == nil || a.cg.m == nil {
		return cgroup.Result{}, fmt.Errorf("cgroup policy off: %s", a.CgroupStatus().Reason)
	}
	return a.cg.reconcile(ctx), nil
}

// removePod deletes a retired pod's groups (its processes are gone).
func (c *hostCgroups) removePod(pod string) {
	if c == nil || c.m == nil {
		return
	}
	c.w.Remove(pod)
	c.mu.Lock()
	delete(c.pods, pod)
	delete(c.lastErr, pod)
	for k := range c.groups {
		if k.pod == pod {
			delete(c.groups, k)
			delete(c.oomSeen, k)
		}
	}
	c.mu.Unlock()
	g, err := cgroup.HostPodGroup(pod)
	if err != nil {
		return
	}
	if err := c.m.Remove(g); err != nil {
		c.a.log.Warn("cannot remove the pod's cgroups", "pod", pod, "err", err)
	}
}

// startFeatures starts the cgroup loop and the NRI plugin; the returned
// stop ends them once the pods are stopped (Run defers it).
func (a *Agent) startFeatures() (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	if c := a.cg; c != nil && c.m != nil {
		wg.Add(1)
		go func() { defer wg.Done(); c.run(ctx) }()
	}
	if n := a.nri; n != nil {
		wg.Add(1)
		go func() { defer wg.Done(); n.run(ctx) }()
	}
	return func() {
		cancel()
		wg.Wait()
		if c := a.cg; c != nil && c.m != nil {
			if a.config().Node.OnExit == "stop" {
				for _, r := range a.runners() {
					c.removePod(r.spec.Name)
				}
			}
			c.w.Close()
			c.m.Close()
		}
		if a.nri != nil {
			a.nri.kube.close()
		}
	}
}

// cgroupRuntime wraps the host runtime so that an OOM kill reaches the
// pod's machine before the exit it caused: the machine then records the
// restart with cause oom, whichever of the kernel's OOM notice and the
// process's exit the agent sees first.
type cgroupRuntime struct {
	Runtime
	c *hostCgroups
}

func (r *cgroupRuntime) Start(ctx context.Context, pod *PodSpec, c *ContainerSpec) (Process, error) {
	p, err := r.Runtime.Start(ctx, pod, c)
	if err != nil {
		return nil, err
	}
	return r.c.watchExit(pod.Name, c.Name, p), nil
}

// Stage passes staging through, attributing the staged process's exit as
// Start does.
func (r *cgroupRuntime) Stage(ctx context.Context, pod *PodSpec, c *ContainerSpec) (stagedStart, error) {
	sr, ok := r.Runtime.(stager)
	if !ok {
		return nil, nil
	}
	st, err := sr.Stage(ctx, pod, c)
	if err != nil || st == nil {
		return nil, err
	}
	return cgroupStaged{stagedStart: st, r: r, pod: pod.Name, c: c.Name}, nil
}

type cgroupStaged struct {
	stagedStart
	r      *cgroupRuntime
	pod, c string
}

func (s cgroupStaged) Go(ctx context.Context) (Process, error) {
	p, err := s.stagedStart.Go(ctx)
	if err != nil {
		return nil, err
	}
	return s.r.c.watchExit(s.pod, s.c, p), nil
}

func (r *cgroupRuntime) Adopt(ctx context.Context, pod *PodSpec, c *ContainerSpec, rec ProcessRecord) (Process, error) {
	p, err := r.Runtime.Adopt(ctx, pod, c, rec)
	if err != nil {
		return nil, err
	}
	if err := r.c.ensurePod(pod); err != nil {
		r.c.podError(pod.Name, err)
	}
	return r.c.watchExit(pod.Name, c.Name, p), nil
}

// watchExit attributes p's exit to an OOM kill, if it was one, before the
// supervisor learns of the exit.
func (c *hostCgroups) watchExit(pod, container string, p Process) Process {
	if h, ok := p.(exitHook); ok {
		h.OnExit(func() { c.noteOOM(pod, container) })
		return p
	}
	w := &oomProcess{Process: p, done: make(chan struct{}), released: make(chan struct{})}
	onExit(p, w.released, nil, func() {
		c.noteOOM(pod, container)
		close(w.done)
	})
	return w
}

// oomProcess delays Done until a kill of the container has been fed, for
// processes that cannot run a hook on exit.
type oomProcess struct {
	Process
	done     chan struct{}
	released chan struct{}
	once     sync.Once
}

func (p *oomProcess) Done() <-chan struct{} { return p.done }

func (p *oomProcess) Release() error {
	p.once.Do(func() { close(p.released) })
	return p.Process.Release()
}
