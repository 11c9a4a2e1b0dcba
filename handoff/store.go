package handoff

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// Errors the agent can branch on.
var (
	ErrExists = errors.New("fd name already held")
	ErrFull   = errors.New("fd store full")
	ErrClosed = errors.New("fd store closed")
	ErrBusy   = errors.New("a MOSN hand-over is already running for this store")
	// ErrReleased: the store was told to stop holding fds (Release) and
	// refuses new ones until Hold.
	ErrReleased = errors.New("fd store released: not holding fds")
)

// Options configure a Store and the hand-off protocols. The zero value is
// usable: it accepts peers running as meshagent's own uid (which the
// owner-only socket directories already restrict to) and logs to
// slog.Default. The agent sets Authorize to pin peers to one pod's sidecar.
type Options struct {
	// Authorize decides whether the process pid (running as uid) may plant
	// fds in the store or receive fds from it. It is asked for every
	// notify datagram and every hand-off connection; an error refuses the
	// peer and is logged as the reason. The agent typically checks that
	// pid is in the sidecar's cgroup or process tree (see ProcessTree).
	Authorize func(pid int32, uid uint32) error
	// OnNotify receives the sd_notify lines other than the fd-store ones
	// (READY=1, STATUS=..., WATCHDOG=1, ...) from authorized senders, in
	// the order they came, one call per datagram. It runs on the notify
	// socket's goroutine: it must not block for long.
	OnNotify func(pid int32, lines []string)
	// Logger receives refusals and malformed messages. Default slog.Default().
	Logger *slog.Logger
	// SidecarUser, when set, is the user a sidecar runs as if that is not
	// meshagent's own: socket directories and sockets are given to it
	// (still owner-only) so that it can reach them. Authorize should then
	// check that uid too.
	SidecarUser *User
	// MaxFiles bounds the number of fds the store holds; at most MaxFiles
	// (100, MOSN's per-hand-over limit), which is also the default.
	MaxFiles int
	// OnChange, when set, is called with the number of held fds after
	// every change (Listen, Add, FDSTORE, Remove, Release, Close), outside
	// the store's lock: the agent's held-fds gauge.
	OnChange func(held int)
}

func (o Options) authorize(pid int32, uid uint32) error {
	if o.Authorize != nil {
		return o.Authorize(pid, uid)
	}
	if int(uid) != os.Getuid() {
		return fmt.Errorf("uid %d is not meshagent's uid %d", uid, os.Getuid())
	}
	return nil
}

func (o Options) logger() *slog.Logger {
	if o.Logger != nil {
		return o.Logger
	}
	return slog.Default()
}

func (o Options) maxFiles() int {
	if o.MaxFiles <= 0 || o.MaxFiles > MaxFiles {
		return MaxFiles
	}
	return o.MaxFiles
}

// Store holds duplicates of one sidecar's listening sockets, in order, by
// name. It owns every fd it holds: an fd leaves the store only by Remove or
// Close, which close it. Everything it hands out (Activation, hand-overs) is
// a further duplicate or a kernel copy, so no caller can close the store's
// fds. A Store is safe for concurrent use.
type Store struct {
	name string // "pod/sidecar", for errors and logs
	opts Options
	log  *slog.Logger

	mu          sync.Mutex
	entries     []entry
	closed      bool
	released    bool // Release: refuse fds until Hold
	handingOver bool // one HandOverMOSN at a time: both would bind reconfig.sock
}

type entry struct {
	name string
	fd   int // raw on purpose, see dupFD
	id   identity
	spec string // for agent-opened listeners: the spec; else ""
	path string // for agent-opened unix listeners: the path to unlink on Remove
}

// New returns an empty store for the sidecar named name (used in errors and
// logs, e.g. "pod-a/mosn").
func New(name string, opts Options) *Store {
	return &Store{name: name, opts: opts, log: opts.logger().With("fdstore", name)}
}

// Listen opens the listener described by spec (see ParseSpec) and holds it
// as name, like a systemd socket unit: from now on connections queue in the
// kernel whether or not a sidecar is running. Listening again with the same
// name and spec is a no-op, so the agent can call it on every start.
func (s *Store) Listen(ctx context.Context, name, spec string) error {
	if err := ValidName(name); err != nil {
		return fmt.Errorf("%s: listener %q: %w", s.name, name, err)
	}
	sp, err := ParseSpec(spec)
	if err != nil {
		return fmt.Errorf("%s: listener %q: %w", s.name, name, err)
	}
	s.mu.Lock()
	defer s.changed()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("%s: %w", s.name, ErrClosed)
	}
	if s.released {
		return fmt.Errorf("%s: listener %q: %w", s.name, name, ErrReleased)
	}
	for _, e := range s.entries {
		if e.name == name {
			if e.spec == sp.String() {
				return nil
			}
			return fmt.Errorf("%s: listener %q: %w", s.name, name, ErrExists)
		}
	}
	if len(s.entries) >= s.opts.maxFiles() {
		return fmt.Errorf("%s: listener %q: %w (%d fds)", s.name, name, ErrFull, len(s.entries))
	}
	fd, err := sp.open(ctx)
	if err != nil {
		return fmt.Errorf("%s: listener %q: %w", s.name, name, err)
	}
	id, err := fdIdentity(fd)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("%s: listener %q: %w", s.name, name, err)
	}
	e := entry{name: name, fd: fd, id: id, spec: sp.String()}
	if sp.Network == "unix" {
		e.path = sp.Address
	}
	s.entries = append(s.entries, e)
	return nil
}

