package agent

import (
	"context"
	"errors"

	"github.com/meshagent/meshagent/handoff"
)

// The handoff-store switch. Off, meshagent holds no sidecar's listening
// sockets: every store releases its fds at once (the ports are no longer
// pinned by meshagent, and free as soon as the sidecar has closed its own
// copies), starts pass no LISTEN_FDS, FDSTORE=1 and snapshots are refused,
// and a restarted sidecar binds its ports itself, as without meshagent.
// READY=1 on the notify socket still counts: it is about readiness, not
// fds. Hot upgrades of sidecars with a handoff section are refused: the
// new version could not bind the ports the running one has.
//
// On again, each store accepts fds at once (FDSTORE=1 from the running
// sidecar is kept), and the sidecar's listeners are held again from its
// next start (handoff.listeners) or its next ready (snapshot): the running
// process bound the ports itself, so they cannot be opened beside it. Until
// then an upgrade is refused with that reason.

// setHolding passes a flip of the switch to every sidecar of the pod.
func (ph *podHandoff) setHolding(on bool) {
	if ph == nil {
		return
	}
	for _, h := range ph.sidecars {
		h.setHolding(on)
	}
}

func (h *sidecarHandoff) setHolding(on bool) {
	h.hmu.Lock()
	defer h.hmu.Unlock()
	if h.holding == on {
		return
	}
	h.holding = on
	if on {
		h.store.Hold()
		h.log.Info("handoff-store switch on: the sidecar's listeners are held again from its next start")
		return
	}
	n, err := h.store.Release()
	if err != nil && !errors.Is(err, handoff.ErrClosed) {
		h.log.Error("releasing held fds", "err", err)
	}
	h.mu.Lock()
	h.unheld = true
	h.mu.Unlock()
	if n > 0 {
		h.log.Warn("handoff-store switch off: released the held fds; the sidecar binds its ports itself from its next start", "fds", n)
	}
}

func (h *sidecarHandoff) isHolding() bool {
	h.hmu.Lock()
	defer h.hmu.Unlock()
	return h.holding
}

// listen opens the configured listeners, unless the switch is off.
func (h *sidecarHandoff) listen(ctx context.Context) {
	h.hmu.Lock()
	defer h.hmu.Unlock()
	h.listenLocked(ctx)
}

func (h *sidecarHandoff) listenLocked(ctx context.Context) {
	if !h.holding {
		return
	}
	for _, l := range h.spec.Listeners {
		if err := h.store.Listen(ctx, l.Name, l.Address); err != nil {
			h.log.Error("cannot hold listener; the sidecar must bind it itself", "listener", l.Name, "address", l.Address, "err", err)
		}
	}
}

// resume runs before every machine-driven start: a sidecar whose fds the
// switch released gets its listeners held again now that the switch is on
// and its previous process is gone (the ports are free). A sidecar that
// was never released is left as it is: a listener that could not be
// opened at the pod's start stays the sidecar's own.
func (h *sidecarHandoff) resume(ctx context.Context) {
	h.hmu.Lock()
	defer h.hmu.Unlock()
	h.mu.Lock()
	unheld := h.unheld
	h.mu.Unlock()
	if !unheld || !h.holding {
		return
	}
	h.listenLocked(ctx)
	h.mu.Lock()
	h.unheld = false
	h.mu.Unlock()
	h.log.Info("holding the sidecar's listeners again", "fds", h.store.Len())
}

// heldAgain ends a release once a snapshot holds the sidecar's listeners.
func (h *sidecarHandoff) heldAgain() {
	h.hmu.Lock()
	defer h.hmu.Unlock()
	if !h.holding {
		return
	}
	h.mu.Lock()
	h.unheld = false
	h.mu.Unlock()
}

// upgradeRefusal says why container cannot be hot-upgraded as far as its
// held listeners go, or "".
func (ph *podHandoff) upgradeRefusal(container string) string {
	h := ph.get(container)
	if h == nil {
		return ""
	}
	if !h.isHolding() {
		return "the " + SwitchHandoffStore + " switch is off: no held listeners to hand to the new version, which could not bind the ports the running one has"
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.unheld {
		return "the sidecar's listeners are not held since the " + SwitchHandoffStore +
			" switch was off; they are held again from its next start (meshagent ctl restart)"
	}
	return ""
}
