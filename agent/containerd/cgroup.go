package containerd

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// ErrNotInPod is returned by PodOfPID for a process outside any pod
// container's cgroup.
var ErrNotInPod = errors.New("process is not in a pod container")

// CgroupRef is what a process's cgroup path says about the pod container it
// runs in.
type CgroupRef struct {
	PodUID      string // from the pod<uid> folder, with the systemd driver's _ turned back into -
	ContainerID string // the containerd container (CRI container or sandbox) id
}

// PodOfPID tells which pod container process pid runs in, from
// /proc/<pid>/cgroup. This is how the agent checks that a caller on its node
// socket (known by its peer credentials) belongs to the pod it asks about.
// Both kubelet cgroup drivers are understood: cgroupfs
// (/kubepods/<qos>/pod<uid>/<id>) and systemd
// (kubepods-<qos>-pod<uid>.slice/cri-containerd-<id>.scope). Paths relative
// to the reader's cgroup namespace ("/../../besteffort/pod<uid>/<id>", as the
// agent sees them from its own pod on cgroup v2) work too.
func PodOfPID(pid int) (CgroupRef, error) {
	path := "/proc/" + strconv.Itoa(pid) + "/cgroup"
	f, err := os.Open(path)
	if err != nil {
		return CgroupRef{}, fmt.Errorf("pod of pid %d: %w", pid, err)
	}
	defer f.Close()
	ref, err := parseProcCgroup(f)
	if err != nil {
		return CgroupRef{}, fmt.Errorf("pod of pid %d (%s): %w", pid, path, err)
	}
	return ref, nil
}

// parseProcCgroup reads /proc/PID/cgroup content ("id:controllers:path" per
// line, v1 and v2) and returns the first pod container reference found.
func parseProcCgroup(r io.Reader) (CgroupRef, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		if ref, ok := parseCgroupPath(parts[2]); ok {
			return ref, nil
		}
	}
	if err := sc.Err(); err != nil {
		return CgroupRef{}, err
	}
	return CgroupRef{}, ErrNotInPod
}

// parseCgroupPath finds pod<uid> followed by a container id in a cgroup
// path.
func parseCgroupPath(path string) (CgroupRef, bool) {
	segs := strings.Split(strings.Trim(path, "/"), "/")
	for i := 0; i+1 < len(segs); i++ {
		uid, ok := podUIDOf(segs[i])
		if !ok {
			continue
		}
		id := segs[i+1]
		id = strings.TrimSuffix(id, ".scope")
		for _, prefix := range []string{"cri-containerd-", "containerd-"} {
			id = strings.TrimPrefix(id, prefix)
		}
		if isContainerID(id) {
			return CgroupRef{PodUID: uid, ContainerID: id}, true
		}
	}
	return CgroupRef{}, false
}

// podUIDOf recognises "pod<uid>" (cgroupfs) and
// "kubepods-<qos>-pod<uid>.slice" (systemd, with the uid's - written as _).
func podUIDOf(seg string) (string, bool) {
	if strings.HasSuffix(seg, ".slice") {
		seg = strings.TrimSuffix(seg, ".slice")
		i := strings.LastIndex(seg, "-pod")
		if i < 0 {
			return "", false
		}
		uid := strings.ReplaceAll(seg[i+len("-pod"):], "_", "-")
		return uid, uid != ""
	}
	uid, ok := strings.CutPrefix(seg, "pod")
	return uid, ok && uid != ""
}

func isContainerID(s string) bool {
	if len(s) != 64 {
		return false
	}
	for _, r := range s {
		if (r < '0' || r > '9') && (r < 'a' || r > 'f') {
			return false
		}
	}
	return true
}
