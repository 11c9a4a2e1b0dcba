package loadgen

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Bounds of a run. They keep a typo from turning into an hour of traffic or
// an unbounded amount of memory for per-request latencies.
const (
	MaxDuration  = time.Hour
	MaxRate      = 100_000
	MaxTimeout   = time.Minute
	MinWindow    = 10 * time.Millisecond
	maxErrorKeys = 20 // distinct "other" error texts kept as samples
)

// ErrNotLoopback is returned (wrapped) for a target, or an address the dialer
// was about to connect to, that is not on the loopback interface.
var ErrNotLoopback = errors.New("not a loopback address (load is only sent to loopback)")

// Config describes one run. The zero value of every optional field picks the
// default given with it.
type Config struct {
	Target       string        // http://127.0.0.1:PORT/path or http://localhost:PORT/path; required
	Rate         float64       // requests per second, open loop; required, at most MaxRate
	Duration     time.Duration // how long to schedule requests; required, at most MaxDuration
	NewConnRatio float64       // share of requests on a connection of their own, 0 to 1 (default 0: all keep-alive)
	Timeout      time.Duration // per request, connect to last body byte (default 2s)
	Window       time.Duration // length of the per-window statistics (default 1s)
	MaxInFlight  int           // outstanding requests before due ones are skipped (default 4096)
	Method       string        // HTTP method (default GET; POST disables Go's transparent retries)

	// OnWindow, if set, is called with each window's statistics, in order,
	// as soon as every request scheduled in it has finished: a running
	// report. It is called from one goroutine and must not block for long.
	OnWindow func(Window)
}

// Counts holds how many requests ended in each outcome. Retried counts
// requests Go's client sent more than once; they are also counted by their
// final outcome.
type Counts struct {
	OK      int64 `json:"ok"`
	Refused int64 `json:"refused"`
	Reset   int64 `json:"reset"`
	EOF     int64 `json:"eof"`
	Timeout int64 `json:"timeout"`
	Non2xx  int64 `json:"non2xx"`
	Other   int64 `json:"other"`
	Skipped int64 `json:"skipped"`
	Retried int64 `json:"retried"`
}

func (c *Counts) ptr(o Outcome) *int64 {
	switch o {
	case OK:
		return &c.OK
	case Refused:
		return &c.Refused
	case Reset:
		return &c.Reset
	case EOF:
		return &c.EOF
	case Timeout:
		return &c.Timeout
	case Non2xx:
		return &c.Non2xx
	case Skipped:
		return &c.Skipped
	default:
		return &c.Other
	}
}

// Get returns the count for one outcome.
func (c Counts) Get(o Outcome) int64 { return *c.ptr(o) }

// Failed is every request that was sent and did not get a 2xx answer.
func (c Counts) Failed() int64 {
	return c.Refused + c.Reset + c.EOF + c.Timeout + c.Non2xx + c.Other
}

// Scheduled is every request that was due, sent or skipped.
func (c Counts) Scheduled() int64 { return c.OK + c.Failed() + c.Skipped }

func (c *Counts) add(o Counts) {
	for i := Outcome(0); i < numOutcomes; i++ {
		*c.ptr(i) += o.Get(i)
	}
	c.Retried += o.Retried
}

// Latency summarises the latencies of requests that got an answer (2xx or
// not), measured from each request's due time.
type Latency struct {
	N    int           `json:"n"`
	P50  time.Duration `json:"p50_ns"`
	P90  time.Duration `json:"p90_ns"`
	P99  time.Duration `json:"p99_ns"`
	P999 time.Duration `json:"p999_ns"`
	Max  time.Duration `json:"max_ns"`
}

// summarize sorts lats in place.
func summarize(lats []time.Duration) Latency {
	if len(lats) == 0 {
		return Latency{}
	}
	sort.Slice(lats, func(i, j int) bool { return lats[i] < lats[j] })
	rank := func(p float64) time.Duration { // nearest rank
		i := int(math.Ceil(p*float64(len(lats)))) - 1
		return lats[max(i, 0)]
	}
	return Latency{N: len(lats), P50: rank(0.50), P90: rank(0.90), P99: rank(0.99), P999: rank(0.999), Max: lats[len(lats)-1]}
}

// Window is the statistics of the requests due in [Start, Start+Length) of
// the run.
type Window struct {
	Index   int           `json:"index"`
	Start   time.Duration `json:"start_ns"`
	Length  time.Duration `json:"length_ns"`
	Counts  Counts        `json:"counts"`
	Latency Latency       `json:"latency"`
}

