package handoff

import (
	"fmt"
	"os"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// rawFD returns f's descriptor without the side effect of (*os.File).Fd,
// which switches descriptors made by the net package to blocking mode. The
// O_NONBLOCK flag lives in the open file description that the store, the
// sidecar and every other holder share, so flipping it here could stall a
// running sidecar's accept loop. The caller keeps f alive while using the
// number (runtime.KeepAlive).
func rawFD(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("fd %s: %w", f.Name(), err)
	}
	fd := -1
	if err := rc.Control(func(u uintptr) { fd = int(u) }); err != nil {
		return -1, fmt.Errorf("fd %s: %w", f.Name(), err)
	}
	return fd, nil
}

// dupFile returns a new close-on-exec duplicate of f named name. The
// duplicate shares f's open file description (and so its socket).
func dupFile(f *os.File, name string) (*os.File, error) {
	fd, err := rawFD(f)
	if err != nil {
		return nil, err
	}
	defer runtime.KeepAlive(f)
	nfd, err := dupFD(fd)
	if err != nil {
		return nil, fmt.Errorf("fd %s: %w", f.Name(), err)
	}
	return os.NewFile(uintptr(nfd), name), nil
}

// dupFD returns a close-on-exec duplicate of fd as a raw descriptor.
//
// The store keeps raw descriptors rather than *os.File: os.NewFile
// registers a non-blocking descriptor with the Go netpoller, and a held
// listening socket would then wake meshagent's poller on every connection
// the sidecar receives. Files are made only for hand-outs, which live for
// the duration of one start or hand-over.
func dupFD(fd int) (int, error) {
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("dup fd %d: %w", fd, err)
	}
	return nfd, nil
}

// dupConnFD duplicates the socket behind a net.Listener or net.Conn as a
// raw descriptor, without going through its File method (which would make
// the shared description blocking, see rawFD).
func dupConnFD(sc syscall.Conn) (int, error) {
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1, err
	}
	nfd, derr := -1, error(nil)
	if err := rc.Control(func(u uintptr) { nfd, derr = dupFD(int(u)) }); err != nil {
		return -1, err
	}
	return nfd, derr
}

// dupConn is dupConnFD returning a named file.
func dupConn(sc syscall.Conn, name string) (*os.File, error) {
	nfd, err := dupConnFD(sc)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return os.NewFile(uintptr(nfd), name), nil
}

// identity names the socket (or file) behind an fd: two fds with the same
// identity share one open file or socket, so storing both would hold the
// same listener twice.
type identity struct{ dev, ino uint64 }

func fileIdentity(f *os.File) (identity, error) {
	fd, err := rawFD(f)
	if err != nil {
		return identity{}, err
	}
	defer runtime.KeepAlive(f)
	id, err := fdIdentity(fd)
	if err != nil {
		return identity{}, fmt.Errorf("fd %s: %w", f.Name(), err)
	}
	return id, nil
}

func fdIdentity(fd int) (identity, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return identity{}, fmt.Errorf("fstat fd %d: %w", fd, err)
	}
	return identity{dev: uint64(st.Dev), ino: st.Ino}, nil
}

// isListening reports whether f is a socket in the listening state.
func isListening(f *os.File) (bool, error) {
	fd, err := rawFD(f)
	if err != nil {
		return false, err
	}
	defer runtime.KeepAlive(f)
	return fdListening(fd)
}

func fdListening(fd int) (bool, error) {
	v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	if err != nil {
		if err == unix.ENOTSOCK {
			return false, nil
		}
		return false, fmt.Errorf("fd %d: SO_ACCEPTCONN: %w", fd, err)
	}
	return v == 1, nil
}
