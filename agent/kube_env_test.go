package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/meshagent/meshagent/internal/critest"
	"github.com/meshagent/meshagent/internal/testimages"
)

// The Kubernetes tests play kubelet against a real containerd (critest):
// they create pods through CRI with the pod's annotations, and run the
// sidecar's lifecycle hooks the way kubelet runs exec hooks, with CRI
// ExecSync inside the sidecar container. The hooks are the real `meshagent`
// binary, built static and bind-mounted into the containers from the node
// (as the DaemonSet shares it through /run/meshagent), so the agent sees
// the peer credentials of a process of that pod.

var meshagentBin struct {
	once sync.Once
	dir  string
	err  error
}

// meshagentDir builds cmd/meshagent once per test binary (static, so it runs
// in the scratch test images) and returns the folder holding it.
func meshagentDir(t testing.TB) string {
	t.Helper()
	meshagentBin.once.Do(func() {
		dir, err := os.MkdirTemp("", "meshagent-kubetest-")
		if err != nil {
			meshagentBin.err = err
			return
		}
		meshagentBin.dir = dir
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, "meshagent"), "github.com/meshagent/meshagent/cmd/meshagent")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			meshagentBin.err = fmt.Errorf("build meshagent: %v\n%s", err, out)
		}
	})
	if meshagentBin.err != nil {
		t.Fatal(meshagentBin.err)
	}
	return meshagentBin.dir
}

// cleanupKubeTests removes the binary built for the hooks (TestMain).
func cleanupKubeTests() {
	if meshagentBin.dir != "" {
		os.RemoveAll(meshagentBin.dir)
	}
}

// In-container paths of the mounts every test pod gets.
const (
	podRunDir  = "/run/meshagent" // the node's gate socket folder
	podBinDir  = "/opt/meshagent" // the meshagent binary
	podOutDir  = "/out"           // per-pod files the test reads (ready stamps)
	gatePortal = podBinDir + "/meshagent"
)

// kubeEnv is one test's node: a containerd, a folder shared with the pods
// (gate socket) and an agent config pointing at both.
type kubeEnv struct {
	t      *testing.T
	socket string
	rt     *critest.Runtime
	dir    string // host side of podRunDir; the agent's state and sockets
	bin    string
}

func newKubeEnv(t *testing.T, socket string) *kubeEnv {
	t.Helper()
	// Short: a unix socket path must fit in 108 bytes.
	dir, err := os.MkdirTemp("", "mk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return &kubeEnv{t: t, socket: socket, rt: critest.Connect(t, socket), dir: dir, bin: meshagentDir(t)}
}

func (e *kubeEnv) config() *Config {
	cfg := &Config{Node: Node{
		AdminSocket: filepath.Join(e.dir, "admin.sock"),
		StateDir:    filepath.Join(e.dir, "state"),
		MetricsAddr: "off",
		Kubernetes:  &KubeConfig{Containerd: e.socket, GateSocket: filepath.Join(e.dir, "gate.sock")},
	}}
	cfg.setDefaults()
	return cfg
}

// startAgent runs an agent in this process until the test ends, and
// returns it once it has listed containerd.
func (e *kubeEnv) startAgent(opts ...Option) (*Agent, *eventRec) {
	e.t.Helper()
	rec := &eventRec{}
	a, err := New(e.config(), append(opts, WithEventHook(rec.add), WithLogger(testLogger(e.t)))...)
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	e.t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			e.t.Errorf("agent run: %v", err)
		}
	})
	wctx, wcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer wcancel()
	if err := a.WaitKubeSynced(wctx); err != nil {
		e.t.Fatalf("agent never synced with containerd: %v", err)
	}
	return a, rec
}

