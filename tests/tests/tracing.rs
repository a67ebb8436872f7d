//! One trace per order, read back from a collector nobody here wrote (Jaeger, built from the Go
//! module proxy by `scripts/test`): every component a separate process exporting over OTLP, a
//! client that sends a `traceparent` when it places the order and none afterwards (as a store's
//! and a courier's apps would not know it), and the whole lifecycle, placed to Completed, in the
//! one trace: a span per command (the client's and the process manager's), per publication and
//! per projection, from the API, the relay, the projector and the process manager, connected
//! parent to child.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use backbone_tests::load::{free_port, Backbone};
use backbone_tests::{client_as, eventually, order_request, KillOnDrop, Role};
use serde_json::{json, Value};
use sqlx::Row;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

/// A Jaeger (v2) of the test's own: OTLP/HTTP in, query API out, traces in memory.
struct Jaeger {
    otlp: String,
    query: String,
    _process: KillOnDrop,
}

impl Jaeger {
    async fn start() -> Self {
        let binary = std::env::var("JAEGER_BIN").expect(
            "JAEGER_BIN names the Jaeger binary: run the tests through scripts/test, which builds it",
        );
        let config = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/jaeger/config.yaml"
        ));
        let (otlp, query, grpc, health) = (free_port(), free_port(), free_port(), free_port());
        let child: Child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .env("JAEGER_OTLP_HTTP_PORT", otlp.to_string())
            .env("JAEGER_QUERY_PORT", query.to_string())
            .env("JAEGER_QUERY_GRPC_PORT", grpc.to_string())
            .env("JAEGER_HEALTH_PORT", health.to_string())
            // Jaeger's own exporter gives up at once (it is not pointed anywhere).
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("OTEL_EXPORTER_OTLP_TIMEOUT", "500")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(std::env::temp_dir().join(format!("jaeger-{otlp}.log")))
                    .expect("Jaeger's log"),
            )
            .spawn()
            .expect("Jaeger starts");
        let jaeger = Self {
            otlp: format!("http://127.0.0.1:{otlp}"),
            query: format!("http://127.0.0.1:{query}"),
            _process: KillOnDrop(child),
        };
        eventually(WAIT, "Jaeger to answer", || async {
            let services = reqwest::get(format!("{}/api/services", jaeger.query))
                .await
                .ok()?;
            services.status().is_success().then_some(())
        })
        .await;
        jaeger
    }

    /// The trace `trace_id` as Jaeger serves it (`None` until it has it).
    async fn trace(&self, trace_id: &str) -> Option<Trace> {
        let body: Value = reqwest::get(format!("{}/api/traces/{trace_id}", self.query))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        Trace::of(body["data"].get(0)?)
    }
}

/// One span as Jaeger reports it.
#[derive(Debug, Clone)]
struct Span {
    id: String,
    parents: Vec<String>,
    name: String,
    service: String,
    tags: HashMap<String, String>,
}

#[derive(Debug)]
struct Trace {
    spans: Vec<Span>,
}

