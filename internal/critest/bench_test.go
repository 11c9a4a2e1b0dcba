package critest_test

import (
	"context"
	"testing"
	"time"

	"github.com/meshagent/meshagent/internal/critest"
	"github.com/meshagent/meshagent/internal/testimages"
)

// BenchmarkPodStart measures what kubelet waits for when it starts a pod:
// RunPodSandbox, then CreateContainer+StartContainer for a sidecar and an app
// (ns/op is one whole pod). Removal is not timed.
//
//	go test -run '^$' -bench PodStart -benchtime 20x ./internal/critest/
func BenchmarkPodStart(b *testing.B) {
	for _, lane := range []critest.Lane{critest.V2, critest.V16} {
		b.Run(lane.Arg, func(b *testing.B) {
			rt := critest.Connect(b, critest.Socket(b, lane))
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			for i := 0; i < b.N; i++ {
				pod, err := rt.RunPod(ctx, critest.PodSpec{
					Name: critest.UniqueName("bench"),
					Containers: []critest.ContainerSpec{
						{Name: "proxy", Image: testimages.Sidecar, Env: map[string]string{"SIDECAR_PORT": "0"}},
						{Name: "app", Image: testimages.App},
					},
				})
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if err := rt.RemovePod(ctx, pod); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}
