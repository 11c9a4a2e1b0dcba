package agent

import (
	"fmt"
	"sort"
	"time"

	"github.com/meshagent/meshagent/cgroup"
)

// CgroupNode configures the cgroup policy of host-mode pods (cgroup.go).
type CgroupNode struct {
	// Enabled is auto (the default: on when the agent may write the
	// cgroup filesystem, otherwise off with one log line) or off.
	Enabled string `yaml:"enabled" json:"enabled"`
	// Root is the cgroup mount root; default /sys/fs/cgroup.
	Root string `yaml:"root" json:"root"`
	// ReconcileInterval is the period of the drift-correcting pass;
	// default 10s.
	ReconcileInterval Duration `yaml:"reconcileInterval" json:"reconcileInterval"`
}

// NRINode configures the NRI plugin (nri.go), for Kubernetes nodes.
type NRINode struct {
	// Socket is containerd's NRI socket (/var/run/nri/nri.sock on a
	// node); empty means no NRI plugin.
	Socket string `yaml:"socket" json:"socket,omitempty"`
	// PluginIndex orders meshagent among NRI plugins (two digits); default 40.
	PluginIndex string `yaml:"pluginIndex" json:"pluginIndex,omitempty"`
	// PluginName is the name meshagent registers under; default meshagent.
	PluginName string `yaml:"pluginName" json:"pluginName,omitempty"`
}

// PodResources are a host-mode pod's own cgroup limits, shared by its
// containers: cpu ("2", "1500m") and memory ("512Mi"). Empty is unlimited.
type PodResources struct {
	CPU    string `yaml:"cpu" json:"cpu,omitempty"`
	Memory string `yaml:"memory" json:"memory,omitempty"`
}

// Defaults of the cgroup settings.
const (
	// DefaultReconcileInterval: a pass reads every knob of every pod (about
	// 1,600 reads at 200 pods), which at 10s was two fifths of the idle
	// agent's CPU; drift is someone else's write, rare, and 30s is soon
	// enough to undo it.
	DefaultReconcileInterval = 30 * time.Second
	DefaultNRIPluginIndex    = "40"
)

func (c *CgroupNode) setDefaults() {
	if c.Enabled == "" {
		c.Enabled = "auto"
	}
	if c.Root == "" {
		c.Root = cgroup.DefaultRoot
	}
	if c.ReconcileInterval == 0 {
		c.ReconcileInterval = Duration(DefaultReconcileInterval)
	}
}

// validateCgroup checks the syntax of every cgroup setting, naming its
// field path. Combinations only the pod's limits can judge (a sidecar
// quota above the pod's, a percentage of no limit) are reported per pod
// at run time, and that pod alone is left unwritten.
func (c *Config) validateCgroup() []error {
	var errs []error
	add := func(path, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", path, fmt.Sprintf(format, a...)))
	}
	switch c.Node.Cgroup.Enabled {
	case "", "auto", "off":
	default:
		add("node.cgroup.enabled", "want auto or off, got %q", c.Node.Cgroup.Enabled)
	}
	if n := c.Node.NRI.PluginName; n != "" && !nameRE.MatchString(n) {
		add("node.nri.pluginName", "%q is not a valid name (lowercase letters, digits, '-' and '.')", n)
	}
	if i := c.Node.NRI.PluginIndex; i != "" && (len(i) != 2 || i[0] < '0' || i[0] > '9' || i[1] < '0' || i[1] > '9') {
		add("node.nri.pluginIndex", "want two digits like 40, got %q", i)
	}
	for i := range c.Pods {
		p := &c.Pods[i]
		pp := fmt.Sprintf("pods[%d]", i)
		if _, err := p.Resources.limits(); err != nil {
			add(pp+".resources", "%v", err)
		}
		if len(p.SidecarPolicy) > 0 {
			if _, err := p.sidecarPolicy(); err != nil {
				keys := make([]string, 0, len(p.SidecarPolicy))
				for k := range p.SidecarPolicy {
					keys = append(keys, k)
				}
				sort.Strings(keys)
				add(pp+".sidecarPolicy", "%v (keys: %v; valid keys: cpu, cpu-mode, cpu-burst, cpu-shares, memory, oom-score-adj)", err, keys)
			}
			if len(p.byRole(RoleSidecar)) == 0 {
				add(pp+".sidecarPolicy", "the pod has no sidecar to apply it to")
			}
		}
	}
	return errs
}

// podLimits are a pod's own limits in the cgroup package's units.
type podLimits struct {
	CPUMillis   int64
	MemoryBytes int64
}

func (r PodResources) limits() (podLimits, error) {
	var l podLimits
	if r.CPU != "" {
		a, err := cgroup.ParseCPU(r.CPU)
		if err != nil {
			return l, fmt.Errorf("cpu: %w", err)
		}
		if a.Percent != 0 {
			return l, fmt.Errorf("cpu: %q: a pod's limit is an amount (2, 1500m), not a percentage", r.CPU)
		}
		l.CPUMillis = a.Millis
	}
	if r.Memory != "" {
		b, err := cgroup.ParseBytes(r.Memory)
		if err != nil {
			return l, fmt.Errorf("memory: %w", err)
		}
		l.MemoryBytes = b
	}
	return l, nil
}

// sidecarPolicy parses the pod's sidecarPolicy (empty: the default policy,
// which only makes the sidecar the pod's first OOM victim).
func (p *PodSpec) sidecarPolicy() (cgroup.Policy, error) {
	return cgroup.ParsePolicy(p.SidecarPolicy)
}
