# shellcheck shell=bash
# Prometheus for the tests that scrape spire-healer into a real server
# (tests/it/prometheus.rs). Source it, then call `ensure_prometheus`:
# afterwards PROMETHEUS_BIN holds the path of a prometheus binary.
#
# - Prometheus is installed with apt-get (Debian's `prometheus` package,
#   without its recommended exporters) when it is missing. Root, or
#   passwordless sudo, is needed for that. The tests run their own server on
#   127.0.0.1 with a private data directory, so a service the package may
#   have started is stopped and disabled again.
# - When SPIRE_HEALER_PROMETHEUS_BIN is set, it is used as is and nothing is
#   installed.
#
# Expects `say` and `die` functions from the caller.

# Runs a command as root: directly when we are root, else through sudo.
# (The same helper as in postgres.sh, with this file's advice.)
prom_as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo -n "$@"
  else
    die "root (or passwordless sudo) is needed to install Prometheus; run as root, or set SPIRE_HEALER_PROMETHEUS_BIN to a prometheus binary"
  fi
}

# Stops and disables the package's own `prometheus` service: under a
# running systemd through systemctl, else through its init script (Debian's
# policy-rc.d may already have kept it from starting); then disables it at
# boot for both (`systemctl disable` works without a running systemd).
# Leaves any other prometheus process alone.
stop_prometheus_service() {
  local systemd=no
  if command -v systemctl >/dev/null \
     && [[ "$(systemctl is-system-running 2>/dev/null || true)" != offline ]]; then
    systemd=yes
  fi
  if [[ $systemd == yes ]] && systemctl is-active --quiet prometheus.service; then
    say "stopping the prometheus service the package started"
    prom_as_root systemctl stop prometheus.service \
      || die "systemctl stop prometheus.service failed"
  elif [[ $systemd == no && -x /etc/init.d/prometheus ]] \
       && /etc/init.d/prometheus status >/dev/null 2>&1; then
    say "stopping the prometheus service the package started"
    prom_as_root /etc/init.d/prometheus stop \
      || die "/etc/init.d/prometheus stop failed"
  fi
  if command -v systemctl >/dev/null \
     && systemctl is-enabled --quiet prometheus.service 2>/dev/null; then
    say "disabling the prometheus service at boot"
    prom_as_root systemctl disable --quiet prometheus.service \
      || die "systemctl disable prometheus.service failed"
  fi
  if [[ -x /etc/init.d/prometheus ]] && command -v update-rc.d >/dev/null; then
    prom_as_root update-rc.d prometheus disable >/dev/null 2>&1 \
      || die "update-rc.d prometheus disable failed"
  fi
  # The package's daemon runs as the `prometheus` user; the tests' never do.
  if pgrep -u prometheus -x prometheus >/dev/null 2>&1; then
    die "the prometheus system service is still running (pgrep -u prometheus -x prometheus); stop it before running the tests"
  fi
}

# Sets PROMETHEUS_BIN: SPIRE_HEALER_PROMETHEUS_BIN when given, else the
# prometheus on PATH (installed on the way).
ensure_prometheus() {
  if [[ -n "${SPIRE_HEALER_PROMETHEUS_BIN:-}" ]]; then
    say "using the Prometheus given by SPIRE_HEALER_PROMETHEUS_BIN"
    PROMETHEUS_BIN="$SPIRE_HEALER_PROMETHEUS_BIN"
  else
    if ! command -v prometheus >/dev/null; then
      say "installing Prometheus (apt-get install prometheus)"
      command -v apt-get >/dev/null || die "Prometheus is not installed and apt-get is not available; install Prometheus or set SPIRE_HEALER_PROMETHEUS_BIN"
      prom_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q \
        || die "apt-get update failed"
      prom_as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends prometheus \
        || die "apt-get install prometheus failed"
      command -v prometheus >/dev/null || die "Prometheus was installed but prometheus is still not on PATH"
      stop_prometheus_service
    fi
    PROMETHEUS_BIN="$(command -v prometheus)"
  fi
  [[ -x "$PROMETHEUS_BIN" ]] || die "$PROMETHEUS_BIN is not an executable file (SPIRE_HEALER_PROMETHEUS_BIN or the prometheus on PATH)"
  "$PROMETHEUS_BIN" --version >/dev/null 2>&1 || die "$PROMETHEUS_BIN --version failed"
}
