package metrics

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
)

// TestScrapeAfterScriptedEvents drives the events the agent emits for a
// crash, an OOM kill, a hot upgrade, a rollback and a drift, then scrapes
// /metrics over HTTP and compares the exact series and values.
func TestScrapeAfterScriptedEvents(t *testing.T) {
	m := newMetrics(t, Options{})
	url := serve(t, m)

	// web-1: envoy crashes twice, is OOM-killed and restarted, drifts twice.
	m.SidecarReady("web-1", "envoy", 1500*time.Millisecond)
	m.AppsGated("web-1", 1600*time.Millisecond)
	m.SidecarRestart("web-1", "envoy", CauseCrash)
	m.OOMKill("web-1", "envoy", RoleSidecar)
	m.SidecarRestart("web-1", "envoy", CauseOOM)
	m.SidecarRestart("web-1", "envoy", CauseCrash)
	m.SidecarReady("web-1", "envoy", 250*time.Millisecond)
	m.DriftCorrected("web-1", "envoy", "cpu.cfs_quota_us")
	m.DriftCorrected("web-1", "envoy", "cpu.cfs_quota_us")
	m.FDsHeld("web-1", "envoy", 3)
	m.FDsHeld("web-1", "envoy", 2)
	// web-2: startup timed out with failClosed, the app was OOM-killed,
	// mosn was upgraded once (success) and once rolled back.
	m.StartupTimeout("web-2", PolicyFailClosed)
	m.OOMKill("web-2", "shop", RoleApp)
	m.SidecarRestart("web-2", "mosn", CauseUpgrade)
	m.HandoffDone(KindUpgrade, OutcomeSuccess, "", 3*time.Second)
	m.HandoffDone(KindUpgrade, OutcomeRolledBack, ReasonCrashed, 12*time.Second)
	m.HandoffDone(KindHandoff, OutcomeSuccess, ReasonNone, 500*time.Millisecond)
	m.DriftCorrected("web-2", "mosn", "oom_score_adj")
	// Status: envoy crash-looped, then recovered; mosn is down.
	m.SidecarStatus("web-1", "envoy", false, true)
	m.SidecarStatus("web-1", "envoy", true, false)
	m.SidecarStatus("web-2", "mosn", false, true)
	// Operations: one reload taken, one refused; a switch flipped off.
	m.ConfigReload(nil)
	m.ConfigReload(errors.New(`pods[1].containers[0].role: "sidekick" is not sidecar or app`))
	m.Switch("auto-restart", true)
	m.Switch("cgroup-writes", true)
	m.Switch("auto-restart", false)

	const want = `
# HELP meshagent_sidecar_restarts_total Sidecar restarts by pod, container and cause (crash, oom, hang, operator, upgrade, other).
# TYPE meshagent_sidecar_restarts_total counter
meshagent_sidecar_restarts_total{cause="crash",container="envoy",pod="web-1"} 2
meshagent_sidecar_restarts_total{cause="oom",container="envoy",pod="web-1"} 1
meshagent_sidecar_restarts_total{cause="upgrade",container="mosn",pod="web-2"} 1
# HELP meshagent_oom_kills_total OOM kills in a pod's cgroup by victim container and role (sidecar, app, unknown).
# TYPE meshagent_oom_kills_total counter
meshagent_oom_kills_total{container="envoy",pod="web-1",role="sidecar"} 1
meshagent_oom_kills_total{container="shop",pod="web-2",role="app"} 1
# HELP meshagent_cgroup_drift_corrections_total cgroup or oom_score_adj values someone else changed and meshagent restored, by knob.
# TYPE meshagent_cgroup_drift_corrections_total counter
meshagent_cgroup_drift_corrections_total{container="envoy",knob="cpu.cfs_quota_us",pod="web-1"} 2
meshagent_cgroup_drift_corrections_total{container="mosn",knob="oom_score_adj",pod="web-2"} 1
# HELP meshagent_startup_timeouts_total Pod starts whose sidecars were not ready within startup.timeout, by the policy applied (failOpen, failClosed).
# TYPE meshagent_startup_timeouts_total counter
meshagent_startup_timeouts_total{pod="web-2",policy="failClosed"} 1
# HELP meshagent_fdstore_held_fds File descriptors (listening sockets) the hand-off store holds for a sidecar.
# TYPE meshagent_fdstore_held_fds gauge
meshagent_fdstore_held_fds{container="envoy",pod="web-1"} 2
# HELP meshagent_handoffs_total Finished hand-offs and hot upgrades by kind, outcome (success, rolled_back, failed) and reason.
# TYPE meshagent_handoffs_total counter
meshagent_handoffs_total{kind="handoff",outcome="success",reason="none"} 1
meshagent_handoffs_total{kind="upgrade",outcome="rolled_back",reason="crashed"} 1
meshagent_handoffs_total{kind="upgrade",outcome="success",reason="none"} 1
# HELP meshagent_sidecar_last_ready_duration_seconds Time the last start of this sidecar took to become ready.
# TYPE meshagent_sidecar_last_ready_duration_seconds gauge
meshagent_sidecar_last_ready_duration_seconds{container="envoy",pod="web-1"} 0.25
# HELP meshagent_startup_gate_last_hold_duration_seconds Time the startup gate held this pod's apps the last time it opened.
# TYPE meshagent_startup_gate_last_hold_duration_seconds gauge
meshagent_startup_gate_last_hold_duration_seconds{pod="web-1"} 1.6
# HELP meshagent_sidecar_ready 1 while the sidecar passes its readiness check, else 0.
# TYPE meshagent_sidecar_ready gauge
meshagent_sidecar_ready{container="envoy",pod="web-1"} 1
meshagent_sidecar_ready{container="mosn",pod="web-2"} 0
# HELP meshagent_sidecar_crash_looping 1 while the supervisor reports the sidecar in a crash loop, else 0.
# TYPE meshagent_sidecar_crash_looping gauge
meshagent_sidecar_crash_looping{container="envoy",pod="web-1"} 0
meshagent_sidecar_crash_looping{container="mosn",pod="web-2"} 1
# HELP meshagent_config_reloads_total Config reloads (SIGHUP or ctl reload) by result (success, failure).
# TYPE meshagent_config_reloads_total counter
meshagent_config_reloads_total{result="failure"} 1
meshagent_config_reloads_total{result="success"} 1
# HELP meshagent_config_last_reload_successful 1 if the last config reload was taken, 0 if it was refused and the previous config is still in force.
# TYPE meshagent_config_last_reload_successful gauge
meshagent_config_last_reload_successful 0
# HELP meshagent_switch_enabled Runtime switches: 1 on, 0 off (an emergency switch left off shows here).
# TYPE meshagent_switch_enabled gauge
meshagent_switch_enabled{switch="auto-restart"} 0
meshagent_switch_enabled{switch="cgroup-writes"} 1
`
	names := []string{
		"meshagent_sidecar_restarts_total", "meshagent_oom_kills_total",
		"meshagent_cgroup_drift_corrections_total", "meshagent_startup_timeouts_total",
		"meshagent_fdstore_held_fds", "meshagent_handoffs_total",
		"meshagent_sidecar_last_ready_duration_seconds", "meshagent_startup_gate_last_hold_duration_seconds",
		"meshagent_sidecar_ready", "meshagent_sidecar_crash_looping", "meshagent_config_reloads_total",
		"meshagent_config_last_reload_successful", "meshagent_switch_enabled",
	}
	if err := testutil.ScrapeAndCompare(url, strings.NewReader(want), names...); err != nil {
		t.Fatalf("scrape differs:\n%v", err)
	}

	// Histograms: exact counts and sums, and which bucket each lands in.
	mfs := scrape(t, url)
	hists := []struct {
		family string
		labels string
		count  uint64
		sum    float64
		le     float64 // a bucket bound ...
		below  uint64  // ... and the cumulative count at it
	}{
		{"meshagent_sidecar_ready_duration_seconds", "{}", 2, 1.75, 0.25, 1},
		{"meshagent_startup_gate_hold_duration_seconds", "{}", 1, 1.6, 1, 0},
		{"meshagent_handoff_duration_seconds", `{kind="upgrade",outcome="success"}`, 1, 3, 5, 1},
		{"meshagent_handoff_duration_seconds", `{kind="upgrade",outcome="rolled_back"}`, 1, 12, 10, 0},
		{"meshagent_handoff_duration_seconds", `{kind="handoff",outcome="success"}`, 1, 0.5, 0.5, 1},
	}
	for _, h := range hists {
		t.Run(h.family+h.labels, func(t *testing.T) {
			mt := findMetric(t, mfs, h.family, h.labels)
			hg := mt.GetHistogram()
			if hg.GetSampleCount() != h.count || hg.GetSampleSum() != h.sum {
				t.Fatalf("count=%d sum=%g, want count=%d sum=%g", hg.GetSampleCount(), hg.GetSampleSum(), h.count, h.sum)
			}
			for _, b := range hg.GetBucket() {
				if b.GetUpperBound() == h.le && b.GetCumulativeCount() != h.below {
					t.Fatalf("bucket le=%g holds %d, want %d", h.le, b.GetCumulativeCount(), h.below)
				}
			}
		})
	}
	if got := len(mfs["meshagent_handoff_duration_seconds"].GetMetric()); got != 3 {
		t.Errorf("meshagent_handoff_duration_seconds has %d series, want 3 (kind x outcome seen)", got)
	}
}

