//! The chaos run's parts (`benches/chaos.rs`, and its short version `tests/chaos.rs`): a plan of
//! faults drawn from a seed, the controller that injects them into a running [`Backbone`]
//! (SIGKILL and restart of each process; outside the suite, SIGKILL of the broker and restarts
//! of PostgreSQL), and the checks made once the backbone has settled: nothing lost, nothing
//! doubled, every read model equal to its rebuild, the hash chain intact.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use crate::load::{Backbone, COMPONENTS};
use crate::{status_after, token, Role};

/// One fault the controller injects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL of a backbone process (one of [`COMPONENTS`]), then its restart.
    Kill(&'static str),
    /// SIGKILL of the Kafka broker, then its restart on the same data directory.
    Broker,
    /// A restart of PostgreSQL with this shutdown mode (`fast` or `immediate`).
    Postgres(&'static str),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kill(component) => write!(f, "kill {component}"),
            Self::Broker => f.write_str("kill kafka broker"),
            Self::Postgres(mode) => write!(f, "restart postgresql -m {mode}"),
        }
    }
}

/// A fault, when to inject it (from the start of the window) and how long what it kills stays
/// down before it is started again.
#[derive(Debug, Clone)]
pub struct Planned {
    pub after: Duration,
    pub fault: Fault,
    pub down: Duration,
}

/// The seed of a run: `CHAOS_SEED`, or a random one (printed, so a run can be repeated).
pub fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

/// The faults of a run of `window`: each of `required` once and `extra` more kills of backbone
/// processes, in an order and at moments drawn from `seed`. The window is cut into one slot per
/// fault so that every fault falls inside it and one restart is over before the next fault
/// (the controller waits for it anyway); a fault comes in the first half of its slot, leaving
/// the rest to see the backbone recover.
pub fn plan(seed: u64, window: Duration, required: &[Fault], extra: usize) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults: Vec<Fault> = required.to_vec();
    for _ in 0..extra {
        let component = COMPONENTS[rng.random_range(0..COMPONENTS.len())];
        faults.push(Fault::Kill(component));
    }
    faults.shuffle(&mut rng);
    let slot = window.as_secs_f64() / faults.len().max(1) as f64;
    faults
        .into_iter()
        .enumerate()
        .map(|(i, fault)| {
            let down = match fault {
                // A process an orchestrator restarts after a few seconds' back-off.
                Fault::Kill(_) => rng.random_range(0.5..5.0),
                // A broker node that takes a while to be replaced.
                Fault::Broker => rng.random_range(1.0..10.0),
                // `pg_ctlcluster restart`: stop, then start at once.
                Fault::Postgres(_) => 0.0,
            };
            Planned {
                after: Duration::from_secs_f64(slot * (i as f64 + rng.random_range(0.0..0.5))),
                fault,
                down: Duration::from_secs_f64(down),
            }
        })
        .collect()
}

/// The broker the bench runs against, which the controller may kill and start again: its
/// port and data directory (exported by `scripts/bench` as `BENCH_BROKER_PORT` and
/// `BENCH_BROKER_DATA`), started the way `scripts/bench` started it (`start_kafka` of
/// `scripts/lib.sh`, which leaves an existing data directory as it is).
#[derive(Debug, Clone)]
pub struct Broker {
    pub port: u16,
    pub data: PathBuf,
}

impl Broker {
    /// The bench broker, if `scripts/bench` said where it is.
    pub fn from_env() -> Option<Self> {
        Some(Self {
            port: std::env::var("BENCH_BROKER_PORT").ok()?.parse().ok()?,
            data: PathBuf::from(std::env::var("BENCH_BROKER_DATA").ok()?),
        })
    }

    /// SIGKILLs the broker (its pid from `start_kafka`'s pid file); returns once its port is
    /// closed.
    pub fn kill(&self) {
        lib_sh(
            r#"pid=$(cat "$RUN_DIR/kafka-$1.pid"); kill -KILL "$pid"
               for _ in $(seq 100); do port_open "$1" || exit 0; sleep 0.1; done
               die "the broker on $1 still listens after SIGKILL""#,
            &[&self.port.to_string()],
        );
    }

    /// Starts the broker again on the same data directory; returns once it answers a metadata
    /// request.
    pub fn start(&self) {
        lib_sh(
            r#"ensure_kafka; start_kafka "$1" "$2""#,
            &[&self.port.to_string(), &self.data.display().to_string()],
        );
    }
}

/// Runs `script` in bash with the project's `scripts/lib.sh` sourced (positional arguments
/// `args`); panics if it fails.
fn lib_sh(script: &str, args: &[&str]) {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lib.sh");
    let status = Command::new("bash")
        .arg("-c")
        .arg(format!("source \"$0\"; {script}"))
        .arg(lib)
        .args(args)
        .stdin(Stdio::null())
        .status()
        .expect("bash runs");
    assert!(status.success(), "`{script}` failed ({status})");
}

