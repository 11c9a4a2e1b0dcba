package containerd

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// brief renders events compactly: "kind id pid", with " r" for resync and
// the exit status for exits.
func brief(evs []Event) []string {
	var out []string
	for _, e := range evs {
		s := fmt.Sprintf("%s %s %d", e.Kind, e.Container.ID, e.Container.PID)
		if e.Kind == TaskExited {
			s += fmt.Sprintf(" exit=%d", int32(e.Container.ExitStatus))
		}
		if e.Resync {
			s += " r"
		}
		out = append(out, s)
	}
	return out
}

func ctr(id string, st Status, pid uint32) Container {
	kind := KindContainer
	if id[:2] == "sb" {
		kind = KindSandbox
	}
	return Container{ID: id, Kind: kind, SandboxID: "sb", Status: st, PID: pid}
}

func TestTrackerLiveEventsOnce(t *testing.T) {
	tr := newTracker()
	now := time.Unix(1, 0)
	var evs []Event
	add := func(es []Event) { evs = append(evs, es...) }

	add(tr.started("c1", 10, now)) // unknown container: ignored
	add(tr.created(ctr("c1", StatusNone, 0), now))
	add(tr.created(ctr("c1", StatusNone, 0), now)) // duplicate
	add(tr.started("c1", 10, now))
	add(tr.started("c1", 10, now)) // duplicate
	add(tr.oom("c1", now))
	add(tr.oom("c1", now)) // two OOM kills are two events
	add(tr.exited("c1", 10, 137, now, now))
	add(tr.exited("c1", 10, 137, now, now)) // /tasks/delete after /tasks/exit
	add(tr.started("c1", 10, now))          // a late start of the exited pid
	add(tr.deleted("c1", now))
	add(tr.deleted("c1", now)) // duplicate
	add(tr.oom("c1", now))     // after delete: unknown

	assert.Equal(t, []string{
		"container-created c1 0",
		"task-started c1 10",
		"task-oom c1 10",
		"task-oom c1 10",
		"task-exited c1 10 exit=137",
		"container-deleted c1 10",
	}, brief(evs))
}

func TestTrackerReconcile(t *testing.T) {
	now := time.Unix(1, 0)
	tests := []struct {
		name   string
		before []Container // reconciled first; its events are not checked
		list   []Container
		after  func(tr *tracker) []Event // live events arriving after the listing
		want   []string
	}{
		{
			name: "first discovery",
			list: []Container{
				ctr("sb", StatusRunning, 1),
				ctr("c1", StatusRunning, 2),
				{ID: "c2", Kind: KindContainer, SandboxID: "sb", Status: StatusStopped, PID: 3, ExitStatus: 1},
				ctr("c3", StatusNone, 0),
				ctr("c4", StatusCreated, 5),
			},
			want: []string{
				"container-created sb 0 r", "task-started sb 1 r",
				"container-created c1 0 r", "task-started c1 2 r",
				"container-created c2 3 r", // already exited: state, not a start
				"container-created c3 0 r",
				"container-created c4 0 r",
			},
		},
		{
			name: "buffered live events that the listing covered are dropped",
			list: []Container{ctr("c1", StatusStopped, 10)},
			after: func(tr *tracker) []Event {
				var evs []Event
				evs = append(evs, tr.created(ctr("c1", StatusNone, 0), now)...)
				evs = append(evs, tr.started("c1", 10, now)...)
				return append(evs, tr.exited("c1", 10, 0, now, now)...)
			},
			want: []string{"container-created c1 10 r"},
		},
		{
			name:   "exit seen only in the listing",
			before: []Container{ctr("c1", StatusRunning, 10)},
			list:   []Container{{ID: "c1", Kind: KindContainer, SandboxID: "sb", Status: StatusStopped, PID: 10, ExitStatus: 2}},
			after:  func(tr *tracker) []Event { return tr.exited("c1", 10, 2, now, now) },
			want:   []string{"task-exited c1 10 exit=2 r"},
		},
		{
			name:   "deleted and created while away",
			before: []Container{ctr("c1", StatusRunning, 10)},
			list:   []Container{ctr("c2", StatusRunning, 20)},
			after: func(tr *tracker) []Event {
				return append(tr.exited("c1", 10, 0, now, now), tr.deleted("c1", now)...)
			},
			want: []string{
				"container-created c2 0 r", "task-started c2 20 r",
				"task-exited c1 10 exit=-1 r", "container-deleted c1 10 r",
			},
		},
		{
			name:   "task deleted while away",
			before: []Container{ctr("c1", StatusRunning, 10)},
			list:   []Container{ctr("c1", StatusNone, 0)},
			want:   []string{"task-exited c1 10 exit=-1 r"},
		},
		{
			name:   "new task in the same container",
			before: []Container{ctr("c1", StatusRunning, 10)},
			list:   []Container{ctr("c1", StatusRunning, 20)},
			want:   []string{"task-exited c1 10 exit=-1 r", "task-started c1 20 r"},
		},
		{
			name:   "late events of an earlier task are dropped",
			before: []Container{ctr("c1", StatusRunning, 10)},
			list:   []Container{ctr("c1", StatusRunning, 20)},
			after: func(tr *tracker) []Event {
				evs := tr.started("c1", 10, now)
				evs = append(evs, tr.exited("c1", 10, 0, now, now)...)
				return append(evs, tr.started("c1", 20, now)...)
			},
			want: []string{"task-exited c1 10 exit=-1 r", "task-started c1 20 r"},
		},
		{
			name:   "new task created while away, then started live",
			before: []Container{ctr("c1", StatusRunning, 10)},
			list:   []Container{ctr("c1", StatusCreated, 20)},
			after: func(tr *tracker) []Event {
				evs := tr.exited("c1", 10, 0, now, now)
				return append(evs, tr.started("c1", 20, now)...)
			},
			want: []string{"task-exited c1 10 exit=-1 r", "task-started c1 20"},
		},
		{
			name:   "started and exited while away",
			before: []Container{ctr("c1", StatusNone, 0)},
			list:   []Container{{ID: "c1", Kind: KindContainer, SandboxID: "sb", Status: StatusStopped, PID: 30, ExitStatus: 0}},
			want:   []string{"task-started c1 30 r", "task-exited c1 30 exit=0 r"},
		},
		{
			name:   "nothing changed",
			before: []Container{ctr("sb", StatusRunning, 1), ctr("c1", StatusRunning, 10)},
			list:   []Container{ctr("sb", StatusRunning, 1), ctr("c1", StatusRunning, 10)},
			after:  func(tr *tracker) []Event { return tr.started("c1", 10, now) },
			want:   nil,
		},
		{
			name:   "created task then started live",
			before: []Container{ctr("c1", StatusNone, 0)},
			list:   []Container{ctr("c1", StatusCreated, 10)},
			after:  func(tr *tracker) []Event { return tr.started("c1", 10, now) },
			want:   []string{"task-started c1 10"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr := newTracker()
			if tt.before != nil {
				tr.reconcile(listing{containers: tt.before}, now)
			}
			evs := tr.reconcile(listing{containers: tt.list}, now)
			if tt.after != nil {
				evs = append(evs, tt.after(tr)...)
			}
			// Reconciling the same listing again must report nothing.
			evs = append(evs, tr.reconcile(listing{containers: tt.list}, now)...)
			assert.Equal(t, tt.want, brief(evs))
		})
	}
}
