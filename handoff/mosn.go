package handoff

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// MOSN's smooth-upgrade protocol, as MOSN implements it (both sides live in
// its uds_dir):
//
//  1. The old process listens on reconfig.sock. The new one dials it; the
//     old one writes one byte (0x00), which the new one reads.
//  2. The new process listens on listen.sock and accepts with a 10 s
//     deadline. The old one dials it and sends one message: the byte 0x00
//     with every listener fd in a single SCM_RIGHTS message (at most 100).
//  3. The new process rebuilds its listeners from the fds (matching them to
//     its configuration by address) and, once its servers run, writes one
//     byte on that connection. The old process answers with one byte
//     within 3 s, or the new one exits with status 2.
//
// Any connection to reconfig.sock starts an upgrade in a running MOSN, so
// nothing here ever probes it: only callers who know a hand-over is wanted
// dial it.
const (
	MOSNReconfigSocket = "reconfig.sock"
	MOSNListenSocket   = "listen.sock"

	// mosnAcceptTimeout is the new side's accept deadline on listen.sock.
	mosnAcceptTimeout = 10 * time.Second
	// mosnAckTimeout is how long the new side waits for the old side's
	// answer to its ready byte.
	mosnAckTimeout = 3 * time.Second
	// mosnIOTimeout bounds the single-byte reads and writes where the
	// peer has no reason to dawdle.
	mosnIOTimeout = 5 * time.Second
)

// ErrNoAck is returned by Upgrade.Ready when the old process did not answer
// the ready byte within 3 s. A MOSN-compatible new process exits with
// status 2 then.
var ErrNoAck = errors.New("old process did not acknowledge readiness within 3s")

// HandOverMOSN plays MOSN's old process for a new MOSN: it listens on
// dir/reconfig.sock, waits for a new process to dial it, and hands that
// process duplicates of every fd the store holds. Use it to bring an
// unmodified MOSN back on the same sockets after a crash: call it before
// starting MOSN (the socket must exist when MOSN looks for it) and cancel
// ctx if MOSN exits first. It returns nil once the new process has reported
// its servers running and been answered. Dialers and listen.sock owners
// that Options.Authorize refuses are logged and ignored. The store keeps its
// own fds throughout. A second call while one runs returns ErrBusy.
func (s *Store) HandOverMOSN(ctx context.Context, dir string) error {
	s.mu.Lock()
	busy := s.handingOver
	s.handingOver = true
	s.mu.Unlock()
	if busy {
		return fmt.Errorf("%s: %w", s.name, ErrBusy)
	}
	defer func() {
		s.mu.Lock()
		s.handingOver = false
		s.mu.Unlock()
	}()
	a, err := s.Activation()
	if err != nil {
		return err
	}
	defer a.Close()
	if len(a.Files) == 0 {
		return fmt.Errorf("%s: MOSN hand-over: no fds held", s.name)
	}
	if err := handOverMOSN(ctx, dir, a.Files, s.opts, s.log); err != nil {
		return fmt.Errorf("%s: %w", s.name, err)
	}
	return nil
}

