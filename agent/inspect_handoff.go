package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/meshagent/meshagent/handoff"
)

// fdStoreCheck inspects every held fd of every host pod's stores, on the
// fd itself:
//
//   - a held socket that no longer listens (SO_ACCEPTCONN): a holder shut
//     it down (shutdown(2) through any duplicate acts on the one socket
//     the store, the sidecar and its next start share) or it never was a
//     listener; restarts would hand the sidecar a dead socket;
//   - a listener meshagent opened that the pod's config no longer
//     declares, or fds held for a container that is not a sidecar with a
//     handoff section in the config in force: the port stays pinned;
//   - a held socket that no process of the running sidecar has open: the
//     sidecar dropped that listener (a new version or config no longer
//     serves it) and meshagent alone keeps the port, where connections
//     queue and are never accepted.
type fdStoreCheck struct{ a *Agent }

func (fdStoreCheck) Name() string { return "fd-store" }

func (fc fdStoreCheck) Check(_ context.Context, n *NodeView) ([]Finding, error) {
	var out []Finding
	for _, r := range fc.a.runners() {
		out = append(out, inspectPodStores(r.spec.Name, r.hx, n.Spec(r.spec.Name))...)
	}
	sortFindings(out)
	return out, nil
}

// inspectPodStores checks ph's stores against spec, the pod's spec in force
// (nil when the pod is no longer configured).
func inspectPodStores(pod string, ph *podHandoff, spec *PodSpec) []Finding {
	if ph == nil {
		return nil
	}
	var out []Finding
	for _, h := range ph.sidecars {
		held := h.store.Held()
		if len(held) == 0 {
			continue
		}
		var c *ContainerSpec
		if spec != nil {
			c = spec.Container(h.name)
		}
		if c == nil || c.Role != RoleSidecar || c.Handoff == nil {
			for _, f := range held {
				out = append(out, Finding{Pod: pod, Container: h.name,
					Expected: "no fds held for a container that is not a sidecar with a handoff section in the config",
					Found:    fmt.Sprintf("held fd %s pins its port for a container the config no longer has", heldName(f))})
			}
			continue
		}
		// The processes of the sidecar, unless it is between two
		// processes (down, restarting, starting): then the store is all
		// that keeps its ports, which is its purpose.
		roots, inTree := h.runningRoots(), map[uint64]bool(nil)
		if len(roots) > 0 {
			var err error
			if inTree, err = treeSocketInodes(roots); err != nil {
				out = append(out, Finding{Pod: pod, Container: h.name, Expected: "the sidecar's open sockets readable",
					Found: fmt.Sprintf("pod %s container %s: %v", pod, h.name, err)})
				inTree = nil
			}
		}
		for _, f := range held {
			if f.Err != nil {
				out = append(out, Finding{Pod: pod, Container: h.name, Expected: fmt.Sprintf("held fd %q inspectable", f.Name),
					Found: f.Err.Error()})
				continue
			}
			// Independent problems of one fd are reported each.
			if !f.Listening {
				out = append(out, Finding{Pod: pod, Container: h.name,
					Expected: fmt.Sprintf("held fd %s listening", heldName(f)),
					Found:    "not listening (shut down, or not a listening socket): a restarted sidecar gets a dead socket"})
			}
			if f.Spec != "" && !declared(c.Handoff, f) {
				out = append(out, Finding{Pod: pod, Container: h.name,
					Expected: "held listeners as declared: " + declaredList(c.Handoff),
					Found:    fmt.Sprintf("held listener %s is no longer declared and pins its port", heldName(f))})
			}
			if f.Listening && inTree != nil && !inTree[f.Inode] {
				out = append(out, Finding{Pod: pod, Container: h.name,
					Expected: fmt.Sprintf("held fd %s in use by the sidecar", heldName(f)),
					Found: fmt.Sprintf("no process of the sidecar (pid %s) has it open: meshagent alone pins the port, where connections queue unanswered",
						joinPIDs(roots))})
			}
		}
	}
	return out
}

func heldName(f handoff.HeldFD) string {
	addr := f.Addr
	if addr == "" {
		addr = f.Spec
	}
	if addr == "" {
		return strconv.Quote(f.Name)
	}
	return fmt.Sprintf("%q (%s)", f.Name, addr)
}

