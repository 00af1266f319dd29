//go:build tools

// Package tools pins the SPIRE commands built by scripts/install-spire.sh.
package tools

import (
	_ "github.com/spiffe/spire/cmd/spire-agent"
	_ "github.com/spiffe/spire/cmd/spire-server"
)
