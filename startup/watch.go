package startup

import (
	"context"
	"sync/atomic"
	"time"
)

// Schedule says how often a probe runs.
type Schedule struct {
	// Period between checks once the container has been ready.
	Period time.Duration
	// Timeout bounds one check.
	Timeout time.Duration
	// Fast is the interval between checks until the first success. It is
	// what makes the gate react within milliseconds.
	Fast time.Duration
	// Align puts the checks after the first success on a grid of Period
	// that every aligned watch shares, so the probes of hundreds of
	// containers wake the agent once per period, together, instead of each
	// on a tick of its own. Loopback TCP probes with Listeners go further:
	// one sweep per period checks them all from one table (sweep.go).
	Align bool
}

// Result is one check's outcome.
type Result struct {
	Err error // nil when ready
	// Failures counts consecutive failed checks, 0 after a success.
	Failures int
	// At is when the check finished.
	At time.Time
}

// OK reports whether the check passed.
func (r Result) OK() bool { return r.Err == nil }

// Watch runs p on schedule s and calls report with every result until ctx
// ends. It never calls report after it returns. It is meant to run in its
// own goroutine, one per probed container.
func Watch(ctx context.Context, p Probe, s Schedule, report func(Result)) {
	if s.Period <= 0 {
		s.Period = time.Second
	}
	if s.Timeout <= 0 {
		s.Timeout = time.Second
	}
	if s.Fast <= 0 || s.Fast > s.Period {
		s.Fast = s.Period
	}
	// Until the first success a TCP probe connects: the gate must see the
	// listener of this start, which a table read up to MaxAge ago (and
	// perhaps still showing the listener of the process before) cannot
	// vouch for.
	fast := p
	if tp, ok := p.(TCP); ok && tp.Listeners != nil {
		tp.Listeners = nil
		fast = tp
	}
	everReady := false
	failures := 0
	starting.Add(1)
	defer func() {
		if !everReady {
			starting.Add(-1)
		}
	}()
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cctx, cancel := context.WithTimeout(ctx, s.Timeout)
		var err error
		if everReady {
			err = p.Check(cctx)
		} else {
			err = fast.Check(cctx)
		}
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			failures = 0
			if !everReady {
				starting.Add(-1)
			}
			everReady = true
		} else {
			failures++
		}
		report(Result{Err: err, Failures: failures, At: time.Now()})
		if everReady && s.Align {
			if tp, ok := p.(TCP); ok && tp.Listeners != nil {
				if targets, ok := loopbackTargets(tp.Addr); ok {
					// From here on the node's sweep checks it.
					tp.Listeners.follow(ctx, tp.Addr, targets, s, failures, report)
					return
				}
			}
		}
		next := s.Period
		switch {
		case !everReady:
			next = fastInterval(s.Fast, starting.Load())
		case s.Align:
			next = untilGrid(time.Now(), s.Period)
		}
		t.Reset(next)
	}
}

// starting counts this process's watches still before their first success.
// Each polls every Fast (a millisecond by default, which is what lets a
// gate open within a few of them); together, on a node starting 200 pods at
// once, they would connect 200,000 times a second. fastInterval stretches
// the interval once more than a handful are starting, so that all of them
// together stay near fastBudget checks a second: the single pod start keeps
// its millisecond, a mass start spends a fraction of a core, not all of it.
var starting atomic.Int64

const fastBudget = 10_000 // checks a second by every starting probe together

func fastInterval(fast time.Duration, starting int64) time.Duration {
	return max(fast, time.Duration(starting)*time.Second/fastBudget)
}

// untilGrid is the time from now to the next multiple of period since the
// Unix epoch: the same instant for every aligned watch of that period.
func untilGrid(now time.Time, period time.Duration) time.Duration {
	return period - time.Duration(now.UnixNano()%int64(period))
}
