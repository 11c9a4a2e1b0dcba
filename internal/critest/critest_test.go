package critest_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/meshagent/meshagent/internal/critest"
	"github.com/meshagent/meshagent/internal/testimages"
)

// TestPodLifecycle runs a two-container pod through the CRI API on each lane,
// checks that the app really ran (it wrote its start line into a host
// mount), stops the sidecar, removes the pod and checks that no pod cgroup
// folder is left.
func TestPodLifecycle(t *testing.T) {
	for _, lane := range []critest.Lane{critest.V2, critest.V16} {
		t.Run(lane.Arg, func(t *testing.T) {
			critest.CheckLeaks(t)
			rt := critest.Connect(t, critest.Socket(t, lane))
			out := t.TempDir()
			pod, err := func() (*critest.Pod, error) {
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				return rt.RunPod(ctx, critest.PodSpec{
					Name:        critest.UniqueName("lifecycle"),
					Annotations: map[string]string{"meshagent.io/sidecars": "proxy"},
					Containers: []critest.ContainerSpec{
						{Name: "proxy", Image: testimages.Sidecar, Env: map[string]string{"SIDECAR_PORT": "0"}},
						{
							Name: "app", Image: testimages.App,
							Env:    map[string]string{"APP_START_FILE": "/out/start", "APP_NAME": "app"},
							Mounts: []*runtimeapi.Mount{{ContainerPath: "/out", HostPath: out}},
						},
					},
				})
			}()
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()

			for _, c := range pod.Containers {
				st, err := rt.ContainerState(ctx, c.ID)
				if err != nil {
					t.Fatal(err)
				}
				if st != runtimeapi.ContainerState_CONTAINER_RUNNING {
					t.Errorf("container %s: state %v, want running", c.Name, st)
				}
			}
			waitFor(t, func() bool {
				b, _ := os.ReadFile(filepath.Join(out, "start"))
				return strings.HasSuffix(string(b), " app\n")
			}, "app to record its start")

			// The pod's annotations come back through the CRI API.
			resp, err := rt.RS.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: pod.SandboxID})
			if err != nil {
				t.Fatal(err)
			}
			if got := resp.GetStatus().GetAnnotations()["meshagent.io/sidecars"]; got != "proxy" {
				t.Errorf("sandbox annotation meshagent.io/sidecars = %q, want proxy", got)
			}

			if err := rt.StopContainer(ctx, pod.ContainerID("proxy"), 10*time.Second); err != nil {
				t.Fatal(err)
			}
			if st, err := rt.ContainerState(ctx, pod.ContainerID("proxy")); err != nil || st != runtimeapi.ContainerState_CONTAINER_EXITED {
				t.Errorf("proxy after StopContainer: state %v (%v), want exited", st, err)
			}

			var dirs []string
			for _, hier := range []string{"memory", "cpu", "pids", "systemd", "unified"} {
				dirs = append(dirs, filepath.Join("/sys/fs/cgroup", hier, pod.CgroupParent))
			}
			present := 0
			for _, d := range dirs {
				if _, err := os.Stat(d); err == nil {
					present++
				}
			}
			if present == 0 {
				t.Errorf("no pod cgroup folder %s found while the pod runs: is the cgroup parent ignored?", pod.CgroupParent)
			}
			if err := rt.RemovePod(ctx, pod); err != nil {
				t.Fatal(err)
			}
			for _, d := range dirs {
				if _, err := os.Stat(d); err == nil {
					t.Errorf("pod cgroup folder %s left after RemovePod", d)
				}
			}
		})
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
