// Package cgroup gives a pod's sidecar a guaranteed CPU quota, lets it share
// (or cap) the pod's memory, makes it the pod's first OOM victim, and keeps
// it so — on cgroup v1, hybrid and v2 hosts, for host-mode pods that
// meshagent creates and for Kubernetes pods that kubelet created.
//
// # Model
//
// A Manager (Open) owns one cgroup root (/sys/fs/cgroup by default; tests
// point it at a tree under t.TempDir). A Group is a path relative to every
// hierarchy: on v1 and hybrid hosts it names <root>/<controller>/<group> in
// the cpu, cpuacct and memory hierarchies; on v2, <root>/<group>. Creation,
// deletion checks and statistics go through github.com/containerd/cgroups/v3
// (cgroup1 and cgroup2). The knob files themselves are read and written
// directly: reconciling needs read-before-write per file, in a write order
// the kernel accepts, and the library only offers "write everything".
//
// Host mode: EnsurePod and EnsureContainer create <root>/meshagent/<pod> and
// <root>/meshagent/<pod>/<container>. The agent starts each child through
// its exec shim (internal/execshim, which does not import this package): it
// hands the shim the ProcsFiles of the group and the oom_score_adj, and the
// shim joins the groups by writing "0" to each cgroup.procs, then sets its
// own oom_score_adj, before syscall.Exec of the real command. The PID stays
// the same and the command never runs outside its group; its children
// inherit both the group and the score. This package's tests start their
// children through the same shim. Remove deletes a pod's groups once its
// processes are gone.
//
// Kubernetes: KubeLayout.PodGroup and ContainerGroup compute kubelet's paths
// for the cgroupfs and systemd drivers (Guaranteed pods have no QoS level);
// ParseKubeGroup and KubeRefOfPID go the other way, from a process's
// /proc/PID/cgroup to its pod UID and container ID (for peer credentials).
//
// # Policy
//
// Policy comes from key/value strings (ParsePolicy, PolicyFromAnnotations
// with AnnotationPrefix): cpu (500m, 0.5, or 25% of the pod's CPU limit),
// cpu-mode (oversell, the default, leaves the pod quota alone and carves the
// sidecar's quota out of it; add raises the pod quota by the sidecar's),
// cpu-burst, cpu-shares (default: match the quota, millicores*1024/1000; on
// v2 converted to cpu.weight by the library's curve), memory (a cap; default
// none, the sidecar shares the pod's limit) and oom-score-adj (default
// SidecarOOMScoreAdj: the app's value + 1000, clamped to 1000, which makes
// every sidecar process the first victim of a pod-level OOM).
//
// A Target is a pod as the agent knows it: groups, the pod's own limits
// (from config or spec, never read back, so add mode cannot add twice),
// OwnPod for host mode (meshagent then also writes the pod's limits), and
// the Policy. Translation to (file, value) Settings is pure (Desired adds
// the few observed inputs: CFS period, sidecar PIDs, the app's score). An
// impossible policy — a percentage without a pod limit, a sidecar quota
// above the pod's (a v1 parent rejects it), burst above quota, a quota
// under 1 ms — is a *PodError naming pod, container and values, and nothing
// is written for that pod.
//
// # Reconcile
//
// Apply (on container start) and Reconcile (the periodic pass over every
// pod) read each setting and write only those that differ, ordered so that
// every intermediate state is legal: the pod quota first when it rises and
// last when it falls, burst before a falling quota and after a rising one.
// A write over a value meshagent itself had put in place is drift: it is
// counted in Result.Drift and logged (slog, Warn) with pod, container, knob,
// old and new value. A pass over a correct tree writes nothing. Plan is the
// dry run for `meshagent ctl plan`: every setting next to its current value.
// A pass over 500 pods is thousands of reads of cold kernel objects, so the
// Manager keeps the knob files it reads open and re-reads them with pread
// (about ten fds and a kernel page each per pod), and the sidecars'
// /proc/PID/oom_score_adj too (a kept fd reads ESRCH once its process is
// gone, never a reused pid's value). v1 cgroup.procs is the exception: a
// kept fd serves a pid list up to a second old, so it is opened afresh
// each time, through a kept fd of its directory. A pass closes the files it
// no longer reads, Remove closes a removed group's, Close closes all. A
// pass also spreads its pods over a worker per CPU (at most 4), and reuses
// a pod's translated settings while its target and observed values are
// unchanged; every value is still read on every pass.
//
// # OOM events
//
// An OOMWatcher (Manager.NewOOMWatcher) is told about pods (Add/Remove) and
// delivers an OOMEvent per container whose processes the OOM killer killed,
// from Run(ctx, out) until ctx ends, then Close releases its fds. The kernel
// signals the OOM (v1: eventfd on memory.oom_control via
// cgroup.event_control; v2: inotify on memory.events) and the per-container
// oom_kill counters say who the victim was, so the supervisor can restart a
// killed sidecar alone at once.
//
// Stats reads CPU usage, throttling and memory usage of a group for metrics.
package cgroup
