//! Each compatibility level enforced as Confluent defines it, over the registry's HTTP API as a
//! Confluent client registers: four histories and candidates, each refused (409) or accepted
//! (200) under each of the seven levels. The four cases break compatibility in one direction
//! each (backward or forward), against the latest version only or an older one only, so every
//! level has its own pattern of refusals: `BACKWARD` refuses one, `BACKWARD_TRANSITIVE` that one
//! and the older-version backward break, `FORWARD` and `FORWARD_TRANSITIVE` the same for
//! forward, `FULL` both latest-version breaks, `FULL_TRANSITIVE` all four, `NONE` none. A level
//! that checked another direction, or only the latest version, would show.
//!
//! Like `registry.rs`: a database of its own (`reg_<run>_<uuid>`, dropped at the end) on
//! `REGISTRY_TEST_ADMIN_URL`, the registry on 127.0.0.1:0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use registry::{RegistryConfig, RegistryServer};
use serde_json::{json, Value};
use sqlx::{Connection, Executor, PgConnection};

const MEDIA_TYPE: &str = "application/vnd.schemaregistry.v1+json";
const USER: &str = "registry-tests";
const PASSWORD: &str = "registry-tests-only-password";

const LEVELS: [&str; 7] = [
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
];

/// A record `R` with the given fields (`(name, default)`; `None`: no default).
fn record(fields: &[(&str, Option<i64>)]) -> String {
    let fields: Vec<Value> = fields
        .iter()
        .map(|(name, default)| match default {
            Some(default) => json!({"name": name, "type": "long", "default": default}),
            None => json!({"name": name, "type": "long"}),
        })
        .collect();
    json!({"type": "record", "name": "R", "namespace": "levels", "fields": fields}).to_string()
}

/// A history of versions, a candidate, and the levels that must refuse it.
struct Case {
    name: &'static str,
    history: Vec<String>,
    candidate: String,
    refused_by: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    vec![
        // The new schema cannot read data of the latest version (`b` is new and has no
        // default): a backward break, found by every level that checks backward.
        Case {
            name: "backward-latest",
            history: vec![record(&[("a", None)])],
            candidate: record(&[("a", None), ("b", None)]),
            refused_by: &["BACKWARD", "BACKWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE"],
        },
        // It reads the latest version (which has `b`), not the first (without `b`): only the
        // transitive backward levels look that far. (`c` keeps it apart from the latest version
        // once defaults are set aside.)
        Case {
            name: "backward-older",
            history: vec![
                record(&[("a", None)]),
                record(&[("a", None), ("b", Some(0))]),
            ],
            candidate: record(&[("a", None), ("b", None), ("c", Some(0))]),
            refused_by: &["BACKWARD_TRANSITIVE", "FULL_TRANSITIVE"],
        },
        // The latest version cannot read the new data (`b` removed, and the old reader has no
        // default for it): a forward break.
        Case {
            name: "forward-latest",
            history: vec![record(&[("a", None), ("b", None)])],
            candidate: record(&[("a", None)]),
            refused_by: &["FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE"],
        },
        // The latest version has a default for `b`, the first has none: only the transitive
        // forward levels look that far.
        Case {
            name: "forward-older",
            history: vec![
                record(&[("a", None), ("b", None)]),
                record(&[("a", None), ("b", Some(0))]),
            ],
            candidate: record(&[("a", None)]),
            refused_by: &["FORWARD_TRANSITIVE", "FULL_TRANSITIVE"],
        },
    ]
}

struct Registry {
    client: reqwest::Client,
    base_url: String,
}

impl Registry {
    /// Sends `body` with the Confluent content type and the credentials; status and JSON body.
    async fn send(&self, method: reqwest::Method, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .request(method, format!("{}{path}", self.base_url))
            .basic_auth(USER, Some(PASSWORD))
            .header("content-type", MEDIA_TYPE)
            .body(body.to_string())
            .send()
            .await
            .expect("the registry answers");
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    async fn set_level(&self, subject: &str, level: &str) {
        let (status, body) = self
            .send(
                reqwest::Method::PUT,
                &format!("/config/{subject}"),
                &json!({ "compatibility": level }),
            )
            .await;
        assert_eq!((status, &body), (200, &json!({ "compatibility": level })));
    }

    async fn register(&self, subject: &str, schema: &str) -> (u16, Value) {
        self.send(
            reqwest::Method::POST,
            &format!("/subjects/{subject}/versions"),
            &json!({ "schema": schema }),
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_compatibility_level_refuses_exactly_the_breaks_it_is_defined_to_refuse() {
    let admin_url = std::env::var("REGISTRY_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let run = std::env::var("TEST_RUN_ID").unwrap_or_else(|_| "0".to_owned());
    let database = format!("reg_{run}_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&admin_url).await.expect("connects");
    admin
        .execute(format!("CREATE DATABASE {database}").as_str())
        .await
        .expect("creates the test database");
    let (server_url, _) = admin_url.rsplit_once('/').expect("names a database");
    let server = RegistryServer::build(RegistryConfig {
        database_url: format!("{server_url}/{database}"),
        db_schema: "schema_registry".to_owned(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        basic_auth: Some(format!("{USER}:{PASSWORD}")),
        anonymous_reads: true,
    })
    .await
    .expect("the registry starts");
    let registry = Registry {
        client: reqwest::Client::new(),
        base_url: format!("http://{}", server.local_addr()),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run_until_stopped(async {
        let _ = stopped.await;
    }));

    let mut found = Vec::new();
    let mut wanted = Vec::new();
    for case in cases() {
        for level in LEVELS {
            // A subject of its own per case and level: the history registered with no check,
            // then the level set and the candidate registered as a client would.
            let subject = format!("{}-{}-value", case.name, level.to_lowercase());
            registry.set_level(&subject, "NONE").await;
            for version in &case.history {
                let (status, body) = registry.register(&subject, version).await;
                assert_eq!(status, 200, "{subject}: {body}");
            }
            registry.set_level(&subject, level).await;
            let (status, body) = registry.register(&subject, &case.candidate).await;
            let refused = match status {
                200 => false,
                409 => {
                    assert_eq!(body["error_code"], 409, "{subject}: {body}");
                    true
                }
                other => panic!("{subject}: {other} {body}"),
            };
            found.push(format!("{} under {level}: refused {refused}", case.name));
            wanted.push(format!(
                "{} under {level}: refused {}",
                case.name,
                case.refused_by.contains(&level)
            ));
        }
    }
    assert_eq!(found, wanted);

    let _ = stop.send(());
    task.await.expect("joined").expect("the registry stops");
    admin
        .execute(format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)").as_str())
        .await
        .expect("drops the test database");
}
