package handoff

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
)

// ErrUnsafeDir is returned when a socket directory exists but is not a
// directory owned by meshagent (a symlink, another user's directory):
// another user could then replace our sockets with theirs.
var ErrUnsafeDir = errors.New("unsafe socket directory")

// prepareDir makes dir an owner-only (0700) directory, creating it if
// needed, owned by us or, when the sidecar runs as another user, by that
// user. Only the owner (and root) can then connect to the sockets inside,
// which is the first fence; the peer credential check is the second.
func prepareDir(dir string, user *User) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("socket dir %s: %w", dir, err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("socket dir %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%w %s: not a directory (%s)", ErrUnsafeDir, dir, fi.Mode().Type())
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("socket dir %s: no owner information", dir)
	}
	if int(st.Uid) != os.Geteuid() && (user == nil || int(st.Uid) != user.UID) {
		return fmt.Errorf("%w %s: owned by uid %d, neither meshagent's %d nor the sidecar's", ErrUnsafeDir, dir, st.Uid, os.Geteuid())
	}
	if fi.Mode().Perm() != 0o700 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("socket dir %s: %w", dir, err)
		}
	}
	if err := user.chown(dir); err != nil {
		return fmt.Errorf("socket dir %s: %w", dir, err)
	}
	return nil
}

// User is a uid and gid.
type User struct{ UID, GID int }

// chown gives path to u; a nil u leaves it alone.
func (u *User) chown(path string) error {
	if u == nil {
		return nil
	}
	return os.Lchown(path, u.UID, u.GID)
}

// removeStaleSocket removes a socket file left at path by an earlier
// process, refusing to remove anything that is not a socket.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("socket %s: exists and is a %s, not a socket", path, fi.Mode().Type())
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("socket %s: remove stale: %w", path, err)
	}
	return nil
}

// pathIdentity returns the identity of the file at path.
func pathIdentity(path string) (identity, bool) {
	fi, err := os.Lstat(path)
	if err != nil {
		return identity{}, false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return identity{}, false
	}
	return identity{dev: uint64(st.Dev), ino: st.Ino}, true
}

// removeIfOurs removes path only if it is still the socket file we bound
// (id): another process (a new MOSN) may have replaced it with its own.
func removeIfOurs(path string, id identity) {
	if cur, ok := pathIdentity(path); ok && cur == id {
		os.Remove(path)
	}
}
