package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os/signal"
	"syscall"
	"time"

	"github.com/meshagent/meshagent/agent"
)

// meshagent gate and meshagent hold run inside a pod, as the sidecar's
// postStart and preStop hooks, and talk to the agent over the node's gate
// socket (mounted into the pod). They name nothing: the agent knows the
// caller's pod from its peer credentials.

// hookFlags are the flags gate and hold share.
type hookFlags struct {
	socket    string
	agentWait time.Duration
	asJSON    bool
}

func (h *hookFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&h.socket, "socket", socketFromEnv("MESHAGENT_GATE_SOCKET", agent.DefaultGateSocket), "the node's gate socket as mounted in the pod")
	fs.DurationVar(&h.agentWait, "agent-wait", time.Minute, "how long to keep trying while the agent does not answer (it may be restarting)")
	fs.BoolVar(&h.asJSON, "json", false, "print the agent's answer as JSON")
}

// ask calls f until the agent answers, retrying while the socket does not
// answer (an agent restart) for at most agentWait.
func ask[T any](ctx context.Context, h hookFlags, f func(context.Context) (T, error)) (T, error) {
	deadline := time.Now().Add(h.agentWait)
	for {
		ans, err := f(ctx)
		var api *agent.APIError
		if err == nil || errors.As(err, &api) || ctx.Err() != nil || time.Now().After(deadline) {
			return ans, err
		}
		select {
		case <-ctx.Done():
			return ans, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func cmdGate(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("gate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var h hookFlags
	h.register(fs)
	probe := fs.Bool("probe", false, "answer at once: exit 0 if the pod's sidecars are ready, 1 if not (a startupProbe)")
	noAgent := fs.String("no-agent", "closed", "what to do when no agent answers within --agent-wait: open (exit 0) or closed (exit 1)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *noAgent != "open" && *noAgent != "closed" {
		return fmt.Errorf("gate: --no-agent: want open or closed, got %q", *noAgent)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if *probe {
		h.agentWait = 0 // a probe answers now; the kubelet asks again
	}
	ans, err := ask(ctx, h, func(ctx context.Context) (agent.GateAnswer, error) {
		return agent.AskGate(ctx, h.socket, *probe)
	})
	at := time.Now()
	if err != nil {
		var api *agent.APIError
		if !errors.As(err, &api) && *noAgent == "open" && !*probe {
			fmt.Fprintf(stderr, "meshagent gate: no agent on %s (%v); going ahead (--no-agent open)\n", h.socket, err)
			return nil
		}
		return fmt.Errorf("gate: %w", err)
	}
	if h.asJSON {
		b, _ := json.Marshal(struct {
			agent.GateAnswer
			At int64 `json:"at"` // when the answer arrived, unix ns
		}{ans, at.UnixNano()})
		fmt.Fprintln(stdout, string(b))
	} else {
		fmt.Fprintf(stdout, "meshagent gate: pod %s: %s after %s %s\n", ans.Pod, ans.Outcome, ans.Waited.Round(time.Millisecond), ans.Reason)
	}
	if !ans.OK() {
		return exitError(1)
	}
	return nil
}

func cmdHold(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("hold", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var h hookFlags
	h.register(fs)
	h.agentWait = 5 * time.Second
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ans, err := ask(ctx, h, func(ctx context.Context) (agent.HoldAnswer, error) {
		return agent.AskHold(ctx, h.socket)
	})
	if err != nil {
		return fmt.Errorf("hold: %w", err)
	}
	if h.asJSON {
		b, _ := json.Marshal(ans)
		fmt.Fprintln(stdout, string(b))
	} else if ans.Drained {
		fmt.Fprintf(stdout, "meshagent hold: pod %s: every app exited after %s\n", ans.Pod, ans.Waited.Round(time.Millisecond))
	} else {
		fmt.Fprintf(stdout, "meshagent hold: pod %s: apps %v still running after %s; stopping anyway\n", ans.Pod, ans.Running, ans.Waited.Round(time.Millisecond))
	}
	return nil
}
