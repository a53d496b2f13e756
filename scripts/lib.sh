# Shared by scripts/test and scripts/demo: install what a fresh machine lacks, and make sure a
# Postgres answers (starting a throwaway cluster when none does). Source it; do not run it.

log() { printf '==> %s\n' "$*" >&2; }

# Installs Debian packages when run as root; otherwise names them and stops.
need_packages() {
  local missing=()
  for spec in "$@"; do
    local cmd=${spec%%:*} pkg=${spec#*:}
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing: ${missing[*]}; install them (e.g. sudo apt-get install ${missing[*]}) and run again" >&2
    exit 1
  fi
}

# System build tools: a C compiler for -sys crates and cmake (pingora's zlib-ng needs it).
ensure_build_tools() {
  need_packages cc:build-essential cmake:cmake
  command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
}

# What the tests run beside Postern: pgbouncer (the test that runs Postern behind it).
ensure_test_tools() {
  # pgbouncer for its tests; Debian's chromium and chromium-driver for the dashboard's browser tests.
  PATH="$PATH:/usr/sbin" need_packages pgbouncer:pgbouncer chromium:chromium chromedriver:chromium-driver
}

# Whether a Postgres answers at $DATABASE_URL.
pg_answers() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -d "$DATABASE_URL" -t 3
  else
    local hostport=${DATABASE_URL#*@}; hostport=${hostport%%/*}
    local host=${hostport%%:*} port=${hostport##*:}
    [ "$port" = "$hostport" ] && port=5432
    timeout 3 bash -c "</dev/tcp/$host/$port" 2>/dev/null
  fi
}

pg_bindir() {
  local dir
  if command -v pg_config >/dev/null 2>&1; then
    dir=$(pg_config --bindir 2>/dev/null)
    [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && { echo "$dir"; return 0; }
  fi
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  return 1
}

# Sets DATABASE_URL (default: postgres://postgres@127.0.0.1:5432/postgres). When nothing answers
# there, starts a throwaway cluster on a free loopback port and registers its teardown.
ensure_postgres() {
  export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
  if pg_answers; then
    log "using Postgres at ${DATABASE_URL%%\?*}"
    return 0
  fi
  log "nothing answers at $DATABASE_URL; starting a throwaway cluster"
  local bindir
  if ! bindir=$(pg_bindir); then
    need_packages pg_ctlcluster:postgresql
    bindir=$(pg_bindir) || { echo "PostgreSQL server binaries not found" >&2; exit 1; }
  fi
  PG_TMP=$(mktemp -d /tmp/postern-pg.XXXXXX)
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 55432)
  local as=()
  if [ "$(id -u)" = 0 ]; then
    # initdb refuses to run as root: run the cluster as the postgres user in a folder it owns.
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$PG_TMP" postgres
    chown postgres "$PG_TMP"
    as=(runuser -u postgres --)
  fi
  "${as[@]}" "$bindir/initdb" -D "$PG_TMP/data" -U postgres --auth=trust -E UTF8 >/dev/null
  "${as[@]}" "$bindir/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/log" -w -o \
    "-p $port -k $PG_TMP -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" start >/dev/null
  PG_STOP=("${as[@]}" "$bindir/pg_ctl" -D "$PG_TMP/data" -m immediate stop)
  trap 'log "stopping the throwaway cluster"; "${PG_STOP[@]}" >/dev/null 2>&1 || true; rm -rf "$PG_TMP"' EXIT
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  log "throwaway cluster at $DATABASE_URL"
}
