//! The schema registry against real PostgreSQL and real HTTP clients.
//!
//! Each test creates a database of its own (`reg_<uuid>`, dropped at the end when the test
//! passes) and starts [`RegistryServer`] on 127.0.0.1:0. PostgreSQL is reached through
//! `REGISTRY_TEST_ADMIN_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`), a
//! connection allowed to create databases. The Python test needs `BACKBONE_PYTHON` (default
//! `python3`) with the packages of `tests/python/requirements.txt` installed; it fails, not skips,
//! when they are missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use apache_avro::types::Value as AvroValue;
use registry::{RegistryConfig, RegistryError, RegistryServer};
use reqwest::{Method, StatusCode};
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use serde_json::{json, Value};
use sqlx::{Connection, Executor, PgConnection};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const SCHEMA_REGISTRY_MEDIA_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// The credentials of the registries the tests start (writes need them).
const USER: &str = "registry-tests";
const PASSWORD: &str = "registry-tests-only-password";

/// The client settings of `schema_registry_converter` for `url`, with the credentials.
fn sr_settings(url: &str) -> SrSettings {
    let mut builder = SrSettings::new_builder(url.to_owned());
    builder.set_basic_authorization(USER, Some(PASSWORD));
    builder.build().expect("client settings")
}

fn admin_url() -> String {
    std::env::var("REGISTRY_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of the test's own.
struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    async fn create() -> Self {
        let run = std::env::var("TEST_RUN_ID").unwrap_or_else(|_| "0".to_owned());
        let name = format!("reg_{run}_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url())
            .await
            .expect("PostgreSQL is reachable with REGISTRY_TEST_ADMIN_URL");
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("creates the test database");
        let admin_url = admin_url();
        let (base, _) = admin_url
            .rsplit_once('/')
            .expect("the admin URL names a database");
        Self {
            url: format!("{base}/{name}"),
            name,
        }
    }

    async fn drop(self) {
        let mut admin = PgConnection::connect(&admin_url()).await.expect("connects");
        admin
            .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
            .await
            .expect("drops the test database");
    }
}

/// A registry server running in the test's runtime.
struct Running {
    base_url: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), RegistryError>>,
}

impl Running {
    async fn start(database: &TestDatabase) -> Self {
        Self::start_with(database, true).await
    }

    /// A registry whose reads are open (`anonymous_reads`) or need the credentials too.
    async fn start_with(database: &TestDatabase, anonymous_reads: bool) -> Self {
        let server = RegistryServer::build(RegistryConfig {
            database_url: database.url.clone(),
            db_schema: "schema_registry".to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            basic_auth: Some(format!("{USER}:{PASSWORD}")),
            anonymous_reads,
        })
        .await
        .expect("the registry starts");
        let base_url = format!("http://{}", server.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Self {
            base_url,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the registry stops within 30 s")
            .expect("the server task does not panic")
            .expect("the registry stops cleanly");
    }

    /// A client with the registry's credentials.
    fn client(&self) -> Http {
        Http {
            client: reqwest::Client::new(),
            base_url: self.base_url.clone(),
            credentials: Some((USER.to_owned(), PASSWORD.to_owned())),
        }
    }

    /// A client that presents no credentials (or `credentials`).
    fn anonymous(&self, credentials: Option<(&str, &str)>) -> Http {
        Http {
            client: reqwest::Client::new(),
            base_url: self.base_url.clone(),
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
        }
    }
}

/// A fresh database with a registry on it.
async fn start_registry() -> (TestDatabase, Running) {
    let database = TestDatabase::create().await;
    let running = Running::start(&database).await;
    (database, running)
}

async fn finish(database: TestDatabase, running: Running) {
    running.stop().await;
    database.drop().await;
}

/// A reply: status, JSON body (`Null` if it is not JSON), content type.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    body: Value,
    content_type: String,
}

impl Reply {
    fn error_code(&self) -> i64 {
        self.body["error_code"].as_i64().unwrap_or_default()
    }
}

#[derive(Clone)]
struct Http {
    client: reqwest::Client,
    base_url: String,
    credentials: Option<(String, String)>,
}

impl Http {
    /// Sends `body` as is with the Confluent content type (or none when `content_type` is None).
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        content_type: Option<&str>,
    ) -> Reply {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base_url));
        if let Some((user, password)) = &self.credentials {
            request = request.basic_auth(user, Some(password));
        }
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(body) = body {
            request = request.body(body.to_owned());
        }
        let response = request.send().await.expect("the registry answers");
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text().await.expect("reads the body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            body,
            content_type,
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, None, None).await
    }

    async fn delete(&self, path: &str) -> Reply {
        self.send(Method::DELETE, path, None, None).await
    }

    async fn post(&self, path: &str, body: &Value) -> Reply {
        self.send(
            Method::POST,
            path,
            Some(&body.to_string()),
            Some(SCHEMA_REGISTRY_MEDIA_TYPE),
        )
        .await
    }

    async fn put(&self, path: &str, body: &Value) -> Reply {
        self.send(
            Method::PUT,
            path,
            Some(&body.to_string()),
            Some(SCHEMA_REGISTRY_MEDIA_TYPE),
        )
        .await
    }

    /// Registers `schema` under `subject`; the reply as is.
    async fn register(&self, subject: &str, schema: &str) -> Reply {
        self.post(
            &format!("/subjects/{subject}/versions"),
            &json!({ "schema": schema }),
        )
        .await
    }

    /// Registers `schema` under `subject` and returns its id; panics on refusal.
    async fn register_ok(&self, subject: &str, schema: &str) -> i64 {
        let reply = self.register(subject, schema).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        reply.body["id"].as_i64().expect("an id")
    }
}

