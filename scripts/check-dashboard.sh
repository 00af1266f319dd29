#!/usr/bin/env bash
# Checks the shipped Grafana dashboard, deploy/grafana/spire-healer.json:
#   1. it is exactly what the generator (deploy/grafana/gen, built with
#      Grafana's foundation SDK, pinned in its go.mod) writes, and
#   2. it passes the SDK's strict decoding (unknown fields and wrong types
#      are errors) and the schema's Validate().
# Our own rules (PromQL, metric names, units, grid, datasource) are checked
# by `cargo test --test it dashboard`.
#
# `scripts/check-dashboard.sh --write` regenerates the file instead of
# comparing (after editing deploy/grafana/gen/dashboard.go).
#
# The generator is built once per source version (a hash of go.mod, go.sum
# and the .go files) into target/dashboard-gen/, like scripts/install-spire.sh
# caches SPIRE; building it needs Go >= 1.26 and the module proxy, once.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
gen="$root/deploy/grafana/gen"
json="$root/deploy/grafana/spire-healer.json"
cache="$root/target/dashboard-gen"

write=no
case "${1:-}" in
  --write) write=yes ;;
  "") ;;
  *) echo "usage: $0 [--write]" >&2; exit 64 ;;
esac

hash="$(cd "$gen" && cat go.mod go.sum $(ls ./*.go | LC_ALL=C sort) | sha256sum | cut -c1-16)"
bin="$cache/gen-$hash"
if [[ ! -x "$bin" ]]; then
  command -v go >/dev/null || { echo "error: go (>= 1.26) is required to build the dashboard generator (deploy/grafana/gen)" >&2; exit 1; }
  mkdir -p "$cache"
  echo "building the dashboard generator (deploy/grafana/gen) into $bin"
  (cd "$gen" && go build -trimpath -o "$bin.tmp" .)
  mv "$bin.tmp" "$bin"
  # Older builds of other source versions are of no further use.
  find "$cache" -maxdepth 1 -name 'gen-*' ! -name "gen-$hash" -delete
fi

if [[ $write == yes ]]; then
  "$bin" -out "$json"
  echo "wrote $json"
else
  tmp="$(mktemp)"
  trap 'rm -f "$tmp"' EXIT
  "$bin" -out "$tmp"
  if ! diff -u "$json" "$tmp" >&2; then
    echo "error: deploy/grafana/spire-healer.json differs from what deploy/grafana/gen generates (diff above: - committed, + generated); run scripts/check-dashboard.sh --write" >&2
    exit 1
  fi
  echo "deploy/grafana/spire-healer.json is up to date with its generator"
fi
"$bin" -check "$json"
