package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Mode is the cgroup layout of a host.
type Mode int

const (
	// ModeAuto asks Open to detect the layout under Options.Root.
	ModeAuto Mode = iota
	// ModeV1 is the legacy layout: one hierarchy per controller at <root>/<controller>.
	ModeV1
	// ModeHybrid mounts v1 controllers and an empty-ish v2 tree at <root>/unified.
	// meshagent uses the v1 hierarchies for cpu and memory there.
	ModeHybrid
	// ModeV2 is the unified layout: one hierarchy at <root>.
	ModeV2
)

func (m Mode) String() string {
	switch m {
	case ModeAuto:
		return "auto"
	case ModeV1:
		return "v1"
	case ModeHybrid:
		return "hybrid"
	case ModeV2:
		return "v2"
	}
	return fmt.Sprintf("mode(%d)", int(m))
}

// v1 reports whether cpu and memory live in per-controller v1 hierarchies.
func (m Mode) v1() bool { return m == ModeV1 || m == ModeHybrid }

// detectMode looks at the filesystem type first (what the kernel says), and
// falls back to the file layout so a tree under t.TempDir can stand in for a
// real mount.
func detectMode(root string) (Mode, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil {
		return ModeAuto, fmt.Errorf("detect cgroup mode at %s: %w", root, err)
	}
	if st.Type == unix.CGROUP2_SUPER_MAGIC {
		return ModeV2, nil
	}
	var cpu unix.Statfs_t
	if err := unix.Statfs(filepath.Join(root, "cpu"), &cpu); err == nil && cpu.Type == unix.CGROUP_SUPER_MAGIC {
		var uni unix.Statfs_t
		if err := unix.Statfs(filepath.Join(root, "unified"), &uni); err == nil && uni.Type == unix.CGROUP2_SUPER_MAGIC {
			return ModeHybrid, nil
		}
		return ModeV1, nil
	}
	// Not a cgroup mount: decide from the layout.
	if exists(filepath.Join(root, "cgroup.controllers")) {
		return ModeV2, nil
	}
	if exists(filepath.Join(root, "cpu", "cpu.shares")) {
		if exists(filepath.Join(root, "unified", "cgroup.controllers")) {
			return ModeHybrid, nil
		}
		return ModeV1, nil
	}
	return ModeAuto, fmt.Errorf("detect cgroup mode at %s: %w", root, ErrNoCgroups)
}

// ErrNoCgroups means the root holds neither a v1 nor a v2 layout.
var ErrNoCgroups = errors.New("no cgroup v1 or v2 layout found")

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
