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
