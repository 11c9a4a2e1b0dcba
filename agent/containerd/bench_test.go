package containerd_test

import (
	"context"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/meshagent/meshagent/agent/containerd"
	"github.com/meshagent/meshagent/internal/critest"
)

// BenchmarkDiscovery starts MESHAGENT_BENCH_PODS pods (default 100; a
// sidecar and an app each) and then measures, per lane, Snapshot (one
// complete pod model: containerd listing plus CRI join) and FirstSync (a fresh
// client's Run from start to its first Synced event: the time from agent start
// to a complete pod model). Run it with
//
//	go test -run '^$' -bench Discovery -benchtime 10x ./agent/containerd/
func BenchmarkDiscovery(b *testing.B) {
	n := 100
	if v := os.Getenv("MESHAGENT_BENCH_PODS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			b.Fatalf("MESHAGENT_BENCH_PODS=%q: want a positive integer", v)
		}
	}
	for _, lane := range lanes {
		b.Run(lane.Arg, func(b *testing.B) {
			sock := critest.Socket(b, lane)
			rt := critest.Connect(b, sock)
			dir := podDir(b.TempDir()) // ready files are per container name; unused here
			// Four at a time: faster setup without starving the daemon.
			var wg sync.WaitGroup
			sem := make(chan struct{}, 4)
			errs := make(chan error, n)
			for i := 0; i < n; i++ {
				wg.Add(1)
				sem <- struct{}{}
				go func() {
					defer wg.Done()
					defer func() { <-sem }()
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
					defer cancel()
					pod, err := rt.RunPod(ctx, critest.PodSpec{
						Name:        critest.UniqueName("bench"),
						Annotations: map[string]string{containerd.AnnotationSidecars: "proxy"},
						Containers:  []critest.ContainerSpec{dir.sidecar("proxy", nil), dir.app("app")},
					})
					if err != nil {
						errs <- err
						return
					}
					b.Cleanup(func() { _ = rt.RemovePod(context.Background(), pod) })
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				b.Fatal(err)
			}

			b.Run("Snapshot", func(b *testing.B) {
				c := newClientB(b, sock)
				for i := 0; i < b.N; i++ {
					pods, err := c.Snapshot(context.Background())
					if err != nil {
						b.Fatal(err)
					}
					if len(pods) < n {
						b.Fatalf("snapshot has %d pods, want at least %d", len(pods), n)
					}
				}
			})
			b.Run("FirstSync", func(b *testing.B) {
				for i := 0; i < b.N; i++ {
					c := newClientB(b, sock)
					ctx, cancel := context.WithCancel(context.Background())
					synced := make(chan int, 1)
					done := make(chan error, 1)
					go func() {
						done <- c.Run(ctx, func(e containerd.Event) {
							if e.Kind == containerd.Synced {
								select {
								case synced <- len(e.Pods):
								default:
								}
							}
						})
					}()
					if got := <-synced; got < n {
						b.Fatalf("first sync has %d pods, want at least %d", got, n)
					}
					b.StopTimer()
					cancel()
					<-done
					c.Close()
					b.StartTimer()
				}
			})
		})
	}
}

func newClientB(b *testing.B, sock string) *containerd.Client {
	b.Helper()
	c, err := containerd.New(sock)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}
