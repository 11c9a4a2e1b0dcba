package cgroup

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"time"
	"unsafe"

	"github.com/containerd/cgroups/v3/cgroup1"
	"golang.org/x/sys/unix"
)

// OOMEvent reports that the OOM killer killed processes of a container.
type OOMEvent struct {
	Pod       string
	Container string
	Group     Group
	Kills     uint64 // kills since the previous event (or since Add)
	Time      time.Time
}

// OOMWatcher watches pods for OOM kills and attributes each kill to the
// container whose group lost the process.
//
// The kernel tells that an OOM happened (v1: an eventfd registered on
// memory.oom_control through cgroup.event_control, signalled for the group
// that hit its limit and all groups below it; v2: memory.events is modified,
// seen with inotify). Who was killed is read from the per-container
// oom_kill counters (v1 memory.oom_control, v2 memory.events), which count
// kills in the victim's own group. On v1 the notification comes before the
// kill, so a woken pod is re-read every hotPoll for hotFor. A slow sweep
// every sweepEvery is the backstop for kills no memcg event announces: a
// node-wide OOM that takes a process other than a container's first (the
// supervisor reads the counter itself whenever a container exits, so a
// killed container is attributed at once without it). At 200 pods a sweep
// reads 400 files, which at a 2 s sweep was a fifth of the agent's idle CPU.
//
// One goroutine (the caller of Run) owns the epoll loop; Add and Remove may
// be called from others. Close releases every fd once Run has returned.
type OOMWatcher struct {
	m     *Manager
	epfd  int
	wake  int // eventfd that interrupts epoll_wait when ctx ends
	inofd int // v2 only; -1 on v1

	mu     sync.Mutex
	pods   map[string]*oomPod
	byFD   map[int32]string // v1 eventfd -> pod
	byWD   map[int32]string // v2 inotify watch -> pod
	closed bool
}

type oomPod struct {
	name       string
	containers []*oomContainer
	fds        []int
	wds        []int
	hotUntil   time.Time
}

type oomContainer struct {
	name    string
	group   Group
	counter string // file holding "oom_kill N"
	last    uint64
}

const (
	hotPoll    = 20 * time.Millisecond
	hotFor     = time.Second
	sweepEvery = 30 * time.Second
)

// NewOOMWatcher creates a watcher; call Close when done with it.
func (m *Manager) NewOOMWatcher() (_ *OOMWatcher, err error) {
	w := &OOMWatcher{m: m, epfd: -1, wake: -1, inofd: -1,
		pods: map[string]*oomPod{}, byFD: map[int32]string{}, byWD: map[int32]string{}}
	defer func() {
		if err != nil {
			w.Close()
		}
	}()
	if w.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return nil, fmt.Errorf("oom watcher: epoll: %w", err)
	}
	if w.wake, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return nil, fmt.Errorf("oom watcher: eventfd: %w", err)
	}
	if err = w.poll(w.wake); err != nil {
		return nil, err
	}
	if !m.mode.v1() {
		if w.inofd, err = unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK); err != nil {
			return nil, fmt.Errorf("oom watcher: inotify: %w", err)
		}
		if err = w.poll(w.inofd); err != nil {
			return nil, err
		}
	}
	return w, nil
}

func (w *OOMWatcher) poll(fd int) error {
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}
	if err := unix.EpollCtl(w.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return fmt.Errorf("oom watcher: epoll add fd %d: %w", fd, err)
	}
	return nil
}

// Add starts watching a pod: its own group (where a pod-level OOM is
// signalled) and its containers (whose counters say who was killed). Kills
// that happened before Add are not reported. Adding a pod again replaces it.
func (w *OOMWatcher) Add(pod string, podGroup Group, containers []Container) (err error) {
	if _, err := podGroup.clean(); err != nil {
		return fmt.Errorf("oom watch pod %s: %w", pod, err)
	}
	w.mu.Lock()
	closed := w.closed
	w.mu.Unlock()
	if closed {
		// The epoll fd number may already belong to someone else.
		return fmt.Errorf("oom watch pod %s: watcher closed", pod)
	}
	w.Remove(pod)
	p := &oomPod{name: pod}
	defer func() {
		if err != nil {
			w.release(p)
		}
	}()
	for _, c := range containers {
		g, err := c.Group.clean()
		if err != nil {
			return fmt.Errorf("oom watch pod %s container %s: %w", pod, c.Name, err)
		}
		oc := &oomContainer{name: c.Name, group: Group(g), counter: w.counterFile(Group(g))}
		if oc.last, err = readCounter(oc.counter); err != nil {
			return fmt.Errorf("oom watch pod %s container %s: %w", pod, c.Name, err)
		}
		p.containers = append(p.containers, oc)
	}
	groups := []Group{podGroup}
	for _, c := range p.containers {
		groups = append(groups, c.group)
	}
	for _, g := range groups {
		if w.m.mode.v1() {
			cg, err := cgroup1.Load(cgroup1.StaticPath("/"+string(g)), cgroup1.WithHierarchy(w.memoryOnly))
			if err != nil {
				return fmt.Errorf("oom watch pod %s group %s: %w", pod, g, err)
			}
			fd, err := cg.OOMEventFD()
			if err != nil {
				return fmt.Errorf("oom watch pod %s group %s: register oom eventfd: %w", pod, g, err)
			}
			p.fds = append(p.fds, int(fd))
			// Non-blocking: Run reads only what epoll reported, but the fd
			// number may be reused between the two by a Remove and an Add.
			if err := unix.SetNonblock(int(fd), true); err != nil {
				return fmt.Errorf("oom watch pod %s: %w", pod, err)
			}
			if err := w.poll(int(fd)); err != nil {
				return fmt.Errorf("oom watch pod %s: %w", pod, err)
			}
			continue
		}
		f := filepath.Join(w.m.dir("memory", g), "memory.events")
		wd, err := unix.InotifyAddWatch(w.inofd, f, unix.IN_MODIFY)
		if err != nil {
			return fmt.Errorf("oom watch pod %s: inotify %s: %w", pod, f, err)
		}
		p.wds = append(p.wds, wd)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return fmt.Errorf("oom watch pod %s: watcher closed", pod)
	}
	w.pods[pod] = p
	for _, fd := range p.fds {
		w.byFD[int32(fd)] = pod
	}
	for _, wd := range p.wds {
		w.byWD[int32(wd)] = pod
	}
	return nil
}