func handOverMOSN(ctx context.Context, dir string, files []*os.File, opts Options, log *slog.Logger) error {
	if len(files) > MaxFiles {
		return fmt.Errorf("MOSN hand-over: %w: %d, MOSN takes at most %d", ErrTooManyFiles, len(files), MaxFiles)
	}
	fds := make([]int, len(files))
	for i, f := range files {
		fd, err := rawFD(f)
		if err != nil {
			return fmt.Errorf("MOSN hand-over: %w", err)
		}
		fds[i] = fd
	}
	defer runtime.KeepAlive(files)

	if err := prepareDir(dir, opts.SidecarUser); err != nil {
		return fmt.Errorf("MOSN hand-over: %w", err)
	}
	reconfig := filepath.Join(dir, MOSNReconfigSocket)
	ln, id, err := listenUnixOwned(reconfig, opts.SidecarUser)
	if err != nil {
		return fmt.Errorf("MOSN hand-over: %w", err)
	}
	// A new MOSN that takes over replaces reconfig.sock with its own; only
	// remove the file if it is still the one we bound.
	defer removeIfOurs(reconfig, id)
	defer ln.Close()
	stop := context.AfterFunc(ctx, func() { ln.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("MOSN hand-over %s: %w", reconfig, ctx.Err())
			}
			return fmt.Errorf("MOSN hand-over %s: accept: %w", reconfig, err)
		}
		if err := checkPeer(c, opts); err != nil {
			log.Warn("MOSN hand-over: refused dialer of reconfig.sock", "socket", reconfig, "reason", err)
			c.Close()
			continue
		}
		err = handOverOne(ctx, dir, c, fds, opts)
		c.Close()
		if err != nil {
			return fmt.Errorf("MOSN hand-over %s: %w", dir, err)
		}
		log.Info("MOSN hand-over done", "dir", dir, "fds", len(fds))
		return nil
	}
}

