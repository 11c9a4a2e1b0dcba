package agent

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/meshagent/meshagent/handoff"
)

// testMOSN is a sidecar that gets its listeners the way MOSN does after a
// crash: it dials reconfig.sock in $MOSN_UDS and takes the fds sent to
// listen.sock (handoff.ReceiveMOSN, the new side), serves "mosn PID" on
// them and reports its servers running.
func testMOSN() {
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	up, err := handoff.ReceiveMOSN(ctx, os.Getenv("MOSN_UDS"), handoff.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(4)
	}
	ls, err := handoff.Listeners(up.Files)
	if err != nil || len(ls) == 0 {
		fmt.Fprintln(os.Stderr, "listeners:", err, len(ls))
		os.Exit(5)
	}
	for _, l := range ls {
		go http.Serve(l, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "mosn %d", os.Getpid())
		}))
	}
	if err := up.Ready(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "ready:", err)
		os.Exit(2)
	}
	up.Close()
	<-term
	os.Exit(0)
}

func TestMOSNGetsHeldListenersAfterCrash(t *testing.T) {
	self, err := os.Executable()
	require.NoError(t, err)
	addr := freeTCP(t)
	uds := filepath.Join(t.TempDir(), "uds")
	pod := PodSpec{Name: "mosn", Startup: StartupPolicy{Timeout: Duration(10 * time.Second)}, Containers: []ContainerSpec{
		{Name: "mosn", Role: RoleSidecar, Command: self,
			Env:     map[string]string{"MESHAGENT_TEST_CHILD": "mosn", "MOSN_UDS": uds},
			Handoff: &HandoffSpec{Listeners: []ListenerSpec{{Name: "http", Address: "tcp://" + addr}}, MOSN: &MOSNSpec{UDSDir: uds}},
			Restart: RestartPolicy{InitialBackoff: Duration(10 * time.Millisecond), MaxBackoff: Duration(100 * time.Millisecond)},
			Stop:    StopPolicy{Grace: Duration(2 * time.Second)}},
		{Name: "app", Role: RoleApp, Command: self, Env: map[string]string{"MESHAGENT_TEST_CHILD": "app", "STAMP_FILE": filepath.Join(t.TempDir(), "app")},
			Stop: StopPolicy{Grace: Duration(2 * time.Second)}},
	}}
	da := startDemoAgent(t, pod)
	get := func() string {
		c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		resp, err := c.Get("http://" + addr + "/")
		if err != nil {
			return err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	first := da.status(t, "mosn", "mosn").PID
	assert.Equal(t, fmt.Sprintf("mosn %d", first), get(), "the first MOSN serves the agent-opened listener it was handed")

	require.NoError(t, syscall.Kill(first, syscall.SIGKILL))
	second := da.waitReady(t, "mosn", "mosn", first).PID
	// While it comes back, the connection waits in the held socket's queue.
	assert.Equal(t, fmt.Sprintf("mosn %d", second), get(), "the restarted MOSN took the held listener over MOSN's protocol")
	assert.Equal(t, 1, da.status(t, "mosn", "mosn").Restarts)
}
