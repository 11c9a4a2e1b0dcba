package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/meshagent/meshagent/systemd"
	"golang.org/x/sys/unix"

	"github.com/meshagent/meshagent/internal/execshim"
)

// HostRuntime runs containers as processes of this host. Each process
// leads its own process group (so a stop reaches its children) and is
// watched through a pidfd, which also works for processes adopted from a
// previous agent. No Pdeathsig: the processes must outlive the agent.
type HostRuntime struct {
	// LogDir receives <pod>/<container>.log with each process's output.
	LogDir string
	// Preparers add cgroups, oom_score_adj and listeners to each start.
	Preparers []Preparer
	// Self is the binary run as the exec shim; default meshagent-exec
	// beside the agent's binary, else the agent's own binary.
	Self string
}

// startSlots bounds the process starts in flight. A start blocks OS threads
// in file and cgroup writes, in fork and in the wait for exec, and the Go
// runtime never gives a thread back: unbounded, starting 200 pods at once
// left the agent with over a hundred idle threads and 3-4 MiB of their
// stacks for the rest of its life. Starts serialize on the fork lock
// anyway, so a few in flight lose nothing.
var startSlots = make(chan struct{}, 4)

// Start implements Runtime.
func (h *HostRuntime) Start(ctx context.Context, pod *PodSpec, c *ContainerSpec) (Process, error) {
	l, err := h.launch(ctx, pod, c, false)
	if err != nil {
		return nil, err
	}
	return l.execed(pod, c)
}

// Stage implements stager: the shim enters the container's cgroups and
// sets its oom_score_adj now, then waits for Go to exec the command. A
// container that needs no shim has nothing to stage (nil, nil).
func (h *HostRuntime) Stage(ctx context.Context, pod *PodSpec, c *ContainerSpec) (stagedStart, error) {
	l, err := h.launch(ctx, pod, c, true)
	if err != nil || l == nil {
		return nil, err
	}
	return &hostStaged{l: l, pod: pod, c: c}, nil
}

// launched is a process forked by launch: with a shim, errR reports the
// shim's failure (or EOF at the exec), and goW, when staged, releases it.
type launched struct {
	p    *hostProcess
	errR *os.File
	goW  *os.File
}

// execed waits until the command runs (or the shim failed).
func (l *launched) execed(pod *PodSpec, c *ContainerSpec) (Process, error) {
	if l.errR == nil {
		return l.p, nil
	}
	defer l.errR.Close()
	// Read until EOF (the exec closed the child's copy) or a message
	// (the shim failed).
	msg, _ := io.ReadAll(io.LimitReader(l.errR, 4096))
	if len(msg) > 0 {
		<-l.p.Done()
		return nil, fmt.Errorf("pod %s container %s: %s", pod.Name, c.Name, bytes.TrimSpace(msg))
	}
	return l.p, nil
}

