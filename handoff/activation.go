package handoff

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The systemd socket-activation environment (sd_listen_fds(3)).
const (
	EnvListenFDs     = "LISTEN_FDS"
	EnvListenFDNames = "LISTEN_FDNAMES"
	EnvListenPID     = "LISTEN_PID"
	// listenFDsStart is SD_LISTEN_FDS_START: passed fds start at 3.
	listenFDsStart = 3
)

// ErrNoActivation is returned by Inherit when the environment passes no fds
// to this process (LISTEN_FDS unset, or LISTEN_PID names another process).
var ErrNoActivation = errors.New("no fds passed: LISTEN_FDS unset or LISTEN_PID is another process")

// Activation is a set of duplicated fds to pass to one start of a sidecar.
// It owns its Files: close it (Close) once the child has started, whether
// or not the start succeeded; the Store keeps its own copies.
type Activation struct {
	// Files go to exec.Cmd.ExtraFiles as they are: Files[i] becomes fd 3+i
	// in the child.
	Files []*os.File
	// Names[i] is the name of Files[i] (LISTEN_FDNAMES).
	Names []string
}

// Env returns LISTEN_FDS and LISTEN_FDNAMES for the child's environment.
// LISTEN_PID cannot be known before the child exists; the exec shim sets it
// with WithListenPID just before it execs the sidecar.
func (a *Activation) Env() []string {
	if len(a.Files) == 0 {
		return nil
	}
	return []string{
		EnvListenFDs + "=" + strconv.Itoa(len(a.Files)),
		EnvListenFDNames + "=" + strings.Join(a.Names, ":"),
	}
}

// Close closes the activation's duplicates (not the Store's).
func (a *Activation) Close() error {
	err := closeFiles(a.Files)
	a.Files, a.Names = nil, nil
	return err
}

// WithListenPID returns env with LISTEN_PID set to the calling process's pid
// when env has LISTEN_FDS (and unchanged otherwise). An exec shim calls it
// right before syscall.Exec: exec keeps the pid, so the sidecar finds
// LISTEN_PID equal to its own pid as sd_listen_fds requires.
func WithListenPID(env []string) []string {
	has := false
	out := make([]string, 0, len(env)+1)
	for _, kv := range env {
		if strings.HasPrefix(kv, EnvListenPID+"=") {
			continue
		}
		if strings.HasPrefix(kv, EnvListenFDs+"=") {
			has = true
		}
		out = append(out, kv)
	}
	if !has {
		return env
	}
	return append(out, EnvListenPID+"="+strconv.Itoa(os.Getpid()))
}

// maxInherit bounds LISTEN_FDS so a corrupt environment cannot make Inherit
// walk the whole fd table.
const maxInherit = 1024

// Inherit takes the fds passed to this process by the systemd convention
// (by meshagent, systemd, or anything else that speaks it). It checks
// LISTEN_PID, marks the fds close-on-exec so they do not leak into this
// process's own children, unsets the three variables, and returns the fds
// as files named from LISTEN_FDNAMES ("unknown" where no names were given,
// as systemd does). The caller owns the files.
func Inherit() ([]*os.File, error) {
	pidS, fdsS := os.Getenv(EnvListenPID), os.Getenv(EnvListenFDs)
	if fdsS == "" {
		return nil, ErrNoActivation
	}
	if pid, err := strconv.Atoi(pidS); err != nil || pid != os.Getpid() {
		return nil, fmt.Errorf("%w (%s=%q, our pid %d)", ErrNoActivation, EnvListenPID, pidS, os.Getpid())
	}
	n, err := strconv.Atoi(fdsS)
	if err != nil || n < 0 || n > maxInherit {
		return nil, fmt.Errorf("%s=%q: want a count from 0 to %d", EnvListenFDs, fdsS, maxInherit)
	}
	names := make([]string, n)
	for i := range names {
		names[i] = "unknown"
	}
	if v := os.Getenv(EnvListenFDNames); v != "" {
		given := strings.Split(v, ":")
		if len(given) != n {
			return nil, fmt.Errorf("%s has %d names but %s=%d", EnvListenFDNames, len(given), EnvListenFDs, n)
		}
		copy(names, given)
	}
	for i := 0; i < n; i++ {
		fd := listenFDsStart + i
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			return nil, fmt.Errorf("fd %d (%s) from %s=%d: %w", fd, names[i], EnvListenFDs, n, err)
		}
	}
	files := make([]*os.File, n)
	for i := range files {
		fd := listenFDsStart + i
		unix.CloseOnExec(fd)
		files[i] = os.NewFile(uintptr(fd), names[i])
	}
	os.Unsetenv(EnvListenPID)
	os.Unsetenv(EnvListenFDs)
	os.Unsetenv(EnvListenFDNames)
	return files, nil
}

// InheritListeners is Inherit for the common case: every passed fd is a
// listening socket and names are unique. It returns the listeners by name
// and closes the inherited fds (the listeners hold their own duplicates).
// On error nothing stays open.
func InheritListeners() (map[string]net.Listener, error) {
	files, err := Inherit()
	if err != nil {
		return nil, err
	}
	defer closeFiles(files)
	return Listeners(files)
}

// Listeners turns files that hold listening sockets into net.Listeners keyed
// by file name. The files stay the caller's (net.FileListener duplicates).
// On error every listener made so far is closed.
func Listeners(files []*os.File) (map[string]net.Listener, error) {
	out := make(map[string]net.Listener, len(files))
	fail := func(err error) (map[string]net.Listener, error) {
		for _, l := range out {
			l.Close()
		}
		return nil, err
	}
	for _, f := range files {
		if _, dup := out[f.Name()]; dup {
			return fail(fmt.Errorf("fd name %q passed twice", f.Name()))
		}
		// net.FileListener accepts any stream socket; a connected or
		// unbound one would only fail later in Accept, so check now.
		if ok, err := isListening(f); err != nil || !ok {
			if err == nil {
				err = errors.New("not a listening socket")
			}
			return fail(fmt.Errorf("fd %s: %w", f.Name(), err))
		}
		l, err := net.FileListener(f)
		if err != nil {
			return fail(fmt.Errorf("fd %s: %w", f.Name(), err))
		}
		out[f.Name()] = l
	}
	return out, nil
}
