package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Inspections are the checks an SRE would otherwise script by hand against
// a node. Each is a Check; the agent runs the built-in ones (version,
// crash-loop, log-volume, fd-store, upgrade: inspect_handoff.go) and any
// added with WithCheck (settings drift belongs to the cgroup feature).
// `meshagent ctl inspect` exits non-zero when any check finds a problem.

// Finding is one problem a check found.
type Finding struct {
	Check     string `json:"check"`
	Pod       string `json:"pod,omitempty"`       // empty for node-wide findings
	Container string `json:"container,omitempty"` // empty for pod- or node-wide findings
	Expected  string `json:"expected"`
	Found     string `json:"found"`
}

// Check is one inspection.
type Check interface {
	// Name is short and stable ("version"); it labels the findings.
	Name() string
	// Check returns what it found wrong. An error means the check could
	// not run, which is reported as a finding too.
	Check(ctx context.Context, n *NodeView) ([]Finding, error)
}

// NodeView is what a check looks at: the config in force, every pod's
// status, where the logs are.
type NodeView struct {
	Config *Config
	Pods   []PodStatus
	LogDir string
}

// Spec returns the spec in force of a pod, or nil.
func (n *NodeView) Spec(pod string) *PodSpec {
	for i := range n.Config.Pods {
		if n.Config.Pods[i].Name == pod {
			return &n.Config.Pods[i]
		}
	}
	return nil
}

// InspectReport is the result of every check.
type InspectReport struct {
	Checks   []string  `json:"checks"`
	Findings []Finding `json:"findings"`
}

// checkTimeout bounds one check, so one stuck check cannot hang inspect.
const checkTimeout = 20 * time.Second

// Inspect runs every check.
func (a *Agent) Inspect(ctx context.Context) InspectReport {
	cfg := a.config()
	view := &NodeView{Config: cfg, Pods: a.Pods(), LogDir: a.logDir(cfg)}
	rep := InspectReport{Findings: []Finding{}}
	for _, c := range a.checks {
		rep.Checks = append(rep.Checks, c.Name())
		cctx, cancel := context.WithTimeout(ctx, checkTimeout)
		fs, err := c.Check(cctx, view)
		cancel()
		for _, f := range fs {
			f.Check = c.Name()
			rep.Findings = append(rep.Findings, f)
		}
		if err != nil {
			rep.Findings = append(rep.Findings, Finding{Check: c.Name(), Expected: "the check runs", Found: "check failed: " + err.Error()})
		}
	}
	return rep
}

func (a *Agent) logDir(cfg *Config) string {
	if h, ok := a.rt.(*HostRuntime); ok && h.LogDir != "" {
		return h.LogDir
	}
	return filepath.Join(cfg.Node.StateDir, "logs")
}

func builtinChecks(a *Agent) []Check {
	return []Check{versionCheck{a: a}, crashLoopCheck{}, logVolumeCheck{}, fdStoreCheck{a: a}, upgradeCheck{a: a}}
}

// versionCheck compares each container's declared version with the one it
// reports. Host pods: `version` in the config against the first line of
// versionCommand's output (run with MESHAGENT_PID set to the container's
// pid) or of versionURL's body. Kubernetes pods: the pod's
// meshagent.io/version.<container> annotation against what
// meshagent.io/version-check.<container> reads (kube_version.go).
// Containers that declare no version, or no way to read it, or that are
// not running, are skipped.
type versionCheck struct{ a *Agent }

func (versionCheck) Name() string { return "version" }

func (vc versionCheck) Check(ctx context.Context, n *NodeView) ([]Finding, error) {
	var (
		mu  sync.Mutex
		out []Finding
		wg  sync.WaitGroup
		sem = make(chan struct{}, 8)
	)
	verify := func(pod, container, want string, read func() (string, error)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			got, err := read()
			if err != nil {
				got = "unreadable: " + err.Error()
			} else if got == want {
				return
			}
			mu.Lock()
			out = append(out, Finding{Pod: pod, Container: container, Expected: want, Found: got})
			mu.Unlock()
		}()
	}
	for _, p := range n.Pods {
		spec := n.Spec(p.Name)
		if spec == nil {
			continue
		}
		for _, st := range p.Containers {
			c := spec.Container(st.Name)
			if c == nil || c.Version == "" || st.PID == 0 || (c.VersionURL == "" && len(c.VersionCommand) == 0) {
				continue
			}
			verify(p.Name, c.Name, c.Version, func() (string, error) { return runningVersion(ctx, spec, c, st.PID) })
		}
	}
	if vc.a != nil {
		for _, t := range vc.a.kubeVersionTargets() {
			verify(t.pod, t.container, t.declared, func() (string, error) { return readKubeVersion(ctx, t) })
		}
	}
	wg.Wait()
	sortFindings(out)
	return out, nil
}

