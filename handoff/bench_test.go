package handoff

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestManyHandOversKeepFDCount runs 100 MOSN hand-overs and activations
// in this process (both sides are this package here; interop is tested
// against the independent peers elsewhere) and checks that the fd count
// does not grow.
func TestManyHandOversKeepFDCount(t *testing.T) {
	checkFDs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s := New("pod/mosn", Options{Logger: slog.New(slog.DiscardHandler)})
	defer s.Close()
	for _, n := range []string{"a", "b", "c"} {
		if err := s.Listen(ctx, n, "tcp://127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	dir := shortDir(t)
	before, _ := fdCount(t)
	for i := range 100 {
		if err := handOverOnce(ctx, s, dir); err != nil {
			t.Fatalf("hand-over %d: %v", i, err)
		}
		a, err := s.Activation()
		if err != nil {
			t.Fatal(err)
		}
		a.Close()
	}
	if after, desc := fdCount(t); after != before {
		t.Fatalf("fds: %d before 100 hand-overs, %d after: %v", before, after, desc)
	}
}

// handOverOnce runs both MOSN roles in this process.
func handOverOnce(ctx context.Context, s *Store, dir string) error {
	done := make(chan error, 1)
	go func() { done <- s.HandOverMOSN(ctx, dir) }()
	var u *Upgrade
	var err error
	for range 200 {
		if u, err = ReceiveMOSN(ctx, dir, Options{}); err == nil {
			break
		}
		time.Sleep(time.Millisecond) // reconfig.sock not there yet
	}
	if err != nil {
		return err
	}
	if len(u.Files) != s.Len() {
		u.Close()
		return fmt.Errorf("received %d fds, store holds %d", len(u.Files), s.Len())
	}
	err = u.Ready(ctx)
	u.Close()
	if herr := <-done; herr != nil {
		return herr
	}
	return err
}

func BenchmarkSendReceiveFiles(b *testing.B) {
	for _, n := range []int{1, 10, MaxFiles} {
		b.Run(fmt.Sprintf("fds=%d", n), func(b *testing.B) {
			a, c := benchPair(b)
			files := make([]*os.File, n)
			for i := range files {
				r, w, err := os.Pipe()
				if err != nil {
					b.Fatal(err)
				}
				w.Close()
				defer r.Close()
				files[i], _ = dupFile(r, fmt.Sprintf("f%d", i))
				defer files[i].Close()
			}
			b.ResetTimer()
			for range b.N {
				if err := SendFiles(a, files); err != nil {
					b.Fatal(err)
				}
				got, err := ReceiveFiles(c)
				if err != nil {
					b.Fatal(err)
				}
				closeFiles(got)
			}
		})
	}
}

func benchPair(b *testing.B) (*net.UnixConn, *net.UnixConn) {
	dir, err := os.MkdirTemp("", "hob")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "s")
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	a, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		b.Fatal(err)
	}
	c, err := l.AcceptUnix()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { a.Close(); c.Close() })
	return a, c
}

func BenchmarkActivation(b *testing.B) {
	s := New("pod/bench", Options{})
	defer s.Close()
	for i := range 10 {
		if err := s.Listen(context.Background(), fmt.Sprintf("l%d", i), "tcp://127.0.0.1:0"); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for range b.N {
		a, err := s.Activation()
		if err != nil {
			b.Fatal(err)
		}
		a.Close()
	}
}

// BenchmarkMOSNHandOver measures one full MOSN exchange (both roles in
// this process) for a store of 10 listeners: the protocol's own cost in a
// hand-over after a crash, excluding the new process's start-up.
func BenchmarkMOSNHandOver(b *testing.B) {
	ctx := context.Background()
	s := New("pod/bench", Options{Logger: slog.New(slog.DiscardHandler)})
	defer s.Close()
	for i := range 10 {
		if err := s.Listen(ctx, fmt.Sprintf("l%d", i), "tcp://127.0.0.1:0"); err != nil {
			b.Fatal(err)
		}
	}
	dir, _ := os.MkdirTemp("", "hob")
	defer os.RemoveAll(dir)
	b.ResetTimer()
	for range b.N {
		if err := handOverOnce(ctx, s, dir); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSnapshot measures a snapshot of a process with 10 listeners
// (this process: pidfd_getfd works on oneself).
func BenchmarkSnapshot(b *testing.B) {
	var ls []net.Listener
	for range 10 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		defer l.Close()
		ls = append(ls, l)
	}
	b.ResetTimer()
	for range b.N {
		files, err := snapshot(context.Background(), procRoot, os.Getpid())
		if err != nil {
			b.Fatal(err)
		}
		if len(files) < len(ls) {
			b.Fatalf("snapshot found %d listeners, want >= %d", len(files), len(ls))
		}
		closeFiles(files)
	}
}
