package agent

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/meshagent/meshagent/startup"
)

// podRunner owns one pod: its machine, its processes, probes and timers.
// One goroutine (run) applies inputs to the machine in order and carries
// out the actions; process watchers, probes and timers only post inputs.
type podRunner struct {
	spec  *PodSpec
	rt    Runtime
	state stateDir
	log   *slog.Logger
	sink  func(Event)

	mu sync.Mutex // guards m for readers outside the run goroutine
	m  *Machine

	inbox   chan Input
	procs   map[string]Process
	probes  map[string]context.CancelFunc
	timers  map[timerKey]*time.Timer
	phaseCh chan struct{} // closed and replaced on every phase change

	ctx context.Context
	wg  sync.WaitGroup // process watchers and probes

	hx *podHandoff // held listeners and upgrades (handoff.go, upgrade.go)

	// listeners is the node's listening-socket table that TCP readiness
	// probes share; nil probes by connecting.
	listeners *startup.Listeners

	// staging holds the apps staged while their gate is closed (see
	// stager), each delivered once its stage is done.
	staging map[string]chan stageResult
}

type stageResult struct {
	st  stagedStart
	err error
}

type timerKey struct {
	kind      TimerKind
	container string
}

func newPodRunner(spec *PodSpec, rt Runtime, state stateDir, log *slog.Logger, sink func(Event), hooks hxHooks) *podRunner {
	r := &podRunner{
		spec: spec, rt: rt, state: state, sink: sink,
		log:   log.With("pod", spec.Name),
		m:     NewMachine(spec),
		inbox: make(chan Input, 64),
		procs: map[string]Process{}, probes: map[string]context.CancelFunc{},
		timers: map[timerKey]*time.Timer{}, phaseCh: make(chan struct{}),
	}
	r.hx = openPodHandoff(context.Background(), spec, podHandoffDir(state, spec.Name), r.log, r.notifyReady, hooks)
	return r
}

// adopt takes over the processes a previous agent recorded for this pod.
// It runs before run, so it may touch the machine directly.
func (r *podRunner) adopt(ctx context.Context) {
	rec, err := r.state.load(r.spec.Name)
	if err != nil {
		r.log.Warn("cannot read state, starting afresh", "err", err)
		return
	}
	for name, cr := range rec.Containers {
		c := r.spec.Container(name)
		if c == nil {
			r.log.Warn("state names a container no longer in the config", "container", name, "pid", cr.PID)
			continue
		}
		p, err := r.rt.Adopt(ctx, r.spec, c, cr.ProcessRecord)
		if err != nil {
			r.log.Info("not adopted", "container", name, "pid", cr.PID, "reason", err)
			continue
		}
		r.procs[name] = p
		r.m.Adopt(name, p.PID(), cr.Restarts, cr.Started)
		r.log.Info("adopted", "container", name, "pid", p.PID())
	}
}

// run applies inputs until ctx ends. It returns with the processes still
// running: stopping them is an input (InStop), not a side effect of
// cancellation, so an agent can exit and leave its pods to the next one.
func (r *podRunner) run(ctx context.Context) {
	r.ctx = ctx
	for name, p := range r.procs {
		r.watch(name, p)
		if h := r.hx.get(name); h != nil {
			h.setPID(p.PID())
		}
	}
	defer r.teardown()
	for {
		select {
		case <-ctx.Done():
			return
		case in := <-r.inbox:
			if p, ok := in.(inPing); ok {
				close(p.done) // the loop turns: see Agent.Health
				continue
			}
			if c, ok := in.(runnerCall); ok {
				c.f()
				continue
			}
			r.apply(in)
		}
	}
}

// post hands an input to the run goroutine; it never blocks past the
// runner's life.
func (r *podRunner) post(in Input) {
	select {
	case r.inbox <- in:
	case <-r.ctx.Done():
	}
}

