//! Customers' personal data (delivery address text, contact) is recorded only as ciphertext
//! sealed with a per-customer key, and erasing the customer (deleting the key) makes it
//! unreadable everywhere (audit history, exports from the store and the topics, replays) while
//! the events, their hash chain and their non-personal fields stay as they were. Run against the
//! real API, relay, broker and registry, the CLI as a child process (`cargo build --bins` first).

use std::path::PathBuf;
use std::process::Output;

use backbone_tests::tools::{
    everything_published, raw_records, read_jsonl, read_parquet, replay_tools,
};
use backbone_tests::{client, order_request, place_request, TestEnv};
use serde_json::{json, Value};
use uuid::Uuid;

/// One customer's personal data, distinctive enough to be searched for in raw bytes.
struct Person {
    customer: Uuid,
    line1: String,
    line2: String,
    city: String,
    postcode: String,
    name: String,
    phone: String,
    email: String,
}

impl Person {
    fn new(tag: &str) -> Self {
        Self {
            customer: Uuid::new_v4(),
            line1: format!("{tag} 7 Privet Drive"),
            line2: format!("{tag} cupboard under the stairs"),
            city: format!("{tag} Little Whinging"),
            postcode: format!("{tag} KT22"),
            name: format!("{tag} Harriet Potter"),
            phone: "+44 (1632) 960-123".to_owned(),
            email: format!("{}@example.org", tag.to_lowercase()),
        }
    }

    /// Every personal string, as given.
    fn strings(&self) -> [&str; 7] {
        [
            &self.line1,
            &self.line2,
            &self.city,
            &self.postcode,
            &self.name,
            &self.phone,
            &self.email,
        ]
    }

    fn order_request(&self) -> Value {
        let mut request = order_request(self.customer);
        request["delivery_address"] = json!({
            "line1": self.line1, "line2": self.line2, "city": self.city,
            "postcode": self.postcode, "latitude": 51.5, "longitude": -0.1
        });
        request["contact"] = json!({"name": self.name, "phone": self.phone, "email": self.email});
        request
    }

    /// The personal fields of an `OrderPlaced` payload as shown to people.
    fn shown(payload: &Value) -> Vec<Value> {
        let address = &payload["delivery_address"];
        let contact = &payload["contact"];
        vec![
            address["line1"].clone(),
            address["line2"].clone(),
            address["city"].clone(),
            address["postcode"].clone(),
            contact["name"].clone(),
            contact["phone"].clone(),
            contact["email"].clone(),
        ]
    }

    fn as_given(&self) -> Vec<Value> {
        self.strings().iter().map(|s| json!(s)).collect()
    }
}

fn erased() -> Vec<Value> {
    vec![json!("[erased]"); 7]
}

/// The stored payload texts of the order events, as PostgreSQL holds them.
async fn raw_payloads(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT payload::text FROM events WHERE aggregate_type = 'order' ORDER BY aggregate_id",
    )
    .fetch_all(env.pool())
    .await
    .expect("events")
}

