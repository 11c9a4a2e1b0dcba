package handoff

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// TestProcessTree uses a real process tree: sh (the "sidecar") with a
// sleep child (a worker of the sidecar).
func TestProcessTree(t *testing.T) {
	checkFDs(t)
	cmd := exec.Command("/bin/sh", "-c", "sleep 30 & echo $!; wait")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	worker, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatal(err)
	}
	// Not os.FindProcess: it would hold a pidfd open.
	t.Cleanup(func() { syscall.Kill(worker, syscall.SIGKILL) })
	sidecar := cmd.Process.Pid
	auth := ProcessTree(func() int { return sidecar })
	for _, tc := range []struct {
		name string
		pid  int
		ok   bool
	}{
		{"the sidecar", sidecar, true},
		{"its child", worker, true},
		{"its parent (meshagent)", os.Getpid(), false},
		{"init", 1, false},
		{"no such process", 1 << 30, false},
	} {
		err := auth(int32(tc.pid), 0)
		if (err == nil) != tc.ok {
			t.Errorf("%s (pid %d): %v, want ok=%v", tc.name, tc.pid, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrNotInTree) {
			t.Errorf("%s: %v does not wrap ErrNotInTree", tc.name, err)
		}
	}
	if err := ProcessTree(func() int { return worker })(int32(sidecar), 0); err == nil {
		t.Error("the sidecar was accepted as a descendant of its own child")
	}
	if err := ProcessTree(func() int { return 0 })(int32(sidecar), 0); err == nil || !strings.Contains(err.Error(), "no sidecar running") {
		t.Errorf("no sidecar: %v", err)
	}
}

func TestParentPIDCommandWithParens(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(dir+"/42", 0o755)
	os.WriteFile(dir+"/42/stat", []byte("42 (a) b) (c) S 7 42 42 0 -1\n"), 0o644)
	if p, err := parentPID(dir, 42); err != nil || p != 7 {
		t.Fatalf("parentPID = %d, %v; want 7", p, err)
	}
	os.MkdirAll(dir+"/43", 0o755)
	os.WriteFile(dir+"/43/stat", []byte("43 no-parens S 7"), 0o644)
	if _, err := parentPID(dir, 43); err == nil {
		t.Fatal("stat without command name accepted")
	}
}
