package startup

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Listeners answers TCP readiness for loopback addresses from the kernel's
// own table of listening sockets (sock_diag), read once per MaxAge for every
// probe on the node instead of a loopback handshake per probe. On a node with
// hundreds of sidecars the handshakes, not the checks, were the agent's idle
// CPU. The table is also the better witness: it shows a full accept queue
// (a sidecar alive but no longer accepting), which a connect only learns by
// timing out.
//
// Only what the table can vouch for is answered from it: a loopback target
// with a listener on that address or the wildcard, in the caller's network
// namespace. Anything else (no such listener, a device-bound listener, a
// remote or named address, a failed dump) falls back to a real connect, so a
// probe using Listeners never reports ready where a connect would not.
//
// The zero value is ready to use; one Listeners is meant to be shared by all
// of a node's probes.
type Listeners struct {
	// MaxAge is how old a table may be and still answer; 0 means 100ms.
	// Probes that share a schedule (see Schedule.Align) read one table.
	MaxAge time.Duration

	mu    sync.Mutex
	at    time.Time
	table map[uint16][]listener // by local port
	err   error
	dumps int

	smu    sync.Mutex
	sweeps map[time.Duration]*sweep // by period; see sweep.go
}

// listener is one socket in LISTEN state.
type listener struct {
	addr    netip.Addr // unspecified for a wildcard bind
	v6only  bool
	bound   bool   // bound to a device
	queue   uint32 // connections waiting in the accept queue
	backlog uint32 // the queue's limit
}

// errNoVerdict means the table cannot vouch for the address: dial instead.
var errNoVerdict = errors.New("no verdict from the listener table")

// check returns nil when a listener accepting on addr is in the table, an
// error when one is there but its accept queue is full, and errNoVerdict
// when the table cannot tell.
func (l *Listeners) check(addr string) error {
	targets, ok := loopbackTargets(addr)
	if !ok {
		return errNoVerdict
	}
	table, err := l.snapshot()
	if err != nil {
		return errNoVerdict
	}
	return verdictIn(table, addr, targets)
}

// verdictIn answers for targets from one table.
func verdictIn(table map[uint16][]listener, addr string, targets []netip.AddrPort) error {
	for _, t := range targets {
		for _, s := range table[t.Port()] {
			if !s.accepts(t.Addr()) {
				continue
			}
			// The kernel drops SYNs once the queue holds more than its
			// limit (sk_acceptq_is_full).
			if s.queue > s.backlog {
				return fmt.Errorf("tcp %s: accept queue full (%d waiting, limit %d): the listener is not accepting", addr, s.queue, s.backlog)
			}
			return nil
		}
	}
	return errNoVerdict
}

// accepts reports whether a SYN to a (a loopback address) would reach s.
func (s listener) accepts(a netip.Addr) bool {
	if s.bound {
		return false // bound to a device: leave the routing to a connect
	}
	if s.addr.Is6() && !s.addr.Is4In6() {
		if s.addr.IsUnspecified() {
			return a.Is6() || !s.v6only
		}
		return s.addr == a
	}
	la := s.addr.Unmap()
	return a.Is4() && (la.IsUnspecified() || la == a)
}

// loopbackTargets parses addr ("127.0.0.1:15001", "[::1]:15001",
// "localhost:15001") into the loopback addresses a dial would try; ok is
// false for anything that is not loopback.
func loopbackTargets(addr string) (_ []netip.AddrPort, ok bool) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, false
	}
	p, err := netip.ParseAddrPort(net.JoinHostPort("0.0.0.0", port))
	if err != nil {
		return nil, false
	}
	if host == "localhost" {
		return []netip.AddrPort{
			netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), p.Port()),
			netip.AddrPortFrom(netip.IPv6Loopback(), p.Port()),
		}, true
	}
	a, err := netip.ParseAddr(host)
	if err != nil || !a.Unmap().IsLoopback() || a.Zone() != "" {
		return nil, false
	}
	return []netip.AddrPort{netip.AddrPortFrom(a.Unmap(), p.Port())}, true
}

