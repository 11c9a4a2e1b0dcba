package critest_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/meshagent/meshagent/internal/critest"
	"github.com/meshagent/meshagent/internal/testimages"
)

// TestPodNetwork: PodNetwork pods get their own network namespace and
// address through the CI bridge, so two sidecars can both listen on 15021 (as
// every pod's proxy does on a real node) and the node reaches each one.
func TestPodNetwork(t *testing.T) {
	for _, lane := range []critest.Lane{critest.V2, critest.V16} {
		t.Run(lane.Arg, func(t *testing.T) {
			critest.CheckLeaks(t)
			rt := critest.Connect(t, critest.Socket(t, lane))
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			hostNet, err := os.Readlink("/proc/self/ns/net")
			if err != nil {
				t.Fatal(err)
			}
			seen := map[string]bool{}
			for i := 0; i < 2; i++ {
				dir := t.TempDir()
				pod := rt.StartPod(t, critest.PodSpec{
					Name:       "net",
					PodNetwork: true,
					Containers: []critest.ContainerSpec{{
						Name: "proxy", Image: testimages.Sidecar,
						Env:    map[string]string{"SIDECAR_PORT": "15021", "SIDECAR_READY_FILE": "/out/ready"},
						Mounts: []*runtimeapi.Mount{{ContainerPath: "/out", HostPath: dir}},
					}},
				})
				waitFor(t, func() bool { _, err := os.Stat(filepath.Join(dir, "ready")); return err == nil }, "sidecar ready file")
				ip, err := rt.PodIP(ctx, pod)
				if err != nil {
					t.Fatal(err)
				}
				if parsed := net.ParseIP(ip); parsed == nil || !parsed.IsPrivate() || seen[ip] {
					t.Fatalf("pod %d: IP %q, want a fresh private address (seen %v)", i, ip, seen)
				}
				seen[ip] = true

				pid, err := rt.PID(ctx, pod.ContainerID("proxy"))
				if err != nil {
					t.Fatal(err)
				}
				podNet, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
				if err != nil {
					t.Fatal(err)
				}
				if podNet == hostNet {
					t.Errorf("pod %d: sidecar shares the host network namespace %s", i, hostNet)
				}

				client := &http.Client{Timeout: 5 * time.Second}
				resp, err := client.Get("http://" + net.JoinHostPort(ip, "15021") + "/ready")
				if err != nil {
					t.Fatalf("pod %d: node cannot reach its sidecar: %v", i, err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					t.Errorf("pod %d: /ready = %d %q, want 200", i, resp.StatusCode, body)
				}
				client.CloseIdleConnections()
			}
		})
	}
}
