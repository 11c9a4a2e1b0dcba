package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Driver is the kubelet cgroup driver.
type Driver int

const (
	// DriverCgroupfs: kubepods/<qos>/pod<uid>/<containerID>.
	DriverCgroupfs Driver = iota
	// DriverSystemd: kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/<runtime>-<id>.scope.
	DriverSystemd
)

func (d Driver) String() string {
	if d == DriverSystemd {
		return "systemd"
	}
	return "cgroupfs"
}

// QoS is a pod's Kubernetes QoS class. Guaranteed pods have no QoS level in
// their path.
type QoS string

const (
	QoSGuaranteed QoS = "guaranteed"
	QoSBurstable  QoS = "burstable"
	QoSBestEffort QoS = "besteffort"
)

// KubeLayout says where kubelet and the container runtime put pod and
// container cgroups. The zero value is kubelet's default with the cgroupfs
// driver and containerd.
type KubeLayout struct {
	Driver Driver
	// Parent is kubelet's pods group: default "kubepods" (cgroupfs) or
	// "kubepods.slice" (systemd); may have leading elements (--cgroup-root).
	Parent string
	// ScopePrefix names systemd container scopes: default "cri-containerd".
	ScopePrefix string
}

func (l KubeLayout) parent() string {
	if l.Parent != "" {
		return strings.Trim(l.Parent, "/")
	}
	if l.Driver == DriverSystemd {
		return "kubepods.slice"
	}
	return "kubepods"
}

func (l KubeLayout) scopePrefix() string {
	if l.ScopePrefix != "" {
		return l.ScopePrefix
	}
	return "cri-containerd"
}

func checkQoS(q QoS) error {
	switch q {
	case QoSGuaranteed, QoSBurstable, QoSBestEffort:
		return nil
	}
	return fmt.Errorf("unknown qos class %q (want guaranteed, burstable or besteffort)", string(q))
}

func checkID(kind, id string) error {
	if id == "" || strings.ContainsAny(id, "/_ \n\x00") || id == "." || id == ".." {
		return fmt.Errorf("invalid %s %q", kind, id)
	}
	return nil
}

// PodGroup is the group of the pod with the given QoS class and UID.
func (l KubeLayout) PodGroup(qos QoS, uid string) (Group, error) {
	if err := checkQoS(qos); err != nil {
		return "", fmt.Errorf("pod %s: %w", uid, err)
	}
	if err := checkID("pod uid", uid); err != nil {
		return "", err
	}
	p := l.parent()
	if l.Driver == DriverSystemd {
		// systemd slice names use '-' as the nesting separator, so the
		// dashes of the UID become underscores.
		u := strings.ReplaceAll(uid, "-", "_")
		if qos == QoSGuaranteed {
			return Group(fmt.Sprintf("%s/kubepods-pod%s.slice", p, u)), nil
		}
		return Group(fmt.Sprintf("%s/kubepods-%s.slice/kubepods-%s-pod%s.slice", p, qos, qos, u)), nil
	}
	if qos == QoSGuaranteed {
		return Group(fmt.Sprintf("%s/pod%s", p, uid)), nil
	}
	return Group(fmt.Sprintf("%s/%s/pod%s", p, qos, uid)), nil
}

// ContainerGroup is the group of one container of a pod.
func (l KubeLayout) ContainerGroup(qos QoS, uid, containerID string) (Group, error) {
	pg, err := l.PodGroup(qos, uid)
	if err != nil {
		return "", err
	}
	if err := checkID("container id", containerID); err != nil {
		return "", fmt.Errorf("pod %s: %w", uid, err)
	}
	if l.Driver == DriverSystemd {
		return Group(fmt.Sprintf("%s/%s-%s.scope", pg, l.scopePrefix(), containerID)), nil
	}
	return Group(string(pg) + "/" + containerID), nil
}

// KubeRef is where a cgroup path sits in Kubernetes' layout.
type KubeRef struct {
	Driver      Driver
	QoS         QoS
	PodUID      string
	ContainerID string // empty when the path is the pod's own group
	PodGroup    Group
	Group       Group // the parsed group itself
}

// ErrNotKube means a cgroup path is not inside a Kubernetes pod.
var ErrNotKube = errors.New("not a kubernetes pod cgroup")

// ParseKubeGroup locates a cgroup path (as in /proc/PID/cgroup) in either
// driver's layout. It looks for the pods group anywhere in the path, so a
// kubelet with --cgroup-root or a nested node still parses.
func ParseKubeGroup(p string) (KubeRef, error) {
	parts := strings.Split(strings.Trim(p, "/"), "/")
	for i, el := range parts {
		switch el {
		case "kubepods":
			return parseCgroupfs(parts, i)
		case "kubepods.slice":
			return parseSystemd(parts, i)
		}
	}
	return KubeRef{}, fmt.Errorf("cgroup %s: %w", p, ErrNotKube)
}

