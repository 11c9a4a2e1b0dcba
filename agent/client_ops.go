package agent

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
)

// Switches lists the runtime switches.
func (c *Client) Switches(ctx context.Context) ([]SwitchState, error) {
	var out []SwitchState
	return out, c.Do(ctx, http.MethodGet, "/v1/switches", nil, &out)
}

// SetSwitch turns a runtime switch on or off.
func (c *Client) SetSwitch(ctx context.Context, name string, on bool) (SwitchState, error) {
	var out SwitchState
	return out, c.Do(ctx, http.MethodPut, "/v1/switches/"+url.PathEscape(name), switchRequest{On: &on}, &out)
}

// Reload makes the agent reload its config file.
func (c *Client) Reload(ctx context.Context) (ReloadResult, error) {
	var out ReloadResult
	return out, c.Do(ctx, http.MethodPost, "/v1/reload", nil, &out)
}

// Inspect runs the agent's inspections.
func (c *Client) Inspect(ctx context.Context) (InspectReport, error) {
	var out InspectReport
	return out, c.Do(ctx, http.MethodGet, "/v1/inspect", nil, &out)
}

// Metrics returns the Prometheus text exposition served on the socket.
func (c *Client) Metrics(ctx context.Context) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://meshagent/metrics", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "text/plain; version=0.0.4")
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, &APIError{Status: resp.StatusCode, Message: string(b)}
	}
	return b, nil
}