// snapshot returns a table no older than MaxAge, dumping a new one if need
// be. Callers that arrive during a dump wait for it and share it.
func (l *Listeners) snapshot() (map[uint16][]listener, error) {
	maxAge := l.MaxAge
	if maxAge <= 0 {
		maxAge = 100 * time.Millisecond
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.table != nil && time.Since(l.at) < maxAge {
		return l.table, l.err
	}
	table := map[uint16][]listener{}
	err := dumpListeners(unix.AF_INET, table)
	// Without IPv6 the second dump fails; the IPv4 table still answers,
	// and a listener it lacks only sends that probe to a connect.
	_ = dumpListeners(unix.AF_INET6, table)
	l.table, l.err, l.at = table, err, time.Now()
	l.dumps++
	return table, err
}

// Dumps counts the kernel table reads so far, for tests and benchmarks.
func (l *Listeners) Dumps() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dumps
}

// The sock_diag wire format (linux/inet_diag.h, linux/sock_diag.h). The
// library that wraps it (vishvananda/netlink) dumps every TCP state; a node
// with thousands of proxied connections needs LISTEN only, which the
// request's state mask gives for free.
const (
	tcpListen      = 10
	diagReqLen     = 56 // struct inet_diag_req_v2
	diagMsgLen     = 72 // struct inet_diag_msg
	inetDiagV6Only = 11 // INET_DIAG_SKV6ONLY attribute
)

// dumpListeners adds every TCP socket of family in LISTEN state to table.
func dumpListeners(family uint8, table map[uint16][]listener) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return fmt.Errorf("sock_diag: socket: %w", err)
	}
	defer unix.Close(fd)

	req := make([]byte, unix.NLMSG_HDRLEN+diagReqLen)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	ne.PutUint32(req[8:], 1) // sequence
	body := req[unix.NLMSG_HDRLEN:]
	body[0] = family
	body[1] = unix.IPPROTO_TCP
	ne.PutUint32(body[4:], 1<<tcpListen)
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("sock_diag: send: %w", err)
	}

	buf := make([]byte, 32<<10)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return fmt.Errorf("sock_diag: receive: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return fmt.Errorf("sock_diag: %w", err)
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if errno := int32(ne.Uint32(m.Data)); errno != 0 {
						return fmt.Errorf("sock_diag: %w", unix.Errno(-errno))
					}
				}
				return nil
			}
			if s, port, ok := parseDiagMsg(m.Data); ok {
				table[port] = append(table[port], s)
			}
		}
	}
}

// parseDiagMsg decodes one struct inet_diag_msg and its attributes.
func parseDiagMsg(b []byte) (_ listener, port uint16, ok bool) {
	if len(b) < diagMsgLen || b[1] != tcpListen {
		return listener{}, 0, false
	}
	ne := binary.NativeEndian
	// id: sport, dport (big endian), src[16], dst[16], if, cookie[2].
	port = binary.BigEndian.Uint16(b[4:])
	var s listener
	if b[0] == unix.AF_INET {
		s.addr = netip.AddrFrom4([4]byte(b[8:12]))
	} else {
		s.addr = netip.AddrFrom16([16]byte(b[8:24]))
	}
	s.bound = ne.Uint32(b[40:]) != 0
	s.queue = ne.Uint32(b[56:])
	s.backlog = ne.Uint32(b[60:])
	for a := b[diagMsgLen:]; len(a) >= unix.SizeofRtAttr; {
		l := int(ne.Uint16(a[0:]))
		if l < unix.SizeofRtAttr || l > len(a) {
			break
		}
		if ne.Uint16(a[2:]) == inetDiagV6Only && l > unix.SizeofRtAttr {
			s.v6only = a[unix.SizeofRtAttr] != 0
		}
		a = a[min((l+unix.RTA_ALIGNTO-1)&^(unix.RTA_ALIGNTO-1), len(a)):]
	}
	return s, port, true
}

// verdict is what a TCP probe does with Listeners: the table's answer where
// it has one, a connect otherwise.
func (l *Listeners) verdict(ctx context.Context, addr string) error {
	if err := l.check(addr); !errors.Is(err, errNoVerdict) {
		return err
	}
	return dialCheck(ctx, "tcp", addr)
}
