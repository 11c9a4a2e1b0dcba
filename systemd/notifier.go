package systemd

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// Notifier sends the agent's state to systemd. Its methods are safe for
// concurrent use; without NOTIFY_SOCKET they do nothing and return nil.
type Notifier struct {
	logger *slog.Logger

	readyOnce, stoppingOnce sync.Once
	ready, stopping         chan struct{} // closed by Ready and Stopping

	// pingMu orders a watchdog ping against Stopping: once STOPPING=1 is
	// sent no WATCHDOG=1 follows it.
	pingMu sync.Mutex

	mu     sync.Mutex
	status string // last status set by Status, restored when health recovers
}

// NewNotifier returns a Notifier for the service manager named by the
// environment (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID). logger receives
// watchdog health transitions; nil means slog.Default().
func NewNotifier(logger *slog.Logger) *Notifier {
	if logger == nil {
		logger = slog.Default()
	}
	return &Notifier{
		logger:   logger,
		ready:    make(chan struct{}),
		stopping: make(chan struct{}),
	}
}

// Enabled reports whether a service manager listens (NOTIFY_SOCKET is set).
func (n *Notifier) Enabled() bool { return os.Getenv("NOTIFY_SOCKET") != "" }

// Ready tells systemd that start-up (or a reload) has finished. Call it once
// every component is up; it also starts the watchdog pings.
func (n *Notifier) Ready() error {
	err := n.notify(daemon.SdNotifyReady)
	n.readyOnce.Do(func() { close(n.ready) })
	return err
}

// Reloading tells systemd that a configuration reload has begun; call Ready
// when it has finished (whether the new config was taken or refused).
func (n *Notifier) Reloading() error {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return fmt.Errorf("sd_notify RELOADING=1: read monotonic clock: %w", err)
	}
	usec := ts.Nano() / 1e3
	// MONOTONIC_USEC lets systemd (Type=notify-reload) match the reload to
	// the request that caused it.
	return n.notify(daemon.SdNotifyReloading + "\nMONOTONIC_USEC=" + strconv.FormatInt(usec, 10))
}

// Stopping tells systemd that the agent has begun its ordered stop. The
// watchdog stops pinging: systemd does not enforce it while stopping, and a
// late ping must not be read as the agent being up.
func (n *Notifier) Stopping() error {
	n.pingMu.Lock()
	defer n.pingMu.Unlock()
	n.stoppingOnce.Do(func() { close(n.stopping) })
	return n.notify(daemon.SdNotifyStopping)
}

// Status sets the one-line status `systemctl status meshagent` shows.
func (n *Notifier) Status(s string) error {
	s = oneLine(s)
	n.mu.Lock()
	n.status = s
	n.mu.Unlock()
	return n.notify("STATUS=" + s)
}

// Watchdog sends WATCHDOG=1 every half of WATCHDOG_USEC from the moment
// Ready is called until Stopping is called, each time only if health (nil:
// always healthy) returns nil within that half interval. While health fails
// no ping is sent, the failure is shown as the unit's status, and systemd
// aborts and restarts the agent once WatchdogSec passes without a ping; when
// health recovers, pings resume and the last Status is shown again. health
// must return when its context ends (it gets half the watchdog interval):
// the loop waits for it.
//
// It returns nil when ctx ends. Without a watchdog (NOTIFY_SOCKET or
// WATCHDOG_USEC unset, or WATCHDOG_PID naming another process) it only waits
// for ctx. A malformed WATCHDOG_USEC or WATCHDOG_PID is an error.
func (n *Notifier) Watchdog(ctx context.Context, health func(context.Context) error) error {
	timeout, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		return fmt.Errorf("systemd watchdog (WATCHDOG_USEC=%q, WATCHDOG_PID=%q): %w",
			os.Getenv("WATCHDOG_USEC"), os.Getenv("WATCHDOG_PID"), err)
	}
	if timeout == 0 || !n.Enabled() {
		<-ctx.Done()
		return nil
	}
	if health == nil {
		health = func(context.Context) error { return nil }
	}
	period := timeout / 2

	// systemd arms the watchdog when start-up completes: pinging earlier
	// would be ignored, and waiting keeps READY=1 the first message.
	select {
	case <-n.ready:
	case <-ctx.Done():
		return nil
	}
	ticker := time.NewTicker(period)
	defer ticker.Stop()
	healthy := true
	for {
		select {
		case <-n.stopping:
			<-ctx.Done()
			return nil
		default:
		}
		healthy = n.check(ctx, health, period, healthy)
		select {
		case <-ticker.C:
		case <-n.stopping:
		case <-ctx.Done():
			return nil
		}
	}
}

