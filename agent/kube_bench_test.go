package agent

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/meshagent/meshagent/internal/critest"
)

// BenchmarkKubeNode measures Kubernetes mode on the real containerd (v2
// lane) with 100 pods of a sidecar (HTTP readiness in its own network
// namespace) and an app:
//
//   - model-ms: from exec of `meshagent run` to its admin API listing all 100
//     pre-existing pods with both containers and their roles;
//
//   - ready-ms: ... to every one of them with its gate open (sidecars probed
//     ready by the agent);
//
//   - rss-MiB: the agent's resident memory then; idle-cpu-%: its CPU use
//     over the next 5s (one core = 100), probing every sidecar each second;
//
//   - gate-p50-ms / gate-p99-ms: for 100 more pods started while the agent
//     runs, from the sidecar accepting (its ready file) to `meshagent gate`,
//     run in the sidecar like a postStart hook, getting its answer.
//
//     go test -run '^$' -bench KubeNode -benchtime 1x ./agent/
func BenchmarkKubeNode(b *testing.B) {
	const pods = 100
	socket := critest.Socket(b, critest.V2)
	rt := critest.Connect(b, socket)
	bin := meshagentDir(b)
	dir, err := os.MkdirTemp("", "mkb")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	env := &kubeEnv{socket: socket, rt: rt, dir: dir, bin: bin}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	var (
		mu      sync.Mutex
		created []*critest.Pod
	)
	b.Cleanup(func() {
		cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer ccancel()
		var g errgroup.Group
		g.SetLimit(8)
		for _, p := range created {
			g.Go(func() error { return rt.RemovePod(cctx, p) })
		}
		if err := g.Wait(); err != nil {
			b.Errorf("cleanup: %v", err)
		}
	})
	// startPods starts n pods, par at a time, and calls each(i, pod, out).
	startPods := func(prefix string, n, par int, delay time.Duration, sidecarOnly bool, each func(int, *critest.Pod, string) error) {
		b.Helper()
		var g errgroup.Group
		g.SetLimit(par)
		for i := 0; i < n; i++ {
			g.Go(func() error {
				spec, out := env.podSpecIn(filepath.Join(dir, fmt.Sprintf("%s-%d", prefix, i)), critest.UniqueName(prefix), delay)
				if sidecarOnly {
					spec.Containers = spec.Containers[:1]
				}
				p, err := rt.RunPod(ctx, spec)
				if err != nil {
					return err
				}
				mu.Lock()
				created = append(created, p)
				mu.Unlock()
				if each != nil {
					return each(i, p, out)
				}
				return nil
			})
		}
		if err := g.Wait(); err != nil {
			b.Fatal(err)
		}
	}

	t0 := time.Now()
	startPods("bench", pods, 8, 0, false, nil)
	b.Logf("started %d pods in %s", pods, time.Since(t0).Round(time.Millisecond))
	names := map[string]bool{}
	for _, p := range created {
		names[podKey(p)] = true
	}

	cfgPath := filepath.Join(dir, "config.yaml")
	c := env.config()
	if err := os.WriteFile(cfgPath, []byte(fmt.Sprintf("node:\n  adminSocket: %s\n  stateDir: %s\n  metricsAddr: \"off\"\n  log: {level: warn}\n  kubernetes:\n    containerd: %s\n    gateSocket: %s\n",
		c.Node.AdminSocket, c.Node.StateDir, socket, c.Node.Kubernetes.GateSocket)), 0o600); err != nil {
		b.Fatal(err)
	}
	admin := NewClient(c.Node.AdminSocket)
	b.ResetTimer()
	start := time.Now()
	cmd := exec.Command(filepath.Join(bin, "meshagent"), "run", "--config", cfgPath)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	count := func(ready bool) int {
		ps, err := admin.Pods(ctx)
		if err != nil {
			return -1
		}
		n := 0
		for _, p := range ps {
			if !names[p.Name] || len(p.Containers) != 2 || containerOf(p, "proxy").Role != RoleSidecar || containerOf(p, "app").Role != RoleApp {
				continue
			}
			if !ready || p.Phase == PhaseRunning {
				n++
			}
		}
		return n
	}
	waitN := func(ready bool) time.Duration {
		for count(ready) != pods {
			if time.Since(start) > 5*time.Minute {
				b.Fatalf("agent has %d of %d pods (ready=%v) after 5m", count(ready), pods, ready)
			}
			time.Sleep(5 * time.Millisecond)
		}
		return time.Since(start)
	}
	model := waitN(false)
	ready := waitN(true)
	b.StopTimer()
	time.Sleep(time.Second) // settle: probes at their period now
	rss := vmRSS(b, cmd.Process.Pid)
	// Idle CPU with 100 sidecars probed once a second, each from inside its
	// pod's network namespace.
	cpu0, wall0 := procCPU(cmd.Process.Pid), time.Now()
	time.Sleep(5 * time.Second)
	idleCPU := 100 * float64(procCPU(cmd.Process.Pid)-cpu0) / float64(time.Since(wall0))

	var (
		rmu       sync.Mutex
		reactions []time.Duration
		late      int
	)
	// Four at a time: each start forks runc, a shim and CNI plugins, and
	// this machine has few cores; the figure is the agent's, not the load's.
	startPods("gate", pods, 4, 1500*time.Millisecond, true, func(_ int, p *critest.Pod, out string) error {
		res, code, err := env.hook(ctx, p.ContainerID("proxy"), "gate", "--json")
		if err != nil {
			return err
		}
		if code != 0 {
			return fmt.Errorf("gate in %s: exit %d: %s", podKey(p), code, res)
		}
		g := parseGate(b, res)
		st, err := os.Stat(filepath.Join(out, "ready"))
		if err != nil {
			return err
		}
		rmu.Lock()
		defer rmu.Unlock()
		if g.Waited <= 0 || time.Unix(0, g.At).Before(st.ModTime()) {
			late++ // the hook came after the sidecar was ready: no reaction to measure
			return nil
		}
		reactions = append(reactions, time.Unix(0, g.At).Sub(st.ModTime()))
		return nil
	})
	slices.Sort(reactions)
	pct := func(p float64) float64 {
		if len(reactions) == 0 {
			return 0
		}
		return float64(reactions[min(len(reactions)-1, int(float64(len(reactions))*p))].Microseconds()) / 1000
	}
	b.ReportMetric(float64(model.Microseconds())/1000, "model-ms")
	b.ReportMetric(float64(ready.Microseconds())/1000, "ready-ms")
	b.ReportMetric(rss, "rss-MiB")
	b.ReportMetric(idleCPU, "idle-cpu-%")
	b.ReportMetric(pct(0.5), "gate-p50-ms")
	b.ReportMetric(pct(0.99), "gate-p99-ms")
	b.ReportMetric(float64(len(reactions)), "gates")
	b.Logf("gate reactions measured %d, hooks too late to measure %d; slowest %v", len(reactions), late, reactions[max(0, len(reactions)-5):])
}

// podSpecIn is podSpec without a *testing.T: out is the per-pod folder.
func (e *kubeEnv) podSpecIn(out, name string, delay time.Duration) (critest.PodSpec, string) {
	_ = os.MkdirAll(out, 0o755) // a failure shows as the sidecar failing to start
	return critest.PodSpec{
		Name: name, PodNetwork: true,
		Annotations: map[string]string{
			AnnoSidecars: "proxy", AnnoReadinessPrefix + "proxy": "http:15021/ready", AnnoStartupTimeout: "5m",
		},
		Containers: e.podContainers(out, delay),
	}, out
}

func vmRSS(b *testing.B, pid int) float64 {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			return float64(kb) / 1024
		}
	}
	b.Fatal("no VmRSS")
	return 0
}