impl Trace {
    fn of(trace: &Value) -> Option<Self> {
        let services: HashMap<&str, &str> = trace["processes"]
            .as_object()?
            .iter()
            .filter_map(|(id, p)| Some((id.as_str(), p["serviceName"].as_str()?)))
            .collect();
        let spans = trace["spans"]
            .as_array()?
            .iter()
            .map(|span| Span {
                id: span["spanID"].as_str().unwrap_or_default().to_owned(),
                parents: span["references"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| r["refType"] == "CHILD_OF")
                    .filter_map(|r| r["spanID"].as_str().map(str::to_owned))
                    .collect(),
                name: span["operationName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                service: span["processID"]
                    .as_str()
                    .and_then(|p| services.get(p))
                    .unwrap_or(&"")
                    .to_string(),
                tags: span["tags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| {
                        let value = match &t["value"] {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        Some((t["key"].as_str()?.to_owned(), value))
                    })
                    .collect(),
            })
            .collect();
        Some(Self { spans })
    }

    fn names_of(&self, service: &str) -> BTreeMap<String, usize> {
        let mut names = BTreeMap::new();
        for span in self.spans.iter().filter(|s| s.service == service) {
            *names.entry(span.name.clone()).or_default() += 1;
        }
        names
    }

    fn count(&self, service: &str, name: &str) -> usize {
        self.spans
            .iter()
            .filter(|s| s.service == service && s.name == name)
            .count()
    }
}

/// A random W3C `traceparent` (sampled), as a client's own tracer would send.
fn client_traceparent() -> (String, String) {
    let trace_id = Uuid::new_v4().simple().to_string();
    let span_id = Uuid::new_v4().simple().to_string()[..16].to_owned();
    (format!("00-{trace_id}-{span_id}-01"), trace_id)
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let response = client.post(url).json(&body).send().await.expect("sent");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn placing_and_completing_an_order_is_one_trace_across_the_api_relay_projector_and_process_manager(
) {
    let jaeger = Jaeger::start().await;
    let catalogue = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../domain/catalogue/demo.json"
    ));
    let backbone = Backbone::start_with(
        &catalogue,
        &[("API_RATE_LIMIT_PER_SECOND", "0".to_owned())],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", jaeger.otlp.clone()),
            // Spans reach Jaeger within a fraction of a second, so the test waits little.
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ],
    )
    .await;
    let api = backbone.api.clone();

    // The customer's app places the order inside its own trace.
    let customer = Uuid::new_v4();
    let (traceparent, trace_id) = client_traceparent();
    let placed: Value = client_as(Role::Customer, customer)
        .post(format!("{api}/orders"))
        .header("traceparent", &traceparent)
        .json(&order_request(customer))
        .send()
        .await
        .expect("placed")
        .json()
        .await
        .expect("json");
    let order_id = placed["order_id"].as_str().expect("an order id").to_owned();

    // The store, dispatch and the courier act without any trace context of theirs.
    let admin = backbone_tests::client();
    let status = |wanted: &'static str| {
        let (admin, api, order_id) = (admin.clone(), api.clone(), order_id.clone());
        async move {
            eventually(
                WAIT,
                &format!("order {order_id} to be {wanted}"),
                || async {
                    let view: Value = admin
                        .get(format!("{api}/orders/{order_id}/tracking"))
                        .send()
                        .await
                        .ok()?
                        .json()
                        .await
                        .ok()?;
                    (view["status"] == wanted).then_some(())
                },
            )
            .await;
        }
    };
    status("Confirmed").await;
    for action in [
        json!({"action": "accept", "estimated_preparation_minutes": 10}),
        json!({"action": "start_preparation"}),
        json!({"action": "mark_ready"}),
    ] {
        let (code, body) = post(&admin, format!("{api}/orders/{order_id}/actions"), action).await;
        assert_eq!(code, 200, "{body}");
    }
    let courier = Uuid::new_v4();
    eventually(WAIT, "the delivery to be requested", || async {
        let (code, _) = post(
            &admin,
            format!("{api}/deliveries/{order_id}/actions"),
            json!({"action": "assign_courier", "courier_id": courier}),
        )
        .await;
        (code == 200).then_some(())
    })
    .await;
    for action in [
        json!({"action": "pick_up"}),
        json!({"action": "update_location", "latitude": 51.51, "longitude": -0.12,
               "device_time": chrono::Utc::now()}),
        json!({"action": "deliver"}),
    ] {
        let (code, body) = post(
            &admin,
            format!("{api}/deliveries/{order_id}/actions"),
            action,
        )
        .await;
        assert_eq!(code, 200, "{body}");
    }
    status("Completed").await;

    // Every event the order caused, on every aggregate, was appended in the client's trace.
    let rows = sqlx::query(
        "SELECT aggregate_type, event_type, metadata->>'traceparent' AS traceparent FROM events \
         WHERE aggregate_id = $1 ORDER BY recorded_at",
    )
    .bind(&order_id)
    .fetch_all(&backbone.pool)
    .await
    .expect("events");
    let events: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.get("aggregate_type"), r.get("event_type")))
        .collect();
    let kinds: BTreeSet<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["delivery", "order", "payment"]),
        "{events:?}"
    );
    for row in &rows {
        let trace: Option<String> = row.get("traceparent");
        let event: String = row.get("event_type");
        let trace = trace.unwrap_or_else(|| panic!("{event} carries no traceparent"));
        assert_eq!(&trace[3..35], trace_id, "{event} is in another trace");
    }

    // Jaeger holds the whole lifecycle in that trace: each command, each publication, each
    // projection (tracking reads orders and deliveries; the flow reads all three), from the
    // four processes, every span's parent in the trace (the root's is the client's span).
    let client_span = &traceparent[36..52];
    let commands = events.len(); // at least one command per event's aggregate step
    let order_events: Vec<&str> = events
        .iter()
        .filter(|(t, _)| t == "order")
        .map(|(_, e)| e.as_str())
        .collect();
    let trace = eventually(WAIT, "the whole lifecycle in Jaeger", || async {
        let trace = jaeger.trace(&trace_id).await?;
        let published = trace.count("relay", &format!("publish {}", "OrderCompleted"));
        let flow_saw_completion =
            trace.count("process-manager", "project order_flow OrderCompleted");
        let tracked = trace.count("projector", "project tracking OrderCompleted");
        (published == 1
            && flow_saw_completion == 1
            && tracked == 1
            && trace
                .spans
                .iter()
                .filter(|s| s.name.starts_with("publish "))
                .count()
                >= events.len())
        .then_some(trace)
    })
    .await;

    for (aggregate_type, event_type) in &events {
        assert_eq!(
            trace.count("relay", &format!("publish {event_type}")),
            events.iter().filter(|(_, e)| e == event_type).count(),
            "one publication per {aggregate_type} event {event_type}: {:?}",
            trace.names_of("relay")
        );
        assert!(
            trace.count(
                "process-manager",
                &format!("project order_flow {event_type}")
            ) >= 1,
            "the process manager's projection of {event_type}: {:?}",
            trace.names_of("process-manager")
        );
    }
    for event_type in &order_events {
        assert!(
            trace.count("projector", &format!("project tracking {event_type}")) >= 1,
            "tracking's projection of {event_type}: {:?}",
            trace.names_of("projector")
        );
    }
    // The client's commands (the API) and the flow's (the process manager) are all here.
    let api_commands: Vec<&Span> = trace
        .spans
        .iter()
        .filter(|s| s.service == "api" && s.name.starts_with("command "))
        .collect();
    let api_events: BTreeSet<&str> = api_commands
        .iter()
        .filter_map(|s| s.tags.get("events").map(String::as_str))
        .collect();
    for expected in [
        "OrderPlaced",
        "OrderAccepted",
        "PreparationStarted",
        "OrderReady",
        "CourierAssigned",
        "PickedUpAtStore",
        "CourierLocationUpdated",
        "DeliveredToCustomer",
    ] {
        assert!(
            api_events
                .iter()
                .any(|e| e.split(',').any(|x| x == expected)),
            "the API's command that appended {expected} is in the trace: {api_events:?}"
        );
    }
    let flow_commands = trace
        .spans
        .iter()
        .filter(|s| s.service == "process-manager" && s.name.starts_with("command "))
        .count();
    assert!(
        flow_commands >= 3,
        "the process manager's commands (payment, delivery, completion) are in the trace: {:?}",
        trace.names_of("process-manager")
    );
    assert!(trace.spans.len() >= commands, "{} spans", trace.spans.len());
    // The request that placed the order continues the client's span.
    let placing = trace
        .spans
        .iter()
        .find(|s| s.service == "api" && s.name == "POST /orders")
        .expect("the placing request's span");
    assert_eq!(placing.parents, vec![client_span.to_owned()]);
    // Connected: every other span's parent is a span of this trace.
    let ids: BTreeSet<&str> = trace.spans.iter().map(|s| s.id.as_str()).collect();
    for span in &trace.spans {
        for parent in &span.parents {
            assert!(
                parent == client_span || ids.contains(parent.as_str()),
                "{} ({}) has a parent outside the trace",
                span.name,
                span.service
            );
        }
        assert!(
            !span.parents.is_empty(),
            "{} ({}) starts a tree of its own",
            span.name,
            span.service
        );
    }

    backbone.stop().await;
}
