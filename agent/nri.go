package agent

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"time"

	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/nri/pkg/stub"

	"github.com/meshagent/meshagent/cgroup"
)

// The NRI plugin sets a Kubernetes sidecar's oom_score_adj and CPU
// quota, period and shares in containerd's CreateContainer adjustment, so
// they hold from the sidecar's first instruction, and re-asserts the CPU
// values on UpdateContainer (and on Synchronize, after a reconnect). Which
// containers are sidecars, and their policy, come from the pod's own
// annotations in the request: meshagent.io/sidecars (comma-separated
// container names) and the sidecar.meshagent.io/* policy keys.
//
// containerd waits on every plugin for every container start on the node
// and drops a plugin that takes longer than its request timeout (2 s), so
// a handler computes from the request alone: no I/O, no lock held across
// anything slow. A policy it cannot apply is an event and an empty
// adjustment, never an error that would fail the container.
//
// Without NRI (containerd 1.6, 1.7 by default, or the nri switch off) the
// same values are applied on the task-start event by ApplyKubeSidecar
// through cgroup/ and /proc (kube_policy.go). NRIStatus says which path is
// in force and why.

// AnnotationSidecarContainers names a pod's sidecar containers, e.g.
// "meshagent.io/sidecars: mosn" (comma-separated).
const AnnotationSidecarContainers = "meshagent.io/sidecars"

// Event types of the Kubernetes sidecar policy.
const (
	EvNRIAdjust   = "nri-adjust"    // values set in a CreateContainer adjustment
	EvPolicyApply = "policy-apply"  // values applied on task start (no NRI)
	EvNRIConnect  = "nri-connected" // registered with containerd's NRI
	EvNRILost     = "nri-lost"      // the NRI connection broke; reconnecting
)

// NRI policy modes, as NRIStatus reports them.
const (
	ModeNRI       = "nri"
	ModeTaskStart = "task-start"
	ModeOff       = "off"
)

// NRIStatus is which path applies Kubernetes sidecar values, and why.
type NRIStatus struct {
	Mode      string    `json:"mode"`
	Reason    string    `json:"reason,omitempty"`
	Socket    string    `json:"socket,omitempty"`
	Connected bool      `json:"connected"`
	Since     time.Time `json:"since,omitzero"`
	LastError string    `json:"lastError,omitempty"`
	Adjusted  uint64    `json:"adjusted"`  // CreateContainer adjustments made
	Updated   uint64    `json:"updated"`   // UpdateContainer/Synchronize re-assertions
	TaskStart uint64    `json:"taskStart"` // containers set on task start
}

// nriPlugin is the NRI plugin and the task-start fallback's state.
type nriPlugin struct {
	a      *Agent
	socket string
	name   string
	idx    string

	mu        sync.Mutex
	connected bool
	since     time.Time
	lastErr   string
	adjusted  uint64
	updated   uint64
	taskStart uint64

	kube kubePolicy // the task-start path (kube_policy.go)
}

func (a *Agent) initNRI() {
	n := &nriPlugin{a: a, socket: a.cfg.Node.NRI.Socket, name: "meshagent", idx: a.cfg.Node.NRI.PluginIndex}
	if n.idx == "" {
		n.idx = DefaultNRIPluginIndex
	}
	if nm := a.cfg.Node.NRI.PluginName; nm != "" {
		n.name = nm
	}
	n.kube.root, n.kube.log = a.cfg.Node.Cgroup.Root, a.log
	a.nri = n
}

