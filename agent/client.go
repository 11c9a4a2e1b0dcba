package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
)

// Client talks to an agent's admin socket; `meshagent ctl` is built on it.
type Client struct {
	hc *http.Client
}

// NewClient returns a client of the admin socket at path.
func NewClient(path string) *Client {
	return &Client{hc: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		DisableKeepAlives: true,
	}}}
}

// APIError is an error answer of the admin API.
type APIError struct {
	Status  int
	Message string
}

func (e *APIError) Error() string { return fmt.Sprintf("%s (HTTP %d)", e.Message, e.Status) }

// Do sends one request; out, when not nil, receives the JSON answer.
func (c *Client) Do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://meshagent"+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	if resp.StatusCode >= 300 {
		var e apiError
		if json.Unmarshal(b, &e) != nil || e.Error == "" {
			e.Error = string(bytes.TrimSpace(b))
		}
		return &APIError{Status: resp.StatusCode, Message: e.Error}
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("admin socket: bad answer to %s %s: %w", method, path, err)
	}
	return nil
}

// Pods lists the pods.
func (c *Client) Pods(ctx context.Context) ([]PodStatus, error) {
	var out []PodStatus
	return out, c.Do(ctx, http.MethodGet, "/v1/pods", nil, &out)
}

// Pod returns one pod.
func (c *Client) Pod(ctx context.Context, name string) (PodStatus, error) {
	var out PodStatus
	return out, c.Do(ctx, http.MethodGet, "/v1/pods/"+url.PathEscape(name), nil, &out)
}

// Restart restarts one container alone.
func (c *Client) Restart(ctx context.Context, pod, container string) error {
	return c.Do(ctx, http.MethodPost, "/v1/pods/"+url.PathEscape(pod)+"/containers/"+url.PathEscape(container)+"/restart", nil, nil)
}

// RestartPod restarts a whole pod in order.
func (c *Client) RestartPod(ctx context.Context, pod string) error {
	return c.Do(ctx, http.MethodPost, "/v1/pods/"+url.PathEscape(pod)+"/restart", nil, nil)
}

// Events returns events after seq since (of one pod when pod is not empty).
func (c *Client) Events(ctx context.Context, since uint64, limit int, pod string) ([]Event, error) {
	q := url.Values{}
	q.Set("since", strconv.FormatUint(since, 10))
	q.Set("limit", strconv.Itoa(limit))
	if pod != "" {
		q.Set("pod", pod)
	}
	var out []Event
	return out, c.Do(ctx, http.MethodGet, "/v1/events?"+q.Encode(), nil, &out)
}
