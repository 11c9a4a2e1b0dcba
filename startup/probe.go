package startup

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"time"
)

// Probe checks once whether a container is ready. It returns nil when it is.
type Probe interface {
	Check(ctx context.Context) error
	// String names the probe in logs and errors, e.g. "tcp 127.0.0.1:15001".
	String() string
}

// TCP is ready when a TCP connection to Addr is accepted.
type TCP struct {
	Addr string
	// Listeners, when set, answers for loopback addresses from the
	// kernel's listening-socket table instead of a handshake; see
	// Listeners for when it still connects.
	Listeners *Listeners
}

func (p TCP) Check(ctx context.Context) error {
	if p.Listeners != nil {
		return p.Listeners.verdict(ctx, p.Addr)
	}
	return dialCheck(ctx, "tcp", p.Addr)
}

func (p TCP) String() string { return "tcp " + p.Addr }

// Unix is ready when a connection to the unix socket Path is accepted.
type Unix struct{ Path string }

func (p Unix) Check(ctx context.Context) error { return dialCheck(ctx, "unix", p.Path) }
func (p Unix) String() string                  { return "unix " + p.Path }

func dialCheck(ctx context.Context, network, addr string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return fmt.Errorf("%s %s: %w", network, addr, err)
	}
	if tc, ok := c.(*net.TCPConn); ok {
		// Close with a reset: a probe every second per sidecar would
		// otherwise leave thousands of TIME_WAIT sockets on the node,
		// and ephemeral ports with them.
		_ = tc.SetLinger(0)
	}
	return c.Close()
}

// HTTP is ready when a GET of URL answers with a 2xx or 3xx status.
type HTTP struct {
	URL string
	// Client defaults to one that keeps no idle connections, so a probe
	// never holds a socket open between checks.
	Client *http.Client
}

var probeClient = &http.Client{
	Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil},
	CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	},
}

func (p HTTP) Check(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.URL, nil)
	if err != nil {
		return fmt.Errorf("http %s: %w", p.URL, err)
	}
	c := p.Client
	if c == nil {
		c = probeClient
	}
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("http %s: %w", p.URL, err)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode >= 400 {
		return fmt.Errorf("http %s: status %d", p.URL, resp.StatusCode)
	}
	return nil
}

func (p HTTP) String() string { return "http " + p.URL }

// Exec is ready when the command exits with status 0.
type Exec struct {
	Command []string
	Dir     string
	Env     []string
}

func (p Exec) Check(ctx context.Context) error {
	if len(p.Command) == 0 {
		return errors.New("exec probe: empty command")
	}
	cmd := exec.CommandContext(ctx, p.Command[0], p.Command[1:]...)
	cmd.Dir = p.Dir
	if p.Env != nil {
		cmd.Env = p.Env
	}
	// Kill the probe, not just its context, when it overruns; WaitDelay
	// bounds a grandchild that keeps the output pipe open.
	cmd.WaitDelay = 100 * time.Millisecond
	out, err := cmd.CombinedOutput()
	if err != nil {
		if len(out) > 200 {
			out = out[:200]
		}
		return fmt.Errorf("exec %q: %w: %s", p.Command, err, out)
	}
	return nil
}

func (p Exec) String() string { return fmt.Sprintf("exec %q", p.Command) }
