package main

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/meshagent/meshagent/internal/loadgen"
	"github.com/meshagent/meshagent/internal/proctest"
)

// TestLoadThroughRestart is the hand-off load test in miniature, with real
// processes and open-loop traffic through the sidecar:
//   - crash: the sidecar is SIGKILLed and started again 300ms later. When the
//     listening socket outlives the process (the test holds it, as
//     meshagent's fd store would, and passes it to both starts with
//     LISTEN_FDS) no connection is refused; when each start binds the port
//     itself (the control) the gap shows as refused connections, which
//     proves the load generator sees the failure it is looking for.
//   - hot upgrade: a second sidecar starts on the held socket, and once it is
//     ready the first gets SIGTERM and drains: no request may fail at all.
func TestLoadThroughRestart(t *testing.T) {
	tests := []struct {
		name        string
		holdSocket  bool
		upgrade     bool
		wantRefused bool
	}{
		{name: "crash with the socket held", holdSocket: true},
		{name: "crash, control: each start binds the port", wantRefused: true},
		{name: "hot upgrade", holdSocket: true, upgrade: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			proctest.CheckFDs(t)
			_, appAddr := startApp(t, "app")
			dir := t.TempDir()

			var (
				listen string
				opts   proctest.Options
			)
			if tt.holdSocket {
				var f *os.File
				f, listen = heldListener(t)
				opts = proctest.Options{Env: []string{"LISTEN_FDS=1", "LISTEN_FDNAMES=listen"}, Files: []*os.File{f}, ShellPID: true}
			} else {
				listen = proctest.FreeAddr(t)
			}
			startSidecar := func(n string) *proctest.Proc {
				rf := filepath.Join(dir, n)
				p := proctest.Start(t, n, bins.sidecar, []string{
					"--listen", listen, "--admin", "", "--upstream", appAddr,
					"--ready-after", "50ms", "--ready-file", rf,
				}, opts)
				waitMark(t, p, rf, "ready", 10*time.Second)
				return p
			}
			first := startSidecar("sidecar-1")

			results := make(chan loadgen.Result, 1)
			errs := make(chan error, 1)
			go func() {
				res, err := loadgen.Run(context.Background(), loadgen.Config{
					Target: "http://" + listen + "/", Rate: 200, Duration: 2500 * time.Millisecond,
					// A generous timeout: a restart on a busy machine may take
					// seconds, and requests queued meanwhile must count as
					// what they are (late, not lost).
					NewConnRatio: 0.5, Timeout: 15 * time.Second,
				})
				results <- res
				errs <- err
			}()
			time.Sleep(800 * time.Millisecond)
			if tt.upgrade {
				startSidecar("sidecar-2") // returns once it is ready
				first.Signal(t, syscall.SIGTERM)
				if code := first.Wait(t, 10*time.Second); code != 0 {
					t.Errorf("old sidecar exit code %d after SIGTERM, want 0", code)
				}
			} else {
				first.Signal(t, syscall.SIGKILL)
				first.Wait(t, 10*time.Second)
				time.Sleep(300 * time.Millisecond)
				startSidecar("sidecar-2")
			}

			res := <-results
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
			c := res.Counts
			t.Logf("counts %+v, p99 %s, max %s", c, res.Latency.P99, res.Latency.Max)
			if c.Scheduled() != 500 || c.OK == 0 {
				t.Fatalf("counts %+v: want 500 scheduled and some ok", c)
			}
			if tt.wantRefused && c.Refused == 0 {
				t.Errorf("no refused connection although the port was closed for 300ms at 200 req/s")
			}
			if !tt.wantRefused && c.Refused != 0 {
				t.Errorf("%d refused connections although the socket was held across the crash", c.Refused)
			}
			if tt.upgrade && c.Failed() != 0 {
				t.Errorf("%d requests failed during a hot upgrade, want 0: %+v", c.Failed(), c)
			}
			if !tt.wantRefused && (c.Timeout != 0 || c.Non2xx != 0 || c.Other != 0) {
				// Only requests in flight on the killed process (reset, eof)
				// may fail.
				t.Errorf("counts %+v: only resets and EOFs of requests in flight at the kill may fail", c)
			}
		})
	}
}
