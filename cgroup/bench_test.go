package cgroup

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"
)

// BenchmarkReconcile500 is one reconcile pass over 500 pods that are
// already correct, on the real cgroup fs: each pod has a sidecar and an app
// container (1000 container groups), the sidecar with quota, shares, burst,
// period and a memory cap, the pod with its own CPU and memory limits.
// Target: ≤ 20 ms per pass, 0 writes.
//
//	go test -run '^$' -bench Reconcile500 -benchtime 50x ./cgroup
func BenchmarkReconcile500(b *testing.B) {
	m := needRealV1(b)
	m.log = slog.New(slog.DiscardHandler)
	const pods = 500
	base := fmt.Sprintf("b%d", time.Now().UnixNano()%1e6)
	targets := make([]Target, 0, pods)
	b.Cleanup(func() {
		for _, t := range targets {
			if err := m.Remove(t.PodGroup); err != nil {
				b.Errorf("cleanup: %v", err)
			}
		}
	})
	for i := 0; i < pods; i++ {
		pod := fmt.Sprintf("%s-%s-%d", podName(b), base, i)
		side, err := m.EnsureContainer(pod, "sidecar")
		if err != nil {
			b.Fatal(err)
		}
		app, err := m.EnsureContainer(pod, "app")
		if err != nil {
			b.Fatal(err)
		}
		pg, _ := HostPodGroup(pod)
		targets = append(targets, Target{Pod: pod, PodGroup: pg, Sidecar: Container{"sidecar", side},
			Apps: []Container{{"app", app}}, PodCPULimit: 1000, PodMemoryLimit: 256 << 20, OwnPod: true,
			Policy: Policy{CPU: CPUAmount{Millis: 200}, Burst: CPUAmount{Millis: 50}, MemoryMax: 128 << 20}})
	}
	ctx := context.Background()
	if r := m.Reconcile(ctx, targets); len(r.Errors) > 0 {
		b.Fatal(r.Errors[0])
	}
	var writes, checked int
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		r := m.Reconcile(ctx, targets)
		writes += r.Writes
		checked += r.Checked
	}
	el := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(el.Microseconds())/1000/float64(b.N), "ms/pass")
	b.ReportMetric(float64(writes)/float64(b.N), "writes/pass")
	b.ReportMetric(float64(checked)/float64(b.N), "reads/pass")
	if writes != 0 {
		b.Fatalf("%d writes over %d passes of an already-correct tree, want 0", writes, b.N)
	}
}
