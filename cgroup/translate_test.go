package cgroup

import (
	"fmt"
	"strings"
	"testing"
)

func intp(v int) *int { return &v }

// v2 weights come from containerd/cgroups' shares conversion (crun's curve):
// 512 shares -> 59, 256 -> 35.
func TestTranslate(t *testing.T) {
	const root = "/cg"
	base := Target{Pod: "web", PodGroup: "kubepods/pod1", Sidecar: Container{"envoy", "kubepods/pod1/c1"}}
	with := func(f func(*Target)) Target {
		tg := base
		f(&tg)
		return tg
	}
	type kv = [2]string // file (relative to root), value
	for _, tc := range []struct {
		name string
		mode Mode
		tg   Target
		obs  Observed
		want []kv
	}{
		{"v1 oversell millicores", ModeV1, with(func(t *Target) { t.PodCPULimit = 2000; t.Policy.CPU = CPUAmount{Millis: 500} }), Observed{},
			[]kv{{"cpu/kubepods/pod1/c1/cpu.cfs_period_us", "100000"}, {"cpu/kubepods/pod1/c1/cpu.cfs_quota_us", "50000"},
				{"cpu/kubepods/pod1/c1/cpu.shares", "512"}, {"cpu/kubepods/pod1/c1/cpu.cfs_burst_us", "0"}}},
		{"v1 percent of the pod limit, custom period", ModeV1, with(func(t *Target) { t.PodCPULimit = 2000; t.Policy.CPU = CPUAmount{Percent: 25} }), Observed{PodPeriod: 50000},
			[]kv{{"cpu/kubepods/pod1/c1/cpu.cfs_period_us", "50000"}, {"cpu/kubepods/pod1/c1/cpu.cfs_quota_us", "25000"},
				{"cpu/kubepods/pod1/c1/cpu.shares", "512"}, {"cpu/kubepods/pod1/c1/cpu.cfs_burst_us", "0"}}},
		{"v1 add mode raises the pod, burst, explicit shares", ModeHybrid, with(func(t *Target) {
			t.PodCPULimit = 1000
			t.Policy = Policy{CPU: CPUAmount{Millis: 500}, Mode: CPUAdd, Burst: CPUAmount{Millis: 200}, Shares: 4096}
		}), Observed{},
			[]kv{{"cpu/kubepods/pod1/c1/cpu.cfs_period_us", "100000"}, {"cpu/kubepods/pod1/c1/cpu.cfs_quota_us", "50000"},
				{"cpu/kubepods/pod1/c1/cpu.shares", "4096"}, {"cpu/kubepods/pod1/c1/cpu.cfs_burst_us", "20000"},
				{"cpu/kubepods/pod1/cpu.cfs_quota_us", "150000"}}},
		{"v1 add mode on an unlimited pod leaves the pod alone", ModeV1, with(func(t *Target) { t.Policy = Policy{CPU: CPUAmount{Millis: 300}, Mode: CPUAdd} }), Observed{},
			[]kv{{"cpu/kubepods/pod1/c1/cpu.cfs_period_us", "100000"}, {"cpu/kubepods/pod1/c1/cpu.cfs_quota_us", "30000"},
				{"cpu/kubepods/pod1/c1/cpu.shares", "307"}, {"cpu/kubepods/pod1/c1/cpu.cfs_burst_us", "0"}}},
		{"v1 host pod, no cpu policy: pod limits, sidecar oom for each pid", ModeV1, with(func(t *Target) {
			t.OwnPod, t.PodMemoryLimit = true, 100000000
		}), Observed{SidecarPIDs: []int{30, 7}, AppOOMScoreAdj: -997},
			[]kv{{"cpu/kubepods/pod1/cpu.cfs_quota_us", "-1"}, {"memory/kubepods/pod1/memory.limit_in_bytes", "99999744"},
				{"/proc/7/oom_score_adj", "3"}, {"/proc/30/oom_score_adj", "3"}}},
		{"v1 memory cap and oom override", ModeV1, with(func(t *Target) {
			t.Policy = Policy{MemoryMax: 64 << 20, OOMScoreAdj: intp(900)}
		}), Observed{SidecarPIDs: []int{5}},
			[]kv{{"memory/kubepods/pod1/c1/memory.limit_in_bytes", "67108864"}, {"/proc/5/oom_score_adj", "900"}}},
		{"v2 oversell", ModeV2, with(func(t *Target) { t.PodCPULimit = 2000; t.Policy.CPU = CPUAmount{Millis: 500} }), Observed{},
			[]kv{{"kubepods/pod1/c1/cpu.max", "50000 100000"}, {"kubepods/pod1/c1/cpu.weight", "59"}, {"kubepods/pod1/c1/cpu.max.burst", "0"}}},
		{"v2 add mode and a host pod", ModeV2, with(func(t *Target) {
			t.OwnPod, t.PodCPULimit, t.PodMemoryLimit = true, 1000, 1<<30
			t.Policy = Policy{CPU: CPUAmount{Millis: 250}, Mode: CPUAdd, Burst: CPUAmount{Millis: 250}}
		}), Observed{},
			[]kv{{"kubepods/pod1/c1/cpu.max", "25000 100000"}, {"kubepods/pod1/c1/cpu.weight", "35"}, {"kubepods/pod1/c1/cpu.max.burst", "25000"},
				{"kubepods/pod1/cpu.max", "125000 100000"}, {"kubepods/pod1/memory.max", "1073741824"}}},
		{"v2 host pod without limits", ModeV2, with(func(t *Target) { t.OwnPod = true }), Observed{},
			[]kv{{"kubepods/pod1/cpu.max", "max 100000"}, {"kubepods/pod1/memory.max", "max"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := translate(root, tc.mode, tc.tg, tc.obs)
			if err != nil {
				t.Fatal(err)
			}
			var gs, ws []string
			for _, s := range got {
				f := strings.TrimPrefix(s.File, root+"/")
				gs = append(gs, f+"="+s.Value)
				if s.Pod != "web" {
					t.Errorf("setting %s names pod %q", f, s.Pod)
				}
			}
			for _, w := range tc.want {
				ws = append(ws, w[0]+"="+w[1])
			}
			if strings.Join(gs, "\n") != strings.Join(ws, "\n") {
				t.Errorf("settings:\n%s\nwant:\n%s", strings.Join(gs, "\n"), strings.Join(ws, "\n"))
			}
		})
	}
}

func TestTranslateErrors(t *testing.T) {
	base := Target{Pod: "web", PodGroup: "p", Sidecar: Container{"envoy", "p/e"}}
	for _, tc := range []struct {
		name string
		f    func(*Target)
		want string
	}{
		{"percent without a pod limit", func(t *Target) { t.Policy.CPU = CPUAmount{Percent: 25} },
			"pod web container envoy: cpu 25% is a share of the pod's cpu limit, but the pod has none"},
		{"quota above a v1 parent", func(t *Target) { t.PodCPULimit = 500; t.Policy.CPU = CPUAmount{Millis: 2000} },
			"pod web container envoy: cpu 2000m (2000m) is above the pod's cpu limit 500m"},
		{"burst above quota in mixed units", func(t *Target) {
			t.PodCPULimit = 2000
			t.Policy = Policy{CPU: CPUAmount{Percent: 25}, Burst: CPUAmount{Millis: 600}}
		}, "pod web container envoy: cpu burst 600m (600m) is above cpu 25% (500m)"},
		{"quota below the kernel minimum", func(t *Target) { t.Policy.CPU = CPUAmount{Millis: 5} },
			"pod web container envoy: cpu 5m is 500µs per 100000µs period, below the kernel minimum of 1000µs"},
		{"negative pod limit", func(t *Target) { t.PodCPULimit = -1 }, "pod web: negative pod cpu limit -1m"},
		{"bad sidecar name", func(t *Target) { t.Sidecar.Name = "a/b" }, `pod web: sidecar: invalid container name "a/b"`},
		{"bad group", func(t *Target) { t.Sidecar.Group = "../x" }, `pod web container envoy: invalid cgroup group "../x"`},
		{"memory cap below a page", func(t *Target) { t.Policy.MemoryMax = 100 }, "memory cap 100 bytes is below one page"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tg := base
			tc.f(&tg)
			for _, mode := range []Mode{ModeV1, ModeV2} {
				s, err := translate("/cg", mode, tg, Observed{})
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("%s: err = %v, want %q (settings %v)", mode, err, tc.want, s)
				}
				if s != nil {
					t.Fatalf("%s: settings returned with an error: %v", mode, s)
				}
			}
		})
	}
}

