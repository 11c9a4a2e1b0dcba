package cgroup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// PodError is the failure of one pod; other pods are unaffected.
type PodError struct {
	Pod string
	Err error
}

func (e *PodError) Error() string {
	msg := e.Err.Error()
	if strings.HasPrefix(msg, "pod "+e.Pod+":") || strings.HasPrefix(msg, "pod "+e.Pod+" ") {
		return msg // already says which pod
	}
	return "pod " + e.Pod + ": " + msg
}
func (e *PodError) Unwrap() error { return e.Err }

// Correction is one write meshagent made.
type Correction struct {
	Setting
	Was string
	// Drift is true when meshagent had already put Value in place and
	// someone else changed it since; false for a first application.
	Drift bool
}

// Result counts what a pass did, for logs and metrics.
type Result struct {
	Pods        int // targets looked at
	Checked     int // settings read
	Writes      int // settings written
	Drift       int // writes that undid someone else's change
	Corrections []Correction
	Errors      []error // one *PodError per failed pod
}

func (r *Result) add(o Result) {
	r.Pods += o.Pods
	r.Checked += o.Checked
	r.Writes += o.Writes
	r.Drift += o.Drift
	r.Corrections = append(r.Corrections, o.Corrections...)
	r.Errors = append(r.Errors, o.Errors...)
}

// PlanEntry is one setting next to the value in place.
type PlanEntry struct {
	Setting
	Current string
	// Change is true when a reconcile would write it.
	Change bool
}

// PodPlan is the dry run of one pod. When Err is set nothing would be
// written for the pod.
type PodPlan struct {
	Pod     string
	Entries []PlanEntry
	Err     error
}

// Desired computes the settings for t from what is in place now: the pod's
// CFS period, the sidecar's processes and the app's oom_score_adj. It reads,
// never writes.
func (m *Manager) Desired(t Target) ([]Setting, error) {
	obs, err := m.observe(t)
	if err != nil {
		return nil, &PodError{Pod: t.Pod, Err: err}
	}
	s, err := translate(m.root, m.mode, t, obs)
	if err != nil {
		return nil, &PodError{Pod: t.Pod, Err: err}
	}
	return s, nil
}

func (m *Manager) observe(t Target) (Observed, error) {
	var obs Observed
	l := layout{root: m.root, mode: m.mode}
	if _, err := t.PodGroup.clean(); err != nil {
		return obs, err
	}
	if _, err := t.Sidecar.Group.clean(); err != nil {
		return obs, fmt.Errorf("container %s: %w", t.Sidecar.Name, err)
	}
	pf := l.file(KnobCPUPeriod, t.PodGroup)
	s, err := m.readKnob(pf)
	if err != nil {
		return obs, fmt.Errorf("read cpu period: %w", err)
	}
	if f := strings.Fields(s); len(f) > 0 {
		// v1: "100000"; v2 cpu.max: "max 100000".
		ps := f[len(f)-1]
		p, err := strconv.ParseUint(ps, 10, 64)
		if err != nil || p == 0 {
			return obs, fmt.Errorf("read cpu period: bad value %q in %s", s, pf)
		}
		obs.PodPeriod = p
	}
	obs.SidecarPIDs, err = m.readProcs(filepath.Join(m.dir("memory", t.Sidecar.Group), "cgroup.procs"))
	if err != nil {
		return obs, fmt.Errorf("container %s: list processes: %w", t.Sidecar.Name, err)
	}
	first := true
	for _, a := range t.Apps {
		pids, err := m.readProcs(filepath.Join(m.dir("memory", a.Group), "cgroup.procs"))
		if err != nil {
			return obs, fmt.Errorf("container %s: list processes: %w", a.Name, err)
		}
		for _, pid := range pids {
			v, err := ReadOOMScoreAdj(pid)
			if err != nil {
				continue // exited between the listing and the read
			}
			if first || v > obs.AppOOMScoreAdj {
				obs.AppOOMScoreAdj, first = v, false
			}
		}
	}
	return obs, nil
}

// Plan is the dry run behind `meshagent ctl plan`: for every target, each
// setting meshagent would write next to the value in place. It never writes.
func (m *Manager) Plan(ctx context.Context, targets []Target) []PodPlan {
	out := make([]PodPlan, 0, len(targets))
	for _, t := range targets {
		if ctx.Err() != nil {
			out = append(out, PodPlan{Pod: t.Pod, Err: ctx.Err()})
			continue
		}
		pp := PodPlan{Pod: t.Pod}
		want, err := m.Desired(t)
		if err != nil {
			pp.Err = err
			out = append(out, pp)
			continue
		}
		for _, s := range want {
			cur, err := m.readKnob(s.File)
			if err != nil {
				cur = "<" + errString(err) + ">"
			}
			pp.Entries = append(pp.Entries, PlanEntry{Setting: s, Current: cur, Change: err != nil || !sameValue(s.Knob, cur, s.Value)})
		}
		out = append(out, pp)
	}
	return out
}