const ORDER_V1: &str = r#"{"type":"record","name":"OrderPlaced","namespace":"backbone.orders","fields":[{"name":"order_id","type":"string"},{"name":"total_minor","type":"long"}]}"#;
const ORDER_V2_WITH_DEFAULT: &str = r#"{"type":"record","name":"OrderPlaced","namespace":"backbone.orders","fields":[{"name":"order_id","type":"string"},{"name":"total_minor","type":"long"},{"name":"currency","type":"string","default":"EUR"}]}"#;
const ORDER_REQUIRED_FIELD: &str = r#"{"type":"record","name":"OrderPlaced","namespace":"backbone.orders","fields":[{"name":"order_id","type":"string"},{"name":"total_minor","type":"long"},{"name":"customer_id","type":"string"}]}"#;

fn assert_no_server_error(reply: &Reply) {
    assert!(
        !reply.status.is_server_error(),
        "a client mistake got a server error: {reply:?}"
    );
    assert_eq!(
        reply.content_type, SCHEMA_REGISTRY_MEDIA_TYPE,
        "errors are Confluent JSON: {reply:?}"
    );
    assert!(reply.body["message"].is_string(), "{reply:?}");
}

fn assert_error(reply: &Reply, status: u16, error_code: i64) {
    assert_no_server_error(reply);
    assert_eq!(reply.status.as_u16(), status, "{reply:?}");
    assert_eq!(reply.error_code(), error_code, "{reply:?}");
}

// -------------------------------------------------------------------------------------------
// Clients

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_encoded_by_the_rust_converter_decodes_to_the_same_value() {
    let (database, running) = start_registry().await;
    let schema = r#"{
        "type": "record", "name": "DeliveryScheduled", "namespace": "backbone.deliveries",
        "fields": [
            {"name": "delivery_id", "type": "string"},
            {"name": "slot_start_millis", "type": "long"},
            {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["PLANNED", "DONE"]}},
            {"name": "notes", "type": ["null", "string"], "default": null},
            {"name": "items", "type": {"type": "array", "items": "string"}}
        ]
    }"#;
    let strategy = SubjectNameStrategy::TopicRecordNameStrategyWithSchema(
        "deliveries".to_owned(),
        SuppliedSchema::new(
            Some("backbone.deliveries.DeliveryScheduled".to_owned()),
            SchemaType::Avro,
            schema.to_owned(),
        ),
    );
    let fields = vec![
        ("delivery_id", AvroValue::String("d-42".into())),
        ("slot_start_millis", AvroValue::Long(1_700_000_000_000)),
        ("status", AvroValue::Enum(1, "DONE".into())),
        (
            "notes",
            AvroValue::Union(1, Box::new(AvroValue::String("leave at the door".into()))),
        ),
        (
            "items",
            AvroValue::Array(vec![
                AvroValue::String("pizza".into()),
                AvroValue::String("salad".into()),
            ]),
        ),
    ];

    let encoder = AvroEncoder::new(sr_settings(&running.base_url));
    let bytes = encoder
        .encode(fields.clone(), strategy)
        .await
        .expect("encodes through the registry");

    let latest = running
        .client()
        .get("/subjects/deliveries-backbone.deliveries.DeliveryScheduled/versions/latest")
        .await;
    assert_eq!(latest.status, StatusCode::OK, "{latest:?}");
    let id = u32::try_from(latest.body["id"].as_i64().expect("an id")).expect("a u32 id");
    assert_eq!(bytes[0], 0, "magic byte");
    assert_eq!(
        bytes[1..5],
        id.to_be_bytes(),
        "schema id of the wire format"
    );

    // A decoder that never saw the schema fetches it by id.
    let decoder = AvroDecoder::new(sr_settings(&running.base_url));
    let decoded = decoder
        .decode(Some(&bytes))
        .await
        .expect("decodes through the registry");
    let expected = AvroValue::Record(
        fields
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect(),
    );
    assert_eq!(decoded.value, expected);

    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_confluent_clients_work_against_the_registry_unchanged() {
    let (database, running) = start_registry().await;
    let python = std::env::var("BACKBONE_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let url = running.base_url.clone();
    let command = format!("{python} -m pytest -q {}", tests.display());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(&tests)
            .env("SCHEMA_REGISTRY_URL", url)
            .env("SCHEMA_REGISTRY_BASIC_AUTH", format!("{USER}:{PASSWORD}"))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
    })
    .await
    .expect("the runner does not panic")
    .unwrap_or_else(|error| {
        panic!("cannot run `{command}` (set BACKBONE_PYTHON to a Python with tests/python/requirements.txt installed): {error}")
    });
    eprintln!(
        "--- {command}\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "the Python client tests failed ({}): see the output above; a missing package fails too",
        output.status
    );
    finish(database, running).await;
}

