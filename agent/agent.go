package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshagent/meshagent/startup"
)

// Agent supervises the pods of one node.
type Agent struct {
	cfg    *Config
	rt     Runtime
	log    *slog.Logger
	events *eventLog
	state  stateDir
	hooks  []func(Event)

	listeners startup.Listeners // shared by every pod's TCP probes

	mu    sync.Mutex
	pods  map[string]*podRunner
	order []string // pod names in config order

	podsCtx    context.Context // outlives Run's ctx so an ordered stop can finish
	podsCancel context.CancelFunc
	podsWG     sync.WaitGroup
	ready      chan struct{}

	ops // operations: switches, metrics, reload, inspections, systemd (ops.go)

	cg   *hostCgroups    // cgroup policy of host-mode pods (cgroup.go); nil when not wanted
	nri  *nriPlugin      // NRI plugin for Kubernetes sidecars (nri.go); nil when not configured
	kube *kubeSupervisor // Kubernetes mode, nil without node.kubernetes (kube_agent.go)
}

// Option configures an Agent.
type Option func(*Agent) error

// WithRuntime replaces the default host-process runtime.
func WithRuntime(rt Runtime) Option {
	return func(a *Agent) error {
		if rt == nil {
			return errors.New("nil runtime")
		}
		a.rt = rt
		return nil
	}
}

// WithLogger sets the agent's logger.
func WithLogger(l *slog.Logger) Option {
	return func(a *Agent) error { a.log = l; return nil }
}

// WithEventHook calls f with every event, after it is recorded. f must not
// block: it runs on the pod's goroutine.
func WithEventHook(f func(Event)) Option {
	return func(a *Agent) error { a.hooks = append(a.hooks, f); return nil }
}

// ErrNotFound means no such pod or container.
var ErrNotFound = errors.New("not found")

// New checks cfg and returns an agent ready to Run.
func New(cfg *Config, opts ...Option) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	a := &Agent{
		cfg: cfg, log: slog.Default(), events: newEventLog(2048),
		state: stateDir{dir: cfg.Node.StateDir},
		pods:  map[string]*podRunner{}, ready: make(chan struct{}),
	}
	for _, o := range opts {
		if err := o(a); err != nil {
			return nil, err
		}
	}
	if err := a.initOps(); err != nil {
		return nil, err
	}
	if a.rt == nil {
		a.rt = &HostRuntime{LogDir: filepath.Join(cfg.Node.StateDir, "logs")}
	}
	a.initCgroups() // cgroup.go
	a.initNRI()     // nri.go
	if err := a.initKube(); err != nil {
		return nil, err
	}
	return a, nil
}

// Ready is closed once the agent serves its admin socket and has started
// (or adopted) every pod.
func (a *Agent) Ready() <-chan struct{} { return a.ready }

// Run supervises the pods until ctx ends, then stops them in order (or,
// with node.onExit: leave, leaves them running for the next agent).
func (a *Agent) Run(ctx context.Context) error {
	lock, err := a.state.lock()
	if err != nil {
		return err
	}
	defer lock.Close()
	ln, err := listenAdmin(a.cfg.Node.AdminSocket, a.cfg.Node.AdminGroup)
	if err != nil {
		return err
	}
	srv := newAdminServer(a)
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		_ = os.Remove(a.cfg.Node.AdminSocket)
	}()

	stopMetrics, err := a.serveMetrics()
	if err != nil {
		return err
	}
	defer stopMetrics()

	stopKube, err := a.startKube()
	if err != nil {
		return err
	}
	defer stopKube()

	a.podsCtx, a.podsCancel = context.WithCancel(context.Background())
	defer a.podsCancel()
	stopFeatures := a.startFeatures() // cgroup.go: after the pods, before the admin socket
	defer stopFeatures()
	a.reloadMu.Lock() // a reload waits for start-up to finish
	for i := range a.cfg.Pods {
		a.addPod(&a.cfg.Pods[i])
	}
	a.gcState()
	a.waitStarted()
	close(a.ready)
	a.log.Info("meshagent running", "pods", len(a.cfg.Pods), "admin", a.cfg.Node.AdminSocket)
	a.notifyReady() // before a waiting reload can send RELOADING=1
	a.reloadMu.Unlock()

	select {
	case <-ctx.Done():
	case err := <-serveErr:
		a.log.Error("admin socket failed", "err", err)
	}
	a.beginStop() // no reload from here on; tells systemd STOPPING=1
	if a.cfg.Node.OnExit == "stop" {
		a.stopAll()
	} else {
		a.log.Info("leaving pods running for the next agent to adopt")
	}
	a.podsCancel()
	a.podsWG.Wait()
	return nil
}

