package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"time"
)

// Runtime switches are the operator's emergency brakes: each turns one
// automatic behaviour of the agent off, node-wide, until turned back on.
// They live in <stateDir>/switches.json so an agent restart (or a
// watchdog abort) cannot silently turn a brake back off.
//
// The machine obeys auto-restart and startup-gate (InSwitches, posted to
// every pod on a flip). handoff-store is pushed to every pod's stores on a
// flip, which release their fds at once (handoff_switch.go). The others are
// consulted by the features they govern through Agent.Switch at the moment
// they act, which is how a flip is honoured at once.

// Switch names.
const (
	SwitchAutoRestart  = "auto-restart"
	SwitchCgroupWrites = "cgroup-writes"
	SwitchHotUpgrade   = "hot-upgrade"
	SwitchStartupGate  = "startup-gate"
	SwitchNRI          = "nri"
	SwitchHandoffStore = "handoff-store"
)

// EvSwitch is the event of a switch flip (Pod is empty: it is node-wide).
const EvSwitch = "switch"

var switchDocs = map[string]string{
	SwitchAutoRestart:  "restart containers that exit or hang (off: they stay down; operator restarts still work)",
	SwitchCgroupWrites: "write cgroup settings and oom_score_adj, and correct drift",
	SwitchHotUpgrade:   "hot-upgrade sidecars by handing their listeners to the new process",
	SwitchStartupGate:  "hold apps until their sidecars are ready (off: forced fail-open)",
	SwitchNRI:          "adjust containers through NRI",
	SwitchHandoffStore: "hold sidecars' listening sockets for hand-off",
}

