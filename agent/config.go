package agent

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"syscall"
	"time"

	"go.yaml.in/yaml/v3"
	"golang.org/x/sys/unix"
)

// Config is the whole of meshagent's configuration file.
type Config struct {
	Node Node      `yaml:"node" json:"node"`
	Pods []PodSpec `yaml:"pods" json:"pods"`
}

// Node holds the settings of the agent itself.
type Node struct {
	// AdminSocket is the unix socket of the admin API.
	AdminSocket string `yaml:"adminSocket" json:"adminSocket"`
	// AdminGroup, when set, lets members of this group use the admin
	// socket besides root and the agent's own user.
	AdminGroup string `yaml:"adminGroup" json:"adminGroup,omitempty"`
	// StateDir keeps what a restarted agent needs to adopt its processes.
	StateDir string `yaml:"stateDir" json:"stateDir"`
	Log      Log    `yaml:"log" json:"log"`
	// OnExit says what an agent asked to stop does with its pods: "stop"
	// stops them in order; "leave" leaves them running for the next agent
	// to adopt (for upgrading meshagent itself).
	OnExit string `yaml:"onExit" json:"onExit"`
	// MetricsAddr is the TCP address of /metrics (Prometheus); default
	// 127.0.0.1:9477, loopback only. "off" serves /metrics on the admin
	// socket alone.
	MetricsAddr string `yaml:"metricsAddr" json:"metricsAddr"`
	// Inspect holds the thresholds of `meshagent ctl inspect`.
	Inspect InspectPolicy `yaml:"inspect" json:"inspect"`
	// Cgroup and NRI configure the resource policy (config_cgroup.go).
	Cgroup CgroupNode `yaml:"cgroup" json:"cgroup"`
	NRI    NRINode    `yaml:"nri" json:"nri"`
	// Kubernetes, when set, also supervises the node's Kubernetes pods
	// through containerd (kube_config.go).
	Kubernetes *KubeConfig `yaml:"kubernetes" json:"kubernetes,omitempty"`
}

// InspectPolicy holds the thresholds of the node inspections.
type InspectPolicy struct {
	// LogMaxBytes is the most a container's log files may take; default
	// 100 MiB.
	LogMaxBytes int64 `yaml:"logMaxBytes" json:"logMaxBytes"`
	// FSMaxUsedPercent is the most the log filesystem may be used;
	// default 90.
	FSMaxUsedPercent int `yaml:"fsMaxUsedPercent" json:"fsMaxUsedPercent"`
	// UpgradeMaxDuration, when set, is the longest a hot upgrade may be
	// under way before the upgrade inspection reports it as stuck; by
	// default each upgrade's own bound (its readyTimeout, stop grace and
	// watch window, plus slack).
	UpgradeMaxDuration Duration `yaml:"upgradeMaxDuration" json:"upgradeMaxDuration,omitzero"`
}

// Log configures the agent's own log.
type Log struct {
	Level  string `yaml:"level" json:"level"`   // debug, info, warn, error
	Format string `yaml:"format" json:"format"` // text or json
}

// PodSpec is a group of sidecars and apps that start, stop and fail together.
type PodSpec struct {
	Name       string          `yaml:"name" json:"name"`
	Startup    StartupPolicy   `yaml:"startup" json:"startup"`
	Containers []ContainerSpec `yaml:"containers" json:"containers"`
	// Resources are the pod cgroup's own limits; SidecarPolicy is the
	// cgroup policy of its sidecar (config_cgroup.go).
	Resources     PodResources      `yaml:"resources" json:"resources,omitzero"`
	SidecarPolicy map[string]string `yaml:"sidecarPolicy" json:"sidecarPolicy,omitempty"`
}

// StartupPolicy bounds how long apps wait for their sidecars.
type StartupPolicy struct {
	// Timeout is how long apps wait for the sidecars; 0 waits forever.
	Timeout Duration `yaml:"timeout" json:"timeout"`
	// OnTimeout is failOpen (start the apps anyway, recorded) or
	// failClosed (keep them down, the pod is failed).
	OnTimeout string `yaml:"onTimeout" json:"onTimeout"`
}

// Role is what a container is to its pod.
type Role string

const (
	RoleSidecar Role = "sidecar"
	RoleApp     Role = "app"
)

