package metrics

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	// Start the runtime's network poller (an epoll fd and an eventfd kept
	// for the life of the process) before any test counts fds.
	if c, err := net.ListenPacket("udp", "127.0.0.1:0"); err == nil {
		c.Close()
	}
	goleak.VerifyTestMain(m)
}

// fakeStats is a StatsSource over a map: the agent's real source reads
// cgroup files, which is the cgroup package's business; here only the
// collector's logic is under test.
type fakeStats struct {
	mu    sync.Mutex
	stats map[string]SidecarStats // by pod/container
	extra []SidecarStats          // appended as is (duplicates)
	err   error
	block bool // wait for the deadline, then fail with it
}

func newFakeStats() *fakeStats { return &fakeStats{stats: map[string]SidecarStats{}} }

func (f *fakeStats) set(s SidecarStats) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stats[s.Pod+"/"+s.Container] = s
}

func (f *fakeStats) removePod(pod string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for k, s := range f.stats {
		if s.Pod == pod {
			delete(f.stats, k)
		}
	}
}

func (f *fakeStats) SidecarStats(ctx context.Context) ([]SidecarStats, error) {
	f.mu.Lock()
	block := f.block
	f.mu.Unlock()
	if block {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]SidecarStats, 0, len(f.stats)+len(f.extra))
	for _, s := range f.stats {
		out = append(out, s)
	}
	return append(out, f.extra...), f.err
}

func newMetrics(t testing.TB, opts Options) *Metrics {
	t.Helper()
	m, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return m
}

// populatePod records every per-pod event once for pod, with one sidecar
// "envoy" and one app "app", the shape of a typical mesh pod.
func populatePod(m *Metrics, src *fakeStats, pod string) {
	m.SidecarRestart(pod, "envoy", CauseCrash)
	m.SidecarRestart(pod, "envoy", CauseOOM)
	m.SidecarReady(pod, "envoy", 1200*time.Millisecond)
	m.AppsGated(pod, 1250*time.Millisecond)
	m.StartupTimeout(pod, PolicyFailOpen)
	m.OOMKill(pod, "envoy", RoleSidecar)
	m.DriftCorrected(pod, "envoy", "cpu.cfs_quota_us")
	m.FDsHeld(pod, "envoy", 2)
	m.SidecarStatus(pod, "envoy", true, false)
	if src != nil {
		src.set(SidecarStats{
			Pod: pod, Container: "envoy",
			CPUUsage: 12 * time.Second, Periods: 1000, ThrottledPeriods: 10,
			ThrottledTime: 500 * time.Millisecond, MemoryUsage: 64 << 20, MemoryLimit: 256 << 20,
		})
	}
}

// recorders lists the exported methods of Metrics that record something;
// TestExerciseCoversEveryMethod keeps exerciseAll in step with it.
var recorders = []string{
	"SidecarRestart", "SidecarReady", "AppsGated", "StartupTimeout", "OOMKill",
	"DriftCorrected", "FDsHeld", "HandoffDone", "SidecarStatus", "ConfigReload", "Switch",
}

// exerciseAll calls every recording method at least once (populatePod for
// pod, plus the fleet-wide ones), so every family has a series.
func exerciseAll(m *Metrics, src *fakeStats, pod string) {
	populatePod(m, src, pod)
	m.HandoffDone(KindUpgrade, OutcomeSuccess, "", time.Second)
	m.ConfigReload(nil)
	m.Switch("auto-restart", true)
}

// scrape fetches /metrics from url in the text format and parses it.
func scrape(t testing.TB, url string) map[string]*dto.MetricFamily {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "text/plain; version=0.0.4")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: status %s", url, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse scrape of %s: %v", url, err)
	}
	return mfs
}

func serve(t testing.TB, m *Metrics) string {
	t.Helper()
	srv := httptest.NewServer(m.Handler())
	t.Cleanup(srv.Close)
	return srv.URL + "/metrics"
}

// seriesWithLabel lists "family{labels}" for every series in mfs that has
// the label name=value (value "" matches any value).
func seriesWithLabel(mfs map[string]*dto.MetricFamily, name, value string) []string {
	var out []string
	for fam, mf := range mfs {
		for _, mt := range mf.GetMetric() {
			for _, lp := range mt.GetLabel() {
				if lp.GetName() == name && (value == "" || lp.GetValue() == value) {
					out = append(out, fam+labelString(mt))
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

func labelString(mt *dto.Metric) string {
	var parts []string
	for _, lp := range mt.GetLabel() {
		parts = append(parts, fmt.Sprintf("%s=%q", lp.GetName(), lp.GetValue()))
	}
	return "{" + strings.Join(parts, ",") + "}"
}

func countSeries(mfs map[string]*dto.MetricFamily) int {
	n := 0
	for _, mf := range mfs {
		n += len(mf.GetMetric())
	}
	return n
}

// openFDs counts this process's open file descriptors.
func openFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("count fds: %v", err)
	}
	return len(ents)
}
