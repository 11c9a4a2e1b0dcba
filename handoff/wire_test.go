package handoff

import (
	"bytes"
	"errors"
	"net"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestValidName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"web", true},
		{"tcp-127.0.0.1_8080", true},
		{"with space", true},
		{strings.Repeat("a", MaxNameLen), true},
		{"", false},
		{strings.Repeat("a", MaxNameLen+1), false},
		{"a:b", false},
		{"a\nb", false},
		{"nul\x00", false},
		{"del\x7f", false},
		{"é", false},
	} {
		err := ValidName(tc.name)
		if (err == nil) != tc.ok {
			t.Errorf("ValidName(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalidName) {
			t.Errorf("ValidName(%q) = %v, want ErrInvalidName", tc.name, err)
		}
	}
}

func TestParseNames(t *testing.T) {
	good, err := encodeNames([]string{"a", "web"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		data []byte
		nfds int
		want []string
		err  string
	}{
		{"two", good, 2, []string{"a", "web"}, ""},
		{"none", []byte{1, 0}, 0, []string{}, ""},
		{"short", []byte{1}, 0, nil, "at least 2"},
		{"version", []byte{2, 0}, 0, nil, "version 2"},
		{"count above limit", []byte{1, 101}, 101, nil, "limit 100"},
		{"fewer fds than names", good, 1, nil, "names 2 fds but 1 arrived"},
		{"more fds than names", good, 3, nil, "names 2 fds but 3 arrived"},
		{"missing length", []byte{1, 1}, 1, nil, "missing length byte"},
		{"name overruns", []byte{1, 1, 5, 'a'}, 1, nil, "length 5 but only 1"},
		{"empty name", []byte{1, 1, 0}, 1, nil, "empty"},
		{"colon", []byte{1, 1, 3, 'a', ':', 'b'}, 1, nil, "byte 0x3a"},
		{"trailing", append(append([]byte{}, good...), 'x'), 2, nil, "1 trailing bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseNames(tc.data, tc.nfds)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || !errors.Is(err, ErrMalformed) {
					t.Fatalf("parseNames = %v, %v; want ErrMalformed containing %q", got, err, tc.err)
				}
				return
			}
			if err != nil || strings.Join(got, ",") != strings.Join(tc.want, ",") {
				t.Fatalf("parseNames = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestEncodeNamesRejects(t *testing.T) {
	if _, err := encodeNames(make([]string, MaxFiles+1)); !errors.Is(err, ErrTooManyFiles) {
		t.Errorf("101 names: %v, want ErrTooManyFiles", err)
	}
	if _, err := encodeNames([]string{"ok", "bad:name"}); !errors.Is(err, ErrInvalidName) || !strings.Contains(err.Error(), "fd 1") {
		t.Errorf("bad name: %v, want ErrInvalidName naming fd 1", err)
	}
}

func TestParseControl(t *testing.T) {
	rights := unix.UnixRights(7, 8, 9)
	cred := unix.UnixCredentials(&unix.Ucred{Pid: 42, Uid: 1000, Gid: 1000})
	both := append(append([]byte{}, cred...), rights...)
	c, err := parseControl(both)
	if err != nil || len(c.fds) != 3 || c.fds[2] != 9 || c.cred == nil || c.cred.Pid != 42 || c.cred.Uid != 1000 {
		t.Fatalf("parseControl(cred+rights) = %+v, %v", c, err)
	}
	// A malformed control message after a good SCM_RIGHTS still reports
	// the fds found, so the caller can close them.
	bad := append(append([]byte{}, rights...), 1, 2, 3)
	c, err = parseControl(bad)
	if !errors.Is(err, ErrMalformed) || len(c.fds) != 3 {
		t.Fatalf("parseControl(rights+junk) = %+v, %v; want 3 fds and ErrMalformed", c, err)
	}
	other := make([]byte, unix.CmsgSpace(4))
	h := (*unix.Cmsghdr)(unsafePointer(&other[0]))
	h.Level, h.Type = unix.SOL_IP, 1
	h.SetLen(unix.CmsgLen(4))
	if _, err := parseControl(other); !errors.Is(err, ErrMalformed) {
		t.Fatalf("parseControl(IP level) = %v, want ErrMalformed", err)
	}
}

// seqpacketPair returns two connected SOCK_SEQPACKET unix sockets.
func seqpacketPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	return socketPair(t, unix.SOCK_SEQPACKET)
}

func socketPair(t *testing.T, typ int) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socketpair: %v", err)
	}
	var conns [2]*net.UnixConn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "pair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatalf("fileconn: %v", err)
		}
		conns[i] = c.(*net.UnixConn)
		t.Cleanup(func() { c.Close() })
	}
	return conns[0], conns[1]
}

