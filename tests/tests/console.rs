//! The operations console in a real browser: Debian's Chromium, driven through playwright-core
//! by `api/console/tests/console.test.mjs` (node:test), against the backbone as operators run
//! it (registry, relay, projector, process manager and API, each its own process, the API
//! serving the console built by the project's scripts). The browser signs in as a person
//! would, and this side makes things happen on the backbone when the page is ready for them:
//! an order moved from Placed to Completed step by step, a read model that fails on one event
//! for real (its store refuses the row) and is fixed, an order stranded by a store moved out of
//! reach and put back, new orders, an undecodable record. The
//! screenshots are kept in `.run/console-screenshots/`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::auth::{mint_hs256, AuthConfig, Claims, Secret};
use backbone_tests::load::Backbone;
use backbone_tests::{client_as, eventually, order_request, token, KillOnDrop, Role, ADMIN_ID};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);
/// The longest the browser may take between two turns.
const TURN: Duration = Duration::from_secs(180);

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository")
        .to_path_buf()
}

/// Kills the backbone's processes and drops its database if the test fails half-way (a panic
/// skips `stop`).
struct Started(Option<Backbone>);

impl Drop for Started {
    fn drop(&mut self) {
        let Some(mut backbone) = self.0.take() else {
            return;
        };
        for (_, child) in &mut backbone.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        // On a runtime of its own: the test's is unwinding.
        let database = backbone.database.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                use sqlx::Connection;
                let mut admin = sqlx::PgConnection::connect(&backbone_tests::admin_url())
                    .await
                    .ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// What the Rust side does on the backbone when the browser is ready for it.
struct Driver<'b> {
    backbone: &'b Backbone,
    client: reqwest::Client,
    order: String,
    victim: Option<(String, i64)>,
    stuck: Option<(String, i64)>,
}

impl Driver<'_> {
    fn signal_process_manager(&self, signal: &str) {
        let (_, child) = self
            .backbone
            .processes
            .iter()
            .find(|(name, _)| *name == "process-manager")
            .expect("the process manager runs");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal}");
    }

    /// Places an order over HTTP; returns its id and position token.
    async fn place(&self, customer: Uuid) -> (String, String) {
        let response = self
            .client
            .post(format!("{}/orders", self.backbone.api))
            .json(&order_request(customer))
            .send()
            .await
            .expect("placed");
        assert_eq!(response.status().as_u16(), 201);
        let placed: Value = response.json().await.expect("json");
        (
            placed["order_id"].as_str().expect("an id").to_owned(),
            placed["position"]["token"]
                .as_str()
                .expect("a position")
                .to_owned(),
        )
    }

    /// Waits until the analytics read model has applied the event at `position`, so the page
    /// reads its figures before the next orders with this order in them.
    async fn analytics_include(&self, position: &str) {
        let response = self
            .client
            .get(format!(
                "{}/analytics/summary?position={position}",
                self.backbone.api
            ))
            .send()
            .await
            .expect("analytics");
        assert_eq!(response.status().as_u16(), 200);
    }

    /// Changes a store, and waits until every process has refreshed its catalogue (5 s).
    async fn put_store(&self, store_id: &str, store: &Value) {
        let response = self
            .client
            .put(format!("{}/admin/stores/{store_id}", self.backbone.api))
            .json(store)
            .send()
            .await
            .expect("store changed");
        assert_eq!(response.status().as_u16(), 204);
        tokio::time::sleep(Duration::from_secs(6)).await;
    }

    async fn step(&self, path: &str, action: Value) {
        let response = self
            .client
            .post(format!(
                "{}/{path}/{}/actions",
                self.backbone.api, self.order
            ))
            .json(&action)
            .send()
            .await
            .expect("step sent");
        let status = response.status().as_u16();
        assert_eq!(
            status,
            200,
            "{action}: {}",
            response.text().await.unwrap_or_default()
        );
    }

    async fn phase(&mut self, phase: &str) -> Value {
        let api = self.backbone.api.clone();
        let pool = &self.backbone.pool;
        match phase {
            // Placed while the process manager is paused, so the page shows it Placed first.
            "order" => {
                self.signal_process_manager("-STOP");
                let (order, position) = self.place(Uuid::new_v4()).await;
                let response = self
                    .client
                    .get(format!("{api}/orders/{order}/tracking?position={position}"))
                    .send()
                    .await
                    .expect("tracking");
                assert_eq!(response.status().as_u16(), 200);
                self.order = order;
                json!({"order_id": self.order})
            }
            "confirm" => {
                self.signal_process_manager("-CONT");
                json!({})
            }
            "accept" => {
                let accept = json!({"action": "accept", "estimated_preparation_minutes": 10});
                self.step("orders", accept).await;
                json!({})
            }
            "prepare" => {
                self.step("orders", json!({"action": "start_preparation"}))
                    .await;
                json!({})
            }
            "ready" => {
                self.step("orders", json!({"action": "mark_ready"})).await;
                json!({})
            }
            "pickup" => {
                // The flow requested the delivery when the store accepted.
                let courier = Uuid::new_v4();
                eventually(WAIT, "the delivery to be requested", || async {
                    let response = self
                        .client
                        .post(format!("{api}/deliveries/{}/actions", self.order))
                        .json(&json!({"action": "assign_courier", "courier_id": courier}))
                        .send()
                        .await
                        .ok()?;
                    (response.status().as_u16() == 200).then_some(())
                })
                .await;
                self.step("deliveries", json!({"action": "pick_up"})).await;
                let fix = json!({"action": "update_location", "latitude": 51.51,
                                 "longitude": -0.12, "device_time": chrono::Utc::now()});
                self.step("deliveries", fix).await;
                json!({})
            }
            "deliver" => {
                self.step("deliveries", json!({"action": "deliver"})).await;
                json!({})
            }
            // The notifications read model's store refuses one customer's rows (a trigger
            // stands for the outage): the projector retries, then dead-letters the event and
            // goes on. The outage then ends, so a re-drive can apply it.
            "poison" => {
                let customer = Uuid::new_v4();
                sqlx::query(
                    "CREATE FUNCTION notifications.console_test_outage() RETURNS trigger \
                     LANGUAGE plpgsql AS $$ BEGIN \
                       RAISE EXCEPTION 'the notification store is down for %', NEW.customer_id; \
                     END $$",
                )
                .execute(pool)
                .await
                .expect("outage function");
                sqlx::query(&format!(
                    "CREATE TRIGGER console_test_outage BEFORE INSERT ON notifications.records \
                     FOR EACH ROW WHEN (NEW.customer_id = '{customer}') \
                     EXECUTE FUNCTION notifications.console_test_outage()"
                ))
                .execute(pool)
                .await
                .expect("outage trigger");
                let (victim, position) = self.place(customer).await;
                let letter: i64 = eventually(WAIT, "the dead letter", || async {
                    sqlx::query_scalar(
                        "SELECT id FROM notifications.dead_letters \
                         WHERE aggregate_id = $1 AND status = 'dead'",
                    )
                    .bind(&victim)
                    .fetch_optional(pool)
                    .await
                    .ok()
                    .flatten()
                })
                .await;
                sqlx::query("DROP TRIGGER console_test_outage ON notifications.records")
                    .execute(pool)
                    .await
                    .expect("outage over");
                self.analytics_include(&position).await;
                self.victim = Some((victim.clone(), letter));
                json!({"dead_letter_id": letter, "order_id": victim})
            }
            // What the page showed is what happened: applied once, the notification there.
            "redriven" => {
                let (victim, letter) = self.victim.clone().expect("the poison phase ran");
                let status: String = sqlx::query_scalar(
                    "SELECT status FROM notifications.dead_letters WHERE id = $1",
                )
                .bind(letter)
                .fetch_one(pool)
                .await
                .expect("the dead letter");
                assert_eq!(status, "redriven");
                let notified: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM notifications.records \
                     WHERE order_id = $1 AND kind = 'order_confirmed'",
                )
                .bind(&victim)
                .fetch_one(pool)
                .await
                .expect("notifications");
                assert_eq!(notified, 1, "the re-driven event was applied once");
                json!({})
            }
            // A store moved out of reach by mistake strands an accepted order's delivery
            // request; the store is then put back, so a retry can go through.
            "stuck" => {
                let catalogue: Value =
                    backbone_tests::json_of(&self.client, format!("{api}/catalogue"))
                        .await
                        .expect("the catalogue");
                let store_id = Uuid::from_u128(42).to_string();
                let store = catalogue["catalogue"]["stores"][&store_id].clone();
                assert!(store.is_object(), "store 42 in the demo catalogue");
                let (order, position) = self.place(Uuid::new_v4()).await;
                self.analytics_include(&position).await;
                eventually(WAIT, "the order confirmed", || async {
                    let view: Value = backbone_tests::json_of(
                        &self.client,
                        format!("{api}/orders/{order}/tracking"),
                    )
                    .await?;
                    (view["status"] == "Confirmed").then_some(())
                })
                .await;
                let mut moved = store.clone();
                moved["latitude"] = json!(55.95);
                moved["longitude"] = json!(-3.19);
                self.put_store(&store_id, &moved).await;
                let accept = json!({"action": "accept", "estimated_preparation_minutes": 10});
                self.order = order.clone();
                self.step("orders", accept).await;
                let id = eventually(WAIT, "the stuck flow", || async {
                    let page: Value = backbone_tests::json_of(
                        &self.client,
                        format!("{api}/admin/stuck-flows?order_id={order}"),
                    )
                    .await?;
                    page["items"][0]["id"].as_i64()
                })
                .await;
                self.put_store(&store_id, &store).await;
                self.stuck = Some((order, id));
                json!({"stuck_flow_id": id})
            }
            "retried" => {
                let (order, id) = self.stuck.clone().expect("the stuck phase ran");
                let page: Value = backbone_tests::json_of(
                    &self.client,
                    format!("{api}/admin/stuck-flows?status=all&order_id={order}"),
                )
                .await
                .expect("the stuck flows");
                assert_eq!(page["items"][0]["id"], json!(id), "{page}");
                assert_eq!(page["items"][0]["status"], "retried", "{page}");
                json!({})
            }
            "more-orders" => {
                let mut positions = Vec::new();
                for _ in 0..3 {
                    positions.push(self.place(Uuid::new_v4()).await.1);
                }
                json!({"placed": positions.len()})
            }
            // A record that never decodes: dead-lettered by every read model of the orders
            // topic, for good.
            "permanent-poison" => {
                let topic = self
                    .backbone
                    .kafka
                    .topics()
                    .for_aggregate("order")
                    .expect("the orders topic");
                let producer: FutureProducer = self
                    .backbone
                    .kafka
                    .client_config()
                    .create()
                    .expect("a producer");
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .key("console-test")
                            .payload("\u{0}\u{0}\u{0}\u{0}\u{9}not avro"),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("poison produced");
                eventually(WAIT, "the undecodable record dead-lettered", || async {
                    let models: Value =
                        backbone_tests::json_of(&self.client, format!("{api}/projections")).await?;
                    models
                        .as_array()?
                        .iter()
                        .any(|m| m["name"] == "tracking" && m["dead_letters"] == 1)
                        .then_some(())
                })
                .await;
                json!({})
            }
            other => panic!("the browser asked for an unknown phase `{other}`"),
        }
    }
}

