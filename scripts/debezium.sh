# Debezium's PostgreSQL connector with its outbox event router, in Kafka Connect standalone: the
# relay's peer in the relay_peer benchmark (tests/benches/relay_peer.rs runs these functions with
# `bash -c`). Source after scripts/lib.sh. Its jars come from Maven Central through
# deploy/debezium/pom.xml (resolved once, then from ~/.m2), like the broker's.
#
#   start_debezium DATABASE TOPIC_PREFIX BOOTSTRAP SLOT   start, return once the connector runs
#   stop_debezium [SLOT]                                   stop (the last started if no SLOT)
#   drop_debezium_slot SLOT DATABASE                       drop the slot (it retains WAL until then)

DEBEZIUM_DEPLOY="$ROOT/deploy/debezium"
# Small: the connector holds at most max.queue.size (8192) events of about a kilobyte, and the
# worker runs one task. Overridable for an experiment.
DEBEZIUM_HEAP_OPTS=${DEBEZIUM_HEAP_OPTS:--Xms128m -Xmx512m}

# PostgreSQL's rule for slot names (lower case letters, digits, underscores, at most 63); the
# name is also part of paths and of the connector's name, which the rule keeps safe.
debezium_check_slot() {
  [[ $1 =~ ^[a-z0-9_]{1,63}$ ]] || die "'$1' is not a valid replication slot name ([a-z0-9_], at most 63)"
}

# start_debezium DATABASE TOPIC_PREFIX BOOTSTRAP SLOT: a Connect worker with the outbox connector
# capturing DATABASE's events table through replication slot SLOT (created if missing, kept when
# the worker stops), publishing to TOPIC_PREFIXdebezium.<aggregate_type> on BOOTSTRAP. Configs
# and offsets in .run/debezium-SLOT/ (a restart with the same SLOT resumes where the last run
# stopped), logs in .run/logs/debezium-SLOT.{log,out}. Returns once the REST API reports the
# connector and its task RUNNING.
start_debezium() {
  local database=$1 prefix=$2 bootstrap=$3 slot=$4
  debezium_check_slot "$slot"
  command -v curl >/dev/null 2>&1 || die "curl is missing (the Connect REST API is polled with it)"
  local dir="$RUN_DIR/debezium-$slot" name="outbox-$slot"
  local pidfile="$dir/connect.pid" log_file="$RUN_DIR/logs/debezium-$slot.log"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    die "Debezium for slot $slot already runs (pid $(cat "$pidfile")); stop_debezium $slot first"
  fi
  local classpath port
  classpath=$(maven_classpath "$DEBEZIUM_DEPLOY/pom.xml")
  # The first free port from 38083 (Connect's usual 8083, out of the way of the broker ports the
  # scripts use), unless DEBEZIUM_REST_PORT names one.
  port=${DEBEZIUM_REST_PORT:-}
  if [ -z "$port" ]; then
    for port in $(seq 38083 38182); do port_open "$port" || break; done
  fi
  port_open "$port" && die "port $port for the Connect REST API is taken"

  mkdir -p "$dir"
  sed -e "s|@BOOTSTRAP@|$bootstrap|g; s|@OFFSETS_FILE@|$dir/offsets.dat|g; s|@REST_PORT@|$port|g" \
    "$DEBEZIUM_DEPLOY/connect-standalone.properties" >"$dir/connect-standalone.properties"
  sed -e "s|@NAME@|$name|g; s|@PG_HOST@|$PG_HOST|g; s|@PG_PORT@|$PG_PORT|g; s|@DATABASE@|$database|g" \
    -e "s|@TOPIC_PREFIX@|$prefix|g; s|@SLOT@|$slot|g" \
    "$DEBEZIUM_DEPLOY/outbox-connector.properties" >"$dir/outbox-connector.properties"
  sed -e "s|@LOG_FILE@|$log_file|g" "$DEBEZIUM_DEPLOY/log4j2.properties" >"$dir/log4j2.properties"
  echo "$port" >"$dir/rest.port"
  echo "$slot" >"$RUN_DIR/debezium.last"

  log "starting Debezium (Kafka Connect standalone) on slot $slot, REST API on 127.0.0.1:$port"
  # Its own session, like the broker: it outlives the shell that started it (the benchmark's
  # `bash -c`) and is stopped through its pidfile.
  # shellcheck disable=SC2086
  setsid java -server $DEBEZIUM_HEAP_OPTS -XX:+UseSerialGC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" \
    -cp "$classpath" org.apache.kafka.connect.cli.ConnectStandalone \
    "$dir/connect-standalone.properties" "$dir/outbox-connector.properties" \
    >"$RUN_DIR/logs/debezium-$slot.out" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$pidfile"

  # Connect's JVM starts, scans its classpath for plugins, then starts the connector: allow two
  # minutes on a busy 2-core machine.
  local url="http://127.0.0.1:$port/connectors/$name/status" status states
  for _ in $(seq 600); do
    kill -0 "$pid" 2>/dev/null || die "Debezium exited (see $log_file and $RUN_DIR/logs/debezium-$slot.out)"
    if status=$(curl -fsS --max-time 2 "$url" 2>/dev/null); then
      # The connector's state and its task's, e.g. "RUNNING RUNNING"; no task yet reads "RUNNING".
      states=$(jq -r '[.connector.state] + [.tasks[].state] | join(" ")' <<<"$status" 2>/dev/null || true)
      case "$states" in
        *FAILED*)
          stop_debezium "$slot"
          die "the Debezium connector failed: $(jq -r '[.connector.trace, .tasks[].trace] | map(select(.)) | first' <<<"$status" | head -n 5) (see $log_file)"
          ;;
        "RUNNING RUNNING") return 0 ;;
      esac
    fi
    sleep 0.2
  done
  stop_debezium "$slot"
  die "the Debezium connector did not reach RUNNING in 2 minutes (see $log_file)"
}

