package containerd

import (
	"context"
	"errors"
	"fmt"
	"time"

	apievents "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// eventFilters select the topics Run follows in the k8s.io namespace.
var eventFilters = []string{
	`namespace==k8s.io,topic=="/containers/create"`,
	`namespace==k8s.io,topic=="/containers/delete"`,
	`namespace==k8s.io,topic=="/tasks/start"`,
	`namespace==k8s.io,topic=="/tasks/exit"`,
	`namespace==k8s.io,topic=="/tasks/delete"`,
	`namespace==k8s.io,topic=="/tasks/oom"`,
}

// Run reports every change of every pod container to handle until ctx ends,
// then returns nil. handle is called from Run's goroutine, one event at a
// time, and must not block for long (containerd buffers events meanwhile).
//
// Run starts by subscribing and then listing containerd: the containers that
// already exist are reported as ContainerCreated (and TaskStarted if
// running) events marked Resync, followed by Synced with the full pod list.
// When the stream breaks (containerd restarted, socket gone) Run reports
// Disconnected, resubscribes with exponential backoff and resyncs, reporting
// only what changed meanwhile.
func (c *Client) Run(ctx context.Context, handle func(Event)) error {
	s := &session{c: c, tr: newTracker(), roles: map[string][]string{}, handle: handle}
	delay := c.opts.backoffFirst
	for {
		synced, err := s.run(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if synced {
			delay = c.opts.backoffFirst // it worked for a while: start over
		}
		handle(Event{Kind: Disconnected, Err: err, Time: time.Now()})
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		delay = min(delay*2, c.opts.backoffMax)
	}
}

// session is Run's state across subscriptions.
type session struct {
	c      *Client
	tr     *tracker
	roles  map[string][]string // sandbox id → sidecar names, from CRI
	handle func(Event)
}

// run is one subscription: subscribe, resync, then apply live events until
// the stream breaks. synced reports whether the first resync succeeded.
func (s *session) run(ctx context.Context) (synced bool, err error) {
	sctx, cancel := context.WithCancel(ns(ctx))
	defer cancel()
	evs, errs := s.c.ctr.EventService().Subscribe(sctx, eventFilters...)
	select {
	case err := <-errs:
		return false, fmt.Errorf("containerd %s: subscribe: %w", s.c.address, err)
	default:
	}
	if err := s.resync(ctx); err != nil {
		return false, err
	}
	after := time.NewTimer(s.c.opts.resyncAfter)
	defer after.Stop()
	var every <-chan time.Time
	if s.c.opts.resyncEvery > 0 {
		t := time.NewTicker(s.c.opts.resyncEvery)
		defer t.Stop()
		every = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return true, ctx.Err()
		case err, ok := <-errs:
			if !ok || err == nil {
				err = errors.New("stream closed")
			}
			return true, fmt.Errorf("containerd %s: event stream: %w", s.c.address, err)
		case env := <-evs:
			if err := s.apply(ctx, env); err != nil {
				return true, err
			}
		case <-after.C:
			if err := s.resync(ctx); err != nil {
				return true, err
			}
		case <-every:
			if err := s.resync(ctx); err != nil {
				return true, err
			}
		}
	}
}

// resync lists containerd and CRI, reports what the tracker has not seen,
// then Synced with the pod model.
func (s *session) resync(ctx context.Context) error {
	at := time.Now()
	l, err := s.c.list(ctx)
	if err != nil {
		return err
	}
	pods, perrs, err := s.c.pods(ctx, l.containers)
	if err != nil {
		return err
	}
	for _, p := range pods {
		names, _ := p.Sidecars() // a bad annotation is reported with Synced
		if p.Annotations != nil {
			s.roles[p.SandboxID] = names
		}
	}
	for i := range l.containers {
		s.assignRole(ctx, &l.containers[i])
	}
	for _, e := range s.tr.reconcile(l, at) {
		s.emit(e)
	}
	s.handle(Event{Kind: Synced, Pods: pods, Time: at, Resync: true, Err: errors.Join(perrs...)})
	return nil
}

// apply turns one live containerd event into tracker events. It returns an
// error only when containerd cannot be read (the session restarts).
func (s *session) apply(ctx context.Context, env *events.Envelope) error {
	if env == nil || env.Event == nil {
		return nil
	}
	v, err := typeurl.UnmarshalAny(env.Event)
	if err != nil {
		// An event type this client does not know: not ours to act on.
		return nil
	}
	at := env.Timestamp
	var out []Event
	switch e := v.(type) {
	case *apievents.ContainerCreate:
		rec, err := s.c.ctr.ContainerService().Get(ns(ctx), e.ID)
		if errdefs.IsNotFound(err) {
			return nil // created and deleted already; nothing to report
		}
		if err != nil {
			return fmt.Errorf("containerd %s: get container %s: %w", s.c.address, e.ID, err)
		}
		var spec []byte
		if rec.Spec != nil {
			spec = rec.Spec.GetValue()
		}
		ct, ok, err := identify(record{ID: rec.ID, Labels: rec.Labels, Spec: spec, CreatedAt: rec.CreatedAt})
		if err != nil || !ok {
			return nil
		}
		s.assignRole(ctx, &ct)
		out = s.tr.created(ct, at)
	case *apievents.TaskStart:
		out = s.tr.started(e.ContainerID, e.Pid, at)
	case *apievents.TaskExit:
		if e.ID != "" && e.ID != e.ContainerID {
			return nil // an exec'd process, not the container
		}
		out = s.tr.exited(e.ContainerID, e.Pid, e.ExitStatus, e.ExitedAt.AsTime(), at)
	case *apievents.TaskDelete:
		if e.ID != "" && e.ID != e.ContainerID {
			return nil
		}
		// Normally the exit was reported already; this catches a lost one.
		out = s.tr.exited(e.ContainerID, e.Pid, e.ExitStatus, e.ExitedAt.AsTime(), at)
	case *apievents.TaskOOM:
		out = s.tr.oom(e.ContainerID, at)
	case *apievents.ContainerDelete:
		out = s.tr.deleted(e.ID, at)
		delete(s.roles, e.ID)
	}
	for _, ev := range out {
		s.emit(ev)
	}
	return nil
}

func (s *session) emit(e Event) { s.handle(e) }

// assignRole sets c.Role from the pod's sidecars annotation, asking CRI for
// the sandbox's annotations the first time a pod is seen. kubelet creates a
// pod's containers only after RunPodSandbox returned, so CRI knows the
// sandbox by then; if it does not, the role stays empty until the next
// Synced.
func (s *session) assignRole(ctx context.Context, c *Container) {
	if c.Kind == KindSandbox {
		c.Role = RoleSandbox
		return
	}
	names, ok := s.roles[c.SandboxID]
	if !ok {
		resp, err := s.c.cri.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: c.SandboxID})
		if err != nil {
			return
		}
		names, _ = ParseSidecars(resp.GetStatus().GetAnnotations()[AnnotationSidecars])
		s.roles[c.SandboxID] = names
	}
	c.Role = RoleApp
	for _, n := range names {
		if n == c.Name {
			c.Role = RoleSidecar
		}
	}
}
