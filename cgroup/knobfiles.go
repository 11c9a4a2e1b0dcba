package cgroup

import (
	"bytes"
	"errors"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// knobFiles keeps the cgroup files that reconcile reads open between
// passes and re-reads them with pread at offset 0, which makes cgroupfs
// render the current value again. open+read+close of a cgroup file costs
// about 3µs (the path walk and kernfs open dominate), a pread about 0.35µs:
// this is what keeps a pass over 500 pods well inside its 20 ms budget.
// The price is about ten fds per pod; files not read during a Reconcile
// pass are closed at its end, Remove closes the files of removed groups,
// and when the process runs out of fds reads fall back to open/read/close.
type knobFiles struct {
	mu   sync.Mutex
	gen  uint64
	open map[string]*knobFD
}

type knobFD struct {
	fd  int
	gen uint64
}

// read returns the content of path, growing buf as needed.
func (k *knobFiles) read(path string, buf []byte) ([]byte, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.open == nil {
		k.open = map[string]*knobFD{}
	}
	for attempt := 0; ; attempt++ {
		e := k.open[path]
		if e == nil {
			fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) {
				b, err := os.ReadFile(path)
				return b, err
			}
			if err != nil {
				return nil, &os.PathError{Op: "open", Path: path, Err: err}
			}
			e = &knobFD{fd: fd}
			k.open[path] = e
		}
		e.gen = k.gen
		b, err := preadAll(e.fd, buf)
		if err == nil {
			return b, nil
		}
		// ENODEV: the group was removed (and maybe re-created) since the
		// file was opened. Reopen once.
		unix.Close(e.fd)
		delete(k.open, path)
		if attempt > 0 || !errors.Is(err, unix.ENODEV) {
			return nil, &os.PathError{Op: "read", Path: path, Err: err}
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
			unix.Close(e.fd)
			delete(k.open, p)
		}
	}
}

// forget closes the files under dir.
func (k *knobFiles) forget(dir string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	prefix := dir + "/"
	for p, e := range k.open {
		if strings.HasPrefix(p, prefix) {
			unix.Close(e.fd)
			delete(k.open, p)
		}
	}
}

func (k *knobFiles) closeAll() {
	k.forget("")
}

// readKnob reads one value; files under the root go through the cache.
func (m *Manager) readKnob(path string) (string, error) {
	if !strings.HasPrefix(path, m.root+"/") {
		return readSmall(path)
	}
	var buf [256]byte
	b, err := m.files.read(path, buf[:])
	if err != nil {
		return "", err
	}
	return string(bytes.TrimSpace(b)), nil
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
		b, err = os.ReadFile(path)
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
