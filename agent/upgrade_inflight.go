package agent

import (
	"sort"
	"time"
)

// Upgrades in flight are recorded with their start, their bound and where
// they are, so the upgrade inspection (inspect_ops.go) can tell one that
// overran its own timeouts: an upgrade holds its sidecar's upgrade lock,
// and one that never ends refuses every later upgrade with 409.

// upgradeRun is one upgrade in flight; podHandoff.mu guards it.
type upgradeRun struct {
	began  time.Time
	bound  time.Duration // the longest it takes by its own timeouts
	stage  string
	newPID int
}

// Upgrade stages, as the inspection names them.
const (
	stageChecking = "checking the sidecar"
	stageStarting = "starting the new version"
	stageReady    = "waiting for the new version to be ready"
	stageSwap     = "swapping the new version in"
	stageDrain    = "draining the old version"
	stageWatch    = "watching the new version"
)

// upgradeSlack is added to an upgrade's own timeouts: starts, calls into
// the runner and killWait's own bound.
const upgradeSlack = 15 * time.Second

// upgradeBound is the longest an upgrade of c takes when every step keeps
// to its timeout: the new version's readiness, the old one's grace period
// (then SIGKILL), the watch window, and slack.
func upgradeBound(c *ContainerSpec) time.Duration {
	return c.Upgrade.ReadyTimeout.D() + c.Stop.Grace.D() + c.Upgrade.Watch.D() + upgradeSlack
}

func (ph *podHandoff) upgradeStage(container, stage string, pid int) {
	ph.mu.Lock()
	defer ph.mu.Unlock()
	if u := ph.busy[container]; u != nil {
		u.stage = stage
		if pid != 0 {
			u.newPID = pid
		}
	}
}

func (ph *podHandoff) unlockUpgrade(container string) {
	ph.mu.Lock()
	delete(ph.busy, container)
	ph.mu.Unlock()
}

// UpgradeInFlight is an upgrade under way, as inspections see it.
type UpgradeInFlight struct {
	Pod, Container string
	Began          time.Time
	Bound          time.Duration // by its own timeouts
	Stage          string
	NewPID         int
}

// upgradesInFlight lists every upgrade under way, by pod and container.
func (a *Agent) upgradesInFlight() []UpgradeInFlight {
	var out []UpgradeInFlight
	for _, r := range a.runners() {
		r.hx.mu.Lock()
		for c, u := range r.hx.busy {
			out = append(out, UpgradeInFlight{Pod: r.spec.Name, Container: c, Began: u.began, Bound: u.bound, Stage: u.stage, NewPID: u.newPID})
		}
		r.hx.mu.Unlock()
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Pod != out[j].Pod {
			return out[i].Pod < out[j].Pod
		}
		return out[i].Container < out[j].Container
	})
	return out
}
