package agent

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strconv"
	"strings"

	"github.com/meshagent/meshagent/agent/containerd"
)

// The version inspection of Kubernetes pods: a container's declared version
// is its pod's meshagent.io/version.<container> annotation, and the running
// one is read as meshagent.io/version-check.<container> says, from the node
// (the same namespaces as the readiness checks, kube_probe.go). As in host
// mode, a container that declares a version but no way to read it is
// skipped: the check reports what it can verify.

// kubeVersionTarget is one running Kubernetes container to verify.
type kubeVersionTarget struct {
	pod, container, declared string
	check                    kubeProbeSpec
	pid, sandboxPID          uint32
}

// kubeVersionTargets lists the running containers of Kubernetes pods that
// declare a version and how to read it.
func (a *Agent) kubeVersionTargets() []kubeVersionTarget {
	s := a.kube
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []kubeVersionTarget
	for _, p := range s.pods {
		if p.sandbox == nil || !taskRunning(p.sandbox.status) || len(p.pol.Version) == 0 {
			continue
		}
		for _, c := range p.current() {
			want, ok := p.pol.Version[c.name]
			check, how := p.pol.VersionCheck[c.name]
			if !ok || !how || c.status != containerd.StatusRunning || c.pid == 0 {
				continue
			}
			out = append(out, kubeVersionTarget{pod: p.ref.String(), container: c.name, declared: want,
				check: check, pid: c.pid, sandboxPID: p.sandbox.pid})
		}
	}
	return out
}

// readKubeVersion reads the version t's container runs: the first line of
// the answer.
func readKubeVersion(ctx context.Context, t kubeVersionTarget) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, versionReadTimeout)
	defer cancel()
	var body io.Reader
	switch t.check.Kind {
	case "http":
		ns, err := openNetns(t.sandboxPID)
		if err != nil {
			return "", err
		}
		defer ns.Close()
		client := &http.Client{Transport: &http.Transport{DialContext: ns.dial, DisableKeepAlives: true, Proxy: nil}}
		url := "http://" + t.check.Addr + t.check.Path
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return "", err
		}
		resp, err := client.Do(req)
		if err != nil {
			return "", fmt.Errorf("%s (pod network): %w", url, err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return "", fmt.Errorf("%s (pod network): HTTP %d", url, resp.StatusCode)
		}
		body = resp.Body
	case "exec":
		pid := strconv.FormatUint(uint64(t.pid), 10)
		args := append([]string{"--target", pid, "--mount", "--uts", "--ipc", "--net", "--pid", "--"}, t.check.Cmd...)
		out, err := exec.CommandContext(ctx, "nsenter", args...).Output()
		if err != nil {
			return "", fmt.Errorf("exec %q in the container (pid %s): %w", t.check.Cmd, pid, err)
		}
		body = bytes.NewReader(out)
	default:
		return "", fmt.Errorf("a %s check reads no version", t.check.Kind)
	}
	return firstLine(body)
}

// firstLine is the first line of r, trimmed, read from at most 4 KiB.
func firstLine(r io.Reader) (string, error) {
	b, err := io.ReadAll(io.LimitReader(r, 4096))
	if err != nil {
		return "", err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	return strings.TrimSpace(line), nil
}
