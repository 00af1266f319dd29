# shellcheck shell=bash
# PostgreSQL provisioning shared by scripts/test.sh and scripts/lab.sh.
# Source it, then call `ensure_postgres`: afterwards PG_URL holds a URL of a
# role with CREATEDB (postgres://spire_healer:spire_healer@127.0.0.1:5432/spire_healer).
#
# - PostgreSQL is installed with apt-get (Debian's `postgresql` package)
#   when missing; a cluster on 127.0.0.1:5432 is started (or created) and the
#   role and database `spire_healer` are set up. Root, or passwordless sudo,
#   is needed for that.
# - When SPIRE_HEALER_TEST_PG_URL is set, it is used as is and nothing is
#   provisioned.
#
# Expects `say` and `die` functions from the caller.

PG_PORT=5432
PG_ROLE=spire_healer
PG_PASSWORD=spire_healer
PG_DB=spire_healer

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo -n "$@"
  else
    die "root (or passwordless sudo) is needed to set up PostgreSQL; run as root, or set SPIRE_HEALER_TEST_PG_URL to an existing database"
  fi
}

# Runs a command as the postgres OS user (peer authentication on the socket).
as_postgres() {
  if [[ $EUID -eq 0 ]]; then
    (cd / && runuser -u postgres -- "$@")
  elif command -v sudo >/dev/null && sudo -n -u postgres true 2>/dev/null; then
    (cd / && sudo -n -u postgres "$@")
  else
    die "cannot run commands as the postgres user; run as root, or set SPIRE_HEALER_TEST_PG_URL to an existing database"
  fi
}

psql_admin() {
  as_postgres psql -X -q -p "$PG_PORT" -v ON_ERROR_STOP=1 "$@"
}

pg_installed() {
  command -v pg_ctlcluster >/dev/null && command -v pg_lsclusters >/dev/null \
    && compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

setup_postgres() {
  if ! pg_installed; then
    say "installing PostgreSQL (apt-get install postgresql)"
    command -v apt-get >/dev/null || die "PostgreSQL is not installed and apt-get is not available; install PostgreSQL or set SPIRE_HEALER_TEST_PG_URL"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q \
      || die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql \
      || die "apt-get install postgresql failed"
    pg_installed || die "PostgreSQL was installed but pg_ctlcluster or the postgres binary is still missing"
  fi

  local version
  version="$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/postgres' \
    | awk -F/ '{ print $5 }' | sort -V | tail -n 1)"
  [[ -n "$version" ]] || die "cannot find the installed PostgreSQL major version under /usr/lib/postgresql"

  # Use the cluster already configured for our port, whatever its version;
  # otherwise create one for the newest installed version.
  local cver="" cname="" status=""
  read -r cver cname status < <(pg_lsclusters -h | awk -v p="$PG_PORT" '$3 == p { print $1, $2, $4; exit }') || true
  if [[ -z "$cname" ]]; then
    cver="$version"
    cname=main
    if [[ -d "/etc/postgresql/$cver/$cname" ]]; then
      cname=spire_healer
    fi
    say "creating PostgreSQL $cver cluster '$cname' on port $PG_PORT"
    as_root pg_createcluster -p "$PG_PORT" "$cver" "$cname" >/dev/null \
      || die "pg_createcluster $cver $cname failed"
    status=down
  fi
  if [[ "$status" != online* ]]; then
    say "starting PostgreSQL cluster $cver/$cname"
    as_root pg_ctlcluster "$cver" "$cname" start \
      || die "pg_ctlcluster $cver $cname start failed (see /var/log/postgresql/postgresql-$cver-$cname.log)"
  fi

  local i
  for i in $(seq 1 30); do
    if pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then
      break
    fi
    [[ $i -lt 30 ]] || die "PostgreSQL $cver/$cname does not accept connections on 127.0.0.1:$PG_PORT after 30 s (is listen_addresses set?)"
    sleep 1
  done

  say "ensuring role and database '$PG_DB'"
  psql_admin -d postgres <<SQL || die "creating the role $PG_ROLE failed"
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_ROLE') THEN
    CREATE ROLE $PG_ROLE LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  ELSE
    ALTER ROLE $PG_ROLE LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  END IF;
END
\$\$;
SQL
  if [[ "$(psql_admin -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]]; then
    psql_admin -d postgres -c "CREATE DATABASE $PG_DB OWNER $PG_ROLE" \
      || die "creating the database $PG_DB failed"
  else
    psql_admin -d postgres -c "ALTER DATABASE $PG_DB OWNER TO $PG_ROLE" \
      || die "changing the owner of $PG_DB failed"
  fi
}

# Sets PG_URL: SPIRE_HEALER_TEST_PG_URL when given, else the local cluster
# (provisioned on the way); then checks the connection when psql is there.
ensure_postgres() {
  if [[ -n "${SPIRE_HEALER_TEST_PG_URL:-}" ]]; then
    say "using the PostgreSQL given by SPIRE_HEALER_TEST_PG_URL"
    PG_URL="$SPIRE_HEALER_TEST_PG_URL"
  else
    setup_postgres
    PG_URL="postgres://$PG_ROLE:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
  fi
  if command -v psql >/dev/null; then
    PGCONNECT_TIMEOUT=10 psql -X -q "$PG_URL" -tAc 'SELECT 1' >/dev/null \
      || die "cannot connect to PostgreSQL with psql (SPIRE_HEALER_TEST_PG_URL or the local cluster)"
  fi
}