// Result is the outcome of a whole run.
type Result struct {
	Target       string        `json:"target"`
	Rate         float64       `json:"rate"`
	Duration     time.Duration `json:"duration_ns"`
	NewConnRatio float64       `json:"new_conn_ratio"`
	Method       string        `json:"method"`
	Elapsed      time.Duration `json:"elapsed_ns"` // start to the last answer
	Stopped      bool          `json:"stopped"`    // ctx ended before Duration
	Counts       Counts        `json:"counts"`
	Latency      Latency       `json:"latency"`
	Windows      []Window      `json:"windows"`
	// OtherErrors holds up to 20 distinct texts of "other" errors with how
	// often each occurred, so an unexpected failure can be diagnosed.
	OtherErrors map[string]int64 `json:"other_errors,omitempty"`
}

// withDefaults validates c and fills in the defaults.
func (c Config) withDefaults() (Config, *url.URL, error) {
	u, err := checkTarget(c.Target)
	if err != nil {
		return c, nil, err
	}
	switch {
	case !(c.Rate > 0) || c.Rate > MaxRate:
		return c, nil, fmt.Errorf("loadgen: rate %v: want more than 0 and at most %d requests per second", c.Rate, MaxRate)
	case c.Duration <= 0 || c.Duration > MaxDuration:
		return c, nil, fmt.Errorf("loadgen: duration %s: want more than 0 and at most %s", c.Duration, MaxDuration)
	case !(c.NewConnRatio >= 0 && c.NewConnRatio <= 1):
		return c, nil, fmt.Errorf("loadgen: new-conn ratio %v: want 0 to 1", c.NewConnRatio)
	case c.Timeout < 0 || c.Timeout > MaxTimeout:
		return c, nil, fmt.Errorf("loadgen: timeout %s: want 0 (default) to %s", c.Timeout, MaxTimeout)
	case c.Window != 0 && c.Window < MinWindow:
		return c, nil, fmt.Errorf("loadgen: window %s: want 0 (default) or at least %s", c.Window, MinWindow)
	case c.MaxInFlight < 0:
		return c, nil, fmt.Errorf("loadgen: max in-flight %d: must not be negative", c.MaxInFlight)
	}
	if c.Timeout == 0 {
		c.Timeout = 2 * time.Second
	}
	if c.Window == 0 {
		c.Window = time.Second
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = 4096
	}
	if c.Method == "" {
		c.Method = http.MethodGet
	}
	for _, r := range c.Method {
		if r < 'A' || r > 'Z' {
			return c, nil, fmt.Errorf("loadgen: method %q: want an upper-case HTTP method such as GET or POST", c.Method)
		}
	}
	return c, u, nil
}

// checkTarget accepts only http URLs whose host is a loopback IP or
// "localhost".
func checkTarget(target string) (*url.URL, error) {
	if target == "" {
		return nil, errors.New("loadgen: target: required (an http://127.0.0.1:PORT/ URL)")
	}
	u, err := url.Parse(target)
	if err != nil {
		return nil, fmt.Errorf("loadgen: target %q: %w", target, err)
	}
	if u.Scheme != "http" {
		return nil, fmt.Errorf("loadgen: target %q: scheme %q: only http is supported", target, u.Scheme)
	}
	host := u.Hostname()
	if host == "" {
		return nil, fmt.Errorf("loadgen: target %q: no host", target)
	}
	if host != "localhost" {
		ip := net.ParseIP(host)
		if ip == nil || !ip.IsLoopback() {
			return nil, fmt.Errorf("loadgen: target %q: host %q: %w", target, host, ErrNotLoopback)
		}
	}
	return u, nil
}

// loopbackOnly is the dialer's last word: whatever a name resolved to, only
// loopback addresses are connected to.
func loopbackOnly(network, address string, _ syscall.RawConn) error {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return fmt.Errorf("dial %s %s: %w", network, address, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("dial %s %s: %w", network, address, ErrNotLoopback)
	}
	return nil
}

// window collects one window's outcomes while its requests finish.
type window struct {
	scheduled int            // requests due in this window; the scheduler's alone
	wg        sync.WaitGroup // requests scheduled in this window still running
	mu        sync.Mutex
	c         Counts
	lats      []time.Duration
}

func (w *window) record(o Outcome, lat time.Duration, retried bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	*w.c.ptr(o)++
	if retried {
		w.c.Retried++
	}
	if o == OK || o == Non2xx {
		w.lats = append(w.lats, lat)
	}
}

