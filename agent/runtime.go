package agent

import (
	"context"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"
)

// Runtime runs the processes of containers: host processes here, containerd
// tasks in Kubernetes. The pod runner drives it; nothing else does.
type Runtime interface {
	// Start starts the container's process; it returns once the process
	// runs the container's command (not merely forked).
	Start(ctx context.Context, pod *PodSpec, c *ContainerSpec) (Process, error)
	// Adopt takes over a process a previous agent started, identified by
	// its record in the state directory. It fails with ErrGone when that
	// process no longer exists (or its pid was reused).
	Adopt(ctx context.Context, pod *PodSpec, c *ContainerSpec, rec ProcessRecord) (Process, error)
}

// Process is one running container process.
type Process interface {
	PID() int
	// Signal sends sig to the process and its process group.
	Signal(sig syscall.Signal) error
	// Done is closed when the process has exited (and was reaped).
	Done() <-chan struct{}
	// Exit is the exit status; valid once Done is closed.
	Exit() ExitStatus
	// Record identifies the process for a later agent to adopt it.
	Record() ProcessRecord
	// Release lets go of the agent's handles without touching the process.
	Release() error
}

// exitHook is a Process that can run f on its own watcher once it has
// exited, before Done closes. The supervisor would otherwise keep a
// goroutine per process, and per feature, blocked on Done: on a node of
// 200 pods that was 800 idle goroutines and their stacks. f never runs
// after Release; hooks run in the order they were added.
type exitHook interface {
	OnExit(f func())
}

// onExit runs f once p has exited: on p's watcher where p offers one, on a
// goroutine of its own (counted in wg, if any) otherwise. stop ends that
// goroutine's wait without running f.
func onExit(p Process, stop <-chan struct{}, wg *sync.WaitGroup, f func()) {
	if h, ok := p.(exitHook); ok {
		h.OnExit(f)
		return
	}
	if wg != nil {
		wg.Add(1)
	}
	go func() {
		if wg != nil {
			defer wg.Done()
		}
		select {
		case <-p.Done():
			f()
		case <-stop:
		}
	}()
}

// stager is a Runtime that can do the slow part of a start ahead of time.
// On cgroup v1 entering a container's cgroups costs the kernel an RCU grace
// period per hierarchy, tens of milliseconds under load; staged while the
// sidecar starts, it is off the path from the sidecar's readiness to its
// apps' exec.
type stager interface {
	// Stage forks the container's process, placed and set up but not yet
	// running its command; nil when there is nothing to gain.
	Stage(ctx context.Context, pod *PodSpec, c *ContainerSpec) (stagedStart, error)
}

// stagedStart is a start done up to the exec.
type stagedStart interface {
	// Go runs the command in the staged process (same pid) and returns
	// once it runs.
	Go(ctx context.Context) (Process, error)
	// Cancel ends the staged process without running the command.
	Cancel()
}

// ErrGone means an adopted process no longer exists.
var ErrGone = fmt.Errorf("process gone")

// ProcessRecord identifies a process across agent restarts: a pid alone
// can be reused, a pid and its start time (in clock ticks since boot, from
// /proc/PID/stat) cannot.
type ProcessRecord struct {
	PID       int       `json:"pid"`
	StartTime uint64    `json:"startTime"`
	Started   time.Time `json:"started"`
}

// ExitStatus is how a process ended.
type ExitStatus struct {
	// Known is false for adopted processes: only a parent learns the
	// status of its child.
	Known  bool
	Code   int
	Signal syscall.Signal
}

func (e ExitStatus) String() string {
	switch {
	case !e.Known:
		return "exited (status unknown: adopted process)"
	case e.Signal != 0:
		return "killed by " + unixSignalName(e.Signal)
	default:
		return fmt.Sprintf("exit status %d", e.Code)
	}
}

// Failed reports whether the exit counts as a failure for on-failure restarts.
func (e ExitStatus) Failed() bool { return !e.Known || e.Signal != 0 || e.Code != 0 }

// StartSpec is what plugged-in features add to a container's start.
type StartSpec struct {
	// Env is added to the container's environment.
	Env []string
	// Files are passed as fds 3, 4, ... in order; the caller keeps them.
	Files []*os.File
	// ListenFDs makes the child set LISTEN_PID to its own pid before it
	// runs the command (systemd socket passing).
	ListenFDs bool
	// CgroupProcs are cgroup.procs files the child enters before it runs
	// the command, so it never runs unconfined.
	CgroupProcs []string
	// OOMScoreAdj, when set, is written for the child before it runs the
	// command, so it holds for every process it forks.
	OOMScoreAdj *int
	// After runs once the start is over, whether or not it succeeded:
	// the place to close what was only needed until the child had its
	// copies (an Activation's fds).
	After []func()
}

// Preparer is a feature that adds to a container's start: a cgroup, an
// oom_score_adj, listening sockets.
type Preparer interface {
	Prepare(ctx context.Context, pod *PodSpec, c *ContainerSpec, s *StartSpec) error
}

type preparersKey struct{}

// WithPreparers returns a ctx that makes a Runtime's Start apply ps after
// its own preparers: for features that belong to one pod runner (its fd
// stores) rather than to the runtime.
func WithPreparers(ctx context.Context, ps ...Preparer) context.Context {
	return context.WithValue(ctx, preparersKey{}, append(preparersFrom(ctx), ps...))
}

func preparersFrom(ctx context.Context) []Preparer {
	ps, _ := ctx.Value(preparersKey{}).([]Preparer)
	return ps[:len(ps):len(ps)]
}
