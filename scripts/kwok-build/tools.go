//go:build tools

// Package tools pins kwok (simulated kubelets) and helm, built by
// scripts/install-k8s.sh.
package tools

import (
	_ "helm.sh/helm/v4/cmd/helm"
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