func findMetric(t *testing.T, mfs map[string]*dto.MetricFamily, family, labels string) *dto.Metric {
	t.Helper()
	mf, ok := mfs[family]
	if !ok {
		t.Fatalf("family %s missing from scrape", family)
	}
	var seen []string
	for _, mt := range mf.GetMetric() {
		if l := labelString(mt); l == labels {
			return mt
		} else {
			seen = append(seen, l)
		}
	}
	t.Fatalf("%s%s missing; have %v", family, labels, seen)
	return nil
}

// TestLabelValuesStayBounded checks that values outside each fixed
// vocabulary are folded into one fallback value.
func TestLabelValuesStayBounded(t *testing.T) {
	tests := []struct {
		name   string
		record func(m *Metrics)
		want   string
	}{
		{"unknown cause", func(m *Metrics) { m.SidecarRestart("p", "c", "segfault at 0x0") }, `meshagent_sidecar_restarts_total{cause="other",container="c",pod="p"} 1`},
		{"empty cause", func(m *Metrics) { m.SidecarRestart("p", "c", "") }, `meshagent_sidecar_restarts_total{cause="other",container="c",pod="p"} 1`},
		{"hang cause", func(m *Metrics) { m.SidecarRestart("p", "c", CauseHang) }, `meshagent_sidecar_restarts_total{cause="hang",container="c",pod="p"} 1`},
		{"operator cause", func(m *Metrics) { m.SidecarRestart("p", "c", CauseOperator) }, `meshagent_sidecar_restarts_total{cause="operator",container="c",pod="p"} 1`},
		{"unknown role", func(m *Metrics) { m.OOMKill("p", "c", "init") }, `meshagent_oom_kills_total{container="c",pod="p",role="unknown"} 1`},
		{"unknown policy", func(m *Metrics) { m.StartupTimeout("p", "fail-open") }, `meshagent_startup_timeouts_total{pod="p",policy="other"} 1`},
		{"failOpen policy", func(m *Metrics) { m.StartupTimeout("p", PolicyFailOpen) }, `meshagent_startup_timeouts_total{pod="p",policy="failOpen"} 1`},
		{"free-text reason", func(m *Metrics) {
			m.HandoffDone(KindUpgrade, OutcomeRolledBack, "readiness probe failed at 12:03:04", time.Second)
		}, `meshagent_handoffs_total{kind="upgrade",outcome="rolled_back",reason="other"} 1`},
		{"unknown kind and outcome", func(m *Metrics) { m.HandoffDone("swap", "maybe", ReasonNotReady, time.Second) },
			`meshagent_handoffs_total{kind="other",outcome="other",reason="not_ready"} 1`},
		{"failed upgrade", func(m *Metrics) { m.HandoffDone(KindUpgrade, OutcomeFailed, ReasonFDTransfer, time.Second) },
			`meshagent_handoffs_total{kind="upgrade",outcome="failed",reason="fd_transfer"} 1`},
		{"canceled handoff", func(m *Metrics) { m.HandoffDone(KindHandoff, OutcomeFailed, ReasonCanceled, time.Second) },
			`meshagent_handoffs_total{kind="handoff",outcome="failed",reason="canceled"} 1`},
		{"invalid utf-8 pod", func(m *Metrics) { m.SidecarRestart("pod\xff", "c", CauseCrash) },
			`meshagent_sidecar_restarts_total{cause="crash",container="c",pod="pod` + "\uFFFD" + `"} 1`},
		{"negative fd count", func(m *Metrics) { m.FDsHeld("p", "c", -3) }, `meshagent_fdstore_held_fds{container="c",pod="p"} 0`},
		{"negative duration", func(m *Metrics) { m.SidecarReady("p", "c", -time.Second) }, `meshagent_sidecar_last_ready_duration_seconds{container="c",pod="p"} 0`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMetrics(t, Options{})
			tt.record(m)
			family := tt.want[:strings.IndexByte(tt.want, '{')]
			got := exposition(t, m, family)
			if !strings.Contains(got, "\n"+tt.want+"\n") {
				t.Fatalf("want line %q in\n%s", tt.want, got)
			}
			if n := strings.Count(got, "\n"+family+"{"); n != 1 {
				t.Fatalf("want exactly 1 series of %s, got %d:\n%s", family, n, got)
			}
		})
	}
}

