package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/meshagent/meshagent/agent/containerd"
)

// The gate socket is the node socket pods talk to: `meshagent gate` (the
// sidecar's postStart hook, or with --probe its startupProbe) and
// `meshagent hold` (its preStop hook). Any process on the node may connect
// (pods run as any user), so a request carries no pod name at all: the agent
// reads the caller's pid from the socket's peer credentials, maps it through
// /proc/PID/cgroup to a container and so to a pod, and answers about that pod
// only. A process in one pod can learn nothing about another.

// Gate outcomes.
const (
	GateReady         = "ready"          // every sidecar is ready
	GateTimeoutOpen   = "timeout-open"   // startup timeout, failOpen: go ahead
	GateTimeoutClosed = "timeout-closed" // startup timeout, failClosed: fail the hook
	GateNotReady      = "not-ready"      // --probe: not yet
	GateSwitchedOff   = "switched-off"   // the startup-gate switch is off: forced open
)

// GateAnswer is the agent's answer to `meshagent gate`.
type GateAnswer struct {
	Pod       string        `json:"pod"`       // namespace/name of the caller's pod
	Container string        `json:"container"` // the caller's container
	Outcome   string        `json:"outcome"`
	Waited    time.Duration `json:"waitedNs"`
	Reason    string        `json:"reason,omitempty"`
}

// OK reports whether the hook should succeed.
func (g GateAnswer) OK() bool {
	return g.Outcome == GateReady || g.Outcome == GateTimeoutOpen || g.Outcome == GateSwitchedOff
}

// HoldAnswer is the agent's answer to `meshagent hold`.
type HoldAnswer struct {
	Pod     string        `json:"pod"`
	Drained bool          `json:"drained"` // every app exited; false: the hold timeout passed
	Waited  time.Duration `json:"waitedNs"`
	Running []string      `json:"running,omitempty"` // apps still running at the timeout
}

// errCaller is a gate request from a process the agent cannot place.
var errCaller = errors.New("caller is not a known pod container")

// serveGate listens on the gate socket; the returned func stops it.
func (s *kubeSupervisor) serveGate(ctx context.Context) (stop func(), err error) {
	path := s.cfg.GateSocket
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("gate socket %s: %w", path, err)
	}
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("gate socket %s: another meshagent answers on it", path)
	}
	_ = os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("gate socket %s: %w", path, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	// Every pod's hook connects, as whatever user its container runs as.
	if err := os.Chmod(path, 0o666); err != nil {
		ln.Close()
		return nil, fmt.Errorf("gate socket %s: %w", path, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/gate", s.handleGate)
	mux.HandleFunc("GET /v1/hold", s.handleHold)
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		MaxHeaderBytes:    4 << 10,
		BaseContext:       func(net.Listener) context.Context { return ctx },
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if p, err := peerCred(c); err == nil {
				return context.WithValue(ctx, peerKey{}, p)
			}
			return ctx
		},
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	return func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if srv.Shutdown(sctx) != nil {
			srv.Close() // long waits: the hooks reconnect to the next agent
		}
		<-done
		_ = os.Remove(path)
	}, nil
}

// caller finds the pod of the peer: pid → cgroup → container → pod. A hook
// may connect before the agent has heard of its container (the postStart
// hook runs right after the start), so it waits a little for the event.
func (s *kubeSupervisor) caller(ctx context.Context) (*kubePod, *kubeContainer, error) {
	peer, ok := peerOf(ctx)
	if !ok || peer.PID <= 0 {
		return nil, nil, fmt.Errorf("%w: no peer credentials", errCaller)
	}
	ref, err := containerd.PodOfPID(int(peer.PID))
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", errCaller, err)
	}
	wait := time.NewTimer(10 * time.Second)
	defer wait.Stop()
	for {
		s.mu.Lock()
		p, c := s.find(ref.ContainerID)
		ch := s.changed
		if p != nil && p.ann != nil && (ref.PodUID == "" || p.ref.UID == "" || sameUID(ref.PodUID, p.ref.UID)) {
			s.mu.Unlock()
			return p, c, nil
		}
		s.mu.Unlock()
		select {
		case <-ch:
		case <-wait.C:
			return nil, nil, fmt.Errorf("%w: pid %d runs in container %s (pod uid %s), which containerd has not reported", errCaller, peer.PID, ref.ContainerID, ref.PodUID)
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		}
	}
}

