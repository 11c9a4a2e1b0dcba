package systemd_test

import (
	"context"
	"errors"
	"os"
	"os/signal"
	"syscall"

	"github.com/meshagent/meshagent/systemd"
)

// The agent's run loop: READY=1 once everything is up, the watchdog gated on
// the agent's own health, STOPPING=1 when the ordered stop begins.
func ExampleNotifier() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	n := systemd.NewNotifier(nil)
	healthy := func(ctx context.Context) error {
		// e.g. the supervisor's event loop answered a ping within ctx's
		// deadline; an error withholds the watchdog ping.
		return nil
	}
	wdCtx, cancelWD := context.WithCancel(ctx)
	wdDone := make(chan error, 1)
	go func() { wdDone <- n.Watchdog(wdCtx, healthy) }()

	// ... start the admin socket, metrics, adopt or start every pod ...
	_ = n.Status("supervising 2 pods")
	_ = n.Ready()

	<-ctx.Done()
	_ = n.Stopping()
	// ... ordered stop: apps first, then sidecars ...
	cancelWD()
	if err := <-wdDone; err != nil && !errors.Is(err, context.Canceled) {
		os.Exit(1)
	}
}