// send is post for callers outside the runner, before or after it runs.
func (r *podRunner) send(ctx context.Context, in Input) error {
	select {
	case r.inbox <- in:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (r *podRunner) apply(in Input) {
	queue := []Input{in}
	for len(queue) > 0 {
		in := queue[0]
		queue = queue[1:]
		r.beforeInput(in)
		r.mu.Lock()
		before := r.m.Phase
		acts := r.m.Handle(time.Now(), in)
		if r.m.Phase != before {
			close(r.phaseCh)
			r.phaseCh = make(chan struct{})
		}
		stopping := r.m.Phase == PhaseStopping || r.m.Phase == PhaseStopped
		r.mu.Unlock()
		if stopping && len(r.staging) > 0 {
			r.callOffStages() // before the pod's cgroups can be removed
		}
		persist := false
		for _, a := range acts {
			switch a := a.(type) {
			case ActStart:
				queue = append(queue, r.start(a.Container))
				if c := r.spec.Container(a.Container); c != nil && c.Role == RoleSidecar && r.m.Phase == PhasePending {
					r.stageApps()
				}
			case ActSignal:
				if p := r.procs[a.Container]; p != nil && p.PID() == a.PID {
					if err := p.Signal(a.Sig); err != nil {
						r.log.Warn("signal failed", "container", a.Container, "pid", a.PID, "err", err)
					}
				}
			case ActProbe:
				r.probe(a)
			case ActTimer:
				r.setTimer(a)
			case ActEvent:
				r.sink(a.Event)
				r.hx.onEvent(a.Event)
			}
		}
		switch in.(type) {
		case InStarted, InExited, InSwap:
			persist = true // the machine now holds the new pid, or none
		}
		if persist {
			r.persist()
		}
	}
}

func (r *podRunner) start(name string) Input {
	c := r.spec.Container(name)
	if ch := r.staging[name]; ch != nil {
		delete(r.staging, name)
		if res := <-ch; res.st != nil {
			p, err := res.st.Go(r.ctx)
			if err == nil {
				r.procs[name] = p
				r.watch(name, p)
				return InStarted{Container: name, PID: p.PID()}
			}
			r.log.Warn("staged start failed, starting afresh", "container", name, "err", err)
		}
	}
	ctx, end := r.hx.beforeStart(r.ctx, name)
	p, err := r.rt.Start(ctx, r.spec, c)
	end(p)
	if err != nil {
		return InStarted{Container: name, Err: err}
	}
	r.procs[name] = p
	r.watch(name, p)
	return InStarted{Container: name, PID: p.PID()}
}

// stageApps stages every app not yet started, while its sidecars start: by
// the time the gate opens, only the exec is left of the apps' starts.
func (r *podRunner) stageApps() {
	sr, ok := r.rt.(stager)
	if !ok {
		return
	}
	if r.staging == nil {
		r.staging = map[string]chan stageResult{}
	}
	for i := range r.spec.Containers {
		c := &r.spec.Containers[i]
		if c.Role != RoleApp || r.staging[c.Name] != nil {
			continue
		}
		if st, ok := r.m.Container(c.Name); !ok || st.State != StateWaiting {
			continue
		}
		ch := make(chan stageResult, 1)
		r.staging[c.Name] = ch
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			st, err := sr.Stage(r.ctx, r.spec, c)
			ch <- stageResult{st, err}
		}()
	}
}

// callOffStages ends the staged starts nobody will use: the pod is
// stopping, or its runner is going.
func (r *podRunner) callOffStages() {
	for name, ch := range r.staging {
		delete(r.staging, name)
		if res := <-ch; res.st != nil {
			res.st.Cancel()
		}
	}
}

// watch posts InExited when p exits.
func (r *podRunner) watch(name string, p Process) {
	onExit(p, r.ctx.Done(), &r.wg, func() {
		e := p.Exit()
		r.post(InExited{Container: name, PID: p.PID(), Status: e.String(), Failed: e.Failed()})
	})
}

func (r *podRunner) probe(a ActProbe) {
	if cancel := r.probes[a.Container]; cancel != nil {
		cancel()
		delete(r.probes, a.Container)
	}
	if !a.On {
		return
	}
	c := r.spec.Container(a.Container)
	probe := newProbe(c, r.listeners)
	if probe == nil {
		return
	}
	ctx, cancel := context.WithCancel(r.ctx)
	r.probes[a.Container] = cancel
	rd := c.Readiness
	// Aligned: every pod's steady-state checks of one period run in the
	// same wake-up and share one listener table.
	sched := startup.Schedule{Period: rd.Period.D(), Timeout: rd.Timeout.D(), Fast: rd.StartupInterval.D(), Align: true}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		last := -1 // post changes and failures only: a healthy pod posts nothing
		startup.Watch(ctx, probe, sched, func(res startup.Result) {
			ok := 0
			if res.OK() {
				ok = 1
			}
			if ok == last && ok == 1 {
				return
			}
			last = ok
			in := InProbe{Container: a.Container, PID: a.PID, OK: res.OK(), Failures: res.Failures}
			if res.Err != nil {
				in.Err = res.Err.Error()
			}
			select {
			case r.inbox <- in:
			case <-ctx.Done():
			}
		})
	}()
}

