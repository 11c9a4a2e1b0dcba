package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/meshagent/meshagent/agent"
)

// upgradeFlags are the flags of `ctl upgrade`.
type upgradeFlags struct {
	command string
	args    argList
	noArgs  bool
	version string
	wait    time.Duration
}

// argList is a repeatable --arg.
type argList []string

func (a *argList) String() string     { return strings.Join(*a, " ") }
func (a *argList) Set(v string) error { *a = append(*a, v); return nil }

func addUpgradeFlags(fs *flag.FlagSet) *upgradeFlags {
	u := &upgradeFlags{}
	fs.StringVar(&u.command, "command", "", "upgrade: the new executable (required)")
	fs.Var(&u.args, "arg", "upgrade: an argument of the new process (repeat for each; none given keeps the current ones)")
	fs.BoolVar(&u.noArgs, "no-args", false, "upgrade: run the new process without arguments")
	fs.StringVar(&u.version, "version", "", "upgrade: the new version")
	fs.DurationVar(&u.wait, "wait", 10*time.Minute, "upgrade: how long to wait for the outcome (readiness plus the watch window)")
	return u
}

// ctlUpgrade is `meshagent ctl upgrade POD/SIDECAR --command PATH [--arg A]... [--version V]`.
// It exits non-zero when the upgrade was refused or rolled back.
func ctlUpgrade(c *agent.Client, rest []string, u *upgradeFlags, out func(any, func(io.Writer)) error) error {
	if len(rest) != 1 {
		return fmt.Errorf("ctl upgrade: want POD/SIDECAR")
	}
	pod, container, ok := strings.Cut(rest[0], "/")
	if !ok || pod == "" || container == "" {
		return fmt.Errorf("ctl upgrade: want POD/SIDECAR, got %q", rest[0])
	}
	if u.command == "" {
		return fmt.Errorf("ctl upgrade: --command: required")
	}
	req := agent.UpgradeRequest{Command: u.command, Version: u.version}
	if len(u.args) > 0 || u.noArgs {
		req.Args = append([]string{}, u.args...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), u.wait)
	defer cancel()
	res, err := c.Upgrade(ctx, pod, container, req)
	if err != nil {
		return err
	}
	if err := out(res, func(w io.Writer) { upgradeTable(w, res) }); err != nil {
		return err
	}
	if res.Outcome != agent.UpgradeSucceeded {
		return fmt.Errorf("upgrade of %s/%s %s: %s", pod, container, res.Outcome, res.Reason)
	}
	return nil
}

func upgradeTable(w io.Writer, r agent.UpgradeResult) {
	fmt.Fprintln(w, "POD\tSIDECAR\tOUTCOME\tFROM\tTO\tOLD PID\tNEW PID\tREADY AFTER\tTOOK\tREASON")
	fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\n", r.Pod, r.Container, r.Outcome, r.FromVersion, r.ToVersion,
		r.OldPID, r.NewPID, r.ReadyAfter.Round(time.Millisecond), r.Duration.Round(time.Millisecond), r.Reason)
}
