package handoff

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// EnvNotifySocket is the sd_notify(3) environment variable.
const EnvNotifySocket = "NOTIFY_SOCKET"

// notifyMaxData is systemd's NOTIFY_BUFFER_MAX (PIPE_BUF).
const notifyMaxData = 4096

// defaultFDName is the name systemd gives stored fds without FDNAME.
const defaultFDName = "stored"

// ErrNoNotifySocket is returned by Notify when NOTIFY_SOCKET is unset.
var ErrNoNotifySocket = errors.New("NOTIFY_SOCKET not set")

// Notify is a store's notify socket: a datagram socket speaking sd_notify,
// so a sidecar written for systemd's fd store works unchanged. It accepts
// FDSTORE=1 (with FDNAME= and the fds) and FDSTOREREMOVE=1 (with FDNAME=),
// and passes other lines to Options.OnNotify. Every datagram carries the
// sender's kernel-verified credentials (SO_PASSCRED); a sender that
// Options.Authorize refuses has its fds closed and its message dropped.
type Notify struct {
	s    *Store
	conn *net.UnixConn
	path string
	id   identity

	closeOnce sync.Once
}

// ListenNotify binds the store's notify socket at path (mode 0600) inside
// an owner-only (0700) directory, which it creates. The socket exists when
// ListenNotify returns, so the sidecar can be started with Env right away.
func (s *Store) ListenNotify(path string) (*Notify, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("%s: notify socket %q: path must be absolute", s.name, path)
	}
	if err := prepareDir(filepath.Dir(path), s.opts.SidecarUser); err != nil {
		return nil, fmt.Errorf("%s: notify socket: %w", s.name, err)
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, fmt.Errorf("%s: notify socket: %w", s.name, err)
	}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("%s: notify socket %s: %w", s.name, path, err)
	}
	n := &Notify{s: s, conn: conn, path: path}
	fail := func(err error) (*Notify, error) {
		conn.Close()
		os.Remove(path)
		return nil, fmt.Errorf("%s: notify socket %s: %w", s.name, path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		return fail(err)
	}
	if err := s.opts.SidecarUser.chown(path); err != nil {
		return fail(err)
	}
	id, ok := pathIdentity(path)
	if !ok {
		return fail(errors.New("socket file vanished"))
	}
	n.id = id
	rc, err := conn.SyscallConn()
	if err != nil {
		return fail(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
	}); err != nil {
		return fail(err)
	}
	if serr != nil {
		return fail(fmt.Errorf("SO_PASSCRED: %w", serr))
	}
	return n, nil
}

// Path returns the socket's path.
func (n *Notify) Path() string { return n.path }

// Env returns the NOTIFY_SOCKET=path entry for the sidecar's environment.
func (n *Notify) Env() string { return EnvNotifySocket + "=" + n.path }

// Serve handles datagrams until ctx ends, then returns nil. It returns an
// error only if the socket fails. Close the Notify after Serve returns.
func (n *Notify) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() {
		// Wake the blocked read; the loop then sees ctx is done.
		n.conn.SetReadDeadline(time.Unix(1, 0))
	})
	defer stop()
	for {
		err := n.receive()
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("%s: notify socket %s: %w", n.s.name, n.path, err)
		}
	}
}

// receive handles one datagram. Only socket errors are returned; a bad or
// refused message is logged and dropped with its fds closed.
func (n *Notify) receive() error {
	data, fds, cred, err := recvMsg(n.conn, notifyMaxData, n.s.opts.maxFiles())
	if err != nil {
		if errors.Is(err, ErrTruncated) || errors.Is(err, ErrMalformed) || errors.Is(err, ErrTooManyFiles) {
			n.s.log.Warn("notify message rejected", "socket", n.path, "reason", err)
			return nil
		}
		return err
	}
	if err := n.handle(data, fds, cred); err != nil {
		closeFDs(fds)
		attrs := []any{"socket", n.path, "reason", err, "fds_closed", len(fds)}
		if cred != nil {
			attrs = append(attrs, "pid", cred.Pid, "uid", cred.Uid)
		}
		n.s.log.Warn("notify message rejected", attrs...)
	}
	return nil
}

