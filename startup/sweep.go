package startup

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"time"
)

// A sweep runs the steady-state checks of every loopback TCP probe that
// shares a Listeners and a period: one goroutine wakes once per period,
// reads one table and answers every probe from it. A goroutine and a timer
// of its own per probe cost the agent more in scheduling than the checks
// themselves (about 40µs a check on a quiet machine, several times that in
// a busy agent); a sweep costs one dump and a map lookup per probe.
//
// A probe the table cannot answer in a sweep (its listener is gone) is
// dialled, and a failure or recovery reported, on a goroutine of its own,
// so one slow connect or busy pod never holds up the others' checks.
type sweep struct {
	l      *Listeners
	period time.Duration
	stop   chan struct{} // closed when the last entry leaves

	mu      sync.Mutex
	entries map[*sweepEntry]struct{}
}

type sweepEntry struct {
	addr    string
	targets []netip.AddrPort // addr parsed once
	dial    func() error     // a connect bounded by the probe's timeout

	mu       sync.Mutex // held while reporting, so leave waits for it
	failures int
	report   func(Result)
	gone     bool // left: never report again
	dialing  bool // a connect or a report is in flight off the sweep
}

// follow reports on addr (parsed into targets) from the sweep of s.Period until ctx ends, starting
// from failures consecutive failures. It returns only once it will never
// call report again.
func (l *Listeners) follow(ctx context.Context, addr string, targets []netip.AddrPort, s Schedule, failures int, report func(Result)) {
	e := &sweepEntry{addr: addr, targets: targets, failures: failures, report: report}
	e.dial = func() error {
		cctx, cancel := context.WithTimeout(ctx, s.Timeout)
		defer cancel()
		return dialCheck(cctx, "tcp", addr)
	}
	sw := l.join(s.Period, e)
	<-ctx.Done()
	e.mu.Lock()
	e.gone = true
	e.mu.Unlock()
	l.leave(sw, e)
}

func (l *Listeners) join(period time.Duration, e *sweepEntry) *sweep {
	l.smu.Lock()
	defer l.smu.Unlock()
	if l.sweeps == nil {
		l.sweeps = map[time.Duration]*sweep{}
	}
	sw := l.sweeps[period]
	if sw == nil {
		sw = &sweep{l: l, period: period, stop: make(chan struct{}), entries: map[*sweepEntry]struct{}{}}
		l.sweeps[period] = sw
		go sw.run()
	}
	sw.mu.Lock()
	sw.entries[e] = struct{}{}
	sw.mu.Unlock()
	return sw
}

// leave removes e; the last one out stops the sweep, so a node with no
// probes keeps no goroutine for them.
func (l *Listeners) leave(sw *sweep, e *sweepEntry) {
	l.smu.Lock()
	defer l.smu.Unlock()
	sw.mu.Lock()
	delete(sw.entries, e)
	empty := len(sw.entries) == 0
	sw.mu.Unlock()
	if empty {
		close(sw.stop)
		delete(l.sweeps, sw.period)
	}
}

func (sw *sweep) run() {
	t := time.NewTimer(untilGrid(time.Now(), sw.period))
	defer t.Stop()
	for {
		select {
		case <-sw.stop:
			return
		case <-t.C:
		}
		sw.tick()
		t.Reset(untilGrid(time.Now(), sw.period))
	}
}

// tick checks every entry against one table.
func (sw *sweep) tick() {
	sw.mu.Lock()
	entries := make([]*sweepEntry, 0, len(sw.entries))
	for e := range sw.entries {
		entries = append(entries, e)
	}
	sw.mu.Unlock()
	table, terr := sw.l.snapshot()
	for _, e := range entries {
		// Busy (its report is running off the sweep): skip this tick
		// rather than wait for it.
		if !e.mu.TryLock() {
			continue
		}
		if e.gone || e.dialing {
			e.mu.Unlock()
			continue
		}
		err := errNoVerdict
		if terr == nil {
			err = verdictIn(table, e.addr, e.targets)
		}
		if err == nil && e.failures == 0 {
			// Still ready: the common case, reported in line.
			e.deliver(nil)
			e.mu.Unlock()
			continue
		}
		// A failure, a recovery, or no verdict: the report may have to
		// wait for its pod (a supervisor busy starting), and a connect
		// for its timeout. Either happens off the sweep, so one pod never
		// holds up the checks of the others.
		e.dialing = true
		e.mu.Unlock()
		go func() {
			if errors.Is(err, errNoVerdict) {
				err = e.dial()
			}
			e.mu.Lock()
			defer e.mu.Unlock()
			e.dialing = false
			if !e.gone {
				e.deliver(err)
			}
		}()
	}
}

// deliver counts and reports one result; e.mu is held.
func (e *sweepEntry) deliver(err error) {
	if err == nil {
		e.failures = 0
	} else {
		e.failures++
	}
	e.report(Result{Err: err, Failures: e.failures, At: time.Now()})
}
