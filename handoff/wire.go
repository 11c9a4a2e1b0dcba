package handoff

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Limits on what one message may carry. MaxFiles matches MOSN's own limit of
// 100 listener fds per hand-over, so anything the store holds can be handed
// to MOSN in one message. MaxNameLen is systemd's limit for FDNAME.
const (
	MaxFiles   = 100
	MaxNameLen = 255
)

// wireVersion is the first byte of a named-files message. A peer speaking
// another version is rejected instead of being misread.
const wireVersion = 1

// maxWireData is the largest valid named-files message: version, count and
// MaxFiles names of MaxNameLen bytes, each with its length byte.
const maxWireData = 2 + MaxFiles*(1+MaxNameLen)

// Errors callers can branch on. Every error returned for a malformed message
// wraps ErrMalformed; the fds that came with it have already been closed.
var (
	ErrMalformed    = errors.New("malformed hand-off message")
	ErrTooManyFiles = errors.New("too many fds")
	ErrUnauthorized = errors.New("peer not authorized")
	ErrInvalidName  = errors.New("invalid fd name")
	ErrTruncated    = errors.New("truncated message or control data")
)

// ValidName reports whether name may be used as an fd name. The rules are
// systemd's (fdname_is_valid): 1 to 255 printable ASCII characters, no ':'
// because LISTEN_FDNAMES is colon-separated, no newline because sd_notify
// messages are newline-separated.
func ValidName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: empty", ErrInvalidName)
	}
	if len(name) > MaxNameLen {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrInvalidName, len(name), MaxNameLen)
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; c < ' ' || c > '~' || c == ':' {
			return fmt.Errorf("%w: %q has byte %#x at offset %d", ErrInvalidName, name, c, i)
		}
	}
	return nil
}

// encodeNames builds the data part of a named-files message:
//
//	version(1) count(1) { len(1) name(len) }*count
//
// The fds travel in one SCM_RIGHTS control message in the same order.
func encodeNames(names []string) ([]byte, error) {
	if len(names) > MaxFiles {
		return nil, fmt.Errorf("%w: %d, limit %d", ErrTooManyFiles, len(names), MaxFiles)
	}
	b := make([]byte, 0, 2+len(names)*16)
	b = append(b, wireVersion, byte(len(names)))
	for i, n := range names {
		if err := ValidName(n); err != nil {
			return nil, fmt.Errorf("fd %d: %w", i, err)
		}
		b = append(b, byte(len(n)))
		b = append(b, n...)
	}
	return b, nil
}

// parseNames is the inverse of encodeNames. nfds is the number of fds that
// arrived with the data; the message is valid only if it names exactly
// that many. It never panics on any input (see FuzzParseNames).
func parseNames(data []byte, nfds int) ([]string, error) {
	if len(data) < 2 {
		return nil, fmt.Errorf("%w: %d bytes, need at least 2", ErrMalformed, len(data))
	}
	if data[0] != wireVersion {
		return nil, fmt.Errorf("%w: version %d, want %d", ErrMalformed, data[0], wireVersion)
	}
	count := int(data[1])
	if count > MaxFiles {
		return nil, fmt.Errorf("%w: %w: header says %d, limit %d", ErrMalformed, ErrTooManyFiles, count, MaxFiles)
	}
	if count != nfds {
		return nil, fmt.Errorf("%w: header names %d fds but %d arrived", ErrMalformed, count, nfds)
	}
	names := make([]string, 0, count)
	rest := data[2:]
	for i := 0; i < count; i++ {
		if len(rest) < 1 {
			return nil, fmt.Errorf("%w: name %d: missing length byte", ErrMalformed, i)
		}
		l := int(rest[0])
		rest = rest[1:]
		if l > len(rest) {
			return nil, fmt.Errorf("%w: name %d: length %d but only %d bytes left", ErrMalformed, i, l, len(rest))
		}
		n := string(rest[:l])
		if err := ValidName(n); err != nil {
			return nil, fmt.Errorf("%w: name %d: %w", ErrMalformed, i, err)
		}
		names = append(names, n)
		rest = rest[l:]
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: %d trailing bytes", ErrMalformed, len(rest))
	}
	return names, nil
}

// control is what a received control buffer carried.
type control struct {
	fds  []int
	cred *unix.Ucred
}

// parseControl walks a control buffer as the kernel fills it. It returns
// every fd found in SCM_RIGHTS messages even when it also returns an error,
// so the caller can close them: an fd we received is ours to close whatever
// else is wrong with the message. It never panics (see FuzzParseControl).
func parseControl(oob []byte) (control, error) {
	var c control
	var firstErr error
	fail := func(err error) {
		if firstErr == nil {
			firstErr = err
		}
	}
	hdrLen := unix.CmsgLen(0)
	for len(oob) > 0 {
		if len(oob) < unix.SizeofCmsghdr {
			fail(fmt.Errorf("%w: %d stray control bytes", ErrMalformed, len(oob)))
			break
		}
		// Copy the header out instead of casting in place: the buffer
		// may be unaligned (fuzzing) and the layout is per architecture.
		var h unix.Cmsghdr
		copy((*[unix.SizeofCmsghdr]byte)(unsafe.Pointer(&h))[:], oob)
		l := int(h.Len)
		level, typ := h.Level, h.Type
		if l < hdrLen || l > len(oob) {
			fail(fmt.Errorf("%w: control message length %d out of range", ErrMalformed, l))
			break
		}
		body := oob[hdrLen:l]
		switch {
		case level == unix.SOL_SOCKET && typ == unix.SCM_RIGHTS:
			if len(body)%4 != 0 {
				fail(fmt.Errorf("%w: SCM_RIGHTS body of %d bytes", ErrMalformed, len(body)))
			}
			for i := 0; i+4 <= len(body); i += 4 {
				c.fds = append(c.fds, int(int32(binary.NativeEndian.Uint32(body[i:]))))
			}
		case level == unix.SOL_SOCKET && typ == unix.SCM_CREDENTIALS:
			if len(body) < unix.SizeofUcred {
				fail(fmt.Errorf("%w: SCM_CREDENTIALS body of %d bytes", ErrMalformed, len(body)))
				break
			}
			c.cred = &unix.Ucred{
				Pid: int32(binary.NativeEndian.Uint32(body[0:])),
				Uid: binary.NativeEndian.Uint32(body[4:]),
				Gid: binary.NativeEndian.Uint32(body[8:]),
			}
		default:
			fail(fmt.Errorf("%w: unexpected control message level %d type %d", ErrMalformed, level, typ))
		}
		next := unix.CmsgSpace(l - hdrLen)
		if next > len(oob) {
			break
		}
		oob = oob[next:]
	}
	return c, firstErr
}

// closeFDs closes raw fds we own; used on every error path of a receive.
func closeFDs(fds []int) {
	for _, fd := range fds {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}
