package agent

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/meshagent/meshagent/agent/containerd"
)

// KubePodInfo identifies a Kubernetes pod in the admin API.
type KubePodInfo struct {
	Namespace  string `json:"namespace"`
	Name       string `json:"name"`
	UID        string `json:"uid"`
	SandboxID  string `json:"sandboxID"`
	SandboxPID int    `json:"sandboxPID,omitempty"`
	Job        string `json:"job,omitempty"`
}

// initKube sets up Kubernetes mode when the config asks for it. The
// containerd client does not connect yet: Run retries until containerd
// answers.
func (a *Agent) initKube() error {
	k := a.cfg.Node.Kubernetes
	if k == nil {
		return nil
	}
	cli, err := containerd.New(k.Containerd, containerd.WithResync(time.Second, k.Resync.D()))
	if err != nil {
		return fmt.Errorf("node.kubernetes.containerd: %w", err)
	}
	a.kube = newKubeSupervisor(a, k, cli)
	a.kube.closeRT = cli.Close
	return nil
}

// startKube serves the gate socket and follows containerd until the
// returned func is called.
func (a *Agent) startKube() (stop func(), err error) {
	s := a.kube
	if s == nil {
		return func() {}, nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.life = ctx
	stopGate, err := s.serveGate(ctx)
	if err != nil {
		cancel()
		return nil, err
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := s.run(ctx); err != nil {
			a.log.Error("kubernetes supervisor", "err", err)
		}
	}()
	a.log.Info("kubernetes mode", "containerd", s.cfg.Containerd, "gate", s.cfg.GateSocket)
	return func() {
		cancel()
		stopGate()
		wg.Wait()
		if s.closeRT != nil {
			_ = s.closeRT()
		}
	}, nil
}

// WaitKubeSynced blocks until the agent has listed containerd once (every
// pod that existed before it started is in its model), or ctx ends.
func (a *Agent) WaitKubeSynced(ctx context.Context) error {
	if a.kube == nil {
		return fmt.Errorf("kubernetes mode is off (no node.kubernetes)")
	}
	return a.kube.synced.Wait(ctx)
}

// kubePods returns the Kubernetes pods, sorted by namespace and name.
func (a *Agent) kubePods() []PodStatus {
	s := a.kube
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]PodStatus, 0, len(s.pods))
	for _, p := range s.pods {
		out = append(out, p.status())
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Name != out[j].Name {
			return out[i].Name < out[j].Name
		}
		return out[i].Kubernetes.SandboxID < out[j].Kubernetes.SandboxID
	})
	return out
}

// kubePod returns one Kubernetes pod by namespace/name, or by name alone
// when only one namespace has it.
func (a *Agent) kubePod(name string) (PodStatus, error) {
	s := a.kube
	if s == nil {
		return PodStatus{}, fmt.Errorf("pod %q: %w", name, ErrNotFound)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p, err := s.lookup(name)
	if err != nil {
		return PodStatus{}, err
	}
	return p.status(), nil
}

// lookup finds a running pod (its sandbox not stopped) by namespace/name or
// name. Called with s.mu held.
func (s *kubeSupervisor) lookup(name string) (*kubePod, error) {
	var found []*kubePod
	for _, p := range s.pods {
		if p.ref.String() == name || (!strings.Contains(name, "/") && p.ref.Name == name) {
			found = append(found, p)
		}
	}
	if len(found) > 1 {
		// Several sandboxes: prefer the live one (kubelet may keep a dead
		// sandbox of the same pod around for a while).
		live := found[:0:0]
		for _, p := range found {
			if p.sandbox != nil && taskRunning(p.sandbox.status) {
				live = append(live, p)
			}
		}
		if len(live) == 1 {
			return live[0], nil
		}
		var names []string
		for _, p := range found {
			names = append(names, p.ref.String())
		}
		return nil, fmt.Errorf("pod %q is ambiguous (%s): give namespace/name", name, strings.Join(names, ", "))
	}
	if len(found) == 0 {
		return nil, fmt.Errorf("pod %q: %w", name, ErrNotFound)
	}
	return found[0], nil
}

// kubeRestart stops one container of a Kubernetes pod alone; kubelet
// starts it again. cause is recorded with its stop and its restart.
func (a *Agent) kubeRestart(pod, container, cause string) error {
	s := a.kube
	if s == nil {
		return fmt.Errorf("pod %q: %w", pod, ErrNotFound)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p, err := s.lookup(pod)
	if err != nil {
		return err
	}
	c := p.latest(container)
	if c == nil {
		return fmt.Errorf("pod %q container %q: %w", p.ref.String(), container, ErrNotFound)
	}
	if !taskRunning(c.status) {
		return fmt.Errorf("pod %q container %q has no running task: %w", p.ref.String(), container, ErrNotFound)
	}
	if c.stopCause != "" {
		return nil // being stopped already
	}
	s.stop(s.life, p, c, cause)
	return nil
}

// status is the pod as `meshagent ctl pods` shows it. Called with s.mu held.
func (p *kubePod) status() PodStatus {
	st := PodStatus{
		Name:  p.ref.String(),
		Phase: PhasePending,
		Kubernetes: &KubePodInfo{
			Namespace: p.ref.Namespace, Name: p.ref.Name, UID: p.ref.UID, SandboxID: p.id, Job: p.pol.Job,
		},
	}
	switch {
	case p.sandbox == nil || !taskRunning(p.sandbox.status):
		st.Phase = PhaseStopped
	case p.gate.IsOpen():
		st.Phase = PhaseRunning
	case p.failed:
		st.Phase = PhaseFailed
	}
	if p.sandbox != nil {
		st.Kubernetes.SandboxPID = int(p.sandbox.pid)
	}
	for _, c := range p.current() {
		cs := ContainerStatus{Name: c.name, Role: RoleApp, PID: int(c.pid), Ready: c.ready, Restarts: c.restarts, Started: c.started}
		if c.role == containerd.RoleSidecar {
			cs.Role = RoleSidecar
		}
		switch {
		case c.stopCause != "" && taskRunning(c.status):
			cs.State = StateStopping
		case c.status == containerd.StatusRunning || c.status == containerd.StatusPaused:
			cs.State = StateRunning
			if c.ready && c.role == containerd.RoleSidecar {
				cs.State = StateReady
			}
		case c.status == containerd.StatusCreated:
			cs.State = StateStarting
		case c.status == containerd.StatusStopped:
			cs.State = StateExited
			cs.LastExit = exitText(c.exit)
			if c.exitCause != "" {
				cs.LastExit += " (" + c.exitCause + ")"
			}
			cs.PID = 0
		default:
			cs.State = StateWaiting
			cs.PID = 0
		}
		st.Containers = append(st.Containers, cs)
	}
	return st
}
