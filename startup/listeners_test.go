package startup

import (
	"context"
	"errors"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

// rawListen opens a TCP listener with the given family, address, backlog and
// IPV6_V6ONLY setting, which net.Listen does not all expose.
func rawListen(t *testing.T, network, addr string, backlog int, v6only bool) (port int, fd int) {
	t.Helper()
	family := unix.AF_INET
	if network == "tcp6" {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Close(fd) })
	var sa unix.Sockaddr
	ip := net.ParseIP(addr)
	if family == unix.AF_INET6 {
		v := 0
		if v6only {
			v = 1
		}
		require.NoError(t, unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, v))
		s6 := &unix.SockaddrInet6{}
		copy(s6.Addr[:], ip.To16())
		sa = s6
	} else {
		s4 := &unix.SockaddrInet4{}
		copy(s4.Addr[:], ip.To4())
		sa = s4
	}
	require.NoError(t, unix.Bind(fd, sa))
	require.NoError(t, unix.Listen(fd, backlog))
	got, err := unix.Getsockname(fd)
	require.NoError(t, err)
	switch a := got.(type) {
	case *unix.SockaddrInet4:
		return a.Port, fd
	case *unix.SockaddrInet6:
		return a.Port, fd
	}
	t.Fatalf("unexpected sockaddr %T", got)
	return 0, 0
}

// queued reports how many connections wait in fd's accept queue, draining it.
func queued(t *testing.T, fd int) int {
	t.Helper()
	n := 0
	for {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if k, _ := unix.Poll(pfd, 0); k == 0 {
			return n
		}
		c, _, err := unix.Accept(fd)
		if err != nil {
			return n
		}
		unix.Close(c)
		n++
	}
}

func hasIPv6Loopback() bool {
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		return false
	}
	ln.Close()
	return true
}

// TestListenersAgreeWithConnect: for every kind of loopback listener the
// table answers as a connect would, and where it answers it makes no
// connection (the listener's accept queue stays empty).
func TestListenersAgreeWithConnect(t *testing.T) {
	v6 := hasIPv6Loopback()
	port := func(network, addr string, v6only bool) (string, int) {
		p, fd := rawListen(t, network, addr, 16, v6only)
		return strconv.Itoa(p), fd
	}
	closedPort := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer ln.Close()
		_, p, _ := net.SplitHostPort(ln.Addr().String())
		return p
	}
	type tc struct {
		name      string
		addr      string
		fd        int  // the listener that must see no connection, or -1
		ready     bool // what a connect says
		fromTable bool // answered without a connect
	}
	var cases []tc
	p, fd := port("tcp4", "127.0.0.1", false)
	cases = append(cases,
		tc{"v4 exact", "127.0.0.1:" + p, fd, true, true},
		tc{"localhost to v4", "localhost:" + p, fd, true, true},
		tc{"other loopback address", "127.0.0.2:" + p, -1, false, false})
	p, fd = port("tcp4", "0.0.0.0", false)
	cases = append(cases, tc{"v4 wildcard", "127.0.0.1:" + p, fd, true, true},
		tc{"v4 wildcard, other loopback address", "127.0.0.9:" + p, fd, true, true})
	cases = append(cases, tc{"nothing listening", "127.0.0.1:" + closedPort(), -1, false, false})
	if v6 {
		p, fd = port("tcp6", "::1", true)
		cases = append(cases, tc{"v6 exact", "[::1]:" + p, fd, true, true},
			tc{"v4 target, v6-only listener", "127.0.0.1:" + p, -1, false, false})
		p, fd = port("tcp6", "::", false)
		cases = append(cases, tc{"dual-stack wildcard, v4 target", "127.0.0.1:" + p, fd, true, true},
			tc{"dual-stack wildcard, v6 target", "[::1]:" + p, fd, true, true})
		p, _ = port("tcp6", "::", true)
		cases = append(cases, tc{"v6-only wildcard, v4 target", "127.0.0.1:" + p, -1, false, false})
	} else {
		t.Log("no IPv6 loopback here: the v6 cases are left out")
	}

	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := &Listeners{}
			err := l.check(c.addr)
			if c.fromTable {
				require.NoError(t, err, "the table should vouch for %s", c.addr)
				assert.Zero(t, queued(t, c.fd), "answered from the table, yet a connection reached the listener")
			} else {
				assert.ErrorIs(t, err, errNoVerdict, "the table must not answer for %s", c.addr)
			}
			got := TCP{Addr: c.addr, Listeners: l}.Check(context.Background())
			dial := dialCheck(context.Background(), "tcp", c.addr)
			assert.Equal(t, c.ready, got == nil, "probe with table: %v", got)
			assert.Equal(t, dial == nil, got == nil, "table %v, connect %v", got, dial)
			if c.fd >= 0 {
				queued(t, c.fd)
			}
		})
	}
}

