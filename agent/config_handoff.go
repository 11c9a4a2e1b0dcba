package agent

import (
	"fmt"
	"time"

	"github.com/meshagent/meshagent/handoff"
)

// HandoffSpec keeps a sidecar's listening sockets alive across its restarts
// and upgrades (see the handoff package). The agent holds them in a store of
// its own for the whole life of the pod, not of one sidecar process.
type HandoffSpec struct {
	// Listeners are opened by the agent itself, like systemd socket units,
	// and passed to every start as LISTEN_FDS (fds from 3, named).
	Listeners []ListenerSpec `yaml:"listeners" json:"listeners,omitempty"`
	// FDStore gives the sidecar a notify socket (NOTIFY_SOCKET): it may
	// store its own sockets with FDSTORE=1 and get them back on its next
	// start; READY=1 counts as a readiness pass.
	FDStore bool `yaml:"fdStore" json:"fdStore,omitempty"`
	// MOSN, when set, hands the held sockets to a MOSN restarting after a
	// crash through MOSN's own smooth-upgrade protocol in its uds_dir.
	MOSN *MOSNSpec `yaml:"mosn" json:"mosn,omitempty"`
	// Snapshot copies the listening sockets out of the running sidecar once
	// it is ready (pidfd_getfd; Linux 5.6+, CAP_SYS_PTRACE). Only with mosn:
	// a sidecar that binds its ports itself could not bind them again
	// while the store holds them.
	Snapshot bool `yaml:"snapshot" json:"snapshot,omitempty"`
}

// ListenerSpec is one agent-opened listener.
type ListenerSpec struct {
	// Name is the fd's name in LISTEN_FDNAMES.
	Name string `yaml:"name" json:"name"`
	// Address is tcp://HOST:PORT, tcp4://, tcp6:// or unix:///PATH.
	Address string `yaml:"address" json:"address"`
}

// MOSNSpec is where a MOSN sidecar looks for its predecessor.
type MOSNSpec struct {
	// UDSDir is MOSN's uds_dir (reconfig.sock, listen.sock live there).
	UDSDir string `yaml:"udsDir" json:"udsDir"`
	// Timeout bounds a hand-over to a restarting MOSN (default 30s).
	Timeout Duration `yaml:"timeout" json:"timeout"`
}

// UpgradePolicy is the fuse of a hot upgrade (meshagent ctl upgrade).
type UpgradePolicy struct {
	// ReadyTimeout is how long the new process has to become ready while
	// the old one keeps serving; past it the new one is killed.
	ReadyTimeout Duration `yaml:"readyTimeout" json:"readyTimeout"`
	// Watch is how long after taking over a crash of the new process
	// brings the old version back.
	Watch Duration `yaml:"watch" json:"watch"`
}

// Upgrade defaults.
const (
	DefaultUpgradeReadyTimeout = 30 * time.Second
	DefaultUpgradeWatch        = 10 * time.Second
	defaultMOSNTimeout         = 30 * time.Second
)

func (c *ContainerSpec) setHandoffDefaults() {
	if c.Upgrade.ReadyTimeout == 0 {
		c.Upgrade.ReadyTimeout = Duration(DefaultUpgradeReadyTimeout)
	}
	if c.Upgrade.Watch == 0 {
		c.Upgrade.Watch = Duration(DefaultUpgradeWatch)
	}
	if h := c.Handoff; h != nil && h.MOSN != nil && h.MOSN.Timeout == 0 {
		h.MOSN.Timeout = Duration(defaultMOSNTimeout)
	}
}

// validateHandoff checks the handoff section; cp is the container's path.
func (c *ContainerSpec) validateHandoff(cp string) []error {
	h := c.Handoff
	if h == nil {
		return nil
	}
	var errs []error
	add := func(path, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s.handoff%s: %s", cp, path, fmt.Sprintf(format, a...)))
	}
	if c.Role != RoleSidecar {
		add("", "only sidecars hold listeners across restarts (role is %q)", c.Role)
	}
	names := map[string]bool{}
	for i, l := range h.Listeners {
		lp := fmt.Sprintf(".listeners[%d]", i)
		if err := handoff.ValidName(l.Name); err != nil {
			add(lp+".name", "%v", err)
		} else if names[l.Name] {
			add(lp+".name", "listener %q is declared twice", l.Name)
		}
		names[l.Name] = true
		if l.Address == "" {
			add(lp+".address", "required (tcp://HOST:PORT or unix:///PATH)")
		} else if _, err := handoff.ParseSpec(l.Address); err != nil {
			add(lp+".address", "%v", err)
		}
	}
	if len(h.Listeners) > handoff.MaxFiles {
		add(".listeners", "%d listeners, at most %d", len(h.Listeners), handoff.MaxFiles)
	}
	if h.MOSN != nil && h.MOSN.UDSDir == "" {
		add(".mosn.udsDir", "required (MOSN's uds_dir)")
	}
	if h.Snapshot && h.MOSN == nil {
		add(".snapshot", "needs mosn: a sidecar that binds its ports itself cannot bind them again while the store holds them")
	}
	return errs
}
