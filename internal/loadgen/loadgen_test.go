package loadgen

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/meshagent/meshagent/internal/proctest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// httpServer serves h on a real loopback socket and counts the connections
// it accepted.
func httpServer(t *testing.T, h http.HandlerFunc) (string, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns atomic.Int64
	srv := &http.Server{Handler: h, ConnState: func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}}
	done := make(chan struct{})
	go func() { srv.Serve(ln); close(done) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return "http://" + ln.Addr().String() + "/", &conns
}

// rawServer accepts connections on a real loopback socket and hands each to
// handle, which owns it.
func rawServer(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var open []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			open = append(open, c)
			mu.Unlock()
			wg.Add(1)
			go func() { defer wg.Done(); handle(c) }()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return "http://" + ln.Addr().String() + "/"
}

// readRequest reads one request's header off c.
func readRequest(c net.Conn) error {
	_, err := http.ReadRequest(bufio.NewReader(c))
	return err
}

func closedPortURL(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "http://" + addr + "/"
}

// TestOutcomesAgainstRealServers points the generator at real sockets that
// misbehave in one way each and checks every request lands in that outcome
// and nowhere else.
func TestOutcomesAgainstRealServers(t *testing.T) {
	tests := []struct {
		name   string
		target func(t *testing.T) string
		cfg    Config
		want   Outcome
	}{
		{name: "ok", want: OK, target: func(t *testing.T) string {
			u, _ := httpServer(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hi") })
			return u
		}},
		{name: "non2xx", want: Non2xx, target: func(t *testing.T) string {
			u, _ := httpServer(t, func(w http.ResponseWriter, r *http.Request) { http.Error(w, "no", http.StatusServiceUnavailable) })
			return u
		}},
		{name: "refused: port closed", want: Refused, target: closedPortURL},
		{name: "reset: server aborts the connection", want: Reset, target: func(t *testing.T) string {
			return rawServer(t, func(c net.Conn) {
				readRequest(c)
				c.(*net.TCPConn).SetLinger(0) // close sends RST
				c.Close()
			})
		}},
		{name: "eof: server closes without answering", want: EOF, target: func(t *testing.T) string {
			return rawServer(t, func(c net.Conn) {
				readRequest(c)
				c.Close()
			})
		}},
		{name: "timeout: server never answers", want: Timeout, cfg: Config{Timeout: 150 * time.Millisecond}, target: func(t *testing.T) string {
			return rawServer(t, func(c net.Conn) {
				readRequest(c)
				io.Copy(io.Discard, c) // hold it open until the client gives up
				c.Close()
			})
		}},
	}
	for _, tt := range tests {
		for _, ratio := range []float64{0, 1} {
			t.Run(fmt.Sprintf("%s/new-conn-%v", tt.name, ratio), func(t *testing.T) {
				proctest.CheckFDs(t)
				cfg := tt.cfg
				cfg.Target = tt.target(t)
				cfg.Rate = 100
				cfg.Duration = 300 * time.Millisecond
				cfg.NewConnRatio = ratio
				if cfg.Timeout == 0 {
					// Generous: on a busy machine a misbehaving server's
					// goroutine may be late, and that must not look like a
					// timeout.
					cfg.Timeout = 10 * time.Second
				}
				// POST: Go's client would retry a GET on a reused connection
				// the server closed, hiding resets and EOFs.
				cfg.Method = http.MethodPost
				res, err := Run(context.Background(), cfg)
				if err != nil {
					t.Fatal(err)
				}
				if got := res.Counts.Scheduled(); got != 30 {
					t.Errorf("scheduled %d, want 30 (100/s for 300ms)", got)
				}
				if got := res.Counts.Get(tt.want); got != res.Counts.Scheduled() {
					t.Errorf("%s: %d of %d, counts %+v, other errors %v", tt.want, got, res.Counts.Scheduled(), res.Counts, res.OtherErrors)
				}
				if tt.want == OK || tt.want == Non2xx {
					if res.Latency.N != 30 || res.Latency.Max <= 0 || res.Latency.P50 > res.Latency.P99 {
						t.Errorf("latency %+v, want 30 ordered samples", res.Latency)
					}
				} else if res.Latency.N != 0 {
					t.Errorf("latency has %d samples for failed requests, want none", res.Latency.N)
				}
			})
		}
	}
}

// TestNewConnRatio counts the connections the server accepted.
func TestNewConnRatio(t *testing.T) {
	tests := []struct {
		ratio    float64
		min, max int64 // accepted connections for 50 requests
	}{
		{ratio: 1, min: 50, max: 50},
		{ratio: 0.5, min: 25, max: 49},
		{ratio: 0, min: 1, max: 24},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprint(tt.ratio), func(t *testing.T) {
			proctest.CheckFDs(t)
			target, conns := httpServer(t, func(w http.ResponseWriter, r *http.Request) {})
			res, err := Run(context.Background(), Config{Target: target, Rate: 100, Duration: 500 * time.Millisecond, NewConnRatio: tt.ratio})
			if err != nil {
				t.Fatal(err)
			}
			if res.Counts.OK != 50 {
				t.Fatalf("ok %d, want 50: %+v", res.Counts.OK, res.Counts)
			}
			if got := conns.Load(); got < tt.min || got > tt.max {
				t.Errorf("server accepted %d connections for 50 requests at new-conn ratio %v, want %d to %d", got, tt.ratio, tt.min, tt.max)
			}
		})
	}
}