func errString(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Op + ": " + pe.Err.Error()
	}
	return err.Error()
}

// Reconcile is the periodic pass over every pod: read each setting, write
// only those that differ, in an order the kernel accepts. A pod whose policy
// cannot be translated gets a *PodError in Result.Errors and no write; the
// other pods go on. Pods missing from targets are forgotten.
func (m *Manager) Reconcile(ctx context.Context, targets []Target) Result {
	var res Result
	m.files.startPass()
	defer m.files.endPass()
	seen := make(map[string]bool, len(targets))
	for _, t := range targets {
		if err := ctx.Err(); err != nil {
			res.Errors = append(res.Errors, &PodError{Pod: t.Pod, Err: err})
			continue
		}
		seen[t.Pod] = true
		r, _ := m.Apply(ctx, t)
		res.add(r)
	}
	m.mu.Lock()
	for pod := range m.applied {
		if !seen[pod] {
			delete(m.applied, pod)
		}
	}
	m.mu.Unlock()
	return res
}

// Apply reconciles one pod, e.g. when a container starts. The error, if
// any, is also in Result.Errors.
func (m *Manager) Apply(ctx context.Context, t Target) (Result, error) {
	res := Result{Pods: 1}
	fail := func(err error) (Result, error) {
		var pe *PodError
		if !errors.As(err, &pe) {
			err = &PodError{Pod: t.Pod, Err: err}
		}
		res.Errors = append(res.Errors, err)
		m.log.Error("cgroup policy not applied", "pod", t.Pod, "err", err)
		return res, err
	}
	want, err := m.Desired(t)
	if err != nil {
		return fail(err)
	}
	m.mu.Lock()
	prev := m.applied[t.Pod]
	m.mu.Unlock()
	now := make(map[string]string, len(want))
	var ws []write
	for _, s := range want {
		cur, err := m.readKnob(s.File)
		if err != nil {
			if s.Knob == KnobOOMScoreAdj && (errors.Is(err, unix.ESRCH) || errors.Is(err, os.ErrNotExist)) {
				continue // the process exited
			}
			return fail(fmt.Errorf("%s: read %s: %w", s.where(), s.Knob, err))
		}
		res.Checked++
		if sameValue(s.Knob, cur, s.Value) {
			now[s.File] = s.Value
			continue
		}
		ws = append(ws, write{Setting: s, Current: cur})
	}
	for _, w := range orderWrites(ws) {
		if err := ctx.Err(); err != nil {
			return fail(err)
		}
		if err := m.write(w); err != nil {
			if w.Knob == KnobOOMScoreAdj && (errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH)) {
				continue // the process exited since it was listed
			}
			m.remember(t.Pod, now)
			return fail(err)
		}
		drift := prev[w.File] == w.Value
		c := Correction{Setting: w.Setting, Was: w.Current, Drift: drift}
		res.Writes++
		if drift {
			res.Drift++
			m.log.Warn("cgroup drift corrected", "pod", w.Pod, "container", w.Container, "knob", string(w.Knob),
				"file", w.File, "was", w.Current, "now", w.Value)
		} else {
			m.log.Info("cgroup value applied", "pod", w.Pod, "container", w.Container, "knob", string(w.Knob),
				"file", w.File, "was", w.Current, "now", w.Value)
		}
		res.Corrections = append(res.Corrections, c)
		now[w.File] = w.Value
	}
	m.remember(t.Pod, now)
	return res, nil
}

// remember replaces what is known to be applied for pod, which also drops
// the files of exited processes.
func (m *Manager) remember(pod string, files map[string]string) {
	m.mu.Lock()
	m.applied[pod] = files
	m.mu.Unlock()
}

func (m *Manager) write(w write) error {
	var err error
	if w.Knob == KnobOOMScoreAdj {
		v, _ := strconv.Atoi(w.Value) // translate formatted it
		err = SetOOMScoreAdj(w.PID, v)
	} else {
		err = writeSmall(w.File, w.Value)
	}
	if err == nil {
		return nil
	}
	if errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("%s: write %s %q (was %q) to %s: kernel rejected the value (a v1 child quota above its parent's, or burst above quota): %w",
			w.where(), w.Knob, w.Value, w.Current, w.File, err)
	}
	return fmt.Errorf("%s: write %s %q (was %q): %w", w.where(), w.Knob, w.Value, w.Current, err)
}