fn ok(output: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placed_orders_keep_customer_pii_only_as_ciphertext_in_the_store_and_the_topics() {
    let env = TestEnv::start("privacy_sealed").await;
    let relay = env.start_relay().await;
    let (api, server) = env.start_api().await;
    let client = client();
    let person = Person::new("Sealed");
    let order = place_request(&client, &api, &person.order_request()).await;
    everything_published(&env, 1).await;

    // The store: envelopes of this customer, no plaintext, the coordinates plain.
    let stored = raw_payloads(&env).await;
    assert_eq!(stored.len(), 1);
    let envelope = format!("pii:v1:{}:", person.customer);
    for text in &stored {
        for plaintext in person.strings() {
            assert!(
                !text.contains(plaintext),
                "`{plaintext}` stored in clear: {text}"
            );
        }
        assert_eq!(text.matches(&envelope).count(), 7, "{text}");
        assert!(text.contains("51.5"), "{text}");
    }

    // The topic: the raw Avro bytes hold no plaintext either.
    let topic = env
        .kafka
        .topics()
        .for_aggregate("order")
        .expect("orders topic");
    let records = raw_records(&env, &topic, 1).await;
    for record in &records {
        let bytes = rdkafka::Message::payload(record).expect("a value");
        for plaintext in person.strings() {
            assert!(!contains(bytes, plaintext), "`{plaintext}` on the topic");
        }
        assert!(contains(bytes, &envelope), "no envelope on the topic");
    }

    // People who may see it see the plaintext: the auditors' history.
    let history: Value = client
        .get(format!("{api}/audit/order/{order}/events"))
        .send()
        .await
        .expect("history")
        .json()
        .await
        .expect("json");
    assert_eq!(
        Person::shown(&history["events"][0]["payload"]),
        person.as_given()
    );

    // Erasure requests are strict; a refused one erases nothing.
    let customer = person.customer;
    for (path, body, status) in [
        ("not-a-uuid".to_owned(), json!({"reason": "r"}), 400),
        (customer.to_string(), json!({"reason": "  "}), 422),
        (
            customer.to_string(),
            json!({"reason": "x".repeat(501)}),
            422,
        ),
        (
            customer.to_string(),
            json!({"reason": "r", "by": "me"}),
            422,
        ),
        (customer.to_string(), json!({}), 422),
    ] {
        let response = client
            .post(format!("{api}/admin/customers/{path}/erasure"))
            .json(&body)
            .send()
            .await
            .expect("erasure sent");
        assert_eq!(response.status().as_u16(), status, "{path} {body}");
        assert_eq!(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/problem+json")
        );
    }
    let again: Value = client
        .get(format!("{api}/audit/order/{order}/events"))
        .send()
        .await
        .expect("history")
        .json()
        .await
        .expect("json");
    assert_eq!(
        Person::shown(&again["events"][0]["payload"]),
        person.as_given()
    );

    // The erasure endpoint is documented with every answer it gives.
    let doc: Value = client
        .get(format!("{api}/openapi.json"))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    let responses = &doc["paths"]["/admin/customers/{customer_id}/erasure"]["post"]["responses"];
    for status in ["200", "400", "413", "415", "422"] {
        assert!(responses.get(status).is_some(), "{status} in {responses}");
    }
    assert!(doc["paths"]["/orders"]["post"]["responses"]
        .get("409")
        .is_some());

    server.stop().await.expect("api stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("backbone-{name}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The `OrderPlaced` payload of `order` in exported rows.
fn placed<'a>(rows: &'a [Value], order: &str) -> &'a Value {
    &rows
        .iter()
        .find(|r| r["aggregate_id"] == json!(order) && r["event_type"] == json!("OrderPlaced"))
        .unwrap_or_else(|| panic!("OrderPlaced of {order} exported"))["payload"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasing_a_customer_makes_their_pii_unreadable_in_exports_and_replays_while_verify_passes()
{
    let env = TestEnv::start("privacy_erase").await;
    let relay = env.start_relay().await;
    let (api, server) = env.start_api().await;
    let client = client();
    let (gone, kept) = (Person::new("Gone"), Person::new("Kept"));
    let gone_order = place_request(&client, &api, &gone.order_request()).await;
    let kept_order = place_request(&client, &api, &kept.order_request()).await;
    everything_published(&env, 2).await;
    let dir = tempdir("privacy");
    let out = |name: &str| dir.join(name).to_str().expect("utf-8 path").to_owned();
    let export = |source: &'static str, format: &'static str, file: String| {
        let env = &env;
        async move {
            let args = [
                "export", "--source", source, "--format", format, "--out", &file,
            ];
            ok(&replay_tools(env, &args, &[]).await, &format!("{args:?}"));
        }
    };

    // Before: both customers' data in clear in the exports.
    export("store", "jsonl", out("before.jsonl")).await;
    export("store", "parquet", out("before.parquet")).await;
    let jsonl = read_jsonl(&dir.join("before.jsonl"));
    let (_, parquet, _) = read_parquet(&dir.join("before.parquet"));
    for rows in [&jsonl, &parquet] {
        assert_eq!(Person::shown(placed(rows, &gone_order)), gone.as_given());
        assert_eq!(Person::shown(placed(rows, &kept_order)), kept.as_given());
    }
    let stored_before = raw_payloads(&env).await;

    // Erase one of them.
    let erasure = |customer: Uuid| {
        client
            .post(format!("{api}/admin/customers/{customer}/erasure"))
            .json(&json!({"reason": "GDPR art. 17 request #4711"}))
            .send()
    };
    let response = erasure(gone.customer).await.expect("erasure sent");
    assert_eq!(response.status().as_u16(), 200);
    let first: Value = response.json().await.expect("json");
    assert_eq!(first["customer_id"], json!(gone.customer));
    assert_eq!(first["already_erased"], json!(false));

    // After: `[erased]` for that customer everywhere, plaintext for the other; the rest of the
    // event (money, coordinates) as before.
    for (source, format, file) in [
        ("store", "jsonl", "after.jsonl"),
        ("store", "parquet", "after.parquet"),
        ("topics", "jsonl", "topics.jsonl"),
        ("topics", "parquet", "topics.parquet"),
    ] {
        export(source, format, out(file)).await;
        let rows = if format == "jsonl" {
            read_jsonl(&dir.join(file))
        } else {
            read_parquet(&dir.join(file)).1
        };
        let payload = placed(&rows, &gone_order);
        assert_eq!(Person::shown(payload), erased(), "{source} {format}");
        assert_eq!(payload["delivery_address"]["latitude"], json!(51.5));
        assert_eq!(
            payload["total"],
            placed(&jsonl, &gone_order)["total"],
            "{source} {format}"
        );
        assert_eq!(
            Person::shown(placed(&rows, &kept_order)),
            kept.as_given(),
            "{source} {format}"
        );
    }
    // A replay of the order as of now, and the auditors' history (CLI and API).
    let now = chrono::Utc::now().to_rfc3339();
    for (order, person, expected) in [
        (&gone_order, &gone, erased()),
        (&kept_order, &kept, kept.as_given()),
    ] {
        let replayed: Value = serde_json::from_str(&ok(
            &replay_tools(&env, &["as-of", "order", order, &now], &[]).await,
            "as-of",
        ))
        .expect("as-of prints JSON");
        assert_eq!(Person::shown(&replayed["state"]), expected, "as-of");
        assert_eq!(replayed["state"]["customer_id"], json!(person.customer));
        let history = ok(
            &replay_tools(&env, &["history", "order", order], &[]).await,
            "history",
        );
        let line: Value = serde_json::from_str(history.lines().next().expect("a line"))
            .expect("history prints JSON lines");
        assert_eq!(Person::shown(&line["payload"]), expected, "history");
        let audit: Value = client
            .get(format!("{api}/audit/order/{order}/events"))
            .send()
            .await
            .expect("audit history")
            .json()
            .await
            .expect("json");
        assert_eq!(
            Person::shown(&audit["events"][0]["payload"]),
            expected,
            "audit API"
        );
    }

    // No event changed: the stored payloads are byte for byte the same, and the chain verifies.
    assert_eq!(raw_payloads(&env).await, stored_before);
    ok(&replay_tools(&env, &["verify"], &[]).await, "verify");

    // Nothing personal is recorded for the erased customer again.
    let refused = client
        .post(format!("{api}/orders"))
        .json(&gone.order_request())
        .send()
        .await
        .expect("order sent");
    assert_eq!(refused.status().as_u16(), 409);
    let problem: Value = refused.json().await.expect("problem json");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("erased")),
        "{problem}"
    );
    place_request(&client, &api, &kept.order_request()).await;

    // Erasing again changes nothing and says so (API and CLI).
    let again: Value = erasure(gone.customer)
        .await
        .expect("erasure sent")
        .json()
        .await
        .expect("json");
    assert_eq!(again["already_erased"], json!(true));
    assert_eq!(again["erased_at"], first["erased_at"]);
    let cli: Value = serde_json::from_str(&ok(
        &replay_tools(
            &env,
            &[
                "erase-customer",
                &gone.customer.to_string(),
                "--reason",
                "duplicate request",
            ],
            &[],
        )
        .await,
        "erase-customer",
    ))
    .expect("erase-customer prints JSON");
    assert_eq!(cli["already_erased"], json!(true));

    let _ = std::fs::remove_dir_all(&dir);
    server.stop().await.expect("api stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}
