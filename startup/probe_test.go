package startup

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestProbes(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	closedAddr := closed.Addr().String()
	closed.Close()

	sock := filepath.Join(t.TempDir(), "s.sock")
	uln, err := net.Listen("unix", sock)
	require.NoError(t, err)
	defer uln.Close()

	var status atomic.Int32
	status.Store(200)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(int(status.Load()))
	}))
	defer srv.Close()

	for _, tc := range []struct {
		name  string
		probe Probe
		ok    bool
	}{
		{"tcp open", TCP{Addr: ln.Addr().String()}, true},
		{"tcp closed", TCP{Addr: closedAddr}, false},
		{"unix open", Unix{Path: sock}, true},
		{"unix missing", Unix{Path: sock + ".nope"}, false},
		{"http 200", HTTP{URL: srv.URL}, true},
		{"http bad url", HTTP{URL: "http://127.0.0.1:1/x"}, false},
		{"exec true", Exec{Command: []string{"true"}}, true},
		{"exec false", Exec{Command: []string{"false"}}, false},
		{"exec empty", Exec{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.probe.Check(context.Background())
			if tc.ok {
				assert.NoError(t, err)
			} else {
				assert.Error(t, err)
				assert.NotEmpty(t, tc.probe.String())
			}
		})
	}
	status.Store(503)
	err = HTTP{URL: srv.URL}.Check(context.Background())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "status 503")
}

func TestExecProbeTimeout(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := Exec{Command: []string{"sleep", "10"}}.Check(ctx)
	require.Error(t, err)
	assert.Less(t, time.Since(start), 5*time.Second)
}

// countingProbe fails until ready is set.
type countingProbe struct {
	ready atomic.Bool
	calls atomic.Int32
}

func (p *countingProbe) Check(context.Context) error {
	p.calls.Add(1)
	if p.ready.Load() {
		return nil
	}
	return os.ErrNotExist
}
func (p *countingProbe) String() string { return "counting" }

func TestWatchFastUntilReadyThenPeriod(t *testing.T) {
	p := &countingProbe{}
	ctx, cancel := context.WithCancel(context.Background())
	results := make(chan Result, 1000)
	done := make(chan struct{})
	go func() {
		defer close(done)
		Watch(ctx, p, Schedule{Period: time.Hour, Fast: time.Millisecond, Timeout: time.Second}, func(r Result) { results <- r })
	}()
	// Fast while never ready: many checks in 100 ms.
	time.Sleep(100 * time.Millisecond)
	assert.Greater(t, int(p.calls.Load()), 10, "fast interval until first success")
	p.ready.Store(true)
	var last Result
	for r := range results {
		if r.OK() {
			last = r
			break
		}
		assert.Equal(t, int(p.calls.Load()) > 0, true)
	}
	assert.Equal(t, 0, last.Failures)
	// After success, the period (an hour) applies: no more checks.
	n := p.calls.Load()
	time.Sleep(50 * time.Millisecond)
	assert.Equal(t, n, p.calls.Load(), "period after the first success")
	cancel()
	<-done
}

func TestWatchCountsConsecutiveFailures(t *testing.T) {
	p := &countingProbe{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var got []int
	done := make(chan struct{})
	go func() {
		defer close(done)
		Watch(ctx, p, Schedule{Period: time.Millisecond}, func(r Result) {
			got = append(got, r.Failures)
			if len(got) == 3 {
				cancel()
			}
		})
	}()
	<-done
	assert.Equal(t, []int{1, 2, 3}, got)
}

func TestGate(t *testing.T) {
	var g Gate
	assert.False(t, g.IsOpen())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	assert.ErrorIs(t, g.Wait(ctx), ErrClosedGate)

	woke := make(chan time.Time, 3)
	for i := 0; i < 3; i++ {
		go func() {
			_ = g.Wait(context.Background())
			woke <- time.Now()
		}()
	}
	time.Sleep(10 * time.Millisecond)
	opened := time.Now()
	g.Open()
	for i := 0; i < 3; i++ {
		w := <-woke
		assert.Less(t, w.Sub(opened), time.Second, "every waiter wakes on open")
	}
	assert.True(t, g.IsOpen())
	assert.NoError(t, g.Wait(context.Background()), "an open gate does not block")
	g.Close()
	assert.False(t, g.IsOpen())
	assert.ErrorIs(t, g.Wait(ctx), ErrClosedGate)
}

func BenchmarkTCPProbe(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	p := TCP{Addr: ln.Addr().String()}
	for b.Loop() {
		if err := p.Check(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
}