fn answer(stdin: &mut ChildStdin, phase: &str, answer: &Value) {
    writeln!(stdin, "@done {phase} {answer}").expect("the browser test reads its answers");
    stdin.flush().expect("flushed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_follows_an_order_redrives_a_dead_letter_and_sees_analytics_change_in_chromium()
{
    let console = repository().join("api/console");
    assert!(
        console.join("dist/index.html").is_file(),
        "the console is not built in {}: scripts/test builds it (ensure_console in scripts/lib.sh)",
        console.join("dist").display()
    );
    assert!(
        console.join("node_modules/playwright-core").is_dir(),
        "the console's npm packages are not installed: scripts/test installs them (ensure_console)"
    );
    let chromium =
        std::env::var("BACKBONE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        Path::new(&chromium).is_file(),
        "no Chromium at {chromium}: scripts/test installs Debian's (ensure_chromium)"
    );
    let screenshots = repository().join(".run/console-screenshots");

    let catalogue = repository().join("domain/catalogue/demo.json");
    let console_dir = console.join("dist").display().to_string();
    let mut started = Started(Some(
        Backbone::start(&catalogue, &[("API_CONSOLE_DIR", console_dir)]).await,
    ));
    let backbone = started.0.as_ref().expect("started");

    // The page is served by the API, as files, to anyone.
    let page = reqwest::get(format!("{}/console/", backbone.api))
        .await
        .expect("the console");
    assert_eq!(page.status().as_u16(), 200);

    let forged = {
        let other = AuthConfig {
            auth_jwt_secret: Some(Secret::new("not-the-api-secret-but-32-bytes-long!")),
            ..AuthConfig::default()
        };
        let claims = Claims::new(&other, Role::Admin, Uuid::new_v4(), 3600);
        mint_hs256(&other, &claims).expect("a token signed with another key")
    };
    let mut node = KillOnDrop(
        Command::new("node")
            .arg("--test-reporter=tap")
            .arg(console.join("tests/console.test.mjs"))
            .current_dir(&console)
            .env("CONSOLE_URL", format!("{}/console/", backbone.api))
            .env("CHROMIUM", &chromium)
            .env("CONSOLE_SCREENSHOTS", &screenshots)
            .env("ADMIN_TOKEN", token(Role::Admin, Uuid::from_u128(0xc0de)))
            .env(
                "ANALYST_TOKEN",
                token(Role::Analyst, Uuid::from_u128(0xa11)),
            )
            .env(
                "AUDITOR_TOKEN",
                token(Role::Auditor, Uuid::from_u128(0xa0d)),
            )
            .env("FORGED_TOKEN", forged)
            .env("STORE_TOKEN", token(Role::Store, Uuid::new_v4()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("node runs the browser test (Node.js 20 or later)"),
    );
    let mut stdin = node.stdin.take().expect("stdin");
    let (lines, mut incoming) = tokio::sync::mpsc::unbounded_channel();
    let stdout = node.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let errors = Arc::new(Mutex::new(String::new()));
    {
        let errors = errors.clone();
        let stderr = node.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut errors) = errors.lock() {
                    errors.push_str(&line);
                    errors.push('\n');
                }
            }
        });
    }

    let mut driver = Driver {
        backbone,
        client: client_as(Role::Admin, ADMIN_ID),
        order: String::new(),
        victim: None,
        stuck: None,
    };
    let mut transcript = Vec::new();
    let mut phases = Vec::new();
    loop {
        let line = match tokio::time::timeout(TURN, incoming.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(_) => panic!(
                "the browser test was silent for {TURN:?}:\n{}",
                transcript.join("\n")
            ),
        };
        if let Some(phase) = line.strip_prefix("@ready ") {
            let reply = driver.phase(phase).await;
            answer(&mut stdin, phase, &reply);
            phases.push(phase.to_owned());
        }
        transcript.push(line);
    }
    let status = node.wait().expect("node ends");
    let transcript = transcript.join("\n");
    let errors = errors.lock().map(|e| e.clone()).unwrap_or_default();
    assert!(
        status.success(),
        "the browser test failed ({status}); screenshots in {}:\n{transcript}\n{errors}",
        screenshots.display()
    );
    // Everything ran: every turn, and node:test's count of passed steps (TAP).
    assert_eq!(
        phases,
        [
            "order",
            "confirm",
            "accept",
            "prepare",
            "ready",
            "pickup",
            "deliver",
            "poison",
            "redriven",
            "stuck",
            "retried",
            "more-orders",
            "permanent-poison"
        ],
        "{transcript}"
    );
    let count = |label: &str| {
        transcript
            .lines()
            .find_map(|l| l.strip_prefix(&format!("# {label} ")))
            .and_then(|n| n.trim().parse::<u32>().ok())
    };
    assert_eq!(count("fail"), Some(0), "{transcript}");
    assert_eq!(count("pass"), Some(10), "{transcript}");
    assert!(screenshots.join("03-order-completed.png").is_file());

    if let Some(backbone) = started.0.take() {
        backbone.stop().await;
    }
}
