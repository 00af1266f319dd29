#!/usr/bin/env bash
# Builds the OpenTelemetry Collector the trace test runs against (pinned
# collector v0.165.0 / core v1.71.0, see scripts/otelcol-build/go.mod) and
# prints the path of the binary on its last line of stdout.
#
# The binary is cached under the user's cache directory, keyed by a hash of
# scripts/otelcol-build/{go.mod,go.sum,main.go}: a fresh clone on the same
# machine finds it again, and a change to the build module builds anew.
# Set SPIRE_HEALER_OTELCOL_CACHE to cache elsewhere. A cold build takes about
# two minutes on two cores (modules from the Go module proxy, then compiling
# the collector's ~200 dependencies); a cached one, no time.
#
# The build goes through the small module in scripts/otelcol-build, not
# `go install ...@version`: the upstream distributions are not published
# modules, and a build module pins every version in go.sum.
set -euo pipefail

OTELCOL_VERSION="v0.165.0"
root="$(cd "$(dirname "$0")/.." && pwd)"
build="$root/scripts/otelcol-build"

pinned="$(awk '$1 == "go.opentelemetry.io/collector/otelcol" { print $2; exit }' "$build/go.mod")"
if [[ "$pinned" != "$OTELCOL_VERSION" ]]; then
  echo "error: scripts/otelcol-build/go.mod pins otelcol '$pinned', this script expects $OTELCOL_VERSION" >&2
  exit 1
fi

key="$(cat "$build/go.mod" "$build/go.sum" "$build/main.go" | sha256sum | cut -c1-16)"
cache="${SPIRE_HEALER_OTELCOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spire-healer/otelcol}"
dir="$cache/$OTELCOL_VERSION-$key"
bin="$dir/otelcol-spire-healer"

if [[ -x "$bin" ]]; then
  echo "otelcol $OTELCOL_VERSION already built in $dir" >&2
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "error: go (>= 1.26) is required to build the OpenTelemetry Collector" >&2; exit 1; }

mkdir -p "$dir"
echo "building otelcol $OTELCOL_VERSION into $dir (about two minutes when cold)" >&2
start=$SECONDS
tmp="$(mktemp "$dir/.otelcol.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
(
  cd "$build"
  CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "-s -w" -o "$tmp" .
)
"$tmp" --version >/dev/null 2>&1 || { echo "error: the built collector does not run" >&2; exit 1; }
# Renamed into place last: a build cut short never leaves a binary that
# looks cached.
mv -f "$tmp" "$bin"
trap - EXIT
echo "built otelcol $OTELCOL_VERSION in $((SECONDS - start)) s: $("$bin" --version 2>&1)" >&2
echo "$bin"
