package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"
)

// The operator's endpoints: metrics, switches, reload, inspect, health.
func (s *adminServer) opsRoutes() {
	s.mux.Handle("GET /metrics", s.a.metrics.Handler())
	s.mux.HandleFunc("GET /v1/health", s.health)
	s.mux.HandleFunc("GET /v1/switches", s.switchList)
	s.mux.HandleFunc("PUT /v1/switches/{name}", s.switchSet)
	s.mux.HandleFunc("POST /v1/reload", s.reload)
	s.mux.HandleFunc("GET /v1/inspect", s.inspect)
}

func (s *adminServer) health(w http.ResponseWriter, r *http.Request) {
	if err := s.a.supervisorsAlive(); err != nil {
		writeError(w, http.StatusServiceUnavailable, err)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if err := s.a.pingSupervisors(ctx); err != nil {
		writeError(w, http.StatusServiceUnavailable, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"ok": true, "pods": len(s.a.Pods())})
}

func (s *adminServer) switchList(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.a.Switches())
}

// switchRequest is the body of PUT /v1/switches/{name}.
type switchRequest struct {
	On *bool `json:"on"`
}

func (s *adminServer) switchSet(w http.ResponseWriter, r *http.Request) {
	var req switchRequest
	if !readBody(w, r, &req) {
		return
	}
	if req.On == nil {
		writeError(w, http.StatusBadRequest, errors.New(`request body: want {"on": true} or {"on": false}`))
		return
	}
	name := r.PathValue("name")
	p, _ := peerOf(r.Context())
	s.a.log.Warn("switch flipped", "switch", name, "value", onOff(*req.On), "uid", p.UID, "pid", p.PID)
	st, err := s.a.SetSwitch(r.Context(), name, *req.On, p.UID)
	if errors.Is(err, ErrUnknownSwitch) {
		writeError(w, http.StatusNotFound, err)
		return
	}
	if err != nil {
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *adminServer) reload(w http.ResponseWriter, r *http.Request) {
	p, _ := peerOf(r.Context())
	s.a.log.Info("config reload requested", "uid", p.UID, "pid", p.PID)
	res, err := s.a.Reload(r.Context())
	if errors.Is(err, ErrReloadRefused) {
		writeError(w, http.StatusUnprocessableEntity, err)
		return
	}
	if err != nil {
		writeError(w, http.StatusInternalServerError, fmt.Errorf("reload: %w", err))
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (s *adminServer) inspect(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.a.Inspect(r.Context()))
}
