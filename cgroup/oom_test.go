package cgroup

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshagent/meshagent/internal/execshim"
)

// oomTrial runs one pod-level OOM: the app holds 64 MiB, the sidecar grows
// until the pod's 128 MiB limit is hit, so at the kill the app is the bigger
// process (without policy the kernel picks it). The sidecar stops at 100 MiB,
// which fits once the app's memory is freed. It returns which processes the
// OOM killer killed and the containers the watcher named (sorted; one scan
// may see several counters move, so its order is not the kill order).
func oomTrial(t *testing.T, m *Manager, events <-chan OOMEvent, tg Target, sidecarAdj int) (appKilled, sideKilled bool, reported string) {
	t.Helper()
	appFiles, _ := m.ProcsFiles(tg.Apps[0].Group)
	sideFiles, _ := m.ProcsFiles(tg.Sidecar.Group)
	appAdj := 0
	app := startChild(t, execshim.Spec{CgroupProcs: appFiles, OOMScoreAdj: &appAdj}, "hold:64")
	app.waitLine(t, "ready", 20*time.Second)
	side := startChild(t, execshim.Spec{CgroupProcs: sideFiles, OOMScoreAdj: &sidecarAdj}, "grow:100")
	side.waitLine(t, "ready", 20*time.Second)
	defer app.kill()
	defer side.kill()
	select {
	case <-app.done:
	case <-side.done:
	case <-time.After(30 * time.Second):
		t.Fatal("no OOM kill within 30s")
	}
	var got []OOMEvent
	deadline := time.After(5 * time.Second)
	for len(got) == 0 {
		select {
		case e := <-events:
			got = append(got, e)
		case <-deadline:
			t.Fatal("watcher reported no OOM kill within 5s")
		}
	}
	// Collect the events of any further kill.
	linger := time.After(300 * time.Millisecond)
	for done := false; !done; {
		select {
		case e := <-events:
			got = append(got, e)
		case <-linger:
			done = true
		}
	}
	var names []string
	for _, e := range got {
		if e.Pod != tg.Pod || e.Kills != 1 {
			t.Errorf("OOM event %+v, want one kill in pod %s", e, tg.Pod)
		}
		names = append(names, e.Container)
	}
	sort.Strings(names)
	for _, c := range []*child{app, side} {
		if c.exited() && !c.killedBy(syscall.SIGKILL) {
			t.Errorf("child %d ended with %v, want SIGKILL from the OOM killer or still running", c.cmd.Process.Pid, c.err)
		}
	}
	return app.exited(), side.exited(), strings.Join(names, ",")
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

	// Control: no policy (both at 0), the app is the bigger process and is
	// killed. (The sidecar, still allocating while the app's memory is being
	// freed, may be killed after it; that does not change the point.)
	t.Run("control", func(t *testing.T) {
		appKilled, sideKilled, reported := oomTrial(t, m, events, tg, 0)
		if !appKilled || !strings.Contains(reported, "app") {
			t.Fatalf("without policy the app was not OOM-killed (sidecar killed: %v, watcher: %s): the control must show the problem", sideKilled, reported)
		}
		t.Logf("control: app killed; sidecar killed too: %v; watcher: %s", sideKilled, reported)
	})
	before, err := m.Stats(tg.Sidecar.Group)
	if err != nil {
		t.Fatal(err)
	}
	// Policy: the sidecar gets the app's value + 1000 and dies, 10 of 10.
	adj := SidecarOOMScoreAdj(0)
	for i := 1; i <= 10; i++ {
		t.Run(fmt.Sprintf("trial%d", i), func(t *testing.T) {
			appKilled, sideKilled, reported := oomTrial(t, m, events, tg, adj)
			if !sideKilled || appKilled || reported != "sidecar" {
				t.Fatalf("with policy: sidecar killed %v, app killed %v, watcher %q; want only the sidecar killed", sideKilled, appKilled, reported)
			}
			// The supervisor restarts the sidecar at once: the new process
			// is confined and first in line again.
			files, _ := m.ProcsFiles(tg.Sidecar.Group)
			c := startChild(t, execshim.Spec{CgroupProcs: files, OOMScoreAdj: &adj}, "hold:0")
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
	if st.OOMKills-before.OOMKills != 10 {
		t.Errorf("sidecar stats count %d OOM kills over the 10 trials, want 10", st.OOMKills-before.OOMKills)
	}
}

func TestOOMWatcherAddRemove(t *testing.T) {
	checkLeaks(t)
	m := needRealV1(t)
	pod, pg, gs := testPod(t, m, "sidecar")
	w, err := m.NewOOMWatcher()
	if err != nil {
		t.Fatal(err)
	}
	missing := Container{"app", Group(string(pg) + "/missing")}
	if err := w.Add(pod, pg, []Container{{"sidecar", gs["sidecar"]}, missing}); err == nil ||
		!strings.Contains(err.Error(), "pod "+pod+" container app") {
		t.Fatalf("Add with a missing group: %v, want an error naming pod and container", err)
	}
	if err := w.Add(pod, "../x", nil); err == nil {
		t.Fatal("Add with a bad pod group succeeded")
	}
	for i := 0; i < 3; i++ { // re-adding replaces, without leaking eventfds
		if err := w.Add(pod, pg, []Container{{"sidecar", gs["sidecar"]}}); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx, make(chan OOMEvent)) }()
	w.Remove(pod)
	w.Remove("never-added")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	w.Close()
	w.Close()
	if err := w.Add(pod, pg, nil); err == nil {
		t.Fatal("Add after Close succeeded")
	}
}
