package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/meshagent/meshagent/handoff"
)

// A pod runner keeps one handoff.Store per sidecar that has a handoff
// section, for the life of the pod (not of one sidecar process): the store's
// duplicates keep the sidecar's listening sockets open while it restarts or
// is upgraded, and every start gets them back as LISTEN_FDS. A sidecar with
// fdStore also gets a notify socket, <stateDir>/pods/<pod>/<sidecar>.notify
// in an owner-only directory, where it may store fds (FDSTORE=1) and say
// READY=1, which counts as a readiness pass.
//
// Who may talk to a store: the sidecar's current process and its
// descendants, and during an upgrade the new process and its descendants
// (handoff.ProcessTree on each). A sidecar may speak before its start has
// returned its pid to the runner; a refused peer is therefore checked again
// once the starts under way are over.

// podHandoff is a runner's set of sidecar stores.
type podHandoff struct {
	pod      string
	log      *slog.Logger
	sidecars map[string]*sidecarHandoff // read-only after openPodHandoff
	// ctx bounds the goroutines below; it ends when the pod's stores close.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // notify servers, MOSN hand-overs, snapshots

	mu      sync.Mutex
	busy    map[string]*upgradeRun   // sidecars with an upgrade under way (upgrade.go)
	watches map[string]*upgradeWatch // the runner goroutine's alone
}

// hxHooks connect a pod's stores to the agent.
type hxHooks struct {
	// holding is the handoff-store switch when the stores open; flips
	// after that arrive through podHandoff.setHolding.
	holding func() bool
	// held receives a sidecar's count of held fds after every change.
	held func(container string, n int)
}

// sidecarHandoff is one sidecar's store and notify socket.
type sidecarHandoff struct {
	name   string // container
	spec   HandoffSpec
	store  *handoff.Store
	notify *handoff.Notify // nil without fdStore
	log    *slog.Logger

	// hmu orders the handoff-store switch's flips with the listens of a
	// start (handoff_switch.go), so a start never re-pins ports after a
	// flip to off. Never take the agent's switch lock under it.
	hmu     sync.Mutex
	holding bool // the switch as this sidecar last heard it
	unheld  bool // released by the switch, not yet held again by a start

	// onReady is called with the process (the current one or the upgrade's
	// new one) that READY=1 came from, on the notify goroutine.
	onReady func(pid int)

	mu          sync.Mutex
	pid         int // the container's current process
	shadow      int // an upgrade's new process, until it takes over
	shadowReady chan struct{}
	starts      int
	started     chan struct{} // closed when the starts under way are over
}

// notifyWait bounds how long a refused notify message waits for the starts
// under way to return their pids before it is refused for good.
const notifyWait = 5 * time.Second

// openPodHandoff opens the stores of every sidecar with a handoff section.
// A listener that cannot be opened is logged and left out: the sidecar then
// binds it itself, as it would without meshagent.
func openPodHandoff(ctx context.Context, spec *PodSpec, dir string, log *slog.Logger, onReady func(container string, pid int), hooks hxHooks) *podHandoff {
	ctx, cancel := context.WithCancel(ctx)
	ph := &podHandoff{pod: spec.Name, log: log, sidecars: map[string]*sidecarHandoff{}, ctx: ctx, cancel: cancel,
		busy: map[string]*upgradeRun{}, watches: map[string]*upgradeWatch{}}
	holding := hooks.holding == nil || hooks.holding()
	for i := range spec.Containers {
		c := &spec.Containers[i]
		if c.Handoff == nil || c.Role != RoleSidecar {
			continue
		}
		h := &sidecarHandoff{name: c.Name, spec: *c.Handoff, log: log.With("container", c.Name), holding: true}
		h.onReady = func(pid int) { onReady(c.Name, pid) }
		var onChange func(int)
		if hooks.held != nil {
			onChange = func(n int) { hooks.held(c.Name, n) }
		}
		h.store = handoff.New(spec.Name+"/"+c.Name, handoff.Options{
			Authorize: h.authorize,
			OnNotify:  h.onNotify,
			Logger:    h.log,
			OnChange:  onChange,
		})
		if !holding {
			h.setHolding(false) // nothing held yet; refuses FDSTORE until on
		}
		h.listen(ctx)
		if c.Handoff.FDStore {
			n, err := h.store.ListenNotify(filepath.Join(dir, c.Name+".notify"))
			if err != nil {
				h.log.Error("no notify socket: fd store and READY=1 off for this sidecar", "err", err)
			} else {
				h.notify = n
				ph.wg.Add(1)
				go func() {
					defer ph.wg.Done()
					if err := n.Serve(ctx); err != nil {
						h.log.Error("notify socket failed", "err", err)
					}
				}()
			}
		}
		ph.sidecars[c.Name] = h
	}
	return ph
}