// NRIStatus reports how Kubernetes sidecar values are applied.
func (a *Agent) NRIStatus() NRIStatus {
	n := a.nri
	n.mu.Lock()
	st := NRIStatus{Socket: n.socket, Connected: n.connected, Since: n.since, LastError: n.lastErr,
		Adjusted: n.adjusted, Updated: n.updated, TaskStart: n.taskStart}
	n.mu.Unlock()
	writes := a.Switch(SwitchCgroupWrites)
	switch {
	case n.socket != "" && st.Connected && a.Switch(SwitchNRI):
		st.Mode, st.Reason = ModeNRI, "registered with containerd's NRI at "+n.socket
	case !writes:
		st.Mode, st.Reason = ModeOff, "switch cgroup-writes is off"
	case n.socket == "":
		st.Mode, st.Reason = ModeTaskStart, "node.nri.socket is not set"
	case !a.Switch(SwitchNRI):
		st.Mode, st.Reason = ModeTaskStart, "switch nri is off"
	default:
		st.Mode = ModeTaskStart
		st.Reason = "not connected to NRI at " + n.socket + " (containerd without NRI: 1.6, or 1.7 without it enabled); retrying"
		if st.LastError != "" {
			st.Reason += ": " + st.LastError
		}
	}
	if st.Mode == ModeTaskStart {
		if err := n.kube.usable(); err != nil {
			st.Mode, st.Reason = ModeOff, st.Reason+"; task-start path unusable: "+err.Error()
		}
	}
	return st
}

// nriActive reports whether NRI sets sidecar values now.
func (n *nriPlugin) active() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.connected && n.a.Switch(SwitchNRI)
}