func TestOrderWrites(t *testing.T) {
	w := func(ctr string, k Knob, cur, val string) write {
		return write{Setting: Setting{Container: ctr, Knob: k, Value: val}, Current: cur}
	}
	name := func(ws []write) string {
		var out []string
		for _, x := range ws {
			out = append(out, fmt.Sprintf("%s/%s", x.Container, x.Knob))
		}
		return strings.Join(out, " ")
	}
	for _, tc := range []struct {
		name string
		in   []write
		want string
	}{
		{"pod rises: pod first",
			[]write{w("s", KnobCPUShares, "2", "512"), w("s", KnobCPUQuota, "50000", "100000"), w("", KnobCPUQuota, "100000", "200000")},
			"/cpu.quota s/cpu.quota s/cpu.shares"},
		{"pod falls: container first",
			[]write{w("", KnobCPUQuota, "200000", "70000"), w("s", KnobCPUQuota, "100000", "20000")},
			"s/cpu.quota /cpu.quota"},
		{"pod from unlimited to a limit counts as falling",
			[]write{w("", KnobCPUQuota, "-1", "70000"), w("s", KnobCPUQuota, "-1", "20000")},
			"s/cpu.quota /cpu.quota"},
		{"v2 spelling: max falls to a number",
			[]write{w("", KnobCPUQuota, "max 100000", "70000 100000"), w("s", KnobCPUQuota, "max 100000", "20000 100000")},
			"s/cpu.quota /cpu.quota"},
		{"falling quota: burst first",
			[]write{w("s", KnobCPUQuota, "100000", "20000"), w("s", KnobCPUBurst, "80000", "10000")},
			"s/cpu.burst s/cpu.quota"},
		{"rising quota: burst after",
			[]write{w("s", KnobCPUBurst, "0", "80000"), w("s", KnobCPUQuota, "20000", "100000")},
			"s/cpu.quota s/cpu.burst"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := name(orderWrites(tc.in)); got != tc.want {
				t.Fatalf("order %q, want %q", got, tc.want)
			}
		})
	}
}

func TestSameValue(t *testing.T) {
	for _, tc := range []struct {
		k         Knob
		cur, want string
		same      bool
	}{
		{KnobMemoryMax, "9223372036854771712", "-1", true},
		{KnobMemoryMax, "max", "max", true},
		{KnobMemoryMax, "1048576", "-1", false},
		{KnobCPUQuota, "20000", "20000", true},
		{KnobCPUQuota, "20000 100000", "20000 50000", false},
	} {
		if got := sameValue(tc.k, tc.cur, tc.want); got != tc.same {
			t.Errorf("sameValue(%s, %q, %q) = %v", tc.k, tc.cur, tc.want, got)
		}
	}
}
