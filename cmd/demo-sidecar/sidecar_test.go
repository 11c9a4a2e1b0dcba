package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshagent/meshagent/internal/proctest"
)

func TestParseListenEnv(t *testing.T) {
	const pid = 4242
	tests := []struct {
		name    string
		env     map[string]string
		want    []passedFD
		wantErr string
	}{
		{name: "not activated", env: map[string]string{}},
		{name: "fds for another process", env: map[string]string{"LISTEN_PID": "17", "LISTEN_FDS": "1"}},
		{name: "no LISTEN_PID means none for us", env: map[string]string{"LISTEN_FDS": "2"}},
		{name: "one unnamed", env: map[string]string{"LISTEN_PID": "4242", "LISTEN_FDS": "1"},
			want: []passedFD{{3, "unknown"}}},
		{name: "named", env: map[string]string{"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "admin:listen"},
			want: []passedFD{{3, "admin"}, {4, "listen"}}},
		{name: "zero fds", env: map[string]string{"LISTEN_PID": "4242", "LISTEN_FDS": "0"}},
		{name: "bad pid", env: map[string]string{"LISTEN_PID": "x1", "LISTEN_FDS": "1"}, wantErr: `LISTEN_PID="x1": not a process id`},
		{name: "missing count", env: map[string]string{"LISTEN_PID": "4242"}, wantErr: "LISTEN_FDS is not set"},
		{name: "bad count", env: map[string]string{"LISTEN_PID": "4242", "LISTEN_FDS": "-1"}, wantErr: `LISTEN_FDS="-1": not a count of fds`},
		{name: "too many", env: map[string]string{"LISTEN_PID": "4242", "LISTEN_FDS": "5000"}, wantErr: "LISTEN_FDS=5000: more than 1024 fds"},
		{name: "names do not match count", env: map[string]string{"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "listen"},
			wantErr: `LISTEN_FDNAMES="listen": 1 names for LISTEN_FDS=2`},
		{name: "empty name", env: map[string]string{"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "listen:"},
			wantErr: `LISTEN_FDNAMES="listen:": name 1 is empty`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseListenEnv(func(k string) string { return tt.env[k] }, pid)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Fatalf("got %v, want %v", got, tt.want)
			}
		})
	}
}

func TestParseFlags(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{name: "minimal", args: []string{"--upstream", "127.0.0.1:8080"}},
		{name: "no upstream", args: nil, wantErr: "--upstream: required"},
		{name: "upstream without port", args: []string{"--upstream", "localhost"}, wantErr: `--upstream "localhost": want host:port`},
		{name: "negative drain", args: []string{"--upstream", "a:1", "--drain", "-1s"}, wantErr: "--drain -1s: must not be negative"},
		{name: "stray argument", args: []string{"--upstream", "a:1", "extra"}, wantErr: `unexpected argument "extra"`},
		{name: "unknown flag", args: []string{"--nope"}, wantErr: "flag provided but not defined: -nope"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseFlags(tt.args, io.Discard)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}

// TestReadyAfterAndForwarding starts a real app and a real sidecar: /ready
// must answer 503 before --ready-after and 200 after, a connection made
// before ready waits (it is not refused) and is answered once ready, and the
// answer comes from the app through this very sidecar.
func TestReadyAfterAndForwarding(t *testing.T) {
	proctest.CheckFDs(t)
	app, appAddr := startApp(t, "app-"+t.Name())
	dir := t.TempDir()
	rf := filepath.Join(dir, "ready")
	const readyAfter = 700 * time.Millisecond
	sc := proctest.Start(t, "sidecar", bins.sidecar, []string{
		"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", appAddr,
		"--ready-after", readyAfter.String(), "--ready-file", rf,
	}, proctest.Options{})
	bound := waitMark(t, sc, rf, "bound", 10*time.Second)
	listen, admin := bound.fields["listen"], bound.fields["admin"]
	if bound.fields["source"] != "bound" {
		t.Fatalf("source %q, want bound", bound.fields["source"])
	}

	// A request sent now, before ready, must wait in the accept queue.
	early := make(chan error, 1)
	var earlyDone time.Time
	go func() {
		c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 15 * time.Second}
		resp, err := c.Get("http://" + listen + "/")
		earlyDone = time.Now()
		if err == nil {
			if resp.StatusCode != 200 {
				err = fmt.Errorf("early request: status %d", resp.StatusCode)
			}
			resp.Body.Close()
		}
		early <- err
	}()

	// Probe /ready until it says 200, noting when each answer arrived.
	type probe struct {
		answered time.Time
		status   int
	}
	var probes []probe
	adminClient := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	for {
		resp, err := adminClient.Get("http://" + admin + "/ready")
		if err != nil {
			t.Fatalf("GET /ready: %v", err)
		}
		resp.Body.Close()
		probes = append(probes, probe{time.Now(), resp.StatusCode})
		if resp.StatusCode == 200 {
			break
		}
		if time.Since(bound.at) > 15*time.Second {
			t.Fatalf("not ready 15s after binding")
		}
		time.Sleep(20 * time.Millisecond)
	}
	ready := waitMark(t, sc, rf, "ready", time.Second)
	if got := ready.at.Sub(bound.at); got < readyAfter {
		t.Errorf("ready %s after binding, want at least --ready-after %s", got, readyAfter)
	}
	answeredBefore := 0
	for _, p := range probes {
		// An answer that arrived before the sidecar's own ready time was
		// decided before it: it must say 503.
		if p.answered.Before(ready.at) {
			answeredBefore++
			if p.status != http.StatusServiceUnavailable {
				t.Errorf("/ready answered %d %s before ready, want 503", p.status, ready.at.Sub(p.answered))
			}
		}
	}
	if answeredBefore == 0 {
		t.Errorf("no /ready probe was answered in the %s before ready; cannot tell 503 from 200", readyAfter)
	}

	if err := <-early; err != nil {
		t.Fatalf("request sent before ready: %v", err)
	}
	if earlyDone.Before(ready.at) {
		t.Errorf("request sent before ready was answered %s before ready", ready.at.Sub(earlyDone))
	}

	status, via, body := get(t, "http://"+listen+"/")
	if status != 200 {
		t.Fatalf("status %d, body %s", status, body)
	}
	if want := fmt.Sprintf("pid=%d", sc.PID()); !strings.Contains(via, want) {
		t.Errorf("X-Demo-Sidecar %q, want it to name %s", via, want)
	}
	var got struct {
		App string `json:"app"`
		PID int    `json:"pid"`
	}
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatalf("app body %q: %v", body, err)
	}
	if got.PID != app.PID() || got.App != "app-"+t.Name() {
		t.Errorf("served by app %q pid %d, want %q pid %d", got.App, got.PID, "app-"+t.Name(), app.PID())
	}

	sc.Signal(t, syscall.SIGTERM)
	if code := sc.Wait(t, 10*time.Second); code != 0 {
		t.Errorf("sidecar exit code %d after SIGTERM, want 0", code)
	}
	app.Signal(t, syscall.SIGTERM)
	if code := app.Wait(t, 10*time.Second); code != 0 {
		t.Errorf("app exit code %d after SIGTERM, want 0", code)
	}
}

