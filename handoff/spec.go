package handoff

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// ErrBadSpec is wrapped by every error about a listener spec string.
var ErrBadSpec = errors.New("bad listener spec")

// Spec is a parsed listener spec.
type Spec struct {
	Network string // "tcp", "tcp4", "tcp6" or "unix"
	Address string // host:port, or an absolute socket path
}

// ParseSpec parses a listener spec as written in a sidecar's config:
//
//	tcp://0.0.0.0:8080   tcp://[::1]:9000   tcp4://… tcp6://…
//	unix:///run/pod/web.sock
//
// The port must be given (0 picks a free one, which is mostly useful in
// tests); unix paths must be absolute.
func ParseSpec(spec string) (Spec, error) {
	if !strings.Contains(spec, "://") {
		return Spec{}, fmt.Errorf("%w %q: missing scheme (tcp:// or unix://)", ErrBadSpec, spec)
	}
	u, err := url.Parse(spec)
	if err != nil {
		return Spec{}, fmt.Errorf("%w %q: %w", ErrBadSpec, spec, err)
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" {
		return Spec{}, fmt.Errorf("%w %q: only scheme://address is allowed", ErrBadSpec, spec)
	}
	switch u.Scheme {
	case "tcp", "tcp4", "tcp6":
		if u.Path != "" {
			return Spec{}, fmt.Errorf("%w %q: tcp spec has a path %q", ErrBadSpec, spec, u.Path)
		}
		host, port, err := net.SplitHostPort(u.Host)
		if err != nil {
			return Spec{}, fmt.Errorf("%w %q: %w", ErrBadSpec, spec, err)
		}
		if port == "" {
			return Spec{}, fmt.Errorf("%w %q: missing port", ErrBadSpec, spec)
		}
		if p, err := net.LookupPort("tcp", port); err != nil || p < 0 || p > 65535 {
			return Spec{}, fmt.Errorf("%w %q: bad port %q", ErrBadSpec, spec, port)
		}
		if host != "" && net.ParseIP(host) == nil {
			// Names would resolve at open time to whatever DNS says;
			// a listener address must be stable.
			return Spec{}, fmt.Errorf("%w %q: host %q is not an IP address", ErrBadSpec, spec, host)
		}
		return Spec{Network: u.Scheme, Address: u.Host}, nil
	case "unix":
		if u.Host != "" {
			return Spec{}, fmt.Errorf("%w %q: unix spec needs an absolute path (unix:///path)", ErrBadSpec, spec)
		}
		if !filepath.IsAbs(u.Path) || filepath.Clean(u.Path) != u.Path {
			return Spec{}, fmt.Errorf("%w %q: path %q is not absolute and clean", ErrBadSpec, spec, u.Path)
		}
		return Spec{Network: "unix", Address: u.Path}, nil
	case "":
		return Spec{}, fmt.Errorf("%w %q: missing scheme (tcp:// or unix://)", ErrBadSpec, spec)
	default:
		return Spec{}, fmt.Errorf("%w %q: unknown scheme %q (want tcp, tcp4, tcp6 or unix)", ErrBadSpec, spec, u.Scheme)
	}
}

// String formats s as a spec string ParseSpec accepts.
func (s Spec) String() string {
	if s.Network == "unix" {
		return "unix://" + s.Address
	}
	return s.Network + "://" + s.Address
}

// open creates the listening socket and returns a raw duplicate owned by
// the caller. A stale unix socket file (from a previous run) is
// replaced; any other file at the path is an error.
func (s Spec) open(ctx context.Context) (int, error) {
	if s.Network == "unix" {
		if fi, err := os.Lstat(s.Address); err == nil {
			if fi.Mode().Type() != fs.ModeSocket {
				return -1, fmt.Errorf("listen %s: %s exists and is not a socket", s, s.Address)
			}
			if err := os.Remove(s.Address); err != nil {
				return -1, fmt.Errorf("listen %s: remove stale socket: %w", s, err)
			}
		}
	}
	var lc net.ListenConfig
	l, err := lc.Listen(ctx, s.Network, s.Address)
	if err != nil {
		return -1, fmt.Errorf("listen %s: %w", s, err)
	}
	if ul, ok := l.(*net.UnixListener); ok {
		// The path belongs to the store entry, not to this temporary
		// net.Listener: keep it when l is closed below.
		ul.SetUnlinkOnClose(false)
	}
	fd, err := dupConnFD(l.(syscall.Conn))
	l.Close()
	if err != nil {
		return -1, fmt.Errorf("listen %s: %w", s, err)
	}
	return fd, nil
}
