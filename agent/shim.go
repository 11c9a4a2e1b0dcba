package agent

import (
	"os"
	"path/filepath"
	"sync"

	"github.com/meshagent/meshagent/internal/execshim"
)

// RunShimIfRequested turns this process into the exec shim when the agent
// started it as one (no meshagent-exec installed beside the agent), and
// never returns in that case. Call it first thing in main (and in TestMain
// of packages whose tests start containers).
func RunShimIfRequested() { execshim.RunIfRequested() }

// defaultShim is meshagent-exec beside the running binary when it is
// installed there; otherwise the agent's own binary does the shim's work,
// at the cost of its longer start-up.
var defaultShim = sync.OnceValue(func() string {
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "meshagent-exec")
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p
		}
	}
	return "/proc/self/exe"
})