// TestSocketActivation passes a real listening socket the systemd way and
// checks the sidecar serves on it and did not bind --listen itself.
func TestSocketActivation(t *testing.T) {
	proctest.CheckFDs(t)
	_, appAddr := startApp(t, "app")
	f, passedAddr := heldListener(t)
	passedInode := fdInode(t, int(f.Fd()))
	notBound := proctest.FreeAddr(t) // the sidecar would bind this if it ignored the passed socket

	rf := filepath.Join(t.TempDir(), "ready")
	sc := proctest.Start(t, "sidecar", bins.sidecar, []string{
		"--listen", notBound, "--admin", "", "--upstream", appAddr,
		"--ready-after", "50ms", "--ready-file", rf,
	}, proctest.Options{
		Env:      []string{"LISTEN_FDS=1", "LISTEN_FDNAMES=listen"},
		Files:    []*os.File{f},
		ShellPID: true,
	})
	// From now on only the sidecar holds the socket.
	f.Close()

	bound := waitMark(t, sc, rf, "bound", 10*time.Second)
	waitMark(t, sc, rf, "ready", 10*time.Second)
	if bound.fields["source"] != "activation" || bound.fields["listen"] != passedAddr {
		t.Errorf("bound line %v, want source=activation listen=%s", bound.fields, passedAddr)
	}
	status, via, body := get(t, "http://"+passedAddr+"/")
	if status != 200 || !strings.Contains(via, fmt.Sprintf("pid=%d", sc.PID())) {
		t.Fatalf("via passed socket: status %d, X-Demo-Sidecar %q, body %s", status, via, body)
	}
	if c, err := net.DialTimeout("tcp", notBound, time.Second); err == nil {
		c.Close()
		t.Errorf("something accepts on %s: the sidecar bound --listen although a socket was passed", notBound)
	}
	if !socketInodes(t, sc.PID())[passedInode] {
		t.Errorf("sidecar pid %d does not hold the passed socket (inode %d)", sc.PID(), passedInode)
	}
	sc.Signal(t, syscall.SIGTERM)
	if code := sc.Wait(t, 10*time.Second); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
}

