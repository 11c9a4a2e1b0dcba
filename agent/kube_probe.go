package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshagent/meshagent/startup"
)

// Readiness of a Kubernetes sidecar is checked by the agent itself, from the
// node, inside the pod's network namespace: the probe's socket is created
// on an OS thread that has joined the namespace of the pod's sandbox (setns).
// Why not the pod IP: proxies bind their admin and readiness ports to the
// pod's loopback (Envoy's 127.0.0.1:15000), which no address outside the pod
// reaches; host-network pods have no IP of their own; and the namespace works
// for both without knowing anything about the CNI. The namespace is held
// open by fd for the life of the probe, so a recycled pid cannot redirect it.

// netns is a network namespace held open by fd. A dial may outlive the
// probe that started it (net/http finishes a dial in the background after
// its request was cancelled), so the fd is closed by whoever lets go of it
// last: never while a thread may still setns with it.
type netns struct {
	f    *os.File
	host bool // the agent's own namespace: no setns needed

	mu     sync.Mutex
	users  int
	closed bool
}

// openNetns opens the network namespace of pid.
func openNetns(pid uint32) (*netns, error) {
	path := "/proc/" + strconv.FormatUint(uint64(pid), 10) + "/ns/net"
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("network namespace of pid %d: %w", pid, err)
	}
	var target, own unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &target); err != nil {
		f.Close()
		return nil, fmt.Errorf("network namespace %s: %w", path, err)
	}
	host := unix.Stat("/proc/self/ns/net", &own) == nil && own.Ino == target.Ino && own.Dev == target.Dev
	return &netns{f: f, host: host}, nil
}

// Close lets go of the namespace; the fd closes once no dial uses it.
func (n *netns) Close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.closed = true
	if n.users == 0 {
		return n.f.Close()
	}
	return nil
}

func (n *netns) acquire() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return false
	}
	n.users++
	return true
}

func (n *netns) release() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.users--
	if n.closed && n.users == 0 {
		n.f.Close()
	}
}

// dial connects to addr from inside the namespace. Only the socket's
// creation needs the namespace (a socket belongs to the namespace it was
// created in), but net.Dialer creates and connects in one call, so the whole
// dial runs on a thread locked into the namespace. The thread is released
// back to the scheduler only if it could be moved back to the agent's own
// namespace; otherwise it dies with its goroutine.
func (n *netns) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	if n.host {
		return d.DialContext(ctx, network, addr)
	}
	if !n.acquire() {
		return nil, errors.New("probe stopped: network namespace closed")
	}
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		defer n.release()
		runtime.LockOSThread()
		own, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("own network namespace: %w", err)}
			return
		}
		defer own.Close()
		if err := unix.Setns(int(n.f.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("setns %s: %w", n.f.Name(), err)}
			return
		}
		c, err := d.DialContext(ctx, network, addr)
		if unix.Setns(int(own.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

// probeTarget is where a container's checks go.
type probeTarget struct {
	ns  *netns // the pod's network namespace
	pid uint32 // the container's process, for unix and exec checks
}

// newKubeProbe returns the startup.Probe of spec for target.
func newKubeProbe(spec kubeProbeSpec, t probeTarget) (startup.Probe, error) {
	switch spec.Kind {
	case "tcp":
		return nsTCP{ns: t.ns, addr: spec.Addr}, nil
	case "http":
		// One kept-alive connection per pod: a fresh one per check cost
		// a locked thread, two setns calls and a handshake every period,
		// which was 40% of the agent's idle CPU at 100 pods. A check
		// that fails or times out drops its connection, and the next
		// check dials anew; closeKubeProbe lets the last one go.
		client := &http.Client{
			Transport: &http.Transport{DialContext: t.ns.dial, MaxIdleConnsPerHost: 1, IdleConnTimeout: time.Minute, Proxy: nil},
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		}
		return startup.HTTP{URL: "http://" + spec.Addr + spec.Path, Client: client}, nil
	case "unix":
		// The container's root as the node sees it; connect(2) follows the
		// magic link into the container's mount namespace.
		return startup.Unix{Path: "/proc/" + strconv.FormatUint(uint64(t.pid), 10) + "/root" + spec.Path}, nil
	case "exec":
		pid := strconv.FormatUint(uint64(t.pid), 10)
		cmd := append([]string{"nsenter", "--target", pid, "--mount", "--uts", "--ipc", "--net", "--pid", "--"}, spec.Cmd...)
		return startup.Exec{Command: cmd}, nil
	}
	return nil, errors.New("unknown probe kind " + spec.Kind)
}

// closeKubeProbe lets go of what a probe keeps between checks: the
// kept-alive connection of an HTTP check, whose socket would otherwise hold
// the pod's network namespace after the pod is gone.
func closeKubeProbe(p startup.Probe) {
	if h, ok := p.(startup.HTTP); ok && h.Client != nil {
		h.Client.CloseIdleConnections()
	}
}

// nsTCP is a TCP connect check inside a network namespace.
type nsTCP struct {
	ns   *netns
	addr string
}

func (p nsTCP) Check(ctx context.Context) error {
	c, err := p.ns.dial(ctx, "tcp", p.addr)
	if err != nil {
		return fmt.Errorf("tcp %s: %w", p.addr, err)
	}
	return c.Close()
}

func (p nsTCP) String() string { return "tcp " + p.addr + " (pod network)" }
