package containerd

import (
	"fmt"
	"slices"
	"time"
)

// EventKind is what happened to a container.
type EventKind int

const (
	// ContainerCreated: a pod's container (or sandbox) now exists. Its task
	// state is in Event.Container (a resync may find it already running, in
	// which case TaskStarted follows).
	ContainerCreated EventKind = iota + 1
	// TaskStarted: the container's process runs with Event.Container.PID.
	TaskStarted
	// TaskExited: the process exited with Event.Container.ExitStatus. When a
	// resync finds the task gone without a recorded exit, ExitStatus is
	// UnknownExitStatus.
	TaskExited
	// TaskOOM: the kernel OOM killer hit the container's cgroup.
	TaskOOM
	// ContainerDeleted: the container is gone (kubelet removed it).
	ContainerDeleted
	// Synced: a listing of containerd has been reconciled; every container
	// that exists has been reported. Event.Pods holds the full pod model.
	Synced
	// Disconnected: the event stream broke (Event.Err); Run is reconnecting.
	// Changes meanwhile are reported by the resync that follows.
	Disconnected
)

// UnknownExitStatus marks an exit that was inferred, not observed.
const UnknownExitStatus = ^uint32(0)

func (k EventKind) String() string {
	switch k {
	case ContainerCreated:
		return "container-created"
	case TaskStarted:
		return "task-started"
	case TaskExited:
		return "task-exited"
	case TaskOOM:
		return "task-oom"
	case ContainerDeleted:
		return "container-deleted"
	case Synced:
		return "synced"
	case Disconnected:
		return "disconnected"
	}
	return fmt.Sprintf("event-kind(%d)", int(k))
}

// Event is one change of one container, reported once.
type Event struct {
	Kind EventKind
	// Container is the container's identity and its state after the change
	// (for ContainerDeleted: the last state known).
	Container Container
	// Resync is true when the change was inferred from a listing (first
	// discovery, or after a reconnect) rather than seen as it happened.
	Resync bool
	// Time is when containerd recorded the event, or when the listing was
	// taken.
	Time time.Time
	Pods []Pod // Synced only
	// Err is, for Disconnected, why the stream broke; for Synced, the pods
	// whose meshagent.io annotations do not parse (they are in Pods with
	// every container an app).
	Err error
}

