package agent

import (
	"errors"
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/meshagent/meshagent/agent/containerd"
)

// A Kubernetes pod tells meshagent what to do with it through its own
// annotations (metadata.annotations), which kubelet hands to containerd's
// CRI plugin with the sandbox. Every key is documented in README.md
// ("Kubernetes"). A key that does not parse is reported (event
// bad-annotation) and its default used: one typo must not stop the pod.
const (
	AnnoSidecars         = containerd.AnnotationSidecars // meshagent.io/sidecars: envoy,log-agent
	AnnoReadinessPrefix  = "meshagent.io/readiness."     // meshagent.io/readiness.<container>: tcp:15001
	AnnoStartupTimeout   = "meshagent.io/startup-timeout"
	AnnoStartupPolicy    = "meshagent.io/startup-policy"
	AnnoStartupInterval  = "meshagent.io/startup-interval"
	AnnoReadinessPeriod  = "meshagent.io/readiness-period"
	AnnoReadinessTimeout = "meshagent.io/readiness-timeout"
	AnnoFailureThreshold = "meshagent.io/failure-threshold"
	AnnoRestartGrace     = "meshagent.io/restart-grace"
	AnnoHoldTimeout      = "meshagent.io/hold-timeout"
	AnnoJob              = "meshagent.io/job"
	// AnnoVersionPrefix declares a container's version for the version
	// inspection: meshagent.io/version.<container>: 1.27.0.
	AnnoVersionPrefix = "meshagent.io/version."
	// AnnoVersionCheckPrefix says how to read the version the container
	// runs: meshagent.io/version-check.<container>: http:15000/version
	// (the first line of the body, fetched in the pod's network namespace)
	// or exec:COMMAND ARGS (the first line of its output, run in the
	// container's namespaces).
	AnnoVersionCheckPrefix = "meshagent.io/version-check."
)

// Job modes of AnnoJob.
const (
	JobOff       = ""           // not a Job: sidecars run until kubelet stops them
	JobAnyExit   = "true"       // stop the sidecars once every app has exited
	JobOnSuccess = "on-success" // ... once every app has exited with status 0
)

// kubePodPolicy is a pod's meshagent settings, parsed and defaulted.
type kubePodPolicy struct {
	Sidecars         []string
	Readiness        map[string]kubeProbeSpec // by container name
	StartupTimeout   time.Duration            // 0: gates wait for ever
	OnTimeout        string                   // FailOpen or FailClosed
	StartupInterval  time.Duration
	Period           time.Duration
	Timeout          time.Duration
	FailureThreshold int
	RestartGrace     time.Duration
	HoldTimeout      time.Duration
	Job              string
	// Version and VersionCheck are the containers' declared versions and
	// how to read the running ones (nil when the pod declares none).
	Version      map[string]string
	VersionCheck map[string]kubeProbeSpec
}

func defaultKubePodPolicy() kubePodPolicy {
	return kubePodPolicy{
		Readiness:        map[string]kubeProbeSpec{},
		StartupTimeout:   2 * time.Minute,
		OnTimeout:        FailClosed,
		StartupInterval:  5 * time.Millisecond,
		Period:           5 * time.Second, // as in host mode: hang found within 15s, probes cheap at node scale
		Timeout:          time.Second,
		FailureThreshold: 3,
		RestartGrace:     30 * time.Second,
		HoldTimeout:      30 * time.Second,
	}
}

