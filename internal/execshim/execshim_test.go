package execshim

import (
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The children of these tests are this test binary started as the shim.
func TestMain(m *testing.M) {
	RunIfRequested()
	os.Exit(m.Run())
}

// startShim runs this binary as the shim with spec and returns its exit
// code and what it wrote to its error fd.
func startShim(t *testing.T, spec Spec) (int, string) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	spec.ErrFD = 3
	raw, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), Env+"="+string(raw))
	cmd.ExtraFiles = []*os.File{w}
	if err := cmd.Start(); err != nil {
		w.Close()
		t.Fatal(err)
	}
	w.Close()
	msg, _ := io.ReadAll(r)
	err = cmd.Wait()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatal(err)
	}
	return cmd.ProcessState.ExitCode(), string(msg)
}

func TestShimFailures(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing", "cgroup.procs")
	for _, tc := range []struct {
		name string
		spec Spec
		want []string
	}{
		{"cgroup", Spec{Path: "/bin/true", Argv: []string{"true"}, CgroupProcs: []string{missing}}, []string{"enter cgroup", missing}},
		{"exec", Spec{Path: "/nonexistent/cmd", Argv: []string{"cmd"}}, []string{"exec /nonexistent/cmd"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, msg := startShim(t, tc.spec)
			if code != 127 {
				t.Errorf("exit code %d, want 127 (error fd: %q)", code, msg)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error fd said %q, want it to contain %q", msg, w)
				}
			}
		})
	}
}

// On success the shim execs the command in place: the error fd (close-on-exec)
// reads EOF with nothing written, and the command's exit code is the child's.
func TestShimExecs(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh in PATH")
	}
	code, msg := startShim(t, Spec{Path: sh, Argv: []string{"sh", "-c", "exit 7"}})
	if code != 7 || msg != "" {
		t.Fatalf("exit code %d, error fd %q; want 7 and nothing", code, msg)
	}
}
