package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/meshagent/meshagent/cgroup"
)

// The feature endpoints: which resource-policy paths are in force
// (GET /v1/status) and the cgroup dry run (GET /v1/cgroup/plan).
func (s *adminServer) featureRoutes() {
	s.mux.HandleFunc("GET /v1/status", s.featureStatus)
	s.mux.HandleFunc("GET /v1/cgroup/plan", s.cgroupPlan)
}

// Status is what `meshagent ctl status` shows.
type Status struct {
	Cgroup CgroupStatus `json:"cgroup"`
	NRI    NRIStatus    `json:"nri"`
}

// Status reports the resource-policy paths in force, and why.
func (a *Agent) Status() Status { return Status{Cgroup: a.CgroupStatus(), NRI: a.NRIStatus()} }

func (s *adminServer) featureStatus(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.a.Status())
}

func (s *adminServer) cgroupPlan(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 20*time.Second)
	defer cancel()
	p, err := s.a.CgroupPlan(ctx)
	if err != nil {
		writeError(w, http.StatusConflict, err)
		return
	}
	writeJSON(w, http.StatusOK, p)
}

// PlanPod is the dry run of one pod: each value meshagent wants next to
// the value in place. With Error set nothing would be written for the pod.
type PlanPod struct {
	Pod      string        `json:"pod"`
	Error    string        `json:"error,omitempty"`
	Settings []PlanSetting `json:"settings"`
}

// PlanSetting is one value of a plan.
type PlanSetting struct {
	Container string `json:"container,omitempty"` // empty: the pod's own group
	Knob      string `json:"knob"`
	File      string `json:"file"`
	PID       int    `json:"pid,omitempty"`
	Desired   string `json:"desired"`
	Current   string `json:"current"`
	Change    bool   `json:"change"`
}

// CgroupPlan is `meshagent ctl plan`: for every pod of the config in
// force, the values meshagent would write next to those in place. It reads
// and never writes (it works with the cgroup-writes switch off). A pod
// whose groups do not exist yet is planned against an empty tree: every
// value shows as a change.
func (a *Agent) CgroupPlan(ctx context.Context) ([]PlanPod, error) {
	c := a.cg
	if c == nil || c.m == nil {
		return nil, fmt.Errorf("cgroup policy off: %s", a.CgroupStatus().Reason)
	}
	cfg := a.config()
	out := []PlanPod{}
	for i := range cfg.Pods {
		p := &cfg.Pods[i]
		pp := PlanPod{Pod: p.Name, Settings: []PlanSetting{}}
		t, ok, err := hostTarget(p)
		if err != nil {
			pp.Error = err.Error()
			out = append(out, pp)
			continue
		}
		if !ok {
			pp.Error = "no sidecar: containers are placed in their groups, no value is set"
			out = append(out, pp)
			continue
		}
		plans := c.m.Plan(ctx, []cgroup.Target{t})
		if len(plans) == 1 {
			if plans[0].Err != nil {
				pp.Error = plans[0].Err.Error()
			}
			for _, e := range plans[0].Entries {
				pp.Settings = append(pp.Settings, PlanSetting{Container: e.Container, Knob: string(e.Knob),
					File: e.File, PID: e.PID, Desired: e.Value, Current: e.Current, Change: e.Change})
			}
		}
		out = append(out, pp)
	}
	return out, nil
}

// driftCheck is the "cgroup-drift" inspection: every value that differs
// from the policy, and every pod whose policy cannot be applied.
type driftCheck struct{ a *Agent }

func (driftCheck) Name() string { return "cgroup-drift" }

func (d driftCheck) Check(ctx context.Context, n *NodeView) ([]Finding, error) {
	plans, err := d.a.CgroupPlan(ctx)
	if err != nil {
		return nil, nil // off: nothing to hold to
	}
	running := map[string]bool{}
	for _, p := range n.Pods {
		for _, c := range p.Containers {
			if c.PID != 0 {
				running[p.Name] = true
			}
		}
	}
	var out []Finding
	for _, p := range plans {
		if !running[p.Pod] {
			continue // nothing applied yet, nothing drifted
		}
		if p.Error != "" && len(p.Settings) == 0 && p.Error != "no sidecar: containers are placed in their groups, no value is set" {
			out = append(out, Finding{Check: "cgroup-drift", Pod: p.Pod, Expected: "policy applied", Found: p.Error})
			continue
		}
		for _, s := range p.Settings {
			if s.Change {
				out = append(out, Finding{Check: "cgroup-drift", Pod: p.Pod, Container: s.Container,
					Expected: s.Knob + " = " + s.Desired, Found: s.Current + " in " + s.File})
			}
		}
	}
	return out, nil
}

// Status returns which resource-policy paths are in force.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var out Status
	return out, c.Do(ctx, http.MethodGet, "/v1/status", nil, &out)
}

// CgroupPlan returns the cgroup dry run.
func (c *Client) CgroupPlan(ctx context.Context) ([]PlanPod, error) {
	var out []PlanPod
	err := c.Do(ctx, http.MethodGet, "/v1/cgroup/plan", nil, &out)
	var ae *APIError
	if errors.As(err, &ae) {
		return nil, fmt.Errorf("plan: %w", err)
	}
	return out, err
}
