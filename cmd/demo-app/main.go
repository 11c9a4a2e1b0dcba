// Command demo-app is the application half of meshagent's demo pods: a small
// HTTP server that answers GET / with who it is, so a request sent through a
// demo sidecar shows which app process served it.
//
// It records the moment its main starts (--started-file) so tests can prove,
// with the processes' own timestamps, that an app never started before its
// sidecar's port accepted. On SIGTERM or SIGINT it stops accepting, lets the
// in-flight requests finish within --drain, logs how many requests it served
// and exits 0.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/meshagent/meshagent/internal/demo"
	"github.com/meshagent/meshagent/internal/httpdrain"
)

// maxDelay bounds the ?delay= a client may ask for, so a stray request cannot
// hold a drain open for longer than a test would wait.
const maxDelay = 30 * time.Second

func main() {
	// The very first thing: tests compare this with the sidecar's own
	// "bound" timestamp, so nothing may run before it.
	started := time.Now()
	os.Exit(run(started, os.Args[1:], os.Stderr))
}

type config struct {
	listen      string
	name        string
	startedFile string
	drain       time.Duration
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("demo-app", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.listen, "listen", "127.0.0.1:18080", "address to serve HTTP on")
	fs.StringVar(&c.name, "name", "demo-app", "name reported in every response")
	fs.StringVar(&c.startedFile, "started-file", "", "write the UnixNano time main started to this file")
	fs.DurationVar(&c.drain, "drain", 5*time.Second, "how long in-flight requests may take to finish after SIGTERM")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if c.drain < 0 {
		return c, fmt.Errorf("--drain %s: must not be negative", c.drain)
	}
	if c.name == "" {
		return c, errors.New("--name: must not be empty")
	}
	return c, nil
}

func run(started time.Time, args []string, stderr io.Writer) int {
	// Signals first: a SIGTERM that arrives while we bind must still mean
	// "stop cleanly", not the default "die".
	ctx, stop, log := demo.Start("demo-app", stderr)
	defer stop()

	c, err := parseFlags(args, stderr)
	if err != nil {
		return demo.FlagsExit(log, err)
	}
	log = log.With("name", c.name)
	if c.startedFile != "" {
		stamp := strconv.FormatInt(started.UnixNano(), 10) + "\n"
		if err := os.WriteFile(c.startedFile, []byte(stamp), 0o644); err != nil {
			log.Error("write started file", "path", c.startedFile, "err", err)
			return 1
		}
	}

	ln, err := net.Listen("tcp", c.listen)
	if err != nil {
		log.Error("listen", "addr", c.listen, "err", err)
		return 1
	}
	log.Info("listening", "addr", ln.Addr().String(), "time", time.Now().Format(time.RFC3339Nano))

	a := &app{name: c.name, pid: os.Getpid()}
	srv := httpdrain.New(ln, a.routes())
	go srv.Serve()

	select {
	case <-srv.Done():
		log.Error("serve stopped", "addr", ln.Addr().String())
		return 1
	case <-ctx.Done():
	}
	stop() // a second signal now kills us the default way
	log.Info("draining", "deadline", c.drain.String())
	demo.Drain(log, srv, c.drain)
	log.Info("exiting", "requests", a.requests.Load())
	return 0
}

type app struct {
	name     string
	pid      int
	requests atomic.Int64
}

func (a *app) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("/", a.serveRoot)
	return mux
}

// serveRoot answers any method on any path not matched above, so load tests
// may use POST (which Go's client does not silently retry) as well as GET.
// ?delay=DURATION holds the request that long (for drain tests) and
// ?status=CODE answers with that status (for non-2xx tests).
func (a *app) serveRoot(w http.ResponseWriter, r *http.Request) {
	n := a.requests.Add(1)
	q := r.URL.Query()
	status := http.StatusOK
	if s := q.Get("status"); s != "" {
		code, err := strconv.Atoi(s)
		if err != nil || code < 200 || code > 599 {
			http.Error(w, fmt.Sprintf("status %q: want a number from 200 to 599", s), http.StatusBadRequest)
			return
		}
		status = code
	}
	if s := q.Get("delay"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 || d > maxDelay {
			http.Error(w, fmt.Sprintf("delay %q: want a duration from 0 to %s", s, maxDelay), http.StatusBadRequest)
			return
		}
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	io.Copy(io.Discard, io.LimitReader(r.Body, 1<<20))
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Demo-App", fmt.Sprintf("%s pid=%d", a.name, a.pid))
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(struct {
		App      string `json:"app"`
		PID      int    `json:"pid"`
		Time     string `json:"time"`
		Requests int64  `json:"requests"`
	}{a.name, a.pid, time.Now().Format(time.RFC3339Nano), n})
}