// close stops the notify sockets and closes every store: the pod is gone.
func (ph *podHandoff) close() {
	ph.cancel()
	ph.wg.Wait()
	for _, h := range ph.sidecars {
		if h.notify != nil {
			h.notify.Close()
		}
		h.store.Close()
	}
}

// onEvent sees the pod's events on the runner goroutine.
func (ph *podHandoff) onEvent(e Event) {
	if e.Type == "ready" && e.PID > 0 {
		ph.snapshot(e.Container, e.PID)
	}
}

func (ph *podHandoff) get(container string) *sidecarHandoff {
	if ph == nil {
		return nil
	}
	return ph.sidecars[container]
}

// Prepare implements Preparer: the held fds as LISTEN_FDS, the notify
// socket as NOTIFY_SOCKET. The activation's duplicates are closed after the
// start (the child has its own copies by then).
func (h *sidecarHandoff) Prepare(_ context.Context, pod *PodSpec, c *ContainerSpec, s *StartSpec) error {
	if c.Name != h.name {
		return nil
	}
	act, err := h.store.Activation()
	if err != nil {
		return fmt.Errorf("pod %s container %s: held listeners: %w", pod.Name, c.Name, err)
	}
	s.After = append(s.After, func() { act.Close() })
	if len(act.Files) > 0 {
		s.Files = append(s.Files, act.Files...)
		s.Env = append(s.Env, act.Env()...)
		s.ListenFDs = true
	}
	if h.notify != nil {
		s.Env = append(s.Env, h.notify.Env())
	}
	return nil
}

// beginStart marks a start under way; end records its pid (0 when it
// failed; shadow for an upgrade's new process).
func (h *sidecarHandoff) beginStart(shadow bool) (end func(pid int)) {
	h.mu.Lock()
	h.starts++
	if h.started == nil {
		h.started = make(chan struct{})
	}
	h.mu.Unlock()
	return func(pid int) {
		h.mu.Lock()
		defer h.mu.Unlock()
		if shadow {
			h.shadow = pid
		} else {
			h.pid = pid
		}
		h.starts--
		if h.starts == 0 {
			close(h.started)
			h.started = nil
		}
	}
}

// forget drops pid as the sidecar's process once it exited.
func (h *sidecarHandoff) forget(pid int) {
	h.mu.Lock()
	if h.pid == pid {
		h.pid = 0
	}
	h.mu.Unlock()
}

func (h *sidecarHandoff) setPID(pid int) {
	h.mu.Lock()
	h.pid = pid
	h.mu.Unlock()
}

// authorize is the store's Options.Authorize.
func (h *sidecarHandoff) authorize(pid int32, uid uint32) error {
	// The starts under way first, then the check: a start that ends in
	// between has recorded its pid before the check reads it.
	h.mu.Lock()
	ch := h.started
	h.mu.Unlock()
	_, err := h.rootOf(pid)
	if err == nil || ch == nil {
		return err
	}
	t := time.NewTimer(notifyWait)
	defer t.Stop()
	select {
	case <-ch:
	case <-t.C:
		return err
	}
	_, err = h.rootOf(pid)
	return err
}

// rootOf returns the sidecar process that pid is or descends from.
func (h *sidecarHandoff) rootOf(pid int32) (int, error) {
	h.mu.Lock()
	roots := []int{h.pid, h.shadow}
	h.mu.Unlock()
	err := fmt.Errorf("%w: no sidecar running", handoff.ErrNotInTree)
	for _, r := range roots {
		if r <= 0 {
			continue
		}
		if err = handoff.ProcessTree(func() int { return r })(pid, 0); err == nil {
			return r, nil
		}
	}
	return 0, err
}

// onNotify is the store's Options.OnNotify: READY=1 is a readiness pass of
// the process it came from.
func (h *sidecarHandoff) onNotify(pid int32, lines []string) {
	if !slices.Contains(lines, "READY=1") {
		return
	}
	root, err := h.rootOf(pid)
	if err != nil {
		return // gone meanwhile
	}
	h.mu.Lock()
	shadow, ch := h.shadow, h.shadowReady
	if root == shadow && ch != nil {
		close(ch)
		h.shadowReady = nil
	}
	h.mu.Unlock()
	if root != shadow {
		h.onReady(root)
	}
}

