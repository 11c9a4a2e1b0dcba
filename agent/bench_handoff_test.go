package agent

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshagent/meshagent/internal/loadgen"
)

// The hand-off load test: the real demo sidecar and app under an agent
// running in this process, open-loop traffic from internal/loadgen (half
// keep-alive, half a new connection per request). `make bench` runs a short
// version; MESHAGENT_LONG=1 (or LONG=1 with scripts/bench.sh) runs the one
// the figures in the README come from:
//
//	MESHAGENT_LONG=1 go test -run '^$' -bench Handoff -benchtime 1x ./agent

func longRun() bool { return os.Getenv("MESHAGENT_LONG") != "" }

// pick returns short or long by the run's length.
func pick[T any](short, long T) T {
	if longRun() {
		return long
	}
	return short
}

func loadRow(b *testing.B, phase string, r loadgen.Result) {
	b.Helper()
	c, l := r.Counts, r.Latency
	b.Logf("  %-16s %9d %9d %7d %6d %6d %7d %6d %6d %7d %7d %8s %8s %8s %8s", phase, c.Scheduled(), c.OK, c.Refused, c.Reset, c.EOF,
		c.Timeout, c.Non2xx, c.Other, c.Skipped, c.Retried, ms(l.P50), ms(l.P99), ms(l.P999), ms(l.Max))
}

func loadHeader(b *testing.B) {
	b.Helper()
	b.Logf("  %-16s %9s %9s %7s %6s %6s %7s %6s %6s %7s %7s %8s %8s %8s %8s", "phase", "requests", "ok", "refused", "reset", "eof",
		"timeout", "non2xx", "other", "skipped", "retried", "p50", "p99", "p99.9", "max")
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond)) }

func msf(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// BenchmarkHandoffUpgradeUnderLoad: hot upgrades of the sidecar under load
// (target: 0 failed, 0 refused), p99 during the upgrades next to a baseline.
func BenchmarkHandoffUpgradeUnderLoad(b *testing.B) {
	upgrades := pick(5, 50)
	// 2 cores carry the client, the sidecar, the app and the agent: the
	// long run stays below saturation so p99 shows the upgrades, not
	// queueing (>= 200,000 requests over 140 s).
	rate := pick(800.0, 1500.0)
	baseline := pick(3*time.Second, 15*time.Second)
	during := pick(6*time.Second, 140*time.Second)
	d := newDemoPod(b, "bench-up", demoPodOpts{store: true, watch: 100 * time.Millisecond})
	da := startDemoAgent(b, d.spec)
	appPID := da.status(b, "bench-up", "app").PID

	base := runLoad(b, d.target(), rate, baseline)()
	wait := runLoad(b, d.target(), rate, during)
	// Upgrades spread over the run, leaving its last second quiet.
	gap := (during - time.Second) / time.Duration(upgrades)
	start := time.Now()
	var ready []time.Duration
	var spans [][2]time.Duration // upgrade start and end, from the load's start
	ok, rolled := 0, 0
	for i := 0; i < upgrades; i++ {
		time.Sleep(time.Until(start.Add(time.Duration(i) * gap)))
		t0 := time.Since(start)
		res := upgradeTo(b, da, d, fmt.Sprintf("v%d", i+2))
		spans = append(spans, [2]time.Duration{t0, time.Since(start)})
		if res.Outcome == UpgradeSucceeded {
			ok++
			ready = append(ready, res.ReadyAfter)
		} else {
			rolled++
			b.Logf("upgrade %d rolled back: %s", i, res.Reason)
		}
	}
	res := wait()
	if da.status(b, "bench-up", "app").PID != appPID {
		b.Error("the app was restarted")
	}
	slices.Sort(ready)
	b.Logf("load average now %s", loadavg())
	b.Logf("hot upgrades under load: %d upgrades (%d succeeded, %d rolled back), %.0f req/s, half on new connections (retried: sent again by Go's client after a kept-alive connection closed, counted by final outcome)", upgrades, ok, rolled, rate)
	loadHeader(b)
	loadRow(b, "baseline", base)
	loadRow(b, "with upgrades", res)
	badSeconds(b, res.Windows, spans)
	with, without := windowP99s(res.Windows, spans)
	b.Logf("  median of per-second p99s in the same run: %s in the %d seconds with an upgrade, %s in the %d without",
		ms(median(with)), len(with), ms(median(without)), len(without))
	if len(ready) > 0 {
		b.Logf("  new process ready after p50 %s, max %s (start to READY=1)", ms(ready[len(ready)/2]), ms(ready[len(ready)-1]))
	}
	if res.Counts.Refused > 0 {
		b.Errorf("%d connections refused during hot upgrades", res.Counts.Refused)
	}
	b.ReportMetric(float64(ok), "upgrades")
	b.ReportMetric(float64(res.Counts.Scheduled()), "requests")
	b.ReportMetric(float64(res.Counts.Failed()), "failed")
	b.ReportMetric(float64(res.Counts.Refused), "refused")
	b.ReportMetric(msf(base.Latency.P99), "baseline_p99_ms")
	b.ReportMetric(msf(res.Latency.P99), "upgrade_p99_ms")
	b.ReportMetric(msf(median(with)), "win_p99_upgrading_ms")
	b.ReportMetric(msf(median(without)), "win_p99_quiet_ms")
}

// badSeconds lists the seconds with failed or skipped requests or a p99
// over 1s, and whether an upgrade ran in them: a stall of the whole
// machine (2 shared cores) hits seconds with and without upgrades alike.
func badSeconds(b *testing.B, wins []loadgen.Window, spans [][2]time.Duration) {
	b.Helper()
	shown := 0
	for _, w := range wins {
		c := w.Counts
		if c.Failed()+c.Skipped == 0 && w.Latency.P99 < time.Second {
			continue
		}
		if shown++; shown > 10 {
			b.Logf("  ... more bad seconds")
			return
		}
		up := false
		for _, s := range spans {
			up = up || (s[0] < w.Start+w.Length && s[1] > w.Start)
		}
		b.Logf("  bad second %3d: ok %d failed %d skipped %d p99 %s upgrade running: %v", w.Index, c.OK, c.Failed(), c.Skipped, ms(w.Latency.P99), up)
	}
}

func loadavg() string {
	raw, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(raw))
	return strings.Join(f[:min(3, len(f))], " ")
}