// exposition returns the text exposition lines of the named families, as
// the handler serves them.
func exposition(t *testing.T, m *Metrics, names ...string) string {
	t.Helper()
	req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
	req.Header.Set("Accept", "text/plain; version=0.0.4")
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, req)
	if rec.Code != http.StatusOK {
		t.Fatalf("handler: status %d", rec.Code)
	}
	var b strings.Builder
	for _, line := range strings.Split(rec.Body.String(), "\n") {
		for _, n := range names {
			if strings.HasPrefix(line, n+"{") || strings.HasPrefix(line, n+" ") {
				b.WriteString(line + "\n")
			}
		}
	}
	return "\n" + b.String()
}

// TestForgetPodLeavesNoSeries creates 1,000 pods with every per-pod series
// (events and cgroup stats), removes them, and expects the scrape to be back
// to exactly the series it had before.
func TestForgetPodLeavesNoSeries(t *testing.T) {
	src := newFakeStats()
	m := newMetrics(t, Options{Stats: src})
	url := serve(t, m)
	// Fleet-wide series that exist regardless of pods, recorded up front so
	// the baseline already has them.
	m.HandoffDone(KindUpgrade, OutcomeSuccess, "", time.Second)

	baseline := scrape(t, url)
	if got := seriesWithLabel(baseline, "pod", ""); len(got) != 0 {
		t.Fatalf("pod series before any pod: %v", got)
	}
	const pods = 1000
	name := func(i int) string { return "pod-" + strings.Repeat("x", i%7) + "-" + itoa(i) }
	for i := range pods {
		populatePod(m, src, name(i))
	}
	full := scrape(t, url)
	perPod := len(seriesWithLabel(full, "pod", name(0)))
	if perPod == 0 {
		t.Fatal("populated pod has no series")
	}
	if got, want := len(seriesWithLabel(full, "pod", "")), pods*perPod; got != want {
		t.Fatalf("%d pod series with %d pods, want %d (%d each)", got, pods, want, perPod)
	}

	// Remove the first half and check the second half is untouched.
	for i := range pods / 2 {
		src.removePod(name(i))
		if n := m.ForgetPod(name(i)); n == 0 {
			t.Fatalf("ForgetPod(%s) removed nothing", name(i))
		}
	}
	half := scrape(t, url)
	if got, want := len(seriesWithLabel(half, "pod", "")), pods/2*perPod; got != want {
		t.Fatalf("%d pod series after removing half, want %d", got, want)
	}
	if got := seriesWithLabel(half, "pod", name(0)); len(got) != 0 {
		t.Fatalf("removed pod still has series: %v", got)
	}
	if got := len(seriesWithLabel(half, "pod", name(pods-1))); got != perPod {
		t.Fatalf("kept pod has %d series, want %d", got, perPod)
	}

	for i := pods / 2; i < pods; i++ {
		src.removePod(name(i))
		m.ForgetPod(name(i))
	}
	after := scrape(t, url)
	if got := seriesWithLabel(after, "pod", ""); len(got) != 0 {
		t.Fatalf("%d pod series left after removing every pod, e.g. %v", len(got), got[:min(5, len(got))])
	}
	if got, want := countMeshagentSeries(after), countMeshagentSeries(baseline); got != want {
		t.Fatalf("%d meshagent series after, %d before", got, want)
	}
	if n := m.ForgetPod(name(0)); n != 0 {
		t.Fatalf("second ForgetPod removed %d series", n)
	}
}

