package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// DefaultAddr is where the agent serves /metrics over TCP unless configured
// otherwise: loopback only, because the metrics name every pod on the node
// and exposing them beyond the host is the operator's decision.
const DefaultAddr = "127.0.0.1:9477"

// Restart causes accepted by SidecarRestart. Any other value is recorded as
// CauseOther.
const (
	CauseCrash    = "crash"    // the sidecar exited on its own
	CauseOOM      = "oom"      // the kernel OOM-killed it
	CauseHang     = "hang"     // alive but failed readiness too many times in a row
	CauseOperator = "operator" // meshagent ctl restart, or the admin endpoint
	CauseUpgrade  = "upgrade"  // replaced by a hot upgrade
	CauseOther    = "other"
)

// OOM victim roles accepted by OOMKill. Any other value is recorded as
// RoleUnknown.
const (
	RoleSidecar = "sidecar"
	RoleApp     = "app"
	RoleUnknown = "unknown"
)

// Startup policies accepted by StartupTimeout (the spelling of the config
// file's onTimeout). Any other value is recorded as "other".
const (
	PolicyFailOpen   = "failOpen"
	PolicyFailClosed = "failClosed"
)

// Hand-off kinds, outcomes and reasons accepted by HandoffDone. Any other
// value is recorded as "other".
const (
	KindHandoff = "handoff" // listeners passed to a restarted sidecar after a crash
	KindUpgrade = "upgrade" // hot upgrade to a new sidecar process

	OutcomeSuccess    = "success"
	OutcomeRolledBack = "rolled_back" // the old process serves again
	OutcomeFailed     = "failed"      // neither new nor old serves; the supervisor takes over

	ReasonNone       = "none"        // success; "" is accepted as ReasonNone
	ReasonNotReady   = "not_ready"   // the new process missed its readiness deadline
	ReasonCrashed    = "crashed"     // the new process exited within the watch window
	ReasonFDTransfer = "fd_transfer" // passing the listeners failed
	ReasonCanceled   = "canceled"    // the operator or agent shutdown aborted it
	ReasonOther      = "other"
)

const other = "other"

// Options configures New. The zero value is usable.
type Options struct {
	// Version and Revision label meshagent_build_info. Empty means: what the
	// Go toolchain stamped into the binary, else "unknown".
	Version  string
	Revision string

	// Stats, if set, is asked for the sidecars' cgroup figures on every
	// scrape. Nil means those series are absent.
	Stats StatsSource
	// StatsTimeout bounds one call to Stats so a stuck cgroup read cannot
	// hang the scrape. Zero means 2s.
	StatsTimeout time.Duration

	// Logger receives errors met while serving a scrape. Nil means
	// slog.Default().
	Logger *slog.Logger
}

// Metrics is the agent's instrumentation. Its methods are safe for
// concurrent use and cheap enough to call on every event.
type Metrics struct {
	reg    *prometheus.Registry
	logger *slog.Logger

	sidecarRestarts *prometheus.CounterVec
	sidecarReady    prometheus.Histogram
	sidecarLastRdy  *prometheus.GaugeVec
	gateHold        prometheus.Histogram
	gateLastHold    *prometheus.GaugeVec
	startupTimeouts *prometheus.CounterVec
	oomKills        *prometheus.CounterVec
	driftFixes      *prometheus.CounterVec
	fdsHeld         *prometheus.GaugeVec
	handoffs        *prometheus.CounterVec
	handoffDuration *prometheus.HistogramVec
	sidecarUp       *prometheus.GaugeVec
	crashLooping    *prometheus.GaugeVec
	reloads         *prometheus.CounterVec
	reloadOK        prometheus.Gauge
	switches        *prometheus.GaugeVec

	// own lists the metrics above, for New to register; podVecs those of
	// them with a pod label, for ForgetPod. Both are filled by the
	// constructors below, so a new metric cannot be left out of either.
	own     []prometheus.Collector
	podVecs []*prometheus.MetricVec
}

// keep notes c for registration and, when labels include "pod", its vector
// v for ForgetPod.
func (m *Metrics) keep(c prometheus.Collector, v *prometheus.MetricVec, labels []string) {
	m.own = append(m.own, c)
	if v != nil && slices.Contains(labels, "pod") {
		m.podVecs = append(m.podVecs, v)
	}
}