// ContainerSpec is one supervised process of a pod.
type ContainerSpec struct {
	Name    string            `yaml:"name" json:"name"`
	Role    Role              `yaml:"role" json:"role"`
	Command string            `yaml:"command" json:"command"`
	Args    []string          `yaml:"args" json:"args,omitempty"`
	Env     map[string]string `yaml:"env" json:"env,omitempty"`
	Workdir string            `yaml:"workdir" json:"workdir,omitempty"`
	Version string            `yaml:"version" json:"version,omitempty"`
	// VersionCommand or VersionURL tell `ctl inspect` how to read the
	// version actually running (the first line of the command's output or
	// of the URL's body), to compare with Version.
	VersionCommand []string      `yaml:"versionCommand" json:"versionCommand,omitempty"`
	VersionURL     string        `yaml:"versionURL" json:"versionURL,omitempty"`
	Readiness      *Readiness    `yaml:"readiness" json:"readiness,omitempty"`
	Restart        RestartPolicy `yaml:"restart" json:"restart"`
	Stop           StopPolicy    `yaml:"stop" json:"stop"`
	// Handoff and Upgrade: listeners held across restarts, hot upgrades
	// (config_handoff.go).
	Handoff *HandoffSpec  `yaml:"handoff" json:"handoff,omitempty"`
	Upgrade UpgradePolicy `yaml:"upgrade" json:"upgrade"`
}

// Readiness is one check, exactly one of TCP, HTTP, Exec, Unix.
type Readiness struct {
	TCP  string   `yaml:"tcp" json:"tcp,omitempty"`
	HTTP string   `yaml:"http" json:"http,omitempty"`
	Exec []string `yaml:"exec" json:"exec,omitempty"`
	Unix string   `yaml:"unix" json:"unix,omitempty"`
	// Period between checks once ready; Timeout bounds one check.
	Period  Duration `yaml:"period" json:"period"`
	Timeout Duration `yaml:"timeout" json:"timeout"`
	// StartupInterval is the interval between checks until the first
	// success: short, so apps start right after their sidecar is ready.
	StartupInterval Duration `yaml:"startupInterval" json:"startupInterval"`
	// FailureThreshold consecutive failures after being ready mean the
	// container is hung and is restarted.
	FailureThreshold int `yaml:"failureThreshold" json:"failureThreshold"`
}

// RestartPolicy says when and how fast an exited container is started again.
type RestartPolicy struct {
	// Policy is always, on-failure or never.
	Policy string `yaml:"policy" json:"policy"`
	// The first restart after a stable run is immediate; later ones wait
	// InitialBackoff, doubling up to MaxBackoff. A run longer than
	// ResetAfter is stable.
	InitialBackoff Duration `yaml:"initialBackoff" json:"initialBackoff"`
	MaxBackoff     Duration `yaml:"maxBackoff" json:"maxBackoff"`
	ResetAfter     Duration `yaml:"resetAfter" json:"resetAfter"`
	// More than MaxRestarts restarts within Window is a crash loop: it is
	// reported, and restarts go on at MaxBackoff.
	MaxRestarts int      `yaml:"maxRestarts" json:"maxRestarts"`
	Window      Duration `yaml:"window" json:"window"`
}

// StopPolicy is how a container is asked to stop.
type StopPolicy struct {
	Signal string   `yaml:"signal" json:"signal"`
	Grace  Duration `yaml:"grace" json:"grace"`
}

// Duration is a time.Duration written as "1.5s" in YAML and JSON.
type Duration time.Duration

func (d Duration) D() time.Duration { return time.Duration(d) }

func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("not a duration like 1.5s or 200ms: %q", n.Value)
	}
	if v < 0 {
		return fmt.Errorf("negative duration %q", n.Value)
	}
	*d = Duration(v)
	return nil
}

func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	*d = Duration(v)
	return err
}

// Defaults applied to fields left empty.
const (
	DefaultAdminSocket = "/run/meshagent/admin.sock"
	DefaultStateDir    = "/run/meshagent"
	DefaultMetricsAddr = "127.0.0.1:9477"
)

// LoadConfig reads, checks and completes the configuration in path. An
// error names the field path and what is wrong with it; nothing is started
// from a config that did not load.
func LoadConfig(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c, err := ParseConfig(b)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	c.resolvePaths(filepath.Dir(path))
	return c, nil
}

