package metrics

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// StatsSource is what the agent implements to feed the sidecars' cgroup
// figures into a scrape. SidecarStats returns the current stats of every
// sidecar it supervises; it is called once per scrape, with a deadline.
// On error the stats it did return are still served and
// meshagent_cgroup_stats_errors_total is incremented.
type StatsSource interface {
	SidecarStats(ctx context.Context) ([]SidecarStats, error)
}

// SidecarStats is one sidecar's cgroup accounting, read from cpuacct.usage /
// cpu.stat and memory.usage_in_bytes (v1) or cpu.stat and memory.current (v2).
type SidecarStats struct {
	Pod, Container string

	CPUUsage         time.Duration // cumulative CPU time of the sidecar's cgroup
	Periods          uint64        // CFS enforcement periods elapsed (nr_periods)
	ThrottledPeriods uint64        // periods in which it was throttled (nr_throttled)
	ThrottledTime    time.Duration // cumulative time throttled
	MemoryUsage      uint64        // bytes
	MemoryLimit      uint64        // bytes; 0 means no limit of its own (series omitted)
}

// statsCollector turns a StatsSource into const metrics at scrape time, so
// there is nothing to keep in sync when sidecars come and go.
type statsCollector struct {
	src     StatsSource
	timeout time.Duration
	errors  prometheus.Counter

	cpu, periods, throttledPeriods, throttledTime, mem, memLimit *prometheus.Desc
}

func newStatsCollector(src StatsSource, timeout time.Duration) *statsCollector {
	l := []string{"pod", "container"}
	return &statsCollector{
		src:     src,
		timeout: timeout,
		errors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshagent_cgroup_stats_errors_total",
			Help: "Scrapes in which reading the sidecars' cgroup stats failed or returned a sidecar twice.",
		}),
		cpu: prometheus.NewDesc("meshagent_sidecar_cpu_usage_seconds_total",
			"CPU time used by the sidecar's cgroup.", l, nil),
		periods: prometheus.NewDesc("meshagent_sidecar_cpu_periods_total",
			"CFS enforcement periods elapsed for the sidecar's cgroup (those with a quota).", l, nil),
		throttledPeriods: prometheus.NewDesc("meshagent_sidecar_cpu_throttled_periods_total",
			"CFS periods in which the sidecar's cgroup was throttled.", l, nil),
		throttledTime: prometheus.NewDesc("meshagent_sidecar_cpu_throttled_seconds_total",
			"Time the sidecar's cgroup spent throttled.", l, nil),
		mem: prometheus.NewDesc("meshagent_sidecar_memory_usage_bytes",
			"Memory charged to the sidecar's cgroup.", l, nil),
		memLimit: prometheus.NewDesc("meshagent_sidecar_memory_limit_bytes",
			"Memory limit of the sidecar's own cgroup, when it has one.", l, nil),
	}
}

func (c *statsCollector) Describe(ch chan<- *prometheus.Desc) {
	c.errors.Describe(ch)
	for _, d := range []*prometheus.Desc{c.cpu, c.periods, c.throttledPeriods, c.throttledTime, c.mem, c.memLimit} {
		ch <- d
	}
}

func (c *statsCollector) Collect(ch chan<- prometheus.Metric) {
	if c.src != nil {
		c.collectStats(ch)
	}
	c.errors.Collect(ch)
}

func (c *statsCollector) collectStats(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	stats, err := c.src.SidecarStats(ctx)
	if err != nil {
		c.errors.Inc()
	}
	// The registry rejects a scrape holding the same series twice; a source
	// that lists a sidecar twice loses the duplicate, not the whole scrape.
	type key struct{ pod, container string }
	seen := make(map[key]struct{}, len(stats))
	dup := false
	for _, s := range stats {
		pod, container := label(s.Pod), label(s.Container)
		k := key{pod, container}
		if _, ok := seen[k]; ok {
			dup = true
			continue
		}
		seen[k] = struct{}{}
		ch <- prometheus.MustNewConstMetric(c.cpu, prometheus.CounterValue, s.CPUUsage.Seconds(), pod, container)
		ch <- prometheus.MustNewConstMetric(c.periods, prometheus.CounterValue, float64(s.Periods), pod, container)
		ch <- prometheus.MustNewConstMetric(c.throttledPeriods, prometheus.CounterValue, float64(s.ThrottledPeriods), pod, container)
		ch <- prometheus.MustNewConstMetric(c.throttledTime, prometheus.CounterValue, s.ThrottledTime.Seconds(), pod, container)
		ch <- prometheus.MustNewConstMetric(c.mem, prometheus.GaugeValue, float64(s.MemoryUsage), pod, container)
		if s.MemoryLimit > 0 {
			ch <- prometheus.MustNewConstMetric(c.memLimit, prometheus.GaugeValue, float64(s.MemoryLimit), pod, container)
		}
	}
	if dup && err == nil {
		c.errors.Inc()
	}
}
