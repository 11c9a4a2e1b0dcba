package agent

import (
	"errors"
	"fmt"
	"path/filepath"
	"time"
)

// KubeConfig turns on Kubernetes mode (the sidecars' resource values come
// from node.cgroup and node.nri, config_cgroup.go): the agent follows the pods that
// kubelet runs on this node's containerd, beside (or instead of) the pods
// of its own config. It needs no API server: everything comes from
// containerd and its CRI plugin, so the node keeps working while the
// control plane is degraded.
type KubeConfig struct {
	// Containerd is containerd's socket; default /run/containerd/containerd.sock.
	Containerd string `yaml:"containerd" json:"containerd"`
	// Namespace is containerd's namespace of the CRI plugin. It is always
	// k8s.io; the field exists so a config says so explicitly.
	Namespace string `yaml:"namespace" json:"namespace"`
	// GateSocket is the node socket `meshagent gate` and `meshagent hold`
	// talk to, mounted into pods (hostPath of its folder); default
	// /run/meshagent/gate.sock. Any process may connect: the agent tells
	// who is calling by its peer credentials, not by what it asks.
	GateSocket string `yaml:"gateSocket" json:"gateSocket"`
	// Resync is how often containerd is listed again to catch events the
	// stream missed; default 1m.
	Resync Duration `yaml:"resync" json:"resync"`
}

// Defaults of Kubernetes mode.
const (
	DefaultContainerdSocket = "/run/containerd/containerd.sock"
	DefaultGateSocket       = "/run/meshagent/gate.sock"
	KubeNamespace           = "k8s.io"
)

func (k *KubeConfig) setDefaults() {
	if k.Containerd == "" {
		k.Containerd = DefaultContainerdSocket
	}
	if k.Namespace == "" {
		k.Namespace = KubeNamespace
	}
	if k.GateSocket == "" {
		k.GateSocket = DefaultGateSocket
	}
	if k.Resync == 0 {
		k.Resync = Duration(time.Minute)
	}
}

// validate checks a defaulted KubeConfig; paths are relative to
// node.kubernetes.
func (k *KubeConfig) validate() error {
	var errs []error
	add := func(path, format string, a ...any) {
		errs = append(errs, fmt.Errorf("node.kubernetes.%s: %s", path, fmt.Sprintf(format, a...)))
	}
	for _, p := range []struct{ name, v string }{
		{"containerd", k.Containerd}, {"gateSocket", k.GateSocket},
	} {
		if !filepath.IsAbs(p.v) {
			add(p.name, "want an absolute path, got %q", p.v)
		}
	}
	if len(k.GateSocket) > 107 {
		add("gateSocket", "%q is longer than a unix socket path may be (107 bytes)", k.GateSocket)
	}
	if k.Namespace != KubeNamespace {
		add("namespace", "the CRI plugin keeps pods in %s, got %q", KubeNamespace, k.Namespace)
	}
	if k.Resync.D() != 0 && k.Resync.D() < time.Second {
		add("resync", "want at least 1s, got %s", k.Resync.D())
	}
	return errors.Join(errs...)
}
