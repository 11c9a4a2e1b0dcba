package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/meshagent/meshagent/metrics"
)

// ops is the part of the Agent that serves the people who operate it:
// runtime switches (switches.go), metrics (metrics.go), config reload
// (reload.go), inspections (inspect.go) and the service manager.
type ops struct {
	sw       *switchBoard
	metrics  *metrics.Metrics
	mstate   *metricsState
	cfgPath  string
	notifier Notifier
	checks   []Check

	// reloadMu serialises reloads with each other, with start-up and
	// with the final stop; closing (under it) refuses reloads once the
	// agent stops.
	reloadMu sync.Mutex
	closing  bool
	lives    map[string]podLife // under Agent.mu
}

// podLife ends one pod's supervisor goroutine.
type podLife struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// Notifier is told of the agent's life: systemd.Notifier is one.
type Notifier interface {
	Ready() error
	Reloading() error
	Stopping() error
	Status(string) error
}

// WithMetrics makes the agent record its events in m (by default it makes
// its own) and serve it at /metrics.
func WithMetrics(m *metrics.Metrics) Option {
	return func(a *Agent) error {
		if m == nil {
			return errors.New("nil metrics")
		}
		a.metrics = m
		return nil
	}
}

// WithConfigPath names the file the agent reloads its config from (on
// SIGHUP or `meshagent ctl reload`); without it reload is refused.
func WithConfigPath(path string) Option {
	return func(a *Agent) error { a.cfgPath = path; return nil }
}

// WithNotifier tells n when the agent is ready (every pod supervised or
// adopted and the admin socket served), reloading, and stopping.
func WithNotifier(n Notifier) Option {
	return func(a *Agent) error { a.notifier = n; return nil }
}

// WithCheck adds an inspection to `meshagent ctl inspect`.
func WithCheck(c Check) Option {
	return func(a *Agent) error {
		if c == nil {
			return errors.New("nil check")
		}
		a.checks = append(a.checks, c)
		return nil
	}
}

func (a *Agent) initOps() error {
	a.lives = map[string]podLife{}
	sw, err := loadSwitches(a.cfg.Node.StateDir)
	if err != nil {
		return err
	}
	a.sw = sw
	if a.metrics == nil {
		m, err := metrics.New(metrics.Options{Logger: a.log})
		if err != nil {
			return err
		}
		a.metrics = m
	}
	a.mstate = &metricsState{sidecars: map[podContainer]sidecarMetric{}}
	// First, so the metrics see an event before any slower hook.
	a.hooks = append([]func(Event){a.observe}, a.hooks...)
	for _, s := range a.Switches() {
		a.metrics.Switch(s.Name, s.On)
	}
	a.checks = append(builtinChecks(a), a.checks...)
	return nil
}

// Metrics returns the agent's instrumentation, for features that report
// their own events (drift corrections, hand-offs, held fds).
func (a *Agent) Metrics() *metrics.Metrics { return a.metrics }

// serveMetrics serves /metrics on node.metricsAddr until the returned stop
// is called. A taken address fails the start: an agent that silently lost
// its metrics would look healthy to no one.
func (a *Agent) serveMetrics() (stop func(), err error) {
	addr := a.cfg.Node.MetricsAddr
	if addr == "off" || addr == "" {
		return func() {}, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("node.metricsAddr %s: %w", addr, err)
	}
	a.log.Info("serving metrics", "addr", ln.Addr().String())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := a.metrics.Serve(ctx, ln); err != nil {
			a.log.Error("metrics server", "addr", addr, "err", err)
		}
	}()
	return func() { cancel(); <-done }, nil
}

func (a *Agent) notifyReady() {
	if a.notifier == nil {
		return
	}
	_ = a.notifier.Status(fmt.Sprintf("supervising %d pods", len(a.runners())))
	if err := a.notifier.Ready(); err != nil {
		a.log.Warn("sd_notify", "err", err)
	}
}

// beginStop refuses further reloads and tells the service manager the
// ordered stop begins.
func (a *Agent) beginStop() {
	a.reloadMu.Lock()
	a.closing = true
	a.reloadMu.Unlock()
	if a.notifier != nil {
		if err := a.notifier.Stopping(); err != nil {
			a.log.Warn("sd_notify", "err", err)
		}
	}
}

// Health reports whether the agent works: every pod supervisor is alive and
// takes input before ctx ends, and the admin socket serves requests. The systemd watchdog pings
// only while it returns nil.
func (a *Agent) Health(ctx context.Context) error {
	if err := a.supervisorsAlive(); err != nil {
		return err
	}
	if err := a.pingSupervisors(ctx); err != nil {
		return err
	}
	sock := a.config().Node.AdminSocket
	var out map[string]any
	if err := NewClient(sock).Do(ctx, "GET", "/v1/health", nil, &out); err != nil {
		return fmt.Errorf("admin socket %s: %w", sock, err)
	}
	return nil
}

// config is the config in force (a reload replaces it).
func (a *Agent) config() *Config {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cfg
}

// inPing asks a pod's run loop to show it still turns; it never reaches
// the machine.
type inPing struct{ done chan struct{} }

func (inPing) input() {}

// pingSupervisors checks that every pod's loop takes an input before ctx
// ends: a loop stuck (in a start that never returns, say) fails it.
func (a *Agent) pingSupervisors(ctx context.Context) error {
	for _, r := range a.runners() {
		p := inPing{done: make(chan struct{})}
		if err := r.send(ctx, p); err != nil {
			return fmt.Errorf("pod %s: supervisor does not take input: %w", r.spec.Name, err)
		}
		select {
		case <-p.done:
		case <-ctx.Done():
			return fmt.Errorf("pod %s: supervisor does not answer: %w", r.spec.Name, ctx.Err())
		}
	}
	return nil
}

func (a *Agent) supervisorsAlive() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	for name, l := range a.lives {
		select {
		case <-l.done:
			return fmt.Errorf("pod %s: supervisor exited", name)
		default:
		}
	}
	return nil
}

// reloadTimeout bounds waiting for a pod's ordered stop during a reload.
func reloadTimeout(p *PodSpec) time.Duration { return stopBound(p) + 5*time.Second }