// run keeps the plugin registered until ctx ends: a broken connection
// (containerd restarted) is retried with backoff, and a new stub is made
// for each attempt, as the stub is single-use once its connection closed.
func (n *nriPlugin) run(ctx context.Context) {
	if n.socket == "" {
		return
	}
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		closed := make(chan struct{})
		var once sync.Once
		s, err := stub.New(n, stub.WithPluginName(n.name), stub.WithPluginIdx(n.idx),
			stub.WithSocketPath(n.socket), stub.WithLogger(nriLogger{n.a.log}),
			stub.WithOnClose(func() { once.Do(func() { close(closed) }) }))
		if err == nil {
			err = n.start(ctx, s)
		}
		if ctx.Err() != nil {
			if err == nil {
				s.Stop()
				s.Wait()
			}
			return
		}
		if err != nil {
			n.setConn(false, err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 5*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		n.setConn(true, nil)
		n.a.record(Event{Time: time.Now(), Type: EvNRIConnect, Reason: "registered as NRI plugin " + n.idx + "-" + n.name + " at " + n.socket})
		select {
		case <-ctx.Done():
			s.Stop()
			s.Wait()
			n.setConn(false, nil)
			return
		case <-closed:
			s.Stop()
			n.setConn(false, fmt.Errorf("connection closed"))
			n.a.record(Event{Time: time.Now(), Type: EvNRILost, Reason: "NRI connection at " + n.socket + " closed; reconnecting"})
		}
	}
}

// start registers s. The stub's Start waits for containerd's Configure
// without a bound, under a lock its Stop also takes: a runtime that
// accepts the connection and never configures would hold the agent's
// shutdown forever, so on ctx's end the attempt is abandoned.
func (n *nriPlugin) start(ctx context.Context, s stub.Stub) error {
	done := make(chan error, 1)
	go func() { done <- s.Start(ctx) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (n *nriPlugin) setConn(up bool, err error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if up != n.connected {
		n.since = time.Now()
	}
	n.connected = up
	if err != nil {
		n.lastErr = err.Error()
	} else if up {
		n.lastErr = ""
	}
}

// CreateContainer sets a sidecar's values in its adjustment.
func (n *nriPlugin) CreateContainer(_ context.Context, pod *api.PodSandbox, ctr *api.Container) (*api.ContainerAdjustment, []*api.ContainerUpdate, error) {
	v, ok := n.values(pod, ctr)
	if !ok {
		return nil, nil, nil
	}
	adj := &api.ContainerAdjustment{}
	score := v.OOMScoreAdj
	adj.SetLinuxOomScoreAdj(&score)
	setResources(adj, v)
	n.mu.Lock()
	n.adjusted++
	n.mu.Unlock()
	n.a.record(Event{Time: time.Now(), Pod: podDisplayName(pod), Container: ctr.GetName(), Type: EvNRIAdjust,
		Reason: v.String(), Fields: map[string]string{"role": string(RoleSidecar), "path": ModeNRI}})
	return adj, nil, nil
}

// UpdateContainer re-asserts a sidecar's CPU values over an update (e.g.
// an in-place resize), which would otherwise overwrite them.
func (n *nriPlugin) UpdateContainer(_ context.Context, pod *api.PodSandbox, ctr *api.Container, _ *api.LinuxResources) ([]*api.ContainerUpdate, error) {
	u := n.reassert(pod, ctr)
	if u == nil {
		return nil, nil
	}
	return []*api.ContainerUpdate{u}, nil
}

// Synchronize re-asserts the values of running sidecars when the plugin
// (re)connects, e.g. after containerd or the agent restarted.
func (n *nriPlugin) Synchronize(_ context.Context, pods []*api.PodSandbox, ctrs []*api.Container) ([]*api.ContainerUpdate, error) {
	byID := make(map[string]*api.PodSandbox, len(pods))
	for _, p := range pods {
		byID[p.GetId()] = p
	}
	var out []*api.ContainerUpdate
	for _, c := range ctrs {
		if p := byID[c.GetPodSandboxId()]; p != nil {
			if u := n.reassert(p, c); u != nil {
				out = append(out, u)
			}
		}
	}
	return out, nil
}

func (n *nriPlugin) reassert(pod *api.PodSandbox, ctr *api.Container) *api.ContainerUpdate {
	v, ok := n.values(pod, ctr)
	if !ok || v.CPUQuota == 0 && v.MemoryLimit == 0 {
		return nil // oom_score_adj is not updatable, and holds from the start
	}
	u := &api.ContainerUpdate{}
	u.SetContainerId(ctr.GetId())
	setResources(u, v)
	u.SetIgnoreFailure() // a container that went away must not fail the others
	n.mu.Lock()
	n.updated++
	n.mu.Unlock()
	return u
}

// values are the sidecar values for ctr; false when ctr is no sidecar, the
// switches are off, or its policy is bad (recorded as an event).
func (n *nriPlugin) values(pod *api.PodSandbox, ctr *api.Container) (SidecarValues, bool) {
	if !n.a.Switch(SwitchNRI) || !n.a.Switch(SwitchCgroupWrites) || !isSidecar(pod.GetAnnotations(), ctr.GetName()) {
		return SidecarValues{}, false
	}
	v, err := nriValues(pod, ctr)
	if err != nil {
		n.policyError(pod, ctr, err)
		return SidecarValues{}, false
	}
	return v, true
}

// nriResources is what an adjustment (at create) and an update (later)
// share of the values a sidecar gets.
type nriResources interface {
	SetLinuxCPUPeriod(int64)
	SetLinuxCPUQuota(int64)
	SetLinuxCPUShares(uint64)
	SetLinuxMemoryLimit(int64)
}

func setResources(r nriResources, v SidecarValues) {
	if v.CPUQuota > 0 {
		r.SetLinuxCPUPeriod(int64(v.CPUPeriod))
		r.SetLinuxCPUQuota(v.CPUQuota)
		r.SetLinuxCPUShares(v.CPUShares)
	}
	if v.MemoryLimit > 0 {
		r.SetLinuxMemoryLimit(v.MemoryLimit)
	}
}

func (n *nriPlugin) policyError(pod *api.PodSandbox, ctr *api.Container, err error) {
	n.a.record(Event{Time: time.Now(), Pod: podDisplayName(pod), Container: ctr.GetName(), Type: EvCgroupError,
		Reason: "sidecar policy not applied: " + err.Error()})
}

func podDisplayName(p *api.PodSandbox) string {
	return p.GetNamespace() + "/" + p.GetName()
}

// isSidecar reports whether container is listed in the pod's sidecar
// annotation.
func isSidecar(ann map[string]string, container string) bool {
	for _, s := range strings.Split(ann[AnnotationSidecarContainers], ",") {
		if strings.TrimSpace(s) == container && container != "" {
			return true
		}
	}
	return false
}

// SidecarValues are the values meshagent gives a Kubernetes sidecar.
type SidecarValues struct {
	OOMScoreAdj int
	// CPU: zero quota means no CPU policy.
	CPUQuota  int64
	CPUPeriod uint64
	CPUShares uint64
	// MemoryLimit caps the sidecar (0: it shares the pod's limit).
	MemoryLimit int64
}

func (v SidecarValues) String() string {
	s := fmt.Sprintf("oom_score_adj=%d", v.OOMScoreAdj)
	if v.CPUQuota > 0 {
		s += fmt.Sprintf(" cpu quota=%d period=%d shares=%d", v.CPUQuota, v.CPUPeriod, v.CPUShares)
	}
	if v.MemoryLimit > 0 {
		s += fmt.Sprintf(" memory=%d", v.MemoryLimit)
	}
	return s
}

// nriValues computes a sidecar's values from the NRI request alone.
func nriValues(pod *api.PodSandbox, ctr *api.Container) (SidecarValues, error) {
	kubeletAdj := 0
	if o := ctr.GetLinux().GetOomScoreAdj(); o != nil {
		kubeletAdj = int(o.GetValue())
	}
	var podMillis int64
	if cpu := pod.GetLinux().GetPodResources().GetCpu(); cpu != nil {
		podMillis = cpuMillis(cpu.GetQuota().GetValue(), cpu.GetPeriod().GetValue())
	}
	period := ctr.GetLinux().GetResources().GetCpu().GetPeriod().GetValue()
	return SidecarValuesFor(pod.GetAnnotations(), kubeletAdj, podMillis, period)
}

func cpuMillis(quota int64, period uint64) int64 {
	if quota <= 0 || period == 0 {
		return 0
	}
	return quota * 1000 / int64(period)
}

// SidecarValuesFor computes a Kubernetes sidecar's values from its pod's
// annotations, the oom_score_adj kubelet gave it (the pod's QoS value),
// the pod's CPU limit in millicores (0: none; needed for a percentage) and
// the container's CFS period (0: the kernel's 100 ms). It does no I/O: the
// NRI plugin and the task-start path share it, so both set the same values.
func SidecarValuesFor(ann map[string]string, kubeletAdj int, podMillis int64, period uint64) (SidecarValues, error) {
	pol, err := cgroup.PolicyFromAnnotations(ann)
	if err != nil {
		return SidecarValues{}, err
	}
	v := SidecarValues{OOMScoreAdj: cgroup.SidecarOOMScoreAdj(kubeletAdj), MemoryLimit: pol.MemoryMax}
	if pol.OOMScoreAdj != nil {
		v.OOMScoreAdj = *pol.OOMScoreAdj
	}
	if pol.CPU.IsZero() {
		return v, nil
	}
	if period == 0 {
		period = 100000
	}
	millis := pol.CPU.Millis
	if pol.CPU.Percent != 0 {
		if podMillis <= 0 {
			return SidecarValues{}, fmt.Errorf("cpu %s is a share of the pod's cpu limit, but the pod has none", pol.CPU)
		}
		millis = int64(math.Round(float64(podMillis) * pol.CPU.Percent / 100))
	}
	if pol.Mode == cgroup.CPUOversell && podMillis > 0 && millis > podMillis {
		return SidecarValues{}, fmt.Errorf("cpu %s (%dm) is above the pod's cpu limit %dm (use cpu-mode add)", pol.CPU, millis, podMillis)
	}
	v.CPUPeriod = period
	v.CPUQuota = millis * int64(period) / 1000
	if v.CPUQuota < 1000 {
		return SidecarValues{}, fmt.Errorf("cpu %s is %dµs per %dµs period, below the kernel minimum of 1000µs", pol.CPU, v.CPUQuota, period)
	}
	v.CPUShares = pol.Shares
	if v.CPUShares == 0 {
		v.CPUShares = uint64(max(2, millis*1024/1000))
	}
	return v, nil
}

// nriLogger sends the stub's log to the agent's, at debug for its chatter.
type nriLogger struct{ l *slog.Logger }

func (n nriLogger) Debugf(_ context.Context, f string, a ...any) {
	n.l.Debug("nri: " + fmt.Sprintf(f, a...))
}
func (n nriLogger) Infof(_ context.Context, f string, a ...any) {
	n.l.Debug("nri: " + fmt.Sprintf(f, a...))
}
func (n nriLogger) Warnf(_ context.Context, f string, a ...any) {
	n.l.Warn("nri: " + fmt.Sprintf(f, a...))
}
func (n nriLogger) Errorf(_ context.Context, f string, a ...any) {
	n.l.Error("nri: " + fmt.Sprintf(f, a...))
}
