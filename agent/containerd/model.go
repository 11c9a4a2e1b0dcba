package containerd

import (
	"cmp"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Namespace is the containerd namespace the CRI plugin keeps Kubernetes in.
const Namespace = "k8s.io"

// Labels kubelet and the CRI plugin put on containerd containers.
const (
	LabelPodName       = "io.kubernetes.pod.name"
	LabelPodNamespace  = "io.kubernetes.pod.namespace"
	LabelPodUID        = "io.kubernetes.pod.uid"
	LabelContainerName = "io.kubernetes.container.name"
	LabelKind          = "io.cri-containerd.kind"
	// LabelStopSignal is containerd's record of the image's stop signal.
	LabelStopSignal = "io.containerd.image.config.stop-signal"
)

// OCI spec annotations the CRI plugin writes.
const (
	AnnotationContainerType    = "io.kubernetes.cri.container-type"
	AnnotationSandboxID        = "io.kubernetes.cri.sandbox-id"
	AnnotationSandboxName      = "io.kubernetes.cri.sandbox-name"
	AnnotationSandboxNamespace = "io.kubernetes.cri.sandbox-namespace"
	AnnotationSandboxUID       = "io.kubernetes.cri.sandbox-uid"
	AnnotationContainerName    = "io.kubernetes.cri.container-name"
)

// AnnotationSidecars is the pod annotation naming its sidecar containers,
// comma separated: `meshagent.io/sidecars: mosn` or `envoy, log-agent`. Every
// other container of the pod is an app container.
const AnnotationSidecars = "meshagent.io/sidecars"

// Kind tells a pod's sandbox (pause) container from its Kubernetes containers.
type Kind string

const (
	KindSandbox   Kind = "sandbox"
	KindContainer Kind = "container"
)

// Role is what meshagent makes of a Kubernetes container.
type Role string

const (
	RoleSandbox Role = "sandbox"
	RoleSidecar Role = "sidecar"
	RoleApp     Role = "app"
)

// Status is the state of a container's task as containerd reports it.
type Status string

const (
	StatusNone    Status = ""        // no task (created, not yet started, or task deleted)
	StatusCreated Status = "created" // task created, process not yet running the program
	StatusRunning Status = "running"
	StatusPaused  Status = "paused"
	StatusStopped Status = "stopped" // exited, task not yet deleted
	StatusUnknown Status = "unknown"
)

// PodRef identifies a Kubernetes pod.
type PodRef struct {
	Name      string
	Namespace string
	UID       string
}

func (r PodRef) String() string { return r.Namespace + "/" + r.Name }

// Container is one containerd container of a pod with its task state.
type Container struct {
	ID        string
	Name      string // Kubernetes container name; empty for the sandbox
	Kind      Kind
	SandboxID string
	Pod       PodRef
	// Role comes from the pod's meshagent.io/sidecars annotation (read
	// through CRI). It is "" only in events for a container whose sandbox
	// CRI did not know when the container appeared.
	Role Role
	// Attempt is kubelet's restart count for this container name, from CRI.
	// Only Snapshot, Pod and Synced fill it (CRI registers a container after
	// containerd announces it); other events carry 0.
	Attempt    uint32
	StopSignal string // image stop signal if containerd recorded one
	CreatedAt  time.Time

	PID        uint32
	Status     Status
	ExitStatus uint32    // valid when Status is StatusStopped
	ExitedAt   time.Time // valid when Status is StatusStopped
}

// Pod is a Kubernetes pod as rebuilt from containerd and CRI.
type Pod struct {
	SandboxID string
	PodRef
	// Annotations and Labels are the pod's own, from CRI. Annotations is nil
	// when CRI does not know the sandbox (yet).
	Annotations map[string]string
	Labels      map[string]string
	// Sandbox is the pause container; nil if only its containers were found.
	Sandbox *Container
	// Containers are the Kubernetes containers, oldest first (kubelet starts
	// spec.containers in order).
	Containers []Container
}

// Sidecars returns the container names listed in the pod's
// meshagent.io/sidecars annotation, or an error naming the pod and the bad
// entry.
func (p Pod) Sidecars() ([]string, error) {
	return ParseSidecars(p.Annotations[AnnotationSidecars])
}

// ParseSidecars parses the value of AnnotationSidecars.
func ParseSidecars(v string) ([]string, error) {
	if strings.TrimSpace(v) == "" {
		return nil, nil
	}
	var names []string
	for _, f := range strings.Split(v, ",") {
		n := strings.TrimSpace(f)
		if n == "" {
			return nil, fmt.Errorf("annotation %s=%q: empty container name", AnnotationSidecars, v)
		}
		if !validName(n) {
			return nil, fmt.Errorf("annotation %s=%q: %q is not a container name", AnnotationSidecars, v, n)
		}
		if slices.Contains(names, n) {
			return nil, fmt.Errorf("annotation %s=%q: %q listed twice", AnnotationSidecars, v, n)
		}
		names = append(names, n)
	}
	return names, nil
}

// validName accepts a Kubernetes container name (a DNS-1123 label).
func validName(s string) bool {
	if len(s) > 63 {
		return false
	}
	for i, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
		case r == '-' && i > 0 && i < len(s)-1:
		default:
			return false
		}
	}
	return true
}

