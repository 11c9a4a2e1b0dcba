package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"testing"

	"github.com/containerd/nri/pkg/api"
)

// BenchmarkNRICreateContainer is the time meshagent holds a container
// start on the node: one CreateContainer call for a sidecar with a CPU
// policy (containerd's request timeout is 2 s).
func BenchmarkNRICreateContainer(b *testing.B) {
	dir := b.TempDir()
	cfg := &Config{Node: Node{AdminSocket: dir + "/admin.sock", StateDir: dir + "/state", MetricsAddr: "off"}}
	cfg.setDefaults()
	a, err := New(cfg, WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	if err != nil {
		b.Fatal(err)
	}
	pod := &api.PodSandbox{Id: "p", Name: "web", Namespace: "default", Annotations: map[string]string{
		AnnotationSidecarContainers: "proxy", "sidecar.meshagent.io/cpu": "25%"},
		Linux: &api.LinuxPodSandbox{PodResources: &api.LinuxResources{Cpu: &api.LinuxCPU{
			Quota: api.Int64(200000), Period: api.UInt64(100000)}}}}
	ctr := &api.Container{Id: "c", Name: "proxy", Linux: &api.LinuxContainer{OomScoreAdj: api.Int(300)}}
	b.ReportAllocs()
	for b.Loop() {
		adj, _, err := a.nri.CreateContainer(context.Background(), pod, ctr)
		if err != nil || adj == nil {
			b.Fatal("no adjustment", err)
		}
	}
}

// BenchmarkHostStart is the time from Start to the command running, for a
// sidecar without and with the cgroup policy (group placement and
// oom_score_adj in the exec shim, pod values applied before it runs).
func BenchmarkHostStart(b *testing.B) {
	for _, cg := range []bool{false, true} {
		name := "plain"
		if cg {
			name = "cgroups"
		}
		b.Run(name, func(b *testing.B) {
			if cg && os.Geteuid() != 0 {
				b.Skip("needs root to create cgroups")
			}
			dir := b.TempDir()
			pod := PodSpec{Name: fmt.Sprintf("bench-%d", os.Getpid()), Resources: PodResources{CPU: "1"},
				SidecarPolicy: map[string]string{"cpu": "200m"},
				Containers:    []ContainerSpec{{Name: "proxy", Role: RoleSidecar, Command: "/bin/true"}}}
			cfg := &Config{Node: Node{AdminSocket: dir + "/admin.sock", StateDir: dir + "/state", MetricsAddr: "off"},
				Pods: []PodSpec{pod}}
			cfg.setDefaults()
			opts := []Option{WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))}
			if cg {
				opts = append(opts, WithCgroups())
			}
			a, err := New(cfg, opts...)
			if err != nil {
				b.Fatal(err)
			}
			if cg && a.cg.m == nil {
				b.Fatal("cgroups off: ", a.cg.off)
			}
			p, c := &cfg.Pods[0], &cfg.Pods[0].Containers[0]
			b.Cleanup(func() {
				if a.cg != nil && a.cg.m != nil {
					a.cg.removePod(p.Name)
					a.cg.w.Close()
					a.cg.m.Close()
				}
			})
			for b.Loop() {
				proc, err := a.rt.Start(context.Background(), p, c)
				if err != nil {
					b.Fatal(err)
				}
				<-proc.Done()
			}
		})
	}
}