// TestWindowsAndSkipped: a slow server with MaxInFlight 2 makes due requests
// skip; the windows arrive in order through OnWindow and add up to the total.
func TestWindowsAndSkipped(t *testing.T) {
	proctest.CheckFDs(t)
	target, _ := httpServer(t, func(w http.ResponseWriter, r *http.Request) { time.Sleep(150 * time.Millisecond) })
	var seen []Window
	res, err := Run(context.Background(), Config{
		Target: target, Rate: 100, Duration: time.Second, Window: 250 * time.Millisecond,
		MaxInFlight: 2, OnWindow: func(w Window) { seen = append(seen, w) },
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Counts.Scheduled() != 100 {
		t.Errorf("scheduled %d, want 100", res.Counts.Scheduled())
	}
	if res.Counts.Skipped == 0 || res.Counts.OK == 0 {
		t.Errorf("counts %+v: want both skipped (2 in flight, 150ms each, 100/s) and ok", res.Counts)
	}
	if res.Counts.OK > 20 {
		t.Errorf("ok %d: more than 2 in flight at a time can serve in 1s", res.Counts.OK)
	}
	if len(seen) != 4 || len(res.Windows) != 4 {
		t.Fatalf("%d windows reported, %d in result, want 4", len(seen), len(res.Windows))
	}
	var sum Counts
	for i, w := range seen {
		if w.Index != i || w.Start != time.Duration(i)*250*time.Millisecond {
			t.Errorf("window %d: index %d start %s", i, w.Index, w.Start)
		}
		if w.Counts.Scheduled() != 25 {
			t.Errorf("window %d: %d scheduled, want 25", i, w.Counts.Scheduled())
		}
		sum.add(w.Counts)
	}
	if sum != res.Counts {
		t.Errorf("windows add up to %+v, result says %+v", sum, res.Counts)
	}
}

// TestLatencyCoversTheAnswer: latency runs to the last byte of the answer,
// so it can never be below the server's service time.
func TestLatencyCoversTheAnswer(t *testing.T) {
	proctest.CheckFDs(t)
	target, _ := httpServer(t, func(w http.ResponseWriter, r *http.Request) { time.Sleep(100 * time.Millisecond) })
	res, err := Run(context.Background(), Config{Target: target, Rate: 20, Duration: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if res.Counts.OK != 10 {
		t.Fatalf("counts %+v, want 10 ok", res.Counts)
	}
	if res.Latency.N != 10 || res.Latency.P50 < 100*time.Millisecond {
		t.Errorf("latency %+v: want 10 samples, p50 not below the server's 100ms", res.Latency)
	}
}

func TestStopEarly(t *testing.T) {
	proctest.CheckFDs(t)
	target, _ := httpServer(t, func(w http.ResponseWriter, r *http.Request) {})
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	res, err := Run(ctx, Config{Target: target, Rate: 100, Duration: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("run took %s after its context ended at 300ms", took)
	}
	if !res.Stopped {
		t.Error("Stopped not set")
	}
	if n := res.Counts.Scheduled(); n == 0 || n >= 6000 || res.Counts.Failed() != 0 {
		t.Errorf("counts %+v: want some ok, none failed, fewer than a full minute's", res.Counts)
	}
	if len(res.Windows) != 1 {
		t.Errorf("%d windows, want 1 (only the first second had requests)", len(res.Windows))
	}
}

func TestConfigErrors(t *testing.T) {
	good := Config{Target: "http://127.0.0.1:1/", Rate: 1, Duration: time.Second}
	tests := []struct {
		name     string
		mod      func(*Config)
		wantErr  string
		loopback bool // errors.Is(err, ErrNotLoopback)
	}{
		{name: "no target", mod: func(c *Config) { c.Target = "" }, wantErr: "target: required"},
		{name: "https", mod: func(c *Config) { c.Target = "https://127.0.0.1/" }, wantErr: `scheme "https": only http`},
		{name: "remote ip", mod: func(c *Config) { c.Target = "http://10.1.2.3:80/" }, wantErr: `host "10.1.2.3"`, loopback: true},
		{name: "remote name", mod: func(c *Config) { c.Target = "http://example.com/" }, wantErr: `host "example.com"`, loopback: true},
		{name: "unspecified ip", mod: func(c *Config) { c.Target = "http://0.0.0.0:80/" }, wantErr: `host "0.0.0.0"`, loopback: true},
		{name: "zero rate", mod: func(c *Config) { c.Rate = 0 }, wantErr: "rate 0: want more than 0"},
		{name: "huge rate", mod: func(c *Config) { c.Rate = 1e9 }, wantErr: "at most 100000 requests per second"},
		{name: "no duration", mod: func(c *Config) { c.Duration = 0 }, wantErr: "duration 0s: want more than 0"},
		{name: "endless", mod: func(c *Config) { c.Duration = 2 * time.Hour }, wantErr: "at most 1h0m0s"},
		{name: "ratio", mod: func(c *Config) { c.NewConnRatio = 1.5 }, wantErr: "new-conn ratio 1.5: want 0 to 1"},
		{name: "timeout", mod: func(c *Config) { c.Timeout = -1 }, wantErr: "timeout -1ns"},
		{name: "window", mod: func(c *Config) { c.Window = time.Millisecond }, wantErr: "window 1ms: want 0 (default) or at least 10ms"},
		{name: "method", mod: func(c *Config) { c.Method = "get" }, wantErr: `method "get"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := good
			tt.mod(&c)
			_, err := Run(context.Background(), c)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
			}
			if got := errors.Is(err, ErrNotLoopback); got != tt.loopback {
				t.Errorf("errors.Is(err, ErrNotLoopback) = %v, want %v", got, tt.loopback)
			}
		})
	}
}

// TestDialerRefusesNonLoopback checks the last line of defence on its own:
// whatever a name resolves to, the dialer connects to loopback only.
func TestDialerRefusesNonLoopback(t *testing.T) {
	for _, addr := range []string{"10.0.0.1:80", "[2001:db8::1]:80", "0.0.0.0:80"} {
		if err := loopbackOnly("tcp", addr, nil); !errors.Is(err, ErrNotLoopback) {
			t.Errorf("%s: %v, want ErrNotLoopback", addr, err)
		}
	}
	for _, addr := range []string{"127.0.0.1:80", "127.8.9.1:80", "[::1]:80"} {
		if err := loopbackOnly("tcp", addr, nil); err != nil {
			t.Errorf("%s: %v, want allowed", addr, err)
		}
	}
}

func TestClassify(t *testing.T) {
	op := func(e error) error {
		return &url.Error{Op: "Post", URL: "http://127.0.0.1/", Err: &net.OpError{Op: "read", Net: "tcp", Err: e}}
	}
	tests := []struct {
		name   string
		err    error
		status int
		want   Outcome
	}{
		{"200", nil, 200, OK},
		{"204", nil, 204, OK},
		{"302", nil, 302, Non2xx},
		{"503", nil, 503, Non2xx},
		{"refused", op(os.NewSyscallError("connect", syscall.ECONNREFUSED)), 0, Refused},
		{"reset", op(os.NewSyscallError("read", syscall.ECONNRESET)), 0, Reset},
		{"broken pipe", op(os.NewSyscallError("write", syscall.EPIPE)), 0, Reset},
		{"deadline", &url.Error{Op: "Get", Err: context.DeadlineExceeded}, 0, Timeout},
		{"eof", &url.Error{Op: "Get", Err: io.EOF}, 0, EOF},
		{"unexpected eof in body", io.ErrUnexpectedEOF, 200, EOF},
		{"kept-alive connection closed by the server", &url.Error{Op: "Get", Err: errors.New("http: server closed idle connection")}, 0, EOF},
		{"other", errors.New("boom"), 0, Other},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := classify(tt.err, tt.status); got != tt.want {
				t.Errorf("classify(%v, %d) = %s, want %s", tt.err, tt.status, got, tt.want)
			}
		})
	}
}
