// Command demo-sidecar is the stand-in for MOSN or Envoy in meshagent's demo
// and tests: an HTTP forwarding proxy in front of one app, with an admin
// endpoint that says when it is ready.
//
// Life of a demo sidecar:
//
//   - It gets its listening socket from the supervisor when one is passed
//     (systemd socket activation: LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES; the
//     fd named "listen", else the first; one named "admin" serves the admin
//     endpoint), or binds --listen itself. Only a socket it bound itself is
//     handed to the fd store (NOTIFY_SOCKET plus --fdstore: FDSTORE=1,
//     FDNAME=listen): a passed one is already held by whoever passed it.
//   - It takes --ready-after to become ready, like a real sidecar fetching its
//     configuration. Until then the admin endpoint's /ready answers 503 and
//     it does not accept on the listener, so connections wait in the kernel's
//     accept queue (and go to another process sharing the socket, e.g. the
//     old one during a hot upgrade). Once ready, /ready answers 200, READY=1
//     goes to NOTIFY_SOCKET, and requests are forwarded to --upstream with an
//     X-Demo-Sidecar header naming this process.
//   - On SIGTERM or SIGINT it stops accepting (closing only its own copy of
//     the socket), lets in-flight requests finish within --drain and exits 0.
//
// --ready-file records, in the process's own clock, when the socket was bound
// and when it became ready, so tests measure start-up ordering from the
// processes themselves. --crash-after and --unready-after make it crash or go
// unready on purpose, for restart and hang tests.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/meshagent/meshagent/internal/demo"
	"github.com/meshagent/meshagent/internal/httpdrain"
)

// crashExitCode is what --crash-after exits with, distinct from flag errors
// (2) and start-up failures (1).
const crashExitCode = 3

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

type config struct {
	listen       string
	upstream     string
	admin        string
	name         string
	version      string
	readyAfter   time.Duration
	unreadyAfter time.Duration
	crashAfter   time.Duration
	drain        time.Duration
	fdstore      bool
	readyFile    string
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("demo-sidecar", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.listen, "listen", "127.0.0.1:15001", "address to accept traffic on, unless a socket is passed with LISTEN_FDS")
	fs.StringVar(&c.upstream, "upstream", "", "host:port of the app to forward to (required)")
	fs.StringVar(&c.admin, "admin", "127.0.0.1:15000", "address of the admin endpoint (GET /ready, /version); empty for none")
	fs.StringVar(&c.name, "name", "demo-sidecar", "name reported in the X-Demo-Sidecar header and /version")
	fs.StringVar(&c.version, "version", "v1", "version reported in the X-Demo-Sidecar header and /version")
	fs.DurationVar(&c.readyAfter, "ready-after", time.Second, "time from start to ready")
	fs.DurationVar(&c.unreadyAfter, "unready-after", 0, "after becoming ready, turn unready again this much later (0: never); it keeps running, like a hung sidecar")
	fs.DurationVar(&c.crashAfter, "crash-after", 0, fmt.Sprintf("after becoming ready, exit with status %d this much later (0: never)", crashExitCode))
	fs.DurationVar(&c.drain, "drain", 5*time.Second, "how long in-flight requests may take to finish after SIGTERM")
	fs.BoolVar(&c.fdstore, "fdstore", false, "hand the listening socket to the fd store behind NOTIFY_SOCKET (FDSTORE=1, FDNAME=listen)")
	fs.StringVar(&c.readyFile, "ready-file", "", "append 'bound', 'ready', 'stopping' and 'exit' lines with UnixNano times to this file")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if c.upstream == "" {
		return c, errors.New("--upstream: required (host:port of the app)")
	}
	if _, _, err := net.SplitHostPort(c.upstream); err != nil {
		return c, fmt.Errorf("--upstream %q: want host:port: %w", c.upstream, err)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"--ready-after", c.readyAfter}, {"--unready-after", c.unreadyAfter}, {"--crash-after", c.crashAfter}, {"--drain", c.drain}} {
		if d.v < 0 {
			return c, fmt.Errorf("%s %s: must not be negative", d.name, d.v)
		}
	}
	return c, nil
}