// launch forks the container's process: the command itself, or the exec
// shim when something must happen before the exec. With stage, only a shim
// is forked (nil when none is needed), and it waits for goW.
func (h *HostRuntime) launch(ctx context.Context, pod *PodSpec, c *ContainerSpec, stage bool) (*launched, error) {
	select {
	case startSlots <- struct{}{}:
		defer func() { <-startSlots }()
	case <-ctx.Done():
		return nil, fmt.Errorf("pod %s container %s: start: %w", pod.Name, c.Name, ctx.Err())
	}
	var s StartSpec
	defer func() {
		for _, f := range s.After {
			f()
		}
	}()
	for _, p := range append(h.Preparers[:len(h.Preparers):len(h.Preparers)], preparersFrom(ctx)...) {
		if err := p.Prepare(ctx, pod, c, &s); err != nil {
			return nil, fmt.Errorf("pod %s container %s: prepare: %w", pod.Name, c.Name, err)
		}
	}
	shim := s.ListenFDs || len(s.CgroupProcs) > 0 || s.OOMScoreAdj != nil
	if stage && !shim {
		return nil, nil
	}
	path, err := resolveCommand(c)
	if err != nil {
		return nil, fmt.Errorf("pod %s container %s: %w", pod.Name, c.Name, err)
	}
	env := containerEnv(pod, c, s.Env)
	logf, err := h.openLog(pod.Name, c.Name)
	if err != nil {
		return nil, err
	}
	defer logf.Close()

	var l launched
	var cmd *exec.Cmd
	var childEnds []*os.File // the child's copies, closed once it has them
	defer func() {
		for _, f := range childEnds {
			f.Close()
		}
	}()
	fail := func(err error) (*launched, error) {
		for _, f := range []*os.File{l.errR, l.goW} {
			if f != nil {
				f.Close()
			}
		}
		return nil, fmt.Errorf("pod %s container %s: %w", pod.Name, c.Name, err)
	}
	if shim {
		self := h.Self
		if self == "" {
			self = defaultShim()
		}
		r, w, err := os.Pipe()
		if err != nil {
			return fail(err)
		}
		l.errR, childEnds = r, append(childEnds, w)
		files := append([]*os.File{}, s.Files...)
		spec := execshim.Spec{
			Path: path, Argv: append([]string{path}, c.Args...),
			CgroupProcs: s.CgroupProcs, OOMScoreAdj: s.OOMScoreAdj, ListenFDs: s.ListenFDs,
		}
		if stage {
			gr, gw, err := os.Pipe()
			if err != nil {
				return fail(err)
			}
			l.goW, childEnds = gw, append(childEnds, gr)
			spec.WaitFD = 3 + len(files)
			files = append(files, gr)
		}
		spec.ErrFD = 3 + len(files)
		files = append(files, w)
		raw, _ := json.Marshal(spec)
		cmd = exec.Command(self)
		cmd.Args = []string{"meshagent-exec", pod.Name + "/" + c.Name}
		cmd.Env = append(env, execshim.Env+"="+string(raw))
		cmd.ExtraFiles = files
	} else {
		cmd = exec.Command(path, c.Args...)
		cmd.Args[0] = path
		cmd.Env = env
		cmd.ExtraFiles = s.Files
	}
	cmd.Dir = c.Workdir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fail(fmt.Errorf("start %s: %w", path, err))
	}
	pid := cmd.Process.Pid
	// Nobody waits on the child through os/exec: the pidfd below watches
	// it and reaps it. Until it is reaped its pid cannot be reused, so
	// opening the pidfd by pid is safe.
	p, perr := watchPID(pid, true)
	_ = cmd.Process.Release()
	if perr != nil {
		_ = unix.Kill(-pid, unix.SIGKILL)
		_, _ = unix.Wait4(pid, nil, 0, nil)
		return fail(perr)
	}
	l.p = p
	return &l, nil
}

// hostStaged is a shim forked ahead of its start, waiting to exec.
type hostStaged struct {
	l   *launched
	pod *PodSpec
	c   *ContainerSpec
}

func (st *hostStaged) Go(context.Context) (Process, error) {
	_, err := st.l.goW.Write([]byte{1})
	st.l.goW.Close()
	if err != nil {
		// The shim is gone (EPIPE): whatever it said, it runs nothing.
		st.l.errR.Close()
		return nil, fmt.Errorf("pod %s container %s: staged process %d gone before its start: %w", st.pod.Name, st.c.Name, st.l.p.PID(), err)
	}
	p, err := st.l.execed(st.pod, st.c)
	if err == nil {
		st.l.p.rec.Started = time.Now()
	}
	return p, err
}

// Cancel closes the shim's go pipe, so it exits without running the
// command, and waits for it to be gone: its pod's cgroups may be removed
// next, which fails while a process is in them.
func (st *hostStaged) Cancel() {
	st.l.goW.Close()
	st.l.errR.Close()
	select {
	case <-st.l.p.Done():
	case <-time.After(2 * time.Second):
		_ = st.l.p.Signal(syscall.SIGKILL)
		<-st.l.p.Done()
	}
}

