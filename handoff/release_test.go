package handoff

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

func TestStoreReleaseFreesPortsAndRefusesUntilHold(t *testing.T) {
	checkFDs(t)
	ctx := context.Background()
	var mu sync.Mutex
	var counts []int
	s := New("pod/side", Options{OnChange: func(n int) { mu.Lock(); counts = append(counts, n); mu.Unlock() }})
	defer s.Close()
	if err := s.Listen(ctx, "web", "tcp://127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	addr := storeAddr(t, s, 0)
	own, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer own.Close()
	f, err := own.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := s.Add("own", f); err != nil {
		t.Fatal(err)
	}

	n, err := s.Release()
	if n != 2 || err != nil {
		t.Fatalf("Release = %d, %v; want 2, nil", n, err)
	}
	if !portFree(addr) {
		t.Fatalf("port %s still pinned after Release", addr)
	}
	if s.Holding() || s.Len() != 0 {
		t.Fatalf("after Release: holding %v, %d fds", s.Holding(), s.Len())
	}
	for _, tc := range []struct {
		name string
		do   func() error
	}{
		{"listen", func() error { return s.Listen(ctx, "web", "tcp://127.0.0.1:0") }},
		{"add", func() error { _, err := s.Add("own", f); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.do(); !errors.Is(err, ErrReleased) {
				t.Fatalf("%s while released: %v, want ErrReleased", tc.name, err)
			}
		})
	}
	a, err := s.Activation()
	if err != nil || len(a.Files) != 0 {
		t.Fatalf("Activation while released: %v, %v; want none", a, err)
	}
	a.Close()

	s.Hold()
	if err := s.Listen(ctx, "web", "tcp://"+addr); err != nil {
		t.Fatalf("listen after Hold: %v", err)
	}
	if portFree(addr) {
		t.Fatalf("port %s not held again after Hold", addr)
	}
	mu.Lock()
	got := append([]int(nil), counts...)
	mu.Unlock()
	want := []int{1, 2, 0, 0, 0, 1} // listen, add, release, refused listen, refused add, listen
	if !slices.Equal(got, want) {
		t.Fatalf("OnChange counts %v, want %v", got, want)
	}
}

// A listener shut down through any duplicate stops listening for every
// holder: Held reads the state from the held fd itself.
func TestStoreHeldSeesShutDownSocket(t *testing.T) {
	checkFDs(t)
	ctx := context.Background()
	s := New("pod/side", Options{})
	defer s.Close()
	sock := filepath.Join(shortDir(t), "a.sock")
	for _, l := range []struct{ name, spec string }{{"web", "tcp://127.0.0.1:0"}, {"local", "unix://" + sock}} {
		if err := s.Listen(ctx, l.name, l.spec); err != nil {
			t.Fatal(err)
		}
	}
	held := s.Held()
	if len(held) != 2 {
		t.Fatalf("Held = %+v", held)
	}
	for _, h := range held {
		if !h.Listening || h.Err != nil || h.Inode == 0 || h.Spec == "" {
			t.Fatalf("healthy held fd: %+v", h)
		}
	}
	if !strings.HasPrefix(held[0].Addr, "tcp 127.0.0.1:") || held[1].Addr != "unix "+sock {
		t.Fatalf("addresses %q, %q", held[0].Addr, held[1].Addr)
	}

	// What a sidecar that shuts its inherited listener down does.
	a, err := s.Activation()
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Shutdown(int(a.Files[0].Fd()), unix.SHUT_RDWR); err != nil {
		t.Fatal(err)
	}
	a.Close()
	held = s.Held()
	if held[0].Listening || !held[1].Listening {
		t.Fatalf("after shutdown of web: %+v", held)
	}
}
