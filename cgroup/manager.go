package cgroup

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// DefaultRoot is where cgroup filesystems are mounted on every mainstream distribution.
const DefaultRoot = "/sys/fs/cgroup"

// HostParent is the group under which host-mode pods live.
const HostParent = "meshagent"

// Options configure Open. The zero value detects the layout under DefaultRoot.
type Options struct {
	// Root is the cgroup mount root; default DefaultRoot. Tests point it at a
	// tree under t.TempDir.
	Root string
	// Mode forces a layout; ModeAuto detects it.
	Mode Mode
	// Logger receives one line per write and per drift correction; default slog.Default().
	Logger *slog.Logger
}

// Manager reads and writes the cgroups of pods and containers under one root.
// It is safe for concurrent use.
type Manager struct {
	root string
	mode Mode
	log  *slog.Logger

	mu sync.Mutex
	// applied remembers, per pod, the value of every file as meshagent last
	// wrote or verified it; a later difference is drift (someone else wrote).
	applied map[string]map[string]string
	// memo is the last translation of each pod (see podMemo).
	memo map[string]*podMemo

	files knobFiles

	// afterMkdir, when set (tests only), lays out a v2 group directory
	// created on a plain filesystem, where mkdir makes no knob files.
	afterMkdir func(dir string)
}

// Open returns a Manager for the cgroup tree at opts.Root.
func Open(opts Options) (*Manager, error) {
	root := opts.Root
	if root == "" {
		root = DefaultRoot
	}
	root = filepath.Clean(root)
	mode := opts.Mode
	if mode == ModeAuto {
		var err error
		if mode, err = detectMode(root); err != nil {
			return nil, err
		}
	} else if mode < ModeAuto || mode > ModeV2 {
		return nil, fmt.Errorf("open cgroups at %s: unknown mode %d", root, int(mode))
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Manager{root: root, mode: mode, log: log, applied: map[string]map[string]string{},
		memo: map[string]*podMemo{}}, nil
}

// Mode is the layout in use.
func (m *Manager) Mode() Mode { return m.mode }

// Root is the cgroup mount root.
func (m *Manager) Root() string { return m.root }

// Group is a cgroup path relative to the root of each hierarchy, with slashes,
// e.g. "meshagent/web/sidecar" or "kubepods/burstable/pod<uid>/<id>". The same
// Group names a directory in every v1 controller hierarchy, or one v2 directory.
type Group string

func (g Group) clean() (string, error) {
	s := strings.Trim(string(g), "/")
	if s == "" || path.Clean(s) != s || strings.HasPrefix(s, "../") || s == ".." {
		return "", fmt.Errorf("invalid cgroup group %q", string(g))
	}
	return s, nil
}

// v1Controllers are the hierarchies meshagent uses on v1: cpu for quota and
// shares, cpuacct for usage, memory for limits and OOM. On hosts that co-mount
// cpu,cpuacct the kernel provides both names as symlinks.
var v1Controllers = []string{"cpu", "cpuacct", "memory"}

// dir is the directory of g in the hierarchy that holds controller ("cpu",
// "cpuacct", "memory"); on v2 every controller shares one directory.
func (m *Manager) dir(controller string, g Group) string {
	s := strings.Trim(string(g), "/")
	if m.mode.v1() {
		return m.root + "/" + controller + "/" + s
	}
	return m.root + "/" + s
}

// dirs lists every directory that makes up g.
func (m *Manager) dirs(g Group) []string {
	if !m.mode.v1() {
		return []string{m.dir("", g)}
	}
	out := make([]string, 0, len(v1Controllers))
	for _, c := range v1Controllers {
		out = append(out, m.dir(c, g))
	}
	return out
}

// HostPodGroup is the group of a host-mode pod.
func HostPodGroup(pod string) (Group, error) {
	if err := checkName("pod", pod); err != nil {
		return "", err
	}
	return Group(HostParent + "/" + pod), nil
}

// HostContainerGroup is the group of a container of a host-mode pod.
func HostContainerGroup(pod, container string) (Group, error) {
	pg, err := HostPodGroup(pod)
	if err != nil {
		return "", err
	}
	if err := checkName("container", container); err != nil {
		return "", fmt.Errorf("pod %s: %w", pod, err)
	}
	return Group(string(pg) + "/" + container), nil
}

func checkName(kind, name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00\n") {
		return fmt.Errorf("invalid %s name %q: must be a non-empty path element", kind, name)
	}
	return nil
}

// EnsurePod creates the group of a host-mode pod (idempotent).
func (m *Manager) EnsurePod(pod string) (Group, error) {
	g, err := HostPodGroup(pod)
	if err != nil {
		return "", err
	}
	if err := m.ensure(g); err != nil {
		return "", fmt.Errorf("pod %s: %w", pod, err)
	}
	return g, nil
}

// EnsureContainer creates the group of a container in a host-mode pod, and
// the pod's group if needed (idempotent).
func (m *Manager) EnsureContainer(pod, container string) (Group, error) {
	g, err := HostContainerGroup(pod, container)
	if err != nil {
		return "", err
	}
	if err := m.ensure(g); err != nil {
		return "", fmt.Errorf("pod %s container %s: %w", pod, container, err)
	}
	return g, nil
}

