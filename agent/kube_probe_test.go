package agent

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestKubeHTTPProbeKeepsOneConnection: a Kubernetes HTTP check reuses one
// connection from check to check (no setns and handshake per period), and
// closing the probe closes that connection, so nothing holds the pod's
// network namespace once its probe is gone.
func TestKubeHTTPProbeKeepsOneConnection(t *testing.T) {
	var mu sync.Mutex
	conns := map[net.Conn]http.ConnState{}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	srv.Config.ConnState = func(c net.Conn, s http.ConnState) {
		mu.Lock()
		defer mu.Unlock()
		conns[c] = s
	}
	srv.Start()
	defer srv.Close()
	count := func(want http.ConnState) int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, s := range conns {
			if s == want {
				n++
			}
		}
		return n
	}

	ns, err := openNetns(uint32(os.Getpid()))
	require.NoError(t, err)
	defer ns.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	probe, err := newKubeProbe(kubeProbeSpec{Kind: "http", Addr: addr, Path: "/ready"}, probeTarget{ns: ns, pid: uint32(os.Getpid())})
	require.NoError(t, err)
	for range 5 {
		require.NoError(t, probe.Check(context.Background()))
	}
	mu.Lock()
	opened := len(conns)
	mu.Unlock()
	assert.Equal(t, 1, opened, "five checks, one connection")

	closeKubeProbe(probe)
	eventually(t, 5*time.Second, "the kept connection closed with the probe", func() bool {
		return count(http.StateClosed) == 1
	})
}
