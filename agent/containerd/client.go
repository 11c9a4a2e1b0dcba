package containerd

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	tasksapi "github.com/containerd/containerd/api/services/tasks/v1"
	tasktypes "github.com/containerd/containerd/api/types/task"
	ctrd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Errors StopContainer returns for a container it cannot stop; a caller that
// wants it stopped may treat both as done.
var (
	// ErrNoTask: the container exists but has no running task (exited,
	// possibly reaped by CRI already, or never started).
	ErrNoTask = errors.New("container has no running task")
	// ErrNoContainer: containerd has no such container.
	ErrNoContainer = errors.New("no such container")
)

// Client talks to one containerd over its socket: the containerd API for
// containers, tasks and events, and the CRI API for what kubelet told the
// runtime about pods.
type Client struct {
	address string
	conn    *grpc.ClientConn
	ctr     *ctrd.Client
	cri     runtimeapi.RuntimeServiceClient
	opts    options
}

// Option configures a Client.
type Option func(*options) error

type options struct {
	resyncAfter  time.Duration
	resyncEvery  time.Duration
	backoffFirst time.Duration
	backoffMax   time.Duration
}

// WithBackoff sets the first and the longest wait between attempts to
// resubscribe after the event stream breaks (default 100ms and 5s).
func WithBackoff(first, max time.Duration) Option {
	return func(o *options) error {
		if first <= 0 || max < first {
			return fmt.Errorf("backoff: need 0 < first (%s) <= max (%s)", first, max)
		}
		o.backoffFirst, o.backoffMax = first, max
		return nil
	}
}

// WithResync sets when Run lists containerd again to catch events the stream
// may have missed: once `after` each (re)subscription (the server may
// register the subscription after the first listing was taken) and then
// every `every` (0: never). Defaults: 1s and 1m.
func WithResync(after, every time.Duration) Option {
	return func(o *options) error {
		if after <= 0 || every < 0 {
			return fmt.Errorf("resync: need after (%s) > 0 and every (%s) >= 0", after, every)
		}
		o.resyncAfter, o.resyncEvery = after, every
		return nil
	}
}

// New returns a client for the containerd socket at address. It does not
// wait for containerd: calls fail (and Run retries) while it is down.
func New(address string, opts ...Option) (*Client, error) {
	o := options{resyncAfter: time.Second, resyncEvery: time.Minute, backoffFirst: 100 * time.Millisecond, backoffMax: 5 * time.Second}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, fmt.Errorf("containerd client %s: %w", address, err)
		}
	}
	if address == "" {
		return nil, errors.New("containerd client: empty socket address")
	}
	bc := backoff.DefaultConfig
	// A local socket: reconnect quickly once containerd is back.
	bc.MaxDelay = time.Second
	conn, err := grpc.NewClient("unix://"+address,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bc, MinConnectTimeout: 2 * time.Second}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)),
	)
	if err != nil {
		return nil, fmt.Errorf("containerd client %s: %w", address, err)
	}
	ctr, err := ctrd.NewWithConn(conn, ctrd.WithDefaultNamespace(Namespace))
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("containerd client %s: %w", address, err)
	}
	return &Client{address: address, conn: conn, ctr: ctr, cri: runtimeapi.NewRuntimeServiceClient(conn), opts: o}, nil
}

// Close releases the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Version returns the containerd server's version string.
func (c *Client) Version(ctx context.Context) (string, error) {
	v, err := c.ctr.Version(ns(ctx))
	if err != nil {
		return "", fmt.Errorf("containerd %s: version: %w", c.address, err)
	}
	return v.Version, nil
}

func ns(ctx context.Context) context.Context { return namespaces.WithNamespace(ctx, Namespace) }

// listing is one consistent-enough look at containerd: every CRI container
// with its task, in creation order.
type listing struct {
	containers []Container
	tasks      map[string]*task
}

