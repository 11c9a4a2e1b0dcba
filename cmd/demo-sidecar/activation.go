package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// listenFDsStart is the first fd systemd's socket-passing convention uses:
// 0, 1 and 2 are stdio, the passed sockets follow in order.
const listenFDsStart = 3

// maxListenFDs bounds LISTEN_FDS so a garbage value cannot make us walk the
// whole fd table.
const maxListenFDs = 1024

// passedFD is one fd handed to us under the LISTEN_FDS convention.
type passedFD struct {
	fd   int
	name string
}

// parseListenEnv reads the systemd socket-activation variables the way
// sd_listen_fds_with_names does: LISTEN_PID must be set and name this
// process (otherwise the fds were meant for someone else, e.g. a parent
// shell, and there are none for us); LISTEN_FDS counts the fds from 3;
// LISTEN_FDNAMES, if set, names each of them, colon-separated. It is pure so
// the rules are table-tested.
func parseListenEnv(getenv func(string) string, pid int) ([]passedFD, error) {
	pidStr := getenv("LISTEN_PID")
	if pidStr == "" {
		return nil, nil
	}
	p, err := strconv.Atoi(pidStr)
	if err != nil || p <= 0 {
		return nil, fmt.Errorf("LISTEN_PID=%q: not a process id", pidStr)
	}
	if p != pid {
		return nil, nil
	}
	nStr := getenv("LISTEN_FDS")
	if nStr == "" {
		return nil, errors.New("LISTEN_PID names this process but LISTEN_FDS is not set")
	}
	n, err := strconv.Atoi(nStr)
	if err != nil || n < 0 {
		return nil, fmt.Errorf("LISTEN_FDS=%q: not a count of fds", nStr)
	}
	if n > maxListenFDs {
		return nil, fmt.Errorf("LISTEN_FDS=%d: more than %d fds", n, maxListenFDs)
	}
	if n == 0 {
		return nil, nil
	}
	names := make([]string, n)
	for i := range names {
		names[i] = "unknown" // systemd's name for an unnamed fd
	}
	if raw := getenv("LISTEN_FDNAMES"); raw != "" {
		got := strings.Split(raw, ":")
		if len(got) != n {
			return nil, fmt.Errorf("LISTEN_FDNAMES=%q: %d names for LISTEN_FDS=%d", raw, len(got), n)
		}
		for i, name := range got {
			if name == "" {
				return nil, fmt.Errorf("LISTEN_FDNAMES=%q: name %d is empty", raw, i)
			}
			names[i] = name
		}
	}
	fds := make([]passedFD, n)
	for i := range fds {
		fds[i] = passedFD{fd: listenFDsStart + i, name: names[i]}
	}
	return fds, nil
}

// activated holds the listeners taken over from LISTEN_FDS.
type activated struct {
	listen net.Listener // the fd named "listen", else the first not named "admin"
	admin  net.Listener // the fd named "admin", if any
}

// takeListeners turns the passed fds into listeners. Every passed fd is ours
// from here on: the ones used become listeners (net.FileListener dups them,
// so the originals are closed), the others are closed with a log line, and on
// error everything taken so far is closed. The LISTEN_* variables are unset
// so a child we might start does not believe the fds are its own.
func takeListeners(fds []passedFD, logf func(msg string, args ...any)) (_ activated, err error) {
	var a activated
	defer func() {
		if err != nil {
			if a.listen != nil {
				a.listen.Close()
			}
			if a.admin != nil {
				a.admin.Close()
			}
		}
	}()
	for _, v := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		os.Unsetenv(v)
	}
	listenIdx := -1
	for i, p := range fds {
		if p.name == "listen" {
			listenIdx = i
			break
		}
	}
	if listenIdx < 0 {
		for i, p := range fds {
			if p.name != "admin" {
				listenIdx = i
				break
			}
		}
	}
	var firstErr error
	for i, p := range fds {
		// Never let a passed fd leak into a process we exec.
		unix.CloseOnExec(p.fd)
		f := os.NewFile(uintptr(p.fd), "LISTEN_FDS:"+p.name)
		var target *net.Listener
		switch {
		case i == listenIdx:
			target = &a.listen
		case p.name == "admin" && a.admin == nil:
			target = &a.admin
		}
		if target == nil || firstErr != nil {
			if target == nil {
				logf("closing passed fd we have no use for", "fd", p.fd, "name", p.name)
			}
			f.Close()
			continue
		}
		ln, err := net.FileListener(f)
		f.Close()
		if err != nil {
			firstErr = fmt.Errorf("passed fd %d (name %q): not a listening socket: %w", p.fd, p.name, err)
			continue
		}
		*target = ln
	}
	if firstErr != nil {
		return a, firstErr
	}
	return a, nil
}
