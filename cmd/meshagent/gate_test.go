package main

import (
	"bytes"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
)

// TestHookCommandsWithoutAgent: the hooks' exit codes when no agent
// answers, and bad flags. (With an agent, the hooks are tested inside real
// pods by agent's TestKube* tests.)
func TestHookCommandsWithoutAgent(t *testing.T) {
	nowhere := filepath.Join(t.TempDir(), "gate.sock")
	for _, tc := range []struct {
		name   string
		args   []string
		code   int
		stderr string
	}{
		{"gate closed", []string{"gate", "--socket", nowhere, "--agent-wait", "0"}, 1, "gate: admin socket"},
		{"gate open", []string{"gate", "--socket", nowhere, "--agent-wait", "0", "--no-agent", "open"}, 0, "going ahead (--no-agent open)"},
		{"gate probe", []string{"gate", "--socket", nowhere, "--probe", "--no-agent", "open"}, 1, "gate: "},
		{"gate bad policy", []string{"gate", "--no-agent", "maybe"}, 1, `--no-agent: want open or closed, got "maybe"`},
		{"gate unknown flag", []string{"gate", "--pod", "x"}, 1, "flag provided but not defined: -pod"},
		{"hold", []string{"hold", "--socket", nowhere, "--agent-wait", "0"}, 1, "hold: admin socket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			code := run(tc.args, &out, &errb)
			assert.Equal(t, tc.code, code, "stderr: %s", errb.String())
			assert.Contains(t, errb.String(), tc.stderr)
		})
	}
}
