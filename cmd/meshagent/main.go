// Command meshagent is a node-local sidecar supervisor for service meshes.
//
//	meshagent run --config FILE     supervise the pods of FILE
//	meshagent ctl ...               talk to a running agent
//	meshagent gate [--probe]        postStart hook: wait for this pod's sidecars
//	meshagent hold                  preStop hook: wait for this pod's apps to exit
//	meshagent version
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/meshagent/meshagent/agent"
)

// Set by the build (-ldflags -X main.version=...).
var version = "dev"

func main() {
	// First: this process may be the exec shim of a container start.
	agent.RunShimIfRequested()
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	var err error
	switch args[0] {
	case "run":
		err = cmdRun(args[1:], stderr)
	case "ctl":
		err = cmdCtl(args[1:], stdout)
	case "gate":
		err = cmdGate(args[1:], stdout, stderr) // gate.go
	case "hold":
		err = cmdHold(args[1:], stdout, stderr)
	case "version", "--version":
		fmt.Fprintln(stdout, "meshagent", version)
	case "help", "-h", "--help":
		usage(stdout)
	default:
		fmt.Fprintf(stderr, "meshagent: unknown command %q\n", args[0])
		usage(stderr)
		return 2
	}
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		var ex exitError
		if errors.As(err, &ex) {
			return int(ex)
		}
		fmt.Fprintln(stderr, "meshagent:", err)
		return 1
	}
	return 0
}

// exitError is an exit code whose message was already printed.
type exitError int

func (e exitError) Error() string { return fmt.Sprintf("exit %d", int(e)) }

func usage(w io.Writer) {
	fmt.Fprint(w, `usage:
  meshagent run --config FILE
  meshagent ctl [--socket PATH] [--json] pods | pod NAME | restart [NAMESPACE/]POD/CONTAINER | restart-pod POD | events [--pod NAME]
  meshagent ctl [--socket PATH] [--json] switch list | switch set NAME on|off | reload | inspect | metrics | status | plan
  meshagent ctl upgrade POD/SIDECAR --command PATH [--arg A]... [--version V] [--wait D]
  meshagent gate [--socket PATH] [--probe] [--json] [--agent-wait D] [--no-agent open|closed]
  meshagent hold [--socket PATH] [--json]
  meshagent version
`)
}

func cmdRun(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	config := fs.String("config", "/etc/meshagent/config.yaml", "configuration file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	// Signals are caught before any slow start-up work, so a stop during
	// start-up is an ordinary, ordered stop.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	cfg, err := agent.LoadConfig(*config)
	if err != nil {
		return err
	}
	return runAgent(ctx, cfg, *config, newLogger(cfg.Node.Log, stderr)) // run.go
}

func newLogger(c agent.Log, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