// handOverOne runs steps 1-3 with one authorized new process.
func handOverOne(ctx context.Context, dir string, rc *net.UnixConn, fds []int, opts Options) error {
	stop := context.AfterFunc(ctx, func() { rc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	rc.SetWriteDeadline(time.Now().Add(mosnIOTimeout))
	if _, err := rc.Write([]byte{0}); err != nil {
		return fmt.Errorf("reconfig.sock: write start byte: %w", ctxOr(ctx, err))
	}
	// The new process listens on listen.sock only after reading our byte:
	// retry the dial for as long as it may take to accept (10 s).
	lpath := filepath.Join(dir, MOSNListenSocket)
	deadline := time.Now().Add(mosnAcceptTimeout)
	var lc *net.UnixConn
	backoff := time.Millisecond
	for {
		d := net.Dialer{Deadline: deadline}
		c, err := d.DialContext(ctx, "unix", lpath)
		if err == nil {
			lc = c.(*net.UnixConn)
			break
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			return fmt.Errorf("dial %s: %w", lpath, ctxOr(ctx, err))
		}
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 50*time.Millisecond)
	}
	defer lc.Close()
	stopL := context.AfterFunc(ctx, func() { lc.SetDeadline(time.Unix(1, 0)) })
	defer stopL()
	// SO_PEERCRED on our end of a dialed socket names the process that
	// called listen(): fds go only to an authorized new process.
	if err := checkPeer(lc, opts); err != nil {
		return fmt.Errorf("%s: %w", lpath, err)
	}
	lc.SetWriteDeadline(time.Now().Add(mosnIOTimeout))
	n, oobn, err := lc.WriteMsgUnix([]byte{0}, unix.UnixRights(fds...), nil)
	if err != nil {
		return fmt.Errorf("%s: send %d fds: %w", lpath, len(fds), ctxOr(ctx, err))
	}
	if n != 1 || oobn == 0 {
		return fmt.Errorf("%s: send %d fds: short write", lpath, len(fds))
	}
	// Wait for the new process to report its servers running; how long
	// that takes is the new process's business, bounded by ctx.
	lc.SetDeadline(time.Time{})
	var b [1]byte
	if _, err := lc.Read(b[:]); err != nil {
		return fmt.Errorf("%s: wait for ready byte: %w", lpath, ctxOr(ctx, err))
	}
	lc.SetWriteDeadline(time.Now().Add(mosnIOTimeout))
	if _, err := lc.Write([]byte{0}); err != nil {
		return fmt.Errorf("%s: answer ready byte: %w", lpath, ctxOr(ctx, err))
	}
	return nil
}

// Upgrade is the new side of a MOSN hand-over in progress: the received
// listener fds, and the connection on which to report readiness.
type Upgrade struct {
	// Files are the received fds, named by their local address (see
	// AddrName). The caller owns them.
	Files []*os.File
	conn  *net.UnixConn
}

// ReceiveMOSN plays MOSN's new process: it dials dir/reconfig.sock (call it
// only when an old process is known to be waiting there), reads the start
// byte, listens on dir/listen.sock for up to 10 s and receives the
// listeners. Both the reconfig.sock listener and the sender on listen.sock
// must pass Options.Authorize. Start serving on Files, then call Ready.
func ReceiveMOSN(ctx context.Context, dir string, opts Options) (*Upgrade, error) {
	log := opts.logger()
	if err := prepareDir(dir, opts.SidecarUser); err != nil {
		return nil, fmt.Errorf("MOSN receive: %w", err)
	}
	reconfig := filepath.Join(dir, MOSNReconfigSocket)
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", reconfig)
	if err != nil {
		return nil, fmt.Errorf("MOSN receive: dial %s: %w", reconfig, err)
	}
	rc := c.(*net.UnixConn)
	defer rc.Close()
	if err := checkPeer(rc, opts); err != nil {
		return nil, fmt.Errorf("MOSN receive: %s: %w", reconfig, err)
	}
	stop := context.AfterFunc(ctx, func() { rc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	rc.SetReadDeadline(time.Now().Add(mosnIOTimeout))
	var b [1]byte
	if _, err := rc.Read(b[:]); err != nil {
		return nil, fmt.Errorf("MOSN receive: %s: read start byte: %w", reconfig, ctxOr(ctx, err))
	}
	if b[0] != 0 {
		return nil, fmt.Errorf("MOSN receive: %s: %w: start byte %#x, want 0x00", reconfig, ErrMalformed, b[0])
	}

	lpath := filepath.Join(dir, MOSNListenSocket)
	ln, id, err := listenUnixOwned(lpath, opts.SidecarUser)
	if err != nil {
		return nil, fmt.Errorf("MOSN receive: %w", err)
	}
	defer removeIfOurs(lpath, id)
	defer ln.Close()
	stopL := context.AfterFunc(ctx, func() { ln.SetDeadline(time.Unix(1, 0)) })
	defer stopL()
	ln.SetDeadline(time.Now().Add(mosnAcceptTimeout))
	for {
		lc, err := ln.AcceptUnix()
		if err != nil {
			return nil, fmt.Errorf("MOSN receive: %s: accept: %w", lpath, ctxOr(ctx, err))
		}
		if err := checkPeer(lc, opts); err != nil {
			log.Warn("MOSN receive: refused sender on listen.sock", "socket", lpath, "reason", err)
			lc.Close()
			continue
		}
		files, err := receiveMOSNFiles(ctx, lc)
		if err != nil {
			lc.Close()
			return nil, fmt.Errorf("MOSN receive: %s: %w", lpath, err)
		}
		return &Upgrade{Files: files, conn: lc}, nil
	}
}

// receiveMOSNFiles reads the one fd message: exactly the byte 0x00 and 1 to
// 100 fds. Every fd is closed on error.
func receiveMOSNFiles(ctx context.Context, c *net.UnixConn) ([]*os.File, error) {
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	c.SetReadDeadline(time.Now().Add(mosnIOTimeout))
	defer c.SetReadDeadline(time.Time{})
	data, fds, _, err := recvMsg(c, 1, MaxFiles)
	if err != nil {
		return nil, ctxOr(ctx, err)
	}
	if err := checkMOSNMessage(data, len(fds)); err != nil {
		closeFDs(fds)
		return nil, err
	}
	files := make([]*os.File, len(fds))
	for i, fd := range fds {
		files[i] = os.NewFile(uintptr(fd), addrName(fd))
	}
	return files, nil
}

// checkMOSNMessage validates the data and fd count of MOSN's fd message.
func checkMOSNMessage(data []byte, nfds int) error {
	if len(data) != 1 || data[0] != 0 {
		return fmt.Errorf("%w: MOSN fd message data %x, want one byte 00", ErrMalformed, data)
	}
	if nfds == 0 {
		return fmt.Errorf("%w: MOSN fd message without fds", ErrMalformed)
	}
	if nfds > MaxFiles {
		return fmt.Errorf("%w: %d, limit %d", ErrTooManyFiles, nfds, MaxFiles)
	}
	return nil
}

// Ready tells the old process that our servers run (one byte) and waits up
// to 3 s for its answer; ErrNoAck if none comes. Then the hand-over is
// complete and the old process stops serving.
func (u *Upgrade) Ready(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { u.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	u.conn.SetWriteDeadline(time.Now().Add(mosnIOTimeout))
	if _, err := u.conn.Write([]byte{0}); err != nil {
		return fmt.Errorf("MOSN ready: write: %w", ctxOr(ctx, err))
	}
	u.conn.SetReadDeadline(time.Now().Add(mosnAckTimeout))
	var b [1]byte
	if _, err := u.conn.Read(b[:]); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("MOSN ready: %w", ctx.Err())
		}
		return fmt.Errorf("MOSN ready: %w (%w)", ErrNoAck, err)
	}
	return nil
}

// Close closes the connection to the old process and any Files the caller
// has not taken (set them to nil to keep them).
func (u *Upgrade) Close() error {
	err := u.conn.Close()
	return errors.Join(err, closeFiles(u.Files))
}

// AddrName names a listening socket by its local address in a form valid as
// an fd name (no ':'): "tcp-127.0.0.1_8080", "tcp-[__1]_9000",
// "unix-/run/x.sock". Other fds get "fd".
func AddrName(f *os.File) string {
	fd, err := rawFD(f)
	if err != nil {
		return "fd"
	}
	defer runtime.KeepAlive(f)
	return addrName(fd)
}

func addrName(fd int) string {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return "fd"
	}
	var s string
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		s = "tcp-" + net.JoinHostPort(net.IP(a.Addr[:]).String(), fmt.Sprint(a.Port))
	case *unix.SockaddrInet6:
		s = "tcp-" + net.JoinHostPort(net.IP(a.Addr[:]).String(), fmt.Sprint(a.Port))
	case *unix.SockaddrUnix:
		s = "unix-" + a.Name
	default:
		return "fd"
	}
	s = sanitizeName(s)
	if ValidName(s) != nil {
		return "fd"
	}
	return s
}

