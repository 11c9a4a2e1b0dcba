package cgroup

import (
	"bytes"
	"errors"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// knobFiles keeps the cgroup files that reconcile reads open between
// passes and re-reads them with pread at offset 0, which makes cgroupfs
// render the current value again. open+read+close of a cgroup file costs
// about 3µs (the path walk and kernfs open dominate), a pread about 0.35µs
// when hot and 2-3µs cold (a pass over 500 pods touches thousands of kernel
// objects): this is what keeps a pass over 500 pods inside its 20 ms budget.
// The price is about ten fds per pod; files not read during a Reconcile
// pass are closed at its end, Remove closes the files of removed groups,
// and when the process runs out of fds reads fall back to open/read/close.
//
// Reads of different files run in parallel (Reconcile spreads pods over
// workers): mu only guards the map; each entry has its own lock, held
// across every syscall on its fd and by whoever closes it, so a read can
// never reach an fd number that was closed and reused for another file.
type knobFiles struct {
	mu   sync.Mutex // guards gen, open and the entries' gen
	gen  uint64
	open map[string]*knobFD

	// kept counts the fds held open. Past keepBudget() reads open and
	// close their file as if there were no cache: the process's starts
	// (pipes, pidfds), sockets and held listeners must always find an fd,
	// whatever the limit a node gives the agent.
	kept   atomic.Int64
	budget int64 // 0: not computed yet; under mu
}

// keepBudget is half the soft fd limit (Go raises it to the hard limit at
// start-up): 500 pods fit under systemd's 1048576 or a 20000 limit, and
// under a stingy 4096 the other half is left for everything else.
func keepBudget() int64 {
	var r unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &r); err != nil || r.Cur == unix.RLIM_INFINITY {
		return 1 << 16
	}
	return max(int64(r.Cur/2), 16)
}

// mayKeep reports whether one more fd may be kept, counting it if so.
func (k *knobFiles) mayKeep() bool {
	k.mu.Lock()
	if k.budget == 0 {
		k.budget = keepBudget()
	}
	budget := k.budget
	k.mu.Unlock()
	if k.kept.Add(1) > budget {
		k.kept.Add(-1)
		return false
	}
	return true
}

type knobFD struct {
	gen  uint64        // the last pass that read it; under knobFiles.mu
	kept *atomic.Int64 // its knobFiles' count of kept fds

	mu sync.Mutex
	fd int // -1: not open (yet, or after an error)
	// gone: closed and dropped from the map; a reader holding it looks
	// the path up again rather than reopen an fd nobody would close.
	gone bool
}

// entry returns the entry of path, new and unopened if there is none.
func (k *knobFiles) entry(path string) *knobFD {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.open == nil {
		k.open = map[string]*knobFD{}
	}
	e := k.open[path]
	if e == nil {
		e = &knobFD{fd: -1, kept: &k.kept}
		k.open[path] = e
	}
	e.gen = k.gen
	return e
}

// lock returns the entry of path locked, and not gone.
func (k *knobFiles) lock(path string) *knobFD {
	for {
		e := k.entry(path)
		e.mu.Lock()
		if !e.gone {
			return e
		}
		e.mu.Unlock()
	}
}

// drop closes e, which the caller has removed from the map (under k.mu).
func (e *knobFD) drop() {
	e.mu.Lock()
	e.closeFD()
	e.gone = true
	e.mu.Unlock()
}

func (e *knobFD) closeFD() {
	if e.fd >= 0 {
		unix.Close(e.fd)
		e.fd = -1
		e.kept.Add(-1)
	}
}

// keep opens name into e, counted against the budget. It reports false,
// with no error, when the budget or the process's fds are used up: the
// caller then reads without keeping an fd.
func (k *knobFiles) keep(e *knobFD, name string, flags int) (bool, error) {
	if !k.mayKeep() {
		return false, nil
	}
	fd, err := unix.Open(name, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		k.kept.Add(-1)
		if errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) {
			return false, nil
		}
		return false, err
	}
	e.fd = fd
	return true, nil
}

// read returns the content of path, growing buf as needed.
func (k *knobFiles) read(path string, buf []byte) ([]byte, error) {
	e := k.lock(path)
	defer e.mu.Unlock()
	for attempt := 0; ; attempt++ {
		if e.fd < 0 {
			kept, err := k.keep(e, path, unix.O_RDONLY)
			if err != nil {
				return nil, &os.PathError{Op: "open", Path: path, Err: err}
			}
			if !kept {
				return os.ReadFile(path)
			}
		}
		b, err := preadAll(e.fd, buf)
		if err == nil {
			return b, nil
		}
		// ENODEV: the group was removed (and maybe re-created) since the
		// file was opened. ESRCH: the process of a /proc/PID file exited;
		// its pid may belong to a new process now. Reopen once by path.
		e.closeFD()
		if attempt > 0 || !errors.Is(err, unix.ENODEV) && !errors.Is(err, unix.ESRCH) {
			return nil, &os.PathError{Op: "read", Path: path, Err: err}
		}
	}
}