// ParseConfig is LoadConfig for bytes.
func ParseConfig(b []byte) (*Config, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(b, &root); err != nil {
		return nil, err
	}
	if len(root.Content) == 0 {
		return nil, errors.New("empty config")
	}
	if err := checkFields(root.Content[0], reflect.TypeOf(Config{}), ""); err != nil {
		return nil, err
	}
	var c Config
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		return nil, err
	}
	c.setDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// checkFields walks the YAML tree along the Go type so that an unknown or
// mistyped field is reported with its path (pods[1].containers[0].cmd)
// rather than a Go type name.
func checkFields(n *yaml.Node, t reflect.Type, path string) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	where := func() string {
		if path == "" {
			return fmt.Sprintf("line %d", n.Line)
		}
		return fmt.Sprintf("%s (line %d)", path, n.Line)
	}
	if t == reflect.TypeOf(Duration(0)) {
		if n.Kind != yaml.ScalarNode {
			return fmt.Errorf("%s: want a duration like 1s", where())
		}
		var d Duration
		if err := d.UnmarshalYAML(n); err != nil {
			return fmt.Errorf("%s: %w", where(), err)
		}
		return nil
	}
	switch t.Kind() {
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			return fmt.Errorf("%s: want a mapping", where())
		}
		fields := map[string]reflect.Type{}
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name := strings.Split(f.Tag.Get("yaml"), ",")[0]
			if name != "" && name != "-" {
				fields[name] = f.Type
			}
		}
		seen := map[string]bool{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := k.Value
			if path != "" {
				p = path + "." + k.Value
			}
			ft, ok := fields[k.Value]
			if !ok {
				return fmt.Errorf("%s (line %d): unknown field", p, k.Line)
			}
			if seen[k.Value] {
				return fmt.Errorf("%s (line %d): given twice", p, k.Line)
			}
			seen[k.Value] = true
			if err := checkFields(v, ft, p); err != nil {
				return err
			}
		}
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			return fmt.Errorf("%s: want a list", where())
		}
		for i, e := range n.Content {
			if err := checkFields(e, t.Elem(), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			return fmt.Errorf("%s: want a mapping", where())
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			if err := checkFields(n.Content[i+1], t.Elem(), path+"."+n.Content[i].Value); err != nil {
				return err
			}
		}
	default:
		if n.Kind != yaml.ScalarNode {
			return fmt.Errorf("%s: want a single value", where())
		}
		var probe = reflect.New(t)
		if err := n.Decode(probe.Interface()); err != nil {
			return fmt.Errorf("%s: want %s, got %q", where(), t.Kind(), n.Value)
		}
	}
	return nil
}

// resolvePaths makes relative paths (socket, state dir, commands, workdirs)
// relative to the config file's folder, so a config means the same whatever the agent's cwd (a
// systemd service runs in /).
func (c *Config) resolvePaths(base string) {
	abs := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		a, err := filepath.Abs(filepath.Join(base, p))
		if err != nil {
			return p
		}
		return a
	}
	c.Node.AdminSocket = abs(c.Node.AdminSocket)
	c.Node.StateDir = abs(c.Node.StateDir)
	for i := range c.Pods {
		for j := range c.Pods[i].Containers {
			ct := &c.Pods[i].Containers[j]
			ct.Workdir = abs(ct.Workdir)
			if strings.Contains(ct.Command, "/") && ct.Workdir == "" {
				ct.Command = abs(ct.Command)
			}
			if h := ct.Handoff; h != nil && h.MOSN != nil {
				h.MOSN.UDSDir = abs(h.MOSN.UDSDir)
			}
		}
	}
}

func (c *Config) setDefaults() {
	n := &c.Node
	if n.AdminSocket == "" {
		n.AdminSocket = DefaultAdminSocket
	}
	if n.StateDir == "" {
		n.StateDir = DefaultStateDir
	}
	if n.Log.Level == "" {
		n.Log.Level = "info"
	}
	if n.Log.Format == "" {
		n.Log.Format = "text"
	}
	if n.OnExit == "" {
		n.OnExit = "stop"
	}
	if n.MetricsAddr == "" {
		n.MetricsAddr = DefaultMetricsAddr
	}
	if n.Inspect.LogMaxBytes == 0 {
		n.Inspect.LogMaxBytes = 100 << 20
	}
	if n.Inspect.FSMaxUsedPercent == 0 {
		n.Inspect.FSMaxUsedPercent = 90
	}
	if n.Kubernetes != nil {
		n.Kubernetes.setDefaults()
	}
	for i := range c.Pods {
		c.Pods[i].setDefaults()
	}
	c.Node.Cgroup.setDefaults()
}