// TestListenersSeeFullAcceptQueue: a listener that has stopped accepting is
// not ready once its queue is over its limit; a connect would only learn
// that by timing out.
func TestListenersSeeFullAcceptQueue(t *testing.T) {
	p, fd := rawListen(t, "tcp4", "127.0.0.1", 1, false)
	addr := "127.0.0.1:" + strconv.Itoa(p)
	l := &Listeners{MaxAge: time.Nanosecond}
	require.NoError(t, TCP{Addr: addr, Listeners: l}.Check(context.Background()))

	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	// Fill the queue: with a limit of 1 the kernel queues two, then drops SYNs.
	for range 2 {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		require.NoError(t, err)
		conns = append(conns, c)
	}
	err := TCP{Addr: addr, Listeners: l}.Check(context.Background())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "accept queue full")
	assert.Contains(t, err.Error(), addr)

	// Once the sidecar accepts again, it is ready again.
	assert.Equal(t, 2, queued(t, fd))
	assert.NoError(t, TCP{Addr: addr, Listeners: l}.Check(context.Background()))
}

// TestListenersShareOneDump: probes within MaxAge of each other read one
// table, which is the point of the table.
func TestListenersShareOneDump(t *testing.T) {
	l := &Listeners{MaxAge: time.Hour}
	var addrs []string
	for range 20 {
		p, _ := rawListen(t, "tcp4", "127.0.0.1", 16, false)
		addrs = append(addrs, "127.0.0.1:"+strconv.Itoa(p))
	}
	var wg sync.WaitGroup
	var failed atomic.Int32
	for _, a := range addrs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if (TCP{Addr: a, Listeners: l}).Check(context.Background()) != nil {
				failed.Add(1)
			}
		}()
	}
	wg.Wait()
	assert.Zero(t, failed.Load())
	assert.Equal(t, 1, l.Dumps())

	// A table older than MaxAge is not trusted: a listener closed since is
	// seen as gone.
	l.MaxAge = time.Nanosecond
	p, fd := rawListen(t, "tcp4", "127.0.0.1", 16, false)
	addr := "127.0.0.1:" + strconv.Itoa(p)
	require.NoError(t, TCP{Addr: addr, Listeners: l}.Check(context.Background()))
	unix.Close(fd)
	assert.Error(t, TCP{Addr: addr, Listeners: l}.Check(context.Background()))
}

// TestListenersOutsideLoopbackConnect: a remote or named address is never
// answered from the table.
func TestListenersOutsideLoopbackConnect(t *testing.T) {
	for _, addr := range []string{"10.0.0.1:80", "example.invalid:80", "[fe80::1%lo]:80", "no-port", "127.0.0.1:http"} {
		_, ok := loopbackTargets(addr)
		assert.False(t, ok, addr)
	}
	l := &Listeners{}
	err := l.check("192.0.2.1:80")
	assert.True(t, errors.Is(err, errNoVerdict))
	assert.Zero(t, l.Dumps(), "no dump for an address the table cannot answer")
}

func TestUntilGrid(t *testing.T) {
	base := time.Unix(1_700_000_000, 0) // a multiple of every period below
	for _, c := range []struct {
		now    time.Time
		period time.Duration
		want   time.Duration
	}{
		{base, 5 * time.Second, 5 * time.Second},
		{base.Add(time.Millisecond), 5 * time.Second, 5*time.Second - time.Millisecond},
		{base.Add(4999 * time.Millisecond), 5 * time.Second, time.Millisecond},
		{base.Add(1500 * time.Millisecond), time.Second, 500 * time.Millisecond},
	} {
		got := untilGrid(c.now, c.period)
		assert.Equal(t, c.want, got, "now %v period %v", c.now, c.period)
		assert.Zero(t, c.now.Add(got).UnixNano()%int64(c.period), "lands on the grid")
	}
}

