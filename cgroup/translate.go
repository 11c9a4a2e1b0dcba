package cgroup

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"

	"github.com/containerd/cgroups/v3/cgroup2"
)

// Knob is a logical cgroup setting; each maps to a file per cgroup version.
type Knob string

const (
	KnobCPUPeriod   Knob = "cpu.period"    // v1 cpu.cfs_period_us (v2: part of cpu.max)
	KnobCPUQuota    Knob = "cpu.quota"     // v1 cpu.cfs_quota_us, v2 cpu.max
	KnobCPUBurst    Knob = "cpu.burst"     // v1 cpu.cfs_burst_us, v2 cpu.max.burst
	KnobCPUShares   Knob = "cpu.shares"    // v1 cpu.shares, v2 cpu.weight
	KnobMemoryMax   Knob = "memory.max"    // v1 memory.limit_in_bytes, v2 memory.max
	KnobOOMScoreAdj Knob = "oom_score_adj" // /proc/PID/oom_score_adj of each sidecar process
)

// Container names one container of a pod and its group.
type Container struct {
	Name  string
	Group Group
}

// Target is one pod as the agent knows it: its groups, its own limits (from
// the host config or the pod spec) and the sidecar policy.
type Target struct {
	Pod      string
	PodGroup Group
	Sidecar  Container
	Apps     []Container
	// PodCPULimit is the pod's own CPU limit in millicores, without any
	// sidecar addition (0 = unlimited). Needed for "25%" and for add mode,
	// which must not add twice, so it comes from the spec, not the fs.
	PodCPULimit int64
	// PodMemoryLimit is the pod's memory limit in bytes (0 = unlimited);
	// written only when OwnPod.
	PodMemoryLimit int64
	// OwnPod is true in host mode: meshagent created the pod group, so it
	// also writes the pod's own CPU and memory limits. For Kubernetes pods
	// kubelet owns them and only add mode touches the pod quota.
	OwnPod bool
	Policy Policy
}

// Observed are the current values translation depends on.
type Observed struct {
	// PodPeriod is the pod's CFS period in µs (0 = the kernel default 100000).
	PodPeriod uint64
	// SidecarPIDs are the processes in the sidecar group.
	SidecarPIDs []int
	// AppOOMScoreAdj is the highest oom_score_adj among the app processes.
	AppOOMScoreAdj int
}

// Setting is one file and the value meshagent wants in it.
type Setting struct {
	Pod       string
	Container string // "" for the pod's own group
	Knob      Knob
	File      string
	Value     string
	PID       int // the process, for KnobOOMScoreAdj
}

func (s Setting) where() string {
	if s.Container == "" {
		return "pod " + s.Pod
	}
	return "pod " + s.Pod + " container " + s.Container
}

const defaultPeriod = 100000 // µs, the kernel's default CFS period

// minQuota is the kernel's smallest CFS quota (1 ms).
const minQuota = 1000

const pageSize = 4096

// Translate turns a target and the observed values into the settings
// meshagent wants, for a tree at root in the given mode. It does no I/O, so
// a policy can be checked (e.g. by `meshagent ctl plan`) without a host.
func Translate(root string, mode Mode, t Target, obs Observed) ([]Setting, error) {
	if mode == ModeAuto {
		return nil, fmt.Errorf("pod %s: translate needs a concrete cgroup mode", t.Pod)
	}
	return translate(strings.TrimRight(root, "/"), mode, t, obs)
}

