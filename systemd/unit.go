package systemd

import _ "embed"

// UnitName is the name the unit is installed under.
const UnitName = "meshagent.service"

// Unit is the host-mode unit file, the same bytes as systemd/meshagent.service
// in the repository, so the binary can print or install its own unit
// without a checkout.
//
//go:embed meshagent.service
var Unit string
