# Shared set-up of the backbone's scripts: installs and starts what is missing.
# Sourced by scripts/run-backbone and scripts/test; every listener is on 127.0.0.1.

set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$ROOT/.run"
mkdir -p "$RUN_DIR/logs"

PG_HOST=127.0.0.1
PG_PORT=5432
PG_ADMIN_URL="postgres://postgres@$PG_HOST:$PG_PORT/postgres"
NISSHI_VERSION=0.8.1

log() { printf '\033[1;34m[backbone]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[backbone]\033[0m %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
  local port=$1 what=$2 tries=${3:-150}
  for _ in $(seq "$tries"); do
    port_open "$port" && return 0
    sleep 0.2
  done
  die "$what did not open port $port (see $RUN_DIR/logs)"
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# PostgreSQL: start the local cluster, or install it from Debian's packages on a fresh machine.
ensure_postgres() {
  if pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; then return 0; fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    log "installing PostgreSQL from Debian's packages"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    local hba
    hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -n1)
    # Development and test machines only: trust local connections, as CI's machines do.
    as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/; s/^(local\s+all\s+\S+\s+)peer/\1trust/' "$hba"
  fi
  log "starting PostgreSQL"
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 50); do pg_isready -q -h "$PG_HOST" -p "$PG_PORT" && return 0; sleep 0.2; done
  die "PostgreSQL did not start"
}

psql_admin() { psql -v ON_ERROR_STOP=1 -q -X "$PG_ADMIN_URL" "$@"; }

ensure_database() {
  local db=$1
  if [ -z "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
    psql_admin -c "CREATE DATABASE $db"
  fi
}

recreate_database() {
  local db=$1
  psql_admin -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
  psql_admin -c "CREATE DATABASE $db"
}

# Nisshi, the Kafka-compatible broker of development and tests (installed once, cached in ~/.cargo/bin).
ensure_nisshi() {
  if command -v nisshi >/dev/null 2>&1 && nisshi --version 2>/dev/null | grep -q "$NISSHI_VERSION"; then
    return 0
  fi
  log "installing the Nisshi broker $NISSHI_VERSION (once; about 15 minutes on 2 cores)"
  cargo install nisshi --version "$NISSHI_VERSION" --locked --ignore-rust-version \
    --no-default-features --features postgres,dynostore
}

# start_broker PORT DATABASE: a broker on 127.0.0.1:PORT storing in its own database.
start_broker() {
  local port=$1 db=$2
  if port_open "$port"; then log "broker already listening on 127.0.0.1:$port"; return 0; fi
  ensure_database "$db"
  log "starting the broker on 127.0.0.1:$port"
  # Its own session: a Ctrl-C for the components must not stop the broker before they leave it.
  setsid nisshi broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "postgres://postgres@$PG_HOST:$PG_PORT/$db?sslmode=disable" \
    --group-initial-rebalance-delay 0s \
    >"$RUN_DIR/logs/broker-$port.log" 2>&1 &
  echo $! >"$RUN_DIR/broker-$port.pid"
  wait_for_port "$port" "the broker"
}

stop_pidfile() {
  local file=$1
  [ -f "$file" ] || return 0
  local pid
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

# The Python clients the registry is tested with (confluent-kafka from PyPI), in .venv.
ensure_python_venv() {
  local req="$ROOT/schemas/tests/python/requirements.txt"
  local stamp="$ROOT/.venv/.requirements.sha256"
  local want
  want=$(sha256sum "$req" | cut -d' ' -f1)
  if [ -x "$ROOT/.venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then return 0; fi
  log "installing the Python test clients (confluent-kafka, pytest) into .venv"
  python3 -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/pip" install -q --disable-pip-version-check -r "$req"
  echo "$want" >"$stamp"
}