// list reads every container and task of the k8s.io namespace (two calls).
func (c *Client) list(ctx context.Context) (listing, error) {
	ctx = ns(ctx)
	// Tasks first: a container created between the two calls then shows up
	// without a task and its start event follows, instead of a task whose
	// container is unknown.
	tr, err := c.ctr.TaskService().List(ctx, &tasksapi.ListTasksRequest{})
	if err != nil {
		return listing{}, fmt.Errorf("containerd %s: list tasks: %w", c.address, errgrpc.ToNative(err))
	}
	recs, err := c.ctr.ContainerService().List(ctx)
	if err != nil {
		return listing{}, fmt.Errorf("containerd %s: list containers: %w", c.address, err)
	}
	l := listing{tasks: map[string]*task{}}
	for _, p := range tr.Tasks {
		t := taskOf(p.Pid, p.Status, p.ExitStatus, p.ExitedAt.AsTime())
		l.tasks[cmpOr(p.ContainerID, p.ID)] = &t
	}
	for _, r := range recs {
		var spec []byte
		if r.Spec != nil {
			spec = r.Spec.GetValue()
		}
		ct, ok, err := identify(record{ID: r.ID, Labels: r.Labels, Spec: spec, CreatedAt: r.CreatedAt})
		if err != nil || !ok {
			// Not a CRI container, or one we cannot read: not part of a
			// pod we could manage.
			continue
		}
		l.containers = append(l.containers, ct.withTask(l.tasks[r.ID]))
	}
	slices.SortStableFunc(l.containers, func(a, b Container) int {
		// Sandboxes first so a pod is known before its containers.
		if (a.Kind == KindSandbox) != (b.Kind == KindSandbox) {
			if a.Kind == KindSandbox {
				return -1
			}
			return 1
		}
		return a.CreatedAt.Compare(b.CreatedAt)
	})
	return l, nil
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func taskOf(pid uint32, st tasktypes.Status, exit uint32, exitedAt time.Time) task {
	t := task{PID: pid}
	switch st {
	case tasktypes.Status_CREATED:
		t.Status = StatusCreated
	case tasktypes.Status_RUNNING:
		t.Status = StatusRunning
	case tasktypes.Status_PAUSED, tasktypes.Status_PAUSING:
		t.Status = StatusPaused
	case tasktypes.Status_STOPPED:
		t.Status, t.ExitStatus, t.ExitedAt = StatusStopped, exit, exitedAt
	default:
		t.Status = StatusUnknown
	}
	return t
}

// Snapshot returns every pod on the node with its containers, their task
// states, the pod's annotations and labels from CRI, and each container's
// role. A pod with a malformed meshagent.io/sidecars annotation is returned
// with all containers as apps, and the error is returned alongside (joined).
func (c *Client) Snapshot(ctx context.Context) ([]Pod, error) {
	l, err := c.list(ctx)
	if err != nil {
		return nil, err
	}
	pods, perrs, err := c.pods(ctx, l.containers)
	if err != nil {
		return nil, err
	}
	return pods, errors.Join(perrs...)
}

// pods joins CRI's view to containers. perrs are per-pod annotation errors;
// err is a failure to ask CRI.
func (c *Client) pods(ctx context.Context, cs []Container) (pods []Pod, perrs []error, err error) {
	sb, err := c.cri.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		return nil, nil, fmt.Errorf("containerd %s: cri list pod sandboxes: %w", c.address, err)
	}
	sandboxes := make(map[string]sandboxInfo, len(sb.Items))
	for _, s := range sb.Items {
		sandboxes[s.Id] = sandboxInfo{Annotations: s.Annotations, Labels: s.Labels}
	}
	cr, err := c.cri.ListContainers(ctx, &runtimeapi.ListContainersRequest{})
	if err != nil {
		return nil, nil, fmt.Errorf("containerd %s: cri list containers: %w", c.address, err)
	}
	attempts := make(map[string]uint32, len(cr.Containers))
	for _, ct := range cr.Containers {
		attempts[ct.Id] = ct.GetMetadata().GetAttempt()
	}
	pods, perrs = buildPods(cs, sandboxes, attempts)
	return pods, perrs, nil
}

