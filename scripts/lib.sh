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

log() { printf '\033[1;34m[backbone]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[backbone]\033[0m %s\n' "$*" >&2; exit 1; }
# die_showing LOG MESSAGE: dies with MESSAGE and the end of LOG, so that a CI run's output shows
# the cause and not only where it was written.
die_showing() {
  local log_file=$1; shift
  [ -f "$log_file" ] && { printf -- '--- the last lines of %s:\n' "$log_file"; tail -n 25 "$log_file"; printf -- '---\n'; } >&2
  die "$* (see $log_file)"
}

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

# PostgreSQL: install it from Debian's packages on a fresh machine, configure it for development
# (trust on 127.0.0.1, logical decoding) and start it.
ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    log "installing PostgreSQL from Debian's packages"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  local version conf
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  conf="/etc/postgresql/$version/main"
  # Debian gives a new cluster the first free port from 5432 on: use the one it has.
  PG_PORT=$(pg_lsclusters -h 2>/dev/null | awk -v v="$version" '$1 == v && $2 == "main" { print $3; exit }')
  PG_PORT=${PG_PORT:-5432}
  PG_ADMIN_URL="postgres://postgres@$PG_HOST:$PG_PORT/postgres"
  # Development and test machines only: trust connections from this machine (replication too,
  # for Debezium in the benchmarks). Production databases are configured by their operators.
  as_root sed -i -E 's/^(host\s+(all|replication)\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/; s/^(local\s+(all|replication)\s+\S+\s+)peer/\1trust/' "$conf/pg_hba.conf"
  # Logical decoding, which Debezium's PostgreSQL connector (the relay's peer in the benchmarks)
  # reads the outbox through.
  as_root mkdir -p "$conf/conf.d"
  printf '# Written by the order backbone'"'"'s scripts/lib.sh.\nwal_level = logical\n' | as_root tee "$conf/conf.d/backbone.conf" >/dev/null
  if pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; then
    if [ "$(psql_admin -tAc 'SHOW wal_level' 2>/dev/null)" = logical ]; then
      as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
      return 0
    fi
    log "restarting PostgreSQL (wal_level=logical takes a restart, once)"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main restart
  else
    log "starting PostgreSQL"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  for _ in $(seq 100); do pg_isready -q -h "$PG_HOST" -p "$PG_PORT" && return 0; sleep 0.2; done
  die "PostgreSQL did not start (see /var/log/postgresql/)"
}