func (m *Metrics) counterVec(name, help string, labels ...string) *prometheus.CounterVec {
	v := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labels)
	m.keep(v, v.MetricVec, labels)
	return v
}

func (m *Metrics) gaugeVec(name, help string, labels ...string) *prometheus.GaugeVec {
	v := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, labels)
	m.keep(v, v.MetricVec, labels)
	return v
}

func (m *Metrics) histogramVec(name, help string, buckets []float64, labels ...string) *prometheus.HistogramVec {
	v := prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: name, Help: help, Buckets: buckets}, labels)
	m.keep(v, v.MetricVec, labels)
	return v
}

func (m *Metrics) gauge(name, help string) prometheus.Gauge {
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help})
	m.keep(g, nil, nil)
	return g
}

func (m *Metrics) histogram(name, help string, buckets []float64) prometheus.Histogram {
	h := prometheus.NewHistogram(prometheus.HistogramOpts{Name: name, Help: help, Buckets: buckets})
	m.keep(h, nil, nil)
	return h
}

// Buckets for "how long until ready" style durations: sidecars that are
// ready in milliseconds up to ones that take a minute to load config.
var startupBuckets = []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60}

// Buckets for hand-offs and upgrades, which include readiness of the new
// process and the old one's drain.
var handoffBuckets = []float64{.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300}

// New builds a Metrics with its own registry holding meshagent's metrics, the
// build info, and the process and Go runtime collectors.
func New(opts Options) (*Metrics, error) {
	m := &Metrics{
		reg:    prometheus.NewRegistry(),
		logger: opts.Logger,
	}
	if m.logger == nil {
		m.logger = slog.Default()
	}
	m.sidecarRestarts = m.counterVec("meshagent_sidecar_restarts_total",
		"Sidecar restarts by pod, container and cause (crash, oom, hang, operator, upgrade, other).",
		"pod", "container", "cause")
	m.sidecarReady = m.histogram("meshagent_sidecar_ready_duration_seconds",
		"Time from a sidecar's start to its first passed readiness check, over all pods.",
		startupBuckets)
	m.sidecarLastRdy = m.gaugeVec("meshagent_sidecar_last_ready_duration_seconds",
		"Time the last start of this sidecar took to become ready.",
		"pod", "container")
	m.gateHold = m.histogram("meshagent_startup_gate_hold_duration_seconds",
		"Time a pod's apps were held by the startup gate before starting, over all pods.",
		startupBuckets)
	m.gateLastHold = m.gaugeVec("meshagent_startup_gate_last_hold_duration_seconds",
		"Time the startup gate held this pod's apps the last time it opened.",
		"pod")
	m.startupTimeouts = m.counterVec("meshagent_startup_timeouts_total",
		"Pod starts whose sidecars were not ready within startup.timeout, by the policy applied (failOpen, failClosed).",
		"pod", "policy")
	m.oomKills = m.counterVec("meshagent_oom_kills_total",
		"OOM kills in a pod's cgroup by victim container and role (sidecar, app, unknown).",
		"pod", "container", "role")
	m.driftFixes = m.counterVec("meshagent_cgroup_drift_corrections_total",
		"cgroup or oom_score_adj values someone else changed and meshagent restored, by knob.",
		"pod", "container", "knob")
	m.fdsHeld = m.gaugeVec("meshagent_fdstore_held_fds",
		"File descriptors (listening sockets) the hand-off store holds for a sidecar.",
		"pod", "container")
	m.handoffs = m.counterVec("meshagent_handoffs_total",
		"Finished hand-offs and hot upgrades by kind, outcome (success, rolled_back, failed) and reason.",
		"kind", "outcome", "reason")
	m.handoffDuration = m.histogramVec("meshagent_handoff_duration_seconds",
		"Duration of hand-offs and hot upgrades, from start to success or completed rollback.",
		handoffBuckets, "kind", "outcome")

	m.sidecarUp = m.gaugeVec("meshagent_sidecar_ready",
		"1 while the sidecar passes its readiness check, else 0.",
		"pod", "container")
	m.crashLooping = m.gaugeVec("meshagent_sidecar_crash_looping",
		"1 while the supervisor reports the sidecar in a crash loop, else 0.",
		"pod", "container")
	m.reloads = m.counterVec("meshagent_config_reloads_total",
		"Config reloads (SIGHUP or ctl reload) by result (success, failure).",
		"result")
	m.reloadOK = m.gauge("meshagent_config_last_reload_successful",
		"1 if the last config reload was taken, 0 if it was refused and the previous config is still in force.")
	m.reloadOK.Set(1) // the config the agent started with was valid
	m.switches = m.gaugeVec("meshagent_switch_enabled",
		"Runtime switches: 1 on, 0 off (an emergency switch left off shows here).",
		"switch")
	// Both results exist from the start, so increase() sees the first
	// failure instead of a series appearing out of nothing.
	for _, c := range []string{"success", "failure"} {
		m.reloads.WithLabelValues(c)
	}

	version, revision := buildVersion(opts.Version, opts.Revision)
	buildInfo := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "meshagent_build_info",
		Help: "Always 1; the labels say which meshagent build is running.",
		ConstLabels: prometheus.Labels{
			"version":   version,
			"revision":  revision,
			"goversion": runtime.Version(),
		},
	})
	buildInfo.Set(1)

	timeout := opts.StatsTimeout
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	stats := newStatsCollector(opts.Stats, timeout)

	for _, c := range append(m.own,
		buildInfo, stats,
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		collectors.NewGoCollector(),
	) {
		if err := m.reg.Register(c); err != nil {
			return nil, fmt.Errorf("register metrics collector: %w", err)
		}
	}
	return m, nil
}

