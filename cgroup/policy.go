package cgroup

import (
	"errors"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
)

// CPUMode says where a sidecar's CPU quota comes from.
type CPUMode int

const (
	// CPUOversell (default) carves the sidecar's quota out of the pod's: the
	// pod quota is left alone, the app still sees all of it, and the sidecar
	// is guaranteed its quota within the pod by a matching weight.
	CPUOversell CPUMode = iota
	// CPUAdd raises the pod's quota by the sidecar's.
	CPUAdd
)

func (m CPUMode) String() string {
	if m == CPUAdd {
		return "add"
	}
	return "oversell"
}

// CPUAmount is an amount of CPU: either Millis (1000 = one CPU) or Percent
// of the pod's CPU limit. The zero value means "not set".
type CPUAmount struct {
	Millis  int64
	Percent float64
}

// IsZero reports whether the amount is unset.
func (a CPUAmount) IsZero() bool { return a.Millis == 0 && a.Percent == 0 }

func (a CPUAmount) String() string {
	if a.Percent != 0 {
		return strconv.FormatFloat(a.Percent, 'f', -1, 64) + "%"
	}
	return strconv.FormatInt(a.Millis, 10) + "m"
}

// resolve turns the amount into millicores given the pod's limit (0 = none).
func (a CPUAmount) resolve(podLimit int64) (int64, error) {
	if a.Percent == 0 {
		return a.Millis, nil
	}
	if podLimit <= 0 {
		return 0, fmt.Errorf("cpu %s is a share of the pod's cpu limit, but the pod has none", a)
	}
	return int64(math.Round(float64(podLimit) * a.Percent / 100)), nil
}

// ParseCPU parses "500m" (millicores), "0.5" or "2" (CPUs) or "25%" (of the
// pod's CPU limit).
func ParseCPU(s string) (CPUAmount, error) {
	t := strings.TrimSpace(s)
	switch {
	case strings.HasSuffix(t, "%"):
		v, err := strconv.ParseFloat(strings.TrimSuffix(t, "%"), 64)
		if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
			return CPUAmount{}, fmt.Errorf("cpu %q: not a percentage", s)
		}
		if v <= 0 || v > 100 {
			return CPUAmount{}, fmt.Errorf("cpu %q: percentage must be in (0, 100]", s)
		}
		return CPUAmount{Percent: v}, nil
	case strings.HasSuffix(t, "m"):
		v, err := strconv.ParseInt(strings.TrimSuffix(t, "m"), 10, 64)
		if err != nil {
			return CPUAmount{}, fmt.Errorf("cpu %q: not a millicore count", s)
		}
		if v <= 0 {
			return CPUAmount{}, fmt.Errorf("cpu %q: must be positive", s)
		}
		return CPUAmount{Millis: v}, nil
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
		return CPUAmount{}, fmt.Errorf("cpu %q: want millicores (500m), cpus (0.5) or a share of the pod (25%%)", s)
	}
	if v <= 0 || v > 1e6 {
		return CPUAmount{}, fmt.Errorf("cpu %q: must be positive", s)
	}
	return CPUAmount{Millis: int64(math.Round(v * 1000))}, nil
}

// ParseBytes parses a memory size: plain bytes, or with a Ki/Mi/Gi/Ti
// (binary) or k/K/M/G/T (decimal) suffix, as Kubernetes writes them.
func ParseBytes(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range []struct {
		suf string
		m   int64
	}{{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40}, {"k", 1e3}, {"K", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12}} {
		if strings.HasSuffix(t, u.suf) {
			t, mult = strings.TrimSuffix(t, u.suf), u.m
			break
		}
	}
	v, err := strconv.ParseInt(t, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("memory %q: not a size (want e.g. 268435456, 256Mi, 1G)", s)
	}
	if v <= 0 {
		return 0, fmt.Errorf("memory %q: must be positive", s)
	}
	if v > math.MaxInt64/mult {
		return 0, fmt.Errorf("memory %q: too large", s)
	}
	return v * mult, nil
}

