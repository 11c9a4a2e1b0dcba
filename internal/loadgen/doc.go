// Package loadgen sends open-loop HTTP traffic to a loopback target and
// counts every outcome, for meshagent's hand-off load tests and demo.
//
// Open loop: request i is due at start + i/Rate whatever happened to the
// requests before it, and its latency is measured from that due time, not
// from when a goroutine got round to sending it. A server that stalls
// therefore shows up as latency and timeouts instead of quietly slowing the
// client down (no coordinated omission). When MaxInFlight requests are
// already outstanding a due request is not sent and counts as skipped, so the
// totals always add up to the requests scheduled.
//
// Each request either reuses a keep-alive connection or opens a connection of
// its own; NewConnRatio sets the mix, deterministically (request i opens a new
// connection when floor((i+1)*ratio) > floor(i*ratio)). Outcomes are counted
// separately: ok (2xx), refused (ECONNREFUSED), reset (ECONNRESET), eof (the
// server closed without answering), timeout (no answer within Timeout),
// non2xx, other. Go's client transparently retries an idempotent request
// whose reused connection the server closed; such requests count by their
// final outcome and additionally as retried, so the retries are visible.
// Use Method POST to see raw outcomes without retries.
//
// The target must be a loopback address: the places this runs forbid
// traffic anywhere else, so Run refuses other targets, and the dialer checks
// every address it connects to as well (a name that resolves elsewhere is
// refused there). Runs are bounded: Duration is required and capped.
package loadgen