// SwitchNames lists every switch, sorted.
func SwitchNames() []string {
	out := make([]string, 0, len(switchDocs))
	for n := range switchDocs {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// SwitchState is one switch as the admin API shows it.
type SwitchState struct {
	Name        string    `json:"name"`
	On          bool      `json:"on"`
	Description string    `json:"description"`
	Changed     time.Time `json:"changed,omitzero"`
	// ChangedBy is the uid of the admin socket peer that last flipped it.
	ChangedBy *uint32 `json:"changedBy,omitempty"`
}

// ErrUnknownSwitch means no switch has that name.
var ErrUnknownSwitch = errors.New("unknown switch")

type switchRecord struct {
	On      bool      `json:"on"`
	Changed time.Time `json:"changed"`
	UID     uint32    `json:"uid"`
}

// switchBoard holds the switches. mu also orders flips against pods being
// added, so every pod's machine sees every flip exactly in order.
type switchBoard struct {
	path string

	mu  sync.Mutex
	rec map[string]switchRecord // flipped switches; absent ones are on
}

func loadSwitches(stateDir string) (*switchBoard, error) {
	b := &switchBoard{path: filepath.Join(stateDir, "switches.json"), rec: map[string]switchRecord{}}
	raw, err := os.ReadFile(b.path)
	if errors.Is(err, os.ErrNotExist) {
		return b, nil
	}
	if err != nil {
		return nil, fmt.Errorf("switches %s: %w", b.path, err)
	}
	if err := json.Unmarshal(raw, &b.rec); err != nil {
		// Not silently "all on": an operator's brake must not vanish.
		return nil, fmt.Errorf("switches %s: %w (fix or remove the file; removing turns every switch on)", b.path, err)
	}
	for n := range b.rec {
		if _, ok := switchDocs[n]; !ok {
			delete(b.rec, n) // written by a newer meshagent; ignored here
		}
	}
	return b, nil
}

func (b *switchBoard) on(name string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	r, ok := b.rec[name]
	return !ok || r.On
}

// save writes the switches atomically (a crash leaves the old or the new
// file) and durably (a power loss right after a flip keeps it).
func (b *switchBoard) save(rec map[string]switchRecord) error {
	if err := os.MkdirAll(filepath.Dir(b.path), 0o700); err != nil {
		return fmt.Errorf("switches %s: %w", b.path, err)
	}
	raw, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	tmp := b.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("switches %s: %w", tmp, err)
	}
	_, werr := f.Write(raw)
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		os.Remove(tmp)
		return fmt.Errorf("switches %s: %w", tmp, werr)
	}
	if err := os.Rename(tmp, b.path); err != nil {
		return fmt.Errorf("switches %s: %w", b.path, err)
	}
	if d, err := os.Open(filepath.Dir(b.path)); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// machineInput is what the pod machines need of the switches; call with
// b.mu held.
func (b *switchBoard) machineInput() InSwitches {
	return InSwitches{AutoRestart: b.onLocked(SwitchAutoRestart), StartupGate: b.onLocked(SwitchStartupGate)}
}

// onLocked is on with b.mu held.
func (b *switchBoard) onLocked(name string) bool {
	r, ok := b.rec[name]
	return !ok || r.On
}

// Switch reports whether the named switch is on. Unknown names are on: a
// feature asking about a switch this agent does not know keeps working.
func (a *Agent) Switch(name string) bool { return a.sw.on(name) }

// Switches returns every switch.
func (a *Agent) Switches() []SwitchState {
	a.sw.mu.Lock()
	defer a.sw.mu.Unlock()
	var out []SwitchState
	for _, n := range SwitchNames() {
		s := SwitchState{Name: n, On: true, Description: switchDocs[n]}
		if r, ok := a.sw.rec[n]; ok {
			s.On, s.Changed = r.On, r.Changed
			uid := r.UID
			s.ChangedBy = &uid
		}
		out = append(out, s)
	}
	return out
}

// SetSwitch turns a switch on or off on behalf of uid. The new value is
// on disk before it takes effect; every pod has been told when it returns.
func (a *Agent) SetSwitch(ctx context.Context, name string, on bool, uid uint32) (SwitchState, error) {
	if _, ok := switchDocs[name]; !ok {
		return SwitchState{}, fmt.Errorf("switch %q (known: %v): %w", name, SwitchNames(), ErrUnknownSwitch)
	}
	a.sw.mu.Lock()
	prev := true
	if r, ok := a.sw.rec[name]; ok {
		prev = r.On
	}
	next := make(map[string]switchRecord, len(a.sw.rec)+1)
	for k, v := range a.sw.rec {
		next[k] = v
	}
	next[name] = switchRecord{On: on, Changed: time.Now(), UID: uid}
	if err := a.sw.save(next); err != nil {
		a.sw.mu.Unlock()
		return SwitchState{}, err
	}
	a.sw.rec = next
	in := a.sw.machineInput()
	// Under mu, so a pod added meanwhile gets either this input or the
	// state after it, never an older one after a newer one.
	for _, r := range a.runners() {
		sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		if err := r.send(sctx, in); err != nil {
			a.log.Error("switch not delivered to pod", "pod", r.spec.Name, "switch", name, "err", err)
		}
		cancel()
	}
	if name == SwitchHandoffStore {
		// Released (or accepted again) before SetSwitch returns.
		for _, r := range a.runners() {
			r.hx.setHolding(on)
		}
	}
	a.sw.mu.Unlock()

	a.record(Event{Time: time.Now(), Type: EvSwitch, Reason: fmt.Sprintf("%s %s by uid %d", name, onOff(on), uid),
		Fields: map[string]string{"switch": name, "value": onOff(on), "previous": onOff(prev), "uid": strconv.FormatUint(uint64(uid), 10)}})
	for _, s := range a.Switches() {
		if s.Name == name {
			return s, nil
		}
	}
	return SwitchState{}, nil
}

func onOff(on bool) string {
	if on {
		return "on"
	}
	return "off"
}

// ParseOnOff accepts on/off (and true/false, 1/0) for a switch value.
func ParseOnOff(s string) (bool, error) {
	switch s {
	case "on", "true", "1", "yes":
		return true, nil
	case "off", "false", "0", "no":
		return false, nil
	}
	return false, fmt.Errorf("want on or off, got %q", s)
}
