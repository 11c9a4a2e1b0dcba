package cgroup

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshagent/meshagent/internal/execshim"
)

func TestOpenDetectsHostMode(t *testing.T) {
	m := needRealV1(t)
	// This machine mounts v2 at /sys/fs/cgroup/unified next to v1.
	want := ModeV1
	if isCgroupFS(filepath.Join(DefaultRoot, "unified")) {
		want = ModeHybrid
	}
	if m.Mode() != want {
		t.Fatalf("Mode() = %s, want %s", m.Mode(), want)
	}
}

func TestOpenErrors(t *testing.T) {
	if _, err := Open(Options{Root: t.TempDir()}); !errors.Is(err, ErrNoCgroups) {
		t.Fatalf("Open(empty dir) error = %v, want ErrNoCgroups", err)
	}
	if _, err := Open(Options{Root: t.TempDir(), Mode: Mode(9)}); err == nil || !strings.Contains(err.Error(), "unknown mode 9") {
		t.Fatalf("Open(mode 9) error = %v", err)
	}
}

func TestEnsureAndRemoveHostGroups(t *testing.T) {
	m := needRealV1(t)
	pod, pg, gs := testPod(t, m, "sidecar", "app")
	for _, c := range v1Controllers {
		for _, g := range []Group{pg, gs["sidecar"], gs["app"]} {
			d := filepath.Join(DefaultRoot, c, string(g))
			if !exists(filepath.Join(d, "cgroup.procs")) {
				t.Fatalf("%s: group %s not created", c, d)
			}
		}
	}
	if want := Group("meshagent/" + pod + "/sidecar"); gs["sidecar"] != want {
		t.Fatalf("sidecar group = %s, want %s", gs["sidecar"], want)
	}
	// Idempotent.
	if _, err := m.EnsureContainer(pod, "sidecar"); err != nil {
		t.Fatal(err)
	}
	files, err := m.ProcsFiles(gs["app"])
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 3 {
		t.Fatalf("ProcsFiles = %v, want one per controller", files)
	}
	if err := m.Remove(pg); err != nil {
		t.Fatal(err)
	}
	for _, c := range v1Controllers {
		if exists(filepath.Join(DefaultRoot, c, string(pg))) {
			t.Fatalf("%s: pod group still there after Remove", c)
		}
	}
	if err := m.Remove(pg); err != nil {
		t.Fatalf("Remove of a missing group: %v", err)
	}
}

func TestBadNames(t *testing.T) {
	m, err := Open(Options{Root: t.TempDir(), Mode: ModeV1})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ pod, ctr, want string }{
		{"", "x", `invalid pod name ""`},
		{"a/b", "x", `invalid pod name "a/b"`},
		{"..", "x", `invalid pod name ".."`},
		{"web", "../x", `pod web: invalid container name "../x"`},
	} {
		if _, err := m.EnsureContainer(tc.pod, tc.ctr); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("EnsureContainer(%q, %q) error = %v, want %q", tc.pod, tc.ctr, err, tc.want)
		}
	}
	if _, err := m.ProcsFiles("../etc"); err == nil {
		t.Error("ProcsFiles(../etc) accepted")
	}
}

// The shim joins the groups before exec, so the command's very first look
// at /proc/self/cgroup already shows them, under the same PID.
func TestShimEntersBeforeExec(t *testing.T) {
	checkLeaks(t)
	m := needRealV1(t)
	_, _, gs := testPod(t, m, "sidecar")
	files, err := m.ProcsFiles(gs["sidecar"])
	if err != nil {
		t.Fatal(err)
	}
	adj := SidecarOOMScoreAdj(0)
	c := startChild(t, execshim.Spec{CgroupProcs: files, OOMScoreAdj: &adj}, "report")
	out := map[string]string{}
	for {
		l, err := c.stdout.ReadString('\n')
		if err != nil {
			break
		}
		if k, v, ok := strings.Cut(strings.TrimSpace(l), " "); ok && (k == "pid" || k == "oom") {
			out[k] = v
			continue
		}
		f := strings.SplitN(strings.TrimSpace(l), ":", 3)
		if len(f) == 3 {
			out[f[1]] = f[2]
		}
	}
	<-c.done
	if c.err != nil {
		t.Fatalf("child: %v", c.err)
	}
	if out["pid"] != strconv.Itoa(c.cmd.Process.Pid) {
		t.Errorf("exec'ed command pid %s, shim pid %d: exec must keep the PID", out["pid"], c.cmd.Process.Pid)
	}
	for _, ctl := range v1Controllers {
		if got, want := out[ctl], "/"+string(gs["sidecar"]); got != want {
			t.Errorf("%s cgroup of the command = %q, want %q", ctl, got, want)
		}
	}
	if out["oom"] != "1000" {
		t.Errorf("oom_score_adj of the command = %q, want 1000", out["oom"])
	}
}