// newProbe builds c's readiness probe; TCP probes answer from l where it
// can vouch (see startup.Listeners).
func newProbe(c *ContainerSpec, l *startup.Listeners) startup.Probe {
	rd := c.Readiness
	switch {
	case rd == nil:
		return nil
	case rd.TCP != "":
		return startup.TCP{Addr: rd.TCP, Listeners: l}
	case rd.HTTP != "":
		return startup.HTTP{URL: rd.HTTP}
	case rd.Unix != "":
		return startup.Unix{Path: rd.Unix}
	case len(rd.Exec) > 0:
		return startup.Exec{Command: rd.Exec, Dir: c.Workdir}
	}
	return nil
}

func (r *podRunner) setTimer(a ActTimer) {
	k := timerKey{a.Timer.Kind, a.Timer.Container}
	if t := r.timers[k]; t != nil {
		t.Stop()
	}
	in := a.Timer
	r.timers[k] = time.AfterFunc(a.After, func() {
		select {
		case r.inbox <- in:
		case <-r.ctx.Done():
		}
	})
}

func (r *podRunner) persist() {
	rec := podRecord{Pod: r.spec.Name, Containers: map[string]containerRecord{}}
	r.mu.Lock()
	for _, c := range r.m.containers {
		if p := r.procs[c.Name]; p != nil && c.PID == p.PID() {
			rec.Containers[c.Name] = containerRecord{ProcessRecord: p.Record(), Restarts: c.Restarts}
		}
	}
	r.mu.Unlock()
	if err := r.state.save(rec); err != nil {
		r.log.Error("cannot save state; a restarted agent will not adopt this pod", "err", err)
	}
}

func (r *podRunner) teardown() {
	for _, t := range r.timers {
		t.Stop()
	}
	for _, cancel := range r.probes {
		cancel()
	}
	r.wg.Wait()
	r.callOffStages()
	r.hx.close()
	removeHandoffDir(podHandoffDir(r.state, r.spec.Name))
	for _, p := range r.procs {
		_ = p.Release()
	}
}

// status returns the pod's phase and containers.
func (r *podRunner) status() PodStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	return PodStatus{Name: r.spec.Name, Phase: r.m.Phase, Containers: r.m.Containers()}
}

// waitPhase blocks until the pod is in one of phases or ctx ends.
func (r *podRunner) waitPhase(ctx context.Context, phases ...Phase) error {
	for {
		r.mu.Lock()
		ph, ch := r.m.Phase, r.phaseCh
		r.mu.Unlock()
		for _, p := range phases {
			if ph == p {
				return nil
			}
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return errors.Join(ctx.Err(), errors.New("pod "+r.spec.Name+" still "+string(ph)))
		}
	}
}

// PodStatus is a pod as the admin API shows it.
type PodStatus struct {
	Name       string            `json:"name"`
	Phase      Phase             `json:"phase"`
	Containers []ContainerStatus `json:"containers"`
	// Kubernetes is set for a Kubernetes pod (Name is then namespace/name).
	Kubernetes *KubePodInfo `json:"kubernetes,omitempty"`
}
