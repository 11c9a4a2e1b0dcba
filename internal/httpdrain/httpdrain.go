// Package httpdrain serves HTTP and stops without dropping a request; the
// demo sidecar and the demo app both drain this way.
package httpdrain

import (
	"context"
	"net"
	"net/http"
	"sync/atomic"
	"time"
)

// Server serves HTTP and stops without dropping a request.
//
// http.Server.Shutdown is not enough for a sidecar that hands its socket to
// a successor: a request read after Shutdown has begun is dropped without an
// answer (the client sees EOF), and on a shared listening socket there is
// always a connection the old process accepted a moment before. So the drain
// goes in three steps: close our copy of the listening socket (the kernel
// queue and the other holders keep it alive), turn keep-alives off so every
// answer says "Connection: close" and idle connections are closed, then wait
// until every connection has closed, answering whatever arrives on them
// meanwhile. Only the race inherent to HTTP/1.1 remains: a client that sends
// on an idle connection just as it is closed (Go's client, like browsers,
// retries such an idempotent request).
type Server struct {
	srv  *http.Server
	ln   net.Listener
	open atomic.Int64 // connections accepted and not yet closed
	done chan struct{}
}

// New returns a Server of h on ln.
func New(ln net.Listener, h http.Handler) *Server {
	d := &Server{ln: ln, done: make(chan struct{})}
	d.srv = &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		ConnState: func(_ net.Conn, st http.ConnState) {
			switch st {
			case http.StateNew:
				d.open.Add(1)
			case http.StateClosed, http.StateHijacked:
				d.open.Add(-1)
			}
		},
	}
	return d
}

// Serve runs until the listener is closed.
func (d *Server) Serve() {
	defer close(d.done)
	d.srv.Serve(d.ln)
}

// Drain stops accepting and waits for every connection to close, at most
// until ctx ends; then it cuts the rest. It returns how many it cut.
func (d *Server) Drain(ctx context.Context) int64 {
	d.ln.Close()
	// Wait for Serve to return, so no connection is being accepted any
	// more. It may not return at once: if another process sharing the socket
	// switched it to blocking mode for a moment (os.File.Fd does that), our
	// accept is blocked in the kernel until a connection comes.
	select {
	case <-d.done:
	case <-ctx.Done():
		n := d.open.Load()
		d.srv.Close()
		return n
	}
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		// Off, and again on every tick: each call also closes the
		// connections that have turned idle since.
		d.srv.SetKeepAlivesEnabled(false)
		if d.open.Load() == 0 {
			d.srv.Close()
			return 0
		}
		select {
		case <-ctx.Done():
			n := d.open.Load()
			d.srv.Close()
			return n
		case <-tick.C:
		}
	}
}

// Done is closed once Serve has returned.
func (d *Server) Done() <-chan struct{} { return d.done }
