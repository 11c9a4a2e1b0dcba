package systemd

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// parseUnit reads a unit file into section -> key -> values (a key may
// repeat). Continuation lines are not used in our unit and are rejected.
func parseUnit(t *testing.T, text string) map[string]map[string][]string {
	t.Helper()
	out := map[string]map[string][]string{}
	section := ""
	sc := bufio.NewScanner(strings.NewReader(text))
	for line := 1; sc.Scan(); line++ {
		l := strings.TrimSpace(sc.Text())
		switch {
		case l == "" || strings.HasPrefix(l, "#") || strings.HasPrefix(l, ";"):
		case strings.HasPrefix(l, "[") && strings.HasSuffix(l, "]"):
			section = l[1 : len(l)-1]
			out[section] = map[string][]string{}
		case strings.HasSuffix(l, `\`):
			t.Fatalf("line %d: continuation lines not expected", line)
		default:
			k, v, ok := strings.Cut(l, "=")
			if !ok || section == "" {
				t.Fatalf("line %d: %q is not key=value inside a section", line, l)
			}
			out[section][strings.TrimSpace(k)] = append(out[section][strings.TrimSpace(k)], strings.TrimSpace(v))
		}
	}
	return out
}

// TestUnitDirectives checks the settings host mode depends on, each for a
// reason given in the unit's comments.
func TestUnitDirectives(t *testing.T) {
	u := parseUnit(t, Unit)
	tests := []struct{ section, key, want string }{
		{"Service", "Type", "notify"},
		{"Service", "NotifyAccess", "main"},
		{"Service", "ExecStart", "/usr/local/bin/meshagent run --config /etc/meshagent/config.yaml"},
		{"Service", "ExecReload", "/bin/kill -HUP $MAINPID"},
		{"Service", "Restart", "always"},
		{"Service", "KillMode", "process"},
		{"Service", "WatchdogSec", "30s"},
		{"Service", "RuntimeDirectory", "meshagent"},
		{"Service", "RuntimeDirectoryPreserve", "yes"},
		{"Service", "StateDirectory", "meshagent"},
		{"Unit", "StartLimitIntervalSec", "0"},
		{"Install", "WantedBy", "multi-user.target"},
	}
	for _, tt := range tests {
		t.Run(tt.section+"/"+tt.key, func(t *testing.T) {
			got := u[tt.section][tt.key]
			if !slices.Equal(got, []string{tt.want}) {
				t.Fatalf("[%s] %s = %q, want exactly %q", tt.section, tt.key, got, tt.want)
			}
		})
	}
}

// TestUnitEmbedded checks the embedded unit is the file in the repository
// (go:embed guarantees it at build time; this guards a rename that leaves a
// stale copy behind).
func TestUnitEmbedded(t *testing.T) {
	b, err := os.ReadFile(UnitName)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != Unit {
		t.Fatalf("%s differs from the embedded Unit", UnitName)
	}
}

// TestUnitVerify runs `systemd-analyze verify` on the unit and fails on any
// complaint about it (the tool exits 0 on many of them, so its output is
// what counts). verify also requires ExecStart's binary to exist and be
// executable; the only change made to the unit is pointing ExecStart at a
// stand-in executable, leaving its arguments as they are.
func TestUnitVerify(t *testing.T) {
	tool := requireTool(t, "systemd-analyze")
	dir := t.TempDir()
	bin := filepath.Join(dir, "meshagent")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	const orig = "ExecStart=/usr/local/bin/meshagent "
	if strings.Count(Unit, orig) != 1 {
		t.Fatalf("unit has no single %q line to point at the stand-in", orig)
	}
	unit := strings.Replace(Unit, orig, "ExecStart="+bin+" ", 1)
	path := filepath.Join(dir, UnitName)
	if err := os.WriteFile(path, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(tool, "verify", path).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) != 0 {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", path, err, out)
	}

	// The check can fail: a broken directive is reported.
	bad := strings.Replace(unit, "KillMode=process", "KillMode=procss", 1)
	if err := os.WriteFile(path, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	out, _ = exec.Command(tool, "verify", path).CombinedOutput()
	if !strings.Contains(string(out), "procss") {
		t.Fatalf("systemd-analyze verify did not report a bad KillMode; output:\n%s", out)
	}
}

// requireTool returns the path of an executable or skips the test saying
// which tool is missing.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed (%v); install systemd to verify the unit", name, err)
	}
	return p
}
