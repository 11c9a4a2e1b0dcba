package cgroup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

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
	s, err := m.desired(t)
	return slices.Clone(s), err
}

// podMemo is the last translation of one pod. translate is pure: while the
// target and what observe reads are unchanged, so are the settings, and a
// pass skips building them and their file names again (a third of a pass's
// CPU outside the kernel). It only ever saves computing; every value is
// still read from the kernel on every pass. A memo is never modified once
// stored, so concurrent Apply calls may share it.
type podMemo struct {
	t        Target
	obs      Observed
	paths    observePaths
	settings []Setting
}

// observePaths are the files observe reads for a target.
type observePaths struct {
	period   string
	sideProc string
	appProcs []string
}

// desired is Desired without the copy; the result must not be modified.
func (m *Manager) desired(t Target) ([]Setting, error) {
	m.mu.Lock()
	memo := m.memo[t.Pod]
	m.mu.Unlock()
	if memo != nil && !sameTarget(memo.t, t) {
		memo = nil
	}
	var paths observePaths
	if memo != nil {
		paths = memo.paths
	} else {
		var err error
		if paths, err = m.observePaths(t); err != nil {
			return nil, &PodError{Pod: t.Pod, Err: err}
		}
	}
	obs, err := m.observe(t, paths)
	if err != nil {
		return nil, &PodError{Pod: t.Pod, Err: err}
	}
	if memo != nil && sameObserved(memo.obs, obs) {
		return memo.settings, nil
	}
	s, err := translate(m.root, m.mode, t, obs)
	if err != nil {
		return nil, &PodError{Pod: t.Pod, Err: err}
	}
	memo = &podMemo{t: cloneTarget(t), obs: obs, paths: paths, settings: s}
	m.mu.Lock()
	m.memo[t.Pod] = memo
	m.mu.Unlock()
	return s, nil
}

func (m *Manager) observePaths(t Target) (observePaths, error) {
	var p observePaths
	if _, err := t.PodGroup.clean(); err != nil {
		return p, err
	}
	if _, err := t.Sidecar.Group.clean(); err != nil {
		return p, fmt.Errorf("container %s: %w", t.Sidecar.Name, err)
	}
	p.period = layout{root: m.root, mode: m.mode}.file(KnobCPUPeriod, t.PodGroup)
	p.sideProc = filepath.Join(m.dir("memory", t.Sidecar.Group), "cgroup.procs")
	for _, a := range t.Apps {
		p.appProcs = append(p.appProcs, filepath.Join(m.dir("memory", a.Group), "cgroup.procs"))
	}
	return p, nil
}

func (m *Manager) observe(t Target, files observePaths) (Observed, error) {
	var obs Observed
	s, err := m.readKnob(files.period)
	if err != nil {
		return obs, fmt.Errorf("read cpu period: %w", err)
	}
	if f := strings.Fields(s); len(f) > 0 {
		// v1: "100000"; v2 cpu.max: "max 100000".
		ps := f[len(f)-1]
		p, err := strconv.ParseUint(ps, 10, 64)
		if err != nil || p == 0 {
			return obs, fmt.Errorf("read cpu period: bad value %q in %s", s, files.period)
		}
		obs.PodPeriod = p
	}
	obs.SidecarPIDs, err = m.readProcs(files.sideProc)
	if err != nil {
		return obs, fmt.Errorf("container %s: list processes: %w", t.Sidecar.Name, err)
	}
	if len(obs.SidecarPIDs) == 0 || t.Policy.OOMScoreAdj != nil {
		// The apps' oom_score_adj only sets the sidecar processes' value:
		// with none, or with a fixed value, there is nothing to list.
		return obs, nil
	}
	first := true
	for i, a := range t.Apps {
		pids, err := m.readProcs(files.appProcs[i])
		if err != nil {
			return obs, fmt.Errorf("container %s: list processes: %w", a.Name, err)
		}
		for _, pid := range pids {
			v, err := m.readOOMScoreAdj(pid)
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

func sameTarget(a, b Target) bool {
	pa, pb := a.Policy, b.Policy
	return a.Pod == b.Pod && a.PodGroup == b.PodGroup && a.Sidecar == b.Sidecar && slices.Equal(a.Apps, b.Apps) &&
		a.PodCPULimit == b.PodCPULimit && a.PodMemoryLimit == b.PodMemoryLimit && a.OwnPod == b.OwnPod &&
		pa.CPU == pb.CPU && pa.Mode == pb.Mode && pa.Burst == pb.Burst && pa.Shares == pb.Shares &&
		pa.MemoryMax == pb.MemoryMax &&
		(pa.OOMScoreAdj == nil) == (pb.OOMScoreAdj == nil) && (pa.OOMScoreAdj == nil || *pa.OOMScoreAdj == *pb.OOMScoreAdj)
}

func sameObserved(a, b Observed) bool {
	return a.PodPeriod == b.PodPeriod && a.AppOOMScoreAdj == b.AppOOMScoreAdj && slices.Equal(a.SidecarPIDs, b.SidecarPIDs)
}

// cloneTarget copies what a caller could change behind the memo's back.
func cloneTarget(t Target) Target {
	t.Apps = slices.Clone(t.Apps)
	if v := t.Policy.OOMScoreAdj; v != nil {
		c := *v
		t.Policy.OOMScoreAdj = &c
	}
	return t
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
	m.files.startPass()
	defer m.files.endPass()
	// Pods are independent, and a pass is nearly all small reads of cold
	// kernel objects, each waiting on memory rather than on the CPU: a
	// worker per CPU cuts the pass about in proportion. Results are kept
	// per target and merged in order, so logs aside a pass reads the same
	// whatever the interleaving.
	rs := make([]Result, len(targets))
	done := make([]bool, len(targets))
	var next atomic.Int64
	work := func() {
		for {
			i := int(next.Add(1) - 1)
			if i >= len(targets) {
				return
			}
			if err := ctx.Err(); err != nil {
				rs[i].Errors = []error{&PodError{Pod: targets[i].Pod, Err: err}}
				continue
			}
			rs[i], _ = m.Apply(ctx, targets[i])
			done[i] = true
		}
	}
	var wg sync.WaitGroup
	for range reconcileWorkers(len(targets)) - 1 {
		wg.Go(work)
	}
	work()
	wg.Wait()

	var res Result
	seen := make(map[string]bool, len(targets))
	for i, t := range targets {
		if done[i] {
			seen[t.Pod] = true
		}
		res.add(rs[i])
	}
	m.mu.Lock()
	for pod := range m.applied {
		if !seen[pod] {
			delete(m.applied, pod)
		}
	}
	for pod := range m.memo {
		if !seen[pod] {
			delete(m.memo, pod)
		}
	}
	m.mu.Unlock()
	return res
}

// reconcileWorkers is how many goroutines a pass over n pods uses: one per
// CPU, at most 4 (the agent has other work), and one for small passes,
// where starting goroutines costs more than it saves.
func reconcileWorkers(n int) int {
	if n < 64 {
		return 1
	}
	return max(1, min(runtime.GOMAXPROCS(0), 4))
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
	want, err := m.desired(t)
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
