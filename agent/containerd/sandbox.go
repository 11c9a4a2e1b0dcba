package containerd

import (
	"context"
	"fmt"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// SandboxAnnotations returns the pod's own annotations and labels as kubelet
// handed them to CRI with the sandbox (one PodSandboxStatus call). The agent
// reads a new pod's meshagent.io settings here as soon as it appears, without
// waiting for the next Synced.
func (c *Client) SandboxAnnotations(ctx context.Context, sandboxID string) (annotations, labels map[string]string, err error) {
	resp, err := c.cri.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: sandboxID})
	if err != nil {
		return nil, nil, fmt.Errorf("containerd %s: cri pod sandbox status %s: %w", c.address, sandboxID, err)
	}
	st := resp.GetStatus()
	ann := st.GetAnnotations()
	if ann == nil {
		ann = map[string]string{}
	}
	return ann, st.GetLabels(), nil
}

// ContainerExit asks CRI whether container id has exited and with which
// code. CRI deletes an exited container's task from containerd once it has
// recorded the exit, so a listing finds such a container without a task
// (StatusNone), which by itself also fits one that never started.
func (c *Client) ContainerExit(ctx context.Context, id string) (exited bool, code int32, err error) {
	resp, err := c.cri.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: id})
	if err != nil {
		return false, 0, fmt.Errorf("containerd %s: cri container status %s: %w", c.address, id, err)
	}
	st := resp.GetStatus()
	return st.GetState() == runtimeapi.ContainerState_CONTAINER_EXITED, st.GetExitCode(), nil
}
