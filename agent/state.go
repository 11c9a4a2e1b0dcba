package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// stateDir keeps, per pod, the processes a restarted agent must adopt
// rather than start again. Files are replaced atomically, so a SIGKILL of
// the agent at any instant leaves either the old or the new record.
type stateDir struct{ dir string }

type podRecord struct {
	Pod        string                     `json:"pod"`
	Containers map[string]containerRecord `json:"containers"`
}

type containerRecord struct {
	ProcessRecord
	Restarts int `json:"restarts"`
}

func (s stateDir) podsDir() string { return filepath.Join(s.dir, "pods") }

func (s stateDir) path(pod string) string { return filepath.Join(s.podsDir(), pod+".json") }

func (s stateDir) save(r podRecord) error {
	if err := os.MkdirAll(s.podsDir(), 0o700); err != nil {
		return fmt.Errorf("state dir %s: %w", s.podsDir(), err)
	}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	tmp := s.path(r.Pod) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("pod %s: state: %w", r.Pod, err)
	}
	if err := os.Rename(tmp, s.path(r.Pod)); err != nil {
		return fmt.Errorf("pod %s: state: %w", r.Pod, err)
	}
	return nil
}

func (s stateDir) load(pod string) (podRecord, error) {
	b, err := os.ReadFile(s.path(pod))
	if errors.Is(err, os.ErrNotExist) {
		return podRecord{Pod: pod}, nil
	}
	if err != nil {
		return podRecord{}, fmt.Errorf("pod %s: state: %w", pod, err)
	}
	var r podRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return podRecord{}, fmt.Errorf("pod %s: state file %s: %w", pod, s.path(pod), err)
	}
	return r, nil
}

func (s stateDir) remove(pod string) error {
	err := os.Remove(s.path(pod))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// pods lists the pods that have a state file.
func (s stateDir) pods() ([]string, error) {
	ents, err := os.ReadDir(s.podsDir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if n, ok := strings.CutSuffix(e.Name(), ".json"); ok {
			out = append(out, n)
		}
	}
	return out, nil
}

// lock makes sure one agent owns the state directory; the lock goes with
// the process, so a SIGKILLed agent never leaves it held.
func (s stateDir) lock() (*os.File, error) {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir %s: %w", s.dir, err)
	}
	p := filepath.Join(s.dir, "agent.lock")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state dir lock %s: %w", p, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("state dir %s is in use by another meshagent: %w", s.dir, err)
	}
	return f, nil
}
