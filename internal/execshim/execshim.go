// Package execshim is what runs between fork and a container's command.
//
// Go cannot run code in a forked child before exec, and some things must
// happen exactly there: entering the cgroup (so the process never runs
// unconfined), setting oom_score_adj (so every process it forks inherits
// it) and LISTEN_PID (which must be the final pid). The agent starts a small
// binary, meshagent-exec (or itself, when that is not installed), which does
// them and execs the command in place, keeping its pid.
//
// The package imports nothing beyond the standard library and x/sys, so
// meshagent-exec starts in about a millisecond: its start is on the path
// from a sidecar becoming ready to its apps running. It therefore writes the
// cgroup and oom_score_adj files itself instead of importing cgroup/, whose
// library dependencies cost milliseconds of package initialisation.
package execshim

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Env carries the Spec, as JSON, to the shim.
const Env = "MESHAGENT_EXEC_SHIM"

// Spec is what the shim does before it execs Path.
type Spec struct {
	Path        string   `json:"path"`
	Argv        []string `json:"argv"`
	CgroupProcs []string `json:"cgroupProcs,omitempty"`
	OOMScoreAdj *int     `json:"oomScoreAdj,omitempty"`
	ListenFDs   bool     `json:"listenFds,omitempty"`
	// ErrFD is where the shim writes why it failed; it is close-on-exec,
	// so the agent reads EOF once the command runs.
	ErrFD int `json:"errFd"`
	// WaitFD, when set, holds the shim after it has entered its cgroups
	// until a byte arrives (a staged start: the slow part done before a
	// gate opens); EOF instead means the start was called off.
	WaitFD int `json:"waitFd,omitempty"`
}

// RunIfRequested turns this process into the shim when it was started as
// one, and never returns in that case.
func RunIfRequested() {
	raw, ok := os.LookupEnv(Env)
	if !ok {
		return
	}
	var s Spec
	if err := json.Unmarshal([]byte(raw), &s); err != nil {
		fail(3, fmt.Errorf("exec shim: bad spec: %w", err))
	}
	unix.CloseOnExec(s.ErrFD)
	if err := run(&s); err != nil {
		fail(s.ErrFD, err)
	}
}

func run(s *Spec) error {
	for _, f := range s.CgroupProcs {
		// "0" is the writing process itself.
		if err := os.WriteFile(f, []byte("0"), 0); err != nil {
			return fmt.Errorf("enter cgroup: %w", err)
		}
	}
	if s.OOMScoreAdj != nil {
		if err := os.WriteFile("/proc/self/oom_score_adj", []byte(strconv.Itoa(*s.OOMScoreAdj)), 0); err != nil {
			return fmt.Errorf("set oom_score_adj to %d: %w", *s.OOMScoreAdj, err)
		}
	}
	if s.WaitFD > 0 {
		var b [1]byte
		for {
			n, err := unix.Read(s.WaitFD, b[:])
			if err == unix.EINTR {
				continue
			}
			if n != 1 {
				os.Exit(0) // called off: run nothing
			}
			break
		}
		unix.Close(s.WaitFD)
	}
	env := make([]string, 0, len(os.Environ()))
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, Env+"=") || strings.HasPrefix(kv, "LISTEN_PID=") {
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

func fail(fd int, err error) {
	if _, werr := unix.Write(fd, []byte(err.Error())); werr != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	os.Exit(127)
}