// translate turns a target and what is observed into settings. It does no
// I/O: root and mode only build file names. The order of the result is
// canonical, not the write order (see orderWrites).
func translate(root string, mode Mode, t Target, obs Observed) ([]Setting, error) {
	l := layout{root: root, mode: mode}
	if err := checkName("pod", t.Pod); err != nil {
		return nil, err
	}
	if err := checkName("container", t.Sidecar.Name); err != nil {
		return nil, fmt.Errorf("pod %s: sidecar: %w", t.Pod, err)
	}
	if _, err := t.PodGroup.clean(); err != nil {
		return nil, fmt.Errorf("pod %s: %w", t.Pod, err)
	}
	if _, err := t.Sidecar.Group.clean(); err != nil {
		return nil, fmt.Errorf("pod %s container %s: %w", t.Pod, t.Sidecar.Name, err)
	}
	if t.PodCPULimit < 0 {
		return nil, fmt.Errorf("pod %s: negative pod cpu limit %dm", t.Pod, t.PodCPULimit)
	}
	p := t.Policy
	period := obs.PodPeriod
	if period == 0 {
		period = defaultPeriod
	}
	podSet := func(k Knob, v string) Setting {
		return Setting{Pod: t.Pod, Knob: k, File: l.file(k, t.PodGroup), Value: v}
	}
	sideSet := func(k Knob, v string) Setting {
		return Setting{Pod: t.Pod, Container: t.Sidecar.Name, Knob: k, File: l.file(k, t.Sidecar.Group), Value: v}
	}
	var out []Setting

	// Pod quota: the pod's own limit, plus the sidecar's in add mode.
	podMillis := t.PodCPULimit
	if !p.CPU.IsZero() {
		side, err := p.CPU.resolve(t.PodCPULimit)
		if err != nil {
			return nil, fmt.Errorf("pod %s container %s: %w", t.Pod, t.Sidecar.Name, err)
		}
		quota := millisToQuota(side, period)
		if quota < minQuota {
			return nil, fmt.Errorf("pod %s container %s: cpu %s is %dµs per %dµs period, below the kernel minimum of %dµs",
				t.Pod, t.Sidecar.Name, p.CPU, quota, period, minQuota)
		}
		if p.Mode == CPUAdd && t.PodCPULimit > 0 {
			podMillis = t.PodCPULimit + side
		}
		if p.Mode == CPUOversell && t.PodCPULimit > 0 && side > t.PodCPULimit {
			return nil, fmt.Errorf("pod %s container %s: cpu %s (%dm) is above the pod's cpu limit %dm; a child's quota cannot exceed its parent's (use cpu-mode add)",
				t.Pod, t.Sidecar.Name, p.CPU, side, t.PodCPULimit)
		}
		var burst int64
		if !p.Burst.IsZero() {
			b, err := p.Burst.resolve(t.PodCPULimit)
			if err != nil {
				return nil, fmt.Errorf("pod %s container %s: burst: %w", t.Pod, t.Sidecar.Name, err)
			}
			if b > side {
				return nil, fmt.Errorf("pod %s container %s: cpu burst %s (%dm) is above cpu %s (%dm)",
					t.Pod, t.Sidecar.Name, p.Burst, b, p.CPU, side)
			}
			burst = millisToQuota(b, period)
		}
		shares := p.Shares
		if shares == 0 {
			shares = uint64(max(2, side*1024/1000))
		}
		if mode.v1() {
			out = append(out,
				sideSet(KnobCPUPeriod, strconv.FormatUint(period, 10)),
				sideSet(KnobCPUQuota, strconv.FormatInt(quota, 10)),
				sideSet(KnobCPUShares, strconv.FormatUint(shares, 10)))
		} else {
			out = append(out,
				sideSet(KnobCPUQuota, fmt.Sprintf("%d %d", quota, period)),
				sideSet(KnobCPUShares, strconv.FormatUint(cgroup2.ConvertCPUSharesToCgroupV2Value(shares), 10)))
		}
		// Burst is always written when a quota is, so removing it from the
		// policy resets it to 0 rather than leaving a stale burst.
		out = append(out, sideSet(KnobCPUBurst, strconv.FormatInt(burst, 10)))
	}
	if t.OwnPod || (p.Mode == CPUAdd && !p.CPU.IsZero() && t.PodCPULimit > 0) {
		q := int64(-1)
		if podMillis > 0 {
			q = millisToQuota(podMillis, period)
		}
		if mode.v1() {
			out = append(out, podSet(KnobCPUQuota, strconv.FormatInt(q, 10)))
		} else if q < 0 {
			out = append(out, podSet(KnobCPUQuota, fmt.Sprintf("max %d", period)))
		} else {
			out = append(out, podSet(KnobCPUQuota, fmt.Sprintf("%d %d", q, period)))
		}
	}

	// Memory: the sidecar shares the pod's limit unless capped.
	if p.MemoryMax < 0 || t.PodMemoryLimit < 0 {
		return nil, fmt.Errorf("pod %s: negative memory limit", t.Pod)
	}
	if p.MemoryMax > 0 {
		if p.MemoryMax < pageSize {
			return nil, fmt.Errorf("pod %s container %s: memory cap %d bytes is below one page", t.Pod, t.Sidecar.Name, p.MemoryMax)
		}
		out = append(out, sideSet(KnobMemoryMax, memValue(mode, p.MemoryMax)))
	}
	if t.OwnPod {
		out = append(out, podSet(KnobMemoryMax, memValue(mode, t.PodMemoryLimit)))
	}

	// OOM order: every sidecar process.
	adj := SidecarOOMScoreAdj(obs.AppOOMScoreAdj)
	if p.OOMScoreAdj != nil {
		adj = *p.OOMScoreAdj
	}
	pids := append([]int(nil), obs.SidecarPIDs...)
	sort.Ints(pids)
	for _, pid := range pids {
		out = append(out, Setting{Pod: t.Pod, Container: t.Sidecar.Name, Knob: KnobOOMScoreAdj,
			File: oomPath(pid), Value: strconv.Itoa(adj), PID: pid})
	}
	return out, nil
}