// Policy is what meshagent enforces for a pod's sidecar.
type Policy struct {
	// CPU is the sidecar's quota; zero means no CPU policy.
	CPU CPUAmount
	// Mode: oversell (default) or add.
	Mode CPUMode
	// Burst is optional CFS burst on top of the quota; never above it.
	Burst CPUAmount
	// Shares overrides the v1 cpu.shares (v2: converted to cpu.weight);
	// 0 means "match the quota" (millicores * 1024 / 1000, as kubelet does
	// for a request), which lets the sidecar win its quota against the app.
	Shares uint64
	// MemoryMax optionally caps the sidecar's memory; 0 = share the pod's.
	MemoryMax int64
	// OOMScoreAdj overrides the default rule (SidecarOOMScoreAdj).
	OOMScoreAdj *int
}

// Policy keys, for config files and (with AnnotationPrefix) pod annotations.
const (
	KeyCPU         = "cpu"
	KeyCPUMode     = "cpu-mode"
	KeyCPUBurst    = "cpu-burst"
	KeyCPUShares   = "cpu-shares"
	KeyMemory      = "memory"
	KeyOOMScoreAdj = "oom-score-adj"
)

// AnnotationPrefix is prepended to the policy keys in pod annotations, e.g.
// "sidecar.meshagent.io/cpu: 500m".
const AnnotationPrefix = "sidecar.meshagent.io/"

// ParsePolicy parses a policy from key/value strings (the Key* constants).
// Every bad value is reported, each naming its key and value; unknown keys
// are errors so a typo does not silently drop a limit.
func ParsePolicy(kv map[string]string) (Policy, error) {
	var p Policy
	var errs []error
	keys := make([]string, 0, len(kv))
	for k := range kv {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := kv[k]
		var err error
		switch k {
		case KeyCPU:
			p.CPU, err = ParseCPU(v)
		case KeyCPUBurst:
			p.Burst, err = ParseCPU(v)
		case KeyCPUMode:
			switch strings.TrimSpace(v) {
			case "", "oversell":
				p.Mode = CPUOversell
			case "add":
				p.Mode = CPUAdd
			default:
				err = fmt.Errorf("unknown cpu mode %q (want oversell or add)", v)
			}
		case KeyCPUShares:
			var n uint64
			n, err = strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			if err != nil || n < 2 || n > 262144 {
				err = fmt.Errorf("cpu shares %q: want an integer in [2, 262144]", v)
			}
			p.Shares = n
		case KeyMemory:
			p.MemoryMax, err = ParseBytes(v)
		case KeyOOMScoreAdj:
			var n int
			n, err = strconv.Atoi(strings.TrimSpace(v))
			if err != nil || n < OOMScoreAdjMin || n > OOMScoreAdjMax {
				err = fmt.Errorf("oom score adj %q: want an integer in [-1000, 1000]", v)
			}
			p.OOMScoreAdj = &n
		default:
			err = fmt.Errorf("unknown policy key %q", k)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", k, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return Policy{}, err
	}
	if p.CPU.IsZero() && !p.Burst.IsZero() {
		return Policy{}, fmt.Errorf("%s %s given without %s", KeyCPUBurst, p.Burst, KeyCPU)
	}
	// Same units can be checked now; mixed units once the pod limit is known.
	if p.Burst.Millis != 0 && p.CPU.Millis != 0 && p.Burst.Millis > p.CPU.Millis ||
		p.Burst.Percent != 0 && p.CPU.Percent != 0 && p.Burst.Percent > p.CPU.Percent {
		return Policy{}, fmt.Errorf("%s %s is above %s %s", KeyCPUBurst, p.Burst, KeyCPU, p.CPU)
	}
	return p, nil
}

// PolicyFromAnnotations parses the AnnotationPrefix keys of a pod's
// annotations; other annotations are ignored.
func PolicyFromAnnotations(ann map[string]string) (Policy, error) {
	kv := map[string]string{}
	for k, v := range ann {
		if rest, ok := strings.CutPrefix(k, AnnotationPrefix); ok {
			kv[rest] = v
		}
	}
	p, err := ParsePolicy(kv)
	if err != nil {
		return Policy{}, fmt.Errorf("annotations %s*: %w", AnnotationPrefix, err)
	}
	return p, nil
}
