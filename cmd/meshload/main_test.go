package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"regexp"
	"testing"

	"github.com/meshagent/meshagent/internal/loadgen"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func server(t *testing.T, status int) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(status) })}
	done := make(chan struct{})
	go func() { srv.Serve(ln); close(done) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return "http://" + ln.Addr().String() + "/"
}

func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return "http://" + ln.Addr().String() + "/"
}

func TestRun(t *testing.T) {
	tests := []struct {
		name       string
		target     func(t *testing.T) string
		args       []string
		wantCode   int
		wantStdout string // regexp
		wantStderr string // regexp
	}{
		{name: "table", target: func(t *testing.T) string { return server(t, 200) },
			wantStdout: `(?m)^\s+ok\s+20$`},
		{name: "windows", target: func(t *testing.T) string { return server(t, 200) }, args: []string{"--windows", "--window", "100ms"},
			wantStdout: `(?m)^\s+start\s+ok\s+refused`},
		{name: "live", target: func(t *testing.T) string { return server(t, 200) }, args: []string{"--live"},
			wantStderr: `(?m)^\s+start\s+ok\s+refused`},
		{name: "refused is a result, not a failure", target: closedPort,
			wantStdout: `(?m)^\s+refused\s+20$`},
		{name: "fail-on-error", target: closedPort, args: []string{"--fail-on-error"},
			wantCode: 1, wantStderr: `meshload: 20 failed, 0 skipped`},
		{name: "fail-on-error with non-2xx", target: func(t *testing.T) string { return server(t, 500) }, args: []string{"--fail-on-error"},
			wantCode: 1, wantStderr: `meshload: 20 failed`},
		{name: "not loopback", target: func(*testing.T) string { return "http://192.0.2.1/" },
			wantCode: 2, wantStderr: `host "192\.0\.2\.1": not a loopback address`},
		{name: "bad flag", target: func(*testing.T) string { return "http://127.0.0.1/" }, args: []string{"--rate", "x"},
			wantCode: 2, wantStderr: `invalid value "x" for flag -rate`},
		{name: "stray argument", target: func(*testing.T) string { return "http://127.0.0.1/" }, args: []string{"extra"},
			wantCode: 2, wantStderr: `unexpected argument "extra"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			args := append([]string{"--target", tt.target(t), "--rate", "100", "--duration", "200ms"}, tt.args...)
			code := run(context.Background(), args, &stdout, &stderr)
			if code != tt.wantCode {
				t.Fatalf("exit code %d, want %d\nstdout:\n%s\nstderr:\n%s", code, tt.wantCode, &stdout, &stderr)
			}
			if !regexp.MustCompile(tt.wantStdout).MatchString(stdout.String()) {
				t.Errorf("stdout does not match %q:\n%s", tt.wantStdout, &stdout)
			}
			if !regexp.MustCompile(tt.wantStderr).MatchString(stderr.String()) {
				t.Errorf("stderr does not match %q:\n%s", tt.wantStderr, &stderr)
			}
		})
	}
}

func TestJSON(t *testing.T) {
	var stdout bytes.Buffer
	code := run(context.Background(), []string{"--target", server(t, 204), "--rate", "100", "--duration", "300ms", "--json"}, &stdout, io.Discard)
	if code != 0 {
		t.Fatalf("exit code %d", code)
	}
	var res loadgen.Result
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		t.Fatalf("output is not a JSON result: %v\n%s", err, &stdout)
	}
	if res.Counts.OK != 30 || res.Latency.N != 30 || len(res.Windows) != 1 {
		t.Errorf("result %+v: want 30 ok with latencies in 1 window", res)
	}
}