// notifySocket is a test-owned sd_notify receiver.
type notifySocket struct {
	path string
	conn *net.UnixConn
}

func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatalf("notify socket: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return &notifySocket{path: path, conn: conn}
}

// recv reads one datagram; the caller owns the returned fds.
func (n *notifySocket) recv(t *testing.T, within time.Duration) (string, []int) {
	t.Helper()
	n.conn.SetReadDeadline(time.Now().Add(within))
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(16*4))
	nb, noob, flags, _, err := n.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		t.Fatalf("notify socket: read: %v", err)
	}
	if flags&unix.MSG_CTRUNC != 0 {
		t.Fatalf("notify socket: control data truncated")
	}
	var fds []int
	msgs, err := unix.ParseSocketControlMessage(oob[:noob])
	if err != nil {
		t.Fatalf("notify socket: control data: %v", err)
	}
	for _, m := range msgs {
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			t.Fatalf("notify socket: rights: %v", err)
		}
		fds = append(fds, got...)
	}
	return string(buf[:nb]), fds
}

// TestFDStore checks the FDSTORE datagram carries the very listening socket
// the sidecar serves on, that READY=1 and STOPPING=1 follow, and that the
// stored fd keeps the port across a SIGKILL: a request sent while no sidecar
// runs is answered by the next one, started with that fd.
func TestFDStore(t *testing.T) {
	proctest.CheckFDs(t)
	_, appAddr := startApp(t, "app")
	ns := newNotifySocket(t)
	dir := t.TempDir()
	rf1 := filepath.Join(dir, "ready1")
	sc := proctest.Start(t, "sidecar-1", bins.sidecar, []string{
		"--listen", "127.0.0.1:0", "--admin", "", "--upstream", appAddr,
		"--ready-after", "200ms", "--ready-file", rf1, "--fdstore",
	}, proctest.Options{Env: []string{"NOTIFY_SOCKET=" + ns.path}})

	msg, fds := ns.recv(t, 10*time.Second)
	// Each received fd goes into an os.File at once, so exactly one owner
	// closes it (a raw close plus an os.File's finalizer would close the
	// number twice, the second time someone else's fd).
	files := make([]*os.File, len(fds))
	for i, fd := range fds {
		files[i] = os.NewFile(uintptr(fd), fmt.Sprintf("received-%d", i))
		defer files[i].Close()
	}
	if msg != "FDSTORE=1\nFDNAME=listen" || len(fds) != 1 {
		t.Fatalf("first notify message %q with %d fds, want FDSTORE=1\\nFDNAME=listen with 1 fd", msg, len(fds))
	}
	storedFile := files[0]
	// The raw number, not storedFile.Fd(): Fd() would switch the socket,
	// shared with the running sidecar, to blocking mode.
	stored := fds[0]
	bound := waitMark(t, sc, rf1, "bound", 10*time.Second)
	if !socketInodes(t, sc.PID())[fdInode(t, stored)] {
		t.Errorf("stored fd (inode %d) is not a socket the sidecar holds", fdInode(t, stored))
	}
	if acc, err := unix.GetsockoptInt(stored, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || acc != 1 {
		t.Errorf("stored fd: SO_ACCEPTCONN=%d (%v), want a listening socket", acc, err)
	}
	sa, err := unix.Getsockname(stored)
	if err != nil {
		t.Fatal(err)
	}
	in4, ok := sa.(*unix.SockaddrInet4)
	if !ok || fmt.Sprintf("127.0.0.1:%d", in4.Port) != bound.fields["listen"] {
		t.Errorf("stored fd bound to %v, sidecar listens on %s", sa, bound.fields["listen"])
	}

	if msg, fds := ns.recv(t, 10*time.Second); msg != "READY=1" || len(fds) != 0 {
		t.Fatalf("second notify message %q with %d fds, want READY=1", msg, len(fds))
	}

	// Crash the sidecar. The stored fd keeps the socket listening: a
	// request now waits in the accept queue instead of being refused.
	sc.Signal(t, syscall.SIGKILL)
	sc.Wait(t, 10*time.Second)
	listen := bound.fields["listen"]
	type answer struct {
		status int
		via    string
		err    error
	}
	answered := make(chan answer, 1)
	go func() {
		c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 20 * time.Second}
		resp, err := c.Get("http://" + listen + "/")
		if err != nil {
			answered <- answer{err: err}
			return
		}
		resp.Body.Close()
		answered <- answer{status: resp.StatusCode, via: resp.Header.Get("X-Demo-Sidecar")}
	}()
	time.Sleep(100 * time.Millisecond) // let the request reach the accept queue

	rf2 := filepath.Join(dir, "ready2")
	sc2 := proctest.Start(t, "sidecar-2", bins.sidecar, []string{
		"--listen", "127.0.0.1:1", "--admin", "", "--upstream", appAddr,
		"--ready-after", "100ms", "--ready-file", rf2, "--fdstore",
	}, proctest.Options{
		Env:      []string{"NOTIFY_SOCKET=" + ns.path, "LISTEN_FDS=1", "LISTEN_FDNAMES=listen"},
		Files:    []*os.File{storedFile},
		ShellPID: true,
	})
	a := <-answered
	if a.err != nil {
		t.Fatalf("request sent while no sidecar ran: %v", a.err)
	}
	if a.status != 200 || !strings.Contains(a.via, fmt.Sprintf("pid=%d", sc2.PID())) {
		t.Fatalf("request sent while no sidecar ran: status %d via %q, want 200 via pid %d", a.status, a.via, sc2.PID())
	}
	// The restarted sidecar got the socket passed in: it must not store it
	// again, so the next datagram is READY=1.
	if msg, fds := ns.recv(t, 10*time.Second); msg != "READY=1" || len(fds) != 0 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		t.Fatalf("restarted sidecar's first notify message %q with %d fds, want READY=1", msg, len(fds))
	}
	sc2.Signal(t, syscall.SIGTERM)
	if msg, _ := ns.recv(t, 10*time.Second); msg != "STOPPING=1" {
		t.Errorf("notify message after SIGTERM %q, want STOPPING=1", msg)
	}
	if code := sc2.Wait(t, 10*time.Second); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
}

