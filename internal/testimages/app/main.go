// Command app stands in for an application container in containerd tests.
//
// At start it appends one line "<unix-nanoseconds> <hostname-or-APP_NAME>" to
// APP_START_FILE (if set; tests mount a host directory there), so a test can
// tell when, and how many times, the app was started; the line is written
// after its SIGTERM handling is set up. Then it runs until
// SIGTERM, or exits with APP_EXIT_CODE (default 0) after APP_EXIT_AFTER (a Go
// duration) if that is set, which is how a Job's app finishes.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "app:", err)
		os.Exit(1)
	}
}

func run() error {
	started := time.Now()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	if path := os.Getenv("APP_START_FILE"); path != "" {
		name := os.Getenv("APP_NAME")
		if name == "" {
			name, _ = os.Hostname()
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			return fmt.Errorf("open APP_START_FILE: %w", err)
		}
		_, err = fmt.Fprintf(f, "%d %s\n", started.UnixNano(), name)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("write APP_START_FILE %s: %w", path, err)
		}
	}

	var exitAfter <-chan time.Time
	if v := os.Getenv("APP_EXIT_AFTER"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			return fmt.Errorf("APP_EXIT_AFTER %q: %w", v, err)
		}
		exitAfter = time.After(d)
	}
	code := 0
	if v := os.Getenv("APP_EXIT_CODE"); v != "" {
		c, err := strconv.Atoi(v)
		if err != nil {
			return fmt.Errorf("APP_EXIT_CODE %q: %w", v, err)
		}
		code = c
	}
	select {
	case <-sigs:
		return nil
	case <-exitAfter:
		os.Exit(code)
	}
	return nil
}
