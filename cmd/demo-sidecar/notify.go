package main

import (
	"fmt"
	"net"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// notifier speaks sd_notify: one datagram per message to the unixgram socket
// named by NOTIFY_SOCKET, with fds attached as SCM_RIGHTS. A name starting
// with '@' is in the abstract namespace (x/sys turns the '@' into the leading
// NUL byte).
type notifier struct {
	addr *unix.SockaddrUnix
}

func newNotifier(path string) (*notifier, error) {
	if path == "" {
		return nil, nil
	}
	if !strings.HasPrefix(path, "/") && !strings.HasPrefix(path, "@") {
		return nil, fmt.Errorf("NOTIFY_SOCKET=%q: want an absolute path or an @abstract name", path)
	}
	return &notifier{addr: &unix.SockaddrUnix{Name: path}}, nil
}

// send sends one message with fds attached. The fds stay ours: the kernel
// installs new copies in the receiver.
func (n *notifier) send(state string, fds ...int) error {
	s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("notify socket %s: %w", n.addr.Name, err)
	}
	defer unix.Close(s)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if err := unix.Sendmsg(s, []byte(state), oob, n.addr, 0); err != nil {
		return fmt.Errorf("notify socket %s: send %q: %w", n.addr.Name, strings.ReplaceAll(state, "\n", `\n`), err)
	}
	return nil
}

// storeListener hands a duplicate of ln's socket to the fd store behind
// NOTIFY_SOCKET under name, so the supervisor can give it back to our next
// start and connections queue in the kernel instead of being refused while
// we are down.
func (n *notifier) storeListener(ln net.Listener, name string) error {
	sc, ok := ln.(syscall.Conn)
	if !ok {
		return fmt.Errorf("fd store %s: listener %s (%T) has no fd", name, ln.Addr(), ln)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return fmt.Errorf("fd store %s: listener %s: %w", name, ln.Addr(), err)
	}
	var sendErr error
	err = raw.Control(func(fd uintptr) {
		sendErr = n.send("FDSTORE=1\nFDNAME="+name, int(fd))
	})
	if err != nil {
		return fmt.Errorf("fd store %s: listener %s: %w", name, ln.Addr(), err)
	}
	return sendErr
}