// podSpec returns a pod of a sidecar "proxy" (ready delay after start, on
// 15021 in the pod's own network) and an app "app", with the mounts the
// hooks need and the given annotations on top of the sidecar ones.
func (e *kubeEnv) podSpec(name string, delay time.Duration, ann map[string]string) (critest.PodSpec, string) {
	out := filepath.Join(e.t.TempDir(), "out")
	if err := os.MkdirAll(out, 0o755); err != nil {
		e.t.Fatal(err)
	}
	annotations := map[string]string{
		AnnoSidecars:                  "proxy",
		AnnoReadinessPrefix + "proxy": "http:15021/ready",
		AnnoStartupTimeout:            "60s",
		AnnoReadinessPeriod:           "200ms",
		AnnoFailureThreshold:          "2",
		AnnoRestartGrace:              "5s",
	}
	for k, v := range ann {
		annotations[k] = v
	}
	return critest.PodSpec{Name: name, PodNetwork: true, Annotations: annotations, Containers: e.podContainers(out, delay)}, out
}

// podContainers are the sidecar "proxy" and the app "app" of a test pod;
// out is the host folder mounted at podOutDir.
func (e *kubeEnv) podContainers(out string, delay time.Duration) []critest.ContainerSpec {
	return []critest.ContainerSpec{
		{
			Name: "proxy", Image: testimages.Sidecar,
			Env: map[string]string{
				"SIDECAR_PORT": "15021", "SIDECAR_DELAY": delay.String(),
				"SIDECAR_READY_FILE": podOutDir + "/ready",
			},
			Mounts: e.mounts(out),
		},
		{
			Name: "app", Image: testimages.App,
			Env:    map[string]string{"APP_START_FILE": podOutDir + "/app-start"},
			Mounts: e.mounts(out),
		},
	}
}

func (e *kubeEnv) mounts(out string) []*runtimeapi.Mount {
	return []*runtimeapi.Mount{
		{ContainerPath: podRunDir, HostPath: e.dir},
		{ContainerPath: podBinDir, HostPath: e.bin, Readonly: true},
		{ContainerPath: podOutDir, HostPath: out},
	}
}

// hook runs `meshagent ARGS...` inside container id as kubelet runs an exec
// hook (CRI ExecSync), and returns its stdout and exit code.
func (e *kubeEnv) hook(ctx context.Context, id string, args ...string) (string, int32, error) {
	cmd := append([]string{gatePortal}, args...)
	cmd = append(cmd, "--socket", podRunDir+"/gate.sock")
	resp, err := e.rt.RS.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: id, Cmd: cmd})
	if err != nil {
		return "", -1, fmt.Errorf("exec %v in %s: %w", cmd, id, err)
	}
	if resp.ExitCode != 0 && len(resp.Stderr) > 0 {
		return string(resp.Stdout) + string(resp.Stderr), resp.ExitCode, nil
	}
	return string(resp.Stdout), resp.ExitCode, nil
}

// gateJSON is what `meshagent gate --json` prints.
type gateJSON struct {
	GateAnswer
	At int64 `json:"at"`
}

func parseGate(t testing.TB, out string) gateJSON {
	t.Helper()
	var g gateJSON
	if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &g); err != nil {
		t.Fatalf("gate output %q: %v", out, err)
	}
	return g
}

// readyAt is when the sidecar wrote its ready file (it listens by then).
func readyAt(t testing.TB, out string) time.Time {
	t.Helper()
	st, err := os.Stat(filepath.Join(out, "ready"))
	if err != nil {
		t.Fatalf("sidecar ready file: %v", err)
	}
	return st.ModTime()
}

// eventRec collects an agent's events.
type eventRec struct {
	mu  sync.Mutex
	evs []Event
}

func (r *eventRec) add(e Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.evs = append(r.evs, e)
}

// find returns the events of type typ about pod (and container, if set).
func (r *eventRec) find(typ, pod, container string) []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Event
	for _, e := range r.evs {
		if e.Type == typ && e.Pod == pod && (container == "" || e.Container == container) {
			out = append(out, e)
		}
	}
	return out
}

// waitUntil polls cond every 20ms for up to d.
func waitUntil(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kubeStatus returns the agent's view of a Kubernetes pod.
func kubeStatus(a *Agent, pod *critest.Pod) (PodStatus, bool) {
	st, err := a.Pod(pod.Namespace + "/" + pod.Name)
	return st, err == nil
}

func containerOf(st PodStatus, name string) ContainerStatus {
	for _, c := range st.Containers {
		if c.Name == name {
			return c
		}
	}
	return ContainerStatus{}
}

func podKey(p *critest.Pod) string { return p.Namespace + "/" + p.Name }