// Pod returns one pod by sandbox id, built like Snapshot's.
func (c *Client) Pod(ctx context.Context, sandboxID string) (Pod, error) {
	pods, err := c.Snapshot(ctx)
	for _, p := range pods {
		if p.SandboxID == sandboxID {
			return p, err
		}
	}
	if err != nil {
		return Pod{}, err
	}
	return Pod{}, fmt.Errorf("pod sandbox %s: %w", sandboxID, errdefs.ErrNotFound)
}

// StopContainer stops one container's task the way kubelet would: signal
// (0 means the image's stop signal, else SIGTERM), then SIGKILL if it has not
// exited after grace. It returns once the task has exited or ctx ends. It
// neither deletes the task nor creates anything: the CRI plugin reaps the
// exit and kubelet restarts the container by its restart policy.
func (c *Client) StopContainer(ctx context.Context, id string, signal syscall.Signal, grace time.Duration) error {
	ctx = ns(ctx)
	if signal == 0 {
		signal = syscall.SIGTERM
		if rec, err := c.ctr.ContainerService().Get(ctx, id); err == nil && rec.Labels[LabelStopSignal] != "" {
			if s, err := parseSignal(rec.Labels[LabelStopSignal]); err == nil {
				signal = s
			}
		}
	}
	ts := c.ctr.TaskService()
	st, err := ts.Get(ctx, &tasksapi.GetRequest{ContainerID: id})
	if err != nil {
		if errdefs.IsNotFound(errgrpc.ToNative(err)) {
			if _, err := c.ctr.ContainerService().Get(ctx, id); errdefs.IsNotFound(err) {
				return fmt.Errorf("stop container %s: %w", id, ErrNoContainer)
			}
			return fmt.Errorf("stop container %s: %w", id, ErrNoTask)
		}
		return fmt.Errorf("stop container %s: get task: %w", id, errgrpc.ToNative(err))
	}
	if st.Process.GetStatus() == tasktypes.Status_STOPPED {
		return fmt.Errorf("stop container %s: %w", id, ErrNoTask) // exited, not yet reaped
	}

	waitCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	exited := make(chan error, 1)
	go func() {
		_, err := ts.Wait(waitCtx, &tasksapi.WaitRequest{ContainerID: id})
		if err != nil && errdefs.IsNotFound(errgrpc.ToNative(err)) {
			err = nil // already reaped and deleted by CRI: it exited
		}
		exited <- err
	}()

	kill := func(s syscall.Signal) error {
		_, err := ts.Kill(ctx, &tasksapi.KillRequest{ContainerID: id, Signal: uint32(s)})
		if err != nil {
			if errdefs.IsNotFound(errgrpc.ToNative(err)) {
				return nil // gone meanwhile
			}
			return fmt.Errorf("stop container %s: kill %s: %w", id, s, errgrpc.ToNative(err))
		}
		return nil
	}
	if err := kill(signal); err != nil {
		return err
	}
	timer := time.NewTimer(grace)
	defer timer.Stop()
	select {
	case err := <-exited:
		return waitErr(id, err)
	case <-timer.C:
	case <-ctx.Done():
		return fmt.Errorf("stop container %s: %w", id, ctx.Err())
	}
	if err := kill(syscall.SIGKILL); err != nil {
		return err
	}
	select {
	case err := <-exited:
		return waitErr(id, err)
	case <-ctx.Done():
		return fmt.Errorf("stop container %s after SIGKILL: %w", id, ctx.Err())
	}
}

func waitErr(id string, err error) error {
	if err != nil {
		return fmt.Errorf("stop container %s: wait: %w", id, errgrpc.ToNative(err))
	}
	return nil
}

// parseSignal reads "SIGTERM", "TERM" or "15".
func parseSignal(s string) (syscall.Signal, error) {
	if n, err := strconv.Atoi(s); err == nil && n > 0 && n < 65 {
		return syscall.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("unknown signal %q", s)
}