// Run sends the load described by cfg and returns what happened. It returns
// an error only for a bad Config; failed requests are results, not errors.
// When ctx ends early no more requests are sent, the ones in flight finish
// (each within Timeout) and the partial result is returned with Stopped set.
func Run(ctx context.Context, cfg Config) (Result, error) {
	cfg, u, err := cfg.withDefaults()
	if err != nil {
		return Result{}, err
	}
	dialer := &net.Dialer{Timeout: cfg.Timeout, Control: loopbackOnly}
	newTransport := func(keepAlive bool) *http.Transport {
		return &http.Transport{
			// No Proxy: an HTTP_PROXY in the environment must not send our
			// loopback traffic anywhere else.
			DialContext:         dialer.DialContext,
			DisableKeepAlives:   !keepAlive,
			MaxIdleConnsPerHost: cfg.MaxInFlight,
			IdleConnTimeout:     90 * time.Second,
			DisableCompression:  true,
		}
	}
	keepTr, freshTr := newTransport(true), newTransport(false)
	defer keepTr.CloseIdleConnections()
	defer freshTr.CloseIdleConnections()
	noRedirect := func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	keepClient := &http.Client{Transport: keepTr, CheckRedirect: noRedirect}
	freshClient := &http.Client{Transport: freshTr, CheckRedirect: noRedirect}

	var (
		otherMu sync.Mutex
		others  = map[string]int64{}
	)
	noteOther := func(err error) {
		otherMu.Lock()
		defer otherMu.Unlock()
		k := err.Error()
		if _, ok := others[k]; ok || len(others) < maxErrorKeys {
			others[k]++
		}
	}

	total := int64(math.Round(cfg.Rate * cfg.Duration.Seconds()))
	total = max(total, 1)
	nWindows := int((cfg.Duration + cfg.Window - 1) / cfg.Window)
	windows := make([]*window, nWindows)
	for i := range windows {
		windows[i] = &window{}
	}
	res := Result{
		Target: u.String(), Rate: cfg.Rate, Duration: cfg.Duration,
		NewConnRatio: cfg.NewConnRatio, Method: cfg.Method,
	}

	// The reporter closes windows in order: the scheduler hands it each
	// window index once no more requests will be scheduled in it.
	passed := make(chan int, nWindows)
	reported := make(chan []Window, 1)
	go func() {
		var out []Window
		for i := range passed {
			w := windows[i]
			w.wg.Wait()
			start := time.Duration(i) * cfg.Window
			win := Window{Index: i, Start: start, Length: min(cfg.Window, cfg.Duration-start),
				Counts: w.c, Latency: summarize(append([]time.Duration(nil), w.lats...))}
			out = append(out, win)
			if cfg.OnWindow != nil {
				cfg.OnWindow(win)
			}
		}
		reported <- out
	}()

	sem := make(chan struct{}, cfg.MaxInFlight)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	start := time.Now()
	cur := 0
schedule:
	for i := int64(0); i < total; i++ {
		dueOff := time.Duration(float64(i) * float64(time.Second) / cfg.Rate)
		wi := min(int(dueOff/cfg.Window), nWindows-1)
		for ; cur < wi; cur++ {
			passed <- cur
		}
		if wait := dueOff - time.Since(start); wait > 0 {
			timer.Reset(wait)
			select {
			case <-ctx.Done():
				res.Stopped = true
				break schedule
			case <-timer.C:
			}
		} else if ctx.Err() != nil {
			res.Stopped = true
			break schedule
		}
		w := windows[wi]
		w.scheduled++
		select {
		case sem <- struct{}{}:
		default:
			w.record(Skipped, 0, false)
			continue
		}
		newConn := math.Floor(float64(i+1)*cfg.NewConnRatio) > math.Floor(float64(i)*cfg.NewConnRatio)
		client := keepClient
		if newConn {
			client = freshClient
		}
		due := start.Add(dueOff)
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			defer func() { <-sem }()
			o, retried, err := do(client, cfg.Method, u.String(), cfg.Timeout)
			if o == Other {
				noteOther(err)
			}
			w.record(o, time.Since(due), retried)
		}()
	}
	for ; cur < nWindows; cur++ {
		if res.Stopped && cur > 0 && windows[cur].scheduled == 0 {
			break
		}
		passed <- cur
	}
	close(passed)
	res.Windows = <-reported
	res.Elapsed = time.Since(start)

	var all []time.Duration
	for i := range res.Windows {
		res.Counts.add(res.Windows[i].Counts)
		all = append(all, windows[i].lats...)
	}
	res.Latency = summarize(all)
	if len(others) > 0 {
		res.OtherErrors = others
	}
	return res, nil
}

// do sends one request and reads the whole answer. The request's context is
// not the run's: a run stopped early lets its in-flight requests finish, so
// they are counted by what the server did, not by our stopping.
func do(client *http.Client, method, target string, timeout time.Duration) (Outcome, bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var attempts atomic.Int32
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		GetConn: func(string) { attempts.Add(1) },
	})
	req, err := http.NewRequestWithContext(ctx, method, target, nil)
	if err != nil {
		return Other, false, err
	}
	resp, err := client.Do(req)
	status := 0
	if err == nil {
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		status = resp.StatusCode
	}
	return classify(err, status), attempts.Load() > 1, err
}