// check runs one health check and pings if it passes; it returns the new
// health so transitions are logged once, not every period.
func (n *Notifier) check(ctx context.Context, health func(context.Context) error, period time.Duration, wasHealthy bool) bool {
	hctx, cancel := context.WithTimeout(ctx, period)
	err := health(hctx)
	cancel()
	if ctx.Err() != nil {
		return wasHealthy
	}
	if err != nil {
		if wasHealthy {
			n.logger.Warn("agent unhealthy, withholding systemd watchdog pings", "error", err)
			if serr := n.notify("STATUS=" + oneLine("unhealthy, watchdog pings withheld: "+err.Error())); serr != nil {
				n.logger.Warn("systemd status", "error", serr)
			}
		}
		return false
	}
	if !n.ping() {
		return true
	}
	if !wasHealthy {
		n.logger.Info("agent healthy again, systemd watchdog pings resumed")
		n.mu.Lock()
		status := n.status
		n.mu.Unlock()
		if err := n.notify("STATUS=" + status); err != nil {
			n.logger.Warn("systemd status", "error", err)
		}
	}
	return true
}

// ping sends WATCHDOG=1 unless Stopping has been called, and reports
// whether it tried.
func (n *Notifier) ping() bool {
	n.pingMu.Lock()
	defer n.pingMu.Unlock()
	select {
	case <-n.stopping: // Stopping raced with the health check: no late ping.
		return false
	default:
	}
	if err := n.notify(daemon.SdNotifyWatchdog); err != nil {
		// One lost ping is not fatal (there is another half interval), and
		// a notify socket that stays broken ends in a watchdog restart,
		// which is the right outcome.
		n.logger.Warn("systemd watchdog ping", "error", err)
	}
	return true
}

func (n *Notifier) notify(state string) error {
	sent, err := daemon.SdNotify(false, state)
	if err != nil {
		return fmt.Errorf("sd_notify %s to %s: %w", firstLine(state), os.Getenv("NOTIFY_SOCKET"), err)
	}
	_ = sent // false only without NOTIFY_SOCKET: a no-op by design
	return nil
}

// oneLine keeps a status to one assignment: a newline would let the text
// smuggle in another one (READY=1, STOPPING=1).
func oneLine(s string) string {
	return strings.NewReplacer("\r\n", " ", "\n", " ", "\r", " ").Replace(s)
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// notifyEnv are the variables that tie a process to the agent's service
// manager.
var notifyEnv = []string{"NOTIFY_SOCKET=", "WATCHDOG_USEC=", "WATCHDOG_PID="}

// ChildEnv returns env (in os.Environ form) without NOTIFY_SOCKET,
// WATCHDOG_USEC and WATCHDOG_PID, for a sidecar or app the agent starts: a
// child that speaks sd_notify must not report to systemd as if it were the
// agent (with NotifyAccess=main systemd would reject and log it; with any
// other setting a child's READY=1 or STOPPING=1 would be taken as the
// agent's). The input slice is not modified.
func ChildEnv(env []string) []string {
	out := make([]string, 0, len(env))
next:
	for _, kv := range env {
		for _, p := range notifyEnv {
			if strings.HasPrefix(kv, p) {
				continue next
			}
		}
		out = append(out, kv)
	}
	return out
}