// readFresh reads path through a newly opened file, for files whose kept-open
// fd would serve stale content (v1 cgroup.procs). The directory stays open
// instead, so the open is a one-name lookup rather than a walk from the root.
func (k *knobFiles) readFresh(path string, buf []byte) ([]byte, error) {
	i := strings.LastIndexByte(path, '/')
	dir, name := path[:i], path[i+1:]
	e := k.lock(dir)
	defer e.mu.Unlock()
	for attempt := 0; ; attempt++ {
		fresh := e.fd < 0
		if fresh {
			kept, err := k.keep(e, dir, unix.O_PATH|unix.O_DIRECTORY)
			if err != nil {
				return nil, &os.PathError{Op: "open", Path: path, Err: err}
			}
			if !kept {
				return os.ReadFile(path)
			}
		}
		fd, err := unix.Openat(e.fd, name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err == nil {
			b, err := preadAll(fd, buf)
			unix.Close(fd)
			if err != nil {
				return nil, &os.PathError{Op: "read", Path: path, Err: err}
			}
			return b, nil
		}
		// The kept directory may be a group removed since (and maybe
		// re-created under the same name): look it up again once.
		e.closeFD()
		if fresh || attempt > 0 {
			return nil, &os.PathError{Op: "open", Path: path, Err: err}
		}
	}
}

// preadAll reads a seq_file from offset 0. seq_file fills the buffer with
// as many records as fit, so a read shorter than the space left is the end.
func preadAll(fd int, buf []byte) ([]byte, error) {
	n := 0
	for {
		if n == len(buf) {
			buf = append(buf, make([]byte, len(buf))...)
		}
		r, err := unix.Pread(fd, buf[n:], int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, err
		}
		n += r
		if r == 0 || n < len(buf) {
			return buf[:n], nil
		}
	}
}

// startPass begins a reconcile pass; endPass closes what it did not read.
func (k *knobFiles) startPass() {
	k.mu.Lock()
	k.gen++
	k.mu.Unlock()
}

func (k *knobFiles) endPass() {
	k.mu.Lock()
	defer k.mu.Unlock()
	for p, e := range k.open {
		if e.gen != k.gen {
			delete(k.open, p)
			e.drop()
		}
	}
}

// forget closes the files under dir.
func (k *knobFiles) forget(dir string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	prefix := dir + "/"
	for p, e := range k.open {
		if strings.HasPrefix(p, prefix) || p == dir {
			delete(k.open, p)
			e.drop()
		}
	}
}

func (k *knobFiles) closeAll() {
	k.forget("")
}

// readKnob reads one value through the cache: a knob file under the root, or
// a /proc/PID file. A kept /proc/PID fd is bound to its process, not to the
// number: once that process is gone it reads ESRCH, and read reopens the path,
// so a reused pid is never read through its predecessor's fd.
func (m *Manager) readKnob(path string) (string, error) {
	if !strings.HasPrefix(path, m.root+"/") && !strings.HasPrefix(path, "/proc/") {
		return readSmall(path)
	}
	var buf [256]byte
	b, err := m.files.read(path, buf[:])
	if err != nil {
		return "", err
	}
	return string(bytes.TrimSpace(b)), nil
}

// readOOMScoreAdj is ReadOOMScoreAdj through the kept fds.
func (m *Manager) readOOMScoreAdj(pid int) (int, error) {
	return readOOMScoreAdjWith(m.readKnob, pid)
}

// readProcs lists the pids of a cgroup.procs file; missing means empty.
// On v1 the file is opened afresh: the kernel keeps the pid list it built
// for an open file (and re-serves it to a pread at offset 0) until a second
// after the last read, so a cached fd would miss a process that joined
// since (found by the agent's plan right after a start).
func (m *Manager) readProcs(path string) ([]int, error) {
	var buf [512]byte
	var b []byte
	var err error
	if m.mode.v1() {
		b, err = m.files.readFresh(path, buf[:])
	} else {
		b, err = m.files.read(path, buf[:])
	}
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []int
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		line := b
		if i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		if len(line) == 0 {
			continue
		}
		pid, err := strconv.Atoi(string(line))
		if err != nil {
			return nil, &os.PathError{Op: "parse", Path: path, Err: errors.New("bad pid " + strconv.Quote(string(line)))}
		}
		out = append(out, pid)
	}
	return out, nil
}

// Close releases the files the Manager keeps open. The Manager remains
// usable; files are reopened as needed.
func (m *Manager) Close() error {
	m.files.closeAll()
	return nil
}
