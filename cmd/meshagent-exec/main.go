// Command meshagent-exec is the exec shim meshagent starts containers
// through (see internal/execshim). It is a separate, small binary so that a
// container start costs a millisecond, not the agent's own start-up.
package main

import (
	"fmt"
	"os"

	"github.com/meshagent/meshagent/internal/execshim"
)

func main() {
	execshim.RunIfRequested()
	fmt.Fprintln(os.Stderr, "meshagent-exec: only meshagent runs this, between fork and a container's command")
	os.Exit(2)
}
