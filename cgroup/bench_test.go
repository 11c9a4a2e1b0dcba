package cgroup

import (
	"context"
	"fmt"
	"log/slog"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkReconcile500 is one reconcile pass over 500 pods that are
// already correct, on the real cgroup fs: each pod has a sidecar and an app
// container (1000 container groups), the sidecar with quota, shares, burst,
// period and a memory cap, the pod with its own CPU and memory limits.
// The groups hold no processes, so no oom_score_adj is checked (see
// BenchmarkReconcile500Procs). Target: ≤ 20 ms per pass, 0 writes.
//
//	go test -run '^$' -bench Reconcile500 -benchtime 50x ./cgroup
func BenchmarkReconcile500(b *testing.B) {
	benchReconcile(b, false)
}

// BenchmarkReconcile500Procs is the same pass with a process in every
// container group, as in production: each pass also lists both groups of
// every pod and checks the oom_score_adj of the sidecar (and reads the
// app's, which the sidecar's follows).
func BenchmarkReconcile500Procs(b *testing.B) {
	benchReconcile(b, true)
}

func benchReconcile(b *testing.B, procs bool) {
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
	var cmds []*exec.Cmd
	b.Cleanup(func() { // before the groups are removed (cleanups run last first)
		for _, c := range cmds {
			c.Process.Kill()
			c.Wait()
		}
	})
	enter := func(g Group) {
		c := exec.Command("sleep", "3600")
		if err := c.Start(); err != nil {
			b.Fatal(err)
		}
		cmds = append(cmds, c)
		files, err := m.ProcsFiles(g)
		if err != nil {
			b.Fatal(err)
		}
		for _, f := range files {
			if err := writeSmall(f, strconv.Itoa(c.Process.Pid)); err != nil {
				b.Fatal(err)
			}
		}
	}
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
		if procs {
			enter(side)
			enter(app)
		}
	}
	ctx := context.Background()
	if r := m.Reconcile(ctx, targets); len(r.Errors) > 0 {
		b.Fatal(r.Errors[0])
	}
	var writes, checked int
	b.ResetTimer()
	cpu0 := cpuTime(b)
	start := time.Now()
	for i := 0; i < b.N; i++ {
		r := m.Reconcile(ctx, targets)
		writes += r.Writes
		checked += r.Checked
	}
	el := time.Since(start)
	cpu := cpuTime(b) - cpu0
	b.StopTimer()
	b.ReportMetric(float64(el.Microseconds())/1000/float64(b.N), "ms/pass")
	// CPU time (user+system, every thread) next to the wall time: on a
	// shared machine it moves far less with the neighbours' load.
	b.ReportMetric(float64(cpu.Microseconds())/1000/float64(b.N), "cpu-ms/pass")
	b.ReportMetric(float64(writes)/float64(b.N), "writes/pass")
	b.ReportMetric(float64(checked)/float64(b.N), "reads/pass")
	if writes != 0 {
		b.Fatalf("%d writes over %d passes of an already-correct tree, want 0", writes, b.N)
	}
}

// cpuTime is the CPU time the process has used, user and system.
func cpuTime(b *testing.B) time.Duration {
	b.Helper()
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatalf("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
