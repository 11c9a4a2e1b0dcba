// Package containerd finds Kubernetes pods on a node by asking containerd, and
// follows them through containerd's event stream. It is the containerd
// runtime's eyes; the agent decides what to do with what it sees.
//
// # Where the pod model comes from
//
// kubelet never talks to containerd directly: it asks the CRI plugin, which
// creates one containerd container per pod sandbox (the pause container) and
// one per Kubernetes container, all in the k8s.io namespace. From each
// containerd container this package reads
//
//   - the labels kubelet passed through CRI: io.kubernetes.pod.name,
//     io.kubernetes.pod.namespace, io.kubernetes.pod.uid and
//     io.kubernetes.container.name, plus the CRI plugin's own
//     io.cri-containerd.kind ("sandbox" or "container");
//   - the OCI spec annotations the CRI plugin writes: io.kubernetes.cri.container-type,
//     io.kubernetes.cri.sandbox-id, io.kubernetes.cri.sandbox-name,
//     io.kubernetes.cri.sandbox-namespace, io.kubernetes.cri.sandbox-uid and
//     io.kubernetes.cri.container-name (labels win; the annotations fill gaps
//     and are the only source of the sandbox id);
//   - the task: pid and status (created, running, stopped).
//
// The pod's own annotations (where meshagent's meshagent.io/... settings
// live) do not reach containerd's records: the CRI plugin copies only an
// allow-list into the OCI spec. They come from the CRI API instead
// (ListPodSandbox), over the same socket. Restart counts (kubelet's attempt
// numbers) come from CRI's ListContainers.
//
// # Events and resynchronisation
//
// Run subscribes to containerd's events (container create/delete, task
// start/exit/delete/OOM) and turns them into Events: transitions of a
// container's state, each reported once. Every (re)subscription is followed
// by a listing of all containers and tasks that is compared with what was
// already reported; the difference is reported as events marked Resync, then
// a Synced event carries the full pod list. Live events that the listing
// already covered are dropped, because a task incarnation is identified by its
// pid: a start or exit of a pid already known to have started or exited is
// not news. So the first sync discovers the pods that existed before the
// agent started, and after containerd restarts (or the stream breaks) the
// agent hears about exactly what it missed, once. OOM events cannot be
// recovered from a listing; those that happen while disconnected are lost.
//
// containerd 1.6, 1.7 and 2.x servers are supported: only the containers,
// tasks and events services and CRI v1 are used.
package containerd