func declared(hs *HandoffSpec, f handoff.HeldFD) bool {
	for _, l := range hs.Listeners {
		if l.Name != f.Name {
			continue
		}
		if sp, err := handoff.ParseSpec(l.Address); err == nil && sp.String() == f.Spec {
			return true
		}
	}
	return false
}

func declaredList(hs *HandoffSpec) string {
	if len(hs.Listeners) == 0 {
		return "none"
	}
	var s []string
	for _, l := range hs.Listeners {
		s = append(s, l.Name+"="+l.Address)
	}
	return strings.Join(s, ", ")
}

func joinPIDs(pids []int) string {
	s := make([]string, len(pids))
	for i, p := range pids {
		s[i] = strconv.Itoa(p)
	}
	return strings.Join(s, ", ")
}

// runningRoots returns the sidecar's process (and an upgrade's new one),
// or none while a start is under way or no process runs.
func (h *sidecarHandoff) runningRoots() []int {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.starts > 0 || h.pid <= 0 {
		return nil
	}
	roots := []int{h.pid}
	if h.shadow > 0 {
		roots = append(roots, h.shadow)
	}
	return roots
}

// treeSocketInodes returns the inodes of the sockets open in roots and
// their descendants, from /proc.
func treeSocketInodes(roots []int) (map[uint64]bool, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("read /proc: %w", err)
	}
	parent := map[int]int{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if pp, ok := ppidOf(pid); ok {
			parent[pid] = pp
		}
	}
	in := map[int]bool{}
	for _, r := range roots {
		in[r] = true
	}
	var tree []int
	for pid := range parent {
		for p, hops := pid, 0; p > 1 && hops < 64; p, hops = parent[p], hops+1 {
			if in[p] {
				tree = append(tree, pid)
				break
			}
		}
	}
	inodes := map[uint64]bool{}
	for _, pid := range tree {
		dir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
		fds, err := os.ReadDir(dir)
		if err != nil {
			continue // exited meanwhile
		}
		for _, fd := range fds {
			target, err := os.Readlink(filepath.Join(dir, fd.Name()))
			if err != nil {
				continue
			}
			s, ok := strings.CutPrefix(target, "socket:[")
			if !ok {
				continue
			}
			if ino, err := strconv.ParseUint(strings.TrimSuffix(s, "]"), 10, 64); err == nil {
				inodes[ino] = true
			}
		}
	}
	return inodes, nil
}

// ppidOf reads the parent of pid from /proc/PID/stat (after the command
// name, which may hold spaces and parentheses).
func ppidOf(pid int) (int, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 2 {
		return 0, false
	}
	pp, err := strconv.Atoi(f[1])
	return pp, err == nil
}

// upgradeCheck reports hot upgrades under way for longer than they may
// take: node.inspect.upgradeMaxDuration when set, else the upgrade's own
// bound (readyTimeout + stop grace + watch + slack). A stuck upgrade keeps
// its sidecar's upgrade lock, so every later upgrade is refused.
type upgradeCheck struct{ a *Agent }

func (upgradeCheck) Name() string { return "upgrade" }

func (uc upgradeCheck) Check(_ context.Context, n *NodeView) ([]Finding, error) {
	var out []Finding
	now := time.Now()
	for _, u := range uc.a.upgradesInFlight() {
		bound, what := u.Bound, "its own timeouts"
		if m := n.Config.Node.Inspect.UpgradeMaxDuration.D(); m > 0 {
			bound, what = m, "node.inspect.upgradeMaxDuration"
		}
		took := now.Sub(u.Began)
		if took <= bound {
			continue
		}
		found := fmt.Sprintf("under way for %s, %s", took.Round(time.Millisecond), u.Stage)
		if u.NewPID != 0 {
			found += fmt.Sprintf(" (new pid %d)", u.NewPID)
		}
		out = append(out, Finding{Pod: u.Pod, Container: u.Container,
			Expected: fmt.Sprintf("an upgrade over within %s (%s)", bound, what),
			Found:    found + "; further upgrades of this sidecar are refused until it ends"})
	}
	return out, nil
}