/// Restarts the machine's PostgreSQL cluster (`restart_postgres` of `scripts/lib.sh`) with
/// shutdown `mode`; returns once it accepts connections.
pub fn restart_postgres(mode: &str) {
    lib_sh(r#"restart_postgres "$1""#, &[mode]);
}

/// A fault as it was injected.
#[derive(Debug, Clone)]
pub struct Injected {
    pub fault: String,
    /// When it struck.
    pub at: Instant,
    /// Seconds into the window.
    pub offset: f64,
    /// How long until what it stopped was started again (and, for the broker and PostgreSQL,
    /// answered).
    pub back_after: Duration,
}

/// What the controller did over the window.
#[derive(Debug, Default)]
pub struct Chaos {
    pub injected: Vec<Injected>,
    /// Processes that exited without being killed (each restarted, as an orchestrator would):
    /// name, seconds into the window, exit status.
    pub exited_on_their_own: Vec<(String, f64, String)>,
}

/// Injects the `plan` into `backbone` over the window that started at `started` (the broker's
/// faults need `broker`), restarting any process that exits on its own meanwhile. Returns
/// once the last fault is over and the window has ended.
pub async fn inject(
    backbone: &mut Backbone,
    plan: &[Planned],
    broker: Option<&Broker>,
    started: Instant,
    window: Duration,
) -> Chaos {
    let mut chaos = Chaos::default();
    let mut faults = plan.iter();
    let mut next = faults.next();
    loop {
        for (name, status) in backbone.exited() {
            chaos.exited_on_their_own.push((
                name.to_owned(),
                started.elapsed().as_secs_f64(),
                status.to_string(),
            ));
            backbone.restart(name);
        }
        let Some(planned) = next else {
            if started.elapsed() >= window {
                return chaos;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        };
        if started.elapsed() < planned.after {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        let at = Instant::now();
        match &planned.fault {
            Fault::Kill(component) => {
                backbone.kill(component);
                tokio::time::sleep(planned.down).await;
                backbone.restart(component);
            }
            Fault::Broker => {
                let broker = broker.expect("a broker the run may kill (BENCH_BROKER_*)");
                broker.kill();
                tokio::time::sleep(planned.down).await;
                // The script blocks until the broker answers: off the runtime's threads.
                let broker = broker.clone();
                tokio::task::spawn_blocking(move || broker.start())
                    .await
                    .expect("broker restarted");
            }
            Fault::Postgres(mode) => {
                let mode = *mode;
                tokio::task::spawn_blocking(move || restart_postgres(mode))
                    .await
                    .expect("PostgreSQL restarted");
            }
        }
        chaos.injected.push(Injected {
            fault: planned.fault.to_string(),
            at,
            offset: (at - started).as_secs_f64(),
            back_after: at.elapsed(),
        });
        next = faults.next();
    }
}

/// Waits until the backbone is idle: nothing left to publish in the outbox and every consumer
/// (read models and the process manager, `GET /projections`) with no lag, twice in a row a
/// second apart; `Err` with what was still behind after `timeout`.
pub async fn settle(backbone: &Backbone, timeout: Duration) -> Result<Duration, String> {
    let admin = token(Role::Admin, Uuid::from_u128(0xad));
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut quiet_rounds = 0;
    loop {
        let unpublished: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(&backbone.pool)
                .await
                .unwrap_or(-1);
        let lags: Result<Vec<(String, i64)>, String> = async {
            let response = http
                .get(format!("{}/projections", backbone.api))
                .bearer_auth(&admin)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if response.status() != StatusCode::OK {
                return Err(format!("GET /projections: {}", response.status()));
            }
            let models: Vec<Value> = response.json().await.map_err(|e| e.to_string())?;
            Ok(models
                .iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap_or("?").to_owned(),
                        m["lag_events"].as_i64().unwrap_or(-1),
                    )
                })
                .collect())
        }
        .await;
        let idle = unpublished == 0
            && lags
                .as_ref()
                .is_ok_and(|l| !l.is_empty() && l.iter().all(|(_, lag)| *lag == 0));
        quiet_rounds = if idle { quiet_rounds + 1 } else { 0 };
        if quiet_rounds >= 2 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "not settled after {timeout:?}: {unpublished} outbox rows unpublished, lags {lags:?}"
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A `replay-tools` run: its arguments, whether it succeeded, what it printed.
#[derive(Debug, Clone)]
pub struct ToolRun {
    pub args: String,
    pub ok: bool,
    pub output: String,
}

fn run_tool(backbone: &Backbone, args: &[&str]) -> ToolRun {
    let out = backbone.replay_tools(args);
    ToolRun {
        args: args.join(" "),
        ok: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// What the checks found once the backbone settled.
#[derive(Debug, Default)]
pub struct Findings {
    /// Orders in the event store.
    pub orders: usize,
    pub completed: usize,
    /// Cancelled or rejected.
    pub cancelled: usize,
    /// Orders not in a terminal state but with a stuck flow: (order, status, the flows' reasons).
    pub stuck: Vec<(String, String, Vec<String>)>,
    /// Orders neither terminal nor stuck: (order, status). Lost.
    pub unfinished: Vec<(String, String)>,
    /// Orders the API accepted that the event store does not have. Lost.
    pub missing: Vec<String>,
    pub reconcile_differences: usize,
    pub reconcile: Option<ToolRun>,
    /// Per read model: its rebuild from the topics, then the comparison with the live one.
    pub rebuilds: Vec<(String, ToolRun, Option<ToolRun>)>,
    /// Payments captured more than once: (payment, captures).
    pub doubled_captures: Vec<(String, i64)>,
    /// Orders whose points were earned more than once: (order, earnings).
    pub doubled_points: Vec<(String, i64)>,
    /// Notifications told more than once: (customer / kind / order, records).
    pub doubled_notifications: Vec<(String, i64)>,
    pub verify: Option<ToolRun>,
}

impl Findings {
    /// Lost orders: accepted and not in the store, or neither terminal nor stuck.
    pub fn lost(&self) -> usize {
        self.missing.len() + self.unfinished.len()
    }

    /// Effects applied twice.
    pub fn doubled(&self) -> usize {
        self.doubled_captures.len() + self.doubled_points.len() + self.doubled_notifications.len()
    }

    /// Every invariant broken, in words (empty: the run passed).
    pub fn violations(&self) -> Vec<String> {
        let mut violations = Vec::new();
        for order in &self.missing {
            violations.push(format!(
                "order {order} accepted by the API is not in the event store"
            ));
        }
        for (order, status) in &self.unfinished {
            violations.push(format!(
                "order {order} is {status}: not terminal, no stuck flow"
            ));
        }
        match &self.reconcile {
            Some(run) if run.ok && self.reconcile_differences == 0 => {}
            Some(run) => violations.push(format!(
                "reconcile: {} differences (exit ok: {}):\n{}",
                self.reconcile_differences, run.ok, run.output
            )),
            None => violations.push("reconcile did not run".to_owned()),
        }
        for (model, rebuild, check) in &self.rebuilds {
            if !rebuild.ok {
                violations.push(format!("rebuild {model} failed:\n{}", rebuild.output));
            }
            match check {
                Some(check) if check.ok => {}
                Some(check) => violations.push(format!(
                    "{model} differs from its rebuild:\n{}",
                    check.output
                )),
                None => violations.push(format!("{model}: no check (its rebuild failed)")),
            }
        }
        if self.rebuilds.is_empty() {
            violations.push("no read model rebuilt".to_owned());
        }
        for (payment, n) in &self.doubled_captures {
            violations.push(format!("payment {payment} captured {n} times"));
        }
        for (order, n) in &self.doubled_points {
            violations.push(format!("order {order} earned points {n} times"));
        }
        for (key, n) in &self.doubled_notifications {
            violations.push(format!("notification {key} recorded {n} times"));
        }
        match &self.verify {
            Some(run) if run.ok => {}
            Some(run) => violations.push(format!("verify failed:\n{}", run.output)),
            None => violations.push("verify did not run".to_owned()),
        }
        violations
    }
}

impl fmt::Display for Findings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "orders in the store {}: completed {}, cancelled or rejected {}, stuck (with a reason) {}, neither {}; accepted by the API but not in the store {}",
            self.orders,
            self.completed,
            self.cancelled,
            self.stuck.len(),
            self.unfinished.len(),
            self.missing.len()
        )?;
        for (order, status, reasons) in self.stuck.iter().take(10) {
            writeln!(f, "  stuck: {order} ({status}): {}", reasons.join("; "))?;
        }
        for (order, status) in self.unfinished.iter().take(10) {
            writeln!(f, "  UNFINISHED: {order} ({status})")?;
        }
        writeln!(
            f,
            "replay-tools reconcile: {} differences ({})",
            self.reconcile_differences,
            match &self.reconcile {
                Some(run) if run.ok => "ok",
                _ => "FAILED",
            }
        )?;
        for (model, rebuild, check) in &self.rebuilds {
            let verdict = match (rebuild.ok, check) {
                (true, Some(check)) if check.ok => "equals its rebuild from the topics",
                (true, Some(_)) => "DIFFERS from its rebuild",
                _ => "REBUILD FAILED",
            };
            writeln!(f, "read model {model:<14} {verdict}")?;
        }
        writeln!(
            f,
            "doubled effects: payments captured twice {}, points earned twice {}, notifications twice {}",
            self.doubled_captures.len(),
            self.doubled_points.len(),
            self.doubled_notifications.len()
        )?;
        writeln!(
            f,
            "replay-tools verify (hash chain): {}",
            match &self.verify {
                Some(run) if run.ok => "ok",
                _ => "FAILED",
            }
        )?;
        write!(f, "lost {}, doubled {}", self.lost(), self.doubled())
    }
}

/// Runs every check on the settled backbone; `placed` are the orders the API accepted.
pub async fn check(backbone: &Backbone, placed: &[String]) -> Findings {
    let pool = &backbone.pool;
    let mut findings = Findings::default();

    // Each order's status after its last status-changing event.
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT aggregate_id, event_type FROM events WHERE aggregate_type = 'order' \
         ORDER BY aggregate_id, sequence",
    )
    .fetch_all(pool)
    .await
    .expect("order events");
    let mut status: BTreeMap<String, &'static str> = BTreeMap::new();
    for (order, event_type) in &rows {
        let entry = status.entry(order.clone()).or_insert("Placed");
        if let Some(s) = status_after(event_type) {
            *entry = s;
        }
    }
    findings.orders = status.len();
    findings.missing = placed
        .iter()
        .filter(|o| !status.contains_key(*o))
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    // Stuck flows, of every status: an order a flow could not carry on is accounted for when
    // the process manager recorded why (an operator then retries or resolves it).
    let listed = run_tool(backbone, &["stuck-flows", "list", "--status", "all"]);
    assert!(listed.ok, "stuck-flows list failed: {}", listed.output);
    let mut reasons: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in listed.output.lines().filter(|l| l.starts_with('{')) {
        let flow: Value = serde_json::from_str(line).expect("a stuck flow as JSON");
        let order = flow["order_id"].as_str().unwrap_or_default().to_owned();
        let reason = flow["reason"].as_str().unwrap_or_default();
        if !reason.is_empty() {
            reasons.entry(order).or_default().push(format!(
                "{} {} ({}): {reason}",
                flow["step"].as_str().unwrap_or("?"),
                flow["status"].as_str().unwrap_or("?"),
                flow["event_type"].as_str().unwrap_or("?")
            ));
        }
    }
    for (order, s) in &status {
        match *s {
            "Completed" => findings.completed += 1,
            "Cancelled" | "Rejected" => findings.cancelled += 1,
            other => match reasons.get(order) {
                Some(why) => findings
                    .stuck
                    .push((order.clone(), other.to_owned(), why.clone())),
                None => findings.unfinished.push((order.clone(), other.to_owned())),
            },
        }
    }

    let reconcile = run_tool(backbone, &["reconcile"]);
    findings.reconcile_differences = reconcile
        .output
        .lines()
        .filter(|l| l.starts_with("difference: "))
        .count();
    findings.reconcile = Some(reconcile);

    // Every read model, from the one list, against a fresh rebuild from the topics (which hold
    // whatever the relay re-sent around the faults: the rebuild's dedup must match the live
    // projector's).
    for model in projections::read_models::names() {
        let rebuild = run_tool(backbone, &["rebuild", model, "--restart"]);
        let check = rebuild.ok.then(|| run_tool(backbone, &["check", model]));
        findings.rebuilds.push((model.to_owned(), rebuild, check));
    }

    findings.doubled_captures = sqlx::query_as(
        "SELECT aggregate_id, count(*) FROM events \
         WHERE aggregate_type = 'payment' AND event_type = 'PaymentCaptured' \
         GROUP BY aggregate_id HAVING count(*) > 1",
    )
    .fetch_all(pool)
    .await
    .expect("captures");
    findings.doubled_points = sqlx::query_as(
        "SELECT payload->'PointsEarned'->>'order_id', count(*) FROM events \
         WHERE aggregate_type = 'rewards' AND event_type = 'PointsEarned' \
         GROUP BY 1 HAVING count(*) > 1",
    )
    .fetch_all(pool)
    .await
    .expect("points earned");
    // A record is unique per customer and causing event by its table's key; what a doubled
    // effect would leave is a second record of the same kind for the same order (each kind is
    // told once per order) from a second causing event.
    findings.doubled_notifications = sqlx::query_as(
        "SELECT customer_id::text || ' ' || kind || ' ' || coalesce(order_id, '-'), count(*) \
         FROM notifications.records GROUP BY customer_id, kind, order_id HAVING count(*) > 1",
    )
    .fetch_all(pool)
    .await
    .expect("notifications");

    findings.verify = Some(run_tool(backbone, &["verify"]));
    findings
}
