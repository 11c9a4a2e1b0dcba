package metrics_test

import (
	"context"
	"net"
	"net/http"
	"time"

	"github.com/meshagent/meshagent/metrics"
)

// sidecars is the agent's side of StatsSource: it reads the cgroup stats of
// every sidecar it supervises.
type sidecars struct{}

func (sidecars) SidecarStats(ctx context.Context) ([]metrics.SidecarStats, error) {
	return []metrics.SidecarStats{{Pod: "web-1", Container: "envoy", CPUUsage: 3 * time.Second, MemoryUsage: 48 << 20}}, nil
}

// How the agent wires metrics: one Metrics, served on the admin socket's mux
// and on its own TCP listener, fed by supervisor events.
func Example() {
	m, err := metrics.New(metrics.Options{Version: "v0.1.0", Stats: sidecars{}})
	if err != nil {
		panic(err)
	}
	admin := http.NewServeMux()
	admin.Handle("GET /metrics", m.Handler()) // on the admin unix socket

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if ln, err := net.Listen("tcp", metrics.DefaultAddr); err == nil {
		go func() { _ = m.Serve(ctx, ln) }()
	}

	// Supervisor events:
	m.SidecarReady("web-1", "envoy", 1200*time.Millisecond)
	m.AppsGated("web-1", 1210*time.Millisecond)
	m.SidecarStatus("web-1", "envoy", true, false)
	m.SidecarRestart("web-1", "envoy", metrics.CauseCrash)
	// The pod is gone and its supervisor has stopped:
	m.ForgetPod("web-1")
}
