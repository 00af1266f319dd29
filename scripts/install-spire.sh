#!/usr/bin/env bash
# Builds spire-server and spire-agent (pinned, see scripts/spire-build/go.mod)
# into .spire/bin, a git-ignored project-local folder. Skips the build when
# both binaries and a matching .version file are already there.
#
# The build goes through the small module in scripts/spire-build rather than
# `go install pkg@version`, so that it works with a module proxy that serves
# exact versions but no version lists, and so that the one dependency SPIRE
# only needs for its EJBCA UpstreamAuthority plugin can be replaced by a local
# stand-in (scripts/spire-build/ejbca-stub). That plugin is unusable in the
# resulting binaries; nothing in this project configures it.
set -euo pipefail

SPIRE_VERSION="v1.15.3"
root="$(cd "$(dirname "$0")/.." && pwd)"
build="$root/scripts/spire-build"
bin="$root/.spire/bin"

pinned="$(awk '$1 == "github.com/spiffe/spire" { print $2; exit } $1 == "require" && $2 == "github.com/spiffe/spire" { print $3; exit }' "$build/go.mod")"
if [[ "$pinned" != "$SPIRE_VERSION" ]]; then
  echo "error: scripts/spire-build/go.mod pins spire '$pinned', this script expects $SPIRE_VERSION" >&2
  exit 1
fi

if [[ -x "$bin/spire-server" && -x "$bin/spire-agent" && -f "$bin/.version" \
      && "$(cat "$bin/.version")" == "$SPIRE_VERSION" ]]; then
  echo "spire $SPIRE_VERSION already installed in $bin"
  exit 0
fi

command -v go >/dev/null || { echo "error: go (>= 1.26.6) is required to build SPIRE" >&2; exit 1; }
command -v gcc >/dev/null || { echo "error: gcc is required to build SPIRE (cgo, sqlite3 datastore)" >&2; exit 1; }

mkdir -p "$bin"
rm -f "$bin/.version"
echo "building spire-server and spire-agent $SPIRE_VERSION into $bin (this takes several minutes)"
start=$SECONDS
(
  cd "$build"
  # Stamp the version as release builds do (else it reads "1.15.3-dev-unk").
  GOBIN="$bin" CGO_ENABLED=1 go install \
    -ldflags "-s -w -X github.com/spiffe/spire/pkg/common/version.gittag=${SPIRE_VERSION#v}" \
    github.com/spiffe/spire/cmd/spire-server \
    github.com/spiffe/spire/cmd/spire-agent
)
for b in spire-server spire-agent; do
  [[ -x "$bin/$b" ]] || { echo "error: build finished but $bin/$b is missing" >&2; exit 1; }
done
"$bin/spire-server" --version >/dev/null 2>&1 || { echo "error: $bin/spire-server does not run" >&2; exit 1; }
echo "$SPIRE_VERSION" > "$bin/.version"
echo "built spire $SPIRE_VERSION in $((SECONDS - start)) s: $("$bin/spire-server" --version 2>&1)"