// Adopt implements Runtime.
func (h *HostRuntime) Adopt(ctx context.Context, pod *PodSpec, c *ContainerSpec, rec ProcessRecord) (Process, error) {
	p, err := watchPID(rec.PID, false)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil, fmt.Errorf("pod %s container %s pid %d: %w", pod.Name, c.Name, rec.PID, ErrGone)
		}
		return nil, fmt.Errorf("pod %s container %s pid %d: %w", pod.Name, c.Name, rec.PID, err)
	}
	// The pidfd pins the process it was opened for; if that process has
	// the recorded start time, it is the one we started, not a pid reuse.
	if p.rec.StartTime != rec.StartTime {
		p.Release()
		return nil, fmt.Errorf("pod %s container %s pid %d: start time %d, recorded %d: %w",
			pod.Name, c.Name, rec.PID, p.rec.StartTime, rec.StartTime, ErrGone)
	}
	p.rec.Started = rec.Started
	return p, nil
}

func (h *HostRuntime) openLog(pod, container string) (*os.File, error) {
	if h.LogDir == "" {
		return os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	}
	dir := filepath.Join(h.LogDir, pod)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("pod %s container %s: log dir: %w", pod, container, err)
	}
	f, err := os.OpenFile(filepath.Join(dir, container+".log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("pod %s container %s: log: %w", pod, container, err)
	}
	return f, nil
}

func resolveCommand(c *ContainerSpec) (string, error) {
	if strings.Contains(c.Command, "/") {
		p := c.Command
		if !filepath.IsAbs(p) && c.Workdir != "" {
			p = filepath.Join(c.Workdir, p)
		}
		abs, err := filepath.Abs(p)
		if err != nil {
			return "", err
		}
		if _, err := os.Stat(abs); err != nil {
			return "", fmt.Errorf("command: %w", err)
		}
		return abs, nil
	}
	p, err := exec.LookPath(c.Command)
	if err != nil {
		return "", fmt.Errorf("command: %w", err)
	}
	return p, nil
}

// containerEnv is the agent's PATH and HOME, the container's env and what
// features added, sorted so starts are reproducible.
func containerEnv(pod *PodSpec, c *ContainerSpec, extra []string) []string {
	env := []string{
		"PATH=" + os.Getenv("PATH"),
		"MESHAGENT_POD=" + pod.Name,
		"MESHAGENT_CONTAINER=" + c.Name,
	}
	if h := os.Getenv("HOME"); h != "" {
		env = append(env, "HOME="+h)
	}
	keys := make([]string, 0, len(c.Env))
	for k := range c.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		env = append(env, k+"="+c.Env[k])
	}
	// The agent's own NOTIFY_SOCKET and watchdog variables never reach a
	// container, even one configured with them by mistake; what features
	// add (a per-sidecar notify socket for the fd store) comes after.
	return append(systemd.ChildEnv(env), extra...)
}

// hostProcess watches one process through its pidfd.
type hostProcess struct {
	rec   ProcessRecord
	child bool // ours to reap, so its exit status is known

	done chan struct{}
	exit ExitStatus

	mu     sync.Mutex
	pidfd  int      // -1 once closed
	hooks  []func() // run once the process has exited, before done closes
	exited bool     // hooks have been taken
	gone   bool     // exited or released: the poller no longer has it
}

// OnExit runs f on the watcher once the process has exited, before Done
// closes; at once on a goroutine of its own if it already has.
func (p *hostProcess) OnExit(f func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exited {
		go f()
		return
	}
	p.hooks = append(p.hooks, f)
}

func watchPID(pid int, child bool) (*hostProcess, error) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	st, err := procStartTime(pid)
	if err != nil {
		unix.Close(fd)
		if errors.Is(err, os.ErrNotExist) {
			err = unix.ESRCH
		}
		return nil, fmt.Errorf("pid %d: %w", pid, err)
	}
	p := &hostProcess{
		rec:   ProcessRecord{PID: pid, StartTime: st, Started: time.Now()},
		child: child, pidfd: fd, done: make(chan struct{}),
	}
	if err := exits.add(p); err != nil {
		// Not pollable here: block a thread for this one instead.
		go func() {
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			for {
				if _, perr := unix.Poll(pfd, -1); perr != unix.EINTR {
					break
				}
			}
			p.finish()
		}()
	}
	return p, nil
}

