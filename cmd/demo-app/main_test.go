package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshagent/meshagent/internal/proctest"
)

var appBin string

func TestMain(m *testing.M) {
	dir, err := proctest.Build("github.com/meshagent/meshagent/cmd/demo-app")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	appBin = filepath.Join(dir, "demo-app")
	os.Exit(proctest.Run(m, dir))
}

// startApp runs the real binary on a free port and waits until it accepts.
func startApp(t *testing.T, args ...string) (*proctest.Proc, string) {
	t.Helper()
	addr := proctest.FreeAddr(t)
	p := proctest.Start(t, "demo-app", appBin, append([]string{"--listen", addr}, args...), proctest.Options{})
	proctest.WaitAccepting(t, "demo-app", addr, 10*time.Second)
	return p, addr
}

func get(t *testing.T, url string) (*http.Response, []byte) {
	t.Helper()
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: body: %v", url, err)
	}
	return resp, body
}

func TestServesAndRecordsStart(t *testing.T) {
	before := time.Now()
	sf := filepath.Join(t.TempDir(), "started")
	app, addr := startApp(t, "--name", "web", "--started-file", sf)
	data, err := os.ReadFile(sf)
	if err != nil {
		t.Fatalf("started file: %v", err)
	}
	ns, err := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
	if err != nil {
		t.Fatalf("started file %q: %v", data, err)
	}
	if started := time.Unix(0, ns); started.Before(before) || started.After(time.Now()) {
		t.Errorf("started time %s outside the test's window [%s, now]", started, before)
	}

	tests := []struct {
		path       string
		wantStatus int
		wantBody   string
	}{
		{"/", 200, `"app":"web"`},
		{"/any/path", 200, fmt.Sprintf(`"pid":%d`, app.PID())},
		{"/?status=503", 503, `"app":"web"`},
		{"/?status=99", 400, `status "99": want a number from 200 to 599`},
		{"/?delay=50ms", 200, `"app":"web"`},
		{"/?delay=1h", 400, `delay "1h": want a duration from 0 to 30s`},
		{"/healthz", 200, "ok"},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			resp, body := get(t, "http://"+addr+tt.path)
			if resp.StatusCode != tt.wantStatus || !strings.Contains(string(body), tt.wantBody) {
				t.Errorf("status %d body %q, want %d with %q", resp.StatusCode, body, tt.wantStatus, tt.wantBody)
			}
		})
	}
	resp, body := get(t, "http://"+addr+"/")
	var got map[string]any
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatalf("body %q: %v", body, err)
	}
	for _, k := range []string{"app", "pid", "time", "requests"} {
		if _, ok := got[k]; !ok {
			t.Errorf("body %q lacks %q", body, k)
		}
	}
	if h := resp.Header.Get("X-Demo-App"); h != fmt.Sprintf("web pid=%d", app.PID()) {
		t.Errorf("X-Demo-App %q", h)
	}
}

// TestDrainOnSIGTERM: a request in flight when SIGTERM arrives is answered,
// and the exit log counts it.
func TestDrainOnSIGTERM(t *testing.T) {
	app, addr := startApp(t, "--drain", "10s")
	answered := make(chan error, 1)
	go func() {
		tr := &http.Transport{DisableKeepAlives: true}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("http://" + addr + "/?delay=700ms")
		if err == nil {
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if err == nil && resp.StatusCode != 200 {
				err = fmt.Errorf("status %d", resp.StatusCode)
			}
		}
		answered <- err
	}()
	time.Sleep(200 * time.Millisecond) // the request is in the app by now
	app.Signal(t, syscall.SIGTERM)
	if err := <-answered; err != nil {
		t.Errorf("in-flight request: %v", err)
	}
	if code := app.Wait(t, 10*time.Second); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
	if log := app.Stderr.String(); !strings.Contains(log, "msg=exiting") || !strings.Contains(log, "requests=1") {
		t.Errorf("exit log lacks the request count:\n%s", log)
	}
}

func TestBadFlags(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--drain", "-1s"}, "--drain -1s: must not be negative"},
		{[]string{"--name", ""}, "--name: must not be empty"},
		{[]string{"extra"}, `unexpected argument \"extra\"`},
		{[]string{"--listen", "127.0.0.1:bad"}, "listen"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			out, err := exec.Command(appBin, tt.args...).CombinedOutput()
			if err == nil {
				t.Fatalf("exit 0, want an error; output:\n%s", out)
			}
			if !strings.Contains(string(out), tt.want) {
				t.Errorf("output lacks %q:\n%s", tt.want, out)
			}
		})
	}
}
