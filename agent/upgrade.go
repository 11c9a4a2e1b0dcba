package agent

import (
	"context"
	"errors"
	"fmt"
	"github.com/meshagent/meshagent/metrics"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/meshagent/meshagent/startup"
)

// A hot upgrade replaces a running sidecar's process with a new version
// while the pod's app keeps running and the sidecar's clients notice
// nothing:
//
//  1. The runner starts the new process beside the old one, with the held
//     listeners (LISTEN_FDS), as a "shadow" the machine does not know. The
//     old process keeps serving on the same sockets meanwhile.
//  2. It waits for the new process to be ready: READY=1 on the notify
//     socket when the sidecar has one (a probe of a shared port could be
//     answered by the old process), else the configured readiness check.
//     Not ready within upgrade.readyTimeout, or exited: the new process is
//     killed and the upgrade rolled back; the old one never stopped.
//  3. One machine input, InSwap, makes the new pid the container's process;
//     the spec used for later restarts becomes the new command, args and
//     version. The old process gets its stop signal, drains within its
//     grace period, then SIGKILL. Its exit is stale to the machine.
//  4. For upgrade.watch after the swap, an exit of the new process puts the
//     old spec back before the machine restarts the container: the old
//     version comes back on the same held sockets (rolled back).
//
// One upgrade per sidecar at a time. The caller gets the outcome when the
// watch window is over; the upgrade does not depend on the caller staying.

// Upgrade outcomes and events.
const (
	UpgradeSucceeded  = "succeeded"
	UpgradeRolledBack = "rolled-back"

	EvUpgradeStarted    = "upgrade-started"
	EvUpgradeSucceeded  = "upgrade-succeeded"
	EvUpgradeRolledBack = "upgrade-rolled-back"
)

// Upgrade errors; the admin API maps them to 409 and 400.
var (
	ErrUpgradeBusy    = errors.New("an upgrade of this sidecar is already running")
	ErrUpgradeState   = errors.New("sidecar cannot be upgraded now")
	ErrUpgradeInvalid = errors.New("invalid upgrade")
)

// UpgradeRequest names the new version of a sidecar.
type UpgradeRequest struct {
	// Command is the new executable (required).
	Command string `json:"command"`
	// Args replace the current arguments; nil keeps them.
	Args []string `json:"args,omitempty"`
	// Version is the declared version of the new process.
	Version string `json:"version,omitempty"`
}

// UpgradeResult is what became of an upgrade.
type UpgradeResult struct {
	Pod         string `json:"pod"`
	Container   string `json:"container"`
	Outcome     string `json:"outcome"` // succeeded or rolled-back
	Reason      string `json:"reason,omitempty"`
	FromVersion string `json:"fromVersion,omitempty"`
	ToVersion   string `json:"toVersion,omitempty"`
	OldPID      int    `json:"oldPid"`
	// NewPID is the upgraded process (0 when it never started).
	NewPID int `json:"newPid,omitempty"`
	// ReadyAfter is the time from the new process's start to its readiness.
	ReadyAfter time.Duration `json:"readyAfterNs,omitempty"`
	Duration   time.Duration `json:"durationNs"`
}

// upgradeWatch is an upgraded process within its watch window; the runner
// goroutine alone touches it.
type upgradeWatch struct {
	newPID int
	old    ContainerSpec
	until  time.Time
	rolled chan string // the new process's exit status, when it exited in time
}

// Upgrade replaces pod/container's process with req's command, keeping its
// listeners, and returns the outcome once the watch window is over. It
// returns an error wrapping ErrNotFound, ErrUpgradeInvalid, ErrUpgradeState
// or ErrUpgradeBusy when the upgrade did not begin; a rolled-back upgrade
// is an outcome, not an error.
func (a *Agent) Upgrade(ctx context.Context, pod, container string, req UpgradeRequest) (UpgradeResult, error) {
	r := a.runner(pod)
	if r == nil {
		return UpgradeResult{}, fmt.Errorf("pod %q: %w", pod, ErrNotFound)
	}
	if !a.Switch(SwitchHotUpgrade) {
		return UpgradeResult{}, fmt.Errorf("pod %s container %s: %w: the %s switch is off", pod, container, ErrUpgradeState, SwitchHotUpgrade)
	}
	if why := r.hx.upgradeRefusal(container); why != "" {
		return UpgradeResult{}, fmt.Errorf("pod %s container %s: %w: %s", pod, container, ErrUpgradeState, why)
	}
	// The upgrade lives as long as the pod, not the request: a caller
	// that goes away does not leave a half-done upgrade behind.
	return r.upgrade(a.podsCtx, container, req)
}