// finish reaps a child of ours, ends its process group, runs the exit
// hooks and closes done. It runs once, after the pidfd reported the exit,
// unless the process was released first.
func (p *hostProcess) finish() {
	p.mu.Lock()
	if p.gone {
		p.mu.Unlock()
		return // released: let go without waiting for the exit
	}
	p.gone = true
	p.mu.Unlock()
	if p.child {
		var ws unix.WaitStatus
		for {
			_, werr := unix.Wait4(p.rec.PID, &ws, 0, nil)
			if werr != unix.EINTR {
				break
			}
		}
		p.exit = ExitStatus{Known: true}
		if ws.Signaled() {
			p.exit.Signal = ws.Signal()
		} else {
			p.exit.Code = ws.ExitStatus()
		}
	}
	// Stragglers of the process group (children that outlived their
	// leader) go with it, the way systemd's control-group kill mode does.
	_ = unix.Kill(-p.rec.PID, unix.SIGKILL)
	p.mu.Lock()
	unix.Close(p.pidfd)
	p.pidfd = -1
	p.exited = true
	hooks := p.hooks
	p.hooks = nil
	p.mu.Unlock()
	for _, f := range hooks {
		f()
	}
	close(p.done)
}

func (p *hostProcess) PID() int              { return p.rec.PID }
func (p *hostProcess) Done() <-chan struct{} { return p.done }
func (p *hostProcess) Exit() ExitStatus      { return p.exit }
func (p *hostProcess) Record() ProcessRecord { return p.rec }

// Signal sends sig to the process group; if the process left its group
// (setsid), to the process alone through the pidfd.
func (p *hostProcess) Signal(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock() // holds the pidfd open while it is used
	if p.pidfd < 0 {
		return nil // exited (or released)
	}
	err := unix.Kill(-p.rec.PID, sig)
	if errors.Is(err, unix.ESRCH) {
		err = unix.PidfdSendSignal(p.pidfd, sig, nil, 0)
	}
	if err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("signal %s to pid %d: %w", unixSignalName(sig), p.rec.PID, err)
	}
	if sig != unix.SIGKILL && sig != unix.SIGCONT {
		// A stopped (SIGSTOP) process only acts on its stop signal
		// once continued.
		_ = unix.Kill(-p.rec.PID, unix.SIGCONT)
	}
	return nil
}

// Release stops watching; the process keeps running.
func (p *hostProcess) Release() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.gone {
		return nil
	}
	p.gone = true
	exits.remove(p.pidfd)
	unix.Close(p.pidfd)
	p.pidfd = -1
	return nil
}

// exits watches the pidfds of every host process with one epoll set and
// one goroutine. A goroutine parked on each pidfd in the netpoller cost
// two per pod of a sidecar and an app, and their stacks; an exit is rare
// enough that one waiter serves the node. The goroutine and its fds exist
// only while something is watched, so a supervisor that has let go of
// every process holds nothing.
var exits exitPoller

type exitPoller struct {
	mu    sync.Mutex
	epfd  int // -1 when not running
	wake  int // eventfd that ends the wait when the set empties
	procs map[int32]*hostProcess
}

func (e *exitPoller) add(p *hostProcess) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.procs == nil {
		e.procs = map[int32]*hostProcess{}
	}
	if len(e.procs) == 0 {
		if err := e.open(); err != nil {
			return err
		}
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(p.pidfd)}
	if err := unix.EpollCtl(e.epfd, unix.EPOLL_CTL_ADD, p.pidfd, &ev); err != nil {
		if len(e.procs) == 0 {
			e.stopLocked()
		}
		return fmt.Errorf("epoll add pidfd of pid %d: %w", p.rec.PID, err)
	}
	e.procs[int32(p.pidfd)] = p
	return nil
}