// expectShadow prepares for an upgrade's new process: the returned channel
// is closed when it says READY=1.
func (h *sidecarHandoff) expectShadow() <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.shadow = 0
	h.shadowReady = make(chan struct{})
	return h.shadowReady
}

// endShadow forgets the upgrade's new process; took says it is now the
// sidecar's process.
func (h *sidecarHandoff) endShadow(took bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if took {
		h.pid = h.shadow
	}
	h.shadow, h.shadowReady = 0, nil
}

// beforeStart prepares a machine-driven start of container: held fds, a
// MOSN hand-over after a crash. Call end with the started process (nil
// when the start failed).
func (ph *podHandoff) beforeStart(ctx context.Context, container string) (context.Context, func(Process)) {
	h := ph.get(container)
	if h == nil {
		return ctx, func(Process) {}
	}
	h.resume(ph.ctx)
	end := h.beginStart(false)
	var procCh chan Process
	if h.spec.MOSN != nil && h.store.Len() > 0 {
		procCh = make(chan Process, 1)
		ph.handOverMOSN(ph.ctx, h, procCh)
		waitForFile(filepath.Join(h.spec.MOSN.UDSDir, handoff.MOSNReconfigSocket), time.Second)
	}
	return WithPreparers(ctx, h), func(p Process) {
		pid := 0
		if p != nil {
			pid = p.PID()
		}
		end(pid)
		if procCh != nil {
			procCh <- p
		}
	}
}

// waitForFile polls for path: HandOverMOSN binds reconfig.sock on its own
// goroutine, and MOSN must find it when it starts.
func waitForFile(path string, d time.Duration) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if _, err := os.Lstat(path); err == nil {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// handOverMOSN plays the old MOSN for a MOSN about to start after a crash,
// so it takes the held listeners instead of binding its ports. It runs
// until the new MOSN has taken them, the timeout passes, or the process
// exits; the caller calls it before the start and hands it the process
// through procCh once started (nil when the start failed).
func (ph *podHandoff) handOverMOSN(ctx context.Context, h *sidecarHandoff, procCh <-chan Process) {
	if h.spec.MOSN == nil || h.store.Len() == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, h.spec.MOSN.Timeout.D())
	done := make(chan error, 1)
	ph.wg.Add(2)
	go func() {
		defer ph.wg.Done()
		done <- h.store.HandOverMOSN(ctx, h.spec.MOSN.UDSDir)
	}()
	go func() {
		defer ph.wg.Done()
		defer cancel()
		var p Process
		select {
		case p = <-procCh:
		case <-ctx.Done():
		}
		var exited <-chan struct{}
		if p != nil {
			exited = p.Done()
		} else {
			cancel() // the start failed: nobody will dial
		}
		select {
		case err := <-done:
			if err != nil && !errors.Is(err, context.Canceled) {
				h.log.Warn("MOSN hand-over failed: the new MOSN must bind its ports itself", "dir", h.spec.MOSN.UDSDir, "err", err)
			} else if err == nil {
				h.log.Info("held listeners handed over to the restarted MOSN", "dir", h.spec.MOSN.UDSDir)
			}
			return
		case <-exited:
			cancel()
		}
		<-done
	}()
}

// snapshot copies the listening sockets of a sidecar that just became ready
// into its store (handoff.snapshot), once: later restarts get them.
func (ph *podHandoff) snapshot(container string, pid int) {
	h := ph.get(container)
	if h == nil || !h.spec.Snapshot || h.store.Len() > 0 || !h.isHolding() {
		return
	}
	ph.wg.Add(1)
	go func() {
		defer ph.wg.Done()
		names, err := h.store.Snapshot(ph.ctx, pid)
		if err != nil {
			h.log.Warn("cannot copy the sidecar's listeners; a restart will not keep them", "pid", pid, "err", err)
			return
		}
		h.heldAgain()
		h.log.Info("holding the sidecar's listeners", "pid", pid, "names", names)
	}()
}

// podHandoffDir is where a pod's notify sockets live (owner-only).
func podHandoffDir(state stateDir, pod string) string {
	return filepath.Join(state.podsDir(), pod)
}

// removeHandoffDir removes a pod's socket directory once its stores closed.
func removeHandoffDir(dir string) {
	_ = os.Remove(dir) // only when empty: the sockets removed themselves
}

// notifyReady feeds READY=1 of the sidecar's current process to the
// machine as a readiness pass (runs on the notify goroutine).
func (r *podRunner) notifyReady(container string, pid int) {
	in := InProbe{Container: container, PID: pid, OK: true}
	select {
	case r.inbox <- in:
	case <-r.hx.ctx.Done():
	}
}
