package critest

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// The labels kubelet puts on every sandbox and container it asks the runtime
// for; the agent rebuilds its pod model from them.
const (
	LabelPodName       = "io.kubernetes.pod.name"
	LabelPodNamespace  = "io.kubernetes.pod.namespace"
	LabelPodUID        = "io.kubernetes.pod.uid"
	LabelContainerName = "io.kubernetes.container.name"
)

// Runtime is a CRI client on one containerd socket.
type Runtime struct {
	Socket string
	conn   *grpc.ClientConn
	// RS is the raw CRI runtime service, for calls the helpers do not wrap.
	RS runtimeapi.RuntimeServiceClient
}

// Dial connects to the CRI service on a containerd socket and waits until the
// runtime reports RuntimeReady (host-network pods need nothing more), or ctx
// ends.
func Dial(ctx context.Context, socket string) (*Runtime, error) {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("dial cri %s: %w", socket, err)
	}
	r := &Runtime{Socket: socket, conn: conn, RS: runtimeapi.NewRuntimeServiceClient(conn)}
	for {
		st, err := r.RS.Status(ctx, &runtimeapi.StatusRequest{})
		if err == nil && runtimeReady(st) {
			return r, nil
		}
		select {
		case <-ctx.Done():
			conn.Close()
			if err == nil {
				err = errors.New("RuntimeReady condition is false")
			}
			return nil, fmt.Errorf("cri %s not ready: %w (last: %v)", socket, ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func runtimeReady(st *runtimeapi.StatusResponse) bool {
	for _, c := range st.GetStatus().GetConditions() {
		if c.Type == runtimeapi.RuntimeReady {
			return c.Status
		}
	}
	return false
}

// Close closes the connection.
func (r *Runtime) Close() error { return r.conn.Close() }

// PodSpec describes a pod as kubelet would hand it to the runtime.
type PodSpec struct {
	Name      string // required
	Namespace string // default "default"
	UID       string // default: random
	// Annotations are the pod's own annotations (meshagent.io/... live here).
	Annotations map[string]string
	Labels      map[string]string
	// CgroupParent defaults to kubelet's cgroupfs layout for a best-effort pod,
	// /kubepods/besteffort/pod<uid>.
	CgroupParent string
	// LogDir, if set, receives the containers' logs (<name>/<attempt>.log).
	LogDir string
	// PodNetwork gives the pod its own network namespace through CNI (a
	// bridge set up by scripts/ci-containerd.sh); by default pods use the
	// host network.
	PodNetwork bool
	// Containers are created and started in order, like spec.containers.
	Containers []ContainerSpec
}

// ContainerSpec describes one container of a pod.
type ContainerSpec struct {
	Name    string // required
	Image   string // required; one of internal/testimages
	Args    []string
	Env     map[string]string
	Mounts  []*runtimeapi.Mount
	Attempt uint32 // kubelet's restart count for this container name
	// Resources defaults to a best-effort container (cpu shares 2,
	// oom_score_adj 1000), as kubelet computes them.
	Resources *runtimeapi.LinuxContainerResources
	// GracePeriod is recorded like kubelet's terminationGracePeriod
	// annotation; default 30s.
	GracePeriod time.Duration
}

// Pod is a running pod.
type Pod struct {
	SandboxID    string
	Name         string
	Namespace    string
	UID          string
	CgroupParent string
	// Containers are the started containers, in start order.
	Containers []Container

	config *runtimeapi.PodSandboxConfig
	netns  *runtimeapi.NamespaceOption
}

// Container is one started container of a Pod.
type Container struct {
	Name string
	ID   string
}

// ContainerID returns the id of the container called name, or "".
func (p *Pod) ContainerID(name string) string {
	for _, c := range p.Containers {
		if c.Name == name {
			return c.ID
		}
	}
	return ""
}

// NewUID returns a random pod UID in the usual 8-4-4-4-12 form.
func NewUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// RunPod creates the pod's sandbox, then creates and starts its containers in
// order. On error it removes whatever it created.
func (r *Runtime) RunPod(ctx context.Context, spec PodSpec) (_ *Pod, err error) {
	if spec.Name == "" {
		return nil, errors.New("run pod: PodSpec.Name is empty")
	}
	if spec.Namespace == "" {
		spec.Namespace = "default"
	}
	if spec.UID == "" {
		spec.UID = NewUID()
	}
	if spec.CgroupParent == "" {
		spec.CgroupParent = "/kubepods/besteffort/pod" + spec.UID
	}
	labels := map[string]string{
		LabelPodName:      spec.Name,
		LabelPodNamespace: spec.Namespace,
		LabelPodUID:       spec.UID,
	}
	for k, v := range spec.Labels {
		labels[k] = v
	}
	annotations := map[string]string{
		"kubernetes.io/config.source": "api",
		"kubernetes.io/config.seen":   time.Now().UTC().Format(time.RFC3339Nano),
	}
	for k, v := range spec.Annotations {
		annotations[k] = v
	}
	netns, hostname := hostNetwork(), "" // no UTS namespace to name
	if spec.PodNetwork {
		netns = &runtimeapi.NamespaceOption{
			Network: runtimeapi.NamespaceMode_POD,
			Pid:     runtimeapi.NamespaceMode_CONTAINER,
			Ipc:     runtimeapi.NamespaceMode_POD,
		}
		hostname = spec.Name
	}
	config := &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: spec.Name, Namespace: spec.Namespace, Uid: spec.UID},
		Hostname:     hostname,
		LogDirectory: spec.LogDir,
		Labels:       labels,
		Annotations:  annotations,
		Linux: &runtimeapi.LinuxPodSandboxConfig{
			CgroupParent: spec.CgroupParent,
			SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
				NamespaceOptions: netns,
			},
		},
	}
	resp, err := r.RS.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: config})
	if err != nil {
		return nil, fmt.Errorf("run pod sandbox %s/%s: %w", spec.Namespace, spec.Name, err)
	}
	pod := &Pod{
		SandboxID: resp.PodSandboxId, Name: spec.Name, Namespace: spec.Namespace, UID: spec.UID,
		CgroupParent: spec.CgroupParent, config: config, netns: netns,
	}
	defer func() {
		if err != nil {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			_ = r.RemovePod(cctx, pod)
		}
	}()
	for _, cs := range spec.Containers {
		if _, err := r.StartContainer(ctx, pod, cs); err != nil {
			return nil, err
		}
	}
	return pod, nil
}

