package main

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/meshagent/meshagent/agent"
	"github.com/meshagent/meshagent/metrics"
	"github.com/meshagent/meshagent/systemd"
)

// runAgent runs the agent as a service: systemd hears READY=1 only once
// every pod is supervised and the admin socket serves, WATCHDOG=1 while
// the agent is healthy, RELOADING=1 and READY=1 around a reload (SIGHUP or
// `meshagent ctl reload`), STOPPING=1 when the ordered stop begins.
func runAgent(ctx context.Context, cfg *agent.Config, path string, log *slog.Logger) error {
	n := systemd.NewNotifier(log)
	m, err := metrics.New(metrics.Options{Version: version, Logger: log})
	if err != nil {
		return err
	}
	a, err := agent.New(cfg, agent.WithLogger(log), agent.WithConfigPath(path),
		agent.WithNotifier(n), agent.WithMetrics(m), agent.WithCgroups())
	if err != nil {
		return err
	}

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	runErr := make(chan error, 1)
	go func() { runErr <- a.Run(runCtx) }()

	wdCtx, stopWD := context.WithCancel(context.Background())
	wdErr := make(chan error, 1)
	go func() { wdErr <- n.Watchdog(wdCtx, a.Health) }()
	defer func() {
		stopWD()
		if err := <-wdErr; err != nil {
			log.Error("systemd watchdog", "err", err)
		}
	}()

	for {
		select {
		case err := <-runErr:
			return err
		case <-hup:
			select {
			case <-a.Ready():
			default:
				log.Warn("SIGHUP during start-up ignored: the config just loaded is in force")
				continue
			}
			// Run it beside the signal loop: a SIGTERM during a long
			// reload must still end the agent.
			go func() {
				if _, err := a.Reload(context.Background()); err != nil {
					if errors.Is(err, agent.ErrReloadRefused) {
						log.Error("config reload refused; the previous config stays in force", "err", err)
					} else {
						log.Error("config reload", "err", err)
					}
				}
			}()
		}
	}
}