// TestDrainOnSIGTERM sends slow requests, then SIGTERM: every in-flight
// request must be answered, new connections refused (the sidecar was the only
// holder of its socket) and the exit code 0. With a short --drain, the
// sidecar gives up on a request that takes too long and still exits 0.
func TestDrainOnSIGTERM(t *testing.T) {
	tests := []struct {
		name      string
		drain     time.Duration
		delay     time.Duration
		wantOK    bool
		exitAfter time.Duration // upper bound for the exit, from SIGTERM
	}{
		{name: "requests finish", drain: 10 * time.Second, delay: 800 * time.Millisecond, wantOK: true, exitAfter: 9 * time.Second},
		{name: "drain deadline cuts", drain: 300 * time.Millisecond, delay: 20 * time.Second, wantOK: false, exitAfter: 10 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			proctest.CheckFDs(t)
			_, appAddr := startApp(t, "app")
			rf := filepath.Join(t.TempDir(), "ready")
			sc := proctest.Start(t, "sidecar", bins.sidecar, []string{
				"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", appAddr,
				"--ready-after", "10ms", "--ready-file", rf, "--drain", tt.drain.String(),
			}, proctest.Options{})
			bound := waitMark(t, sc, rf, "bound", 10*time.Second)
			waitMark(t, sc, rf, "ready", 10*time.Second)
			listen, admin := bound.fields["listen"], bound.fields["admin"]

			const n = 3
			tr := &http.Transport{}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
			var wg sync.WaitGroup
			errs := make([]error, n)
			for i := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					resp, err := client.Get(fmt.Sprintf("http://%s/?delay=%s", listen, tt.delay))
					if err == nil {
						_, err = io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
						if err == nil && resp.StatusCode != 200 {
							err = fmt.Errorf("status %d", resp.StatusCode)
						}
					}
					errs[i] = err
				}()
			}
			// Wait until all n are in the sidecar (its own count says so).
			waitRequests(t, admin, n)
			sent := time.Now()
			sc.Signal(t, syscall.SIGTERM)
			waitMark(t, sc, rf, "stopping", 10*time.Second)
			if c, err := net.DialTimeout("tcp", listen, time.Second); err == nil {
				c.Close()
				t.Errorf("new connection accepted after SIGTERM")
			}
			code := sc.Wait(t, tt.exitAfter+5*time.Second)
			took := time.Since(sent)
			wg.Wait()
			if code != 0 {
				t.Errorf("exit code %d, want 0", code)
			}
			if took > tt.exitAfter {
				t.Errorf("exited %s after SIGTERM, want within %s", took, tt.exitAfter)
			}
			for i, err := range errs {
				if tt.wantOK && err != nil {
					t.Errorf("in-flight request %d: %v", i, err)
				}
				if !tt.wantOK && err == nil {
					t.Errorf("in-flight request %d longer than --drain succeeded; the drain deadline was not applied", i)
				}
			}
		})
	}
}