func hostNetwork() *runtimeapi.NamespaceOption {
	return &runtimeapi.NamespaceOption{
		Network: runtimeapi.NamespaceMode_NODE,
		Pid:     runtimeapi.NamespaceMode_CONTAINER,
		Ipc:     runtimeapi.NamespaceMode_POD,
	}
}

// CreateContainer creates one container in pod with kubelet's labels and
// annotations, without starting it.
func (r *Runtime) CreateContainer(ctx context.Context, pod *Pod, cs ContainerSpec) (string, error) {
	if cs.Name == "" || cs.Image == "" {
		return "", fmt.Errorf("create container in pod %s/%s: name %q and image %q must both be set", pod.Namespace, pod.Name, cs.Name, cs.Image)
	}
	grace := cs.GracePeriod
	if grace == 0 {
		grace = 30 * time.Second
	}
	res := cs.Resources
	if res == nil {
		res = &runtimeapi.LinuxContainerResources{CpuPeriod: 100000, CpuShares: 2, OomScoreAdj: 1000}
	}
	var envs []*runtimeapi.KeyValue
	for k, v := range cs.Env {
		envs = append(envs, &runtimeapi.KeyValue{Key: k, Value: []byte(v)})
	}
	config := &runtimeapi.ContainerConfig{
		Metadata: &runtimeapi.ContainerMetadata{Name: cs.Name, Attempt: cs.Attempt},
		Image:    &runtimeapi.ImageSpec{Image: cs.Image, UserSpecifiedImage: cs.Image},
		Args:     cs.Args,
		Envs:     envs,
		Mounts:   cs.Mounts,
		Labels: map[string]string{
			LabelPodName:       pod.Name,
			LabelPodNamespace:  pod.Namespace,
			LabelPodUID:        pod.UID,
			LabelContainerName: cs.Name,
		},
		Annotations: map[string]string{
			"io.kubernetes.container.hash":                     "0",
			"io.kubernetes.container.restartCount":             strconv.FormatUint(uint64(cs.Attempt), 10),
			"io.kubernetes.container.terminationMessagePath":   "/dev/termination-log",
			"io.kubernetes.container.terminationMessagePolicy": "File",
			"io.kubernetes.pod.terminationGracePeriod":         strconv.Itoa(int(grace / time.Second)),
		},
		LogPath: filepath.Join(cs.Name, strconv.FormatUint(uint64(cs.Attempt), 10)+".log"),
		Linux: &runtimeapi.LinuxContainerConfig{
			Resources: res,
			SecurityContext: &runtimeapi.LinuxContainerSecurityContext{
				NamespaceOptions: cmp.Or(pod.netns, hostNetwork()),
			},
		},
	}
	resp, err := r.RS.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{
		PodSandboxId: pod.SandboxID, Config: config, SandboxConfig: pod.config,
	})
	if err != nil {
		return "", fmt.Errorf("create container %s in pod %s/%s: %w", cs.Name, pod.Namespace, pod.Name, err)
	}
	return resp.ContainerId, nil
}

// StartContainer creates and starts one container in pod and records it in
// pod.Containers (replacing an earlier container of the same name, as a
// kubelet restart does).
func (r *Runtime) StartContainer(ctx context.Context, pod *Pod, cs ContainerSpec) (string, error) {
	id, err := r.CreateContainer(ctx, pod, cs)
	if err != nil {
		return "", err
	}
	if _, err := r.RS.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: id}); err != nil {
		return "", fmt.Errorf("start container %s (%s) in pod %s/%s: %w", cs.Name, id, pod.Namespace, pod.Name, err)
	}
	for i, c := range pod.Containers {
		if c.Name == cs.Name {
			pod.Containers[i].ID = id
			return id, nil
		}
	}
	pod.Containers = append(pod.Containers, Container{Name: cs.Name, ID: id})
	return id, nil
}