// TestAlignedWatchesShareTables: many aligned watches of one period wake
// together and read a handful of tables, not one each.
func TestAlignedWatchesShareTables(t *testing.T) {
	l := &Listeners{MaxAge: 50 * time.Millisecond}
	const n = 30
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var checks atomic.Int32
	for range n {
		p, _ := rawListen(t, "tcp4", "127.0.0.1", 16, false)
		pr := TCP{Addr: "127.0.0.1:" + strconv.Itoa(p), Listeners: l}
		wg.Add(1)
		go func() {
			defer wg.Done()
			Watch(ctx, pr, Schedule{Period: 200 * time.Millisecond, Fast: time.Millisecond, Align: true}, func(r Result) {
				if r.OK() {
					checks.Add(1)
				}
			})
		}()
	}
	time.Sleep(1100 * time.Millisecond)
	cancel()
	wg.Wait()
	// About 6 ticks of 30 probes: unaligned, each probe would dump its own
	// table nearly every time.
	require.Greater(t, int(checks.Load()), 3*n, "the watches did not run")
	assert.Less(t, l.Dumps(), int(checks.Load())/5, "%d dumps for %d checks", l.Dumps(), checks.Load())
	if os.Getenv("VERBOSE") != "" {
		t.Logf("%d dumps for %d checks", l.Dumps(), checks.Load())
	}
}

// TestSweepFollowsEveryProbe: once ready, aligned loopback probes are
// checked by their sweep: a listener that goes away is reported failing with
// a growing count while the others stay ready, it recovers when the
// listener is back, and after the watches end nothing reports and no sweep
// is left running.
func TestSweepFollowsEveryProbe(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	l := &Listeners{MaxAge: time.Millisecond}
	const n = 20
	type probeState struct {
		mu       sync.Mutex
		oks      int
		failures []int
	}
	states := make([]*probeState, n)
	addrs := make([]string, n)
	fds := make([]int, n)
	for i := range n {
		p, fd := rawListen(t, "tcp4", "127.0.0.1", 16, false)
		addrs[i], fds[i], states[i] = "127.0.0.1:"+strconv.Itoa(p), fd, &probeState{}
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var after atomic.Bool // set once every Watch has returned
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			Watch(ctx, TCP{Addr: addrs[i], Listeners: l}, Schedule{Period: 100 * time.Millisecond, Fast: time.Millisecond, Align: true}, func(r Result) {
				if after.Load() {
					t.Errorf("probe %d reported after its watch returned", i)
				}
				st := states[i]
				st.mu.Lock()
				defer st.mu.Unlock()
				if r.OK() {
					st.oks++
				} else {
					st.failures = append(st.failures, r.Failures)
				}
			})
		}()
	}
	oks := func(i int) int { states[i].mu.Lock(); defer states[i].mu.Unlock(); return states[i].oks }
	fails := func(i int) []int {
		states[i].mu.Lock()
		defer states[i].mu.Unlock()
		return append([]int(nil), states[i].failures...)
	}
	waitUntil(t, 5*time.Second, "every probe checked by the sweep", func() bool {
		for i := range n {
			if oks(i) < 3 {
				return false
			}
		}
		return true
	})
	l.smu.Lock()
	sweeps := len(l.sweeps)
	l.smu.Unlock()
	assert.Equal(t, 1, sweeps, "one sweep for one period")

	// Probe 0's listener goes away: its failures count up; probe 1 stays ready.
	unix.Close(fds[0])
	base1 := oks(1)
	waitUntil(t, 5*time.Second, "probe 0 failing three times in a row", func() bool { return len(fails(0)) >= 3 })
	assert.Equal(t, []int{1, 2, 3}, fails(0)[:3])
	assert.Empty(t, fails(1))
	assert.Greater(t, oks(1), base1)

	// It is back on the same port: ready again.
	port, _ := strconv.Atoi(addrs[0][len("127.0.0.1:"):])
	back, err := net.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(port))
	require.NoError(t, err)
	defer back.Close()
	base0 := oks(0)
	waitUntil(t, 5*time.Second, "probe 0 ready again", func() bool { return oks(0) > base0 })

	cancel()
	wg.Wait()
	after.Store(true)
	time.Sleep(250 * time.Millisecond) // two periods: a stray report would show
	l.smu.Lock()
	assert.Empty(t, l.sweeps, "the last watch out stops the sweep")
	l.smu.Unlock()
	goleak.VerifyNone(t, ignore)
}