# restart_postgres MODE: restarts the cluster ensure_postgres runs, shut down in MODE (fast: the
# sessions are rolled back and a checkpoint is written; immediate: no checkpoint, the start-up
# runs crash recovery, as after a power cut); returns once it accepts connections again. The
# chaos run's fault (benches/chaos.rs); every client of the cluster loses its connections.
# BENCH_PG_CLUSTER names another cluster of the same version (one the bench's
# BENCH_DATABASE_ADMIN_URL points at, which nobody else uses); `main` by default.
restart_postgres() {
  local mode=$1 version port cluster=${BENCH_PG_CLUSTER:-main}
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  port=$(pg_lsclusters -h 2>/dev/null | awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c { print $3; exit }')
  port=${port:-5432}
  # pg_ctl waits 60 s for the start; crash recovery first fsyncs the whole data directory,
  # which on a cluster holding many test databases takes longer: wait for it here instead.
  as_root pg_ctlcluster --skip-systemctl-redirect -m "$mode" "$version" "$cluster" restart \
    || log "PostgreSQL is not up 60 s after a restart -m $mode; waiting for it"
  for _ in $(seq 3000); do pg_isready -q -h "$PG_HOST" -p "$port" && return 0; sleep 0.2; done
  die "PostgreSQL did not come back within 10 minutes of a restart -m $mode (see /var/log/postgresql/)"
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

# prune_superseded_binaries MARKER: removes the executables (test binaries, mostly) in the
# cargo target directory's deps/ that a build since MARKER (a file) replaced by a newer one of
# the same name. Each change of a crate leaves its old test binaries behind; without this a
# cached target directory grows by gigabytes a day until the disk is full.
prune_superseded_binaries() {
  local marker=$1 dir=${CARGO_TARGET_DIR:-$ROOT/target}
  local deps name
  for deps in "$dir"/debug/deps "$dir"/release/deps; do
    [ -d "$deps" ] || continue
    for name in $(find "$deps" -maxdepth 1 -type f -executable -newer "$marker" -printf '%f\n' \
      | sed -E 's/-[0-9a-f]{16}$//' | sort -u); do
      find "$deps" -maxdepth 1 -type f -executable -regextype posix-extended \
        -regex ".*/${name}-[0-9a-f]{16}" ! -newer "$marker" -delete
    done
  done
}

# Apache Kafka, the broker of development, tests and benchmarks: its jars come from Maven Central
# through deploy/kafka/pom.xml (resolved once, then from ~/.m2), started as one KRaft node.
KAFKA_DEPLOY="$ROOT/deploy/kafka"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/order-backbone"
KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}

# require_java_tools: Java 17+ and Maven, which the machines come with.
require_java_tools() {
  command -v java >/dev/null 2>&1 || die "java (17 or newer) is missing: install a JDK, e.g. apt-get install openjdk-17-jre-headless"
  command -v mvn >/dev/null 2>&1 || die "mvn is missing: install Maven, e.g. apt-get install maven"
}

# maven_classpath POM: the runtime classpath of POM's dependencies, resolved once per POM content.
maven_classpath() {
  local pom=$1 hash file
  hash=$(sha256sum "$pom" | cut -c1-16)
  file="$CACHE_DIR/classpath-$(basename "$(dirname "$pom")")-$hash"
  # The list outlives the jars it names when ~/.m2 is cleared and this cache kept (a CI cache
  # restored in part): resolve again unless every jar is still there.
  if [ ! -s "$file" ] || ! classpath_complete "$file"; then
    require_java_tools
    log "resolving $(basename "$(dirname "$pom")") from Maven Central (once)"
    mkdir -p "$CACHE_DIR"
    mvn -q -B -f "$pom" dependency:build-classpath -Dmdep.outputFile="$file.tmp" >"$RUN_DIR/logs/maven.log" 2>&1 \
      || die_showing "$RUN_DIR/logs/maven.log" "Maven could not resolve $pom"
    mv "$file.tmp" "$file"
  fi
  cat "$file"
}

# classpath_complete FILE: whether every entry of the classpath in FILE exists.
classpath_complete() {
  local entry entries
  IFS=: read -r -a entries <"$1"
  for entry in "${entries[@]}"; do [ -e "$entry" ] || return 1; done
}

ensure_kafka() {
  require_java_tools
  KAFKA_CLASSPATH=$(maven_classpath "$KAFKA_DEPLOY/pom.xml")
}

# kafka_java CLASS ARGS...: runs one of Kafka's classes (tools, the broker) on its classpath.
kafka_java() {
  local class=$1; shift
  java -Xms64m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto \
    -Dlog4j2.configurationFile="$RUN_DIR/kafka-tools-log4j2.properties" \
    -cp "$KAFKA_CLASSPATH" "$class" "$@"
}

# ensure_build_deps: what compiling the workspace needs beyond Rust and a C toolchain: OpenSSL's
# headers and pkg-config, for librdkafka's TLS (SASL_SSL to a managed Kafka cluster).
ensure_build_deps() {
  if dpkg -s libssl-dev pkg-config openssl >/dev/null 2>&1; then return 0; fi
  log "installing libssl-dev, pkg-config and openssl from Debian's packages (librdkafka's TLS)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev pkg-config openssl >/dev/null
}

# make_tls_material DIR: a certificate authority and a broker certificate for 127.0.0.1 (PEM),
# made once in DIR: ca.pem for clients, broker.pem (its PKCS#8 key, then its certificate) for
# the broker's TLS listener.
make_tls_material() {
  local dir=$1
  [ -s "$dir/broker.pem" ] && [ -s "$dir/ca.pem" ] && return 0
  mkdir -p "$dir"
  (
    cd "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=order backbone test CA" \
      -keyout ca.key -out ca.pem
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout broker.key -out broker.csr
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >broker.ext
    openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile broker.ext -out broker.crt
    openssl pkcs8 -topk8 -nocrypt -in broker.key -out broker.p8
    cat broker.p8 broker.crt >broker.pem
  ) >"$RUN_DIR/logs/tls-material.log" 2>&1 || die_showing "$RUN_DIR/logs/tls-material.log" "making the test TLS material failed"
}

# start_kafka PORT DATA_DIR: one Kafka node on 127.0.0.1:PORT (its controller on PORT+100),
# storing in DATA_DIR (formatted when new). Logs in .run/logs/kafka-PORT.log, pid in
# .run/kafka-PORT.pid; returns once the broker answers a metadata request.
#
# With KAFKA_SASL_SSL_DIR set (the TLS material of make_tls_material) and KAFKA_SASL_SSL_PASSWORD,
# the broker also listens on 127.0.0.1:PORT+200 for SASL_SSL clients (PLAIN, user `backbone`),
# as a managed cluster does (Confluent Cloud, MSK with SASL/SCRAM or PLAIN over TLS).
start_kafka() {
  local port=$1 data=$2
  local controller=$((port + 100)) conf="$RUN_DIR/kafka-$port"
  if port_open "$port"; then log "a broker already listens on 127.0.0.1:$port"; return 0; fi
  port_open "$controller" && die "port $controller (the controller of a broker on $port) is taken; stop that process and run again"
  mkdir -p "$conf" "$data"
  sed -e "s|@PORT@|$port|g; s|@CONTROLLER_PORT@|$controller|g; s|@DATA_DIR@|$data|g" \
    "$KAFKA_DEPLOY/server.properties" >"$conf/server.properties"
  if [ -n "${KAFKA_SASL_SSL_DIR:-}" ]; then
    local tls_port=$((port + 200))
    port_open "$tls_port" && die "port $tls_port (the SASL_SSL listener of a broker on $port) is taken"
    sed -i -e "s|^listeners=.*|listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller,SASL_SSL://127.0.0.1:$tls_port|" \
      -e "s|^advertised.listeners=.*|advertised.listeners=PLAINTEXT://127.0.0.1:$port,SASL_SSL://127.0.0.1:$tls_port|" \
      -e "s|^listener.security.protocol.map=.*|listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL|" \
      "$conf/server.properties"
    cat >>"$conf/server.properties" <<PROPS
sasl.enabled.mechanisms=PLAIN
listener.name.sasl_ssl.sasl.enabled.mechanisms=PLAIN
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_backbone="$KAFKA_SASL_SSL_PASSWORD";
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$KAFKA_SASL_SSL_DIR/broker.pem
PROPS
  fi
  sed -e "s|@LOG_FILE@|$RUN_DIR/logs/kafka-$port.log|g" "$KAFKA_DEPLOY/log4j2.properties" >"$conf/log4j2.properties"
  sed -e "s|@LOG_FILE@|$RUN_DIR/logs/kafka-tools.log|g" "$KAFKA_DEPLOY/log4j2.properties" >"$RUN_DIR/kafka-tools-log4j2.properties"
  if [ ! -f "$data/meta.properties" ]; then
    local cluster_id
    # Kafka's own ids never start with '-' (its tools would read one as an option: "expected one
    # argument", one format in 64); drawn again until it does not, as Kafka's Uuid.randomUuid does.
    cluster_id=-
    while [ "${cluster_id#-}" != "$cluster_id" ]; do
      cluster_id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    done
    log "formatting the broker's storage in $data"
    kafka_java kafka.tools.StorageTool format --cluster-id "$cluster_id" \
      --config "$conf/server.properties" --ignore-formatted >"$RUN_DIR/logs/kafka-$port-format.log" 2>&1 \
      || die_showing "$RUN_DIR/logs/kafka-$port-format.log" "formatting the broker's storage failed"
  fi
  log "starting Apache Kafka on 127.0.0.1:$port"
  # Its own session: a Ctrl-C for the components must not stop the broker before they leave it.
  # shellcheck disable=SC2086
  setsid java -server $KAFKA_HEAP_OPTS -XX:+UseSerialGC -XX:MaxMetaspaceSize=192m \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$conf/log4j2.properties" \
    -cp "$KAFKA_CLASSPATH" kafka.Kafka "$conf/server.properties" \
    >"$RUN_DIR/logs/kafka-$port.out" 2>&1 &
  echo $! >"$RUN_DIR/kafka-$port.pid"
  wait_for_port "$port" "the broker" 300
  # Ready when it answers a metadata request (the listener opens before the node is a broker).
  for _ in $(seq 30); do
    if kafka_java org.apache.kafka.tools.ClusterTool cluster-id --bootstrap-server "127.0.0.1:$port" \
      >"$RUN_DIR/logs/kafka-$port-ready.log" 2>&1; then
      return 0
    fi
    kill -0 "$(cat "$RUN_DIR/kafka-$port.pid")" 2>/dev/null || die_showing "$RUN_DIR/logs/kafka-$port.out" "the broker exited; its log: $RUN_DIR/logs/kafka-$port.log"
    sleep 1
  done
  die "the broker on 127.0.0.1:$port did not answer a metadata request (see $RUN_DIR/logs/kafka-$port.log)"
}

stop_kafka() { stop_pidfile "$RUN_DIR/kafka-$1.pid"; }

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
# ensure_jaeger: the Jaeger binary (v2, on the OpenTelemetry Collector) that receives the
# backbone's traces in development and in the tracing test, built from the Go module proxy at the
# version deploy/jaeger/go.mod pins (once; rebuilt when the pin changes). Sets JAEGER_BIN.
ensure_jaeger() {
  local dir="$ROOT/deploy/jaeger" hash
  command -v go >/dev/null 2>&1 || die "go is missing: install Go 1.24 or newer (the Jaeger build needs it)"
  hash=$(cat "$dir/go.mod" "$dir/go.sum" | sha256sum | cut -c1-16)
  JAEGER_BIN="$CACHE_DIR/bin/jaeger-$hash"
  if [ ! -x "$JAEGER_BIN" ]; then
    log "building Jaeger from the Go module proxy (once; a few minutes)"
    mkdir -p "$CACHE_DIR/bin"
    (cd "$dir" && go build -o "$JAEGER_BIN.tmp" github.com/jaegertracing/jaeger/cmd/jaeger) \
      >"$RUN_DIR/logs/jaeger-build.log" 2>&1 || die_showing "$RUN_DIR/logs/jaeger-build.log" "the Jaeger build failed"
    mv "$JAEGER_BIN.tmp" "$JAEGER_BIN"
  fi
  export JAEGER_BIN
}

ensure_python_venv() {
  local req="$ROOT/schemas/registry/tests/python/requirements.txt"
  local stamp="$ROOT/.venv/.requirements.sha256"
  local want
  want=$(sha256sum "$req" | cut -d' ' -f1)
  if [ -x "$ROOT/.venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then return 0; fi
  log "installing the Python test tools (confluent-kafka, pytest, schemathesis, openapi-spec-validator) into .venv"
  python3 -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/pip" install -q --disable-pip-version-check -r "$req"
  echo "$want" >"$stamp"
}

# The deployment checks' tools (tests/tests/deployment.rs): checkov and kubernetes-validate
# from PyPI (deploy/tools/requirements.txt, in a virtualenv of their own keyed by that file's
# hash) and kustomize from the Go module proxy, built once. Both live under $CACHE_DIR, so a
# fresh clone (CI) finds them. Sets DEPLOY_TOOLS_BIN (the virtualenv's bin) and KUSTOMIZE.
KUSTOMIZE_VERSION=v5.8.2
ensure_deploy_tools() {
  local req="$ROOT/deploy/tools/requirements.txt" venv
  venv="$CACHE_DIR/deploy-venv-$(sha256sum "$req" | cut -c1-16)"
  if [ ! -f "$venv/.installed" ]; then
    log "installing checkov and kubernetes-validate into $venv (once, about a minute)"
    rm -rf "$venv"
    mkdir -p "$CACHE_DIR"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" >"$RUN_DIR/logs/deploy-tools.log" 2>&1 \
      || die_showing "$RUN_DIR/logs/deploy-tools.log" "installing $req failed"
    touch "$venv/.installed"
  fi
  DEPLOY_TOOLS_BIN="$venv/bin"
  local dir="$CACHE_DIR/kustomize-$KUSTOMIZE_VERSION"
  if [ ! -x "$dir/kustomize" ]; then
    command -v go >/dev/null 2>&1 || die "go is missing: kustomize is built from the Go module proxy"
    log "building kustomize $KUSTOMIZE_VERSION from the Go module proxy (once, about a minute)"
    mkdir -p "$dir"
    GOBIN="$dir" GOFLAGS=-buildvcs=false go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" \
      >"$RUN_DIR/logs/kustomize-build.log" 2>&1 \
      || die_showing "$RUN_DIR/logs/kustomize-build.log" "building kustomize failed"
  fi
  KUSTOMIZE="$dir/kustomize"
  export DEPLOY_TOOLS_BIN KUSTOMIZE
}

# The operations console (api/console, served by the API at /console/): its npm packages,
# installed exactly as package-lock.json pins them (`npm ci`, through an npm cache outside the
# clone, so a CI run downloads nothing it already has), and its build into api/console/dist.
# Each is redone only when its inputs changed (stamps, like ensure_python_venv).
CONSOLE_DIR="$ROOT/api/console"
ensure_console() {
  command -v npm >/dev/null 2>&1 || die "npm (Node.js 20 or later) is needed to build the console"
  local cache="${NPM_CONFIG_CACHE:-$HOME/.cache/order-backbone/npm}"
  local want stamp="$CONSOLE_DIR/node_modules/.backbone-lock.sha256"
  want=$(sha256sum "$CONSOLE_DIR/package-lock.json" | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing the console's npm packages (npm ci)"
    # No install scripts: esbuild's only checks its platform package, which npm installs.
    (cd "$CONSOLE_DIR" && npm ci --ignore-scripts --no-audit --no-fund --prefer-offline \
      --cache "$cache" --loglevel=error)
    echo "$want" >"$stamp"
  fi
  stamp="$CONSOLE_DIR/node_modules/.backbone-build.sha256"
  want=$(cd "$CONSOLE_DIR" && find src index.html build.mjs tsconfig.json package-lock.json -type f -print0 \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
  if [ ! -f "$CONSOLE_DIR/dist/index.html" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "building the console (type check, then esbuild into api/console/dist)"
    (cd "$CONSOLE_DIR" && npm run --silent build)
    echo "$want" >"$stamp"
  fi
}

# Debian's Chromium, which the console's browser test drives through playwright-core (a test
# tool's own browser download cannot be had here, and is never tried).
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  log "installing Chromium from Debian's packages (the console's browser test)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
}