// buildVersion fills empty version and revision from the build information
// the Go toolchain embedded, so a plain `go build` still says what it is.
func buildVersion(version, revision string) (string, string) {
	if bi, ok := debug.ReadBuildInfo(); ok {
		if version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			version = bi.Main.Version
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && revision == "" {
				revision = s.Value
			}
		}
	}
	if version == "" {
		version = "unknown"
	}
	if revision == "" {
		revision = "unknown"
	}
	return version, revision
}

// Registry returns the registry behind Handler, for collectors the agent
// owns itself and for tests.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// SidecarRestart counts one restart of a sidecar. cause is one of the Cause
// constants.
func (m *Metrics) SidecarRestart(pod, container, cause string) {
	cause = oneOf(cause, CauseOther, CauseCrash, CauseOOM, CauseHang, CauseOperator, CauseUpgrade)
	m.sidecarRestarts.WithLabelValues(label(pod), label(container), cause).Inc()
}

// SidecarReady records that a start of the sidecar became ready d after the
// process was started.
func (m *Metrics) SidecarReady(pod, container string, d time.Duration) {
	s := seconds(d)
	m.sidecarReady.Observe(s)
	m.sidecarLastRdy.WithLabelValues(label(pod), label(container)).Set(s)
}

// AppsGated records that the startup gate held the pod's apps for d before
// letting them start (whether because the sidecars became ready or because
// failOpen fired).
func (m *Metrics) AppsGated(pod string, d time.Duration) {
	s := seconds(d)
	m.gateHold.Observe(s)
	m.gateLastHold.WithLabelValues(label(pod)).Set(s)
}

// StartupTimeout counts a pod start whose sidecars missed startup.timeout;
// policy is PolicyFailOpen or PolicyFailClosed.
func (m *Metrics) StartupTimeout(pod, policy string) {
	policy = oneOf(policy, other, PolicyFailOpen, PolicyFailClosed)
	m.startupTimeouts.WithLabelValues(label(pod), policy).Inc()
}

// OOMKill counts an OOM kill of container in pod; role is RoleSidecar or
// RoleApp (RoleUnknown when the victim could not be attributed).
func (m *Metrics) OOMKill(pod, container, role string) {
	role = oneOf(role, RoleUnknown, RoleSidecar, RoleApp)
	m.oomKills.WithLabelValues(label(pod), label(container), role).Inc()
}

// DriftCorrected counts one correction of a value someone else rewrote;
// knob names it as the cgroup package does (e.g. "cpu.cfs_quota_us",
// "oom_score_adj"). The set of knobs is the cgroup package's and is small.
func (m *Metrics) DriftCorrected(pod, container, knob string) {
	m.driftFixes.WithLabelValues(label(pod), label(container), label(knob)).Inc()
}

// FDsHeld sets how many fds the hand-off store holds for the sidecar now.
func (m *Metrics) FDsHeld(pod, container string, n int) {
	m.fdsHeld.WithLabelValues(label(pod), label(container)).Set(float64(max(n, 0)))
}

