package cgroup

import (
	"bytes"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The knob files are tiny; reconcile reads thousands of them per pass, so
// they are read with a stack buffer and three syscalls instead of os.ReadFile.

// readSmall returns the trimmed content of a small file (at most 256 bytes).
func readSmall(path string) (string, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	var buf [256]byte
	n := 0
	for n < len(buf) {
		r, err := unix.Read(fd, buf[n:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return "", &os.PathError{Op: "read", Path: path, Err: err}
		}
		n += r
		if r == 0 || n < len(buf) {
			break // a short read is the end of a seq_file or proc file
		}
	}
	return string(bytes.TrimSpace(buf[:n])), nil
}

// writeSmall writes value to an existing knob file in one write(2), which is
// how cgroupfs expects it; O_CREAT is deliberately absent so a missing knob
// is an error, not a new file.
func writeSmall(path, value string) error {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_TRUNC|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: path, Err: err}
	}
	_, werr := unix.Write(fd, []byte(value))
	cerr := unix.Close(fd)
	if werr != nil {
		return &os.PathError{Op: "write", Path: path, Err: werr}
	}
	if cerr != nil {
		return &os.PathError{Op: "close", Path: path, Err: cerr}
	}
	return nil
}

// readKV parses "key value" lines (cpu.stat, memory.events, memory.oom_control).
func readKV(path string) (map[string]uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out := map[string]uint64{}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		v, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			continue
		}
		out[f[0]] = v
	}
	return out, nil
}
