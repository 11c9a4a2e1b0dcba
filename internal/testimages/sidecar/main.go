// Command sidecar stands in for a mesh proxy in containerd tests.
//
// It waits SIDECAR_DELAY (a Go duration, default 0), then listens on
// SIDECAR_PORT (default 15021) and serves:
//
//	GET  /ready  200 while ready, 503 once hung
//	POST /hang   stop answering /ready with 200 (a hung proxy)
//
// SIDECAR_IGNORE_TERM=1 makes it ignore SIGTERM, so a stop needs SIGKILL after
// the grace period. Otherwise SIGTERM exits 0 at once. With SIDECAR_PORT=0 it
// picks a free port. If SIDECAR_READY_FILE is set, it writes the port it
// listens on there once it accepts connections (its signal handling is set
// up by then too), so tests know when and where it is ready.
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "sidecar:", err)
		os.Exit(1)
	}
}

func run() error {
	delay := time.Duration(0)
	if v := os.Getenv("SIDECAR_DELAY"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			return fmt.Errorf("SIDECAR_DELAY %q: %w", v, err)
		}
		delay = d
	}
	port := os.Getenv("SIDECAR_PORT")
	if port == "" {
		port = "15021"
	}
	sigs := make(chan os.Signal, 1)
	if os.Getenv("SIDECAR_IGNORE_TERM") == "1" {
		signal.Ignore(syscall.SIGTERM)
		signal.Notify(sigs, syscall.SIGINT)
	} else {
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	}
	go func() {
		<-sigs
		os.Exit(0)
	}()

	time.Sleep(delay)
	var hung atomic.Bool
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		if hung.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.HandleFunc("POST /hang", func(w http.ResponseWriter, _ *http.Request) {
		hung.Store(true)
		fmt.Fprintln(w, "hung")
	})
	ln, err := net.Listen("tcp", ":"+port)
	if err != nil {
		return fmt.Errorf("listen on :%s: %w", port, err)
	}
	actual := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	fmt.Printf("sidecar: listening on :%s after %s\n", actual, delay)
	if path := os.Getenv("SIDECAR_READY_FILE"); path != "" {
		if err := writeFileAtomic(path, actual+"\n"); err != nil {
			return err
		}
	}
	return http.Serve(ln, mux)
}

// writeFileAtomic writes path via a rename, so a reader never sees it half
// written.
func writeFileAtomic(path, data string) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(data), 0o644); err != nil {
		return fmt.Errorf("write SIDECAR_READY_FILE: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write SIDECAR_READY_FILE: %w", err)
	}
	return nil
}
