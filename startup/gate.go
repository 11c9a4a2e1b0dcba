package startup

import (
	"context"
	"errors"
	"sync"
)

// ErrClosedGate is returned by Wait when its context ends before the gate opens.
var ErrClosedGate = errors.New("gate still closed")

// Gate is a latch that apps wait behind until their sidecars are ready.
// The zero value is a closed gate.
type Gate struct {
	mu   sync.Mutex
	open bool
	ch   chan struct{} // closed when the gate opens; nil until someone waits
}

// Open opens the gate and wakes every waiter at once. Opening an open gate
// does nothing.
func (g *Gate) Open() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.open {
		return
	}
	g.open = true
	if g.ch != nil {
		close(g.ch)
	}
}

// Close shuts the gate again, for the next start of the pod.
func (g *Gate) Close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.open {
		g.open = false
		g.ch = nil
	}
}

// IsOpen reports whether the gate is open now.
func (g *Gate) IsOpen() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.open
}

// Wait blocks until the gate opens or ctx ends; then it returns ErrClosedGate
// wrapped with the context's error.
func (g *Gate) Wait(ctx context.Context) error {
	g.mu.Lock()
	if g.open {
		g.mu.Unlock()
		return nil
	}
	if g.ch == nil {
		g.ch = make(chan struct{})
	}
	ch := g.ch
	g.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return errors.Join(ErrClosedGate, ctx.Err())
	}
}
