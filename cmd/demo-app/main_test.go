package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

var appBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "demo-app-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "temp dir:", err)
		os.Exit(1)
	}
	appBin = filepath.Join(dir, "demo-app")
	if out, err := exec.Command("go", "build", "-o", appBin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startApp runs the real binary on a free port and waits until it accepts.
// The returned channel is closed when the process has exited; its exit error
// is then in *exitErr.
func startApp(t *testing.T, args ...string) (cmd *exec.Cmd, addr string, stderr *lockedBuffer, done <-chan struct{}, exitErr *error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr = ln.Addr().String()
	ln.Close()
	cmd = exec.Command(appBin, append([]string{"--listen", addr}, args...)...)
	stderr = &lockedBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	exitErr = new(error)
	go func() {
		*exitErr = cmd.Wait()
		close(exited)
	}()
	done = exited
	t.Cleanup(func() {
		select {
		case <-exited:
		default:
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("demo-app stderr:\n%s", stderr)
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return cmd, addr, stderr, done, exitErr
		}
		if time.Now().After(deadline) {
			t.Fatalf("demo-app on %s not accepting: %v", addr, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
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
	cmd, addr, _, _, _ := startApp(t, "--name", "web", "--started-file", sf)
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
		{"/any/path", 200, fmt.Sprintf(`"pid":%d`, cmd.Process.Pid)},
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
	if h := resp.Header.Get("X-Demo-App"); h != fmt.Sprintf("web pid=%d", cmd.Process.Pid) {
		t.Errorf("X-Demo-App %q", h)
	}
}

// TestDrainOnSIGTERM: a request in flight when SIGTERM arrives is answered,
// and the exit log counts it.
func TestDrainOnSIGTERM(t *testing.T) {
	cmd, addr, stderr, done, exitErr := startApp(t, "--drain", "10s")
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
	cmd.Process.Signal(syscall.SIGTERM)
	if err := <-answered; err != nil {
		t.Errorf("in-flight request: %v", err)
	}
	select {
	case <-done:
		if *exitErr != nil {
			t.Errorf("exit: %v, want status 0", *exitErr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("still running 10s after SIGTERM")
	}
	if !strings.Contains(stderr.String(), "msg=exiting") || !strings.Contains(stderr.String(), "requests=1") {
		t.Errorf("exit log lacks the request count:\n%s", stderr)
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