// open starts the epoll set and its goroutine; e.mu is held.
func (e *exitPoller) open() error {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return fmt.Errorf("epoll_create: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return fmt.Errorf("eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wake)}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(wake)
		return fmt.Errorf("epoll add eventfd: %w", err)
	}
	e.epfd, e.wake = epfd, wake
	go e.run(epfd, wake)
	return nil
}

// waitExits waits for events on the set. It parks in Go's netpoller, which
// watches the epoll fd itself, rather than in a blocking epoll_wait: a
// goroutine blocked in a system call keeps its P, and the finish it starts
// for an exit then waits for sysmon to take that P back, up to 10ms on an
// idle agent, which is what a crashed sidecar's restart is waiting for.
func waitExits(rc syscall.RawConn, epfd int, evs []unix.EpollEvent) (int, error) {
	n := 0
	err := rc.Read(func(uintptr) bool {
		for {
			var werr error
			n, werr = unix.EpollWait(epfd, evs, 0)
			if werr != unix.EINTR {
				return n > 0
			}
		}
	})
	return n, err
}

// remove stops watching fd (a released process); p.mu is held by the caller.
func (e *exitPoller) remove(fd int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, ok := e.procs[int32(fd)]; !ok {
		return
	}
	delete(e.procs, int32(fd))
	_ = unix.EpollCtl(e.epfd, unix.EPOLL_CTL_DEL, fd, nil)
	if len(e.procs) == 0 {
		e.stopLocked()
	}
}

// stopLocked tells the goroutine to close the set and return; the next add
// opens a new one.
func (e *exitPoller) stopLocked() {
	one := [8]byte{1}
	_, _ = unix.Write(e.wake, one[:])
	e.epfd, e.wake = -1, -1
}

func (e *exitPoller) run(epfd, wake int) {
	defer unix.Close(wake)
	var rc syscall.RawConn
	if err := unix.SetNonblock(epfd, true); err == nil {
		ep := os.NewFile(uintptr(epfd), "epoll:exits") // owns epfd now
		defer ep.Close()
		rc, _ = ep.SyscallConn()
	} else {
		defer unix.Close(epfd)
	}
	evs := make([]unix.EpollEvent, 16)
	for {
		var n int
		var err error
		if rc != nil {
			n, err = waitExits(rc, epfd, evs)
			if errors.Is(err, os.ErrNoDeadline) {
				rc = nil // not pollable here after all: block below
				continue
			}
		} else {
			n, err = unix.EpollWait(epfd, evs, -1)
			if err == unix.EINTR {
				err = nil
			}
		}
		if err != nil {
			// Cannot happen with a valid set; do not spin on it.
			slog.Error("process watcher stopped", "err", err)
			return
		}
		e.mu.Lock()
		for _, ev := range evs[:max(n, 0)] {
			if ev.Fd == int32(wake) {
				continue
			}
			if p, ok := e.procs[ev.Fd]; ok {
				delete(e.procs, ev.Fd)
				_ = unix.EpollCtl(epfd, unix.EPOLL_CTL_DEL, int(ev.Fd), nil)
				// Off the watcher: reaping and the hooks must not
				// hold up the exits of other pods.
				go p.finish()
			}
		}
		if e.epfd != epfd {
			e.mu.Unlock()
			return // emptied and told to stop
		}
		if len(e.procs) == 0 {
			e.stopLocked()
			e.mu.Unlock()
			return
		}
		e.mu.Unlock()
	}
}

// procStartTime reads field 22 of /proc/PID/stat.
func procStartTime(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces and parentheses: split
	// after its last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("pid %d: malformed stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("pid %d: short stat", pid)
	}
	return strconv.ParseUint(f[19], 10, 64)
}

func unixSignalName(s syscall.Signal) string {
	if n := unix.SignalName(s); n != "" {
		return n
	}
	return "signal " + strconv.Itoa(int(s))
}
