package agent

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"time"
)

// A reload reads the config file again and brings the pods in line with it:
// pods that are new start (sidecars first), pods that are gone get an
// ordered stop and are forgotten (state file, metrics), pods whose spec
// changed get an ordered stop and start again with the new spec, and every
// other pod is not touched (same processes, same pids). A file that does
// not load or validate is refused with the reason and nothing changes.
// Node settings that only take effect at start-up are reported, not applied.

// EvReload is the event of a reload, taken or refused (Pod is empty).
const EvReload = "reload"

// ErrReloadRefused wraps the reason a new config was not taken.
var ErrReloadRefused = errors.New("reload refused")

// ReloadResult says what a reload did.
type ReloadResult struct {
	Added     []string `json:"added"`
	Removed   []string `json:"removed"`
	Restarted []string `json:"restarted"` // spec changed: ordered stop, then started with the new spec
	Unchanged []string `json:"unchanged"`
	// NotApplied lists node settings that changed in the file but only
	// take effect when the agent starts again.
	NotApplied []string `json:"notApplied,omitempty"`
	// Errors are pods whose ordered stop did not finish in time.
	Errors []string `json:"errors,omitempty"`
}

// Reload loads the config file again and applies it. An invalid file is
// refused with an error wrapping ErrReloadRefused; the old config stays.
func (a *Agent) Reload(ctx context.Context) (ReloadResult, error) {
	a.reloadMu.Lock()
	defer a.reloadMu.Unlock()
	if a.closing {
		// No RELOADING=1 (nor READY=1) after STOPPING=1.
		return ReloadResult{}, fmt.Errorf("%w: the agent is stopping", ErrReloadRefused)
	}
	if a.notifier != nil {
		_ = a.notifier.Reloading()
		defer func() {
			_ = a.notifier.Ready()
		}()
	}
	res, err := a.reload(ctx)
	a.metrics.ConfigReload(err)
	ev := Event{Time: time.Now(), Type: EvReload}
	if err != nil {
		ev.Reason = err.Error()
		ev.Fields = map[string]string{"result": "refused"}
	} else {
		ev.Reason = res.summary()
		ev.Fields = map[string]string{"result": "taken"}
	}
	a.record(ev)
	return res, err
}

func (r ReloadResult) summary() string {
	var parts []string
	add := func(what string, names []string) {
		if len(names) > 0 {
			parts = append(parts, fmt.Sprintf("%s: %s", what, strings.Join(names, ",")))
		}
	}
	add("added", r.Added)
	add("removed", r.Removed)
	add("restarted with a changed spec", r.Restarted)
	if len(r.NotApplied) > 0 {
		parts = append(parts, "not applied until restart: "+strings.Join(r.NotApplied, "; "))
	}
	add("stop errors", r.Errors)
	if len(parts) == 0 {
		return "no change"
	}
	return strings.Join(parts, "; ")
}

// reload does the work of Reload; reloadMu is held.
func (a *Agent) reload(_ context.Context) (ReloadResult, error) {
	if a.cfgPath == "" {
		return ReloadResult{}, fmt.Errorf("%w: the agent was not started from a config file", ErrReloadRefused)
	}
	next, err := LoadConfig(a.cfgPath)
	if err != nil {
		return ReloadResult{}, fmt.Errorf("%w: %w", ErrReloadRefused, err)
	}
	cur := a.config()

	var res ReloadResult
	node := cur.Node
	res.NotApplied = nodeChanges(cur.Node, next.Node)
	// Applied live: read when they are used.
	node.OnExit, node.Inspect = next.Node.OnExit, next.Node.Inspect

	old := map[string]*PodSpec{}
	for _, r := range a.runners() {
		old[r.spec.Name] = r.spec
	}
	wanted := map[string]bool{}
	var toStop []string
	var toStart []*PodSpec
	for i := range next.Pods {
		p := &next.Pods[i]
		wanted[p.Name] = true
		o, ok := old[p.Name]
		switch {
		case !ok:
			res.Added = append(res.Added, p.Name)
			toStart = append(toStart, p)
		case !reflect.DeepEqual(o, p):
			res.Restarted = append(res.Restarted, p.Name)
			toStop = append(toStop, p.Name)
			toStart = append(toStart, p)
		default:
			res.Unchanged = append(res.Unchanged, p.Name)
		}
	}
	for _, r := range a.runners() {
		if !wanted[r.spec.Name] {
			res.Removed = append(res.Removed, r.spec.Name)
			toStop = append(toStop, r.spec.Name)
		}
	}

	// Retire what goes, all pods at once, each in order.
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, name := range toStop {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := a.retirePod(name); err != nil {
				mu.Lock()
				res.Errors = append(res.Errors, err.Error())
				mu.Unlock()
			}
		}()
	}
	wg.Wait()

	// The config in force: the pods of the new file, keeping the spec
	// the unchanged pods' supervisors already hold.
	inForce := &Config{Node: node}
	for i := range next.Pods {
		p := next.Pods[i]
		if o, ok := old[p.Name]; ok && reflect.DeepEqual(o, &p) {
			p = *o
		}
		inForce.Pods = append(inForce.Pods, p)
	}
	a.mu.Lock()
	a.cfg = inForce
	a.mu.Unlock()
	for _, p := range toStart {
		a.addPod(p)
	}
	a.reorder(next)
	a.log.Info("config reloaded", "path", a.cfgPath, "added", res.Added, "removed", res.Removed,
		"restarted", res.Restarted, "unchanged", len(res.Unchanged), "notApplied", res.NotApplied)
	return res, nil
}

