// Package agent is meshagent's supervisor: it owns the pod model, the pure
// per-pod state machine (machine.go), the runner that drives it (pod.go),
// the runtimes that run containers (host processes here; containerd for
// Kubernetes) and the admin API.
//
// The model: a pod is sidecars and apps. Sidecars start first; no app
// starts until every sidecar passes readiness (or the startup timeout
// passes, with failOpen). A failed container restarts alone. A stop is
// ordered: apps drain first, sidecars outlive them.
//
// Who owns what: the Machine owns decisions and holds no resources; the
// podRunner owns the processes, probes and timers of its pod and is the
// only goroutine that feeds its Machine; a Runtime owns nothing beyond the
// Process handles it returns. Processes are not children of the agent's
// lifetime: an agent that exits (or is killed) leaves them running, and
// the next agent adopts them from the state directory.
//
// Operations (ops.go and its neighbours): every event passes through one
// hook that turns it into Prometheus metrics (metrics.go), served at
// /metrics on the admin socket and on node.metricsAddr. Runtime switches
// (switches.go) are emergency brakes persisted in the state directory; the
// machine obeys auto-restart and startup-gate through InSwitches, the pods'
// fd stores are told of handoff-store flips (handoff_switch.go), other
// features ask Agent.Switch when they act. Reload (reload.go) brings the
// pods in line with the config file without touching unchanged ones.
// Inspections (inspect.go, inspect_handoff.go) are Checks run on demand;
// features add theirs with WithCheck. A Notifier (systemd) hears READY, RELOADING and STOPPING.
//
// Resource policy: with WithCgroups (cgroup.go) the host runtime gets a
// Preparer that places every container in meshagent/<pod>/<container>
// through the exec shim and gives sidecars their oom_score_adj there,
// applies the pod's values before each start, reconciles them periodically
// and feeds OOM kills to the machine (InOOM) before the exit they caused.
// For Kubernetes pods, nri.go is an NRI plugin that sets a sidecar's values
// in its CreateContainer adjustment, and kube_policy.go (ApplyKubeSidecar)
// writes the same values on task start where containerd has no NRI.
// Sidecars with a handoff section keep their listening sockets for the
// pod's life: the podRunner owns one handoff.Store per such sidecar
// (handoff.go), passes the held sockets to every start as LISTEN_FDS and
// closes the stores only when the pod goes. A hot upgrade (upgrade.go)
// starts the new process beside the old one on those sockets, unknown to
// the Machine, and hands it over with one input (InSwap) once it is
// ready; the fuse (readiness deadline, watch window) rolls it back.
//
// Kubernetes mode (kube*.go, on with node.kubernetes): kubelet owns the
// pods' containers; the kube supervisor follows them through
// agent/containerd's event stream (pre-existing pods included, each change
// once, resynchronised after a reconnect), probes sidecars from inside each
// pod's network namespace, and serves the gate socket where `meshagent gate`
// and `meshagent hold` (the sidecar's postStart and preStop hooks) wait on
// their own pod, known from their peer credentials. It stops containers
// (hang, operator, finished Job) through containerd and never creates one:
// kubelet restarts them. Its state is rebuilt from containerd alone, so an
// agent restart needs no state file.
package agent