# stop_debezium [SLOT]: stops the worker of SLOT (by default the last one started) and waits for
# it to exit. A TERM lets the worker stop its task and flush the offsets: killed at once it would
# resume from its previous flush and publish again what it sent since.
stop_debezium() {
  local slot=${1:-$(cat "$RUN_DIR/debezium.last" 2>/dev/null || true)}
  [ -n "$slot" ] || return 0
  debezium_check_slot "$slot"
  local pidfile="$RUN_DIR/debezium-$slot/connect.pid"
  [ -f "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    # Longer than stop_pidfile's 5 s: the task has task.shutdown.graceful.timeout.ms (5 s) to
    # stop, then the offsets are flushed and the REST server stops.
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "Debezium (pid $pid) did not stop in 30 s: killing it; its offsets may be stale"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pidfile"
}

# drop_debezium_slot SLOT DATABASE: drops the replication slot once its walsender has gone (it
# lingers briefly after the worker stops), and the worker's configs and offsets with it. A slot
# nobody reads retains WAL forever.
drop_debezium_slot() {
  local slot=$1 database=$2
  debezium_check_slot "$slot"
  local url="postgres://postgres@$PG_HOST:$PG_PORT/$database" active
  for _ in $(seq 50); do
    active=$(psql -X -q -tA "$url" -c "SELECT active FROM pg_replication_slots WHERE slot_name = '$slot'") \
      || die "cannot reach database $database to drop replication slot $slot"
    # No slot, or one nobody streams from any more (a drop can still lose a race with a
    # reconnecting walsender: then try again).
    if [ -z "$active" ] || { [ "$active" = f ] &&
      psql -X -q -v ON_ERROR_STOP=1 "$url" -c "SELECT pg_drop_replication_slot('$slot')" >/dev/null; }; then
      # The offsets point into the dropped slot's WAL: a new slot of the same name starts clean.
      rm -rf "$RUN_DIR/debezium-$slot"
      return 0
    fi
    sleep 0.2
  done
  die "replication slot $slot is still in use; drop it with SELECT pg_drop_replication_slot('$slot')"
}
