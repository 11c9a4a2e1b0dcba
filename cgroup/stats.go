package cgroup

import (
	"fmt"

	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
)

// Stats are the figures metrics export for one group.
type Stats struct {
	CPUUsageNanos  uint64 // total CPU time used
	NrPeriods      uint64 // CFS periods with runnable tasks
	NrThrottled    uint64 // periods in which the group was throttled
	ThrottledNanos uint64 // total time throttled
	MemoryUsage    uint64 // bytes charged now
	OOMKills       uint64 // processes of the group killed by the OOM killer
}

// Stats reads the statistics of g through containerd/cgroups.
func (m *Manager) Stats(g Group) (Stats, error) {
	s, err := g.clean()
	if err != nil {
		return Stats{}, err
	}
	if m.mode.v1() {
		cg, err := cgroup1.Load(cgroup1.StaticPath("/"+s), cgroup1.WithHierarchy(m.v1Hierarchy))
		if err != nil {
			return Stats{}, fmt.Errorf("stats of cgroup %s: %w", s, err)
		}
		mt, err := cg.Stat(cgroup1.IgnoreNotExist)
		if err != nil {
			return Stats{}, fmt.Errorf("stats of cgroup %s: %w", s, err)
		}
		var st Stats
		if c := mt.GetCPU(); c != nil {
			st.CPUUsageNanos = c.GetUsage().GetTotal()
			st.NrPeriods = c.GetThrottling().GetPeriods()
			st.NrThrottled = c.GetThrottling().GetThrottledPeriods()
			st.ThrottledNanos = c.GetThrottling().GetThrottledTime()
		}
		st.MemoryUsage = mt.GetMemory().GetUsage().GetUsage()
		st.OOMKills = mt.GetMemoryOomControl().GetOomKill()
		return st, nil
	}
	cg, err := cgroup2.Load("/"+s, cgroup2.WithMountpoint(m.root))
	if err != nil {
		return Stats{}, fmt.Errorf("stats of cgroup %s: %w", s, err)
	}
	mt, err := cg.StatFiltered(cgroup2.StatCPU | cgroup2.StatMemory | cgroup2.StatMemoryEvents)
	if err != nil {
		return Stats{}, fmt.Errorf("stats of cgroup %s: %w", s, err)
	}
	var st Stats
	if c := mt.GetCPU(); c != nil {
		st.CPUUsageNanos = c.GetUsageUsec() * 1000
		st.NrPeriods = c.GetNrPeriods()
		st.NrThrottled = c.GetNrThrottled()
		st.ThrottledNanos = c.GetThrottledUsec() * 1000
	}
	st.MemoryUsage = mt.GetMemory().GetUsage()
	st.OOMKills = mt.GetMemoryEvents().GetOomKill()
	return st, nil
}