// handle applies one message. On error the caller closes fds; on success
// handle has taken care of every fd.
func (n *Notify) handle(data []byte, fds []int, cred *unix.Ucred) error {
	if cred == nil {
		return errors.New("no sender credentials")
	}
	if err := n.s.opts.authorize(cred.Pid, cred.Uid); err != nil {
		return fmt.Errorf("%w: pid %d uid %d: %w", ErrUnauthorized, cred.Pid, cred.Uid, err)
	}
	msg, err := parseNotify(data)
	if err != nil {
		return err
	}
	if len(fds) > 0 && !msg.store {
		return fmt.Errorf("%w: %d fds without FDSTORE=1", ErrMalformed, len(fds))
	}
	if msg.store {
		files := filesFromFDs(fds, repeat(msg.name, len(fds)))
		var errs []error
		for _, f := range files {
			// The store keeps its own duplicate; the received copy
			// is closed whatever Add decided.
			if _, err := n.s.Add(msg.name, f); err != nil {
				errs = append(errs, err)
			}
			f.Close()
		}
		if err := errors.Join(errs...); err != nil {
			n.s.log.Warn("notify FDSTORE failed", "socket", n.path, "pid", cred.Pid, "name", msg.name, "reason", err)
		}
	}
	if msg.remove {
		if _, err := n.s.Remove(msg.name); err != nil {
			n.s.log.Warn("notify FDSTOREREMOVE failed", "socket", n.path, "pid", cred.Pid, "name", msg.name, "reason", err)
		}
	}
	if len(msg.other) > 0 && n.s.opts.OnNotify != nil {
		n.s.opts.OnNotify(cred.Pid, msg.other)
	}
	return nil
}

// Close closes the socket and removes its file (if it is still ours). It
// does not touch the store.
func (n *Notify) Close() error {
	var err error
	n.closeOnce.Do(func() {
		err = n.conn.Close()
		removeIfOurs(n.path, n.id)
	})
	return err
}

func repeat(s string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = s
	}
	return out
}

// notifyMsg is a parsed sd_notify datagram.
type notifyMsg struct {
	store  bool     // FDSTORE=1
	remove bool     // FDSTOREREMOVE=1
	name   string   // FDNAME, or "stored"
	other  []string // every other non-empty line, in order
}

// parseNotify parses an sd_notify datagram: newline-separated KEY=VALUE
// lines. It never panics (see FuzzParseNotify).
func parseNotify(data []byte) (notifyMsg, error) {
	var m notifyMsg
	if i := bytes.IndexByte(data, 0); i >= 0 {
		return m, fmt.Errorf("%w: NUL byte at offset %d", ErrMalformed, i)
	}
	named := false
	for i, line := range strings.Split(string(data), "\n") {
		if line == "" {
			continue
		}
		key, val, _ := strings.Cut(line, "=")
		switch key {
		case "FDSTORE", "FDSTOREREMOVE":
			if val != "1" {
				return m, fmt.Errorf("%w: line %d: %s=%q, only 1 is meaningful", ErrMalformed, i+1, key, val)
			}
			if key == "FDSTORE" {
				m.store = true
			} else {
				m.remove = true
			}
		case "FDNAME":
			if named {
				return m, fmt.Errorf("%w: line %d: FDNAME given twice", ErrMalformed, i+1)
			}
			if err := ValidName(val); err != nil {
				return m, fmt.Errorf("%w: line %d: FDNAME: %w", ErrMalformed, i+1, err)
			}
			m.name, named = val, true
		case "FDPOLL":
			// Only meaningful for systemd's own polling of stored fds.
		default:
			m.other = append(m.other, line)
		}
	}
	if m.store && m.remove {
		return m, fmt.Errorf("%w: FDSTORE=1 and FDSTOREREMOVE=1 in one message", ErrMalformed)
	}
	if m.remove && !named {
		return m, fmt.Errorf("%w: FDSTOREREMOVE=1 without FDNAME", ErrMalformed)
	}
	if !named {
		m.name = defaultFDName
	}
	return m, nil
}

// SdNotify sends an sd_notify message (state, e.g. "READY=1" or
// "FDSTORE=1\nFDNAME=web") with files to the socket named by
// $NOTIFY_SOCKET, for sidecars and tests. files stay the caller's. It
// returns ErrNoNotifySocket when the variable is unset.
func SdNotify(state string, files ...*os.File) error {
	path := os.Getenv(EnvNotifySocket)
	if path == "" {
		return ErrNoNotifySocket
	}
	// An unconnected datagram socket and one sendmsg, as sd_notify does;
	// x/sys maps a leading '@' to the abstract namespace.
	sock, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("notify %s: socket: %w", path, err)
	}
	defer unix.Close(sock)
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			if fds[i], err = rawFD(f); err != nil {
				return fmt.Errorf("notify %s: %w", path, err)
			}
		}
		oob = unix.UnixRights(fds...)
	}
	err = unix.Sendmsg(sock, []byte(state), oob, &unix.SockaddrUnix{Name: path}, unix.MSG_NOSIGNAL)
	runtime.KeepAlive(files)
	if err != nil {
		return fmt.Errorf("notify %s: %w", path, err)
	}
	return nil
}