func sanitizeName(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c == ':' || c < ' ' || c > '~' {
			b[i] = '_'
		}
	}
	if len(b) > MaxNameLen {
		b = b[:MaxNameLen]
	}
	return string(b)
}

// listenUnixOwned binds a 0600 stream socket at path (given to user if
// set), replacing a stale
// socket file, and returns its identity so that only this socket's file is
// removed later. The listener does not unlink on Close; the caller removes
// the path with removeIfOurs.
func listenUnixOwned(path string, user *User) (*net.UnixListener, identity, error) {
	if err := removeStaleSocket(path); err != nil {
		return nil, identity{}, err
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, identity{}, fmt.Errorf("listen %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false)
	err = os.Chmod(path, 0o600)
	if err == nil {
		err = user.chown(path)
	}
	if err != nil {
		ln.Close()
		os.Remove(path)
		return nil, identity{}, fmt.Errorf("listen %s: %w", path, err)
	}
	id, _ := pathIdentity(path)
	return ln, id, nil
}

// checkPeer asks Options.Authorize about the process at the other end of c.
func checkPeer(c *net.UnixConn, opts Options) error {
	pid, uid, err := PeerCred(c)
	if err != nil {
		return err
	}
	if err := opts.authorize(pid, uid); err != nil {
		return fmt.Errorf("%w: pid %d uid %d: %w", ErrUnauthorized, pid, uid, err)
	}
	return nil
}

// ctxOr prefers the context's error, which explains a deadline we forced
// to wake a blocked call.
func ctxOr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}
