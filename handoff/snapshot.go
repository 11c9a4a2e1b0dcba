package handoff

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Reasons a snapshot cannot be taken. Callers fall back to restarting the
// sidecar without its sockets (or to another hand-off) on either.
var (
	// ErrSnapshotUnsupported: the kernel lacks pidfd_open or pidfd_getfd
	// (Linux < 5.6) or forbids them (seccomp).
	ErrSnapshotUnsupported = errors.New("snapshot unsupported: kernel lacks pidfd_open/pidfd_getfd (needs Linux 5.6)")
	// ErrSnapshotDenied: meshagent may not take the target's fds: it lacks
	// CAP_SYS_PTRACE over the process (ptrace access mode checks, Yama).
	ErrSnapshotDenied = errors.New("snapshot denied: needs CAP_SYS_PTRACE over the target process")
)

// sysOps holds the system calls whose failure modes depend on the kernel,
// so tests can exercise the ENOSYS path on kernels that have the calls.
type sysOps struct {
	pidfdOpen  func(pid, flags int) (int, error)
	pidfdGetfd func(pidfd, fd, flags int) (int, error)
}

var sys = sysOps{pidfdOpen: unix.PidfdOpen, pidfdGetfd: unix.PidfdGetfd}

// procRoot is where /proc is mounted.
const procRoot = "/proc"

// Snapshot takes duplicates of the listening TCP sockets of the running
// process pid (an unmodified sidecar) with pidfd_getfd and holds them,
// named by address (see AddrName). Sockets are found by matching the
// inodes behind /proc/PID/fd with the LISTEN rows of /proc/PID/net/tcp and
// tcp6 (the process's own network namespace). Sockets the store already
// holds are skipped. It returns the names added. Errors wrap
// ErrSnapshotUnsupported or ErrSnapshotDenied when the kernel or
// capabilities forbid it.
func (s *Store) Snapshot(ctx context.Context, pid int) ([]string, error) {
	files, err := snapshot(ctx, procRoot, pid)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.name, err)
	}
	defer closeFiles(files)
	var added []string
	for _, f := range files {
		ok, err := s.Add(f.Name(), f)
		if err != nil {
			return added, fmt.Errorf("%s: snapshot of pid %d: %w", s.name, pid, err)
		}
		if ok {
			added = append(added, f.Name())
		}
	}
	return added, nil
}

// snapshot returns duplicates of pid's listening TCP sockets; the caller
// owns them.
func snapshot(ctx context.Context, proc string, pid int) (files []*os.File, err error) {
	pidfd, err := sys.pidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("snapshot of pid %d: pidfd_open: %w", pid, snapshotErr(err))
	}
	defer unix.Close(pidfd)

	listening := map[uint64]bool{}
	for _, name := range []string{"tcp", "tcp6"} {
		path := filepath.Join(proc, strconv.Itoa(pid), "net", name)
		f, err := os.Open(path)
		if errors.Is(err, os.ErrNotExist) && name == "tcp6" {
			continue // kernel without IPv6
		}
		if err != nil {
			return nil, fmt.Errorf("snapshot of pid %d: %w", pid, snapshotErr(err))
		}
		inodes, err := parseListenInodes(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("snapshot of pid %d: %s: %w", pid, path, err)
		}
		for _, ino := range inodes {
			listening[ino] = true
		}
	}

	fddir := filepath.Join(proc, strconv.Itoa(pid), "fd")
	ents, err := os.ReadDir(fddir)
	if err != nil {
		return nil, fmt.Errorf("snapshot of pid %d: %w", pid, snapshotErr(err))
	}
	defer func() {
		if err != nil {
			closeFiles(files)
			files = nil
		}
	}()
	seen := map[uint64]bool{}
	for _, ent := range ents {
		if err := ctx.Err(); err != nil {
			return files, fmt.Errorf("snapshot of pid %d: %w", pid, err)
		}
		target, err := os.Readlink(filepath.Join(fddir, ent.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		ino, ok := socketInode(target)
		if !ok || !listening[ino] || seen[ino] {
			continue
		}
		tfd, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		nfd, err := sys.pidfdGetfd(pidfd, tfd, 0)
		if err != nil {
			if errors.Is(err, unix.EBADF) {
				continue // closed meanwhile
			}
			return files, fmt.Errorf("snapshot of pid %d: pidfd_getfd fd %d: %w", pid, tfd, snapshotErr(err))
		}
		// The fd number may have been reused between readlink and
		// pidfd_getfd: keep it only if it is still that listening socket.
		id, ierr := fdIdentity(nfd)
		lis, lerr := fdListening(nfd)
		if ierr != nil || lerr != nil || id.ino != ino || !lis {
			unix.Close(nfd)
			continue
		}
		seen[ino] = true
		files = append(files, os.NewFile(uintptr(nfd), addrName(nfd)))
	}
	return files, nil
}

// snapshotErr maps errno values to the snapshot sentinels.
func snapshotErr(err error) error {
	switch {
	case errors.Is(err, unix.ENOSYS):
		return fmt.Errorf("%w: %w", ErrSnapshotUnsupported, err)
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return fmt.Errorf("%w: %w", ErrSnapshotDenied, err)
	}
	return err
}

// socketInode parses a /proc/PID/fd link target "socket:[12345]".
func socketInode(target string) (uint64, bool) {
	s, ok := strings.CutPrefix(target, "socket:[")
	if !ok {
		return 0, false
	}
	s, ok = strings.CutSuffix(s, "]")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(s, 10, 64)
	return n, err == nil
}

// tcpListen is the "st" value of a listening socket in /proc/net/tcp.
const tcpListen = "0A"

// parseListenInodes reads /proc/PID/net/tcp or tcp6 and returns the inodes
// of sockets in the LISTEN state. Rows are:
//
//	sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
func parseListenInodes(r io.Reader) ([]uint64, error) {
	sc := bufio.NewScanner(r)
	var out []uint64
	line := 0
	for sc.Scan() {
		line++
		if line == 1 {
			continue // header
		}
		f := strings.Fields(sc.Text())
		if len(f) < 10 {
			return nil, fmt.Errorf("line %d: %d fields, want at least 10", line, len(f))
		}
		if f[3] != tcpListen {
			continue
		}
		ino, err := strconv.ParseUint(f[9], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("line %d: inode %q: %w", line, f[9], err)
		}
		if ino != 0 {
			out = append(out, ino)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return out, nil
}
