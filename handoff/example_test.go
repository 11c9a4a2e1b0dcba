package handoff_test

import (
	"context"
	"errors"
	"log"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"syscall"

	"github.com/meshagent/meshagent/handoff"
)

// The agent's side of a sidecar start with held listeners: agent-opened
// listeners and a notify socket, then exec through the shim.
func ExampleStore_Activation() {
	ctx := context.Background()
	var sidecarPID int // updated by the agent on every start
	store := handoff.New("pod-a/mosn", handoff.Options{
		Authorize: handoff.ProcessTree(func() int { return sidecarPID }),
		OnNotify: func(pid int32, lines []string) {
			// READY=1 here can mark the sidecar ready early.
		},
		Logger: slog.Default(),
	})
	defer store.Close()
	if err := store.Listen(ctx, "http", "tcp://0.0.0.0:8080"); err != nil {
		log.Fatal(err)
	}
	notify, err := store.ListenNotify("/run/meshagent/pods/pod-a/mosn.notify")
	if err != nil {
		log.Fatal(err)
	}
	defer notify.Close()
	go notify.Serve(ctx)

	act, err := store.Activation()
	if err != nil {
		log.Fatal(err)
	}
	// The agent re-executes itself as the shim, which calls
	// handoff.WithListenPID and then execs the sidecar.
	cmd := exec.Command("/proc/self/exe", "shim", "--", "/usr/bin/mosn", "start")
	cmd.ExtraFiles = act.Files // fds 3, 4, ...
	cmd.Env = append(append(os.Environ(), act.Env()...), notify.Env())
	err = cmd.Start()
	act.Close() // the child has its copies now; the store keeps its own
	if err != nil {
		log.Fatal(err)
	}
	sidecarPID = cmd.Process.Pid
}

// The shim side: set LISTEN_PID to our own pid, which exec keeps.
func ExampleWithListenPID() {
	argv := os.Args[3:] // after "shim --"
	env := handoff.WithListenPID(os.Environ())
	log.Fatal(syscall.Exec(argv[0], argv, env))
}

// A sidecar (or the demo sidecar) taking its listeners.
func ExampleInheritListeners() {
	ls, err := handoff.InheritListeners()
	if err != nil {
		log.Fatal(err)
	}
	log.Fatal(http.Serve(ls["http"], nil))
}

// After MOSN crashed: let the next, unmodified MOSN take the held
// listeners through its own upgrade protocol.
func ExampleStore_HandOverMOSN() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	store := handoff.New("pod-a/mosn", handoff.Options{})
	done := make(chan error, 1)
	go func() { done <- store.HandOverMOSN(ctx, "/run/meshagent/pods/pod-a/mosn-uds") }()
	// ... start MOSN with uds_dir=/run/meshagent/pods/pod-a/mosn-uds;
	// cancel() if it exits before the hand-over completes.
	if err := <-done; err != nil {
		log.Print(err)
	}
}

// Adopting a running sidecar that knows nothing about meshagent.
func ExampleStore_Snapshot() {
	store := handoff.New("pod-a/envoy", handoff.Options{})
	names, err := store.Snapshot(context.Background(), 4242)
	switch {
	case errors.Is(err, handoff.ErrSnapshotDenied), errors.Is(err, handoff.ErrSnapshotUnsupported):
		log.Printf("cannot keep envoy's sockets across its restart: %v", err)
	case err != nil:
		log.Print(err)
	default:
		log.Printf("holding %v", names)
	}
}