func parseCgroupfs(parts []string, i int) (KubeRef, error) {
	ref := KubeRef{Driver: DriverCgroupfs, QoS: QoSGuaranteed}
	rest := parts[i+1:]
	if len(rest) > 0 && (rest[0] == string(QoSBurstable) || rest[0] == string(QoSBestEffort)) {
		ref.QoS = QoS(rest[0])
		rest = rest[1:]
	}
	if len(rest) == 0 || !strings.HasPrefix(rest[0], "pod") || len(rest[0]) == 3 {
		return KubeRef{}, fmt.Errorf("cgroup /%s: %w", strings.Join(parts, "/"), ErrNotKube)
	}
	ref.PodUID = strings.TrimPrefix(rest[0], "pod")
	podEnd := len(parts) - len(rest) + 1
	ref.PodGroup = Group(strings.Join(parts[:podEnd], "/"))
	ref.Group = ref.PodGroup
	if len(rest) > 1 {
		ref.ContainerID = rest[1]
		ref.Group = Group(strings.Join(parts[:podEnd+1], "/"))
	}
	return ref, nil
}

func parseSystemd(parts []string, i int) (KubeRef, error) {
	bad := fmt.Errorf("cgroup /%s: %w", strings.Join(parts, "/"), ErrNotKube)
	ref := KubeRef{Driver: DriverSystemd, QoS: QoSGuaranteed}
	rest := parts[i+1:]
	if len(rest) > 0 {
		for _, q := range []QoS{QoSBurstable, QoSBestEffort} {
			if rest[0] == "kubepods-"+string(q)+".slice" {
				ref.QoS = q
				rest = rest[1:]
				break
			}
		}
	}
	if len(rest) == 0 {
		return KubeRef{}, bad
	}
	prefix := "kubepods-pod"
	if ref.QoS != QoSGuaranteed {
		prefix = "kubepods-" + string(ref.QoS) + "-pod"
	}
	uid, ok := strings.CutPrefix(rest[0], prefix)
	if !ok {
		return KubeRef{}, bad
	}
	uid, ok = strings.CutSuffix(uid, ".slice")
	if !ok || uid == "" {
		return KubeRef{}, bad
	}
	ref.PodUID = strings.ReplaceAll(uid, "_", "-")
	podEnd := len(parts) - len(rest) + 1
	ref.PodGroup = Group(strings.Join(parts[:podEnd], "/"))
	ref.Group = ref.PodGroup
	if len(rest) > 1 {
		scope, ok := strings.CutSuffix(rest[1], ".scope")
		if !ok {
			return KubeRef{}, bad
		}
		// "<runtime>-<id>": the ID is after the last dash (runtime prefixes
		// such as cri-containerd contain dashes, IDs are hex).
		j := strings.LastIndexByte(scope, '-')
		if j < 0 || j == len(scope)-1 {
			return KubeRef{}, bad
		}
		ref.ContainerID = scope[j+1:]
		ref.Group = Group(strings.Join(parts[:podEnd+1], "/"))
	}
	return ref, nil
}

// KubeRefOfPID finds the pod and container of a process from
// <procRoot>/<pid>/cgroup (procRoot default "/proc"). It uses the memory
// controller's line on v1 and the unified line on v2, the hierarchies that
// kubelet always populates.
func KubeRefOfPID(procRoot string, pid int) (KubeRef, error) {
	if procRoot == "" {
		procRoot = "/proc"
	}
	f := filepath.Join(procRoot, strconv.Itoa(pid), "cgroup")
	b, err := os.ReadFile(f)
	if err != nil {
		return KubeRef{}, fmt.Errorf("pid %d: %w", pid, err)
	}
	ref, err := KubeRefFromProcCgroup(string(b))
	if err != nil {
		return KubeRef{}, fmt.Errorf("pid %d: %w", pid, err)
	}
	return ref, nil
}

// KubeRefFromProcCgroup parses the content of a /proc/PID/cgroup file.
func KubeRefFromProcCgroup(content string) (KubeRef, error) {
	var v1mem, unified string
	for _, line := range strings.Split(content, "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) != 3 {
			continue
		}
		if f[0] == "0" && f[1] == "" {
			unified = f[2]
		}
		for _, c := range strings.Split(f[1], ",") {
			if c == "memory" {
				v1mem = f[2]
			}
		}
	}
	var firstErr error
	for _, p := range []string{v1mem, unified} {
		if p == "" {
			continue
		}
		ref, err := ParseKubeGroup(p)
		if err == nil {
			return ref, nil
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	if firstErr == nil {
		firstErr = fmt.Errorf("no memory or unified line: %w", ErrNotKube)
	}
	return KubeRef{}, firstErr
}