func itoa(i int) string {
	if i == 0 {
		return "0"
	}
	var b []byte
	for ; i > 0; i /= 10 {
		b = append([]byte{byte('0' + i%10)}, b...)
	}
	return string(b)
}

func countMeshagentSeries(mfs map[string]*dto.MetricFamily) int {
	n := 0
	for name, mf := range mfs {
		if strings.HasPrefix(name, "meshagent_") {
			n += len(mf.GetMetric())
		}
	}
	return n
}

func TestStatsSource(t *testing.T) {
	t.Run("values", func(t *testing.T) {
		src := newFakeStats()
		src.set(SidecarStats{Pod: "web-1", Container: "envoy", CPUUsage: 1500 * time.Millisecond,
			Periods: 200, ThrottledPeriods: 7, ThrottledTime: 350 * time.Millisecond,
			MemoryUsage: 1 << 20, MemoryLimit: 4 << 20})
		src.set(SidecarStats{Pod: "web-2", Container: "mosn", CPUUsage: 2 * time.Second, MemoryUsage: 2 << 20})
		m := newMetrics(t, Options{Stats: src})
		const want = `
# HELP meshagent_sidecar_cpu_usage_seconds_total CPU time used by the sidecar's cgroup.
# TYPE meshagent_sidecar_cpu_usage_seconds_total counter
meshagent_sidecar_cpu_usage_seconds_total{container="envoy",pod="web-1"} 1.5
meshagent_sidecar_cpu_usage_seconds_total{container="mosn",pod="web-2"} 2
# HELP meshagent_sidecar_cpu_periods_total CFS enforcement periods elapsed for the sidecar's cgroup (those with a quota).
# TYPE meshagent_sidecar_cpu_periods_total counter
meshagent_sidecar_cpu_periods_total{container="envoy",pod="web-1"} 200
meshagent_sidecar_cpu_periods_total{container="mosn",pod="web-2"} 0
# HELP meshagent_sidecar_cpu_throttled_periods_total CFS periods in which the sidecar's cgroup was throttled.
# TYPE meshagent_sidecar_cpu_throttled_periods_total counter
meshagent_sidecar_cpu_throttled_periods_total{container="envoy",pod="web-1"} 7
meshagent_sidecar_cpu_throttled_periods_total{container="mosn",pod="web-2"} 0
# HELP meshagent_sidecar_cpu_throttled_seconds_total Time the sidecar's cgroup spent throttled.
# TYPE meshagent_sidecar_cpu_throttled_seconds_total counter
meshagent_sidecar_cpu_throttled_seconds_total{container="envoy",pod="web-1"} 0.35
meshagent_sidecar_cpu_throttled_seconds_total{container="mosn",pod="web-2"} 0
# HELP meshagent_sidecar_memory_usage_bytes Memory charged to the sidecar's cgroup.
# TYPE meshagent_sidecar_memory_usage_bytes gauge
meshagent_sidecar_memory_usage_bytes{container="envoy",pod="web-1"} 1.048576e+06
meshagent_sidecar_memory_usage_bytes{container="mosn",pod="web-2"} 2.097152e+06
# HELP meshagent_sidecar_memory_limit_bytes Memory limit of the sidecar's own cgroup, when it has one.
# TYPE meshagent_sidecar_memory_limit_bytes gauge
meshagent_sidecar_memory_limit_bytes{container="envoy",pod="web-1"} 4.194304e+06
# HELP meshagent_cgroup_stats_errors_total Scrapes in which reading the sidecars' cgroup stats failed or returned a sidecar twice.
# TYPE meshagent_cgroup_stats_errors_total counter
meshagent_cgroup_stats_errors_total 0
`
		if err := testutil.ScrapeAndCompare(serve(t, m), strings.NewReader(want),
			"meshagent_sidecar_cpu_usage_seconds_total", "meshagent_sidecar_cpu_periods_total",
			"meshagent_sidecar_cpu_throttled_periods_total", "meshagent_sidecar_cpu_throttled_seconds_total",
			"meshagent_sidecar_memory_usage_bytes", "meshagent_sidecar_memory_limit_bytes",
			"meshagent_cgroup_stats_errors_total"); err != nil {
			t.Fatal(err)
		}
	})

	tests := []struct {
		name       string
		setup      func(*fakeStats)
		wantMemory []string // pods with a memory series
		wantErrors float64
	}{
		{"error keeps partial stats", func(f *fakeStats) {
			f.set(SidecarStats{Pod: "a", Container: "envoy"})
			f.err = errors.New("read /sys/fs/cgroup/cpu/meshagent/b/envoy/cpu.stat: no such file")
		}, []string{"a"}, 1},
		{"duplicate sidecar served once", func(f *fakeStats) {
			f.set(SidecarStats{Pod: "a", Container: "envoy", MemoryUsage: 1})
			f.extra = []SidecarStats{{Pod: "a", Container: "envoy", MemoryUsage: 2}}
		}, []string{"a"}, 1},
		{"deadline", func(f *fakeStats) { f.block = true }, nil, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := newFakeStats()
			tt.setup(src)
			m := newMetrics(t, Options{Stats: src, StatsTimeout: 50 * time.Millisecond})
			url := serve(t, m)
			mfs := scrape(t, url)
			var pods []string
			for _, mt := range mfs["meshagent_sidecar_memory_usage_bytes"].GetMetric() {
				pods = append(pods, labelString(mt))
			}
			if len(pods) != len(tt.wantMemory) {
				t.Errorf("memory series %v, want pods %v", pods, tt.wantMemory)
			}
			if got := mfs["meshagent_cgroup_stats_errors_total"].GetMetric()[0].GetCounter().GetValue(); got != tt.wantErrors {
				t.Errorf("errors counter %g, want %g", got, tt.wantErrors)
			}
			// Up still works: the build info is served in the same scrape.
			if _, ok := mfs["meshagent_build_info"]; !ok {
				t.Error("scrape lost meshagent_build_info")
			}
		})
	}
}

