package agent

import (
	"context"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkAgentScrape500Pods: one scrape of /metrics through the admin
// socket of a running agent whose metrics hold 500 pods' series, fed
// through the agent's own event path (a restart of each cause, ready,
// gate-open, a startup timeout, an OOM kill). Reports the body size and the
// agent process's CPU per scrape (the client runs in the same process, so
// this is an upper bound).
//
//	go test -run '^$' -bench AgentScrape500Pods -benchtime 20x ./agent
func BenchmarkAgentScrape500Pods(b *testing.B) {
	a, stop := benchAgent(b, &eventRecorder{}, nil)
	defer stop()
	now := time.Now()
	for i := range 500 {
		pod := "pod-" + strconv.Itoa(i)
		sc := map[string]string{"role": string(RoleSidecar)}
		for _, cause := range []string{CauseCrash, CauseHang, CauseOperator} {
			a.record(Event{Time: now, Pod: pod, Container: "proxy", Type: EvRestart, Fields: map[string]string{"cause": cause, "role": "sidecar"}})
		}
		a.record(Event{Time: now, Pod: pod, Container: "proxy", Type: EvState, From: StateRunning, To: StateReady, Fields: sc})
		a.record(Event{Time: now, Pod: pod, Container: "proxy", Type: "ready", Duration: 40 * time.Millisecond})
		a.record(Event{Time: now, Pod: pod, Type: EvGateOpen, Duration: 45 * time.Millisecond})
		a.record(Event{Time: now, Pod: pod, Type: EvStartupTimeout, Fields: map[string]string{"policy": FailOpen}})
		a.record(Event{Time: now, Pod: pod, Container: "app", Type: EvOOMKill, Fields: map[string]string{"role": "app"}})
	}
	c := NewClient(a.config().Node.AdminSocket)
	body, err := c.Metrics(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	cpu0 := selfCPU()
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.Metrics(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(len(body)), "bytes/scrape")
	b.ReportMetric(float64((selfCPU()-cpu0).Microseconds())/float64(b.N), "cpu-µs/scrape")
}

func selfCPU() time.Duration {
	var ru unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
