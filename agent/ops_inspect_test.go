package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestInspectCleanNodeHasNoFindings(t *testing.T) {
	h := newHostPod(t, "web", nil)
	h.spec.Containers[0].Version = "1.2.3"
	h.spec.Containers[0].VersionCommand = []string{"/bin/sh", "-c", `test -n "$MESHAGENT_PID" && echo 1.2.3`}
	h.spec.Containers[1].Version = "ok"
	h.spec.Containers[1].VersionURL = "" // declared, no way to read it: skipped
	cfg := testConfig(t, h.spec)
	cfg.Node.Inspect.FSMaxUsedPercent = 100
	ra := startAgent(t, cfg)
	ra.waitPhase(t, "web", PhaseRunning)
	eventually(t, 5*time.Second, "proxy ready", func() bool { return ra.container(t, "web", "proxy").Ready })

	rep, err := NewClient(ra.socket).Inspect(context.Background())
	require.NoError(t, err)
	assert.Equal(t, []string{"version", "crash-loop", "log-volume", "fd-store", "upgrade"}, rep.Checks)
	assert.Empty(t, rep.Findings)
}

func TestInspectFindsEachInjectedFault(t *testing.T) {
	h := newHostPod(t, "web", nil)
	h.spec.Containers[0].Version = "2.0"
	// The test sidecar answers every path with "ok <pid>".
	h.spec.Containers[0].VersionURL = "http://" + h.addr + "/version"
	h.spec.Containers[1].Version = "1.2.3"
	h.spec.Containers[1].VersionCommand = []string{"/bin/sh", "-c", "echo 1.2.4; echo more"}
	loop := PodSpec{Name: "loop", Containers: []ContainerSpec{{
		Name: "flappy", Role: RoleSidecar, Command: "/bin/sh", Args: []string{"-c", "exit 1"},
		Restart: RestartPolicy{InitialBackoff: Duration(time.Millisecond), MaxBackoff: Duration(5 * time.Millisecond),
			MaxRestarts: 2, Window: Duration(time.Minute)},
	}}}
	cfg := testConfig(t, h.spec, loop)
	cfg.Node.Inspect = InspectPolicy{LogMaxBytes: 1 << 20, FSMaxUsedPercent: 1}
	ra := startAgent(t, cfg)
	ra.waitPhase(t, "web", PhaseRunning)
	eventually(t, 5*time.Second, "web ready", func() bool {
		return ra.container(t, "web", "proxy").Ready && ra.container(t, "web", "app").PID != 0
	})
	eventually(t, 10*time.Second, "crash loop", func() bool { return ra.container(t, "loop", "flappy").CrashLoop })
	big := filepath.Join(cfg.Node.StateDir, "logs", "web", "app.log.1")
	require.NoError(t, os.WriteFile(big, make([]byte, 2<<20), 0o600))

	rep, err := NewClient(ra.socket).Inspect(context.Background())
	require.NoError(t, err)
	byKey := map[string]Finding{}
	for _, f := range rep.Findings {
		byKey[f.Check+" "+f.Pod+"/"+f.Container] = f
	}
	require.Len(t, rep.Findings, 5, "%+v", rep.Findings)

	f := byKey["version web/proxy"]
	assert.Equal(t, "2.0", f.Expected)
	assert.Regexp(t, `^ok \d+$`, f.Found)
	f = byKey["version web/app"]
	assert.Equal(t, "1.2.3", f.Expected)
	assert.Equal(t, "1.2.4", f.Found, "first line of the output")

	f = byKey["crash-loop loop/flappy"]
	assert.Equal(t, "at most 2 restarts within 1m0s", f.Expected)
	assert.Contains(t, f.Found, "sidecar in a crash loop")
	assert.Contains(t, f.Found, "exit status 1")

	f = byKey["log-volume web/app"]
	assert.Equal(t, "logs at most 1.0 MiB", f.Expected)
	assert.Contains(t, f.Found, "2.0 MiB in ")

	f = byKey["log-volume /"]
	assert.Equal(t, "log filesystem at most 1% used", f.Expected)
	assert.Regexp(t, `^\d+% used \(`, f.Found)
}

type stubCheck struct {
	findings []Finding
	err      error
}

func (stubCheck) Name() string { return "stub" }
func (c stubCheck) Check(context.Context, *NodeView) ([]Finding, error) {
	return c.findings, c.err
}

func TestInspectRunsAddedChecks(t *testing.T) {
	cfg := testConfig(t)
	cfg.Node.Inspect.FSMaxUsedPercent = 100
	ra := startAgent(t, cfg,
		WithCheck(stubCheck{findings: []Finding{{Pod: "web", Container: "proxy", Expected: "listening", Found: "closed"}}}),
		WithCheck(stubCheck{err: errors.New("store unreachable")}))
	rep := ra.Inspect(context.Background())
	assert.Equal(t, []string{"version", "crash-loop", "log-volume", "fd-store", "upgrade", "stub", "stub"}, rep.Checks)
	assert.Equal(t, []Finding{
		{Check: "stub", Pod: "web", Container: "proxy", Expected: "listening", Found: "closed"},
		{Check: "stub", Expected: "the check runs", Found: "check failed: store unreachable"},
	}, rep.Findings)
}
