#!/usr/bin/env bash
# A real SPIRE HA lab to try spire-healer against by hand: two spire-servers
# sharing one PostgreSQL database (a fresh database per lab, dropped at stop)
# and two spire-agents, each attested with its own join token under
# spiffe://healer.test/node/<n>. The lab runs in the background
# (`spire-lab up`, the lab crate's binary); its files stay in DIR.
#
#   scripts/lab.sh start  [DIR]   build, provision, start the lab, print it
#   scripts/lab.sh status [DIR]   sockets, URLs, and whether each pid lives
#                                 (exit 3 when something is not running)
#   scripts/lab.sh stop   [DIR]   `spire-lab down`, then end the
#                                 background `spire-lab up` process
#
# DIR defaults to .lab/ in the repository (git-ignored). It holds:
#   lab.json           every socket, port, URL, pid and restart command
#   spire-healer.toml  a config watching the lab's agents:
#                        spire-healer run --config DIR/spire-healer.toml
#                      (each agent has an entry spiffe://healer.test/healer/
#                      agent-N for the uid that started the lab)
#   lab.log            output of the background `spire-lab up`
#   lab.pid            its pid
#   server-a/ server-b/ agent-0/ agent-1/   configs, logs, sockets, data;
#                      agent-N/restart.sh restarts agent N (it re-reads
#                      agent.conf; a file agent-N/join_token is used once)
#
# `start` runs `cargo build --release` (spire-healer and spire-lab),
# scripts/install-spire.sh (Go >= 1.26.6 and gcc the first time) and ensures
# PostgreSQL as scripts/test.sh does
# (scripts/lib/postgres.sh: root or passwordless sudo, unless
# SPIRE_HEALER_TEST_PG_URL names a server whose role has CREATEDB).
# LAB_SERVERS and LAB_AGENTS change the number of servers and agents.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

say() { printf '\n==> %s\n' "$*"; }
die() { printf '\nerror: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
}

cmd="${1:-}"
dir="${2:-$root/.lab}"
[[ -n "$cmd" ]] || usage

target_dir="${CARGO_TARGET_DIR:-target}"
[[ "$target_dir" = /* ]] || target_dir="$root/$target_dir"
bin="$target_dir/release/spire-lab"

# The pid in DIR/lab.pid if it is a live `spire-lab up`.
lab_pid() {
  local pid
  pid="$(cat "$dir/lab.pid" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q 'spire-lab up ' || return 1
  echo "$pid"
}

# The owner_pid recorded in DIR/lab.json (empty when none).
manifest_owner() {
  sed -n 's/^  "owner_pid": \([0-9]*\),$/\1/p' "$dir/lab.json" 2>/dev/null | head -n 1
}

manifest_state() {
  sed -n 's/^  "state": "\([a-z]*\)",$/\1/p' "$dir/lab.json" 2>/dev/null | head -n 1
}

start() {
  if pid="$(lab_pid)"; then
    die "a lab is already running in $dir (pid $pid); run: scripts/lab.sh stop $dir"
  fi
  command -v cargo >/dev/null || die "cargo is not installed"

  say "cargo build --release -p spire-healer -p spire-lab --bins"
  cargo build --release -p spire-healer -p spire-lab --bins || die "cargo build failed"
  [[ -x "$bin" ]] || die "$bin is missing after the build"

  say "installing SPIRE (scripts/install-spire.sh)"
  "$root/scripts/install-spire.sh" || die "scripts/install-spire.sh failed"

  # shellcheck source=scripts/lib/postgres.sh
  source "$root/scripts/lib/postgres.sh"
  ensure_postgres

  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  say "starting the lab in $dir"
  local args=(up --dir "$dir" --servers "${LAB_SERVERS:-2}" --agents "${LAB_AGENTS:-2}"
              --postgres-url "$PG_URL" --bin-dir "$root/.spire/bin")
  if command -v setsid >/dev/null; then
    setsid "$bin" "${args[@]}" </dev/null >"$dir/lab.log" 2>&1 &
  else
    nohup "$bin" "${args[@]}" </dev/null >"$dir/lab.log" 2>&1 &
  fi
  local pid=$!
  echo "$pid" > "$dir/lab.pid"

  local i
  for i in $(seq 1 240); do
    if [[ "$(manifest_owner)" == "$pid" && "$(manifest_state)" == running ]]; then
      cat "$dir/lab.log"
      echo
      echo "Stop it with: scripts/lab.sh stop $dir"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      cat "$dir/lab.log" >&2
      rm -f "$dir/lab.pid"
      die "spire-lab up exited (output above, also in $dir/lab.log)"
    fi
    sleep 0.5
  done
  tail -n 40 "$dir/lab.log" >&2
  die "the lab did not come up within 120 s; see $dir/lab.log (stop it with: scripts/lab.sh stop $dir)"
}

stop() {
  [[ -d "$dir" ]] || die "no lab directory $dir"
  if [[ -f "$dir/lab.json" ]]; then
    if [[ -x "$bin" ]]; then
      "$bin" down --dir "$dir" || echo "warning: spire-lab down failed" >&2
    else
      echo "warning: $bin is missing; only ending the spire-lab up process" >&2
    fi
  fi
  local pid
  if pid="$(lab_pid)"; then
    echo "Ending spire-lab up (pid $pid)."
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "warning: pid $pid ignored SIGTERM for 30 s; sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$dir/lab.pid"
  echo "Stopped."
}

status() {
  [[ -f "$dir/lab.json" ]] || die "no lab in $dir (no lab.json)"
  if pid="$(lab_pid)"; then
    echo "spire-lab up: running (pid $pid), output in $dir/lab.log"
  else
    echo "spire-lab up: not running"
  fi
  if [[ -x "$bin" ]]; then
    # Exits 3 when the lab or one of its processes is not running.
    "$bin" status --dir "$dir"
  else
    echo "($bin is missing; showing lab.json)"
    cat "$dir/lab.json"
  fi
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  -h|--help|help) usage ;;
  *) usage ;;
esac
