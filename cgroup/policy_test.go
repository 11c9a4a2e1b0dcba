package cgroup

import (
	"strings"
	"testing"
)

func TestParsePolicy(t *testing.T) {
	for _, tc := range []struct {
		name string
		kv   map[string]string
		want Policy
	}{
		{"millicores", map[string]string{"cpu": "500m"}, Policy{CPU: CPUAmount{Millis: 500}}},
		{"cpus", map[string]string{"cpu": "0.25"}, Policy{CPU: CPUAmount{Millis: 250}}},
		{"percent add burst", map[string]string{"cpu": "25%", "cpu-mode": "add", "cpu-burst": "10%"},
			Policy{CPU: CPUAmount{Percent: 25}, Mode: CPUAdd, Burst: CPUAmount{Percent: 10}}},
		{"oversell shares memory", map[string]string{"cpu": "1", "cpu-mode": "oversell", "cpu-shares": "2048", "memory": "256Mi"},
			Policy{CPU: CPUAmount{Millis: 1000}, Shares: 2048, MemoryMax: 256 << 20}},
		{"memory only", map[string]string{"memory": "1G"}, Policy{MemoryMax: 1e9}},
		{"empty", map[string]string{}, Policy{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParsePolicy(tc.kv)
			if err != nil {
				t.Fatal(err)
			}
			if got.CPU != tc.want.CPU || got.Mode != tc.want.Mode || got.Burst != tc.want.Burst ||
				got.Shares != tc.want.Shares || got.MemoryMax != tc.want.MemoryMax || got.OOMScoreAdj != nil {
				t.Fatalf("ParsePolicy(%v) = %+v, want %+v", tc.kv, got, tc.want)
			}
		})
	}
	p, err := ParsePolicy(map[string]string{"oom-score-adj": "900"})
	if err != nil || p.OOMScoreAdj == nil || *p.OOMScoreAdj != 900 {
		t.Fatalf("oom-score-adj: %+v, %v", p, err)
	}
}

func TestParsePolicyErrors(t *testing.T) {
	for _, tc := range []struct {
		kv   map[string]string
		want []string
	}{
		{map[string]string{"cpu": "abc"}, []string{`cpu: cpu "abc": want millicores`}},
		{map[string]string{"cpu": "-25%"}, []string{`cpu: cpu "-25%": percentage must be in (0, 100]`}},
		{map[string]string{"cpu": "150%"}, []string{`percentage must be in (0, 100]`}},
		{map[string]string{"cpu": "-500m"}, []string{`cpu "-500m": must be positive`}},
		{map[string]string{"cpu": "0"}, []string{`cpu "0": must be positive`}},
		{map[string]string{"cpu": "NaN"}, []string{`cpu "NaN"`}},
		{map[string]string{"cpu-mode": "double"}, []string{`cpu-mode: unknown cpu mode "double"`}},
		{map[string]string{"cpu": "500m", "cpu-burst": "600m"}, []string{"cpu-burst 600m is above cpu 500m"}},
		{map[string]string{"cpu-burst": "100m"}, []string{"cpu-burst 100m given without cpu"}},
		{map[string]string{"cpu-shares": "1"}, []string{`cpu-shares: cpu shares "1"`}},
		{map[string]string{"memory": "lots"}, []string{`memory: memory "lots": not a size`}},
		{map[string]string{"memory": "-1Mi"}, []string{`memory "-1Mi": must be positive`}},
		{map[string]string{"memory": "99999999999Ti"}, []string{`memory "99999999999Ti": too large`}},
		{map[string]string{"oom-score-adj": "-2000"}, []string{`oom-score-adj: oom score adj "-2000"`}},
		{map[string]string{"cpus": "1"}, []string{`unknown policy key "cpus"`}},
		// Every bad value is reported, not just the first.
		{map[string]string{"cpu": "abc", "memory": "x"}, []string{`cpu "abc"`, `memory "x"`}},
	} {
		_, err := ParsePolicy(tc.kv)
		if err == nil {
			t.Errorf("ParsePolicy(%v) accepted", tc.kv)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("ParsePolicy(%v) error %q, want it to contain %q", tc.kv, err, w)
			}
		}
	}
}

func TestPolicyFromAnnotations(t *testing.T) {
	p, err := PolicyFromAnnotations(map[string]string{
		AnnotationPrefix + "cpu":      "300m",
		AnnotationPrefix + "cpu-mode": "add",
		"other.io/cpu":                "abc", // not ours: ignored
	})
	if err != nil || p.CPU.Millis != 300 || p.Mode != CPUAdd {
		t.Fatalf("PolicyFromAnnotations = %+v, %v", p, err)
	}
	_, err = PolicyFromAnnotations(map[string]string{AnnotationPrefix + "cpu": "abc"})
	if err == nil || !strings.Contains(err.Error(), AnnotationPrefix) || !strings.Contains(err.Error(), `"abc"`) {
		t.Fatalf("bad annotation error = %v", err)
	}
}