func (e Event) String() string {
	c := e.Container
	s := fmt.Sprintf("%s %s/%s", e.Kind, c.Pod, cmpOr(c.Name, string(c.Kind)))
	if c.ID != "" {
		s += " " + shortID(c.ID)
	}
	if c.PID != 0 {
		s += fmt.Sprintf(" pid=%d", c.PID)
	}
	if e.Kind == TaskExited {
		s += fmt.Sprintf(" status=%d", int32(c.ExitStatus))
	}
	if e.Resync {
		s += " (resync)"
	}
	return s
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// tracker remembers what has been reported about every container and turns
// observations (live events or a listing) into the events not yet reported.
// It is pure: no I/O, one goroutine.
type tracker struct {
	known map[string]*Container
	ended map[string]map[uint32]bool // container id → pids of earlier tasks
}

func newTracker() *tracker {
	return &tracker{known: map[string]*Container{}, ended: map[string]map[uint32]bool{}}
}

// created records a container seen being created.
func (tr *tracker) created(c Container, at time.Time) []Event {
	if _, ok := tr.known[c.ID]; ok {
		return nil
	}
	c.Status, c.PID = StatusNone, 0
	tr.known[c.ID] = &c
	return []Event{{Kind: ContainerCreated, Container: c, Time: at}}
}

// started records a task start of pid. A start of a pid already reported
// (started or exited), now or in an earlier incarnation, is old news.
func (tr *tracker) started(id string, pid uint32, at time.Time) []Event {
	c, ok := tr.known[id]
	if !ok || tr.ended[id][pid] {
		return nil
	}
	if c.PID == pid && (c.Status == StatusRunning || c.Status == StatusStopped || c.Status == StatusPaused) {
		return nil
	}
	var evs []Event
	if c.PID != 0 && c.PID != pid {
		if c.Status == StatusRunning || c.Status == StatusPaused {
			// A new incarnation while the old one was never seen exiting.
			evs = append(evs, tr.exit(c, UnknownExitStatus, at, false))
		}
		tr.retire(id, c.PID)
	}
	c.PID, c.Status, c.ExitStatus, c.ExitedAt = pid, StatusRunning, 0, time.Time{}
	return append(evs, Event{Kind: TaskStarted, Container: *c, Time: at})
}

// retire remembers that pid was an earlier incarnation of container id, so
// late events about it are dropped. (CRI never starts a second task in a
// container, so this stays tiny.)
func (tr *tracker) retire(id string, pid uint32) {
	if tr.ended[id] == nil {
		tr.ended[id] = map[uint32]bool{}
	}
	tr.ended[id][pid] = true
}

// exited records the exit of pid (0: the current task, pid unknown).
func (tr *tracker) exited(id string, pid uint32, status uint32, exitedAt, at time.Time) []Event {
	c, ok := tr.known[id]
	if !ok || tr.ended[id][pid] {
		return nil
	}
	if pid != 0 && c.PID != 0 && c.PID != pid && c.Status != StatusNone {
		return nil // not the incarnation we know: stale
	}
	if c.Status == StatusStopped {
		return nil
	}
	if c.Status == StatusNone && c.PID == 0 && pid == 0 {
		return nil
	}
	if pid != 0 {
		c.PID = pid
	}
	c.Status, c.ExitStatus, c.ExitedAt = StatusStopped, status, exitedAt
	return []Event{{Kind: TaskExited, Container: *c, Time: at}}
}

func (tr *tracker) exit(c *Container, status uint32, at time.Time, resync bool) Event {
	c.Status, c.ExitStatus, c.ExitedAt = StatusStopped, status, at
	return Event{Kind: TaskExited, Container: *c, Time: at, Resync: resync}
}

// taskCreated records a task that exists but has not started its program.
func (tr *tracker) taskCreated(id string, pid uint32) {
	if c, ok := tr.known[id]; ok && c.Status == StatusNone {
		c.PID, c.Status = pid, StatusCreated
	}
}

// oom reports an OOM kill; these are not deduplicated (each is news).
func (tr *tracker) oom(id string, at time.Time) []Event {
	c, ok := tr.known[id]
	if !ok {
		return nil
	}
	return []Event{{Kind: TaskOOM, Container: *c, Time: at}}
}

// deleted records that a container is gone.
func (tr *tracker) deleted(id string, at time.Time) []Event {
	c, ok := tr.known[id]
	if !ok {
		return nil
	}
	delete(tr.known, id)
	delete(tr.ended, id)
	var evs []Event
	if c.Status == StatusRunning || c.Status == StatusPaused {
		evs = append(evs, tr.exit(c, UnknownExitStatus, at, false))
	}
	return append(evs, Event{Kind: ContainerDeleted, Container: *c, Time: at})
}

// reconcile compares a listing with what has been reported and returns the
// missing events, marked Resync. l.containers carry their task state.
func (tr *tracker) reconcile(l listing, at time.Time) []Event {
	var evs []Event
	mark := func(es []Event) {
		for i := range es {
			es[i].Resync = true
		}
		evs = append(evs, es...)
	}
	seen := make(map[string]bool, len(l.containers))
	for _, lc := range l.containers {
		seen[lc.ID] = true
		c, known := tr.known[lc.ID]
		if !known {
			mark(tr.created(lc, at))
			c = tr.known[lc.ID]
			if lc.Status == StatusStopped {
				// Discovered already exited: report the state, not a start.
				c.PID, c.Status, c.ExitStatus, c.ExitedAt = lc.PID, lc.Status, lc.ExitStatus, lc.ExitedAt
				evs[len(evs)-1].Container = *c
				continue
			}
		}
		if c.Role == "" {
			c.Role = lc.Role
		}
		switch lc.Status {
		case StatusRunning, StatusPaused:
			mark(tr.started(lc.ID, lc.PID, at))
			c.Status = lc.Status
		case StatusCreated:
			if c.PID != 0 && c.PID != lc.PID {
				if c.Status == StatusRunning || c.Status == StatusPaused {
					mark([]Event{tr.exit(c, UnknownExitStatus, at, true)})
				}
				tr.retire(lc.ID, c.PID)
				c.PID, c.Status = lc.PID, StatusCreated
			}
			tr.taskCreated(lc.ID, lc.PID)
		case StatusStopped:
			if c.Status != StatusStopped || c.PID != lc.PID {
				if c.Status == StatusNone || c.Status == StatusCreated || c.PID != lc.PID {
					// Started and exited while we were away.
					mark(tr.started(lc.ID, lc.PID, at))
				}
				mark(tr.exited(lc.ID, lc.PID, lc.ExitStatus, lc.ExitedAt, at))
			}
		case StatusNone, StatusUnknown:
			if c.Status == StatusRunning || c.Status == StatusPaused {
				// Task deleted while we were away; its exit went unseen.
				mark([]Event{tr.exit(c, UnknownExitStatus, at, true)})
			}
		}
	}
	var gone []string
	for id := range tr.known {
		if !seen[id] {
			gone = append(gone, id)
		}
	}
	slices.Sort(gone)
	for _, id := range gone {
		mark(tr.deleted(id, at))
	}
	return evs
}
