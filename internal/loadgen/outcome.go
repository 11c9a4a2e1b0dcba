package loadgen

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"
)

// Outcome is what became of one scheduled request.
type Outcome int

const (
	OK      Outcome = iota // a 2xx answer, body read in full
	Refused                // connect refused: nobody listened on the port
	Reset                  // the connection was reset
	EOF                    // the server closed the connection without an answer
	Timeout                // no full answer within Config.Timeout
	Non2xx                 // an answer with a status outside 200-299
	Other                  // any other error
	Skipped                // not sent: MaxInFlight requests were outstanding
	numOutcomes
)

var outcomeNames = [numOutcomes]string{"ok", "refused", "reset", "eof", "timeout", "non2xx", "other", "skipped"}

func (o Outcome) String() string {
	if o < 0 || o >= numOutcomes {
		return "unknown"
	}
	return outcomeNames[o]
}

// errServerClosedIdle is the text of net/http's errServerClosedIdle.
const errServerClosedIdle = "http: server closed idle connection"

// classify sorts a request's error (or status, when err is nil) into an
// outcome. Order matters: a refused connect can also carry a deadline, and a
// reset is an error before it is an EOF.
func classify(err error, status int) Outcome {
	if err == nil {
		if status >= 200 && status <= 299 {
			return OK
		}
		return Non2xx
	}
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return Refused
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		// EPIPE: we wrote to a connection the peer had already reset.
		return Reset
	case errors.Is(err, context.DeadlineExceeded):
		return Timeout
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return EOF
	case strings.Contains(err.Error(), errServerClosedIdle):
		// The server closed a kept-alive connection as the request went
		// out on it: an EOF that net/http reports under its own
		// (unexported) error once its one retry met the same fate.
		return EOF
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return Timeout
	}
	return Other
}