func TestOOMScoreAdj(t *testing.T) {
	checkLeaks(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	c := startChild(t, execshim.Spec{}, "hold:0")
	c.waitLine(t, "ready", 10*time.Second)
	pid := c.cmd.Process.Pid
	start, err := ReadOOMScoreAdj(pid)
	if err != nil {
		t.Fatal(err)
	}
	if err := SetOOMScoreAdj(pid, 700); err != nil {
		t.Fatal(err)
	}
	if v, _ := ReadOOMScoreAdj(pid); v != 700 {
		t.Fatalf("oom_score_adj = %d after setting 700", v)
	}
	// Going below the floor needs CAP_SYS_RESOURCE, which root lacks on CI
	// machines; either it works or the error says why.
	err = SetOOMScoreAdj(pid, -500)
	if err != nil && !errors.Is(err, ErrOOMScoreAdjPermission) {
		t.Fatalf("SetOOMScoreAdj(-500) error = %v, want ErrOOMScoreAdjPermission", err)
	}
	if err != nil && !strings.Contains(err.Error(), "pid "+strconv.Itoa(pid)) {
		t.Fatalf("error does not name the pid: %v", err)
	}
	t.Logf("start %d; lowering to -500: %v", start, err)
	if err := SetOOMScoreAdj(pid, 1001); err == nil || !strings.Contains(err.Error(), "outside") {
		t.Fatalf("SetOOMScoreAdj(1001) error = %v", err)
	}
	if _, err := ReadOOMScoreAdj(1 << 30); err == nil {
		t.Fatal("ReadOOMScoreAdj of a missing pid succeeded")
	}
}

func TestSidecarOOMScoreAdjRule(t *testing.T) {
	for _, tc := range []struct{ app, want int }{
		{0, 1000}, {-997, 3}, {-1000, 0}, {500, 1000}, {1000, 1000}, {-250, 750},
	} {
		if got := SidecarOOMScoreAdj(tc.app); got != tc.want {
			t.Errorf("SidecarOOMScoreAdj(%d) = %d, want %d", tc.app, got, tc.want)
		}
	}
}

func TestStatsMemoryUsage(t *testing.T) {
	checkLeaks(t)
	m := needRealV1(t)
	_, _, gs := testPod(t, m, "app")
	files, _ := m.ProcsFiles(gs["app"])
	c := startChild(t, execshim.Spec{CgroupProcs: files}, "hold:32")
	c.waitLine(t, "ready", 20*time.Second)
	st, err := m.Stats(gs["app"])
	if err != nil {
		t.Fatal(err)
	}
	if st.MemoryUsage < 32<<20 || st.MemoryUsage > 256<<20 {
		t.Fatalf("memory usage %d bytes with 32 MiB held", st.MemoryUsage)
	}
	if st.CPUUsageNanos == 0 {
		t.Fatal("cpu usage 0 after a process started in the group")
	}
	procs, err := m.Procs(gs["app"])
	if err != nil || len(procs) != 1 || procs[0] != c.cmd.Process.Pid {
		t.Fatalf("Procs = %v, %v; want [%d]", procs, err, c.cmd.Process.Pid)
	}
	c.kill()
	if _, err := m.Stats("meshagent/none-such"); err == nil {
		t.Fatal("Stats of a missing group succeeded")
	}
}
