package cgroup

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// EnterSelf moves the calling process (all its threads) into the group of
// each cgroup.procs file, by writing "0" to it. Called by the re-exec shim
// before it execs the real command, so that command starts confined.
func EnterSelf(files []string) error {
	if len(files) == 0 {
		return errors.New("enter cgroup: no cgroup.procs files given")
	}
	for _, f := range files {
		if err := writeSmall(f, "0"); err != nil {
			return fmt.Errorf("enter cgroup: %w", err)
		}
	}
	return nil
}

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
	s, err := readSmall(oomPath(pid))
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

// EntryEnv is the environment variable through which the agent hands an
// Entry to its re-exec shim.
const EntryEnv = "MESHAGENT_CGROUP_ENTRY"

// Entry is what a child must do to itself before it execs its command: join
// its cgroups and set its oom_score_adj. The agent builds it, passes it in
// EntryEnv (Encode), and the shim calls DecodeEntry then Enter, then
// syscall.Exec; the PID stays the same, the command starts confined.
type Entry struct {
	// ProcsFiles are the cgroup.procs files to join (Manager.ProcsFiles).
	ProcsFiles []string `json:"procs,omitempty"`
	// OOMScoreAdj, when set, is written to the shim's own oom_score_adj.
	OOMScoreAdj *int `json:"oom_score_adj,omitempty"`
}

// Encode returns the Entry as one environment-safe string.
func (e Entry) Encode() string {
	b, _ := json.Marshal(e) // a struct of strings and ints cannot fail
	return string(b)
}

// DecodeEntry parses what Encode produced.
func DecodeEntry(s string) (Entry, error) {
	var e Entry
	if err := json.Unmarshal([]byte(s), &e); err != nil {
		return Entry{}, fmt.Errorf("decode %s: %w", EntryEnv, err)
	}
	return e, nil
}

// Enter joins the cgroups, then sets oom_score_adj. Joining first means the
// process is never outside its memory group, whatever its score.
func (e Entry) Enter() error {
	if len(e.ProcsFiles) > 0 {
		if err := EnterSelf(e.ProcsFiles); err != nil {
			return err
		}
	}
	if e.OOMScoreAdj != nil {
		if err := SetOOMScoreAdj(0, *e.OOMScoreAdj); err != nil {
			return err
		}
	}
	return nil
}

// EnterFromEnv is the whole shim-side step: if EntryEnv is set, decode it,
// unset it (the command must not inherit it) and Enter. It reports whether
// an Entry was present.
func EnterFromEnv() (bool, error) {
	s, ok := os.LookupEnv(EntryEnv)
	if !ok {
		return false, nil
	}
	os.Unsetenv(EntryEnv)
	e, err := DecodeEntry(s)
	if err != nil {
		return true, err
	}
	return true, e.Enter()
}
