package agent

import (
	"context"
	"io"
	"log/slog"
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