// runnerCall runs f on the runner goroutine (which owns procs and the
// machine).
type runnerCall struct{ f func() }

func (runnerCall) input() {}

// call runs f on the runner goroutine and waits for it.
func (r *podRunner) call(ctx context.Context, f func()) error {
	done := make(chan struct{})
	select {
	case r.inbox <- runnerCall{f: func() { f(); close(done) }}:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// event records e on the runner goroutine, like the machine's events.
func (r *podRunner) event(ctx context.Context, e Event) {
	_ = r.call(ctx, func() {
		e.Pod, e.Time = r.spec.Name, time.Now()
		r.sink(e)
	})
}

func (ph *podHandoff) lockUpgrade(container string, bound time.Duration) bool {
	ph.mu.Lock()
	defer ph.mu.Unlock()
	if ph.busy[container] != nil {
		return false
	}
	ph.busy[container] = &upgradeRun{began: time.Now(), bound: bound, stage: stageChecking}
	return true
}

func (r *podRunner) upgrade(ctx context.Context, name string, req UpgradeRequest) (UpgradeResult, error) {
	where := r.spec.Name + "/" + name
	c := r.spec.Container(name)
	switch {
	case c == nil:
		return UpgradeResult{}, fmt.Errorf("pod %q container %q: %w", r.spec.Name, name, ErrNotFound)
	case c.Role != RoleSidecar:
		return UpgradeResult{}, fmt.Errorf("%s: %w: only sidecars are upgraded in place (role %s); restart an app instead", where, ErrUpgradeInvalid, c.Role)
	case strings.TrimSpace(req.Command) == "":
		return UpgradeResult{}, fmt.Errorf("%s: %w: command: required", where, ErrUpgradeInvalid)
	}
	if !r.hx.lockUpgrade(name, upgradeBound(c)) {
		return UpgradeResult{}, fmt.Errorf("%s: %w; wait for its outcome", where, ErrUpgradeBusy)
	}
	defer r.hx.unlockUpgrade(name)

	var (
		old     Process
		oldSpec ContainerSpec
		st      ContainerStatus
		phase   Phase
	)
	if err := r.call(ctx, func() {
		r.mu.Lock()
		st, _ = r.m.Container(name)
		phase = r.m.Phase
		oldSpec = *c
		oldSpec.Args = append([]string(nil), c.Args...)
		r.mu.Unlock()
		old = r.procs[name]
	}); err != nil {
		return UpgradeResult{}, fmt.Errorf("%s: %w", where, err)
	}
	if st.State != StateReady || phase != PhaseRunning || old == nil || old.PID() != st.PID {
		return UpgradeResult{}, fmt.Errorf("%s: %w: it is %s in a %s pod; only a ready sidecar of a running pod is upgraded", where, ErrUpgradeState, st.State, phase)
	}
	newSpec := oldSpec
	newSpec.Command, newSpec.Version = req.Command, req.Version
	if req.Args != nil {
		newSpec.Args = append([]string(nil), req.Args...)
	}
	if _, err := resolveCommand(&newSpec); err != nil {
		return UpgradeResult{}, fmt.Errorf("%s: %w: %w", where, ErrUpgradeInvalid, err)
	}

	began := time.Now()
	res := UpgradeResult{Pod: r.spec.Name, Container: name, FromVersion: oldSpec.Version, ToVersion: newSpec.Version, OldPID: old.PID()}
	r.event(ctx, Event{Type: EvUpgradeStarted, Container: name, PID: old.PID(),
		Fields: map[string]string{"from": oldSpec.Version, "to": newSpec.Version, "command": newSpec.Command}})
	rolledBack := func(reason string) (UpgradeResult, error) {
		res.Outcome, res.Reason, res.Duration = UpgradeRolledBack, reason, time.Since(began)
		r.event(ctx, Event{Type: EvUpgradeRolledBack, Container: name, PID: res.NewPID, Reason: reason, Duration: res.Duration,
			Fields: map[string]string{"from": oldSpec.Version, "to": newSpec.Version, "why": rollbackWhy(reason)}})
		return res, nil
	}

	// 1. The new process, beside the old one, on the held sockets.
	r.hx.upgradeStage(name, stageStarting, 0)
	h := r.hx.get(name)
	sctx, end := ctx, func(int) {}
	var notified <-chan struct{}
	if h != nil {
		notified = h.expectShadow()
		if h.notify == nil {
			notified = nil
		}
		end = h.beginStart(true)
		sctx = WithPreparers(ctx, h)
	}
	p, err := r.rt.Start(sctx, r.spec, &newSpec)
	if err != nil {
		end(0)
		if h != nil {
			h.endShadow(false)
		}
		return rolledBack("new version did not start: " + err.Error())
	}
	end(p.PID())
	res.NewPID = p.PID()
	started := time.Now()
	r.hx.upgradeStage(name, stageReady, p.PID())

	// 2. Its readiness, within the fuse.
	if reason := r.waitShadowReady(ctx, &newSpec, p, notified); reason != "" {
		killWait(p)
		if h != nil {
			h.endShadow(false)
		}
		return rolledBack(reason)
	}
	res.ReadyAfter = time.Since(started)

	// 3. The swap, on the runner goroutine.
	r.hx.upgradeStage(name, stageSwap, p.PID())
	w := &upgradeWatch{newPID: p.PID(), old: oldSpec, until: time.Now().Add(c.Upgrade.Watch.D()), rolled: make(chan string, 1)}
	swapped := false
	err = r.call(ctx, func() {
		prev := r.procs[name]
		r.procs[name] = p
		r.apply(InSwap{Container: name, Old: old.PID(), PID: p.PID()})
		r.mu.Lock()
		now, _ := r.m.Container(name)
		if now.PID == p.PID() {
			swapped = true
			c.Command, c.Args, c.Version = newSpec.Command, newSpec.Args, newSpec.Version
		}
		r.mu.Unlock()
		if !swapped {
			r.procs[name] = prev
			return
		}
		r.watch(name, p)
		if h != nil {
			h.endShadow(true)
		}
		r.hx.watches[name] = w
	})
	if err != nil || !swapped {
		killWait(p)
		if h != nil {
			h.endShadow(false)
		}
		reason := "the pod is stopping"
		if st, ok := r.containerStatus(name); ok && st.PID != old.PID() {
			reason = fmt.Sprintf("the sidecar changed meanwhile (%s, pid %d)", st.State, st.PID)
		}
		return rolledBack("new version ready but not swapped in: " + reason)
	}

	// 4. The old process drains and goes; the watch window runs meanwhile.
	r.hx.upgradeStage(name, stageDrain, p.PID())
	stopProcess(ctx, old, c.Stop)
	r.hx.upgradeStage(name, stageWatch, p.PID())
	t := time.NewTimer(time.Until(w.until))
	defer t.Stop()
	select {
	case status := <-w.rolled:
		return rolledBack("new version exited within the watch window (" + status + "); the old version restarts on the same sockets")
	case <-t.C:
	case <-ctx.Done():
	}
	var status string
	_ = r.call(ctx, func() {
		if r.hx.watches[name] == w {
			delete(r.hx.watches, name)
		}
		select {
		case status = <-w.rolled:
		default:
		}
	})
	if status != "" {
		return rolledBack("new version exited within the watch window (" + status + "); the old version restarts on the same sockets")
	}
	res.Outcome, res.Duration = UpgradeSucceeded, time.Since(began)
	r.event(ctx, Event{Type: EvUpgradeSucceeded, Container: name, PID: res.NewPID, Duration: res.Duration,
		Fields: map[string]string{"from": oldSpec.Version, "to": newSpec.Version, "oldPid": fmt.Sprint(res.OldPID)}})
	return res, nil
}

func (r *podRunner) containerStatus(name string) (ContainerStatus, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.m.Container(name)
}

// beforeInput runs on the runner goroutine before the machine sees in: an
// upgraded process that exits within its watch window gets the old spec
// back first, so the machine's restart starts the old version.
func (r *podRunner) beforeInput(in Input) {
	e, ok := in.(InExited)
	if !ok {
		return
	}
	if h := r.hx.get(e.Container); h != nil {
		h.forget(e.PID) // a pid that may be reused must not stay authorized
	}
	w := r.hx.watches[e.Container]
	if w == nil || w.newPID != e.PID {
		return
	}
	delete(r.hx.watches, e.Container)
	r.mu.Lock()
	phase := r.m.Phase
	r.mu.Unlock()
	if time.Now().After(w.until) || phase == PhaseStopping || phase == PhaseStopped {
		return
	}
	c := r.spec.Container(e.Container)
	r.mu.Lock()
	c.Command, c.Args, c.Version = w.old.Command, w.old.Args, w.old.Version
	r.mu.Unlock()
	r.log.Warn("upgraded sidecar exited within its watch window: rolling back", "container", e.Container,
		"pid", e.PID, "status", e.Status, "version", w.old.Version)
	w.rolled <- e.Status
}

// waitShadowReady waits for an upgrade's new process to be ready and
// returns "" when it is, else why not.
func (r *podRunner) waitShadowReady(ctx context.Context, c *ContainerSpec, p Process, notified <-chan struct{}) string {
	timeout := c.Upgrade.ReadyTimeout.D()
	tctx, cancel := context.WithTimeout(ctx, timeout)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	probed := make(chan struct{})
	if notified == nil {
		probe := newProbe(c, nil) // the shadow shares its predecessor's listeners: only a connect tells
		if probe == nil {
			return "" // nothing tells readiness: started is ready
		}
		rd := c.Readiness
		sched := startup.Schedule{Period: rd.Period.D(), Timeout: rd.Timeout.D(), Fast: rd.StartupInterval.D()}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var once sync.Once
			startup.Watch(tctx, probe, sched, func(res startup.Result) {
				if res.OK() {
					once.Do(func() { close(probed) })
				}
			})
		}()
	}
	select {
	case <-notified:
		return ""
	case <-probed:
		return ""
	case <-p.Done():
		return "new version exited before it was ready: " + p.Exit().String()
	case <-tctx.Done():
		if ctx.Err() != nil {
			return "the agent is stopping"
		}
		how := "READY=1 on the notify socket"
		if notified == nil {
			how = "its readiness check"
		}
		return fmt.Sprintf("new version not ready within upgrade.readyTimeout %s (waited for %s)", timeout, how)
	}
}

// stopProcess sends p its stop signal, waits its grace period, then kills.
func stopProcess(ctx context.Context, p Process, sp StopPolicy) {
	sig, err := ParseSignal(sp.Signal)
	if err != nil {
		sig = syscall.SIGTERM
	}
	_ = p.Signal(sig)
	t := time.NewTimer(sp.Grace.D())
	defer t.Stop()
	select {
	case <-p.Done():
	case <-t.C:
		killWait(p)
	case <-ctx.Done():
	}
}

// killWait SIGKILLs p's process group and waits (boundedly) for the exit.
func killWait(p Process) {
	_ = p.Signal(syscall.SIGKILL)
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case <-p.Done():
	case <-t.C:
	}
}

// rollbackWhy sorts a rollback reason into the bounded set the metrics use.
func rollbackWhy(reason string) string {
	switch {
	case strings.Contains(reason, "watch window"), strings.Contains(reason, "exited before it was ready"):
		return metrics.ReasonCrashed
	case strings.Contains(reason, "not ready"):
		return metrics.ReasonNotReady
	case strings.Contains(reason, "did not start"):
		return metrics.ReasonFDTransfer
	case strings.Contains(reason, "context canceled"):
		return metrics.ReasonCanceled
	}
	return metrics.ReasonOther
}
