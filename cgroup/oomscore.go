package cgroup

import (
	"errors"
	"fmt"
	"strconv"

	"golang.org/x/sys/unix"
)

// ErrOOMScoreAdjPermission means the kernel refused an oom_score_adj write:
// lowering a value below the process's floor needs CAP_SYS_RESOURCE.
var ErrOOMScoreAdjPermission = errors.New("oom_score_adj write not permitted (lowering it needs CAP_SYS_RESOURCE)")

// Kernel bounds of /proc/PID/oom_score_adj.
const (
	OOMScoreAdjMin = -1000
	OOMScoreAdjMax = 1000
)

func oomPath(pid int) string {
	if pid == 0 {
		return "/proc/self/oom_score_adj"
	}
	return "/proc/" + strconv.Itoa(pid) + "/oom_score_adj"
}

// SetOOMScoreAdj writes v to the oom_score_adj of pid (0 = the caller).
// Children forked later inherit it, which is why the shim sets it before exec.
func SetOOMScoreAdj(pid, v int) error {
	if v < OOMScoreAdjMin || v > OOMScoreAdjMax {
		return fmt.Errorf("set oom_score_adj of pid %d: value %d outside [%d, %d]", pid, v, OOMScoreAdjMin, OOMScoreAdjMax)
	}
	err := writeSmall(oomPath(pid), strconv.Itoa(v))
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("set oom_score_adj of pid %d to %d: %w: %w", pid, v, ErrOOMScoreAdjPermission, err)
	}
	if err != nil {
		return fmt.Errorf("set oom_score_adj of pid %d to %d: %w", pid, v, err)
	}
	return nil
}

// ReadOOMScoreAdj reads the oom_score_adj of pid (0 = the caller).
func ReadOOMScoreAdj(pid int) (int, error) {
	return readOOMScoreAdjWith(readSmall, pid)
}

// readOOMScoreAdjWith reads and parses the oom_score_adj of pid through read
// (readSmall, or a Manager's kept fds).
func readOOMScoreAdjWith(read func(path string) (string, error), pid int) (int, error) {
	s, err := read(oomPath(pid))
	if err != nil {
		return 0, fmt.Errorf("read oom_score_adj of pid %d: %w", pid, err)
	}
	v, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("read oom_score_adj of pid %d: bad value %q", pid, s)
	}
	return v, nil
}

// SidecarOOMScoreAdj is the default rule: the app's value + 1000, clamped to
// 1000. The +1000 outweighs any difference in memory use (the kernel adds
// adj/1000 of the pod's memory limit to a process's badness), so the sidecar
// is the first victim of a pod-level OOM whatever the app's size.
func SidecarOOMScoreAdj(app int) int {
	return min(app+1000, OOMScoreAdjMax)
}