func TestBuildInfo(t *testing.T) {
	m := newMetrics(t, Options{Version: "v1.2.3", Revision: "abc123"})
	want := `
# HELP meshagent_build_info Always 1; the labels say which meshagent build is running.
# TYPE meshagent_build_info gauge
meshagent_build_info{goversion="` + runtime.Version() + `",revision="abc123",version="v1.2.3"} 1
`
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(want), "meshagent_build_info"); err != nil {
		t.Fatal(err)
	}
	d := newMetrics(t, Options{})
	mt := findMetric(t, gather(t, d), "meshagent_build_info",
		`{goversion="`+runtime.Version()+`",revision="unknown",version="unknown"}`)
	if mt.GetGauge().GetValue() != 1 {
		t.Fatalf("build info value %g", mt.GetGauge().GetValue())
	}
}

func gather(t *testing.T, m *Metrics) map[string]*dto.MetricFamily {
	t.Helper()
	mfs, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

// TestStandardCollectors checks the agent's own process and Go runtime
// metrics are served.
func TestStandardCollectors(t *testing.T) {
	mfs := scrape(t, serve(t, newMetrics(t, Options{})))
	for _, name := range []string{"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "go_goroutines", "go_memstats_heap_inuse_bytes"} {
		if _, ok := mfs[name]; !ok {
			t.Errorf("%s missing", name)
		}
	}
}

// TestNamingConventions runs promlint (the checks behind `promtool check
// metrics`) over every family meshagent defines, with every one populated.
func TestNamingConventions(t *testing.T) {
	src := newFakeStats()
	m := newMetrics(t, Options{Stats: src})
	exerciseAll(m, src, "p")
	problems, err := testutil.GatherAndLint(m.Registry())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, "meshagent_") {
			t.Errorf("%s: %s", p.Metric, p.Text)
		}
	}
	for name := range gather(t, m) {
		if !strings.HasPrefix(name, "meshagent_") && !strings.HasPrefix(name, "process_") && !strings.HasPrefix(name, "go_") {
			t.Errorf("family %s has no meshagent_ prefix and is not a standard process/go metric", name)
		}
	}
}

