package agent

import (
	"sync"

	"github.com/meshagent/meshagent/metrics"
)

// Every event the pods record passes through observe, which turns it into
// metrics calls: the metrics are a view of the event stream, so they never
// disagree with `meshagent ctl events`.

type podContainer struct{ pod, container string }

// sidecarMetric is what meshagent_sidecar_ready and
// meshagent_sidecar_crash_looping show for one sidecar.
type sidecarMetric struct{ ready, crashLoop bool }

type metricsState struct {
	mu       sync.Mutex
	sidecars map[podContainer]sidecarMetric
}

func (a *Agent) observe(e Event) {
	m := a.metrics
	switch e.Type {
	case EvRestart:
		if a.roleOf(e) == RoleSidecar {
			m.SidecarRestart(e.Pod, e.Container, e.Fields["cause"])
		}
	case "ready":
		m.SidecarReady(e.Pod, e.Container, e.Duration)
	case EvGateOpen:
		m.AppsGated(e.Pod, e.Duration)
	case EvStartupTimeout:
		policy := e.Fields["policy"]
		m.StartupTimeout(e.Pod, policy)
		if policy == FailOpen {
			// The gate opened on the timeout: the apps were held this long.
			m.AppsGated(e.Pod, e.Duration)
		}
	case EvOOMKill:
		m.OOMKill(e.Pod, e.Container, e.Fields["role"])
	case EvUpgradeSucceeded:
		m.HandoffDone(metrics.KindUpgrade, metrics.OutcomeSuccess, metrics.ReasonNone, e.Duration)
	case EvUpgradeRolledBack:
		m.HandoffDone(metrics.KindUpgrade, metrics.OutcomeRolledBack, e.Fields["why"], e.Duration)
	case EvSwitch:
		m.Switch(e.Fields["switch"], e.Fields["value"] == "on")
	case EvState:
		if a.roleOf(e) == RoleSidecar {
			a.sidecarMetric(e, func(s *sidecarMetric) { s.ready = e.To == StateReady })
		}
	case EvCrashLoop, "crash-loop-over":
		if a.roleOf(e) == RoleSidecar {
			a.sidecarMetric(e, func(s *sidecarMetric) { s.crashLoop = e.Type == EvCrashLoop })
		}
	}
}

func (a *Agent) sidecarMetric(e Event, f func(*sidecarMetric)) {
	k := podContainer{e.Pod, e.Container}
	a.mstate.mu.Lock()
	s := a.mstate.sidecars[k]
	f(&s)
	a.mstate.sidecars[k] = s
	a.mstate.mu.Unlock()
	a.metrics.SidecarStatus(e.Pod, e.Container, s.ready, s.crashLoop)
}

// forgetPodMetrics removes a pod's series; call once its supervisor has
// ended, so no late event brings them back.
func (a *Agent) forgetPodMetrics(pod string) {
	a.mstate.mu.Lock()
	for k := range a.mstate.sidecars {
		if k.pod == pod {
			delete(a.mstate.sidecars, k)
		}
	}
	a.mstate.mu.Unlock()
	a.metrics.ForgetPod(pod)
}

// roleOf is the role of the event's container: from the event when it
// says, else from the pod's spec.
func (a *Agent) roleOf(e Event) Role {
	if r := e.Fields["role"]; r != "" {
		return Role(r)
	}
	if e.Container == "" {
		return ""
	}
	r := a.runner(e.Pod)
	if r == nil {
		return ""
	}
	if c := r.spec.Container(e.Container); c != nil {
		return c.Role
	}
	return ""
}
