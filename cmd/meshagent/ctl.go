package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/meshagent/meshagent/agent"
)

// socketFromEnv is the socket named by the environment variable env, or def
// when it is unset or empty.
func socketFromEnv(env, def string) string {
	if s := os.Getenv(env); s != "" {
		return s
	}
	return def
}

func cmdCtl(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("ctl", flag.ContinueOnError)
	socket := fs.String("socket", socketFromEnv("MESHAGENT_SOCKET", agent.DefaultAdminSocket), "admin socket of the agent")
	asJSON := fs.Bool("json", false, "print JSON for scripts")
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for the agent")
	if err := fs.Parse(args); err != nil {
		return err
	}
	rest := fs.Args()
	if len(rest) == 0 {
		return errors.New("ctl: want a command: pods, pod, restart, restart-pod, upgrade, events, switch, reload, inspect, metrics, status, plan")
	}
	// Flags may also follow the command: `ctl pods --json`.
	cmd, rest := rest[0], rest[1:]
	sub := flag.NewFlagSet("ctl "+cmd, flag.ContinueOnError)
	sub.BoolVar(asJSON, "json", *asJSON, "print JSON")
	sub.StringVar(socket, "socket", *socket, "admin socket")
	pod := sub.String("pod", "", "only this pod (events)")
	since := sub.Uint64("since", 0, "events after this sequence number")
	limit := sub.Int("limit", 100, "at most this many events")
	upg := addUpgradeFlags(sub)
	// Flags may sit between arguments too: `ctl switch list --json`.
	var positional []string
	for {
		if err := sub.Parse(rest); err != nil {
			return err
		}
		if sub.NArg() == 0 {
			break
		}
		positional = append(positional, sub.Arg(0))
		rest = sub.Args()[1:]
	}
	rest = positional
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	c := agent.NewClient(*socket)
	out := func(v any, table func(io.Writer)) error {
		if *asJSON {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(v)
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		table(tw)
		return tw.Flush()
	}
	need := func(n int, what string) error {
		if len(rest) != n {
			return fmt.Errorf("ctl %s: want %s", cmd, what)
		}
		return nil
	}
	switch cmd {
	case "pods":
		pods, err := c.Pods(ctx)
		if err != nil {
			return err
		}
		return out(pods, func(w io.Writer) { podTable(w, pods) })
	case "pod":
		if err := need(1, "a pod name"); err != nil {
			return err
		}
		p, err := c.Pod(ctx, rest[0])
		if err != nil {
			return err
		}
		return out(p, func(w io.Writer) { podTable(w, []agent.PodStatus{p}) })
	case "restart":
		if err := need(1, "POD/CONTAINER"); err != nil {
			return err
		}
		// NAMESPACE/POD/CONTAINER for a Kubernetes pod: the container is
		// after the last slash.
		i := strings.LastIndex(rest[0], "/")
		pod, container := "", ""
		if i >= 0 {
			pod, container = rest[0][:i], rest[0][i+1:]
		}
		if pod == "" || container == "" || strings.Count(rest[0], "/") > 2 {
			return fmt.Errorf("ctl restart: want POD/CONTAINER or NAMESPACE/POD/CONTAINER, got %q", rest[0])
		}
		if err := c.Restart(ctx, pod, container); err != nil {
			return err
		}
		return out(map[string]string{"pod": pod, "container": container, "status": "restarting"},
			func(w io.Writer) { fmt.Fprintf(w, "restarting %s/%s\n", pod, container) })
	case "restart-pod":
		if err := need(1, "a pod name"); err != nil {
			return err
		}
		if err := c.RestartPod(ctx, rest[0]); err != nil {
			return err
		}
		return out(map[string]string{"pod": rest[0], "status": "restarting"},
			func(w io.Writer) {
				fmt.Fprintf(w, "restarting pod %s (apps stop first, sidecars start first)\n", rest[0])
			})
	case "upgrade":
		return ctlUpgrade(c, rest, upg, out)
	case "events":
		evs, err := c.Events(ctx, *since, *limit, *pod)
		if err != nil {
			return err
		}
		return out(evs, func(w io.Writer) { eventTable(w, evs) })
	default:
		if handled, err := ctlOps(ctx, c, cmd, rest, *asJSON, stdout, out); handled { // ctl_ops.go
			return err
		}
		if handled, err := ctlFeatures(ctx, c, cmd, rest, out); handled { // ctl_features.go
			return err
		}
		return fmt.Errorf("ctl: unknown command %q", cmd)
	}
}

func podTable(w io.Writer, pods []agent.PodStatus) {
	fmt.Fprintln(w, "POD\tPHASE\tCONTAINER\tROLE\tSTATE\tPID\tREADY\tRESTARTS\tLAST EXIT")
	for _, p := range pods {
		for _, c := range p.Containers {
			pid := "-"
			if c.PID != 0 {
				pid = fmt.Sprint(c.PID)
			}
			restarts := fmt.Sprint(c.Restarts)
			if c.CrashLoop {
				restarts += " (crash loop)"
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%v\t%s\t%s\n", p.Name, p.Phase, c.Name, c.Role, c.State, pid, c.Ready, restarts, c.LastExit)
		}
	}
}

func eventTable(w io.Writer, evs []agent.Event) {
	fmt.Fprintln(w, "SEQ\tTIME\tPOD\tCONTAINER\tEVENT\tDETAIL")
	for _, e := range evs {
		detail := e.Reason
		if e.Type == agent.EvState {
			detail = fmt.Sprintf("%s -> %s  %s", e.From, e.To, e.Reason)
		}
		if e.PID != 0 {
			detail += fmt.Sprintf(" (pid %d)", e.PID)
		}
		if e.Duration != 0 {
			detail += fmt.Sprintf(" [%s]", e.Duration.Round(time.Microsecond))
		}
		for k, v := range e.Fields {
			detail += fmt.Sprintf(" %s=%s", k, v)
		}
		fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%s\n", e.Seq, e.Time.Format("15:04:05.000"), e.Pod, e.Container, e.Type, strings.TrimSpace(detail))
	}
}