func (p *PodSpec) setDefaults() {
	if p.Startup.OnTimeout == "" {
		p.Startup.OnTimeout = FailClosed
	}
	for i := range p.Containers {
		c := &p.Containers[i]
		r := &c.Restart
		if r.Policy == "" {
			r.Policy = "always"
		}
		if r.InitialBackoff == 0 {
			r.InitialBackoff = Duration(100 * time.Millisecond)
		}
		if r.MaxBackoff == 0 {
			r.MaxBackoff = Duration(30 * time.Second)
		}
		if r.ResetAfter == 0 {
			r.ResetAfter = Duration(60 * time.Second)
		}
		if r.MaxRestarts == 0 {
			r.MaxRestarts = 5
		}
		if r.Window == 0 {
			r.Window = Duration(time.Minute)
		}
		if c.Stop.Signal == "" {
			c.Stop.Signal = "SIGTERM"
		}
		if c.Stop.Grace == 0 {
			c.Stop.Grace = Duration(10 * time.Second)
		}
		c.setHandoffDefaults()
		if rd := c.Readiness; rd != nil {
			if rd.Period == 0 {
				// A TCP check costs the node a loopback handshake (tens of
				// microseconds of kernel time); 5 s keeps 200 sidecars under
				// 0.5% of a core and still finds a hang within 15 s.
				rd.Period = Duration(5 * time.Second)
			}
			if rd.Timeout == 0 {
				rd.Timeout = Duration(time.Second)
			}
			if rd.StartupInterval == 0 {
				rd.StartupInterval = Duration(time.Millisecond)
				if len(rd.Exec) > 0 {
					// A command per check costs a fork and exec.
					rd.StartupInterval = Duration(50 * time.Millisecond)
				}
			}
			if rd.FailureThreshold == 0 {
				rd.FailureThreshold = 3
			}
		}
	}
}