// HandoffDone records a finished hand-off or hot upgrade: kind is KindHandoff
// or KindUpgrade, outcome one of the Outcome constants, reason one of the
// Reason constants ("" for a success), d the time from start to the end of
// the success or of the rollback.
func (m *Metrics) HandoffDone(kind, outcome, reason string, d time.Duration) {
	kind = oneOf(kind, other, KindHandoff, KindUpgrade)
	outcome = oneOf(outcome, other, OutcomeSuccess, OutcomeRolledBack, OutcomeFailed)
	if reason == "" {
		reason = ReasonNone
	}
	reason = oneOf(reason, ReasonOther, ReasonNone, ReasonNotReady, ReasonCrashed, ReasonFDTransfer, ReasonCanceled)
	m.handoffs.WithLabelValues(kind, outcome, reason).Inc()
	m.handoffDuration.WithLabelValues(kind, outcome).Observe(seconds(d))
}

// SidecarStatus sets whether the sidecar is ready now and whether the
// supervisor considers it crash looping; call it on every change of either.
func (m *Metrics) SidecarStatus(pod, container string, ready, crashLooping bool) {
	m.sidecarUp.WithLabelValues(label(pod), label(container)).Set(b2f(ready))
	m.crashLooping.WithLabelValues(label(pod), label(container)).Set(b2f(crashLooping))
}

// ConfigReload records the result of a config reload: err nil means the new
// config was taken, non-nil that it was refused and the old one stays.
func (m *Metrics) ConfigReload(err error) {
	result := "success"
	if err != nil {
		result = "failure"
	}
	m.reloads.WithLabelValues(result).Inc()
	m.reloadOK.Set(b2f(err == nil))
}

// Switch sets the state of a runtime switch (automatic restarts, cgroup
// writes, ...); name is one of the agent's fixed switch names. Call it for
// every switch at start-up and on every flip.
func (m *Metrics) Switch(name string, on bool) {
	m.switches.WithLabelValues(label(name)).Set(b2f(on))
}

// ForgetPod removes every series labelled with pod and returns how many it
// removed. Call it after the pod's supervisor has stopped: an event recorded
// for the pod afterwards would bring its series back.
func (m *Metrics) ForgetPod(pod string) int {
	n := 0
	for _, v := range m.podVecs {
		n += v.DeletePartialMatch(prometheus.Labels{"pod": label(pod)})
	}
	return n
}

// Handler serves the registry in the Prometheus exposition formats
// (negotiated; gzip when asked). A collector error does not fail the scrape:
// what could be gathered is served and the error is logged.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		ErrorLog:      slogPrinter{m.logger},
		ErrorHandling: promhttp.ContinueOnError,
		// A scraper that opens many connections must not make the agent
		// build many copies of a large exposition at once.
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
		EnableOpenMetrics:   true,
	})
}

// Serve serves Handler at /metrics on ln until ctx ends, then shuts the
// server down (waiting up to 5s for scrapes in flight) and returns nil. It
// closes ln. Other errors from the server are returned.
func (m *Metrics) Serve(ctx context.Context, ln net.Listener) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", m.Handler())
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ErrorLog:          slog.NewLogLogger(m.logger.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve metrics on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	shutdownErr := srv.Shutdown(sctx)
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve metrics on %s: %w", ln.Addr(), err)
	}
	if shutdownErr != nil {
		// Scrapes still running after the deadline: cut them off.
		srv.Close()
		return fmt.Errorf("shut down metrics server on %s: %w", ln.Addr(), shutdownErr)
	}
	return nil
}

// oneOf returns v if it is one of allowed, else fallback: label values from
// a fixed vocabulary stay in it.
func oneOf(v, fallback string, allowed ...string) string {
	for _, a := range allowed {
		if v == a {
			return v
		}
	}
	return fallback
}

// label makes s a valid label value: client_golang panics on invalid UTF-8,
// and a pod name with a stray byte must not bring the agent down.
func label(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	return strings.ToValidUTF8(s, "\uFFFD")
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// seconds converts d to the base unit; a negative duration (a clock step
// between the two timestamps) counts as zero rather than skewing sums.
func seconds(d time.Duration) float64 {
	if d < 0 {
		return 0
	}
	return d.Seconds()
}

// slogPrinter lets promhttp log through slog.
type slogPrinter struct{ l *slog.Logger }

func (p slogPrinter) Println(v ...any) {
	p.l.Warn("metrics scrape", "error", fmt.Sprint(v...))
}
