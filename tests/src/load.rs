//! Pieces of the whole-order load benchmark (`benches/lifecycle.rs`): the backbone started as in
//! production (release binaries, each component its own process, on the machine's broker and
//! PostgreSQL), latency samples, CPU accounting from `/proc`, the asynchronous hops read back
//! from the event store and the append ceiling of the same PostgreSQL.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use commands::{EventStoreConfig, EventStoreDb};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use streams::{admin, KafkaConfig};
use uuid::Uuid;

use crate::{admin_url, binary_path, bootstrap, TEST_JWT_SECRET, TEST_REGISTRY_BASIC_AUTH};

/// A free TCP port on 127.0.0.1 (bound, then released for a child process to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Seconds from an environment variable, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The backbone as operators run it: the registry, relay, projector (every read model),
/// process manager and API, each a release binary in its own process, on a database of its own
/// (`lc_<run>_<tag>`, dropped by [`Backbone::stop`]) and topics under a prefix of its own.
#[derive(Debug)]
pub struct Backbone {
    pub database: String,
    pub database_url: String,
    pub pool: PgPool,
    pub api: String,
    pub registry: String,
    pub kafka: KafkaConfig,
    pub group_prefix: String,
    pub logs: PathBuf,
    pub processes: Vec<(&'static str, Child)>,
    /// Settings every component gets (an OTLP endpoint, say).
    pub common_env: Vec<(String, String)>,
    /// Each component's own settings, so [`Self::restart`] starts it exactly as it was.
    component_env: Vec<(&'static str, Vec<(String, String)>)>,
}

/// The backbone's processes, as [`Backbone`] names them (and as their binaries are named).
pub const COMPONENTS: [&str; 5] = [
    "schema-registry",
    "relay",
    "projector",
    "process-manager",
    "api",
];

impl Backbone {
    /// Creates the database (migrated), the topics and starts every component; `catalogue` is
    /// the JSON catalogue file the API and the process manager seed from. Returns once the API
    /// says it is ready.
    pub async fn start(catalogue: &std::path::Path, api_env: &[(&str, String)]) -> Self {
        Self::start_with(catalogue, api_env, &[]).await
    }

    /// [`Self::start`], with `common_env` given to every component.
    pub async fn start_with(
        catalogue: &std::path::Path,
        api_env: &[(&str, String)],
        common_env: &[(&str, String)],
    ) -> Self {
        let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
        // Named after the run, like the tests' databases, so that `scripts/test` sweeps what a
        // crashed run left (a failing test's `Drop` stops the processes but cannot drop it).
        let database = format!("lc_{}_{tag}", crate::test_run_id());
        let mut admin = PgConnection::connect(&admin_url())
            .await
            .expect("PostgreSQL is reachable");
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&mut admin)
            .await
            .expect("database created");
        let database_url = crate::with_database(&admin_url(), &database);
        // Migrated once here, so the components do not race to migrate at start-up.
        let store = EventStoreDb::connect(&EventStoreConfig {
            database_url: database_url.clone(),
            database_max_connections: 4,
        })
        .await
        .expect("event store migrates");
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect(&database_url)
            .await
            .expect("pool");
        drop(store);
        let kafka = KafkaConfig::local(bootstrap(), format!("lc{tag}."));
        admin::ensure_topics(&kafka, &kafka.topics().all())
            .await
            .expect("topics created");
        let logs = std::env::temp_dir().join(format!("lc-{tag}"));
        std::fs::create_dir_all(&logs).expect("log directory");
        let registry_port = free_port();
        let api_port = free_port();
        let mut this = Self {
            database,
            database_url,
            pool,
            api: format!("http://127.0.0.1:{api_port}"),
            registry: format!("http://127.0.0.1:{registry_port}"),
            kafka,
            group_prefix: format!("lc{tag}-"),
            logs,
            processes: Vec::new(),
            common_env: common_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            component_env: Vec::new(),
        };
        let catalogue = catalogue.display().to_string();
        this.spawn(
            "schema-registry",
            &[
                ("REGISTRY_DATABASE_URL", this.database_url.clone()),
                ("REGISTRY_LISTEN", format!("127.0.0.1:{registry_port}")),
                ("REGISTRY_BASIC_AUTH", TEST_REGISTRY_BASIC_AUTH.to_owned()),
            ],
        );
        wait_for_http(&format!("{}/subjects", this.registry), "the registry").await;
        this.spawn("relay", &[]);
        this.spawn("projector", &[]);
        let mut env = vec![
            ("API_LISTEN", format!("127.0.0.1:{api_port}")),
            ("AUTH_JWT_SECRET", TEST_JWT_SECRET.to_owned()),
            ("CATALOGUE_PATH", catalogue.clone()),
        ];
        env.extend(api_env.iter().cloned());
        this.spawn("api", &env);
        wait_for_http(&format!("{}/health/ready", this.api), "the API").await;
        // The process manager starts once the API has seeded the empty catalogue table: started
        // together, it could load the table while the API was still filling it and miss stores
        // until its next refresh (5 s; an order placed meanwhile got a stuck flow).
        this.spawn("process-manager", &[("CATALOGUE_PATH", catalogue)]);
        this
    }

    /// One workspace binary configured for this backbone, as an operator would (production
    /// defaults otherwise), its log in [`Self::logs`].
    pub fn command(&self, binary: &str, extra_env: &[(&str, String)]) -> Command {
        let mut command = Command::new(binary_path(binary));
        command
            .env("DATABASE_URL", &self.database_url)
            .env(
                "KAFKA_BOOTSTRAP_SERVERS",
                &self.kafka.kafka_bootstrap_servers,
            )
            .env("KAFKA_TOPIC_PREFIX", &self.kafka.kafka_topic_prefix)
            .env("SCHEMA_REGISTRY_URL", &self.registry)
            .env("SCHEMA_REGISTRY_BASIC_AUTH", TEST_REGISTRY_BASIC_AUTH)
            .env("PROJECTOR_GROUP_PREFIX", &self.group_prefix)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        for (key, value) in &self.common_env {
            command.env(key, value);
        }
        for (key, value) in extra_env {
            command.env(key, value);
        }
        command
    }

    fn spawn(&mut self, binary: &'static str, extra_env: &[(&str, String)]) {
        self.component_env.retain(|(name, _)| *name != binary);
        self.component_env.push((
            binary,
            extra_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        ));
        self.launch(binary);
    }

    /// Starts `binary` with the settings it was first spawned with. Its log is appended to,
    /// so what an earlier incarnation wrote before it was killed stays readable.
    fn launch(&mut self, binary: &'static str) {
        let extra_env: Vec<(&str, String)> = self
            .component_env
            .iter()
            .find(|(name, _)| *name == binary)
            .map(|(_, env)| env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect())
            .unwrap_or_default();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{binary}.log")))
            .expect("log");
        let child = self
            .command(binary, &extra_env)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; build with `cargo build --release --bins` first",
                    binary_path(binary).display()
                )
            });
        // In place: `stop` signals the components in the reverse of their start order.
        match self.processes.iter_mut().find(|(name, _)| *name == binary) {
            Some((_, old)) => *old = child,
            None => self.processes.push((binary, child)),
        }
    }

    /// SIGKILLs `component` (one of [`COMPONENTS`]): no shutdown path runs, as when a node
    /// dies. Returns once it is reaped.
    pub fn kill(&mut self, component: &str) {
        let (_, child) = self
            .processes
            .iter_mut()
            .find(|(name, _)| *name == component)
            .unwrap_or_else(|| panic!("no component {component}"));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts `component` again as [`Self::start`] first started it (same settings, same
    /// listening port), as an orchestrator restarts a dead container.
    pub fn restart(&mut self, component: &str) {
        let binary = COMPONENTS
            .into_iter()
            .find(|c| *c == component)
            .unwrap_or_else(|| panic!("no component {component}"));
        self.launch(binary);
    }

    /// The components that have exited, with their exit status (until [`Self::restart`]ed).
    pub fn exited(&mut self) -> Vec<(&'static str, std::process::ExitStatus)> {
        let mut exited = Vec::new();
        for (name, child) in &mut self.processes {
            if let Ok(Some(status)) = child.try_wait() {
                exited.push((*name, status));
            }
        }
        exited
    }

    /// Panics if a component exited.
    pub fn assert_running(&mut self) {
        for (name, child) in &mut self.processes {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{name} exited ({status}); its log: {}",
                    self.logs.join(format!("{name}.log")).display()
                );
            }
        }
    }

    /// The disaster: points every component started or restarted from now on (and
    /// [`Self::replay_tools`]) at a new, empty database `<database>_restored`, and returns its
    /// name; the lost one stays as it was (the registry keeps using it) and is dropped by
    /// [`Self::stop`], the new one by the caller.
    pub async fn replace_database(&mut self) -> String {
        let restored = format!("{}_restored", self.database);
        let mut admin = PgConnection::connect(&admin_url())
            .await
            .expect("PostgreSQL is reachable");
        sqlx::query(&format!("CREATE DATABASE {restored}"))
            .execute(&mut admin)
            .await
            .expect("database created");
        self.database_url = crate::with_database(&self.database_url, &restored);
        restored
    }

    /// Drops a database this backbone made besides its own ([`Self::replace_database`]).
    pub async fn drop_database(name: &str) {
        if let Ok(mut admin) = PgConnection::connect(&admin_url()).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut admin)
                .await;
        }
    }

    /// `replay-tools` with `args` against this backbone.
    pub fn replay_tools(&self, args: &[&str]) -> std::process::Output {
        self.command("replay-tools", &[])
            .args(args)
            .output()
            .expect("replay-tools runs")
    }

    /// Stops every component (SIGTERM, then SIGKILL after 10 s) and drops the database.
    pub async fn stop(mut self) {
        for (_, child) in self.processes.iter().rev() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (_, child) in &mut self.processes {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.pool.close().await;
        if let Ok(mut admin) = PgConnection::connect(&admin_url()).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ))
            .execute(&mut admin)
            .await;
        }
    }
}

