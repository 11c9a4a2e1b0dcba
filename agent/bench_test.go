package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// percentile of sorted durations.
func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	i := int(float64(len(d)-1) * p)
	return d[i]
}

func reportPercentiles(b *testing.B, name string, d []time.Duration) {
	b.ReportMetric(float64(percentile(d, 0.50).Microseconds())/1000, name+"_p50_ms")
	b.ReportMetric(float64(percentile(d, 0.99).Microseconds())/1000, name+"_p99_ms")
	b.ReportMetric(float64(len(d)), name+"_samples")
}

// eventRecorder keeps every event, beyond the agent's ring.
type eventRecorder struct {
	mu  sync.Mutex
	evs []Event
}

func (r *eventRecorder) hook(e Event) {
	r.mu.Lock()
	r.evs = append(r.evs, e)
	r.mu.Unlock()
}

func (r *eventRecorder) all() []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Event(nil), r.evs...)
}

func benchAgent(b *testing.B, rec *eventRecorder, opts []Option, pods ...PodSpec) (*Agent, func()) {
	b.Helper()
	dir := b.TempDir()
	cfg := &Config{Node: Node{AdminSocket: filepath.Join(dir, "admin.sock"), StateDir: filepath.Join(dir, "state"), MetricsAddr: "off"}, Pods: pods}
	cfg.setDefaults()
	opts = append([]Option{WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))), WithEventHook(rec.hook)}, opts...)
	a, err := New(cfg, opts...)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	<-a.Ready()
	return a, func() { cancel(); <-done }
}

func waitFor(b *testing.B, d time.Duration, cond func() bool) {
	b.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			b.Fatal("timed out")
		}
		time.Sleep(time.Millisecond)
	}
}

// BenchmarkGateReaction: time from the sidecar's port accepting (its own
// timestamp right after listen) to the app running (the app's own
// timestamp at the top of main), over 200 pod starts.
func BenchmarkGateReaction(b *testing.B) { benchGate(b, "gate", nil) }

// BenchmarkGateReactionCgroups is the same with the cgroup policy on (root):
// every start goes through meshagent-exec, which enters the cgroups and sets
// oom_score_adj before the command runs.
func BenchmarkGateReactionCgroups(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("the cgroup policy needs root")
	}
	bin := filepath.Join(b.TempDir(), "meshagent-exec")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/meshagent-exec").CombinedOutput(); err != nil {
		b.Fatal(err, string(out))
	}
	rt := &HostRuntime{Self: bin, LogDir: b.TempDir()}
	benchGate(b, fmt.Sprintf("gate-cg-%d", os.Getpid()), []Option{WithRuntime(rt), WithCgroups()})
}

func benchGate(b *testing.B, name string, opts []Option) {
	const starts = 200
	settle()
	for i := 0; i < b.N; i++ {
		dir := b.TempDir()
		self, _ := os.Executable()
		addr := freeAddrB(b)
		sc, app := filepath.Join(dir, "sc"), filepath.Join(dir, "app")
		spec := PodSpec{Name: name, SidecarPolicy: map[string]string{"cpu": "500m"}, Containers: []ContainerSpec{
			{Name: "proxy", Role: RoleSidecar, Command: self, Readiness: &Readiness{TCP: addr},
				Env: map[string]string{"MESHAGENT_TEST_CHILD": "sidecar", "STAMP_FILE": sc, "LISTEN_ADDR": addr, "DELAY": "20ms"}},
			{Name: "app", Role: RoleApp, Command: self, Env: map[string]string{"MESHAGENT_TEST_CHILD": "app", "STAMP_FILE": app}},
		}}
		rec := &eventRecorder{}
		a, stop := benchAgent(b, rec, opts, spec)
		for n := 1; n <= starts; n++ {
			waitFor(b, 10*time.Second, func() bool { return len(readStamps(app)["start"]) >= n })
			if n < starts {
				if err := a.RestartPod(context.Background(), name); err != nil {
					b.Fatal(err)
				}
			}
		}
		stop()
		// The app's exec is when the agent's start of it returned (os/exec
		// returns once execve succeeded): the "starting" -> ready event.
		var execs []time.Time
		for _, e := range rec.all() {
			if e.Container == "app" && e.Type == EvState && e.From == StateStarting {
				execs = append(execs, e.Time)
			}
		}
		listens, appMain := readStamps(sc)["listen"], readStamps(app)["start"]
		var toExec, toMain []time.Duration
		for k := range min(len(listens), len(execs), len(appMain)) {
			toExec = append(toExec, execs[k].Sub(listens[k]))
			toMain = append(toMain, appMain[k].Sub(listens[k]))
		}
		reportPercentiles(b, "gate_exec", toExec)
		reportPercentiles(b, "gate_app_main", toMain)
	}
}