// retirePod stops a pod in order and drops it: its supervisor ends, its
// state file and metrics go.
func (a *Agent) retirePod(name string) error {
	r := a.runner(name)
	if r == nil {
		return nil
	}
	a.mu.Lock()
	life := a.lives[name]
	a.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), reloadTimeout(r.spec))
	defer cancel()
	var stopErr error
	if err := r.send(ctx, InStop{}); err != nil {
		stopErr = fmt.Errorf("pod %s: ordered stop: %w", name, err)
	} else if err := r.waitPhase(ctx, PhaseStopped); err != nil {
		stopErr = fmt.Errorf("pod %s: ordered stop: %w", name, err)
	}
	if stopErr != nil {
		a.log.Error("pod not stopped in time; its processes are left running", "pod", name, "err", stopErr)
	}
	if life.cancel != nil {
		life.cancel()
		<-life.done
	}
	a.mu.Lock()
	delete(a.pods, name)
	delete(a.lives, name)
	for i, n := range a.order {
		if n == name {
			a.order = append(a.order[:i:i], a.order[i+1:]...)
			break
		}
	}
	a.mu.Unlock()
	if stopErr == nil {
		if err := a.state.remove(name); err != nil {
			a.log.Warn("cannot remove state file", "pod", name, "err", err)
		}
		a.cg.removePod(name) // cgroup.go
	}
	a.forgetPodMetrics(name)
	return stopErr
}

// reorder puts the pods in the order of cfg.
func (a *Agent) reorder(cfg *Config) {
	a.mu.Lock()
	defer a.mu.Unlock()
	order := make([]string, 0, len(a.order))
	for _, p := range cfg.Pods {
		if _, ok := a.pods[p.Name]; ok {
			order = append(order, p.Name)
		}
	}
	a.order = order
}

// nodeChanges lists the node settings that differ and cannot change while
// the agent runs.
func nodeChanges(cur, next Node) []string {
	var out []string
	diff := func(field string, a, b any) {
		if !reflect.DeepEqual(a, b) {
			out = append(out, fmt.Sprintf("node.%s %v -> %v", field, a, b))
		}
	}
	diff("adminSocket", cur.AdminSocket, next.AdminSocket)
	diff("adminGroup", cur.AdminGroup, next.AdminGroup)
	diff("stateDir", cur.StateDir, next.StateDir)
	diff("log.level", cur.Log.Level, next.Log.Level)
	diff("log.format", cur.Log.Format, next.Log.Format)
	diff("metricsAddr", cur.MetricsAddr, next.MetricsAddr)
	diff("cgroup", cur.Cgroup, next.Cgroup) // read once at start (cgroup.go)
	diff("nri", cur.NRI, next.NRI)
	if !reflect.DeepEqual(cur.Kubernetes, next.Kubernetes) {
		out = append(out, "node.kubernetes (takes effect at the next start)")
	}
	return out
}
