package main

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/meshagent/meshagent/agent"
)

// ctlOps handles the operator's commands: switch, reload, inspect, metrics.
// It reports whether cmd was one of them.
func ctlOps(ctx context.Context, c *agent.Client, cmd string, rest []string, asJSON bool, stdout io.Writer,
	out func(any, func(io.Writer)) error) (bool, error) {
	switch cmd {
	case "switch", "switches":
		return true, ctlSwitch(ctx, c, rest, out)
	case "reload":
		if len(rest) != 0 {
			return true, fmt.Errorf("ctl reload: takes no arguments")
		}
		res, err := c.Reload(ctx)
		if err != nil {
			return true, err
		}
		return true, out(res, func(w io.Writer) { reloadTable(w, res) })
	case "inspect":
		rep, err := c.Inspect(ctx)
		if err != nil {
			return true, err
		}
		if err := out(rep, func(w io.Writer) { inspectTable(w, rep) }); err != nil {
			return true, err
		}
		if len(rep.Findings) > 0 {
			return true, exitError(1)
		}
		return true, nil
	case "metrics":
		b, err := c.Metrics(ctx)
		if err != nil {
			return true, err
		}
		_, err = stdout.Write(b)
		return true, err
	}
	return false, nil
}

func ctlSwitch(ctx context.Context, c *agent.Client, rest []string, out func(any, func(io.Writer)) error) error {
	if len(rest) == 0 || rest[0] == "list" {
		sw, err := c.Switches(ctx)
		if err != nil {
			return err
		}
		return out(sw, func(w io.Writer) { switchTable(w, sw) })
	}
	if rest[0] != "set" || len(rest) != 3 {
		return fmt.Errorf("ctl switch: want `switch list` or `switch set NAME on|off`, got %q", strings.Join(rest, " "))
	}
	on, err := agent.ParseOnOff(rest[2])
	if err != nil {
		return fmt.Errorf("ctl switch set %s: %w", rest[1], err)
	}
	st, err := c.SetSwitch(ctx, rest[1], on)
	if err != nil {
		return err
	}
	return out(st, func(w io.Writer) { fmt.Fprintf(w, "%s is %s\n", st.Name, onOff(st.On)) })
}

func onOff(on bool) string {
	if on {
		return "on"
	}
	return "off"
}

func switchTable(w io.Writer, sw []agent.SwitchState) {
	fmt.Fprintln(w, "SWITCH\tSTATE\tCHANGED\tBY UID\tWHAT IT DOES")
	for _, s := range sw {
		changed, by := "-", "-"
		if !s.Changed.IsZero() {
			changed = s.Changed.Local().Format("2006-01-02 15:04:05")
		}
		if s.ChangedBy != nil {
			by = fmt.Sprint(*s.ChangedBy)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", s.Name, onOff(s.On), changed, by, s.Description)
	}
}

func reloadTable(w io.Writer, r agent.ReloadResult) {
	line := func(what string, names []string) {
		if len(names) > 0 {
			fmt.Fprintf(w, "%s:\t%s\n", what, strings.Join(names, ", "))
		}
	}
	line("added (started, sidecars first)", r.Added)
	line("removed (stopped in order)", r.Removed)
	line("restarted (spec changed: stopped in order, started with the new spec)", r.Restarted)
	line("unchanged (not touched)", r.Unchanged)
	line("not applied until the agent restarts", r.NotApplied)
	line("errors", r.Errors)
}

func inspectTable(w io.Writer, r agent.InspectReport) {
	if len(r.Findings) == 0 {
		fmt.Fprintf(w, "no findings (checks: %s)\n", strings.Join(r.Checks, ", "))
		return
	}
	fmt.Fprintln(w, "CHECK\tPOD\tCONTAINER\tEXPECTED\tFOUND")
	dash := func(s string) string {
		if s == "" {
			return "-"
		}
		return s
	}
	for _, f := range r.Findings {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", f.Check, dash(f.Pod), dash(f.Container), f.Expected, f.Found)
	}
}