func (w *OOMWatcher) memoryOnly() ([]cgroup1.Subsystem, error) {
	return []cgroup1.Subsystem{cgroup1.NewMemory(w.m.root)}, nil
}

func (w *OOMWatcher) counterFile(g Group) string {
	if w.m.mode.v1() {
		return filepath.Join(w.m.dir("memory", g), "memory.oom_control")
	}
	return filepath.Join(w.m.dir("memory", g), "memory.events")
}

func readCounter(file string) (uint64, error) {
	kv, err := readKV(file)
	if err != nil {
		return 0, err
	}
	return kv["oom_kill"], nil
}

// Remove stops watching a pod and releases its fds.
func (w *OOMWatcher) Remove(pod string) {
	w.mu.Lock()
	p := w.pods[pod]
	delete(w.pods, pod)
	if p != nil {
		for _, fd := range p.fds {
			delete(w.byFD, int32(fd))
		}
		for _, wd := range p.wds {
			delete(w.byWD, int32(wd))
		}
	}
	w.mu.Unlock()
	if p != nil {
		w.release(p)
	}
}

func (w *OOMWatcher) release(p *oomPod) {
	for _, fd := range p.fds {
		// Closing the last reference also drops it from the epoll set.
		unix.Close(fd)
	}
	p.fds = nil
	for _, wd := range p.wds {
		unix.InotifyRmWatch(w.inofd, uint32(wd)) // fails harmlessly if the group is gone
	}
	p.wds = nil
}

// Run delivers OOM events on out until ctx ends, then returns nil. Sends
// block (the supervisor must see every kill) but give up when ctx ends.
func (w *OOMWatcher) Run(ctx context.Context, out chan<- OOMEvent) error {
	stop := context.AfterFunc(ctx, func() {
		var one = [8]byte{1}
		unix.Write(w.wake, one[:])
	})
	defer stop()
	evs := make([]unix.EpollEvent, 32)
	lastSweep := time.Now()
	for {
		if ctx.Err() != nil {
			return nil
		}
		timeout := sweepEvery - time.Since(lastSweep)
		if w.anyHot() {
			timeout = min(timeout, hotPoll)
		}
		n, err := unix.EpollWait(w.epfd, evs, int(max(timeout, 0)/time.Millisecond))
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("oom watcher: epoll_wait: %w", err)
		}
		now := time.Now()
		for _, ev := range evs[:max(n, 0)] {
			switch ev.Fd {
			case int32(w.wake):
				var b [8]byte
				unix.Read(w.wake, b[:])
			case int32(w.inofd):
				w.readInotify(now)
			default:
				w.mu.Lock()
				if pod, ok := w.byFD[ev.Fd]; ok {
					var b [8]byte
					unix.Read(int(ev.Fd), b[:])
					w.pods[pod].hotUntil = now.Add(hotFor)
				}
				w.mu.Unlock()
			}
		}
		sweep := now.Sub(lastSweep) >= sweepEvery
		if sweep {
			lastSweep = now
		}
		for _, e := range w.scan(now, sweep) {
			select {
			case out <- e:
			case <-ctx.Done():
				return nil
			}
		}
	}
}

func (w *OOMWatcher) anyHot() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := time.Now()
	for _, p := range w.pods {
		if now.Before(p.hotUntil) {
			return true
		}
	}
	return false
}

func (w *OOMWatcher) readInotify(now time.Time) {
	var buf [4096]byte
	for {
		n, err := unix.Read(w.inofd, buf[:])
		if n <= 0 || err != nil {
			return
		}
		w.mu.Lock()
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			if p := w.pods[w.byWD[ev.Wd]]; p != nil {
				// v2 updates memory.events as it counts, no need to linger.
				p.hotUntil = now.Add(hotPoll)
			}
			off += unix.SizeofInotifyEvent + int(ev.Len)
		}
		w.mu.Unlock()
	}
}

// scan reads the counters of hot pods (all pods on a sweep) and returns an
// event per container whose counter grew.
func (w *OOMWatcher) scan(now time.Time, all bool) []OOMEvent {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []OOMEvent
	for _, p := range w.pods {
		if !all && !now.Before(p.hotUntil) {
			continue
		}
		for _, c := range p.containers {
			v, err := readCounter(c.counter)
			if err != nil || v <= c.last {
				continue // a removed group reads as an error; Remove cleans up
			}
			out = append(out, OOMEvent{Pod: p.name, Container: c.name, Group: c.group, Kills: v - c.last, Time: now})
			c.last = v
		}
	}
	return out
}

// Close releases every fd. Call it after Run has returned.
func (w *OOMWatcher) Close() error {
	w.mu.Lock()
	pods := w.pods
	w.pods, w.byFD, w.byWD = map[string]*oomPod{}, map[int32]string{}, map[int32]string{}
	already := w.closed
	w.closed = true
	w.mu.Unlock()
	if already {
		return nil
	}
	for _, p := range pods {
		w.release(p)
	}
	for _, fd := range []int{w.inofd, w.wake, w.epfd} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
	return nil
}
