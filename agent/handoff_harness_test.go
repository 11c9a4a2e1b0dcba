package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// The hand-off tests and benchmarks run the real demo programs: the demo
// sidecar (LISTEN_FDS, NOTIFY_SOCKET, READY=1) in front of the demo app,
// built once per test binary.

var demoBuild struct {
	once sync.Once
	dir  string
	err  error
	skip string
}

func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	p := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	return ""
}

// demoBins returns the folder holding demo-sidecar and demo-app.
func demoBins(tb testing.TB) string {
	tb.Helper()
	demoBuild.once.Do(func() {
		g := goTool()
		if g == "" {
			demoBuild.skip = "no go tool in PATH or GOROOT to build the demo programs"
			return
		}
		dir, err := os.MkdirTemp("", "meshagent-demo-bins-")
		if err != nil {
			demoBuild.err = err
			return
		}
		demoBuild.dir = dir
		cmd := exec.Command(g, "build", "-o", dir+"/",
			"github.com/meshagent/meshagent/cmd/demo-sidecar", "github.com/meshagent/meshagent/cmd/demo-app")
		if out, err := cmd.CombinedOutput(); err != nil {
			demoBuild.err = fmt.Errorf("go build demo programs: %w\n%s", err, out)
		}
	})
	if demoBuild.skip != "" {
		tb.Skip(demoBuild.skip)
	}
	if demoBuild.err != nil {
		tb.Fatal(demoBuild.err)
	}
	return demoBuild.dir
}

// removeDemoBins runs after every test (TestMain).
func removeDemoBins() {
	if demoBuild.dir != "" {
		os.RemoveAll(demoBuild.dir)
	}
}

func freeTCP(tb testing.TB) string {
	tb.Helper()
	return freeTCPs(tb, 1)[0]
}

// freeTCPs returns n distinct free loopback addresses: all are held until
// all are picked, so the kernel cannot hand out one port twice.
func freeTCPs(tb testing.TB, n int) []string {
	tb.Helper()
	var out []string
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		defer ln.Close()
		out = append(out, ln.Addr().String())
	}
	return out
}

type demoPodOpts struct {
	// store: the agent holds the sidecar's listen and admin sockets and
	// gives it a notify socket. Off: it binds them itself (the control).
	store        bool
	readyAfter   time.Duration
	readyTimeout time.Duration
	watch        time.Duration
}

type demoPod struct {
	spec                PodSpec
	listen, admin, app  string
	sidecarBin, version string
}

func newDemoPod(tb testing.TB, name string, o demoPodOpts) *demoPod {
	tb.Helper()
	bins := demoBins(tb)
	addrs := freeTCPs(tb, 3)
	d := &demoPod{listen: addrs[0], admin: addrs[1], app: addrs[2], sidecarBin: filepath.Join(bins, "demo-sidecar"), version: "v1"}
	if o.readyAfter == 0 {
		o.readyAfter = 50 * time.Millisecond
	}
	if o.readyTimeout == 0 {
		o.readyTimeout = 10 * time.Second
	}
	if o.watch == 0 {
		o.watch = 200 * time.Millisecond
	}
	sidecar := ContainerSpec{
		Name: "proxy", Role: RoleSidecar, Command: d.sidecarBin, Version: "v1",
		Args:      d.sidecarArgs(o.readyAfter, "v1"),
		Readiness: &Readiness{HTTP: "http://" + d.admin + "/ready", Period: Duration(time.Second), Timeout: Duration(time.Second)},
		Restart: RestartPolicy{InitialBackoff: Duration(10 * time.Millisecond), MaxBackoff: Duration(200 * time.Millisecond),
			ResetAfter: Duration(200 * time.Millisecond), MaxRestarts: 100000, Window: Duration(time.Minute)},
		Stop:    StopPolicy{Signal: "SIGTERM", Grace: Duration(5 * time.Second)},
		Upgrade: UpgradePolicy{ReadyTimeout: Duration(o.readyTimeout), Watch: Duration(o.watch)},
	}
	if o.store {
		sidecar.Handoff = &HandoffSpec{FDStore: true, Listeners: []ListenerSpec{
			{Name: "listen", Address: "tcp://" + d.listen}, {Name: "admin", Address: "tcp://" + d.admin}}}
	}
	d.spec = PodSpec{
		Name:    name,
		Startup: StartupPolicy{Timeout: Duration(20 * time.Second)},
		Containers: []ContainerSpec{sidecar, {
			Name: "app", Role: RoleApp, Command: filepath.Join(bins, "demo-app"),
			Args: []string{"--listen", d.app, "--name", name, "--drain", "2s"},
			Stop: StopPolicy{Signal: "SIGTERM", Grace: Duration(5 * time.Second)},
		}},
	}
	return d
}

func (d *demoPod) sidecarArgs(readyAfter time.Duration, version string, extra ...string) []string {
	return append([]string{"--listen", d.listen, "--admin", d.admin, "--upstream", d.app,
		"--ready-after", readyAfter.String(), "--drain", "3s", "--version", version}, extra...)
}

func (d *demoPod) target() string { return "http://" + d.listen + "/" }

// demoAgent is an in-process agent supervising demo pods.
type demoAgent struct {
	*Agent
	rec    *eventRecorder
	socket string
	stop   func()
}