// sameUID compares pod uids; the systemd cgroup driver writes - as _.
func sameUID(a, b string) bool {
	return strings.ReplaceAll(a, "_", "-") == strings.ReplaceAll(b, "_", "-")
}

func (s *kubeSupervisor) handleGate(w http.ResponseWriter, r *http.Request) {
	p, c, err := s.caller(r.Context())
	if err != nil {
		writeError(w, http.StatusForbidden, err)
		return
	}
	ans := s.gate(r.Context(), p, c, r.URL.Query().Get("probe") == "1")
	if r.Context().Err() != nil {
		return
	}
	writeJSON(w, http.StatusOK, ans)
}

// gate waits until p's sidecars are ready or its startup timeout passes.
func (s *kubeSupervisor) gate(ctx context.Context, p *kubePod, c *kubeContainer, probe bool) GateAnswer {
	start := time.Now()
	s.mu.Lock()
	ans := GateAnswer{Pod: p.ref.String(), Container: c.name}
	anchor, timeout, policy := p.startupAnchor(), p.pol.StartupTimeout, p.pol.OnTimeout
	s.mu.Unlock()
	if !s.a.Switch(SwitchStartupGate) {
		ans.Outcome, ans.Reason = GateSwitchedOff, "the startup-gate switch is off"
		return ans
	}
	if probe {
		ans.Outcome = GateNotReady
		if p.gate.IsOpen() {
			ans.Outcome = GateReady
		}
		return ans
	}
	wctx := ctx
	if timeout > 0 {
		if anchor.IsZero() {
			anchor = start
		}
		var cancel context.CancelFunc
		wctx, cancel = context.WithDeadline(ctx, anchor.Add(timeout))
		defer cancel()
	}
	err := p.gate.Wait(wctx)
	ans.Waited = time.Since(start)
	if err == nil {
		ans.Outcome = GateReady
		return ans
	}
	if ctx.Err() != nil {
		return ans // the hook went away
	}
	ans.Outcome, ans.Reason = GateTimeoutClosed, fmt.Sprintf("sidecars not ready %s after they were created (failClosed)", timeout)
	if policy == FailOpen {
		ans.Outcome, ans.Reason = GateTimeoutOpen, fmt.Sprintf("sidecars not ready %s after they were created; apps start anyway (failOpen)", timeout)
	}
	s.mu.Lock()
	if !p.timedOut[anchor] { // one event per start, however many hooks ask
		p.timedOut[anchor] = true
		p.failed = policy == FailClosed
		s.record(Event{Type: EvStartupTimeout, Pod: p.ref.String(), Container: c.name, Reason: ans.Reason,
			Fields: map[string]string{"policy": policy}, Duration: time.Since(anchor)})
	}
	s.mu.Unlock()
	return ans
}

func (s *kubeSupervisor) handleHold(w http.ResponseWriter, r *http.Request) {
	p, _, err := s.caller(r.Context())
	if err != nil {
		writeError(w, http.StatusForbidden, err)
		return
	}
	ans := s.hold(r.Context(), p)
	if r.Context().Err() != nil {
		return
	}
	writeJSON(w, http.StatusOK, ans)
}

// hold waits until every app container of p has exited, or the pod's hold
// timeout passes.
func (s *kubeSupervisor) hold(ctx context.Context, p *kubePod) HoldAnswer {
	start := time.Now()
	s.mu.Lock()
	bound := p.pol.HoldTimeout
	s.mu.Unlock()
	t := time.NewTimer(bound)
	defer t.Stop()
	for {
		s.mu.Lock()
		var apps []string
		for _, c := range p.current() {
			if c.role == containerd.RoleApp && (taskRunning(c.status) || c.status == containerd.StatusCreated) {
				apps = append(apps, c.name)
			}
		}
		ch := s.changed
		s.mu.Unlock()
		ans := HoldAnswer{Pod: p.ref.String(), Drained: len(apps) == 0, Waited: time.Since(start)}
		if ans.Drained {
			return ans
		}
		select {
		case <-ch:
		case <-t.C:
			ans.Running, ans.Waited = apps, time.Since(start)
			s.record(Event{Type: "hold-timeout", Pod: p.ref.String(), Reason: fmt.Sprintf("apps %v still running after %s; the sidecar stops anyway", apps, bound)})
			return ans
		case <-ctx.Done():
			return ans
		}
	}
}
