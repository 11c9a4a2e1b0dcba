package agent

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/meshagent/meshagent/cgroup"
)

// KubeSidecar is a container whose task just started, as the Kubernetes
// supervisor knows it from containerd's TaskStarted event.
type KubeSidecar struct {
	// Pod is namespace/name, for events.
	Pod string
	// Annotations are the pod's own annotations (from the CRI sandbox).
	Annotations map[string]string
	// Container is the container's name in the pod spec.
	Container string
	// PID is the task's first process.
	PID int
}

// ApplyKubeSidecar is the task-start path of the Kubernetes sidecar
// policy, for containerd without NRI: the Kubernetes supervisor calls it
// from its TaskStarted handler for every container. For a sidecar of its
// pod (meshagent.io/sidecars) it writes the values the NRI plugin would
// have set (SidecarValuesFor) into the container's cgroup (found from the
// pid, either cgroup driver) and /proc/PID/oom_score_adj. With NRI in
// force it writes only what NRI cannot (CFS burst, the pod quota of add
// mode), or nothing. It does nothing for other containers or with the
// cgroup-writes switch off. A policy that cannot be applied is an event and an error;
// nothing is written for that container.
func (a *Agent) ApplyKubeSidecar(ctx context.Context, s KubeSidecar) error {
	n := a.nri
	if !isSidecar(s.Annotations, s.Container) || !a.Switch(SwitchCgroupWrites) {
		return nil
	}
	nri := n.active()
	if nri && !needsTaskStart(s.Annotations) {
		return nil // NRI set everything before the sidecar ran
	}
	v, err := n.kube.apply(ctx, s, nri)
	if err != nil {
		err = fmt.Errorf("pod %s container %s pid %d: %w", s.Pod, s.Container, s.PID, err)
		a.record(Event{Time: time.Now(), Pod: s.Pod, Container: s.Container, PID: s.PID, Type: EvCgroupError,
			Reason: "sidecar policy not applied: " + err.Error()})
		return err
	}
	n.mu.Lock()
	n.taskStart++
	n.mu.Unlock()
	a.record(Event{Time: time.Now(), Pod: s.Pod, Container: s.Container, PID: s.PID, Type: EvPolicyApply,
		Reason: v.String(), Fields: map[string]string{"role": string(RoleSidecar), "path": ModeTaskStart}})
	return nil
}

// needsTaskStart reports whether a policy has parts NRI cannot set: CFS
// burst and the pod-quota raise of add mode. A bad policy says no: the NRI
// plugin already reported it.
func needsTaskStart(ann map[string]string) bool {
	pol, err := cgroup.PolicyFromAnnotations(ann)
	return err == nil && (!pol.Burst.IsZero() || (pol.Mode == cgroup.CPUAdd && !pol.CPU.IsZero()))
}

// kubePolicy applies sidecar values to Kubernetes containers through the
// cgroup package; its Manager is opened on first use.
type kubePolicy struct {
	root string
	log  *slog.Logger

	mu   sync.Mutex
	m    *cgroup.Manager
	err  error
	once sync.Once
}

func (k *kubePolicy) manager() (*cgroup.Manager, error) {
	k.once.Do(func() {
		if os.Geteuid() != 0 {
			k.err = fmt.Errorf("not root (uid %d)", os.Geteuid())
			return
		}
		k.m, k.err = cgroup.Open(cgroup.Options{Root: k.root, Logger: k.log})
	})
	return k.m, k.err
}

// usable says why the task-start path cannot write, if it cannot.
func (k *kubePolicy) usable() error {
	_, err := k.manager()
	return err
}

func (k *kubePolicy) close() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.m != nil {
		k.m.Close()
	}
}

// apply writes the sidecar's values. The oom_score_adj the task has now
// is kubelet's (the pod's QoS value), which the NRI plugin reads from its
// request; so both paths compute the same. After NRI (afterNRI) the task
// already has meshagent's value, which is kept; the rest (burst, add mode)
// is written.
func (k *kubePolicy) apply(ctx context.Context, s KubeSidecar, afterNRI bool) (SidecarValues, error) {
	m, err := k.manager()
	if err != nil {
		return SidecarValues{}, err
	}
	ref, err := cgroup.KubeRefOfPID("/proc", s.PID)
	if err != nil {
		return SidecarValues{}, err
	}
	if ref.ContainerID == "" {
		return SidecarValues{}, fmt.Errorf("pid %d is in the pod's own group %s, not a container's", s.PID, ref.Group)
	}
	kubeletAdj, err := cgroup.ReadOOMScoreAdj(s.PID)
	if err != nil {
		return SidecarValues{}, err
	}
	podMillis, podPeriod, err := readPodCPU(m, ref.PodGroup)
	if err != nil {
		return SidecarValues{}, err
	}
	v, err := SidecarValuesFor(s.Annotations, kubeletAdj, podMillis, podPeriod)
	if err != nil {
		return SidecarValues{}, err
	}
	pol, err := cgroup.PolicyFromAnnotations(s.Annotations)
	if err != nil {
		return SidecarValues{}, err
	}
	adj := v.OOMScoreAdj
	if afterNRI {
		adj = kubeletAdj // NRI's value, in place since the first instruction
		v.OOMScoreAdj = adj
	}
	pol.OOMScoreAdj = &adj // as computed from kubelet's value, not from the value we set
	t := cgroup.Target{
		Pod: "k8s-" + ref.PodUID, PodGroup: ref.PodGroup,
		Sidecar:     cgroup.Container{Name: s.Container, Group: ref.Group},
		PodCPULimit: podMillis, Policy: pol,
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	_, err = m.Apply(ctx, t)
	// A pass over no target closes the knob files Apply kept open and
	// forgets what it applied: a Kubernetes container is set once per
	// task start, not reconciled, and pods come and go by the thousand.
	m.Reconcile(ctx, nil)
	if err != nil {
		return SidecarValues{}, err
	}
	return v, nil
}

// readPodCPU reads the CPU limit kubelet gave the pod's group, which a
// percentage policy needs, and its CFS period.
func readPodCPU(m *cgroup.Manager, pg cgroup.Group) (millis int64, period uint64, err error) {
	read := func(p string) (string, error) {
		b, err := os.ReadFile(p)
		return strings.TrimSpace(string(b)), err
	}
	var quota int64
	if m.Mode() == cgroup.ModeV2 {
		s, err := read(filepath.Join(m.Root(), string(pg), "cpu.max"))
		if err != nil {
			return 0, 0, fmt.Errorf("pod cpu limit: %w", err)
		}
		f := strings.Fields(s)
		if len(f) != 2 {
			return 0, 0, fmt.Errorf("pod cpu limit: bad cpu.max %q", s)
		}
		period, _ = strconv.ParseUint(f[1], 10, 64)
		if f[0] == "max" {
			return 0, period, nil
		}
		quota, _ = strconv.ParseInt(f[0], 10, 64)
	} else {
		dir := filepath.Join(m.Root(), "cpu", string(pg))
		q, err := read(filepath.Join(dir, "cpu.cfs_quota_us"))
		if err != nil {
			return 0, 0, fmt.Errorf("pod cpu limit: %w", err)
		}
		p, err := read(filepath.Join(dir, "cpu.cfs_period_us"))
		if err != nil {
			return 0, 0, fmt.Errorf("pod cpu limit: %w", err)
		}
		quota, _ = strconv.ParseInt(q, 10, 64)
		period, _ = strconv.ParseUint(p, 10, 64)
	}
	return cpuMillis(quota, period), period, nil
}
