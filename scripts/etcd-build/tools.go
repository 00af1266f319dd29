//go:build tools

// Package tools pins the etcd server built by scripts/install-k8s.sh.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
)