func run(args []string, stderr io.Writer) int {
	// Signals before any slow start-up work: a SIGTERM during start is a
	// normal stop, not a kill.
	ctx, stop, log := demo.Start("demo-sidecar", stderr)
	defer stop()

	c, err := parseFlags(args, stderr)
	if err != nil {
		return demo.FlagsExit(log, err)
	}
	log = log.With("name", c.name, "version", c.version)
	s, err := newSidecar(c, log)
	if err != nil {
		log.Error("start", "err", err)
		return 1
	}
	return s.run(ctx, stop)
}

type sidecar struct {
	c      config
	log    *slog.Logger
	pid    int
	ln     net.Listener
	admin  net.Listener // nil without an admin endpoint
	source string       // "bound" or "activation": where ln came from
	notify *notifier    // nil without NOTIFY_SOCKET

	ready    atomic.Bool
	requests atomic.Int64
}

// newSidecar acquires the sockets, in order, closing what it has on error.
func newSidecar(c config, log *slog.Logger) (_ *sidecar, err error) {
	s := &sidecar{c: c, log: log, pid: os.Getpid()}
	defer func() {
		if err != nil {
			s.closeListeners()
		}
	}()
	s.notify, err = newNotifier(os.Getenv("NOTIFY_SOCKET"))
	if err != nil {
		return nil, err
	}
	passed, err := parseListenEnv(os.Getenv, s.pid)
	if err != nil {
		return nil, fmt.Errorf("socket activation: %w", err)
	}
	if len(passed) > 0 {
		a, err := takeListeners(passed, log.Info)
		s.ln, s.admin = a.listen, a.admin
		if err != nil {
			return nil, fmt.Errorf("socket activation: %w", err)
		}
	}
	if s.ln != nil {
		s.source = "activation"
	} else {
		s.source = "bound"
		if s.ln, err = net.Listen("tcp", c.listen); err != nil {
			return nil, fmt.Errorf("listen %s: %w", c.listen, err)
		}
	}
	if s.admin == nil && c.admin != "" {
		if s.admin, err = net.Listen("tcp", c.admin); err != nil {
			return nil, fmt.Errorf("admin listen %s: %w", c.admin, err)
		}
	}
	adminAddr := ""
	if s.admin != nil {
		adminAddr = s.admin.Addr().String()
	}
	// The kernel completes handshakes from here on, even before we accept.
	log.Info("listening", "addr", s.ln.Addr().String(), "admin", adminAddr, "source", s.source,
		"time", time.Now().Format(time.RFC3339Nano))
	if err := s.mark("bound", "listen="+s.ln.Addr().String(), "admin="+adminAddr, "source="+s.source); err != nil {
		return nil, err
	}
	if c.fdstore {
		switch {
		case s.notify == nil:
			log.Warn("--fdstore given but NOTIFY_SOCKET is not set: nothing stored")
		case s.source == "activation":
			log.Info("listener was passed in; its holder keeps it, not storing it again")
		default:
			if err := s.notify.storeListener(s.ln, "listen"); err != nil {
				return nil, err
			}
			log.Info("stored listener in the fd store", "addr", s.ln.Addr().String(), "fdname", "listen")
		}
	}
	return s, nil
}

func (s *sidecar) closeListeners() {
	if s.ln != nil {
		s.ln.Close()
	}
	if s.admin != nil {
		s.admin.Close()
	}
}

// mark appends one "EVENT UNIXNANO [fields]" line to --ready-file, in one
// write so a reader never sees half a line.
func (s *sidecar) mark(event string, fields ...string) error {
	if s.c.readyFile == "" {
		return nil
	}
	line := event + " " + strconv.FormatInt(time.Now().UnixNano(), 10)
	for _, f := range fields {
		line += " " + f
	}
	f, err := os.OpenFile(s.c.readyFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("ready file %s: %w", s.c.readyFile, err)
	}
	_, werr := f.WriteString(line + "\n")
	cerr := f.Close()
	if werr != nil || cerr != nil {
		return fmt.Errorf("ready file %s: write %s: %w", s.c.readyFile, event, errors.Join(werr, cerr))
	}
	return nil
}