// windowP99s splits the per-window p99s by whether an upgrade overlapped
// the window: the same run, so the same background load on the machine.
func windowP99s(wins []loadgen.Window, spans [][2]time.Duration) (with, without []time.Duration) {
	for _, w := range wins {
		if w.Latency.N == 0 {
			continue
		}
		hit := false
		for _, s := range spans {
			if s[0] < w.Start+w.Length && s[1] > w.Start {
				hit = true
				break
			}
		}
		if hit {
			with = append(with, w.Latency.P99)
		} else {
			without = append(without, w.Latency.P99)
		}
	}
	return with, without
}

func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	d = slices.Clone(d)
	slices.Sort(d)
	return d[len(d)/2]
}

// crashScenario SIGKILLs the sidecar crashes times under load.
func crashScenario(b *testing.B, name string, store bool) {
	crashes := pick(5, 50)
	rate := pick(800.0, 1500.0)
	every := 600 * time.Millisecond
	d := newDemoPod(b, name, demoPodOpts{store: store})
	da := startDemoAgent(b, d.spec)
	appPID := da.status(b, name, "app").PID
	wait := runLoad(b, d.target(), rate, time.Duration(crashes)*every+time.Second)
	time.Sleep(500 * time.Millisecond)
	var back []time.Duration
	for i := 0; i < crashes; i++ {
		t0 := time.Now()
		c := da.status(b, name, "proxy")
		if err := syscall.Kill(c.PID, syscall.SIGKILL); err != nil {
			b.Fatal(err)
		}
		da.waitReady(b, name, "proxy", c.PID)
		back = append(back, time.Since(t0))
		time.Sleep(time.Until(t0.Add(every)))
	}
	res := wait()
	if da.status(b, name, "app").PID != appPID {
		b.Error("the app was restarted")
	}
	slices.Sort(back)
	mode := "fd store on: the agent holds the listener"
	if !store {
		mode = "fd store OFF (control): the sidecar binds its port itself"
	}
	c := res.Counts
	b.Logf("load average now %s", loadavg())
	b.Logf("SIGKILL crashes under load, %s: %d crashes, %.0f req/s", mode, crashes, rate)
	loadHeader(b)
	loadRow(b, "with crashes", res)
	b.Logf("  refused %d; in flight on the killed process (reset+eof) %d; sidecar ready again after p50 %s, max %s",
		c.Refused, c.Reset+c.EOF, ms(back[len(back)/2]), ms(back[len(back)-1]))
	switch {
	case store && c.Refused > 0:
		b.Errorf("%d connections refused although the agent held the listener", c.Refused)
	case !store && c.Refused == 0:
		b.Errorf("the control refused nothing: this load test could not have failed")
	}
	b.ReportMetric(float64(crashes), "crashes")
	b.ReportMetric(float64(c.Scheduled()), "requests")
	b.ReportMetric(float64(c.Refused), "refused")
	b.ReportMetric(float64(c.Reset+c.EOF), "inflight_lost")
	b.ReportMetric(float64(c.Timeout+c.Non2xx+c.Other), "other_failed")
}

func BenchmarkHandoffCrashWithStore(b *testing.B) { crashScenario(b, "bench-crash", true) }

// BenchmarkHandoffCrashNoStoreControl must show refused connections: the
// proof that the load test can fail.
func BenchmarkHandoffCrashNoStoreControl(b *testing.B) { crashScenario(b, "bench-ctl", false) }

// BenchmarkHandoffUpgradeFDs: the agent's own fd count before and after
// many upgrades.
func BenchmarkHandoffUpgradeFDs(b *testing.B) {
	n := pick(20, 100)
	d := newDemoPod(b, "bench-fds", demoPodOpts{store: true, watch: 20 * time.Millisecond})
	da := startDemoAgent(b, d.spec)
	fds := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			b.Fatal(err)
		}
		return len(ents)
	}
	// One upgrade first, so lazily made things (the admin client's
	// transport, the test's HTTP client) exist in both counts.
	upgradeTo(b, da, d, "v1")
	before := fds()
	t0 := time.Now()
	for i := 0; i < n; i++ {
		if res := upgradeTo(b, da, d, fmt.Sprintf("v%d", i+2)); res.Outcome != UpgradeSucceeded {
			b.Fatalf("upgrade %d: %s", i, res.Reason)
		}
	}
	took := time.Since(t0)
	// Probe connections come and go: take the count once it settles.
	after := fds()
	for deadline := time.Now().Add(3 * time.Second); after != before && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		after = fds()
	}
	b.Logf("agent fds around %d hot upgrades: before %d, after %d (%s per upgrade)", n, before, after, (took / time.Duration(n)).Round(time.Millisecond))
	if after != before {
		b.Errorf("fd count changed: %d before, %d after %d upgrades", before, after, n)
	}
	b.ReportMetric(float64(n), "upgrades")
	b.ReportMetric(float64(before), "fds_before")
	b.ReportMetric(float64(after), "fds_after")
}
