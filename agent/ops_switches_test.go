package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSwitchAutoRestartOffKeepsCrashedSidecarDown(t *testing.T) {
	h := newHostPod(t, "web", nil)
	cfg := testConfig(t, h.spec)
	ra := startAgent(t, cfg)
	ra.waitPhase(t, "web", PhaseRunning)
	eventually(t, 5*time.Second, "app running", func() bool { return ra.container(t, "web", "app").PID != 0 })
	app := ra.container(t, "web", "app").PID
	c := NewClient(ra.socket)

	st, err := c.SetSwitch(context.Background(), SwitchAutoRestart, false)
	require.NoError(t, err)
	assert.False(t, st.On)
	require.NotNil(t, st.ChangedBy)
	assert.Equal(t, uint32(os.Geteuid()), *st.ChangedBy)

	// Honoured at once: the pods had the switch when SetSwitch returned.
	old := ra.container(t, "web", "proxy").PID
	require.NoError(t, syscall.Kill(old, syscall.SIGKILL))
	eventually(t, 5*time.Second, "sidecar exit seen", func() bool { return ra.container(t, "web", "proxy").State == StateExited })
	time.Sleep(500 * time.Millisecond) // longer than the first restart ever takes
	proxy := ra.container(t, "web", "proxy")
	assert.Equal(t, StateExited, proxy.State)
	assert.Zero(t, proxy.PID)
	assert.Len(t, readStamps(h.sidecarStamps)["start"], 1, "no second sidecar process")
	assert.Equal(t, app, ra.container(t, "web", "app").PID, "the app is untouched")

	var flips, held []Event
	for _, e := range ra.Events(0, 0) {
		switch e.Type {
		case EvSwitch:
			flips = append(flips, e)
		case EvRestartHeld:
			held = append(held, e)
		}
	}
	require.Len(t, flips, 1, "the flip shows in the events")
	assert.Equal(t, map[string]string{"switch": SwitchAutoRestart, "value": "off", "previous": "on",
		"uid": strconv.Itoa(os.Geteuid())}, flips[0].Fields)
	require.Len(t, held, 1)
	assert.Equal(t, "proxy", held[0].Container)

	// Across an agent restart the switch stays off.
	ra.stop(t)
	ra2 := startAgent(t, cfg)
	ra2.waitPhase(t, "web", PhaseRunning)
	assert.False(t, ra2.Switch(SwitchAutoRestart), "persisted in the state dir")
	sw, err := NewClient(ra2.socket).Switches(context.Background())
	require.NoError(t, err)
	require.Len(t, sw, len(SwitchNames()))
	for _, s := range sw {
		assert.Equal(t, s.Name != SwitchAutoRestart, s.On, s.Name)
	}
	eventually(t, 5*time.Second, "proxy ready", func() bool { return ra2.container(t, "web", "proxy").State == StateReady })
	old = ra2.container(t, "web", "proxy").PID
	require.NoError(t, syscall.Kill(old, syscall.SIGKILL))
	eventually(t, 5*time.Second, "sidecar exit seen", func() bool { return ra2.container(t, "web", "proxy").State == StateExited })

	// On again: the held sidecar comes back.
	_, err = NewClient(ra2.socket).SetSwitch(context.Background(), SwitchAutoRestart, true)
	require.NoError(t, err)
	eventually(t, 5*time.Second, "held sidecar restarted", func() bool {
		c := ra2.container(t, "web", "proxy")
		return c.State == StateReady && c.PID != 0 && c.PID != old
	})
}

func TestSwitchStartupGateOffStartsAppsWithoutWaiting(t *testing.T) {
	h := newHostPod(t, "web", map[string]string{"NEVER_READY": "1"})
	h.spec.Startup = StartupPolicy{Timeout: Duration(time.Minute), OnTimeout: FailClosed}
	ra := startAgent(t, testConfig(t, h.spec))
	ra.waitPhase(t, "web", PhasePending)
	time.Sleep(100 * time.Millisecond)
	require.Empty(t, readStamps(h.appStamps)["start"], "gated while the switch is on")
	_, err := NewClient(ra.socket).SetSwitch(context.Background(), SwitchStartupGate, false)
	require.NoError(t, err)
	ra.waitPhase(t, "web", PhaseRunning)
	eventually(t, 5*time.Second, "app started", func() bool { return len(readStamps(h.appStamps)["start"]) == 1 })
}

func TestSwitchErrors(t *testing.T) {
	ra := startAgent(t, testConfig(t))
	c := NewClient(ra.socket)
	_, err := c.SetSwitch(context.Background(), "warp-drive", false)
	var api *APIError
	require.True(t, errors.As(err, &api), "%v", err)
	assert.Equal(t, 404, api.Status)
	assert.Contains(t, api.Message, `switch "warp-drive"`)

	for _, body := range []string{`{}`, `{"on": "maybe"}`, `{"on": true, "x": 1}`} {
		err := c.Do(context.Background(), "PUT", "/v1/switches/nri", rawJSON(body), nil)
		require.True(t, errors.As(err, &api), "%s: %v", body, err)
		assert.Equal(t, 400, api.Status, body)
	}
	assert.True(t, ra.Switch(SwitchNRI), "nothing flipped")
}

func TestSwitchesFileCorruptRefusesStart(t *testing.T) {
	cfg := testConfig(t)
	require.NoError(t, os.MkdirAll(cfg.Node.StateDir, 0o700))
	p := filepath.Join(cfg.Node.StateDir, "switches.json")
	require.NoError(t, os.WriteFile(p, []byte("{not json"), 0o600))
	_, err := New(cfg)
	require.Error(t, err)
	assert.Contains(t, err.Error(), p)
}

// rawJSON marshals as itself.
type rawJSON string

func (r rawJSON) MarshalJSON() ([]byte, error) { return []byte(r), nil }
