package main

import (
	"context"
	"fmt"
	"io"

	"github.com/meshagent/meshagent/agent"
)

// ctlFeatures handles `ctl status` (which resource-policy paths are in
// force) and `ctl plan` (the cgroup dry run). It reports whether cmd was one
// of them.
func ctlFeatures(ctx context.Context, c *agent.Client, cmd string, rest []string,
	out func(any, func(io.Writer)) error) (bool, error) {
	switch cmd {
	case "status":
		st, err := c.Status(ctx)
		if err != nil {
			return true, err
		}
		return true, out(st, func(w io.Writer) { statusTable(w, st) })
	case "plan":
		if len(rest) != 0 {
			return true, fmt.Errorf("ctl plan: takes no arguments")
		}
		p, err := c.CgroupPlan(ctx)
		if err != nil {
			return true, err
		}
		return true, out(p, func(w io.Writer) { planTable(w, p) })
	}
	return false, nil
}

func statusTable(w io.Writer, st agent.Status) {
	cg := "off"
	if st.Cgroup.Enabled {
		cg = fmt.Sprintf("on (%s at %s, reconcile every %s)", st.Cgroup.Mode, st.Cgroup.Root, st.Cgroup.ReconcileInterval)
	}
	fmt.Fprintf(w, "cgroup policy:\t%s\n", cg)
	if st.Cgroup.Reason != "" {
		fmt.Fprintf(w, "\t%s\n", st.Cgroup.Reason)
	}
	fmt.Fprintf(w, "kubernetes sidecar policy:\t%s\n", st.NRI.Mode)
	fmt.Fprintf(w, "\t%s\n", st.NRI.Reason)
	fmt.Fprintf(w, "\tNRI adjustments %d, re-assertions %d, task-start applications %d\n",
		st.NRI.Adjusted, st.NRI.Updated, st.NRI.TaskStart)
}

func planTable(w io.Writer, plans []agent.PlanPod) {
	fmt.Fprintln(w, "POD\tCONTAINER\tKNOB\tCURRENT\tDESIRED\tCHANGE\tFILE")
	for _, p := range plans {
		if p.Error != "" {
			fmt.Fprintf(w, "%s\t-\t-\t-\t-\t-\t%s\n", p.Pod, p.Error)
		}
		for _, s := range p.Settings {
			ct := s.Container
			if ct == "" {
				ct = "(pod)"
			}
			ch := ""
			if s.Change {
				ch = "yes"
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Pod, ct, s.Knob, s.Current, s.Desired, ch, s.File)
		}
	}
}
