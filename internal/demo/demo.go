// Package demo is what the demo's two processes, cmd/demo-app and
// cmd/demo-sidecar, do alike around their own work: they catch SIGTERM and
// SIGINT before any slow start-up work (a signal during start is a normal
// stop, not a kill), log with log/slog to stderr, take --help as success and
// bad flags as exit status 2, and on the way out drain their HTTP server
// (internal/httpdrain) within their --drain deadline.
package demo

import (
	"context"
	"errors"
	"flag"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/meshagent/meshagent/internal/httpdrain"
)

// Start catches SIGTERM and SIGINT: ctx ends on the first one, and stop
// restores the default handling, so that a second one kills the process.
// log is the process's logger on stderr, naming app and the pid.
func Start(app string, stderr io.Writer) (ctx context.Context, stop context.CancelFunc, log *slog.Logger) {
	ctx, stop = signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	log = slog.New(slog.NewTextHandler(stderr, nil)).With("app", app, "pid", os.Getpid())
	return ctx, stop, log
}

// FlagsExit is the exit status for err from parsing the flags: 0 for
// --help (the flag package has printed the usage), otherwise 2, after
// logging err.
func FlagsExit(log *slog.Logger, err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	log.Error("bad flags", "err", err)
	return 2
}

// Drain drains srv, giving its connections at most timeout, and logs how
// many it cut at the deadline. Cut requests are still the stop that was
// asked for, not a failure.
func Drain(log *slog.Logger, srv *httpdrain.Server, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if cut := srv.Drain(ctx); cut > 0 {
		log.Warn("drain deadline passed, cut the remaining connections", "connections", cut)
	}
}
