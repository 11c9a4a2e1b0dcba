package agent

import (
	"sync"
)

// eventLog keeps the most recent events for `meshagent ctl events`.
type eventLog struct {
	mu   sync.Mutex
	seq  uint64
	ring []Event
	next int
	full bool
}

func newEventLog(size int) *eventLog { return &eventLog{ring: make([]Event, size)} }

func (l *eventLog) add(e Event) Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.seq++
	e.Seq = l.seq
	l.ring[l.next] = e
	l.next = (l.next + 1) % len(l.ring)
	if l.next == 0 {
		l.full = true
	}
	return e
}

// since returns the kept events with Seq > after, oldest first, at most limit.
func (l *eventLog) since(after uint64, limit int) []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	var all []Event
	if l.full {
		all = append(all, l.ring[l.next:]...)
	}
	all = append(all, l.ring[:l.next]...)
	out := []Event{}
	for _, e := range all {
		if e.Seq > after {
			out = append(out, e)
		}
	}
	if limit > 0 && len(out) > limit {
		out = out[len(out)-limit:]
	}
	return out
}