// StopContainer stops a container as kubelet does: its stop signal, then
// SIGKILL after timeout.
func (r *Runtime) StopContainer(ctx context.Context, id string, timeout time.Duration) error {
	_, err := r.RS.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: id, Timeout: int64(timeout / time.Second)})
	if err != nil {
		return fmt.Errorf("stop container %s: %w", id, err)
	}
	return nil
}

// ContainerState returns the CRI state of a container.
func (r *Runtime) ContainerState(ctx context.Context, id string) (runtimeapi.ContainerState, error) {
	resp, err := r.RS.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: id})
	if err != nil {
		return 0, fmt.Errorf("container status %s: %w", id, err)
	}
	return resp.GetStatus().GetState(), nil
}

// RemovePod stops and removes the pod's sandbox and containers, then deletes
// the pod-level cgroup folders containerd leaves behind.
func (r *Runtime) RemovePod(ctx context.Context, pod *Pod) error {
	var errs []error
	// kubelet retries a failed StopPodSandbox on its next sync; so do we, a
	// few times: containerd 1.6 can lose its shim connection ("ttrpc:
	// closed") while killing a container that is exiting by itself.
	var err error
	for i := 0; i < 5; i++ {
		if _, err = r.RS.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: pod.SandboxID}); err == nil {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
	if err != nil {
		errs = append(errs, fmt.Errorf("stop pod sandbox %s/%s: %w", pod.Namespace, pod.Name, err))
	}
	if _, err := r.RS.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: pod.SandboxID}); err != nil {
		errs = append(errs, fmt.Errorf("remove pod sandbox %s/%s: %w", pod.Namespace, pod.Name, err))
	}
	if err := RemoveCgroups(ctx, pod.CgroupParent); err != nil {
		errs = append(errs, fmt.Errorf("pod %s/%s: %w", pod.Namespace, pod.Name, err))
	}
	return errors.Join(errs...)
}

// RemoveCgroups removes the folder at path (a cgroup path such as
// /kubepods/besteffort/pod<uid>) and any empty children from every mounted
// cgroup hierarchy, v1 and v2. Folders still busy (a process exiting) are
// retried until ctx ends.
func RemoveCgroups(ctx context.Context, path string) error {
	if path == "" || path == "/" || strings.Contains(path, "..") {
		return fmt.Errorf("remove cgroups: refusing path %q", path)
	}
	mounts, err := cgroupMounts()
	if err != nil {
		return err
	}
	var errs []error
	for _, m := range mounts {
		dir := filepath.Join(m, path)
		for {
			err := removeTree(dir)
			if err == nil || !errors.Is(err, syscall.EBUSY) {
				if err != nil {
					errs = append(errs, err)
				}
				break
			}
			select {
			case <-ctx.Done():
				errs = append(errs, fmt.Errorf("%w (gave up: %w)", err, ctx.Err()))
			case <-time.After(50 * time.Millisecond):
				continue
			}
			break
		}
	}
	return errors.Join(errs...)
}

// removeTree removes a cgroup folder bottom-up with rmdir (cgroup files cannot
// be unlinked; rmdir of a folder without children takes its files along).
func removeTree(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read cgroup dir %s: %w", dir, err)
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := removeTree(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	if err := syscall.Rmdir(dir); err != nil && !errors.Is(err, syscall.ENOENT) {
		return fmt.Errorf("rmdir cgroup %s: %w", dir, err)
	}
	return nil
}

// cgroupMounts lists the mount points of every cgroup hierarchy.
func cgroupMounts() ([]string, error) {
	data, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return nil, fmt.Errorf("read mounts: %w", err)
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && (f[2] == "cgroup" || f[2] == "cgroup2") {
			out = append(out, f[1])
		}
	}
	return out, nil
}

// PID returns the host PID of a running container's process, from CRI's
// verbose status (the same source crictl inspect uses).
func (r *Runtime) PID(ctx context.Context, id string) (int, error) {
	resp, err := r.RS.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: id, Verbose: true})
	if err != nil {
		return 0, fmt.Errorf("container status %s: %w", id, err)
	}
	var info struct {
		PID int `json:"pid"`
	}
	if err := json.Unmarshal([]byte(resp.GetInfo()["info"]), &info); err != nil {
		return 0, fmt.Errorf("container %s: decode verbose info: %w", id, err)
	}
	if info.PID <= 0 {
		return 0, fmt.Errorf("container %s: no pid in verbose info (not running?)", id)
	}
	return info.PID, nil
}

// PodIP returns the pod's IP address: the node's for a host-network pod
// (empty), its own for a PodNetwork pod.
func (r *Runtime) PodIP(ctx context.Context, pod *Pod) (string, error) {
	resp, err := r.RS.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: pod.SandboxID})
	if err != nil {
		return "", fmt.Errorf("pod sandbox status %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	return resp.GetStatus().GetNetwork().GetIp(), nil
}