func startDemoAgent(tb testing.TB, pods ...PodSpec) *demoAgent {
	tb.Helper()
	dir := tb.TempDir()
	cfg := &Config{Node: Node{AdminSocket: filepath.Join(dir, "admin.sock"), StateDir: filepath.Join(dir, "state"), MetricsAddr: "off"}, Pods: pods}
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		tb.Fatal(err)
	}
	// The agent's log goes to a file, shown when the test fails.
	logPath := filepath.Join(dir, "agent.log")
	logf, err := os.Create(logPath)
	if err != nil {
		tb.Fatal(err)
	}
	var w io.Writer = logf
	if testing.Verbose() && os.Getenv("MESHAGENT_TEST_LOG") != "" {
		w = io.MultiWriter(logf, os.Stderr)
	}
	log := slog.New(slog.NewTextHandler(w, nil))
	rec := &eventRecorder{}
	a, err := New(cfg, WithLogger(log), WithEventHook(rec.hook))
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	select {
	case <-a.Ready():
	case err := <-done:
		cancel()
		tb.Fatalf("agent exited at start: %v", err)
	}
	var once sync.Once
	da := &demoAgent{Agent: a, rec: rec, socket: cfg.Node.AdminSocket}
	da.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				tb.Error("agent did not stop within 30s")
			}
			logf.Close() // the agent's last line is written
		})
	}
	tb.Cleanup(func() {
		da.stop()
		if tb.Failed() {
			dumpLogs(tb, filepath.Join(cfg.Node.StateDir, "logs"))
			b, _ := os.ReadFile(logPath)
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			if len(lines) > 60 {
				lines = lines[len(lines)-60:]
			}
			tb.Logf("agent log (last %d lines):\n%s", len(lines), strings.Join(lines, "\n"))
		}
	})
	for _, p := range pods {
		wctx, wcancel := context.WithTimeout(context.Background(), 20*time.Second)
		err := a.WaitPod(wctx, p.Name, PhaseRunning)
		wcancel()
		if err != nil {
			tb.Fatal(err)
		}
	}
	for _, p := range pods {
		da.waitReady(tb, p.Name, "app", 0)
		// The demo app has no readiness check: wait until it answers
		// through the sidecar before any load is sent.
		if sc := p.Container("proxy"); sc != nil {
			waitServing(tb, sidecarListen(sc))
		}
	}
	return da
}

// sidecarListen is the --listen argument of a demo sidecar.
func sidecarListen(c *ContainerSpec) string {
	for i, a := range c.Args {
		if a == "--listen" && i+1 < len(c.Args) {
			return c.Args[i+1]
		}
	}
	return ""
}

func waitServing(tb testing.TB, addr string) {
	tb.Helper()
	c := &http.Client{Timeout: time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := c.Get("http://" + addr + "/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			tb.Fatalf("nothing serves through %s after 20s: %v", addr, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (da *demoAgent) status(tb testing.TB, pod, name string) ContainerStatus {
	tb.Helper()
	p, err := da.Pod(pod)
	if err != nil {
		tb.Fatal(err)
	}
	for _, c := range p.Containers {
		if c.Name == name {
			return c
		}
	}
	tb.Fatalf("no container %s/%s", pod, name)
	return ContainerStatus{}
}

// waitReady waits for pod/name to be ready with a pid other than notPID.
func (da *demoAgent) waitReady(tb testing.TB, pod, name string, notPID int) ContainerStatus {
	tb.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		c := da.status(tb, pod, name)
		if c.Ready && c.PID != 0 && c.PID != notPID {
			return c
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s/%s not ready with a new pid (not %d) after 20s: %+v", pod, name, notPID, c)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (da *demoAgent) count(typ string) int {
	n := 0
	for _, e := range da.rec.all() {
		if e.Type == typ {
			n++
		}
	}
	return n
}

// sidecarInfo is the demo sidecar's /version answer.
type sidecarInfo struct {
	Version string `json:"version"`
	PID     int    `json:"pid"`
	Ready   bool   `json:"ready"`
}

func getSidecarInfo(admin string) (sidecarInfo, error) {
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + admin + "/version")
	if err != nil {
		return sidecarInfo{}, err
	}
	defer resp.Body.Close()
	var v sidecarInfo
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return v, err
	}
	if resp.StatusCode != http.StatusOK {
		return v, errors.New(resp.Status)
	}
	return v, nil
}

// running reports whether pid exists and is not a zombie.
func running(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	for i := len(b) - 1; i > 0; i-- {
		if b[i] == ')' && i+2 < len(b) {
			return b[i+2] != 'Z'
		}
	}
	return true
}

// dumpLogs shows the warnings and errors of the processes of a failed test.
func dumpLogs(tb testing.TB, dir string) {
	files, _ := filepath.Glob(filepath.Join(dir, "*", "*.log"))
	for _, f := range files {
		b, _ := os.ReadFile(f)
		var keep []string
		for _, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") {
				keep = append(keep, line)
			}
		}
		if len(keep) == 0 { // no levels (a plain error line): the tail
			keep = strings.Split(strings.TrimSpace(string(b)), "\n")
		}
		if len(keep) > 20 {
			keep = keep[len(keep)-20:]
		}
		tb.Logf("%s:\n%s", f, strings.Join(keep, "\n"))
	}
}
