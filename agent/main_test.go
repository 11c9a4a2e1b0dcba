package agent

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshagent/meshagent/handoff"
)

// The test binary doubles as the processes the tests supervise: the exec
// shim, a sidecar, an app and a whole agent (to SIGKILL it).
func TestMain(m *testing.M) {
	RunShimIfRequested()
	switch os.Getenv("MESHAGENT_TEST_CHILD") {
	case "":
		code := m.Run()
		removeDemoBins()
		cleanupKubeTests() // kube_env_test.go
		os.Exit(code)
	case "sidecar":
		testSidecar()
	case "app":
		testApp()
	case "agent":
		testAgentProcess()
	case "admin-client":
		testAdminClient()
	case "hog":
		testHog() // cgroup_test.go
	case "mosn":
		testMOSN() // handoff_mosn_test.go
	default:
		fmt.Fprintln(os.Stderr, "unknown test child", os.Getenv("MESHAGENT_TEST_CHILD"))
		os.Exit(2)
	}
}

// stamp appends "what unixnano" to $STAMP_FILE.
func stamp(what string) {
	f, err := os.OpenFile(os.Getenv("STAMP_FILE"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return
	}
	fmt.Fprintf(f, "%s %d\n", what, time.Now().UnixNano())
	f.Close()
}

func envDuration(k string) time.Duration {
	d, _ := time.ParseDuration(os.Getenv(k))
	return d
}

// testSidecar listens on $LISTEN_ADDR after $DELAY and serves /ready.
// With $NEVER_READY it never listens.
func testSidecar() {
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	stamp("start")
	time.Sleep(envDuration("DELAY"))
	if os.Getenv("NEVER_READY") == "" {
		ln, err := net.Listen("tcp", os.Getenv("LISTEN_ADDR"))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(3)
		}
		stamp("listen")
		go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintln(w, "ok", os.Getpid())
		}))
	}
	if addr := os.Getenv("STORE_EXTRA"); addr != "" {
		storeAndDrop(addr)
	}
	<-term
	stamp("term")
	time.Sleep(envDuration("DRAIN"))
	stamp("exit")
	os.Exit(0)
}

// storeAndDrop binds addr, hands the listener to the fd store as "extra"
// (FDSTORE=1) and closes its own copy: a sidecar that stopped serving a
// listener the store still pins.
func storeAndDrop(addr string) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(4)
	}
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(4)
	}
	if err := handoff.SdNotify("FDSTORE=1\nFDNAME=extra", f); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(4)
	}
	f.Close()
	ln.Close()
	stamp("stored")
}

func testApp() {
	// Handler first: a test that saw "start" may send SIGTERM at once.
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	stamp("start")
	<-term
	stamp("term")
	time.Sleep(envDuration("DRAIN"))
	stamp("exit")
	os.Exit(0)
}

// testAgentProcess runs a whole agent from $AGENT_CONFIG.
func testAgentProcess() {
	cfg, err := LoadConfig(os.Getenv("AGENT_CONFIG"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	a, err := New(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := a.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// testAdminClient does GET /v1/pods on $ADMIN_SOCKET and prints the status.
func testAdminClient() {
	c := NewClient(os.Getenv("ADMIN_SOCKET"))
	_, err := c.Pods(context.Background())
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	fmt.Println("allowed")
	os.Exit(0)
}

// readStamps parses a stamp file into what -> times.
func readStamps(path string) map[string][]time.Time {
	b, _ := os.ReadFile(path)
	out := map[string][]time.Time{}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		n, _ := strconv.ParseInt(f[1], 10, 64)
		out[f[0]] = append(out[f[0]], time.Unix(0, n))
	}
	return out
}
