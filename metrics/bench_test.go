package metrics

import (
	"compress/gzip"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"syscall"
	"testing"
	"time"
)

// BenchmarkScrape500Pods measures what one scrape of /metrics costs the
// agent on a node with 500 pods, each with every per-pod series populated
// (restarts by two causes, ready and gate gauges, a startup timeout, an OOM
// kill, a drift correction, held fds and cgroup stats). It reports the body
// size, the series count and the agent's CPU time (user+sys) per scrape next
// to the wall time per scrape.
//
//	go test -run '^$' -bench Scrape500Pods -benchtime 200x ./metrics
func BenchmarkScrape500Pods(b *testing.B) {
	const pods = 500
	src := newFakeStats()
	m := newMetrics(b, Options{Stats: src})
	for i := range pods {
		populatePod(m, src, "pod-"+itoa(i))
	}
	m.HandoffDone(KindUpgrade, OutcomeSuccess, "", time.Second)
	m.HandoffDone(KindHandoff, OutcomeSuccess, "", time.Second)
	h := m.Handler()

	for _, enc := range []struct {
		name, accept, encoding string
	}{
		{"text", "text/plain; version=0.0.4", ""},
		{"text-gzip", "text/plain; version=0.0.4", "gzip"},
		// What Prometheus 3 asks for by default.
		{"openmetrics", "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4", "gzip"},
	} {
		b.Run(enc.name, func(b *testing.B) {
			req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
			req.Header.Set("Accept", enc.accept)
			if enc.encoding != "" {
				req.Header.Set("Accept-Encoding", enc.encoding)
			}
			// One scrape outside the clock for the size and series count.
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != http.StatusOK {
				b.Fatalf("status %d", rec.Code)
			}
			size := rec.Body.Len()
			series := countSamples(b, rec)

			b.ReportAllocs()
			cpu0 := cpuTime(b)
			b.ResetTimer()
			for b.Loop() {
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, req)
			}
			b.StopTimer()
			cpu := cpuTime(b) - cpu0
			b.ReportMetric(float64(size), "bytes/scrape")
			b.ReportMetric(float64(series), "samples/scrape")
			b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/scrape")
		})
	}
}

// countSamples counts the sample lines of an exposition (gzipped or not).
func countSamples(b *testing.B, rec *httptest.ResponseRecorder) int {
	b.Helper()
	var r io.Reader = rec.Body
	if rec.Header().Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(rec.Body)
		if err != nil {
			b.Fatal(err)
		}
		r = zr
	}
	body, err := io.ReadAll(r)
	if err != nil {
		b.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(string(body), "\n") {
		if line != "" && !strings.HasPrefix(line, "#") {
			n++
		}
	}
	return n
}

// cpuTime is the process's user+system CPU time so far. The scrape runs in
// the benchmark goroutine plus the collector goroutines the registry starts,
// all in this process, so the difference over the loop is the agent's CPU
// cost of the scrapes (plus a little GC, which is part of the cost).
func cpuTime(b *testing.B) time.Duration {
	b.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
