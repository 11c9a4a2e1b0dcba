// Package handoff keeps a sidecar's listening sockets alive across its
// restarts and upgrades and hands them to the next process by fd passing,
// so that clients of the pod never see a refused connection.
//
// # Model
//
// A Store belongs to one sidecar of one pod. It holds duplicates of the
// sidecar's listening sockets. Because the store's duplicate keeps each
// socket open, the kernel keeps queueing connections on it while no sidecar
// runs; the next sidecar accepts them. Sockets get into a store three ways:
//
//   - Store.Listen: meshagent opens the listener itself from a spec such as
//     "tcp://0.0.0.0:8080" or "unix:///run/pod/web.sock", like a systemd
//     socket unit.
//   - Notify: the sidecar stores its own sockets through the sd_notify
//     protocol (FDSTORE=1, FDNAME=, FDSTOREREMOVE=1) on a per-sidecar
//     datagram socket, as with systemd's fd store.
//   - Store.Snapshot: meshagent copies the listening TCP sockets out of a
//     running, unmodified sidecar with pidfd_getfd.
//
// They leave the store towards a new process two ways:
//
//   - Store.Activation: duplicates to pass at exec as fds 3.. with
//     LISTEN_FDS and LISTEN_FDNAMES (sd_listen_fds). The exec shim adds
//     LISTEN_PID with WithListenPID. Programs take them with Inherit or
//     InheritListeners.
//   - Store.HandOverMOSN: MOSN's smooth-upgrade protocol, old side, so an
//     unmodified MOSN restarting after a crash comes back on the same
//     sockets. ReceiveMOSN is the new side.
//
// SendFiles and ReceiveFiles are the general primitive for passing a set of
// named fds in one message on a SOCK_SEQPACKET unix socket (for hand-offs
// between processes of meshagent's own, such as a restarting meshagent);
// PeerCred tells who is on the other end.
//
// # Who owns which fd
//
// An fd is owned by exactly one party, which closes it:
//
//   - The store owns what it holds; only Store.Remove (FDSTOREREMOVE),
//     Store.Release (the agent's handoff-store switch: every fd, and none
//     accepted until Store.Hold) and Store.Close close those fds, and with
//     the last holder gone the port is released. It keeps them as raw descriptors, outside Go's
//     netpoller, so that connections arriving for a sidecar never wake
//     meshagent. Store.Add duplicates its argument: the caller still
//     owns and closes what it passed.
//   - An Activation owns its duplicates. The agent closes it right after
//     the child started (the child has its own copies from then on),
//     whether or not the start succeeded.
//   - A hand-over (SendFiles, HandOverMOSN) never transfers ownership: the
//     kernel installs new fds in the receiver and the sender keeps its own.
//   - A receiver owns every fd it received from the moment recvmsg returns.
//     Every receive path in this package closes all received fds when
//     anything about the message is wrong (bad length, bad names, too many
//     fds, truncated control data, unauthorized sender) and logs why.
//
// Duplicates share one open file description, including its O_NONBLOCK
// flag. The store therefore never calls (*os.File).Fd on a net-made file
// (which would switch the shared description to blocking under a running
// sidecar) and passes sockets in whatever mode they are; receivers set the
// mode they need, as Go's net.FileListener does.
//
// # Who may talk to us
//
// Notify and hand-off sockets live in owner-only (0700) directories as
// 0600 sockets; the directory belongs to meshagent, or to the sidecar's
// user (Options.SidecarUser) when the sidecar does not run as root. On top
// of that every datagram's sender (SCM_CREDENTIALS, enabled with
// SO_PASSCRED) and every connection's peer (SO_PEERCRED) is checked with
// Options.Authorize, which the agent points at the pod's sidecar
// (ProcessTree, or a cgroup check). A process that fails the check can
// neither plant fds in a store nor receive fds from it; its fds are closed
// and the refusal is logged with the reason.
//
// One limit of datagrams: a sender with CAP_SYS_ADMIN may put any pid in
// its SCM_CREDENTIALS, so against a root sidecar of another pod only the
// directory fence protects a notify socket. SO_PEERCRED on the MOSN
// sockets is recorded by the kernel at connect or listen time and cannot
// be forged.
//
// # MOSN
//
// For a MOSN that crashed, the agent runs Store.HandOverMOSN on the uds_dir
// it gives MOSN before starting it: MOSN finds reconfig.sock, believes an
// old MOSN is there, and takes the held listeners instead of binding (which
// would fail, the store holding the ports). Nothing in this package dials
// reconfig.sock unless told to (ReceiveMOSN): any connection to it starts
// an upgrade in a running MOSN.
package handoff
