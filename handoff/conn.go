package handoff

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// SendFiles sends files in one message on c, a connected SOCK_SEQPACKET
// ("unixpacket") socket: the names (each file's Name(), see ValidName) in the
// data, the fds in a single SCM_RIGHTS control message. The caller keeps
// ownership of files: the kernel gives the peer its own duplicates.
func SendFiles(c *net.UnixConn, files []*os.File) error {
	names := make([]string, len(files))
	fds := make([]int, len(files))
	for i, f := range files {
		names[i] = f.Name()
		fd, err := rawFD(f)
		if err != nil {
			return fmt.Errorf("send fds: %w", err)
		}
		fds[i] = fd
	}
	defer runtime.KeepAlive(files)
	data, err := encodeNames(names)
	if err != nil {
		return fmt.Errorf("send fds: %w", err)
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, oobn, err := c.WriteMsgUnix(data, oob, nil)
	if err != nil {
		return fmt.Errorf("send %d fds: %w", len(fds), err)
	}
	if n != len(data) || oobn != len(oob) {
		return fmt.Errorf("send %d fds: short write %d/%d data, %d/%d control", len(fds), n, len(data), oobn, len(oob))
	}
	return nil
}

// ReceiveFiles receives one message sent by SendFiles on a SOCK_SEQPACKET
// socket and returns the files, named as the sender named them. It does
// not check the sender: check PeerCred first. The caller owns the files. On every error
// all fds that arrived are closed, and errors for bad messages wrap
// ErrMalformed, ErrTruncated or ErrTooManyFiles.
func ReceiveFiles(c *net.UnixConn) ([]*os.File, error) {
	data, fds, _, err := recvMsg(c, maxWireData, MaxFiles)
	if err != nil {
		return nil, fmt.Errorf("receive fds: %w", err)
	}
	names, err := parseNames(data, len(fds))
	if err != nil {
		closeFDs(fds)
		return nil, fmt.Errorf("receive fds: %w", err)
	}
	return filesFromFDs(fds, names), nil
}

// PeerCred returns the pid and uid of the process at the other end of a
// connected unix socket, as the kernel recorded them at connect (or listen)
// time. They cannot be forged by the peer.
func PeerCred(c *net.UnixConn) (pid int32, uid uint32, err error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, 0, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var serr error
	if err := rc.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, 0, fmt.Errorf("peer credentials: %w", err)
	}
	if serr != nil {
		return 0, 0, fmt.Errorf("peer credentials: SO_PEERCRED: %w", serr)
	}
	return cred.Pid, cred.Uid, nil
}

// recvMsg reads one message of at most maxData bytes with at most maxFDs fds.
// A message that did not fit (MSG_TRUNC), control data that did not fit
// (MSG_CTRUNC: the sender passed more fds than we accept, and the kernel
// dropped the rest) or a malformed control buffer is an error, and every fd
// that did arrive is closed before returning it. On success the caller owns
// the returned fds (opened with O_CLOEXEC by the Go runtime).
func recvMsg(c *net.UnixConn, maxData, maxFDs int) (data []byte, fds []int, cred *unix.Ucred, err error) {
	buf := make([]byte, maxData+1) // one spare byte detects overlong stream messages
	oob := make([]byte, unix.CmsgSpace(maxFDs*4)+unix.CmsgSpace(unix.SizeofUcred))
	n, oobn, flags, _, rerr := c.ReadMsgUnix(buf, oob)
	// Parse the control data even when the read failed: Go reports a
	// zero-length seqpacket or stream message as io.EOF, and fds may have
	// come with it.
	ctl, perr := parseControl(oob[:max(oobn, 0)])
	switch {
	case rerr != nil:
		err = rerr
		if errors.Is(rerr, io.EOF) && len(ctl.fds) > 0 {
			err = fmt.Errorf("%w: %d fds with an empty message", ErrMalformed, len(ctl.fds))
		}
	case flags&unix.MSG_CTRUNC != 0:
		err = fmt.Errorf("%w: control data truncated (more than %d fds sent?)", ErrTruncated, maxFDs)
	case flags&unix.MSG_TRUNC != 0 || n > maxData:
		err = fmt.Errorf("%w: message longer than %d bytes", ErrTruncated, maxData)
	case perr != nil:
		err = perr
	case len(ctl.fds) > maxFDs:
		err = fmt.Errorf("%w: %d, limit %d", ErrTooManyFiles, len(ctl.fds), maxFDs)
	case n == 0 && oobn == 0:
		// A zero-length read without control data is how a stream peer
		// says EOF; a seqpacket peer can send an empty message, which
		// carries nothing either way.
		err = fmt.Errorf("%w: empty message (peer closed?)", ErrMalformed)
	}
	if err != nil {
		closeFDs(ctl.fds)
		return nil, nil, nil, err
	}
	return buf[:n], ctl.fds, ctl.cred, nil
}

func filesFromFDs(fds []int, names []string) []*os.File {
	files := make([]*os.File, len(fds))
	for i, fd := range fds {
		files[i] = os.NewFile(uintptr(fd), names[i])
	}
	return files
}

func closeFiles(files []*os.File) error {
	var errs []error
	for _, f := range files {
		if f != nil {
			errs = append(errs, f.Close())
		}
	}
	return errors.Join(errs...)
}
