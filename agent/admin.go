package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/user"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The admin API is HTTP+JSON on a unix socket. The socket's mode keeps
// other users out; the peer credentials of every connection are checked as
// well, so a mode mistake (or a socket bind-mounted elsewhere) does not
// open it up.

const maxAdminBody = 64 << 10

type peerKey struct{}

// Peer is who is on the other end of an admin connection.
type Peer struct {
	PID int32
	UID uint32
	GID uint32
}

func peerOf(ctx context.Context) (Peer, bool) {
	p, ok := ctx.Value(peerKey{}).(Peer)
	return p, ok
}

type adminServer struct {
	a   *Agent
	gid int // admin group, -1 when none
	mux *http.ServeMux
}

func newAdminServer(a *Agent) *http.Server {
	s := &adminServer{a: a, gid: -1, mux: http.NewServeMux()}
	if g := a.cfg.Node.AdminGroup; g != "" {
		if gid, err := lookupGroup(g); err == nil {
			s.gid = gid
		}
	}
	s.mux.HandleFunc("GET /v1/pods", s.pods)
	s.mux.HandleFunc("GET /v1/pods/{pod}", s.pod)
	s.mux.HandleFunc("POST /v1/pods/{pod}/restart", s.restartPod)
	s.mux.HandleFunc("POST /v1/pods/{pod}/containers/{container}/restart", s.restartContainer)
	s.mux.HandleFunc("POST /v1/pods/{pod}/containers/{container}/upgrade", s.upgrade)
	s.mux.HandleFunc("GET /v1/events", s.eventsList)
	s.opsRoutes()     // admin_ops.go
	s.featureRoutes() // admin_features.go
	// The runtime's own profiles answer "why does the agent use this much
	// CPU or memory on this node" without a rebuild; the peer check above
	// already limits them to the admin socket's operators.
	s.mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	s.mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	s.mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Errorf("no endpoint %s %s", r.Method, r.URL.Path))
	})
	return &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       30 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(a.log.Handler(), slog.LevelDebug),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if p, err := peerCred(c); err == nil {
				return context.WithValue(ctx, peerKey{}, p)
			}
			return ctx
		},
	}
}

func peerCred(c net.Conn) (Peer, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Peer{}, errors.New("not a unix connection")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Peer{}, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Peer{}, err
	}
	if cerr != nil {
		return Peer{}, cerr
	}
	return Peer{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}, nil
}

// allowed: root, the agent's own user, or a member of the admin group.
func (s *adminServer) allowed(p Peer) bool {
	if p.UID == 0 || int(p.UID) == os.Geteuid() {
		return true
	}
	if s.gid < 0 {
		return false
	}
	if int(p.GID) == s.gid {
		return true
	}
	return procInGroup(p.PID, s.gid)
}

func (s *adminServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p, ok := peerOf(r.Context())
	if !ok || !s.allowed(p) {
		s.a.log.Warn("admin request refused", "uid", p.UID, "pid", p.PID, "path", r.URL.Path)
		writeError(w, http.StatusForbidden, fmt.Errorf("uid %d may not use the admin socket", p.UID))
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, maxAdminBody)
	s.mux.ServeHTTP(w, r)
}

func (s *adminServer) pods(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.a.Pods())
}

func (s *adminServer) pod(w http.ResponseWriter, r *http.Request) {
	p, err := s.a.Pod(r.PathValue("pod"))
	if err != nil {
		writeError(w, statusOf(err), err)
		return
	}
	writeJSON(w, http.StatusOK, p)
}

// restartRequest is the optional body of the restart endpoints.
type restartRequest struct {
	Reason string `json:"reason,omitempty"`
}

func readBody(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if errors.Is(err, io.EOF) {
		return true // an empty body is fine
	}
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Errorf("request body over %d bytes", tooBig.Limit))
			return false
		}
		writeError(w, http.StatusBadRequest, fmt.Errorf("request body: %w", err))
		return false
	}
	if dec.More() {
		writeError(w, http.StatusBadRequest, errors.New("request body: trailing data after the JSON object"))
		return false
	}
	return true
}

func (s *adminServer) restartContainer(w http.ResponseWriter, r *http.Request) {
	var req restartRequest
	if !readBody(w, r, &req) {
		return
	}
	pod, c := r.PathValue("pod"), r.PathValue("container")
	p, _ := peerOf(r.Context())
	s.a.log.Info("operator restart", "pod", pod, "container", c, "uid", p.UID, "reason", req.Reason)
	if err := s.a.RestartContainer(r.Context(), pod, c, CauseOperator); err != nil {
		writeError(w, statusOf(err), err)
		return
	}
	writeJSON(w, http.StatusAccepted, map[string]string{"pod": pod, "container": c, "status": "restarting"})
}

func (s *adminServer) restartPod(w http.ResponseWriter, r *http.Request) {
	var req restartRequest
	if !readBody(w, r, &req) {
		return
	}
	pod := r.PathValue("pod")
	p, _ := peerOf(r.Context())
	s.a.log.Info("operator pod restart", "pod", pod, "uid", p.UID, "reason", req.Reason)
	if err := s.a.RestartPod(r.Context(), pod); err != nil {
		writeError(w, statusOf(err), err)
		return
	}
	writeJSON(w, http.StatusAccepted, map[string]string{"pod": pod, "status": "restarting"})
}

func (s *adminServer) eventsList(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	var since uint64
	limit := 100
	if v := q.Get("since"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Errorf("since: want a sequence number, got %q", v))
			return
		}
		since = n
	}
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 10000 {
			writeError(w, http.StatusBadRequest, fmt.Errorf("limit: want 1 to 10000, got %q", v))
			return
		}
		limit = n
	}
	evs := s.a.Events(since, limit)
	if pod := q.Get("pod"); pod != "" {
		kept := evs[:0]
		for _, e := range evs {
			if e.Pod == pod {
				kept = append(kept, e)
			}
		}
		evs = kept
	}
	writeJSON(w, http.StatusOK, evs)
}

func statusOf(err error) int {
	if errors.Is(err, ErrNotFound) {
		return http.StatusNotFound
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

type apiError struct {
	Error string `json:"error"`
}

func writeError(w http.ResponseWriter, code int, err error) {
	writeJSON(w, code, apiError{Error: err.Error()})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func lookupGroup(name string) (int, error) {
	g, err := user.LookupGroup(name)
	if err != nil {
		if n, aerr := strconv.Atoi(name); aerr == nil {
			return n, nil
		}
		return -1, fmt.Errorf("admin group %q: %w", name, err)
	}
	return strconv.Atoi(g.Gid)
}

// procInGroup reports whether pid has gid among its supplementary groups.
func procInGroup(pid int32, gid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Groups:"); ok {
			for _, f := range strings.Fields(rest) {
				if f == strconv.Itoa(gid) {
					return true
				}
			}
		}
	}
	return false
}