func (s *sidecar) notifyState(state string) {
	if s.notify == nil {
		return
	}
	if err := s.notify.send(state); err != nil {
		s.log.Warn("sd_notify", "err", err)
	}
}

func (s *sidecar) run(ctx context.Context, stopSignals func()) int {
	adminSrv := &http.Server{Handler: s.adminRoutes(), ReadHeaderTimeout: 10 * time.Second}
	adminDone := make(chan error, 1)
	if s.admin != nil {
		go func() { adminDone <- adminSrv.Serve(s.admin) }()
	}
	proxySrv := httpdrain.New(s.ln, s.proxy())

	// Not ready yet: we do not accept, so connections queue in the kernel.
	readyTimer := time.NewTimer(s.c.readyAfter)
	defer readyTimer.Stop()
	var crash, unready <-chan time.Time
	serving := false
	code := 0
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case <-readyTimer.C:
			if err := s.mark("ready"); err != nil {
				s.log.Error("ready", "err", err)
				code = 1
				break loop
			}
			go proxySrv.Serve()
			serving = true
			s.ready.Store(true)
			s.notifyState("READY=1")
			s.log.Info("ready", "addr", s.ln.Addr().String(), "upstream", s.c.upstream,
				"time", time.Now().Format(time.RFC3339Nano))
			if s.c.crashAfter > 0 {
				crash = time.After(s.c.crashAfter)
			}
			if s.c.unreadyAfter > 0 {
				unready = time.After(s.c.unreadyAfter)
			}
		case <-unready:
			s.ready.Store(false)
			s.log.Warn("turning unready as asked (--unready-after), still running")
		case <-crash:
			s.log.Error("crashing as asked (--crash-after)", "requests", s.requests.Load())
			os.Exit(crashExitCode)
		case err := <-adminDone:
			s.log.Error("admin endpoint stopped", "err", err)
			code = 1
			break loop
		}
	}
	stopSignals() // a second signal kills us the default way

	s.ready.Store(false)
	// The admin endpoint goes first: when its socket is shared with our
	// successor (a hot upgrade), the supervisor's readiness checks must
	// reach the successor, not a draining process answering "not ready".
	if s.admin != nil {
		adminSrv.Close()
	}
	s.notifyState("STOPPING=1")
	s.mark("stopping")
	s.log.Info("draining", "deadline", s.c.drain.String())
	if serving {
		// Closing our copy of the socket leaves the queued connections to
		// another holder (the next sidecar during a hot upgrade); see
		// httpdrain for why every connection still open gets its answer.
		demo.Drain(s.log, proxySrv, s.c.drain)
	} else {
		s.ln.Close()
	}
	s.mark("exit")
	s.log.Info("exiting", "requests", s.requests.Load())
	return code
}

func (s *sidecar) adminRoutes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, r *http.Request) {
		if !s.ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ready\n")
	})
	mux.HandleFunc("GET /version", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(struct {
			Name     string `json:"name"`
			Version  string `json:"version"`
			PID      int    `json:"pid"`
			Ready    bool   `json:"ready"`
			Requests int64  `json:"requests"`
		}{s.c.name, s.c.version, s.pid, s.ready.Load(), s.requests.Load()})
	})
	return mux
}

// proxy forwards every request to the upstream app. The X-Demo-Sidecar header
// is set before the proxy copies the app's headers in, so it is on every
// answer, the 502 for an unreachable app included.
func (s *sidecar) proxy() http.Handler {
	target := &url.URL{Scheme: "http", Host: s.c.upstream}
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(target)
			r.SetXForwarded()
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			s.log.Warn("upstream", "upstream", s.c.upstream, "err", err)
			http.Error(w, fmt.Sprintf("demo-sidecar: upstream %s: %v", s.c.upstream, err), http.StatusBadGateway)
		},
	}
	who := fmt.Sprintf("%s/%s pid=%d", s.c.name, s.c.version, s.pid)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.requests.Add(1)
		w.Header().Set("X-Demo-Sidecar", who)
		rp.ServeHTTP(w, r)
	})
}
