package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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

// Start implements Runtime.
func (h *HostRuntime) Start(ctx context.Context, pod *PodSpec, c *ContainerSpec) (Process, error) {
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

	shim := s.ListenFDs || len(s.CgroupProcs) > 0 || s.OOMScoreAdj != nil
	var cmd *exec.Cmd
	var errR *os.File
	if shim {
		self := h.Self
		if self == "" {
			self = defaultShim()
		}
		r, w, err := os.Pipe()
		if err != nil {
			return nil, fmt.Errorf("pod %s container %s: %w", pod.Name, c.Name, err)
		}
		errR = r
		defer r.Close()
		spec := execshim.Spec{
			Path: path, Argv: append([]string{path}, c.Args...),
			CgroupProcs: s.CgroupProcs, OOMScoreAdj: s.OOMScoreAdj, ListenFDs: s.ListenFDs,
			ErrFD: 3 + len(s.Files),
		}
		raw, _ := json.Marshal(spec)
		cmd = exec.Command(self)
		cmd.Args = []string{"meshagent-exec", pod.Name + "/" + c.Name}
		cmd.Env = append(env, execshim.Env+"="+string(raw))
		cmd.ExtraFiles = append(append([]*os.File{}, s.Files...), w)
		defer w.Close()
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
		return nil, fmt.Errorf("pod %s container %s: start %s: %w", pod.Name, c.Name, path, err)
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
		return nil, fmt.Errorf("pod %s container %s: %w", pod.Name, c.Name, perr)
	}
	if shim {
		// Close our write end first, then read until EOF (the exec
		// closed the child's copy) or a message (the shim failed).
		cmd.ExtraFiles[len(cmd.ExtraFiles)-1].Close()
		msg, _ := io.ReadAll(io.LimitReader(errR, 4096))
		if len(msg) > 0 {
			<-p.Done()
			p.Release()
			return nil, fmt.Errorf("pod %s container %s: %s", pod.Name, c.Name, bytes.TrimSpace(msg))
		}
	}
	return p, nil
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
	pidfd *os.File

	done     chan struct{}
	exit     ExitStatus
	release  sync.Once
	released chan struct{}
}

func watchPID(pid int, child bool) (*hostProcess, error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
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
		child: child, pidfd: os.NewFile(uintptr(fd), fmt.Sprintf("pidfd:%d", pid)),
		done: make(chan struct{}), released: make(chan struct{}),
	}
	go p.wait()
	return p, nil
}

// wait blocks in the netpoller (no thread per process) until the pidfd
// reports the exit, then reaps a child of ours.
func (p *hostProcess) wait() {
	rc, err := p.pidfd.SyscallConn()
	if err == nil {
		err = rc.Read(func(fd uintptr) bool {
			select {
			case <-p.released:
				return true
			default:
			}
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, _ := unix.Poll(pfd, 0)
			return n > 0
		})
	}
	if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		// Not pollable here: block a thread instead.
		pfd := []unix.PollFd{{Fd: int32(p.pidfd.Fd()), Events: unix.POLLIN}}
		for {
			if _, perr := unix.Poll(pfd, -1); perr != unix.EINTR {
				break
			}
		}
	}
	select {
	case <-p.released:
		p.pidfd.Close() // let go without waiting for the exit
		return
	default:
	}
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
	p.pidfd.Close()
	close(p.done)
}

func (p *hostProcess) PID() int              { return p.rec.PID }
func (p *hostProcess) Done() <-chan struct{} { return p.done }
func (p *hostProcess) Exit() ExitStatus      { return p.exit }
func (p *hostProcess) Record() ProcessRecord { return p.rec }

// Signal sends sig to the process group; if the process left its group
// (setsid), to the process alone through the pidfd.
func (p *hostProcess) Signal(sig syscall.Signal) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	err := unix.Kill(-p.rec.PID, sig)
	if errors.Is(err, unix.ESRCH) {
		err = unix.PidfdSendSignal(int(p.pidfd.Fd()), sig, nil, 0)
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
	p.release.Do(func() {
		close(p.released)
		// Wake the poller so wait returns.
		_ = p.pidfd.SetReadDeadline(time.Now())
	})
	return nil
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
