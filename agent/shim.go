package agent

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/meshagent/meshagent/cgroup"
)

// The exec shim is the agent's own binary run between fork and the
// container's command. Go cannot run code in a forked child before exec,
// and some things must happen exactly there: entering the cgroup (so the
// process never runs unconfined), setting oom_score_adj (so every process
// it forks inherits it) and LISTEN_PID (which must be the final pid). The
// shim does them and then execs the command in place, keeping its pid.

const shimEnv = "MESHAGENT_EXEC_SHIM"

type shimSpec struct {
	Path        string   `json:"path"`
	Argv        []string `json:"argv"`
	CgroupProcs []string `json:"cgroupProcs,omitempty"`
	OOMScoreAdj *int     `json:"oomScoreAdj,omitempty"`
	ListenFDs   bool     `json:"listenFds,omitempty"`
	// ErrFD is where the shim writes why it failed; it is close-on-exec,
	// so the agent reads EOF once the command runs.
	ErrFD int `json:"errFd"`
}

// RunShimIfRequested turns this process into the exec shim when the agent
// started it as one, and never returns in that case. Call it first thing in
// main (and in TestMain of packages whose tests start containers).
func RunShimIfRequested() {
	raw, ok := os.LookupEnv(shimEnv)
	if !ok {
		return
	}
	var s shimSpec
	if err := json.Unmarshal([]byte(raw), &s); err != nil {
		shimFail(3, fmt.Errorf("exec shim: bad spec: %w", err))
	}
	unix.CloseOnExec(s.ErrFD)
	if err := runShim(&s); err != nil {
		shimFail(s.ErrFD, err)
	}
}

func runShim(s *shimSpec) error {
	if len(s.CgroupProcs) > 0 {
		if err := cgroup.EnterSelf(s.CgroupProcs); err != nil {
			return err
		}
	}
	if s.OOMScoreAdj != nil {
		if err := cgroup.SetOOMScoreAdj(0, *s.OOMScoreAdj); err != nil {
			return err
		}
	}
	env := make([]string, 0, len(os.Environ()))
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, shimEnv+"=") || strings.HasPrefix(kv, "LISTEN_PID=") {
			continue
		}
		env = append(env, kv)
	}
	if s.ListenFDs {
		env = append(env, "LISTEN_PID="+strconv.Itoa(os.Getpid()))
	}
	err := syscall.Exec(s.Path, s.Argv, env)
	return fmt.Errorf("exec %s: %w", s.Path, err)
}

func shimFail(fd int, err error) {
	msg := []byte(err.Error())
	if _, werr := unix.Write(fd, msg); werr != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	os.Exit(127)
}
