// Command meshload sends open-loop HTTP traffic to a loopback target and
// counts every outcome (ok, refused, reset, eof, timeout, non-2xx, other,
// skipped) with latency percentiles: the client of meshagent's hand-off load
// tests and demo. It stops by itself after --duration and refuses targets
// that are not on loopback.
//
//	meshload --target http://127.0.0.1:15001/ --rate 500 --duration 10s --new-conn-ratio 0.5
//
// The table goes to stdout, or JSON with --json; --live prints each window to
// stderr as it completes. The exit code is 0 when the run completed, 1 with
// --fail-on-error if any request failed or was skipped, 2 for bad flags.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/meshagent/meshagent/internal/loadgen"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var (
		cfg         loadgen.Config
		asJSON      bool
		windows     bool
		live        bool
		failOnError bool
	)
	fs := flag.NewFlagSet("meshload", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&cfg.Target, "target", "", "URL to send to; loopback only (http://127.0.0.1:PORT/...)")
	fs.Float64Var(&cfg.Rate, "rate", 100, "requests per second, open loop")
	fs.DurationVar(&cfg.Duration, "duration", 10*time.Second, fmt.Sprintf("how long to send (at most %s)", loadgen.MaxDuration))
	fs.Float64Var(&cfg.NewConnRatio, "new-conn-ratio", 0.5, "share of requests sent on a new connection of their own (0 to 1); the rest use keep-alive connections")
	fs.DurationVar(&cfg.Timeout, "timeout", 2*time.Second, "per-request timeout")
	fs.DurationVar(&cfg.Window, "window", time.Second, "length of a statistics window")
	fs.IntVar(&cfg.MaxInFlight, "max-in-flight", 4096, "outstanding requests before due ones are skipped (and counted as skipped)")
	fs.StringVar(&cfg.Method, "method", "GET", "HTTP method; POST is not retried by Go's client, so it shows raw resets and EOFs")
	fs.BoolVar(&asJSON, "json", false, "print the result as JSON instead of a table")
	fs.BoolVar(&windows, "windows", false, "add one row per window to the table")
	fs.BoolVar(&live, "live", false, "print each window to stderr as it completes")
	fs.BoolVar(&failOnError, "fail-on-error", false, "exit 1 if any request failed or was skipped")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "meshload: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if live {
		fmt.Fprintln(stderr, loadgen.WindowHeader())
		cfg.OnWindow = func(w loadgen.Window) { fmt.Fprintln(stderr, w.Row()) }
	}
	res, err := loadgen.Run(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "meshload: %v\n", err)
		return 2
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(res); err != nil {
			fmt.Fprintf(stderr, "meshload: write result: %v\n", err)
			return 1
		}
	} else if err := res.WriteTable(stdout, windows); err != nil {
		fmt.Fprintf(stderr, "meshload: write result: %v\n", err)
		return 1
	}
	if failOnError && (res.Counts.Failed() > 0 || res.Counts.Skipped > 0) {
		fmt.Fprintf(stderr, "meshload: %d failed, %d skipped\n", res.Counts.Failed(), res.Counts.Skipped)
		return 1
	}
	return 0
}