// BenchmarkCrashRestart: time from SIGKILL of a sidecar to its successor
// running (its own timestamp at the top of main), first restart after a
// stable run each time.
func BenchmarkCrashRestart(b *testing.B) {
	const crashes = 200
	settle()
	for i := 0; i < b.N; i++ {
		dir := b.TempDir()
		self, _ := os.Executable()
		sc := filepath.Join(dir, "sc")
		spec := PodSpec{Name: "crash", Containers: []ContainerSpec{
			{Name: "proxy", Role: RoleSidecar, Command: self,
				Env:     map[string]string{"MESHAGENT_TEST_CHILD": "sidecar", "STAMP_FILE": sc, "NEVER_READY": "1"},
				Restart: RestartPolicy{ResetAfter: Duration(20 * time.Millisecond), MaxRestarts: 1000}},
		}}
		rec := &eventRecorder{}
		a, stop := benchAgent(b, rec, nil, spec)
		var d []time.Duration
		var kills []time.Time
		for n := 1; n <= crashes; n++ {
			var pid int
			waitFor(b, 10*time.Second, func() bool {
				p, _ := a.Pod("crash")
				pid = p.Containers[0].PID
				return pid != 0 && len(readStamps(sc)["start"]) >= n
			})
			time.Sleep(30 * time.Millisecond) // a stable run: the next restart is a first restart
			t0 := time.Now()
			_ = syscall.Kill(pid, syscall.SIGKILL)
			waitFor(b, 10*time.Second, func() bool { return len(readStamps(sc)["start"]) > n })
			d = append(d, readStamps(sc)["start"][n].Sub(t0))
			kills = append(kills, t0)
		}
		stop()
		var execs []time.Time
		for _, e := range rec.all() {
			if e.Type == EvState && e.From == StateStarting {
				execs = append(execs, e.Time)
			}
		}
		var toExec []time.Duration
		for k := range min(len(kills), len(execs)-1) {
			toExec = append(toExec, execs[k+1].Sub(kills[k]))
		}
		reportPercentiles(b, "restart_exec", toExec)
		reportPercentiles(b, "restart_main", d)
	}
}

// settle starts a latency benchmark from a clean slate: the benchmarks of
// this package share one process, and the hand-off load benchmarks before
// these leave a heap whose collection would be measured as gate latency.
func settle() {
	runtime.GC()
	debug.FreeOSMemory()
}

// BenchmarkFootprint200Pods: the agent as its own process supervising 200
// pods of a sidecar (TCP readiness at the default period) and an app: its RSS and its
// CPU while idle.
func BenchmarkFootprint200Pods(b *testing.B) {
	const pods = 200
	for i := 0; i < b.N; i++ {
		dir := b.TempDir()
		var y strings.Builder
		fmt.Fprintf(&y, "node: {adminSocket: %q, stateDir: %q, metricsAddr: off}\npods:\n", filepath.Join(dir, "admin.sock"), filepath.Join(dir, "state"))
		for p := 0; p < pods; p++ {
			// Below the ephemeral range: the agent's own probe connections
			// must not take a sidecar's port before it binds it (real
			// sidecars listen on fixed ports such as 15001 for the same reason).
			addr := fmt.Sprintf("127.0.0.1:%d", 21000+p)
			fmt.Fprintf(&y, `  - name: pod%d
    containers:
      - {name: proxy, role: sidecar, command: python3, args: ["-c", "import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('%s', %s)); s.listen(); time.sleep(1e6)"], readiness: {tcp: %q}, stop: {grace: 2s}}
      - {name: app, role: app, command: sleep, args: ["1000000"], stop: {grace: 2s}}
`, p, strings.Split(addr, ":")[0], strings.Split(addr, ":")[1], addr)
		}
		cfgFile := filepath.Join(dir, "config.yaml")
		if err := os.WriteFile(cfgFile, []byte(y.String()), 0o600); err != nil {
			b.Fatal(err)
		}
		self, _ := os.Executable()
		cmd := exec.Command(self)
		cmd.Env = append(os.Environ(), "MESHAGENT_TEST_CHILD=agent", "AGENT_CONFIG="+cfgFile)
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		c := NewClient(filepath.Join(dir, "admin.sock"))
		start := time.Now()
		waitFor(b, 120*time.Second, func() bool {
			ps, err := c.Pods(context.Background())
			if err != nil || len(ps) != pods {
				return false
			}
			for _, p := range ps {
				for _, ct := range p.Containers {
					if ct.State != StateReady {
						return false
					}
				}
			}
			return true
		})
		b.ReportMetric(time.Since(start).Seconds(), "all_ready_s")
		time.Sleep(2 * time.Second) // let start-up garbage settle
		restarts := func() int {
			ps, _ := c.Pods(context.Background())
			n := 0
			for _, p := range ps {
				for _, ct := range p.Containers {
					n += ct.Restarts
				}
			}
			return n
		}
		r0 := restarts()
		cpu0, t0 := procCPU(cmd.Process.Pid), time.Now()
		time.Sleep(20 * time.Second)
		cpu1, t1 := procCPU(cmd.Process.Pid), time.Now()
		b.ReportMetric(100*(cpu1-cpu0).Seconds()/t1.Sub(t0).Seconds(), "idle_cpu_pct")
		// Idle means idle: a restart in the window would be measured as idle CPU.
		b.ReportMetric(float64(restarts()-r0), "restarts_in_window")
		b.ReportMetric(float64(procRSS(cmd.Process.Pid))/(1<<20), "rss_MiB")
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}
}

func freeAddrB(b *testing.B) string {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// procCPU is utime+stime of pid.
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	u, _ := strconv.ParseInt(f[11], 10, 64)
	k, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(u+k) * time.Second / 100 // USER_HZ
}

func procRSS(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
			return kb << 10
		}
	}
	return 0
}