func waitUntil(t *testing.T, d time.Duration, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// BenchmarkSteadyProbes200: the CPU of 200 ready loopback TCP probes in
// their steady state, per check, as the agent runs them.
func BenchmarkSteadyProbes200(b *testing.B) {
	const n = 200
	period := 200 * time.Millisecond
	for range b.N {
		l := &Listeners{}
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		var checks atomic.Int64
		for range n {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			wg.Add(1)
			go func() {
				defer wg.Done()
				Watch(ctx, TCP{Addr: ln.Addr().String(), Listeners: l}, Schedule{Period: period, Fast: time.Millisecond, Align: true}, func(Result) { checks.Add(1) })
			}()
		}
		time.Sleep(2 * period)
		c0, n0 := cpuTime(), checks.Load()
		time.Sleep(10 * period)
		c1, n1 := cpuTime(), checks.Load()
		cancel()
		wg.Wait()
		b.ReportMetric(float64((c1-c0).Microseconds())/float64(n1-n0), "cpu-µs/check")
		b.ReportMetric(float64(n1-n0), "checks")
	}
}

func cpuTime() time.Duration {
	var ru unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// TestFastPhaseIgnoresTable: until its first success a probe connects, so a
// table that still shows the listener of a process gone since (the one
// before a restart) cannot open a gate.
func TestFastPhaseIgnoresTable(t *testing.T) {
	l := &Listeners{MaxAge: time.Hour}
	p, fd := rawListen(t, "tcp4", "127.0.0.1", 16, false)
	addr := "127.0.0.1:" + strconv.Itoa(p)
	require.NoError(t, l.check(addr), "the table has the listener")
	unix.Close(fd) // the process is gone; the hour-old table says otherwise

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	var first *Result
	Watch(ctx, TCP{Addr: addr, Listeners: l}, Schedule{Period: time.Second, Fast: time.Millisecond, Align: true}, func(r Result) {
		if first == nil {
			first = &r
		}
	})
	require.NotNil(t, first)
	assert.Error(t, first.Err, "a start-up check must connect, not trust the table")
}

func TestFastInterval(t *testing.T) {
	for _, c := range []struct {
		fast     time.Duration
		starting int64
		want     time.Duration
	}{
		{time.Millisecond, 1, time.Millisecond},
		{time.Millisecond, 10, time.Millisecond},
		{time.Millisecond, 200, 20 * time.Millisecond},
		{50 * time.Millisecond, 200, 50 * time.Millisecond},
	} {
		assert.Equal(t, c.want, fastInterval(c.fast, c.starting), "fast %v, %d starting", c.fast, c.starting)
	}
}

// TestSweepNotHeldUpByOnePod: a probe whose report blocks (its supervisor
// is busy) does not stop the sweep checking the others.
func TestSweepNotHeldUpByOnePod(t *testing.T) {
	l := &Listeners{MaxAge: time.Millisecond}
	pa, fda := rawListen(t, "tcp4", "127.0.0.1", 16, false)
	pb, _ := rawListen(t, "tcp4", "127.0.0.1", 16, false)
	release := make(chan struct{})
	var aReady, bOKs atomic.Int32
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	sched := Schedule{Period: 50 * time.Millisecond, Fast: time.Millisecond, Align: true}
	wg.Add(2)
	go func() {
		defer wg.Done()
		Watch(ctx, TCP{Addr: "127.0.0.1:" + strconv.Itoa(pa), Listeners: l}, sched, func(r Result) {
			if r.OK() {
				aReady.Add(1)
				return
			}
			select { // a supervisor too busy to take the failure
			case <-release:
			case <-ctx.Done():
			}
		})
	}()
	go func() {
		defer wg.Done()
		Watch(ctx, TCP{Addr: "127.0.0.1:" + strconv.Itoa(pb), Listeners: l}, sched, func(r Result) {
			if r.OK() {
				bOKs.Add(1)
			}
		})
	}()
	waitUntil(t, 5*time.Second, "both ready", func() bool { return aReady.Load() > 0 && bOKs.Load() > 0 })
	unix.Close(fda) // a fails; its report blocks
	time.Sleep(2 * sched.Period)
	base := bOKs.Load()
	waitUntil(t, 5*time.Second, "b still checked while a's report blocks", func() bool { return bOKs.Load() >= base+3 })
	close(release)
	cancel()
	wg.Wait()
}