// pipes returns n open files (pipe read ends) to pass around.
func pipes(t *testing.T, n int) []*os.File {
	t.Helper()
	var out []*os.File
	for i := 0; i < n; i++ {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		w.Close()
		t.Cleanup(func() { r.Close() })
		out = append(out, r)
	}
	return out
}

// rights is the SCM_RIGHTS control message that carries files' fds; nil
// for no files.
func rights(files []*os.File) []byte {
	if len(files) == 0 {
		return nil
	}
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = int(f.Fd())
	}
	return unix.UnixRights(fds...)
}

// sendPipes sends data with nfds pipe fds in one message on a new socket
// pair of typ and returns both ends: a sent it, b is to receive it.
func sendPipes(t *testing.T, typ int, data []byte, nfds int) (a, b *net.UnixConn) {
	t.Helper()
	a, b = socketPair(t, typ)
	files := pipes(t, max(nfds, 1))[:nfds]
	if _, _, err := a.WriteMsgUnix(data, rights(files), nil); err != nil {
		t.Fatalf("send: %v", err)
	}
	return a, b
}

func TestSendReceiveFiles(t *testing.T) {
	checkFDs(t)
	a, b := seqpacketPair(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	lf, err := dupConn(l.(*net.TCPListener), "web")
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	p := pipes(t, 1)[0]
	pn := os.NewFile(0, "")
	_ = pn
	named, err := dupFile(p, "pipe")
	if err != nil {
		t.Fatal(err)
	}
	defer named.Close()
	if err := SendFiles(a, []*os.File{lf, named}); err != nil {
		t.Fatal(err)
	}
	got, err := ReceiveFiles(b)
	if err != nil {
		t.Fatal(err)
	}
	defer closeFiles(got)
	if len(got) != 2 || got[0].Name() != "web" || got[1].Name() != "pipe" {
		t.Fatalf("received %v", got)
	}
	for i, want := range []*os.File{lf, named} {
		wi, _ := fileIdentity(want)
		gi, _ := fileIdentity(got[i])
		if wi != gi {
			t.Errorf("fd %d: received %v, sent %v: not the same file", i, gi, wi)
		}
	}
	// The received listener works: a connection to the original address
	// is accepted through it.
	ls, err := Listeners(got[:1])
	if err != nil {
		t.Fatal(err)
	}
	defer ls["web"].Close()
	go func() {
		c, err := net.Dial("tcp", l.Addr().String())
		if err == nil {
			c.Close()
		}
	}()
	c, err := ls["web"].Accept()
	if err != nil {
		t.Fatalf("accept on received listener: %v", err)
	}
	c.Close()
}

// TestReceiveFilesRejectsMalformed sends bad messages by hand and checks
// that ReceiveFiles rejects each with the right error and closes every fd
// that came with it (the fd count returns to where it was once the sender
// closes its own copies).
func TestReceiveFilesRejectsMalformed(t *testing.T) {
	long := append([]byte{1, 1, 255}, bytes.Repeat([]byte{'a'}, 255)...)
	long[10] = ':'
	for _, tc := range []struct {
		name string
		typ  int
		data []byte
		nfds int
		want error
	}{
		{"names fewer than fds", unix.SOCK_SEQPACKET, []byte{1, 1, 1, 'a'}, 3, ErrMalformed},
		{"names more than fds", unix.SOCK_SEQPACKET, []byte{1, 2, 1, 'a', 1, 'b'}, 1, ErrMalformed},
		{"wrong version", unix.SOCK_SEQPACKET, []byte{9, 1, 1, 'a'}, 1, ErrMalformed},
		{"trailing bytes", unix.SOCK_SEQPACKET, []byte{1, 1, 1, 'a', 'x'}, 1, ErrMalformed},
		{"long name with colon", unix.SOCK_SEQPACKET, long, 1, ErrMalformed},
		{"one fd above the limit", unix.SOCK_SEQPACKET, []byte{1, 101}, MaxFiles + 1, ErrTooManyFiles},
		{"control data truncated", unix.SOCK_SEQPACKET, []byte{1, 120}, 120, ErrTruncated},
		{"message too long", unix.SOCK_SEQPACKET, make([]byte, maxWireData+10), 2, ErrTruncated},
		{"empty with fds", unix.SOCK_SEQPACKET, nil, 2, ErrMalformed},
		{"stream: names fewer than fds", unix.SOCK_STREAM, []byte{1, 1, 1, 'a'}, 2, ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkFDs(t)
			_, b := sendPipes(t, tc.typ, tc.data, tc.nfds)
			before, _ := fdCount(t)
			got, err := ReceiveFiles(b)
			if !errors.Is(err, tc.want) {
				closeFiles(got)
				t.Fatalf("ReceiveFiles = %v, %v; want %v", got, err, tc.want)
			}
			if after, desc := fdCount(t); after != before {
				t.Fatalf("%d fds before receiving, %d after rejecting: received fds not closed: %v", before, after, desc)
			}
		})
	}
}