// parseKubePodPolicy reads a pod's annotations. It always returns a usable
// policy; err lists every key it could not read, by name.
func parseKubePodPolicy(ann map[string]string) (kubePodPolicy, error) {
	p := defaultKubePodPolicy()
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("annotation %s=%q: %s", key, ann[key], fmt.Sprintf(format, a...)))
	}
	if names, err := containerd.ParseSidecars(ann[AnnoSidecars]); err != nil {
		errs = append(errs, err)
	} else {
		p.Sidecars = names
	}
	dur := func(key string, dst *time.Duration, zeroOK bool) {
		v, ok := ann[key]
		if !ok {
			return
		}
		d, err := time.ParseDuration(strings.TrimSpace(v))
		switch {
		case err != nil:
			bad(key, "want a duration like 30s or 500ms")
		case d < 0 || (d == 0 && !zeroOK):
			bad(key, "want a positive duration")
		default:
			*dst = d
		}
	}
	dur(AnnoStartupTimeout, &p.StartupTimeout, true)
	dur(AnnoStartupInterval, &p.StartupInterval, false)
	dur(AnnoReadinessPeriod, &p.Period, false)
	dur(AnnoReadinessTimeout, &p.Timeout, false)
	dur(AnnoRestartGrace, &p.RestartGrace, true)
	dur(AnnoHoldTimeout, &p.HoldTimeout, true)
	if v, ok := ann[AnnoStartupPolicy]; ok {
		switch v {
		case FailOpen, FailClosed:
			p.OnTimeout = v
		default:
			bad(AnnoStartupPolicy, "want %s or %s", FailOpen, FailClosed)
		}
	}
	if v, ok := ann[AnnoFailureThreshold]; ok {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n < 1 {
			bad(AnnoFailureThreshold, "want a whole number of at least 1")
		} else {
			p.FailureThreshold = n
		}
	}
	if v, ok := ann[AnnoJob]; ok {
		switch strings.TrimSpace(v) {
		case "true":
			p.Job = JobAnyExit
		case "on-success":
			p.Job = JobOnSuccess
		case "false", "":
			p.Job = JobOff
		default:
			bad(AnnoJob, "want true, on-success or false")
		}
	}
	keys := make([]string, 0, len(ann))
	for k := range ann {
		keys = append(keys, k)
	}
	sort.Strings(keys) // errors in a stable order
	for _, k := range keys {
		if name, ok := strings.CutPrefix(k, AnnoVersionPrefix); ok {
			if v := strings.TrimSpace(ann[k]); v == "" {
				bad(k, "want a version")
			} else {
				if p.Version == nil {
					p.Version = map[string]string{}
				}
				p.Version[name] = v
			}
			continue
		}
		if name, ok := strings.CutPrefix(k, AnnoVersionCheckPrefix); ok {
			spec, err := parseKubeProbe(ann[k])
			if err == nil && spec.Kind != "http" && spec.Kind != "exec" {
				err = fmt.Errorf("want http:PORT/PATH or exec:COMMAND (a %s check reads no version)", spec.Kind)
			}
			if err != nil {
				bad(k, "%v", err)
				continue
			}
			if p.VersionCheck == nil {
				p.VersionCheck = map[string]kubeProbeSpec{}
			}
			p.VersionCheck[name] = spec
			continue
		}
		name, ok := strings.CutPrefix(k, AnnoReadinessPrefix)
		if !ok {
			continue
		}
		spec, err := parseKubeProbe(ann[k])
		if err != nil {
			bad(k, "%v", err)
			continue
		}
		p.Readiness[name] = spec
	}
	if p.StartupInterval > p.Period {
		p.StartupInterval = p.Period
	}
	return p, errors.Join(errs...)
}

// kubeProbeSpec is one readiness check of a Kubernetes container, run by
// the agent from the node inside the pod's network namespace.
type kubeProbeSpec struct {
	Kind string   // tcp, http, unix, exec
	Addr string   // tcp, http: host:port inside the pod's network namespace
	Path string   // http: request path; unix: socket path inside the container
	Cmd  []string // exec: command run inside the container's namespaces
}

func (s kubeProbeSpec) String() string {
	switch s.Kind {
	case "tcp":
		return "tcp " + s.Addr
	case "http":
		return "http " + s.Addr + s.Path
	case "unix":
		return "unix " + s.Path
	}
	return fmt.Sprintf("exec %q", s.Cmd)
}

// parseKubeProbe reads a readiness annotation value:
//
//	tcp:15001  tcp:127.0.0.1:15001
//	http:15021/ready  http:127.0.0.1:15000/ready  http:[::1]:15000/
//	unix:/run/envoy/admin.sock
//	exec:/usr/local/bin/ready --quick
func parseKubeProbe(v string) (kubeProbeSpec, error) {
	kind, rest, ok := strings.Cut(strings.TrimSpace(v), ":")
	if !ok || rest == "" {
		return kubeProbeSpec{}, errors.New("want tcp:PORT, http:PORT/PATH, unix:/PATH or exec:COMMAND")
	}
	switch kind {
	case "tcp":
		addr, err := probeAddr(rest)
		if err != nil {
			return kubeProbeSpec{}, err
		}
		return kubeProbeSpec{Kind: kind, Addr: addr}, nil
	case "http":
		hostport, path := rest, "/"
		if i := strings.Index(rest, "/"); i >= 0 {
			hostport, path = rest[:i], rest[i:]
		}
		addr, err := probeAddr(hostport)
		if err != nil {
			return kubeProbeSpec{}, err
		}
		return kubeProbeSpec{Kind: kind, Addr: addr, Path: path}, nil
	case "unix":
		if !strings.HasPrefix(rest, "/") {
			return kubeProbeSpec{}, fmt.Errorf("unix: want an absolute path, got %q", rest)
		}
		return kubeProbeSpec{Kind: kind, Path: rest}, nil
	case "exec":
		cmd := strings.Fields(rest)
		if len(cmd) == 0 {
			return kubeProbeSpec{}, errors.New("exec: empty command")
		}
		return kubeProbeSpec{Kind: kind, Cmd: cmd}, nil
	}
	return kubeProbeSpec{}, fmt.Errorf("unknown check %q (want tcp, http, unix or exec)", kind)
}

// probeAddr reads PORT or HOST:PORT; the host defaults to 127.0.0.1, the
// pod's own loopback, where proxies' admin ports usually listen.
func probeAddr(s string) (string, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n < 1 || n > 65535 {
			return "", fmt.Errorf("port %d out of range", n)
		}
		return net.JoinHostPort("127.0.0.1", s), nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", fmt.Errorf("want PORT or HOST:PORT, got %q", s)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return "", fmt.Errorf("bad port %q", port)
	}
	if net.ParseIP(host) == nil {
		return "", fmt.Errorf("host %q: want an IP address (no DNS inside the agent's probe)", host)
	}
	return net.JoinHostPort(host, port), nil
}
