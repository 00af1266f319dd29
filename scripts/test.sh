#!/usr/bin/env bash
# The project's whole test command: provisions what the tests need, then runs
# rustfmt, clippy and every test target of the workspace (the product crate
# and the lab crate in lab/). Extra arguments go to `cargo test`, e.g.
# `scripts/test.sh lab_ -- --nocapture`.
#
# Needs:
#   - PostgreSQL (scripts/lib/postgres.sh): installed with apt-get (Debian's
#     `postgresql` package) when missing; a cluster on 127.0.0.1:5432 is
#     started (or created) and the role and database `spire_healer` are set
#     up. Root, or passwordless sudo, is needed for that. To use another
#     server instead, set SPIRE_HEALER_TEST_PG_URL before calling this script;
#     it is then used as is and nothing is provisioned.
#   - Prometheus (scripts/lib/prometheus.sh), for the test that scrapes
#     spire-healer into a real server: installed with apt-get (Debian's
#     `prometheus` package, without recommends) when missing, and any service
#     the package starts is stopped and disabled again (the test runs its own
#     server on 127.0.0.1). Root, or passwordless sudo, is needed for that.
#     To use another binary, set SPIRE_HEALER_PROMETHEUS_BIN to its path; it
#     is then used as is and nothing is installed.
#   - Go >= 1.26.6 and gcc, to build spire-server and spire-agent into
#     .spire/bin (scripts/install-spire.sh; done once, then cached).
#   - Go >= 1.26, to build the OpenTelemetry Collector the trace test sends
#     spans to (scripts/install-otelcol.sh; built once into the user's cache
#     directory, then cached). To use another binary, set
#     SPIRE_HEALER_OTELCOL_BIN to its path; it is then used as is (it needs
#     the otlp receiver and this project's jsonfile exporter).
#   - Go >= 1.26.6, to build the kubelet-less Kubernetes control plane the
#     Kubernetes tests start (kube-apiserver, kube-controller-manager,
#     kube-scheduler, etcd, kwok; scripts/install-k8s.sh; about 10
#     CPU-minutes once, then cached in the user's cache directory), and
#     kubectl. To use other binaries, set SPIRE_HEALER_K8S_BIN to a folder
#     holding them; it is then used as is.
#   - A Rust toolchain with rustfmt and clippy.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

say() { printf '\n==> %s\n' "$*"; }
die() { printf '\nerror: %s\n' "$*" >&2; exit 1; }

# shellcheck source=scripts/lib/postgres.sh
source "$root/scripts/lib/postgres.sh"
# shellcheck source=scripts/lib/prometheus.sh
source "$root/scripts/lib/prometheus.sh"

# --- PostgreSQL ---------------------------------------------------------------
ensure_postgres
export SPIRE_HEALER_TEST_PG_URL="$PG_URL"

# --- Prometheus ---------------------------------------------------------------
ensure_prometheus
export SPIRE_HEALER_PROMETHEUS_BIN="$PROMETHEUS_BIN"
# The alert rules: valid, and their unit tests pass (promtool ships beside
# prometheus).
promtool="$(dirname "$PROMETHEUS_BIN")/promtool"
[[ -x "$promtool" ]] || die "$promtool not found beside $PROMETHEUS_BIN"
say "checking the alert rules (promtool check rules, promtool test rules)"
"$promtool" check rules "$root/deploy/prometheus/spire-healer.rules.yaml" \
  || die "promtool check rules failed"
(cd "$root/deploy/prometheus/tests" && "$promtool" test rules ./*.yaml) \
  || die "promtool test rules failed"

# --- SPIRE --------------------------------------------------------------------
export SPIRE_HEALER_SPIRE_BIN="$root/.spire/bin"
if ! command -v go >/dev/null \
   && ! [[ -x "$SPIRE_HEALER_SPIRE_BIN/spire-server" && -x "$SPIRE_HEALER_SPIRE_BIN/spire-agent" ]]; then
  die "go is not installed; Go >= 1.26.6 (and gcc) is needed once to build SPIRE into .spire/bin"
fi
say "installing SPIRE (scripts/install-spire.sh)"
"$root/scripts/install-spire.sh" || die "scripts/install-spire.sh failed"

# --- OpenTelemetry Collector -------------------------------------------------
if [[ -z "${SPIRE_HEALER_OTELCOL_BIN:-}" ]]; then
  say "installing the OpenTelemetry Collector (scripts/install-otelcol.sh)"
  otelcol_bin="$("$root/scripts/install-otelcol.sh" | tail -n 1)" \
    || die "scripts/install-otelcol.sh failed"
  export SPIRE_HEALER_OTELCOL_BIN="$otelcol_bin"
fi

# --- Kubernetes control plane -----------------------------------------------
if [[ -z "${SPIRE_HEALER_K8S_BIN:-}" ]]; then
  say "installing the Kubernetes control plane (scripts/install-k8s.sh)"
  k8s_bin="$("$root/scripts/install-k8s.sh" | tail -n 1)" \
    || die "scripts/install-k8s.sh failed"
  export SPIRE_HEALER_K8S_BIN="$k8s_bin"
fi
command -v kubectl >/dev/null || die "kubectl is not installed; the Kubernetes tests apply manifests with it"

# --- Grafana dashboard --------------------------------------------------------
say "checking the Grafana dashboard (scripts/check-dashboard.sh)"
"$root/scripts/check-dashboard.sh" || die "scripts/check-dashboard.sh failed"

# --- Helm chart and plain manifests ------------------------------------------
say "checking the Helm chart (scripts/check-helm.sh)"
"$root/scripts/check-helm.sh" || die "scripts/check-helm.sh failed"

# --- Rust ---------------------------------------------------------------------
command -v cargo >/dev/null || die "cargo is not installed"

# A full build of every target takes a few GiB; say so up front rather than
# failing half-way through a link with ENOSPC.
avail_kib="$(df -Pk "$root" | awk 'NR==2 {print $4}')"
if [[ -n "$avail_kib" && "$avail_kib" -lt 4194304 ]]; then
  printf 'warning: only %s MiB free under %s; the build needs about 4 GiB\n' \
    "$((avail_kib / 1024))" "$root" >&2
fi

say "cargo fmt --all --check"
cargo fmt --all --check || die "formatting differs; run 'cargo fmt --all'"

say "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings || die "clippy reported problems"

# The integration tests spend most of their time waiting on SPIRE's timers
# (SVID lifetimes, sync intervals, verification windows), not on the CPU:
# four at a time keeps a 2-core machine busy without starving their labs.
# Set RUST_TEST_THREADS to change it.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"

say "cargo test --workspace --all-targets $* (RUST_TEST_THREADS=$RUST_TEST_THREADS)"
cargo test --workspace --all-targets "$@" || die "tests failed"

say "all checks passed"
