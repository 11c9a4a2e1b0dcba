package handoff

import (
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// HeldFD describes one fd a store holds, for health checks. It is read
// from the held fd itself, not from what the store was told: a socket that
// a holder shut down (shutdown(2) on any duplicate acts on the one shared
// socket) shows here as not listening.
type HeldFD struct {
	Name string
	// Spec is the listener spec for fds the store opened itself (Listen),
	// "" for fds a sidecar stored or a snapshot copied.
	Spec string
	// Addr is the socket's local address ("tcp 127.0.0.1:8080",
	// "unix /run/x.sock"), "" when it has none or it cannot be read.
	Addr string
	// Inode is the socket's inode, as /proc/PID/fd shows it
	// ("socket:[Inode]"), to find which processes have it open.
	Inode uint64
	// Listening: SO_ACCEPTCONN says the socket is in the LISTEN state.
	Listening bool
	// Err is why the fd could not be inspected, if it could not.
	Err error
}

// Held returns every held fd in order, each inspected on the spot.
func (s *Store) Held() []HeldFD {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]HeldFD, 0, len(s.entries))
	for _, e := range s.entries {
		h := HeldFD{Name: e.name, Spec: e.spec, Inode: e.id.ino}
		h.Listening, h.Err = fdListening(e.fd)
		if h.Err != nil {
			h.Err = fmt.Errorf("%s: held fd %q: %w", s.name, e.name, h.Err)
		}
		h.Addr = sockAddr(e.fd)
		out = append(out, h)
	}
	return out
}

// sockAddr is fd's local address as "network address", or "".
func sockAddr(fd int) string {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return ""
	}
	typ, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return inetName(typ) + " " + net.JoinHostPort(net.IP(a.Addr[:]).String(), fmt.Sprint(a.Port))
	case *unix.SockaddrInet6:
		return inetName(typ) + "6 " + net.JoinHostPort(net.IP(a.Addr[:]).String(), fmt.Sprint(a.Port))
	case *unix.SockaddrUnix:
		name := a.Name
		if name == "" {
			name = "(unnamed)"
		}
		return "unix " + name
	}
	return ""
}

func inetName(typ int) string {
	if typ == unix.SOCK_DGRAM {
		return "udp"
	}
	return "tcp"
}