func waitRequests(t *testing.T, admin string, n int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, _, body := get(t, "http://"+admin+"/version")
		var v struct {
			Requests int64 `json:"requests"`
		}
		if err := json.Unmarshal([]byte(body), &v); err != nil {
			t.Fatalf("/version %q: %v", body, err)
		}
		if v.Requests >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("sidecar saw %d requests, want %d", v.Requests, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestCrashAndUnready covers the failure switches the supervisor's tests use.
func TestCrashAndUnready(t *testing.T) {
	proctest.CheckFDs(t)
	_, appAddr := startApp(t, "app")
	t.Run("crash-after exits with its code", func(t *testing.T) {
		rf := filepath.Join(t.TempDir(), "ready")
		sc := proctest.Start(t, "sidecar", bins.sidecar, []string{
			"--listen", "127.0.0.1:0", "--admin", "", "--upstream", appAddr,
			"--ready-after", "10ms", "--crash-after", "200ms", "--ready-file", rf,
		}, proctest.Options{})
		ready := waitMark(t, sc, rf, "ready", 10*time.Second)
		if code := sc.Wait(t, 10*time.Second); code != crashExitCode {
			t.Errorf("exit code %d, want %d", code, crashExitCode)
		}
		if time.Since(ready.at) < 200*time.Millisecond {
			t.Errorf("crashed %s after ready, want at least 200ms", time.Since(ready.at))
		}
	})
	t.Run("SIGTERM before ready is a clean stop", func(t *testing.T) {
		rf := filepath.Join(t.TempDir(), "ready")
		sc := proctest.Start(t, "sidecar", bins.sidecar, []string{
			"--listen", "127.0.0.1:0", "--admin", "", "--upstream", appAddr,
			"--ready-after", "1h", "--ready-file", rf,
		}, proctest.Options{})
		bound := waitMark(t, sc, rf, "bound", 10*time.Second)
		sc.Signal(t, syscall.SIGTERM)
		if code := sc.Wait(t, 10*time.Second); code != 0 {
			t.Errorf("exit code %d, want 0", code)
		}
		for _, m := range readMarks(t, rf) {
			if m.event == "ready" {
				t.Errorf("became ready although --ready-after was 1h")
			}
		}
		if c, err := net.DialTimeout("tcp", bound.fields["listen"], time.Second); err == nil {
			c.Close()
			t.Errorf("port %s still accepts after the sidecar exited", bound.fields["listen"])
		}
	})
	t.Run("unready-after turns /ready to 503 and keeps forwarding", func(t *testing.T) {
		rf := filepath.Join(t.TempDir(), "ready")
		sc := proctest.Start(t, "sidecar", bins.sidecar, []string{
			"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", appAddr,
			"--ready-after", "10ms", "--unready-after", "100ms", "--ready-file", rf,
		}, proctest.Options{})
		bound := waitMark(t, sc, rf, "bound", 10*time.Second)
		deadline := time.Now().Add(10 * time.Second)
		for {
			status, _, _ := get(t, "http://"+bound.fields["admin"]+"/ready")
			if status == http.StatusServiceUnavailable && len(readMarks(t, rf)) >= 2 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("/ready never turned 503 after ready")
			}
			time.Sleep(20 * time.Millisecond)
		}
		if status, _, body := get(t, "http://"+bound.fields["listen"]+"/"); status != 200 {
			t.Errorf("unready sidecar: status %d (%s), want it still forwarding", status, body)
		}
		sc.Signal(t, syscall.SIGTERM)
		sc.Wait(t, 10*time.Second)
	})
}

// rawListenerFD returns a raw fd, owned by the caller, of a new loopback
// listening socket and the socket's address.
func rawListenerFD(t *testing.T) (int, string) {
	t.Helper()
	f, addr := heldListener(t) // closed at cleanup; the dup is the caller's
	fd, err := unix.Dup(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	return fd, addr
}

// TestTakeListeners hands real fds to takeListeners: the "listen" and
// "admin" ones become listeners on the right sockets, any other is closed,
// and a passed fd that is not a listening socket is refused with every fd
// closed.
func TestTakeListeners(t *testing.T) {
	proctest.CheckFDs(t)
	t.Run("named", func(t *testing.T) {
		adminFD, adminAddr := rawListenerFD(t)
		listenFD, listenAddr := rawListenerFD(t)
		extraFD, _ := rawListenerFD(t)
		// Fd numbers are reused at once, so count instead of probing them.
		before := proctest.CountFDs(t)
		a, err := takeListeners([]passedFD{{adminFD, "admin"}, {listenFD, "listen"}, {extraFD, "extra"}}, t.Logf)
		if err != nil {
			t.Fatal(err)
		}
		defer a.listen.Close()
		defer a.admin.Close()
		if a.listen.Addr().String() != listenAddr || a.admin.Addr().String() != adminAddr {
			t.Errorf("listen %s admin %s, want %s and %s", a.listen.Addr(), a.admin.Addr(), listenAddr, adminAddr)
		}
		// Three passed fds closed, two listeners' own fds open.
		if after := proctest.CountFDs(t); after != before-1 {
			t.Errorf("%d fds open after taking 3 passed fds into 2 listeners, want %d", after, before-1)
		}
	})
	t.Run("first unnamed is the listener", func(t *testing.T) {
		fd, addr := rawListenerFD(t)
		a, err := takeListeners([]passedFD{{fd, "unknown"}}, t.Logf)
		if err != nil {
			t.Fatal(err)
		}
		defer a.listen.Close()
		if a.listen.Addr().String() != addr || a.admin != nil {
			t.Errorf("listen %v admin %v, want %s and none", a.listen.Addr(), a.admin, addr)
		}
	})
	t.Run("not a socket", func(t *testing.T) {
		adminFD, _ := rawListenerFD(t)
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		defer unix.Close(p[1])
		before := proctest.CountFDs(t)
		_, err := takeListeners([]passedFD{{adminFD, "admin"}, {p[0], "listen"}}, t.Logf)
		want := fmt.Sprintf("passed fd %d (name \"listen\"): not a listening socket", p[0])
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("error %v, want one containing %q", err, want)
		}
		if after := proctest.CountFDs(t); after != before-2 {
			t.Errorf("%d fds open after the error, want %d: both passed fds closed, nothing kept", after, before-2)
		}
	})
}