// TestServe serves on a loopback port, scrapes, and checks Serve returns
// nil on cancellation without leaking fds or goroutines.
func TestServe(t *testing.T) {
	checkFDs(t)
	m := newMetrics(t, Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Serve(ctx, ln) }()

	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get("http://" + ln.Addr().String() + "/metrics")
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "meshagent_build_info{") {
		t.Errorf("GET /metrics: %s, body without build info", resp.Status)
	}
	resp, err = client.Get("http://" + ln.Addr().String() + "/other")
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET /other: %s, want 404", resp.Status)
		}
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve after cancel: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
	client.CloseIdleConnections()
	if _, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		t.Error("listener still accepts after Serve returned")
	}
}

// checkFDs fails the test if it ends with more open fds than it started
// with. Sockets are closed asynchronously by net/http's connection
// goroutines, so the count gets a second to come back down.
func checkFDs(t *testing.T) {
	t.Helper()
	before := openFDs(t)
	t.Cleanup(func() {
		after := openFDs(t)
		for deadline := time.Now().Add(time.Second); after > before && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
			after = openFDs(t)
		}
		if after != before {
			t.Errorf("open fds: %d before, %d after", before, after)
		}
	})
}

// TestExerciseCoversEveryMethod fails when Metrics gains a recording method
// that exerciseAll (and so the naming and dashboard checks) does not call.
func TestExerciseCoversEveryMethod(t *testing.T) {
	notRecorders := map[string]bool{"Handler": true, "Serve": true, "Registry": true, "ForgetPod": true}
	typ := reflect.TypeOf(&Metrics{})
	for i := range typ.NumMethod() {
		name := typ.Method(i).Name
		if !notRecorders[name] && !slices.Contains(recorders, name) {
			t.Errorf("method %s is not in recorders/exerciseAll", name)
		}
	}
	src := newFakeStats()
	m := newMetrics(t, Options{Stats: src})
	exerciseAll(m, src, "p")
	for name, mf := range gather(t, m) {
		if strings.HasPrefix(name, "meshagent_") && len(mf.GetMetric()) == 0 {
			t.Errorf("%s has no series after exerciseAll", name)
		}
	}
}