// waitStarted waits until every pod has taken its start (left the stopped
// phase), so "ready" means supervising: what ctl shows is the pods being
// started, not a pod that has not been looked at yet. Starting is quick (a
// fork and exec per sidecar); the bound only guards against a stuck runtime.
func (a *Agent) waitStarted() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, r := range a.runners() {
		if err := r.waitPhase(ctx, PhasePending, PhaseRunning, PhaseFailed); err != nil {
			a.log.Warn("pod not started yet at start-up", "pod", r.spec.Name, "err", err)
		}
	}
}

func (a *Agent) addPod(spec *PodSpec) {
	r := newPodRunner(spec, a.rt, a.state, a.log, a.record, hxHooks{
		holding: func() bool { return a.Switch(SwitchHandoffStore) },
		held:    func(container string, n int) { a.metrics.FDsHeld(spec.Name, container, n) },
	})
	r.listeners = &a.listeners
	r.adopt(a.podsCtx)
	// Each pod has its own context so a reload can retire one pod.
	ctx, cancel := context.WithCancel(a.podsCtx)
	done := make(chan struct{})
	a.sw.mu.Lock() // see SetSwitch
	a.mu.Lock()
	a.pods[spec.Name] = r
	a.order = append(a.order, spec.Name)
	a.lives[spec.Name] = podLife{cancel: cancel, done: done}
	a.mu.Unlock()
	_ = r.send(ctx, a.sw.machineInput())
	// The stores opened before the switch lock was taken: a flip since
	// then did not reach this pod (handoff_switch.go).
	r.hx.setHolding(a.sw.onLocked(SwitchHandoffStore))
	a.sw.mu.Unlock()
	a.podsWG.Add(1)
	go func() {
		defer a.podsWG.Done()
		defer close(done)
		r.run(ctx)
	}()
	_ = r.send(ctx, InStart{})
}

// gcState warns about state files of pods no longer configured: their
// processes, if any still run, are left alone rather than killed blind.
func (a *Agent) gcState() {
	names, err := a.state.pods()
	if err != nil {
		a.log.Warn("cannot list state dir", "err", err)
		return
	}
	for _, n := range names {
		if a.runner(n) == nil {
			a.log.Warn("state dir holds a pod that is not in the config; its processes are left alone", "pod", n)
		}
	}
}

// stopAll stops every pod in order (apps, then sidecars), all pods at once,
// bounded by the longest grace periods.
func (a *Agent) stopAll() {
	var bound time.Duration
	for _, r := range a.runners() {
		bound = max(bound, stopBound(r.spec))
	}
	ctx, cancel := context.WithTimeout(context.Background(), bound+5*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for _, r := range a.runners() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = r.send(ctx, InStop{})
			if err := r.waitPhase(ctx, PhaseStopped); err != nil {
				a.log.Error("ordered stop did not finish", "pod", r.spec.Name, "err", err)
			}
		}()
	}
	wg.Wait()
}

