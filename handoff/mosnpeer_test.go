package handoff

// An independent implementation of both roles of MOSN's smooth-upgrade
// protocol, written from the protocol's description only, for interop
// tests against this package's implementation. It deliberately uses
// nothing from the package under test (only the standard library's syscall
// and net) so that a shared misreading of the protocol cannot make the two
// sides agree with each other and disagree with MOSN.
//
// The facts it implements: the old process listens on reconfig.sock; the
// new one dials it and reads one byte (the old writes 0x00); the new one
// then listens on listen.sock with a 10 s accept deadline; the old one dials
// listen.sock and sends one message: one byte 0x00 with all listener fds in
// one SCM_RIGHTS control message (at most 100); the new one rebuilds its
// listeners from the fds; once its servers run it writes one byte on that
// connection; the old one answers with one byte within 3 s, else the new one
// exits with status 2.

import (
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func peerFail(format string, args ...any) int {
	fmt.Fprintf(os.Stderr, "mosn peer: "+format+"\n", args...)
	return 1
}

// mosnNewPeer is MOSN's new process: HANDOFF_TEST_DIR is its uds_dir.
func mosnNewPeer() int {
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	dir := os.Getenv("HANDOFF_TEST_DIR")

	rc, err := net.Dial("unix", dir+"/reconfig.sock")
	if err != nil {
		return peerFail("dial reconfig.sock: %v", err)
	}
	rc.SetReadDeadline(time.Now().Add(10 * time.Second))
	one := make([]byte, 1)
	if n, err := rc.Read(one); n != 1 || err != nil {
		return peerFail("read from reconfig.sock: n=%d %v", n, err)
	}
	rc.Close()

	os.Remove(dir + "/listen.sock")
	ln, err := net.Listen("unix", dir+"/listen.sock")
	if err != nil {
		return peerFail("listen listen.sock: %v", err)
	}
	ul := ln.(*net.UnixListener)
	ul.SetDeadline(time.Now().Add(10 * time.Second))
	conn, err := ul.AcceptUnix()
	ul.Close()
	if err != nil {
		return peerFail("accept listen.sock: %v", err)
	}
	buf := make([]byte, 1)
	oob := make([]byte, syscall.CmsgSpace(100*4))
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, oobn, flags, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil || n != 1 || flags&syscall.MSG_CTRUNC != 0 {
		return peerFail("read fds: n=%d flags=%#x %v", n, flags, err)
	}
	msgs, err := syscall.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return peerFail("control messages: %d %v", len(msgs), err)
	}
	fds, err := syscall.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) == 0 {
		return peerFail("unix rights: %d %v", len(fds), err)
	}
	var ls []net.Listener
	var addrs []string
	for _, fd := range fds {
		f := os.NewFile(uintptr(fd), "inherited")
		l, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return peerFail("fd %d: %v", fd, err)
		}
		ls = append(ls, l)
		addrs = append(addrs, l.Addr().String())
	}
	s := servePID(ls...)

	// Servers run: tell the old process, and insist on its answer.
	conn.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := conn.Write([]byte{0}); err != nil {
		return peerFail("write ready: %v", err)
	}
	if n, err := conn.Read(one); n != 1 || err != nil {
		fmt.Fprintf(os.Stderr, "mosn peer: no answer from old process: %v\n", err)
		os.Exit(2)
	}
	conn.Close()
	fmt.Printf("ready %s\n", strings.Join(addrs, ","))
	<-term
	s.stop()
	return 0
}

// mosnOldPeer is MOSN's old process: it serves on its own listener at
// HANDOFF_TEST_ADDR, waits on reconfig.sock in HANDOFF_TEST_DIR, hands the
// listener over, then stops accepting and exits once the new process has
// said it runs. With HANDOFF_TEST_NOACK=1 it never answers and keeps
// serving until SIGTERM.
func mosnOldPeer() int {
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	dir := os.Getenv("HANDOFF_TEST_DIR")
	l, err := net.Listen("tcp", os.Getenv("HANDOFF_TEST_ADDR"))
	if err != nil {
		return peerFail("listen: %v", err)
	}
	s := servePID(l)

	os.Remove(dir + "/reconfig.sock")
	rl, err := net.Listen("unix", dir+"/reconfig.sock")
	if err != nil {
		return peerFail("listen reconfig.sock: %v", err)
	}
	fmt.Printf("ready %s\n", l.Addr())
	rc, err := rl.Accept()
	rl.Close()
	if err != nil {
		return peerFail("accept reconfig.sock: %v", err)
	}
	if _, err := rc.Write([]byte{0}); err != nil {
		return peerFail("write reconfig.sock: %v", err)
	}
	var conn *net.UnixConn
	for i := 0; ; i++ {
		c, err := net.Dial("unix", dir+"/listen.sock")
		if err == nil {
			conn = c.(*net.UnixConn)
			break
		}
		if i == 500 {
			return peerFail("dial listen.sock: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Take the listener's fd without (*os.File).Fd, which would put the
	// socket we still accept on into blocking mode.
	raw, err := l.(*net.TCPListener).SyscallConn()
	if err != nil {
		return peerFail("raw conn: %v", err)
	}
	var werr error
	raw.Control(func(fd uintptr) {
		_, _, werr = conn.WriteMsgUnix([]byte{0}, syscall.UnixRights(int(fd)), nil)
	})
	if werr != nil {
		return peerFail("send fds: %v", werr)
	}
	one := make([]byte, 1)
	conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	if n, err := conn.Read(one); n != 1 || err != nil {
		return peerFail("wait ready: %v", err)
	}
	if os.Getenv("HANDOFF_TEST_NOACK") == "1" {
		<-term
		s.stop()
		return 0
	}
	if _, err := conn.Write([]byte{0}); err != nil {
		return peerFail("answer: %v", err)
	}
	conn.Close()
	rc.Close()
	s.stop() // stop accepting and drain: the new process has the socket
	return 0
}
