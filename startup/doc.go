// Package startup decides when a sidecar is ready, and lets callers wait for it.
//
// A Probe checks one container once (a TCP connect, an HTTP GET, a command,
// a unix-socket connect). Watch runs a probe on a schedule and reports every
// result; while the container has never been ready it probes on a fast
// interval (milliseconds, not the half-second polls of pilot-agent), so the
// apps waiting behind a sidecar start within a few milliseconds of it
// accepting. After the first success it falls back to the configured period,
// which is what hang detection needs.
//
// A Gate is the latch apps wait behind: it opens once, wakes every waiter at
// the same instant, and can be closed again for the next start of the pod.
//
// The package is a leaf: it knows nothing of pods or containers beyond the
// names it is handed in errors.
package startup