// record is what containerd keeps about one container, reduced to what the
// model needs; it makes the builders pure.
type record struct {
	ID        string
	Labels    map[string]string
	Spec      []byte // OCI runtime spec JSON, may be nil
	CreatedAt time.Time
}

// task is the state of a container's init process.
type task struct {
	PID        uint32
	Status     Status
	ExitStatus uint32
	ExitedAt   time.Time
}

// identify rebuilds a container's identity from its labels and OCI spec
// annotations. ok is false for containers that are not the CRI plugin's (no
// kind, or no sandbox id): those are not part of any pod.
func identify(r record) (c Container, ok bool, err error) {
	var ann map[string]string
	if len(r.Spec) > 0 {
		var spec struct {
			Annotations map[string]string `json:"annotations"`
		}
		if err := json.Unmarshal(r.Spec, &spec); err != nil {
			return Container{}, false, fmt.Errorf("container %s: decode OCI spec: %w", r.ID, err)
		}
		ann = spec.Annotations
	}
	first := func(vals ...string) string {
		for _, v := range vals {
			if v != "" {
				return v
			}
		}
		return ""
	}
	c = Container{
		ID:   r.ID,
		Kind: Kind(first(r.Labels[LabelKind], ann[AnnotationContainerType])),
		Pod: PodRef{
			Name:      first(r.Labels[LabelPodName], ann[AnnotationSandboxName]),
			Namespace: first(r.Labels[LabelPodNamespace], ann[AnnotationSandboxNamespace]),
			UID:       first(r.Labels[LabelPodUID], ann[AnnotationSandboxUID]),
		},
		SandboxID:  ann[AnnotationSandboxID],
		StopSignal: r.Labels[LabelStopSignal],
		CreatedAt:  r.CreatedAt,
	}
	switch c.Kind {
	case KindSandbox:
		c.Role = RoleSandbox
		if c.SandboxID == "" {
			c.SandboxID = r.ID // a sandbox is its own sandbox
		}
	case KindContainer:
		c.Name = first(r.Labels[LabelContainerName], ann[AnnotationContainerName])
	default:
		return Container{}, false, nil
	}
	if c.SandboxID == "" {
		return Container{}, false, nil
	}
	return c, true, nil
}

// withTask returns c with the task's state.
func (c Container) withTask(t *task) Container {
	if t == nil {
		c.PID, c.Status, c.ExitStatus, c.ExitedAt = 0, StatusNone, 0, time.Time{}
		return c
	}
	c.PID, c.Status, c.ExitStatus, c.ExitedAt = t.PID, t.Status, t.ExitStatus, t.ExitedAt
	return c
}

// sandboxInfo is what CRI tells about a pod sandbox and its containers.
type sandboxInfo struct {
	Annotations map[string]string
	Labels      map[string]string
}

// buildPods groups containers into pods, joins CRI's pod annotations and
// restart counts, and assigns roles. Pods are sorted by namespace, name and
// sandbox id; a pod whose sidecars annotation does not parse keeps every
// container an app and is reported in errs (one bad pod must not hide the
// others).
func buildPods(cs []Container, sandboxes map[string]sandboxInfo, attempts map[string]uint32) (pods []Pod, errs []error) {
	byID := map[string]*Pod{}
	var order []*Pod
	for _, c := range cs {
		p := byID[c.SandboxID]
		if p == nil {
			p = &Pod{SandboxID: c.SandboxID, PodRef: c.Pod}
			if info, ok := sandboxes[c.SandboxID]; ok {
				p.Annotations, p.Labels = info.Annotations, info.Labels
			}
			byID[c.SandboxID] = p
			order = append(order, p)
		}
		c.Attempt = attempts[c.ID]
		if c.Kind == KindSandbox {
			c := c
			p.Sandbox = &c
			p.PodRef = c.Pod
			continue
		}
		p.Containers = append(p.Containers, c)
	}
	for _, p := range order {
		sidecars, err := p.Sidecars()
		if err != nil {
			errs = append(errs, fmt.Errorf("pod %s (sandbox %s): %w", p.PodRef, p.SandboxID, err))
		}
		slices.SortStableFunc(p.Containers, func(a, b Container) int {
			return cmp.Or(a.CreatedAt.Compare(b.CreatedAt), cmp.Compare(a.ID, b.ID))
		})
		for i := range p.Containers {
			p.Containers[i].Role = RoleApp
			if slices.Contains(sidecars, p.Containers[i].Name) {
				p.Containers[i].Role = RoleSidecar
			}
		}
		pods = append(pods, *p)
	}
	slices.SortFunc(pods, func(a, b Pod) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name), cmp.Compare(a.SandboxID, b.SandboxID))
	})
	return pods, errs
}
