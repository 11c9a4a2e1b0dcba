// Package critest drives a real containerd through the CRI API the way kubelet
// does, so tests of the containerd runtime see exactly what a node sees.
//
// A Runtime is a CRI client on containerd's socket. RunPod creates a pod
// sandbox with kubelet's metadata, labels and the pod's annotations, then
// creates and starts each container with kubelet's labels and annotations, in
// order (as kubelet starts spec.containers). RemovePod stops and removes the
// pod and deletes the pod-level cgroup folders that containerd leaves behind.
// Pods use the host network by default; their sandboxes then get an empty
// hostname (runc refuses to set one without a UTS namespace). With
// PodSpec.PodNetwork a pod gets its own network namespace and address from
// the CNI bridge that scripts/ci-containerd.sh configures (meshci0,
// 10.88.0.0/16, reachable from the node), as on a real cluster.
//
// The tests find containerd through environment variables that
// scripts/ci-containerd.sh sets up (see Lane); a test skips with the reason
// when its lane is absent. Daemon starts a private containerd instance for
// tests that must restart containerd without disturbing other packages.
package critest