func (s *Store) checkAddLocked(name string) error {
	if s.closed {
		return fmt.Errorf("%s: %w", s.name, ErrClosed)
	}
	if s.released {
		return fmt.Errorf("%s: %q: %w", s.name, name, ErrReleased)
	}
	for _, e := range s.entries {
		if e.name == name && e.spec != "" {
			return fmt.Errorf("%s: %q: %w (agent-opened %s)", s.name, name, ErrExists, e.spec)
		}
	}
	if len(s.entries) >= s.opts.maxFiles() {
		return fmt.Errorf("%s: %q: %w (%d fds)", s.name, name, ErrFull, len(s.entries))
	}
	return nil
}

// Add holds a duplicate of f under name; f stays the caller's. As with
// systemd's FDSTORE, several fds may share a name, and storing a socket the
// store already holds (the same open socket, under any fd number) is a
// no-op, so a sidecar may store its listeners again after every restart.
// Add reports whether a new fd was stored.
func (s *Store) Add(name string, f *os.File) (bool, error) {
	if err := ValidName(name); err != nil {
		return false, fmt.Errorf("%s: store fd: %w", s.name, err)
	}
	id, err := fileIdentity(f)
	if err != nil {
		return false, fmt.Errorf("%s: store fd %q: %w", s.name, name, err)
	}
	s.mu.Lock()
	defer s.changed()
	defer s.mu.Unlock()
	for _, e := range s.entries {
		if e.id == id {
			return false, nil
		}
	}
	if err := s.checkAddLocked(name); err != nil {
		return false, err
	}
	fd, err := rawFD(f)
	if err != nil {
		return false, fmt.Errorf("%s: store fd %q: %w", s.name, name, err)
	}
	d, err := dupFD(fd)
	runtime.KeepAlive(f)
	if err != nil {
		return false, fmt.Errorf("%s: store fd %q: %w", s.name, name, err)
	}
	s.entries = append(s.entries, entry{name: name, fd: d, id: id})
	return true, nil
}

// Remove closes and forgets every fd held under name (FDSTOREREMOVE). Once
// the sidecar has closed its copies too, the port is free again. An
// agent-opened unix listener's socket file is removed. It returns how many
// fds were removed.
func (s *Store) Remove(name string) (int, error) {
	s.mu.Lock()
	defer s.changed()
	defer s.mu.Unlock()
	if s.closed {
		return 0, fmt.Errorf("%s: %w", s.name, ErrClosed)
	}
	var errs []error
	kept := s.entries[:0]
	n := 0
	for _, e := range s.entries {
		if e.name != name {
			kept = append(kept, e)
			continue
		}
		n++
		errs = append(errs, e.close())
	}
	clear(s.entries[len(kept):])
	s.entries = kept
	if err := errors.Join(errs...); err != nil {
		return n, fmt.Errorf("%s: remove %q: %w", s.name, name, err)
	}
	return n, nil
}

func (e entry) close() error {
	err := unix.Close(e.fd)
	if e.path != "" {
		if rerr := os.Remove(e.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
	}
	return err
}

// Names returns the names of the held fds in order (LISTEN_FDNAMES order).
func (s *Store) Names() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, len(s.entries))
	for i, e := range s.entries {
		out[i] = e.name
	}
	return out
}

// Len returns the number of held fds.
func (s *Store) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.entries)
}

// Activation returns fresh duplicates of every held fd, for one start of
// the sidecar. The caller owns the result and closes it after the start.
func (s *Store) Activation() (*Activation, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, fmt.Errorf("%s: %w", s.name, ErrClosed)
	}
	a := &Activation{}
	for _, e := range s.entries {
		d, err := dupFD(e.fd)
		if err != nil {
			a.Close()
			return nil, fmt.Errorf("%s: activation: %q: %w", s.name, e.name, err)
		}
		a.Files = append(a.Files, os.NewFile(uintptr(d), e.name))
		a.Names = append(a.Names, e.name)
	}
	return a, nil
}

// Close closes every held fd; the ports are released once no sidecar holds
// them either. Further use returns ErrClosed.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	defer s.changed()
	defer s.mu.Unlock()
	s.closed = true
	var errs []error
	for _, e := range s.entries {
		errs = append(errs, e.close())
	}
	s.entries = nil
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%s: close: %w", s.name, err)
	}
	return nil
}
