package handoff

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// ErrNotInTree is wrapped by ProcessTree's refusals.
var ErrNotInTree = errors.New("process is not in the sidecar's process tree")

// maxTreeDepth bounds the walk up the parent chain.
const maxTreeDepth = 128

// ProcessTree returns an Options.Authorize func that accepts a peer whose
// pid is root() or one of its descendants, whatever its uid. root is
// called per check because the sidecar's pid changes with every start; a
// root() <= 0 (no sidecar running) refuses everyone. The agent may prefer a
// cgroup check where pods have cgroups; this one needs only /proc.
func ProcessTree(root func() int) func(pid int32, uid uint32) error {
	return func(pid int32, _ uint32) error {
		r := root()
		if r <= 0 {
			return fmt.Errorf("%w: no sidecar running", ErrNotInTree)
		}
		p := int(pid)
		for range maxTreeDepth {
			if p == r {
				return nil
			}
			if p <= 1 {
				break
			}
			pp, err := parentPID(procRoot, p)
			if err != nil {
				return fmt.Errorf("%w: pid %d: %w", ErrNotInTree, pid, err)
			}
			p = pp
		}
		return fmt.Errorf("%w: pid %d does not descend from pid %d", ErrNotInTree, pid, r)
	}
}

// parentPID reads the parent pid from /proc/PID/stat. The command name in
// field 2 may contain spaces and parentheses, so parsing starts after the
// last ')'.
func parentPID(proc string, pid int) (int, error) {
	b, err := os.ReadFile(filepath.Join(proc, strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := bytes.Fields(b[i+1:])
	if len(f) < 2 {
		return 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	return strconv.Atoi(string(f[1]))
}
