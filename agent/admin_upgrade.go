package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
)

// upgrade is POST /v1/pods/{pod}/containers/{container}/upgrade with an
// UpgradeRequest body. It answers when the outcome is known (after the new
// process's readiness and the watch window): 200 with an UpgradeResult
// whose outcome is "succeeded" or "rolled-back"; 400 for a bad request, 404
// for an unknown pod or container, 409 when the sidecar is not ready or an
// upgrade of it is already running.
func (s *adminServer) upgrade(w http.ResponseWriter, r *http.Request) {
	var req UpgradeRequest
	if !readBody(w, r, &req) {
		return
	}
	pod, c := r.PathValue("pod"), r.PathValue("container")
	p, _ := peerOf(r.Context())
	s.a.log.Info("operator upgrade", "pod", pod, "container", c, "uid", p.UID, "command", req.Command, "version", req.Version)
	res, err := s.a.Upgrade(r.Context(), pod, c, req)
	if err != nil {
		writeError(w, upgradeStatus(err), err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func upgradeStatus(err error) int {
	switch {
	case errors.Is(err, ErrUpgradeInvalid):
		return http.StatusBadRequest
	case errors.Is(err, ErrUpgradeBusy), errors.Is(err, ErrUpgradeState):
		return http.StatusConflict
	}
	return statusOf(err)
}

// Upgrade asks for a hot upgrade of pod/container and waits for its outcome.
func (c *Client) Upgrade(ctx context.Context, pod, container string, req UpgradeRequest) (UpgradeResult, error) {
	var out UpgradeResult
	err := c.Do(ctx, http.MethodPost, "/v1/pods/"+url.PathEscape(pod)+"/containers/"+url.PathEscape(container)+"/upgrade", req, &out)
	if err != nil {
		return out, fmt.Errorf("upgrade %s/%s: %w", pod, container, err)
	}
	return out, nil
}