// Startup timeout policies.
const (
	FailOpen   = "failOpen"
	FailClosed = "failClosed"
)

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$`)

// Validate checks a defaulted config; the error names the field path.
func (c *Config) Validate() error {
	var errs []error
	add := func(path, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", path, fmt.Sprintf(format, a...)))
	}
	switch c.Node.OnExit {
	case "stop", "leave":
	default:
		add("node.onExit", "want stop or leave, got %q", c.Node.OnExit)
	}
	switch c.Node.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		add("node.log.level", "want debug, info, warn or error, got %q", c.Node.Log.Level)
	}
	switch c.Node.Log.Format {
	case "text", "json":
	default:
		add("node.log.format", "want text or json, got %q", c.Node.Log.Format)
	}
	if a := c.Node.MetricsAddr; a != "off" {
		if _, _, err := net.SplitHostPort(a); err != nil {
			add("node.metricsAddr", "want host:port or off, got %q", a)
		}
	}
	if c.Node.Inspect.LogMaxBytes < 0 {
		add("node.inspect.logMaxBytes", "negative")
	}
	if p := c.Node.Inspect.FSMaxUsedPercent; p < 0 || p > 100 {
		add("node.inspect.fsMaxUsedPercent", "want 1 to 100, got %d", p)
	}
	if c.Node.Inspect.UpgradeMaxDuration < 0 {
		add("node.inspect.upgradeMaxDuration", "negative")
	}
	errs = append(errs, c.validateCgroup()...) // config_cgroup.go
	if k := c.Node.Kubernetes; k != nil {
		if err := k.validate(); err != nil {
			errs = append(errs, err)
		}
	}
	pods := map[string]bool{}
	for i := range c.Pods {
		p := &c.Pods[i]
		pp := fmt.Sprintf("pods[%d]", i)
		if !nameRE.MatchString(p.Name) {
			add(pp+".name", "%q is not a valid name (lowercase letters, digits, '-' and '.', at most 63)", p.Name)
		} else if pods[p.Name] {
			add(pp+".name", "pod %q is defined twice", p.Name)
		}
		pods[p.Name] = true
		if err := p.validate(); err != nil {
			errs = append(errs, prefixErrors(pp, err)...)
		}
	}
	return errors.Join(errs...)
}

func prefixErrors(prefix string, err error) []error {
	var out []error
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range j.Unwrap() {
			out = append(out, fmt.Errorf("%s.%w", prefix, e))
		}
		return out
	}
	return []error{fmt.Errorf("%s.%w", prefix, err)}
}

func (p *PodSpec) validate() error {
	var errs []error
	add := func(path, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", path, fmt.Sprintf(format, a...)))
	}
	switch p.Startup.OnTimeout {
	case FailOpen, FailClosed:
	default:
		add("startup.onTimeout", "want failOpen or failClosed, got %q", p.Startup.OnTimeout)
	}
	if len(p.Containers) == 0 {
		add("containers", "a pod needs at least one container")
	}
	names := map[string]bool{}
	for j := range p.Containers {
		c := &p.Containers[j]
		cp := fmt.Sprintf("containers[%d]", j)
		if !nameRE.MatchString(c.Name) {
			add(cp+".name", "%q is not a valid name", c.Name)
		} else if names[c.Name] {
			add(cp+".name", "container %q is defined twice", c.Name)
		}
		names[c.Name] = true
		switch c.Role {
		case RoleSidecar, RoleApp:
		default:
			add(cp+".role", "want sidecar or app, got %q", c.Role)
		}
		if c.Command == "" {
			add(cp+".command", "required")
		}
		for k := range c.Env {
			if k == "" || strings.ContainsAny(k, "=\x00") {
				add(cp+".env", "invalid variable name %q", k)
			}
		}
		switch c.Restart.Policy {
		case "always", "on-failure", "never":
		default:
			add(cp+".restart.policy", "want always, on-failure or never, got %q", c.Restart.Policy)
		}
		if c.Restart.MaxBackoff < c.Restart.InitialBackoff {
			add(cp+".restart.maxBackoff", "%s is below initialBackoff %s", c.Restart.MaxBackoff.D(), c.Restart.InitialBackoff.D())
		}
		if c.Restart.MaxRestarts < 0 {
			add(cp+".restart.maxRestarts", "negative")
		}
		if _, err := ParseSignal(c.Stop.Signal); err != nil {
			add(cp+".stop.signal", "%v", err)
		}
		if c.VersionURL != "" && len(c.VersionCommand) > 0 {
			add(cp+".versionURL", "give versionURL or versionCommand, not both")
		}
		if c.VersionURL != "" {
			if u, err := url.Parse(c.VersionURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				add(cp+".versionURL", "want an http:// or https:// URL, got %q", c.VersionURL)
			}
		}
		errs = append(errs, c.validateHandoff(cp)...)
		if r := c.Readiness; r != nil {
			set := 0
			for _, s := range []bool{r.TCP != "", r.HTTP != "", len(r.Exec) > 0, r.Unix != ""} {
				if s {
					set++
				}
			}
			if set != 1 {
				add(cp+".readiness", "give exactly one of tcp, http, exec, unix (got %d)", set)
			}
			if r.HTTP != "" {
				if u, err := url.Parse(r.HTTP); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
					add(cp+".readiness.http", "want an http:// or https:// URL, got %q", r.HTTP)
				}
			}
			if r.TCP != "" && !strings.Contains(r.TCP, ":") {
				add(cp+".readiness.tcp", "want host:port, got %q", r.TCP)
			}
			if r.FailureThreshold < 0 {
				add(cp+".readiness.failureThreshold", "negative")
			}
		}
	}
	return errors.Join(errs...)
}

// ParseSignal accepts "SIGTERM", "TERM" or "15".
func ParseSignal(s string) (syscall.Signal, error) {
	name := strings.ToUpper(strings.TrimSpace(s))
	if n, err := fmt.Sscanf(name, "%d", new(int)); err == nil && n == 1 {
		var v int
		fmt.Sscanf(name, "%d", &v)
		if v > 0 && v < 65 {
			return syscall.Signal(v), nil
		}
		return 0, fmt.Errorf("signal number %d out of range", v)
	}
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("unknown signal %q", s)
}

// Sidecars and Apps return the pod's containers of that role, in order.
func (p *PodSpec) byRole(r Role) []*ContainerSpec {
	var out []*ContainerSpec
	for i := range p.Containers {
		if p.Containers[i].Role == r {
			out = append(out, &p.Containers[i])
		}
	}
	return out
}

// Container returns the named container's spec, or nil.
func (p *PodSpec) Container(name string) *ContainerSpec {
	for i := range p.Containers {
		if p.Containers[i].Name == name {
			return &p.Containers[i]
		}
	}
	return nil
}
