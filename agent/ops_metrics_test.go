package agent

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// parseExposition reads Prometheus text into "name{labels}" -> value.
func parseExposition(t *testing.T, b []byte) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		require.Positive(t, i, line)
		v, err := strconv.ParseFloat(line[i+1:], 64)
		require.NoError(t, err, line)
		out[line[:i]] = v
	}
	return out
}

func scrapeSocket(t *testing.T, socket string) map[string]float64 {
	t.Helper()
	b, err := NewClient(socket).Metrics(context.Background())
	require.NoError(t, err)
	return parseExposition(t, b)
}

// withPod returns the series that name pod.
func withPod(m map[string]float64, pod string) map[string]float64 {
	out := map[string]float64{}
	for k, v := range m {
		if strings.Contains(k, `pod="`+pod+`"`) {
			out[k] = v
		}
	}
	return out
}

func TestMetricsFromScriptedEvents(t *testing.T) {
	web := newHostPod(t, "web", nil)
	slow := newHostPod(t, "slow", map[string]string{"NEVER_READY": "1"})
	slow.spec.Startup = StartupPolicy{Timeout: Duration(200 * time.Millisecond), OnTimeout: FailOpen}
	// A restarted sidecar that is never ready counts as hung after the
	// startup budget; a long backoff keeps that noise out of the way.
	slow.spec.Containers[0].Restart = RestartPolicy{InitialBackoff: Duration(time.Hour), MaxBackoff: Duration(time.Hour)}
	slow.spec.Containers[0].Stop.Grace = Duration(100 * time.Millisecond)
	cfg := testConfig(t, web.spec, slow.spec)
	cfg.Node.MetricsAddr = freeAddr(t)
	ra := startAgent(t, cfg)
	ra.waitPhase(t, "web", PhaseRunning)
	ra.waitPhase(t, "slow", PhaseRunning)
	readyProxy := func(old int) {
		t.Helper()
		eventually(t, 10*time.Second, "proxy ready again", func() bool {
			c := ra.container(t, "web", "proxy")
			return c.State == StateReady && c.PID != old
		})
	}
	readyProxy(0)

	// A crash, then an operator restart, then an OOM kill of the app.
	pid := ra.container(t, "web", "proxy").PID
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	readyProxy(pid)
	pid = ra.container(t, "web", "proxy").PID
	require.NoError(t, NewClient(ra.socket).Restart(context.Background(), "web", "proxy"))
	readyProxy(pid)
	require.NoError(t, ra.runner("web").send(context.Background(), InOOM{Container: "app"}))
	_, err := NewClient(ra.socket).SetSwitch(context.Background(), SwitchHotUpgrade, false)
	require.NoError(t, err)

	var got map[string]float64
	eventually(t, 5*time.Second, "oom recorded", func() bool {
		got = scrapeSocket(t, ra.socket)
		return got[`meshagent_oom_kills_total{container="app",pod="web",role="app"}`] == 1
	})
	assert.Equal(t, map[string]float64{
		`meshagent_sidecar_restarts_total{cause="crash",container="proxy",pod="web"}`:    1,
		`meshagent_sidecar_restarts_total{cause="operator",container="proxy",pod="web"}`: 1,
		`meshagent_oom_kills_total{container="app",pod="web",role="app"}`:                1,
		`meshagent_sidecar_ready{container="proxy",pod="web"}`:                           1,
		`meshagent_sidecar_crash_looping{container="proxy",pod="web"}`:                   0,
		`meshagent_sidecar_last_ready_duration_seconds{container="proxy",pod="web"}`:     got[`meshagent_sidecar_last_ready_duration_seconds{container="proxy",pod="web"}`],
		`meshagent_startup_gate_last_hold_duration_seconds{pod="web"}`:                   got[`meshagent_startup_gate_last_hold_duration_seconds{pod="web"}`],
	}, withPod(got, "web"), "exactly these series for the healthy pod")
	assert.Positive(t, got[`meshagent_sidecar_last_ready_duration_seconds{container="proxy",pod="web"}`])
	assert.Equal(t, 1.0, got[`meshagent_startup_timeouts_total{pod="slow",policy="failOpen"}`])
	assert.Equal(t, 0.0, got[`meshagent_sidecar_ready{container="proxy",pod="slow"}`])
	assert.Equal(t, 3.0, got[`meshagent_sidecar_ready_duration_seconds_count`], "three starts of web's proxy became ready")
	assert.Equal(t, 2.0, got[`meshagent_startup_gate_hold_duration_seconds_count`], "web's gate opened, slow's failed open")
	assert.Equal(t, 0.0, got[`meshagent_switch_enabled{switch="hot-upgrade"}`])
	assert.Equal(t, 1.0, got[`meshagent_switch_enabled{switch="auto-restart"}`])
	assert.Equal(t, 1.0, got[`meshagent_config_last_reload_successful`])

	// The same registry over TCP.
	resp, err := http.Get("http://" + cfg.Node.MetricsAddr + "/metrics")
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	tcp := parseExposition(t, body)
	assert.Equal(t, 1.0, tcp[`meshagent_sidecar_restarts_total{cause="operator",container="proxy",pod="web"}`])
	assert.Equal(t, withPod(got, "web"), withPod(tcp, "web"))
}

func TestMetricsAddrTakenFailsStart(t *testing.T) {
	cfg := testConfig(t)
	cfg.Node.MetricsAddr = freeAddr(t)
	first := startAgent(t, cfg)
	_ = first
	second := testConfig(t)
	second.Node.MetricsAddr = cfg.Node.MetricsAddr
	a, err := New(second)
	require.NoError(t, err)
	err = a.Run(context.Background())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "node.metricsAddr "+cfg.Node.MetricsAddr)
}