const versionReadTimeout = 3 * time.Second

// versionClient keeps no idle connections: inspections are rare.
var versionClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}

func runningVersion(ctx context.Context, pod *PodSpec, c *ContainerSpec, pid int) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, versionReadTimeout)
	defer cancel()
	var r io.Reader
	if c.VersionURL != "" {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.VersionURL, nil)
		if err != nil {
			return "", err
		}
		resp, err := versionClient.Do(req)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return "", fmt.Errorf("%s: HTTP %d", c.VersionURL, resp.StatusCode)
		}
		r = resp.Body
	} else {
		cmd := exec.CommandContext(ctx, c.VersionCommand[0], c.VersionCommand[1:]...)
		cmd.Dir = c.Workdir
		cmd.Env = containerEnv(pod, c, []string{"MESHAGENT_PID=" + strconv.Itoa(pid)})
		b, err := cmd.Output()
		if err != nil {
			return "", fmt.Errorf("versionCommand %v: %w", c.VersionCommand, err)
		}
		r = strings.NewReader(string(b))
	}
	line, err := bufio.NewReader(io.LimitReader(r, 4096)).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return "", err
	}
	return strings.TrimSpace(line), nil
}

// crashLoopCheck reports containers the supervisor considers in a crash
// loop (more restarts within the window than the policy allows).
type crashLoopCheck struct{}

func (crashLoopCheck) Name() string { return "crash-loop" }

func (crashLoopCheck) Check(_ context.Context, n *NodeView) ([]Finding, error) {
	var out []Finding
	for _, p := range n.Pods {
		spec := n.Spec(p.Name)
		for _, c := range p.Containers {
			if !c.CrashLoop {
				continue
			}
			exp := "a stable run"
			if spec != nil {
				if cs := spec.Container(c.Name); cs != nil {
					exp = fmt.Sprintf("at most %d restarts within %s", cs.Restart.MaxRestarts, cs.Restart.Window.D())
				}
			}
			out = append(out, Finding{Pod: p.Name, Container: c.Name, Expected: exp,
				Found: fmt.Sprintf("%s in a crash loop, %d restarts, last exit: %s", c.Role, c.Restarts, c.LastExit)})
		}
	}
	return out, nil
}

// logVolumeCheck reports containers whose log files (<logDir>/<pod>/
// <container>.log and rotated copies) exceed node.inspect.logMaxBytes, and
// a log filesystem used beyond node.inspect.fsMaxUsedPercent.
type logVolumeCheck struct{}

func (logVolumeCheck) Name() string { return "log-volume" }

func (logVolumeCheck) Check(_ context.Context, n *NodeView) ([]Finding, error) {
	var out []Finding
	limit := n.Config.Node.Inspect.LogMaxBytes
	for _, p := range n.Pods {
		for _, c := range p.Containers {
			size, err := logSize(filepath.Join(n.LogDir, p.Name), c.Name)
			if err != nil {
				return out, err
			}
			if limit > 0 && size > limit {
				out = append(out, Finding{Pod: p.Name, Container: c.Name,
					Expected: fmt.Sprintf("logs at most %s", bytesIEC(limit)),
					Found:    fmt.Sprintf("%s in %s", bytesIEC(size), filepath.Join(n.LogDir, p.Name, c.Name+".log*"))})
			}
		}
	}
	dir := n.LogDir
	if _, err := os.Stat(dir); err != nil {
		dir = n.Config.Node.StateDir
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return out, fmt.Errorf("statfs %s: %w", dir, err)
	}
	// As df computes it: blocks reserved for root count as unavailable.
	used := st.Blocks - st.Bfree
	if total := used + st.Bavail; total > 0 {
		pct := int((used*100 + total - 1) / total)
		if max := n.Config.Node.Inspect.FSMaxUsedPercent; pct > max {
			out = append(out, Finding{
				Expected: fmt.Sprintf("log filesystem at most %d%% used", max),
				Found:    fmt.Sprintf("%d%% used (%s, %s free)", pct, dir, bytesIEC(int64(st.Bavail)*st.Bsize))})
		}
	}
	return out, nil
}

func logSize(dir, container string) (int64, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("log dir %s: %w", dir, err)
	}
	var total int64
	for _, e := range ents {
		base := container + ".log"
		if e.IsDir() || (e.Name() != base && !strings.HasPrefix(e.Name(), base+".")) {
			continue
		}
		if info, err := e.Info(); err == nil {
			total += info.Size()
		}
	}
	return total, nil
}

func bytesIEC(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func sortFindings(fs []Finding) {
	sort.Slice(fs, func(i, j int) bool {
		if fs[i].Pod != fs[j].Pod {
			return fs[i].Pod < fs[j].Pod
		}
		return fs[i].Container < fs[j].Container
	})
}
