package agent

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestAdminSocketIsOwnerOnly(t *testing.T) {
	ra := startAgent(t, testConfig(t, newHostPod(t, "web", nil).spec))
	st, err := os.Stat(ra.socket)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())
}

func TestAdminRefusesOtherUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another uid")
	}
	ra := startAgent(t, testConfig(t, newHostPod(t, "web", nil).spec))
	// Open the socket's mode so only the peer-credential check stands in
	// the way: a mode mistake must not open the API.
	require.NoError(t, os.Chmod(filepath.Dir(ra.socket), 0o755))
	require.NoError(t, os.Chmod(filepath.Dir(filepath.Dir(ra.socket)), 0o755))
	require.NoError(t, os.Chmod(ra.socket, 0o666))

	// A copy of the test binary that uid 65534 may execute.
	bin := filepath.Join(t.TempDir(), "client")
	require.NoError(t, os.Chmod(filepath.Dir(bin), 0o755))
	require.NoError(t, os.Chmod(filepath.Dir(filepath.Dir(bin)), 0o755))
	self, _ := os.Executable()
	raw, err := os.ReadFile(self)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(bin, raw, 0o755))

	for _, tc := range []struct {
		name string
		uid  uint32
		want string
	}{
		{"root", 0, "allowed"},
		{"nobody", 65534, "may not use the admin socket (HTTP 403)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(bin)
			cmd.Env = []string{"MESHAGENT_TEST_CHILD=admin-client", "ADMIN_SOCKET=" + ra.socket}
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: tc.uid, Gid: tc.uid}}
			out, _ := cmd.CombinedOutput()
			assert.Contains(t, string(out), tc.want)
		})
	}
}

func TestAdminBadRequests(t *testing.T) {
	ra := startAgent(t, testConfig(t, newHostPod(t, "web", nil).spec))
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", ra.socket)
	}}}
	defer hc.CloseIdleConnections()
	for _, tc := range []struct {
		name, method, path, body string
		code                     int
		msg                      string
	}{
		{"unknown pod", "GET", "/v1/pods/nope", "", 404, `pod \"nope\": not found`},
		{"unknown container", "POST", "/v1/pods/web/containers/nope/restart", "", 404, `container \"nope\": not found`},
		{"unknown pod restart", "POST", "/v1/pods/nope/restart", "", 404, "not found"},
		{"bad since", "GET", "/v1/events?since=abc", "", 400, "since: want a sequence number"},
		{"bad limit", "GET", "/v1/events?limit=0", "", 400, "limit: want 1 to 10000"},
		{"malformed json", "POST", "/v1/pods/web/containers/proxy/restart", "{not json", 400, "request body"},
		{"unknown field", "POST", "/v1/pods/web/restart", `{"force":true}`, 400, "unknown field"},
		{"oversized", "POST", "/v1/pods/web/restart", `{"reason":"` + strings.Repeat("x", maxAdminBody) + `"}`, 413, "request body over"},
		{"no endpoint", "GET", "/v2/everything", "", 404, "no endpoint"},
		{"wrong method", "DELETE", "/v1/pods", "", 404, "no endpoint DELETE /v1/pods"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := http.NewRequest(tc.method, "http://x"+tc.path, strings.NewReader(tc.body))
			require.NoError(t, err)
			resp, err := hc.Do(req)
			require.NoError(t, err)
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			assert.Equal(t, tc.code, resp.StatusCode, string(b))
			assert.Contains(t, string(b), tc.msg)
		})
	}
	// The agent still serves after all that.
	pods, err := NewClient(ra.socket).Pods(context.Background())
	require.NoError(t, err)
	require.Len(t, pods, 1)
}

func TestAdminRefusesSecondAgentOnSameSocket(t *testing.T) {
	cfg := testConfig(t, newHostPod(t, "web", nil).spec)
	startAgent(t, cfg)
	cfg2 := *cfg
	cfg2.Node.StateDir = filepath.Join(t.TempDir(), "other")
	a, err := New(&cfg2)
	require.NoError(t, err)
	err = a.Run(context.Background())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "another meshagent answers on it")
}
