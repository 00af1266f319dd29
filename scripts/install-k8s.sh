#!/usr/bin/env bash
# Builds the kubelet-less Kubernetes control plane the Kubernetes tests run
# against, and helm for the chart checks, and prints the folder holding the
# binaries on its last line of stdout:
#   kube-apiserver, kube-controller-manager, kube-scheduler  v1.37.2
#     (scripts/k8s-build: k8s.io/kubernetes with one replace per staging module)
#   etcd                                                     v3.7.3
#     (scripts/etcd-build: `go install` refuses etcd's replace directives)
#   kwok (simulated kubelets: nodes Ready, pods Running and Ready)  v0.8.0
#   helm                                                     v4.3.2
#     (scripts/kwok-build)
#
# The binaries are cached under the user's cache directory, keyed by a hash of
# the three build modules: a fresh clone on the same machine finds them again,
# and a change to a module builds anew. Set SPIRE_HEALER_K8S_CACHE to cache
# elsewhere. A cold build takes about 10 CPU-minutes (kube-apiserver alone
# ~6.5 min and ~2.8 GB while linking), so the commands are built one at a time.
set -euo pipefail

K8S_VERSION="v1.37.2"
ETCD_VERSION="v3.7.3"
KWOK_VERSION="v0.8.0"
HELM_VERSION="v4.3.2"
root="$(cd "$(dirname "$0")/.." && pwd)"
scripts="$root/scripts"

check_pin() { # module-dir module-path version
  local got
  got="$(awk -v m="$2" '($1 == m) { print $2; exit } ($1 == "require" && $2 == m) { print $3; exit }' "$scripts/$1/go.mod")"
  if [[ "$got" != "$3" ]]; then
    echo "error: scripts/$1/go.mod pins $2 '$got', this script expects $3" >&2
    exit 1
  fi
}
check_pin k8s-build k8s.io/kubernetes "$K8S_VERSION"
check_pin etcd-build go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
check_pin kwok-build sigs.k8s.io/kwok "$KWOK_VERSION"
check_pin kwok-build helm.sh/helm/v4 "$HELM_VERSION"

key="$(cat "$scripts"/{k8s,etcd,kwok}-build/{go.mod,go.sum,tools.go} | sha256sum | cut -c1-16)"
cache="${SPIRE_HEALER_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spire-healer/k8s}"
dir="$cache/$K8S_VERSION-$key"
names=(kube-apiserver kube-controller-manager kube-scheduler etcd kwok helm)

all_there() {
  local n
  for n in "${names[@]}"; do [[ -x "$dir/$n" ]] || return 1; done
}
if all_there; then
  echo "kubernetes $K8S_VERSION control plane already built in $dir" >&2
  echo "$dir"
  exit 0
fi

command -v go >/dev/null || { echo "error: go (>= 1.26.6) is required to build the control plane" >&2; exit 1; }
mkdir -p "$dir"
echo "building the kubernetes $K8S_VERSION control plane into $dir (about 10 CPU-minutes when cold)" >&2
start=$SECONDS

# build MODULE-DIR NAME PACKAGE [LDFLAGS]: each binary is renamed into place
# last, so a build cut short never leaves a binary that looks cached.
build() {
  local mod="$1" name="$2" pkg="$3" ldflags="${4:-}" t0=$SECONDS
  [[ -x "$dir/$name" ]] && return 0
  local tmp="$dir/.$name.tmp"
  (
    cd "$scripts/$mod"
    CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "-s -w $ldflags" -o "$tmp" "$pkg"
  )
  mv -f "$tmp" "$dir/$name"
  echo "  $name in $((SECONDS - t0)) s" >&2
}

kver="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37 -X k8s.io/component-base/version.gitTreeState=clean"
build etcd-build etcd go.etcd.io/etcd/server/v3
build kwok-build kwok sigs.k8s.io/kwok/cmd/kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}"
build kwok-build helm helm.sh/helm/v4/cmd/helm "-X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
build k8s-build kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$kver"
build k8s-build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$kver"
build k8s-build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kver"

"$dir/kube-apiserver" --version | grep -q "$K8S_VERSION" || { echo "error: the built kube-apiserver does not report $K8S_VERSION" >&2; exit 1; }
"$dir/etcd" --version >/dev/null || { echo "error: the built etcd does not run" >&2; exit 1; }
echo "built the control plane in $((SECONDS - start)) s" >&2
echo "$dir"
