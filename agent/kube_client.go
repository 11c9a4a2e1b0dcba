package agent

import (
	"context"
	"net/http"
)

// AskGate asks the agent on the node's gate socket whether the caller's pod
// may go on: it blocks until the pod's sidecars are ready or its startup
// timeout passes (probe: it answers at once). The agent knows the pod from
// the caller's peer credentials; there is nothing to name.
func AskGate(ctx context.Context, socket string, probe bool) (GateAnswer, error) {
	path := "/v1/gate"
	if probe {
		path += "?probe=1"
	}
	var ans GateAnswer
	return ans, NewClient(socket).Do(ctx, http.MethodGet, path, nil, &ans)
}

// AskHold blocks until every app container of the caller's pod has exited,
// or the pod's hold timeout passes.
func AskHold(ctx context.Context, socket string) (HoldAnswer, error) {
	var ans HoldAnswer
	return ans, NewClient(socket).Do(ctx, http.MethodGet, "/v1/hold", nil, &ans)
}