func millisToQuota(millis int64, period uint64) int64 {
	if millis > math.MaxInt64/int64(period) {
		return math.MaxInt64
	}
	return millis * int64(period) / 1000
}

// memValue is the limit as the kernel reads it back: rounded down to a
// page, so a correct value compares equal and causes no write.
func memValue(mode Mode, limit int64) string {
	if limit == 0 {
		if mode.v1() {
			return "-1"
		}
		return "max"
	}
	return strconv.FormatInt(limit/pageSize*pageSize, 10)
}

// layout maps knobs to files.
type layout struct {
	root string
	mode Mode
}

// v1Files and v2Files place each knob's file: root + [0] + group + [1]. On
// v1 a knob lives in its controller's hierarchy, on v2 in the group itself.
// A knob without an entry (oom_score_adj, a /proc file) has no group file.
var (
	v1Files = map[Knob][2]string{
		KnobCPUPeriod: {"/cpu/", "/cpu.cfs_period_us"},
		KnobCPUQuota:  {"/cpu/", "/cpu.cfs_quota_us"},
		KnobCPUBurst:  {"/cpu/", "/cpu.cfs_burst_us"},
		KnobCPUShares: {"/cpu/", "/cpu.shares"},
		KnobMemoryMax: {"/memory/", "/memory.limit_in_bytes"},
	}
	v2Files = map[Knob][2]string{
		KnobCPUPeriod: {"/", "/cpu.max"},
		KnobCPUQuota:  {"/", "/cpu.max"},
		KnobCPUBurst:  {"/", "/cpu.max.burst"},
		KnobCPUShares: {"/", "/cpu.weight"},
		KnobMemoryMax: {"/", "/memory.max"},
	}
)

func (l layout) file(k Knob, g Group) string {
	files := v2Files
	if l.mode.v1() {
		files = v1Files
	}
	f, ok := files[k]
	if !ok {
		return ""
	}
	// Plain concatenation: groups are validated (clean, relative) before
	// they get here, and this runs thousands of times per pass.
	return l.root + f[0] + strings.Trim(string(g), "/") + f[1]
}

// sameValue compares a file's content with a desired value, tolerating the
// kernel's spellings (v1 reports "no limit" as a huge page-aligned number).
func sameValue(k Knob, current, desired string) bool {
	if current == desired {
		return true
	}
	if k == KnobMemoryMax && (desired == "-1" || desired == "max") {
		n, err := strconv.ParseInt(current, 10, 64)
		return err == nil && n >= math.MaxInt64/pageSize*pageSize-pageSize
	}
	return false
}

// write is a setting that differs from what is in place.
type write struct {
	Setting
	Current string
}

// bandwidth reads a quota or burst value as a number, unlimited as +inf.
func bandwidth(v string) float64 {
	f := strings.Fields(v)
	if len(f) == 0 || f[0] == "max" || f[0] == "-1" {
		return math.Inf(1)
	}
	n, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return math.Inf(1)
	}
	return n
}

// orderWrites puts writes in an order the kernel accepts at every step. On
// v1 a child's quota may not exceed its parent's, and on both versions burst
// may not exceed quota. So the pod's quota goes first when it rises (its
// children fit under the old value, hence under the new) and last when it
// falls (the children are brought under the new value first); within one
// group a falling quota is preceded by its burst, a rising one followed by
// it. "Unlimited" counts as infinity. Other knobs follow.
func orderWrites(ws []write) []write {
	podFirst := true
	for _, w := range ws {
		if w.Container == "" && w.Knob == KnobCPUQuota && bandwidth(w.Value) < bandwidth(w.Current) {
			podFirst = false
		}
	}
	// Per group: does its quota fall?
	falling := map[string]bool{}
	for _, w := range ws {
		if w.Knob == KnobCPUQuota && bandwidth(w.Value) < bandwidth(w.Current) {
			falling[w.Container] = true
		}
	}
	rank := func(w write) [3]int {
		if w.Knob != KnobCPUQuota && w.Knob != KnobCPUBurst {
			return [3]int{1, 0, 0}
		}
		level := 0 // pod group first
		if (w.Container == "") != podFirst {
			level = 1
		}
		knob := 0 // quota first
		if (w.Knob == KnobCPUBurst) != falling[w.Container] {
			knob = 1
		}
		return [3]int{0, level, knob}
	}
	out := append([]write(nil), ws...)
	sort.SliceStable(out, func(i, j int) bool {
		a, b := rank(out[i]), rank(out[j])
		for k := range a {
			if a[k] != b[k] {
				return a[k] < b[k]
			}
		}
		return false
	})
	return out
}
