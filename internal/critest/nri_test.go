package critest_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/nri/pkg/stub"

	"github.com/meshagent/meshagent/internal/critest"
	"github.com/meshagent/meshagent/internal/testimages"
)

// adjuster is a minimal NRI plugin: for pods carrying its token annotation it
// gives the container named target an oom_score_adj and cpu shares in the
// CreateContainer adjustment. Other pods (other tests) are left alone.
type adjuster struct {
	token  string
	target string
	mu     sync.Mutex
	seen   []string
}

const tokenAnnotation = "critest.meshagent.io/nri-token"

func (a *adjuster) CreateContainer(_ context.Context, pod *api.PodSandbox, ctr *api.Container) (*api.ContainerAdjustment, []*api.ContainerUpdate, error) {
	if pod.GetAnnotations()[tokenAnnotation] != a.token {
		return nil, nil, nil
	}
	a.mu.Lock()
	a.seen = append(a.seen, ctr.GetName())
	a.mu.Unlock()
	if ctr.GetName() != a.target {
		return nil, nil, nil
	}
	adj := &api.ContainerAdjustment{}
	score := 500
	adj.SetLinuxOomScoreAdj(&score)
	adj.SetLinuxCPUShares(512)
	return adj, nil, nil
}

// TestNRIAdjustsContainer proves the v2 lane's NRI setup: a plugin registers
// on the private NRI socket, sees kubelet-style CreateContainer calls with the
// pod's annotations, and its adjustment holds in the container's first
// process (/proc/PID/oom_score_adj) and cgroup (cpu.shares).
func TestNRIAdjustsContainer(t *testing.T) {
	critest.CheckLeaks(t)
	sock := critest.Socket(t, critest.V2)
	nriSock := critest.NRISocket(t)
	rt := critest.Connect(t, sock)

	p := &adjuster{token: critest.UniqueName("nri"), target: "proxy"}
	s, err := stub.New(p, stub.WithPluginName(critest.UniqueName("critest")), stub.WithPluginIdx("50"), stub.WithSocketPath(nriSock))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := s.Start(ctx); err != nil {
		t.Fatalf("start NRI plugin on %s: %v", nriSock, err)
	}
	t.Cleanup(func() { s.Stop(); s.Wait() })

	pod := rt.StartPod(t, critest.PodSpec{
		Name:        "nri",
		Annotations: map[string]string{tokenAnnotation: p.token},
		Containers: []critest.ContainerSpec{
			{Name: "proxy", Image: testimages.Sidecar, Env: map[string]string{"SIDECAR_PORT": "0"}},
			{Name: "app", Image: testimages.App},
		},
	})
	p.mu.Lock()
	seen := strings.Join(p.seen, ",")
	p.mu.Unlock()
	if seen != "proxy,app" {
		t.Errorf("plugin saw CreateContainer for %q, want proxy,app", seen)
	}

	for _, tc := range []struct {
		name   string
		oom    string
		shares string
	}{
		{"proxy", "500", "512"}, // adjusted by the plugin
		{"app", "1000", "2"},    // kubelet's best-effort values
	} {
		pid, err := rt.PID(ctx, pod.ContainerID(tc.name))
		if err != nil {
			t.Fatal(err)
		}
		if got := readTrim(t, fmt.Sprintf("/proc/%d/oom_score_adj", pid)); got != tc.oom {
			t.Errorf("%s: /proc/%d/oom_score_adj = %s, want %s", tc.name, pid, got, tc.oom)
		}
		if got := readTrim(t, filepath.Join(cpuCgroupDir(t, pid), "cpu.shares")); got != tc.shares {
			t.Errorf("%s: cpu.shares = %s, want %s", tc.name, got, tc.shares)
		}
	}
}

func readTrim(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// cpuCgroupDir returns the cgroup v1 cpu folder of pid.
func cpuCgroupDir(t *testing.T, pid int) string {
	t.Helper()
	for _, line := range strings.Split(readTrim(t, "/proc/"+strconv.Itoa(pid)+"/cgroup"), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) == 3 && (f[1] == "cpu" || strings.HasPrefix(f[1], "cpu,") || strings.Contains(f[1], ",cpu,") || strings.HasSuffix(f[1], ",cpu")) {
			return filepath.Join("/sys/fs/cgroup/cpu", f[2])
		}
	}
	t.Skipf("pid %d has no cgroup v1 cpu controller (cgroup v2 host?)", pid)
	return ""
}