// -------------------------------------------------------------------------------------------
// Registration and compatibility

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_the_same_schema_twice_returns_the_same_id() {
    let (database, running) = start_registry().await;
    let http = running.client();
    let first = http.register_ok("orders-value", ORDER_V1).await;
    let second = http.register_ok("orders-value", ORDER_V1).await;
    assert_eq!(first, second);
    assert_eq!(
        http.get("/subjects/orders-value/versions").await.body,
        json!([1])
    );

    // The same schema under another subject keeps its global id, as version 1 there.
    assert_eq!(http.register_ok("archive-value", ORDER_V1).await, first);
    let versions = http.get(&format!("/schemas/ids/{first}/versions")).await;
    assert_eq!(
        versions.body,
        json!([{"subject": "archive-value", "version": 1}, {"subject": "orders-value", "version": 1}])
    );
    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_schema_is_refused_and_a_compatible_one_becomes_version_two() {
    let (database, running) = start_registry().await;
    let http = running.client();
    let v1 = http.register_ok("orders-value", ORDER_V1).await;

    let refused = http.register("orders-value", ORDER_REQUIRED_FIELD).await;
    assert_error(&refused, 409, 409);
    assert!(
        refused.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("customer_id"),
        "the message names the field: {refused:?}"
    );

    let v2 = http
        .register_ok("orders-value", ORDER_V2_WITH_DEFAULT)
        .await;
    assert_ne!(v1, v2);
    let latest = http.get("/subjects/orders-value/versions/latest").await;
    assert_eq!(latest.status, StatusCode::OK);
    assert_eq!(latest.content_type, SCHEMA_REGISTRY_MEDIA_TYPE);
    assert_eq!(latest.body["version"], 2);
    assert_eq!(latest.body["id"], v2);
    assert_eq!(latest.body["subject"], "orders-value");
    assert!(latest.body.get("schemaType").is_none(), "AVRO is implied");
    let schema: Value = serde_json::from_str(latest.body["schema"].as_str().unwrap()).unwrap();
    assert_eq!(
        schema,
        serde_json::from_str::<Value>(ORDER_V2_WITH_DEFAULT).unwrap()
    );
    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compatibility_levels_are_configured_per_subject_with_a_global_fallback() {
    let (database, running) = start_registry().await;
    let http = running.client();
    assert_eq!(
        http.get("/config").await.body,
        json!({"compatibilityLevel": "BACKWARD"})
    );
    http.register_ok("orders-value", ORDER_V1).await;

    // FORWARD: the old schema must read the new data, so a new required field is fine.
    let set = http
        .put("/config", &json!({"compatibility": "forward"}))
        .await;
    assert_eq!(set.body, json!({"compatibility": "FORWARD"}));
    let check = http
        .post(
            "/compatibility/subjects/orders-value/versions/latest?verbose=true",
            &json!({ "schema": ORDER_REQUIRED_FIELD }),
        )
        .await;
    assert_eq!(check.body, json!({"is_compatible": true, "messages": []}));

    // The subject's own level wins over the global one.
    let subject_level = http
        .put(
            "/config/orders-value",
            &json!({"compatibility": "BACKWARD"}),
        )
        .await;
    assert_eq!(subject_level.body, json!({"compatibility": "BACKWARD"}));
    assert_eq!(
        http.get("/config/orders-value").await.body,
        json!({"compatibilityLevel": "BACKWARD"})
    );
    let check = http
        .post(
            "/compatibility/subjects/orders-value/versions/1?verbose=true",
            &json!({ "schema": ORDER_REQUIRED_FIELD }),
        )
        .await;
    assert_eq!(check.body["is_compatible"], false);
    assert_eq!(check.body["messages"].as_array().map(Vec::len), Some(1));
    let quiet = http
        .post(
            "/compatibility/subjects/orders-value/versions/latest",
            &json!({ "schema": ORDER_REQUIRED_FIELD }),
        )
        .await;
    assert_eq!(quiet.body, json!({"is_compatible": false}));

    // Without a subject level: 40408, unless asked for the global one.
    let removed = http.delete("/config/orders-value").await;
    assert_eq!(removed.body, json!({"compatibilityLevel": "BACKWARD"}));
    assert_error(&http.get("/config/orders-value").await, 404, 40408);
    assert_eq!(
        http.get("/config/orders-value?defaultToGlobal=true")
            .await
            .body,
        json!({"compatibilityLevel": "FORWARD"})
    );
    assert_eq!(
        http.register("orders-value", ORDER_REQUIRED_FIELD)
            .await
            .status,
        StatusCode::OK
    );
    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitive_levels_check_every_live_version() {
    let (database, running) = start_registry().await;
    let http = running.client();
    http.put("/config/s", &json!({"compatibility": "FORWARD"}))
        .await;
    let v1 = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"},{"name":"c","type":"int"}]}"#;
    let v2 = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"},{"name":"c","type":"int","default":0}]}"#;
    let v3 = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"}]}"#;
    http.register_ok("s", v1).await;
    http.register_ok("s", v2).await;
    // v1 (c required, no default) cannot read data without c.
    http.put("/config/s", &json!({"compatibility": "FORWARD_TRANSITIVE"}))
        .await;
    assert_error(&http.register("s", v3).await, 409, 409);
    let all = http
        .post(
            "/compatibility/subjects/s/versions",
            &json!({ "schema": v3 }),
        )
        .await;
    assert_eq!(all.body, json!({"is_compatible": false}));
    http.put("/config/s", &json!({"compatibility": "FORWARD"}))
        .await;
    http.register_ok("s", v3).await;
    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_is_looked_up_under_its_subject() {
    let (database, running) = start_registry().await;
    let http = running.client();
    let id = http.register_ok("orders-value", ORDER_V1).await;
    let found = http
        .post("/subjects/orders-value", &json!({ "schema": ORDER_V1 }))
        .await;
    assert_eq!(found.status, StatusCode::OK);
    assert_eq!(found.body["id"], id);
    assert_eq!(found.body["version"], 1);
    assert_eq!(found.body["subject"], "orders-value");
    assert_eq!(found.body["schema"], ORDER_V1);

    let other = http
        .post(
            "/subjects/orders-value",
            &json!({ "schema": ORDER_V2_WITH_DEFAULT }),
        )
        .await;
    assert_error(&other, 404, 40403);
    let no_subject = http
        .post("/subjects/nobody", &json!({ "schema": ORDER_V1 }))
        .await;
    assert_error(&no_subject, 404, 40401);

    assert_eq!(http.get("/subjects").await.body, json!(["orders-value"]));
    assert_eq!(
        http.get(&format!("/schemas/ids/{id}")).await.body,
        json!({ "schema": ORDER_V1 })
    );
    let raw = http.get(&format!("/schemas/ids/{id}/schema")).await;
    assert_eq!(raw.body, serde_json::from_str::<Value>(ORDER_V1).unwrap());
    let raw = http.get("/subjects/orders-value/versions/1/schema").await;
    assert_eq!(raw.body, serde_json::from_str::<Value>(ORDER_V1).unwrap());
    assert_eq!(
        http.get(&format!("/schemas/ids/{id}/subjects")).await.body,
        json!(["orders-value"])
    );
    assert_eq!(http.get("/schemas/types").await.body, json!(["AVRO"]));
    assert_eq!(http.get("/").await.body, json!({}));
    assert_eq!(http.get("/health").await.status, StatusCode::OK);
    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_with_references_is_registered_and_checked_with_them() {
    let (database, running) = start_registry().await;
    let http = running.client();
    let money = r#"{"type":"record","name":"Money","namespace":"backbone","fields":[{"name":"minor","type":"long"},{"name":"currency","type":"string"}]}"#;
    let order = r#"{"type":"record","name":"Order","namespace":"backbone","fields":[{"name":"total","type":"backbone.Money"}]}"#;
    let money_id = http.register_ok("money", money).await;
    let references = json!([{"name": "backbone.Money", "subject": "money", "version": 1}]);
    let registered = http
        .post(
            "/subjects/orders-value/versions",
            &json!({"schema": order, "schemaType": "AVRO", "references": references}),
        )
        .await;
    assert_eq!(registered.status, StatusCode::OK, "{registered:?}");
    let order_id = registered.body["id"].as_i64().unwrap();
    assert_ne!(order_id, money_id);

    let by_id = http.get(&format!("/schemas/ids/{order_id}")).await;
    assert_eq!(by_id.body["references"], references);
    assert_eq!(
        http.get("/subjects/money/versions/1/referencedby")
            .await
            .body,
        json!([order_id])
    );
    // A referenced version cannot be deleted while it is used.
    assert_error(&http.delete("/subjects/money/versions/1").await, 422, 42206);

    // Without its references the schema does not parse.
    assert_error(&http.register("orders-value", order).await, 422, 42201);
    finish(database, running).await;
}

// -------------------------------------------------------------------------------------------
// Bad input

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_confluent_errors_and_never_a_500() {
    let (database, running) = start_registry().await;
    let http = running.client();
    let path = "/subjects/orders-value/versions";
    let media = Some(SCHEMA_REGISTRY_MEDIA_TYPE);

    let not_json = http
        .send(Method::POST, path, Some("{not json"), media)
        .await;
    assert_error(&not_json, 400, 400);
    let empty = http.send(Method::POST, path, Some(""), media).await;
    assert_error(&empty, 400, 400);
    let wrong_shape = http
        .send(Method::POST, path, Some(r#"{"schema": 42}"#), media)
        .await;
    assert_error(&wrong_shape, 422, 422);
    let no_schema = http.send(Method::POST, path, Some("{}"), media).await;
    assert_error(&no_schema, 422, 42201);
    let not_an_object = http.send(Method::POST, path, Some("[1,2]"), media).await;
    assert_error(&not_an_object, 422, 422);
    let config = http
        .send(Method::PUT, "/config", Some("nope"), Some("text/plain"))
        .await;
    assert_error(&config, 400, 400);

    let huge = format!(r#"{{"schema": "{}"}}"#, "x".repeat(3 * 1024 * 1024));
    let too_large = http.send(Method::POST, path, Some(&huge), media).await;
    assert_error(&too_large, 413, 413);

    // Other schema types are refused clearly.
    let protobuf = http
        .post(
            path,
            &json!({"schema": "syntax = \"proto3\";", "schemaType": "PROTOBUF"}),
        )
        .await;
    assert_error(&protobuf, 422, 42201);
    assert!(protobuf.body["message"]
        .as_str()
        .unwrap_or_default()
        .contains("AVRO"));

    // Unknown routes and methods answer in JSON too.
    assert_error(&http.get("/no/such/route").await, 404, 404);
    assert_error(
        &http.send(Method::PATCH, "/config", None, None).await,
        405,
        405,
    );
    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_avro_schema_is_refused_with_42201() {
    let (database, running) = start_registry().await;
    let http = running.client();
    for invalid in [
        r#"{"type":"record","name":"NoFields"}"#,
        r#"{"type":"nosuchtype"}"#,
        r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int","default":"x"}]}"#,
        "not json at all",
    ] {
        let reply = http.register("orders-value", invalid).await;
        assert_error(&reply, 422, 42201);
        let lookup = http
            .post(
                "/compatibility/subjects/orders-value/versions/latest",
                &json!({ "schema": invalid }),
            )
            .await;
        assert_error(&lookup, 422, 42201);
    }
    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_subjects_versions_and_ids_get_40401_40402_and_40403() {
    let (database, running) = start_registry().await;
    let http = running.client();
    assert_error(&http.get("/subjects/nobody/versions").await, 404, 40401);
    assert_error(&http.get("/subjects/nobody/versions/1").await, 404, 40401);
    assert_error(
        &http.get("/subjects/nobody/versions/latest").await,
        404,
        40401,
    );
    assert_error(&http.delete("/subjects/nobody").await, 404, 40401);

    http.register_ok("orders-value", ORDER_V1).await;
    assert_error(
        &http.get("/subjects/orders-value/versions/2").await,
        404,
        40402,
    );
    assert_error(
        &http.get("/subjects/orders-value/versions/2/schema").await,
        404,
        40402,
    );
    assert_error(
        &http.delete("/subjects/orders-value/versions/7").await,
        404,
        40402,
    );

    assert_error(&http.get("/schemas/ids/999999").await, 404, 40403);
    assert_error(&http.get("/schemas/ids/999999/schema").await, 404, 40403);
    assert_error(&http.get("/schemas/ids/999999/subjects").await, 404, 40403);
    assert_error(&http.get("/schemas/ids/abc").await, 404, 40403);
    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_versions_get_42202() {
    let (database, running) = start_registry().await;
    let http = running.client();
    http.register_ok("orders-value", ORDER_V1).await;
    for version in ["0", "-1", "abc", "99999999999"] {
        assert_error(
            &http
                .get(&format!("/subjects/orders-value/versions/{version}"))
                .await,
            422,
            42202,
        );
        assert_error(
            &http
                .delete(&format!("/subjects/orders-value/versions/{version}"))
                .await,
            422,
            42202,
        );
        assert_error(
            &http
                .post(
                    &format!("/compatibility/subjects/orders-value/versions/{version}"),
                    &json!({ "schema": ORDER_V1 }),
                )
                .await,
            422,
            42202,
        );
    }
    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_compatibility_level_gets_42203() {
    let (database, running) = start_registry().await;
    let http = running.client();
    for body in [
        json!({"compatibility": "SIDEWAYS"}),
        json!({"compatibility": ""}),
        json!({}),
    ] {
        assert_error(&http.put("/config", &body).await, 422, 42203);
        assert_error(&http.put("/config/orders-value", &body).await, 422, 42203);
    }
    assert_eq!(
        http.get("/config").await.body,
        json!({"compatibilityLevel": "BACKWARD"})
    );
    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_accepted_with_any_of_the_confluent_content_types_or_none() {
    let (database, running) = start_registry().await;
    let http = running.client();
    let body = json!({ "schema": ORDER_V1 }).to_string();
    let mut ids = Vec::new();
    for content_type in [
        Some("application/vnd.schemaregistry.v1+json"),
        Some("application/vnd.schemaregistry+json"),
        Some("application/json"),
        Some("application/json; charset=utf-8"),
        None,
    ] {
        let reply = http
            .send(
                Method::POST,
                "/subjects/orders-value/versions",
                Some(&body),
                content_type,
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{content_type:?}: {reply:?}");
        assert_eq!(reply.content_type, SCHEMA_REGISTRY_MEDIA_TYPE);
        ids.push(reply.body["id"].clone());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1);
    finish(database, running).await;
}

// -------------------------------------------------------------------------------------------
// Deletes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_are_soft_first_and_permanent_only_after() {
    let (database, running) = start_registry().await;
    let http = running.client();
    let v1 = http.register_ok("orders-value", ORDER_V1).await;
    http.register_ok("orders-value", ORDER_V2_WITH_DEFAULT)
        .await;

    assert_error(
        &http
            .delete("/subjects/orders-value/versions/1?permanent=true")
            .await,
        404,
        40407,
    );
    assert_eq!(
        http.delete("/subjects/orders-value/versions/1").await.body,
        json!(1)
    );
    assert_error(
        &http.delete("/subjects/orders-value/versions/1").await,
        404,
        40406,
    );
    assert_eq!(
        http.get("/subjects/orders-value/versions").await.body,
        json!([2])
    );
    assert_eq!(
        http.get("/subjects/orders-value/versions?deleted=true")
            .await
            .body,
        json!([1, 2])
    );
    assert_error(
        &http.get("/subjects/orders-value/versions/1").await,
        404,
        40402,
    );
    assert_eq!(
        http.get("/subjects/orders-value/versions/1?deleted=true")
            .await
            .body["id"],
        v1
    );
    // Soft-deleted versions keep their ids resolvable: old messages stay readable.
    assert_eq!(
        http.get(&format!("/schemas/ids/{v1}")).await.status,
        StatusCode::OK
    );
    // ... but a lookup does not find them.
    assert_error(
        &http
            .post("/subjects/orders-value", &json!({ "schema": ORDER_V1 }))
            .await,
        404,
        40403,
    );

    assert_error(
        &http.delete("/subjects/orders-value?permanent=true").await,
        404,
        40405,
    );
    assert_eq!(http.delete("/subjects/orders-value").await.body, json!([2]));
    assert_error(&http.delete("/subjects/orders-value").await, 404, 40404);
    assert_eq!(http.get("/subjects").await.body, json!([]));
    assert_eq!(
        http.get("/subjects?deleted=true").await.body,
        json!(["orders-value"])
    );
    assert_error(
        &http.get("/subjects/orders-value/versions/latest").await,
        404,
        40401,
    );

    // Registering a soft-deleted schema again makes it a new version with the same id.
    assert_eq!(http.register_ok("orders-value", ORDER_V1).await, v1);
    assert_eq!(
        http.get("/subjects/orders-value/versions/latest")
            .await
            .body["version"],
        3
    );

    assert_eq!(http.delete("/subjects/orders-value").await.body, json!([3]));
    assert_eq!(
        http.delete("/subjects/orders-value?permanent=true")
            .await
            .body,
        json!([1, 2, 3])
    );
    assert_eq!(http.get("/subjects?deleted=true").await.body, json!([]));
    assert_error(&http.get(&format!("/schemas/ids/{v1}")).await, 404, 40403);
    assert_error(&http.delete("/subjects/orders-value").await, 404, 40401);
    finish(database, running).await;
}

// -------------------------------------------------------------------------------------------
// Ids

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_stable_across_a_restart_of_the_server() {
    let database = TestDatabase::create().await;
    let running = Running::start(&database).await;
    let http = running.client();
    let v1 = http.register_ok("orders-value", ORDER_V1).await;
    let v2 = http
        .register_ok("orders-value", ORDER_V2_WITH_DEFAULT)
        .await;
    http.put("/config/orders-value", &json!({"compatibility": "FULL"}))
        .await;
    running.stop().await;

    let running = Running::start(&database).await;
    let http = running.client();
    assert_eq!(http.register_ok("orders-value", ORDER_V1).await, v1);
    assert_eq!(
        http.register_ok("orders-value", ORDER_V2_WITH_DEFAULT)
            .await,
        v2
    );
    assert_eq!(
        http.get(&format!("/schemas/ids/{v2}")).await.body["schema"],
        ORDER_V2_WITH_DEFAULT
    );
    assert_eq!(
        http.get("/config/orders-value").await.body,
        json!({"compatibilityLevel": "FULL"})
    );
    // A new schema after the restart gets a new id.
    let other = http.register_ok("other-value", ORDER_REQUIRED_FIELD).await;
    assert!(other != v1 && other != v2);
    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_registrations_of_the_same_schema_yield_one_id() {
    let (database, running) = start_registry().await;
    let http = running.client();

    let same_subject = (0..20).map(|_| {
        let http = http.clone();
        tokio::spawn(async move { http.register_ok("orders-value", ORDER_V1).await })
    });
    let many_subjects = (0..20).map(|i| {
        let http = http.clone();
        tokio::spawn(async move { http.register_ok(&format!("subject-{i}"), ORDER_V1).await })
    });
    let tasks: Vec<_> = same_subject.chain(many_subjects).collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.expect("the registration task does not panic"));
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 1, "one id: {ids:?}");
    assert_eq!(
        http.get("/subjects/orders-value/versions").await.body,
        json!([1])
    );
    assert_eq!(
        http.get(&format!("/schemas/ids/{}/subjects", ids[0]))
            .await
            .body
            .as_array()
            .map(Vec::len),
        Some(21)
    );
    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_schema_with_other_whitespace_doc_or_attribute_order_gets_the_same_id() {
    let (database, running) = start_registry().await;
    let http = running.client();
    let id = http.register_ok("orders-value", ORDER_V1).await;
    let reformatted = r#"
        {
            "namespace": "backbone.orders",
            "doc": "An order was placed.",
            "name": "OrderPlaced",
            "type": "record",
            "fields": [
                { "type": "string", "name": "order_id", "doc": "The order." },
                { "name": "total_minor",   "type": "long" }
            ]
        }"#;
    assert_eq!(http.register_ok("orders-value", reformatted).await, id);
    assert_eq!(
        http.get("/subjects/orders-value/versions").await.body,
        json!([1])
    );
    let found = http
        .post("/subjects/orders-value", &json!({ "schema": reformatted }))
        .await;
    assert_eq!(found.body["id"], id);
    // The full name spelled in one piece is the same name.
    let full_name = r#"{"type":"record","name":"backbone.orders.OrderPlaced","fields":[{"name":"order_id","type":"string"},{"name":"total_minor","type":"long"}]}"#;
    assert_eq!(http.register_ok("orders-value", full_name).await, id);
    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_that_differs_by_a_default_or_a_logical_type_gets_a_new_id() {
    let (database, running) = start_registry().await;
    let http = running.client();
    http.put("/config", &json!({"compatibility": "NONE"})).await;
    let plain = r#"{"type":"record","name":"R","fields":[{"name":"at","type":"long"}]}"#;
    let with_default =
        r#"{"type":"record","name":"R","fields":[{"name":"at","type":"long","default":0}]}"#;
    let timestamp = r#"{"type":"record","name":"R","fields":[{"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;
    let ids = [
        http.register_ok("s", plain).await,
        http.register_ok("s", with_default).await,
        http.register_ok("s", timestamp).await,
    ];
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
        "{ids:?}"
    );
    assert_eq!(
        http.get("/subjects/s/versions").await.body,
        json!([1, 2, 3])
    );
    finish(database, running).await;
}

// -------------------------------------------------------------------------------------------
// Access: writes need credentials

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_without_or_with_wrong_credentials_are_refused_with_401_and_change_nothing() {
    let (database, running) = start_registry().await;
    let admin = running.client();
    let subject = "orders-value";
    let v1 = admin.register_ok(subject, ORDER_V1).await;

    for intruder in [
        running.anonymous(None),
        running.anonymous(Some((USER, "guessed-password"))),
        running.anonymous(Some(("someone", PASSWORD))),
    ] {
        for reply in [
            intruder.register(subject, ORDER_REQUIRED_FIELD).await,
            intruder
                .put(
                    &format!("/config/{subject}"),
                    &json!({"compatibility": "NONE"}),
                )
                .await,
            intruder
                .put("/config", &json!({"compatibility": "NONE"}))
                .await,
            intruder.delete(&format!("/subjects/{subject}")).await,
            intruder
                .delete(&format!("/subjects/{subject}?permanent=true"))
                .await,
            intruder
                .delete(&format!("/subjects/{subject}/versions/1"))
                .await,
            intruder.delete(&format!("/config/{subject}")).await,
        ] {
            assert_error(&reply, 401, 401);
        }
        // Reads stay open by default: a consumer decodes without credentials.
        let read = intruder.get(&format!("/schemas/ids/{v1}")).await;
        assert_eq!(read.status, StatusCode::OK, "{read:?}");
        let lookup = intruder
            .post(
                &format!("/subjects/{subject}"),
                &json!({"schema": ORDER_V1}),
            )
            .await;
        assert_eq!(lookup.status, StatusCode::OK, "{lookup:?}");
    }

    // Nothing changed: one version, the default compatibility, the subject still there.
    let versions = admin.get(&format!("/subjects/{subject}/versions")).await;
    assert_eq!(versions.body, json!([1]), "{versions:?}");
    let config = admin.get("/config").await;
    assert_eq!(config.body["compatibilityLevel"], "BACKWARD", "{config:?}");
    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_with_closed_reads_asks_every_client_but_health_for_credentials() {
    let database = TestDatabase::create().await;
    let running = Running::start_with(&database, false).await;
    let id = running.client().register_ok("orders-value", ORDER_V1).await;
    let anonymous = running.anonymous(None);
    assert_error(
        &anonymous.get(&format!("/schemas/ids/{id}")).await,
        401,
        401,
    );
    assert_error(&anonymous.get("/subjects").await, 401, 401);
    assert_eq!(anonymous.get("/health").await.status, StatusCode::OK);
    let read = running.client().get(&format!("/schemas/ids/{id}")).await;
    assert_eq!(read.status, StatusCode::OK, "{read:?}");
    finish(database, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_does_not_start_without_credentials_for_writes() {
    let database = TestDatabase::create().await;
    for basic_auth in [None, Some("no-colon".to_owned()), Some("user:".to_owned())] {
        let refused = RegistryServer::build(RegistryConfig {
            database_url: database.url.clone(),
            db_schema: "schema_registry".to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            basic_auth,
            anonymous_reads: true,
        })
        .await;
        assert!(
            matches!(refused, Err(RegistryError::MissingCredentials)),
            "{refused:?}"
        );
    }
    database.drop().await;
}
