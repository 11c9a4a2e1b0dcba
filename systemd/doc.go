// Package systemd runs meshagent as a systemd service in host mode: the unit
// file (Unit, also installed from systemd/meshagent.service) and a Notifier
// that speaks the sd_notify protocol through github.com/coreos/go-systemd.
//
// # Model
//
// The unit is Type=notify: systemd considers the agent started only when it
// sends READY=1, which the agent does once every component is up and every
// pod is supervised or adopted, never earlier. From then on the Watchdog loop
// sends WATCHDOG=1 every half of WATCHDOG_USEC, but only while the agent's
// health check passes: a hung or broken agent stops pinging, systemd aborts
// it and Restart=always starts a new one, which adopts the running sidecars
// and apps (KillMode=process leaves them alone). STOPPING=1 tells systemd the
// ordered stop has begun; the watchdog stops pinging then, as systemd no
// longer enforces it.
//
// Outside systemd (NOTIFY_SOCKET unset) every Notifier method is a no-op, so
// the agent calls them unconditionally.
//
// NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID describe the agent's own
// relationship with systemd; ChildEnv removes them from an environment
// handed to a sidecar or app so a child that speaks sd_notify cannot talk to
// systemd on the agent's behalf.
package systemd