/// A test that fails before [`Backbone::stop`] leaves no component running (each holds
/// database connections that the next tests need).
impl Drop for Backbone {
    fn drop(&mut self) {
        for (_, child) in &mut self.processes {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

async fn wait_for_http(url: &str, what: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{what} did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The demo catalogue (`domain/catalogue/demo.json`) with `stores` more stores in London, for
/// the load to spread over (each store acts with its own token, within the per-client rate
/// limit). Returns the new stores' ids.
pub fn catalogue_with_stores(path: &std::path::Path, stores: usize) -> Vec<Uuid> {
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/../domain/catalogue/demo.json");
    let mut catalogue: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(demo).expect("demo catalogue"))
            .expect("JSON");
    let ids: Vec<Uuid> = (0..stores)
        .map(|i| Uuid::from_u128(0x1c00_0000_0000_4000_8000_0000_0000_0000 + i as u128))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        catalogue["stores"][id.to_string()] = serde_json::json!({
            "name": format!("Load store {i}"),
            "region": "uk",
            "latitude": 51.53 + 0.0005 * (i % 20) as f64,
            "longitude": -0.105 + 0.0005 * (i / 20) as f64,
        });
    }
    std::fs::write(path, serde_json::to_vec_pretty(&catalogue).expect("JSON")).expect("written");
    ids
}

/// Latency samples in milliseconds, with the instant each ended (to keep only a window).
#[derive(Debug, Default)]
pub struct Samples {
    by_name: BTreeMap<&'static str, Vec<(Instant, f64)>>,
}

impl Samples {
    pub fn record(&mut self, name: &'static str, ended: Instant, took: Duration) {
        self.by_name
            .entry(name)
            .or_default()
            .push((ended, took.as_secs_f64() * 1000.0));
    }

    /// When the first sample of any of `names` that started after `at` ended: a fault's
    /// recovery, the first success of something tried once the fault had struck (one that was
    /// already under way may have got through before it).
    pub fn first_started_after(&self, names: &[&str], at: Instant) -> Option<Instant> {
        names
            .iter()
            .filter_map(|name| self.by_name.get(name))
            .flatten()
            .filter(|(ended, took)| {
                ended
                    .checked_sub(Duration::from_secs_f64(took / 1000.0))
                    .is_some_and(|started| started > at)
            })
            .map(|(ended, _)| *ended)
            .min()
    }

    /// Per name: the samples that ended within `[from, to]`, as count, p50, p99, max.
    pub fn summary(&self, from: Instant, to: Instant) -> Vec<(&'static str, Summary)> {
        self.by_name
            .iter()
            .map(|(name, samples)| {
                let values: Vec<f64> = samples
                    .iter()
                    .filter(|(at, _)| *at >= from && *at <= to)
                    .map(|(_, v)| *v)
                    .collect();
                (*name, Summary::of(values))
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        let at =
            |q: f64| values[((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1];
        Self {
            count: values.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: values[values.len() - 1],
        }
    }
}

/// CPU ticks (user + system) of every process, for the CPU share of each component.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    ticks: HashMap<u32, u64>,
    taken: Option<Instant>,
}

fn stat_fields(pid: u32) -> Option<(String, u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
    // After the command: state(0) ppid(1) ... utime(11) stime(12).
    let ppid = rest.get(1)?.parse().ok()?;
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, ppid, utime + stime))
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl CpuSnapshot {
    pub fn take() -> Self {
        Self {
            ticks: all_pids()
                .into_iter()
                .filter_map(|pid| Some((pid, stat_fields(pid)?.2)))
                .collect(),
            taken: Some(Instant::now()),
        }
    }
}

/// The processes each figure is about, by name: the backbone's binaries, the broker on
/// `broker_port`, PostgreSQL (its shared processes and the backends of `database`), this
/// process (the load generator).
pub fn process_groups(backbone: &Backbone, broker_port: u16) -> Vec<(String, Vec<u32>)> {
    let mut groups: Vec<(String, Vec<u32>)> = backbone
        .processes
        .iter()
        .map(|(name, child)| ((*name).to_owned(), vec![child.id()]))
        .collect();
    let pids = all_pids();
    let broker_conf = format!("kafka-{broker_port}/server.properties");
    let broker: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|pid| {
            let c = cmdline(*pid);
            c.contains("kafka.Kafka") && c.contains(&broker_conf)
        })
        .collect();
    groups.push(("kafka broker".to_owned(), broker));
    // The postmaster: a `postgres` process whose parent is not one.
    let stats: HashMap<u32, (String, u32)> = pids
        .iter()
        .filter_map(|pid| stat_fields(*pid).map(|(c, p, _)| (*pid, (c, p))))
        .collect();
    let is_postgres = |pid: &u32| {
        stats
            .get(pid)
            .is_some_and(|(c, _)| c.starts_with("postgres"))
    };
    let postgres: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|pid| {
            if !is_postgres(pid) {
                return false;
            }
            let parent = stats[pid].1;
            if !is_postgres(&parent) {
                return true;
            }
            // A child of the postmaster: its shared processes, and the backends of our database
            // (another checkout's backends are theirs).
            let c = cmdline(*pid);
            let backend = c.contains('(') || c.contains("[local]");
            !backend || c.contains(&format!(" {} ", backbone.database))
        })
        .collect();
    groups.push(("postgresql".to_owned(), postgres));
    groups.push(("load generator".to_owned(), vec![std::process::id()]));
    groups
}

/// Cores used by each group between `before` and `after` (a process born in between counts
/// from its birth).
pub fn cpu_shares(
    groups: &[(String, Vec<u32>)],
    before: &CpuSnapshot,
    after: &CpuSnapshot,
) -> Vec<(String, f64)> {
    let ticks_per_second = clock_ticks();
    let seconds = match (before.taken, after.taken) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => return Vec::new(),
    };
    groups
        .iter()
        .map(|(name, pids)| {
            let used: u64 = pids
                .iter()
                .map(|pid| {
                    let end = after.ticks.get(pid).copied().unwrap_or(0);
                    end.saturating_sub(before.ticks.get(pid).copied().unwrap_or(0))
                })
                .sum();
            (name.clone(), used as f64 / ticks_per_second / seconds)
        })
        .collect()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Whole-machine CPU use (all cores, as a share of one core) between two readings of
/// `/proc/stat`: `(busy ticks, total ticks)`.
pub fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// One asynchronous hop: an event, and the process manager's reaction to it (an event whose
/// causation is that event) committed.
#[derive(Debug, sqlx::FromRow)]
pub struct Hop {
    pub cause: String,
    pub reaction: String,
    pub count: i64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The hops whose cause was recorded between `from` and `to`, from the event store's own
/// clock (`recorded_at`) and causation ids.
pub async fn hops(pool: &PgPool, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<Hop> {
    sqlx::query_as(
        "SELECT e.aggregate_type || '.' || e.event_type AS cause, \
                r.aggregate_type || '.' || r.event_type AS reaction, count(*) AS count, \
                percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50_ms, \
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99_ms \
         FROM (SELECT r.aggregate_type, r.event_type, (r.metadata->>'causation_id')::uuid AS cause, \
                      r.recorded_at FROM events r WHERE r.metadata->>'actor' LIKE 'system:%') r \
         JOIN events e ON e.event_id = r.cause \
         CROSS JOIN LATERAL (SELECT extract(epoch FROM r.recorded_at - e.recorded_at)::float8 * 1000 AS ms) m \
         WHERE e.recorded_at BETWEEN $1 AND $2 \
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
    .expect("hops")
}

/// The database clock, to bound [`hops`].
pub async fn db_now(pool: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await
        .expect("clock")
}

/// The append ceiling: raw single-row INSERT transactions per second on the same PostgreSQL,
/// with `writers` concurrent connections for `seconds`, rows shaped like events.
pub async fn append_ceiling(database_url: &str, writers: usize, seconds: f64) -> f64 {
    let pool = PgPoolOptions::new()
        .max_connections(writers as u32)
        .connect(database_url)
        .await
        .expect("pool");
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS raw_events (aggregate_type text, aggregate_id text, \
         sequence bigint, event_type text, event_version text, payload json, metadata json, \
         PRIMARY KEY (aggregate_type, aggregate_id, sequence))",
    )
    .execute(&pool)
    .await
    .expect("table");
    let payload = serde_json::json!({"OrderPlaced": crate::order_request(Uuid::new_v4())});
    let done = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..writers {
        let (pool, done, payload) = (pool.clone(), done.clone(), payload.clone());
        tasks.spawn(async move {
            while Instant::now() < until {
                sqlx::query(
                    "INSERT INTO raw_events VALUES ('order', $1, 1, 'OrderPlaced', '1.0', $2, '{}')",
                )
                .bind(Uuid::new_v4().to_string())
                .bind(&payload)
                .execute(&pool)
                .await
                .expect("insert");
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    sqlx::query("DROP TABLE raw_events")
        .execute(&pool)
        .await
        .expect("dropped");
    pool.close().await;
    rate
}

/// The load average and the machine, for the figures' record.
pub fn machine() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!(
        "{cores} cores, {:.0} GiB; load average {}",
        memory as f64 / 1024.0 / 1024.0,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}