// ensure creates g in every hierarchy through containerd/cgroups, which knows
// each controller's creation rules; on v2 it also enables cpu and memory for
// the children of every ancestor, without which the knobs do not exist.
func (m *Manager) ensure(g Group) error {
	s, err := g.clean()
	if err != nil {
		return err
	}
	if m.mode.v1() {
		_, err := cgroup1.New(cgroup1.StaticPath("/"+s), &specs.LinuxResources{},
			cgroup1.WithHierarchy(m.v1Hierarchy))
		if err != nil {
			return fmt.Errorf("create cgroup %s under %s: %w", s, m.root, err)
		}
		return nil
	}
	// Level by level, so each new directory exists (and, in tests, is laid
	// out) before its children's controllers are enabled in it.
	parts := strings.Split(s, "/")
	for i := range parts {
		p := strings.Join(parts[:i+1], "/")
		dir := filepath.Join(m.root, p)
		fresh := !exists(dir)
		mg, err := cgroup2.NewManager(m.root, "/"+p, &cgroup2.Resources{})
		if err != nil {
			return fmt.Errorf("create cgroup %s under %s: %w", p, m.root, err)
		}
		if fresh && m.afterMkdir != nil {
			m.afterMkdir(dir)
		}
		if err := mg.ToggleControllers([]string{"cpu", "memory"}, cgroup2.Enable); err != nil {
			return fmt.Errorf("enable cpu and memory controllers above %s: %w", p, err)
		}
	}
	return nil
}

func (m *Manager) v1Hierarchy() ([]cgroup1.Subsystem, error) {
	return []cgroup1.Subsystem{cgroup1.NewCpu(m.root), cgroup1.NewCpuacct(m.root), cgroup1.NewMemory(m.root)}, nil
}

// ErrBusy means a group still holds processes and cannot be removed.
var ErrBusy = errors.New("cgroup still has processes")

// Remove deletes g and every group below it, children first, in every
// hierarchy. A missing group is not an error. It fails with ErrBusy while a
// process is inside. It rmdirs the directories itself because a cgroup
// directory can only be removed with rmdir, leaf first, and the library's
// Delete removes one group at a time.
func (m *Manager) Remove(g Group) error {
	s, err := g.clean()
	if err != nil {
		return err
	}
	var errs []error
	for _, d := range m.dirs(Group(s)) {
		m.files.forget(d)
		if err := rmdirTree(d); err != nil {
			errs = append(errs, err)
		}
	}
	// Forget what was applied under the group so a re-created group is
	// applied fresh, not counted as drift.
	m.mu.Lock()
	inside := "/" + s + "/"
	for pod, files := range m.applied {
		for f := range files {
			if strings.Contains(f, inside) {
				delete(files, f)
			}
		}
		if len(files) == 0 {
			delete(m.applied, pod)
		}
	}
	m.mu.Unlock()
	return errors.Join(errs...)
}

func rmdirTree(dir string) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove cgroup %s: %w", dir, err)
	}
	for _, e := range ents {
		if e.IsDir() {
			if err := rmdirTree(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	// A just-emptied group can be EBUSY for a moment while the kernel
	// finishes tearing down exited tasks.
	delay := 5 * time.Millisecond
	for i := 0; ; i++ {
		err := unix.Rmdir(dir)
		switch {
		case err == nil || errors.Is(err, unix.ENOENT):
			return nil
		case errors.Is(err, unix.ENOTEMPTY) && !isCgroupFS(dir):
			// A tree laid out in a plain directory (tests) holds knob files.
			return os.RemoveAll(dir)
		case errors.Is(err, unix.EBUSY) && i < 6:
			time.Sleep(delay)
			delay *= 2
			continue
		case errors.Is(err, unix.EBUSY):
			return fmt.Errorf("remove cgroup %s: %w", dir, ErrBusy)
		}
		return fmt.Errorf("remove cgroup %s: %w", dir, err)
	}
}

func isCgroupFS(dir string) bool {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return false
	}
	return st.Type == unix.CGROUP_SUPER_MAGIC || st.Type == unix.CGROUP2_SUPER_MAGIC
}

// ProcsFiles lists the cgroup.procs file of g in every hierarchy meshagent
// uses. The exec shim writes "0" to each of them before it execs the real
// command, so the command never runs outside its group.
func (m *Manager) ProcsFiles(g Group) ([]string, error) {
	s, err := g.clean()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, d := range m.dirs(Group(s)) {
		out = append(out, filepath.Join(d, "cgroup.procs"))
	}
	return out, nil
}

// Procs lists the processes in g (from the memory hierarchy on v1).
func (m *Manager) Procs(g Group) ([]int, error) {
	s, err := g.clean()
	if err != nil {
		return nil, err
	}
	return m.readProcs(filepath.Join(m.dir("memory", Group(s)), "cgroup.procs"))
}
