package cgroup

import (
	"context"
	"fmt"
	"syscall"
	"testing"
	"time"
)

// oomTrial runs one pod-level OOM: the app holds 64 MiB, the sidecar grows
// until the pod's 128 MiB limit is hit, so at the kill the app is the bigger
// process (without policy the kernel picks it). The sidecar stops at 100 MiB,
// which fits once the app is gone: exactly one process must die. It returns who the kernel killed, as
// seen from the processes and as reported by the watcher.
func oomTrial(t *testing.T, m *Manager, w *OOMWatcher, events <-chan OOMEvent, tg Target, sidecarAdj int) (killed string, reported string) {
	t.Helper()
	appFiles, _ := m.ProcsFiles(tg.Apps[0].Group)
	sideFiles, _ := m.ProcsFiles(tg.Sidecar.Group)
	appAdj := 0
	app := startChild(t, Entry{ProcsFiles: appFiles, OOMScoreAdj: &appAdj}, "hold:64")
	app.waitLine(t, "ready", 20*time.Second)
	side := startChild(t, Entry{ProcsFiles: sideFiles, OOMScoreAdj: &sidecarAdj}, "grow:100")
	side.waitLine(t, "ready", 20*time.Second)
	select {
	case <-app.done:
	case <-side.done:
	case <-time.After(30 * time.Second):
		t.Fatal("no OOM kill within 30s")
	}
	time.Sleep(100 * time.Millisecond) // would a second victim follow?
	switch {
	case app.exited() && side.exited():
		t.Fatalf("both processes died (app: %v, sidecar: %v)", app.err, side.err)
	case app.exited():
		killed = "app"
	default:
		killed = "sidecar"
	}
	select {
	case e := <-events:
		reported = e.Container
		if e.Pod != tg.Pod || e.Kills != 1 {
			t.Errorf("OOM event %+v, want one kill in pod %s", e, tg.Pod)
		}
	case <-time.After(5 * time.Second):
		t.Errorf("watcher reported no OOM kill within 5s (%s died)", killed)
	}
	var dead *child = side
	if killed == "app" {
		dead = app
	}
	if !dead.killedBy(syscall.SIGKILL) {
		t.Errorf("%s ended with %v, want SIGKILL from the OOM killer", killed, dead.err)
	}
	app.kill()
	side.kill()
	return killed, reported
}

func TestOOMKillsSidecarFirst(t *testing.T) {
	checkLeaks(t)
	m := needRealV1(t)
	pod, pg, gs := testPod(t, m, "sidecar", "app")
	tg := Target{Pod: pod, PodGroup: pg, Sidecar: Container{"sidecar", gs["sidecar"]},
		Apps: []Container{{"app", gs["app"]}}, OwnPod: true, PodMemoryLimit: 128 << 20}
	if _, err := m.Apply(context.Background(), tg); err != nil {
		t.Fatal(err)
	}
	w, err := m.NewOOMWatcher()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if err := w.Add(pod, pg, []Container{tg.Sidecar, tg.Apps[0]}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	events := make(chan OOMEvent, 4)
	runErr := make(chan error, 1)
	go func() { runErr <- w.Run(ctx, events) }()
	defer func() {
		cancel()
		if err := <-runErr; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	// Control: no policy (both at 0), the app is the bigger process and dies.
	t.Run("control", func(t *testing.T) {
		killed, reported := oomTrial(t, m, w, events, tg, 0)
		if killed != "app" || reported != "app" {
			t.Fatalf("without policy the kernel killed %s (watcher: %s), want the app, the control must show the problem", killed, reported)
		}
	})
	// Policy: the sidecar gets the app's value + 1000 and dies, 10 of 10.
	adj := SidecarOOMScoreAdj(0)
	for i := 1; i <= 10; i++ {
		t.Run(fmt.Sprintf("trial%d", i), func(t *testing.T) {
			killed, reported := oomTrial(t, m, w, events, tg, adj)
			if killed != "sidecar" || reported != "sidecar" {
				t.Fatalf("with policy the kernel killed %s (watcher: %s), want the sidecar", killed, reported)
			}
			// The supervisor restarts the sidecar at once: the new process
			// is confined and first in line again.
			files, _ := m.ProcsFiles(tg.Sidecar.Group)
			c := startChild(t, Entry{ProcsFiles: files, OOMScoreAdj: &adj}, "hold:0")
			c.waitLine(t, "ready", 20*time.Second)
			if v, err := ReadOOMScoreAdj(c.cmd.Process.Pid); err != nil || v != 1000 {
				t.Fatalf("restarted sidecar oom_score_adj = %d, %v; want 1000", v, err)
			}
			c.kill()
		})
	}
	st, err := m.Stats(tg.Sidecar.Group)
	if err != nil {
		t.Fatal(err)
	}
	if st.OOMKills != 10 {
		t.Errorf("sidecar stats OOMKills = %d, want 10", st.OOMKills)
	}
}