func FuzzParseNames(f *testing.F) {
	good, _ := encodeNames([]string{"web", "admin"})
	f.Add(good, 2)
	f.Add([]byte{1, 0}, 0)
	f.Add([]byte{1, 1, 3, 'a', ':', 'b'}, 1)
	f.Add([]byte{1, 101}, 101)
	f.Add([]byte{1, 1, 200, 'x'}, 1)
	f.Add([]byte{}, 0)
	f.Fuzz(func(t *testing.T, data []byte, nfds int) {
		names, err := parseNames(data, nfds)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		if len(names) != nfds {
			t.Fatalf("%d names for %d fds", len(names), nfds)
		}
		again, err := encodeNames(names)
		if err != nil || !bytes.Equal(again, data) {
			t.Fatalf("accepted %x but re-encodes to %x (%v)", data, again, err)
		}
	})
}

func FuzzParseControl(f *testing.F) {
	f.Add(unix.UnixRights(3, 4))
	f.Add(append(unix.UnixCredentials(&unix.Ucred{Pid: 1}), unix.UnixRights(5)...))
	f.Add([]byte{255, 255, 255, 255, 255, 255, 255, 255, 1, 0, 0, 0, 1, 0, 0, 0})
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, oob []byte) {
		// The fds are numbers from the fuzzer, not ours: never close them.
		c, _ := parseControl(oob)
		if len(c.fds) > len(oob)/4 {
			t.Fatalf("%d fds from %d bytes", len(c.fds), len(oob))
		}
	})
}

func FuzzParseNotify(f *testing.F) {
	for _, s := range []string{
		"READY=1",
		"FDSTORE=1\nFDNAME=web",
		"FDSTOREREMOVE=1\nFDNAME=web\n",
		"FDSTORE=1\nFDSTOREREMOVE=1\nFDNAME=x",
		"FDSTORE=1\nFDNAME=a:b",
		"STATUS=hello\nWATCHDOG=1\nFDPOLL=0",
		"FDNAME=a\nFDNAME=b",
		"\x00",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := parseNotify(data)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		if ValidName(m.name) != nil {
			t.Fatalf("accepted invalid name %q", m.name)
		}
		if m.store && m.remove {
			t.Fatal("accepted store and remove together")
		}
	})
}