// record is the sink of every pod's events.
func (a *Agent) record(e Event) {
	e = a.events.add(e)
	attrs := []any{"pod", e.Pod}
	if e.Container != "" {
		attrs = append(attrs, "container", e.Container)
	}
	if e.PID != 0 {
		attrs = append(attrs, "pid", e.PID)
	}
	if e.Type == EvState {
		attrs = append(attrs, "from", e.From, "to", e.To)
	}
	if e.Reason != "" {
		attrs = append(attrs, "reason", e.Reason)
	}
	for k, v := range e.Fields {
		attrs = append(attrs, k, v)
	}
	if e.Duration != 0 {
		attrs = append(attrs, "duration", e.Duration)
	}
	level := slog.LevelInfo
	switch e.Type {
	case EvStartupTimeout, EvCrashLoop, EvHang, EvOOMKill, EvStartFailed:
		level = slog.LevelWarn
	}
	a.log.Log(context.Background(), level, e.Type, attrs...)
	for _, h := range a.hooks {
		h(e)
	}
}

func (a *Agent) runner(name string) *podRunner {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.pods[name]
}

func (a *Agent) runners() []*podRunner {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]*podRunner, 0, len(a.order))
	for _, n := range a.order {
		out = append(out, a.pods[n])
	}
	return out
}

// Pods returns every pod's status in config order.
func (a *Agent) Pods() []PodStatus {
	var out []PodStatus
	for _, r := range a.runners() {
		out = append(out, r.status())
	}
	return append(out, a.kubePods()...)
}

// Pod returns one pod's status.
func (a *Agent) Pod(name string) (PodStatus, error) {
	r := a.runner(name)
	if r == nil {
		return a.kubePod(name)
	}
	return r.status(), nil
}

// RestartContainer restarts one container alone (its stop signal, grace,
// then a fresh start); the rest of the pod is untouched.
func (a *Agent) RestartContainer(ctx context.Context, pod, container, cause string) error {
	r := a.runner(pod)
	if r == nil {
		return a.kubeRestart(pod, container, cause)
	}
	if r.spec.Container(container) == nil {
		return fmt.Errorf("pod %q container %q: %w", pod, container, ErrNotFound)
	}
	return r.send(ctx, InRestart{Container: container, Cause: cause})
}

// RestartPod stops the pod in order and starts it again, sidecars first.
func (a *Agent) RestartPod(ctx context.Context, pod string) error {
	r := a.runner(pod)
	if r == nil {
		return fmt.Errorf("pod %q: %w", pod, ErrNotFound)
	}
	return r.send(ctx, InRestartPod{})
}

// Events returns recorded events after seq since, at most limit.
func (a *Agent) Events(since uint64, limit int) []Event { return a.events.since(since, limit) }

// WaitPod blocks until pod reaches one of phases.
func (a *Agent) WaitPod(ctx context.Context, pod string, phases ...Phase) error {
	r := a.runner(pod)
	if r == nil {
		return fmt.Errorf("pod %q: %w", pod, ErrNotFound)
	}
	return r.waitPhase(ctx, phases...)
}

// listenAdmin opens the admin socket: owner-only (or group-readable when a
// group is configured), refusing to take over one that still answers.
func listenAdmin(path, group string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", path, err)
	}
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("admin socket %s: another meshagent answers on it", path)
	}
	_ = os.Remove(path)
	// No window in which the socket exists with looser permissions: the
	// umask applies at bind. Run calls this before any other goroutine of
	// the agent creates files.
	old := unix.Umask(0o177)
	ln, err := net.Listen("unix", path)
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", path, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	mode := os.FileMode(0o600)
	if group != "" {
		gid, err := lookupGroup(group)
		if err != nil {
			ln.Close()
			return nil, fmt.Errorf("admin socket %s: %w", path, err)
		}
		if err := os.Chown(path, -1, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("admin socket %s: %w", path, err)
		}
		mode = 0o660
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin socket %s: %w", path, err)
	}
	return ln, nil
}

// stopBound is the longest an ordered stop of p can take: the apps' longest
// grace period, then the sidecars'.
func stopBound(p *PodSpec) time.Duration {
	var apps, sidecars time.Duration
	for _, c := range p.Containers {
		if c.Role == RoleApp {
			apps = max(apps, c.Stop.Grace.D())
		} else {
			sidecars = max(sidecars, c.Stop.Grace.D())
		}
	}
	return apps + sidecars
}
