package handoff

import (
	"errors"
	"fmt"
)

// Release closes every held fd, as Close does, but leaves the store open
// and refusing fds (Listen, Add, FDSTORE=1, Snapshot fail with
// ErrReleased) until Hold. It is the operator's brake on the store: the
// ports are no longer pinned by meshagent, so once the sidecar has closed
// its own copies they are free, and a restarted sidecar binds them itself.
// Activations made meanwhile are empty. It returns how many fds it closed.
func (s *Store) Release() (int, error) {
	s.mu.Lock()
	defer s.changed()
	defer s.mu.Unlock()
	if s.closed {
		return 0, fmt.Errorf("%s: %w", s.name, ErrClosed)
	}
	s.released = true
	n := len(s.entries)
	var errs []error
	for _, e := range s.entries {
		errs = append(errs, e.close())
	}
	s.entries = nil
	if err := errors.Join(errs...); err != nil {
		return n, fmt.Errorf("%s: release: %w", s.name, err)
	}
	return n, nil
}

// Hold makes a released store accept fds again. It holds nothing by
// itself: the caller listens again, and sidecars store their fds again.
func (s *Store) Hold() {
	s.mu.Lock()
	s.released = false
	s.mu.Unlock()
}

// Holding reports whether the store accepts fds (not released, not closed).
func (s *Store) Holding() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.released && !s.closed
}

// changed tells Options.OnChange the number of held fds. Deferred before
// the unlock, so it runs after it.
func (s *Store) changed() {
	if s.opts.OnChange == nil {
		return
	}
	s.opts.OnChange(s.Len())
}
