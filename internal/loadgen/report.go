package loadgen

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// WriteTable prints r for people: the outcome counts, the latency
// percentiles and, with windows, one row per window.
func (r Result) WriteTable(w io.Writer, windows bool) error {
	stopped := ""
	if r.Stopped {
		stopped = " (stopped early)"
	}
	fmt.Fprintf(w, "target %s  %s  rate %g/s  duration %s  new-conn %.2f  elapsed %s%s\n",
		r.Target, r.Method, r.Rate, r.Duration, r.NewConnRatio, r.Elapsed.Round(time.Millisecond), stopped)
	for o := Outcome(0); o < numOutcomes; o++ {
		fmt.Fprintf(w, "  %-8s %10d\n", o, r.Counts.Get(o))
	}
	fmt.Fprintf(w, "  %-8s %10d  (sent again by Go's client after a kept-alive connection closed; counted above by final outcome)\n", "retried", r.Counts.Retried)
	fmt.Fprintf(w, "  %-8s %10d  failed %d\n", "total", r.Counts.Scheduled(), r.Counts.Failed())
	l := r.Latency
	fmt.Fprintf(w, "latency of %d answers, from due time: p50 %s  p90 %s  p99 %s  p99.9 %s  max %s\n",
		l.N, ms(l.P50), ms(l.P90), ms(l.P99), ms(l.P999), ms(l.Max))
	for text, n := range r.OtherErrors {
		fmt.Fprintf(w, "other error x%d: %s\n", n, text)
	}
	if !windows || len(r.Windows) == 0 {
		return nil
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, WindowHeader())
	for _, win := range r.Windows {
		if _, err := fmt.Fprintln(w, win.Row()); err != nil {
			return err
		}
	}
	return nil
}

// colWidth is the fixed width of a window column, so rows printed one by one
// as windows complete line up with the header.
const colWidth = 9

// WindowHeader and Row lay a window out in fixed-width columns.
func WindowHeader() string {
	cols := []string{"start"}
	for o := Outcome(0); o < numOutcomes; o++ {
		cols = append(cols, o.String())
	}
	return columns(append(cols, "retried", "p50", "p99", "max"))
}

// Row is one line for the window, matching WindowHeader.
func (win Window) Row() string {
	cols := []string{win.Start.String()}
	for o := Outcome(0); o < numOutcomes; o++ {
		cols = append(cols, fmt.Sprint(win.Counts.Get(o)))
	}
	return columns(append(cols, fmt.Sprint(win.Counts.Retried), ms(win.Latency.P50), ms(win.Latency.P99), ms(win.Latency.Max)))
}

func columns(cols []string) string {
	var b strings.Builder
	for _, c := range cols {
		fmt.Fprintf(&b, "%*s", colWidth, c)
	}
	return b.String()
}

func ms(d time.Duration) string {
	return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
}
