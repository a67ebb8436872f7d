//! The same binaries against a broker that wants what a managed cluster wants (Confluent Cloud,
//! MSK): TLS with a certificate the client must verify, and SASL/PLAIN credentials, configured
//! only through `KAFKA_BOOTSTRAP_SERVERS` and `KAFKA_PROPERTIES`. `scripts/test` gives the test
//! broker such a listener (`KAFKA_SASL_SSL_BOOTSTRAP`, CA in `KAFKA_SASL_SSL_CA`).

use std::time::Duration;

use backbone_tests::{eventually, place_order, KillOnDrop, TestEnv};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

const WAIT: Duration = Duration::from_secs(60);
/// The SASL password `scripts/test` gives the broker (test-only).
const PASSWORD: &str = "backbone-tests-only-sasl-password";

fn listener() -> (String, String) {
    let bootstrap = std::env::var("KAFKA_SASL_SSL_BOOTSTRAP")
        .expect("KAFKA_SASL_SSL_BOOTSTRAP: run the tests through scripts/test");
    let ca = std::env::var("KAFKA_SASL_SSL_CA").expect("KAFKA_SASL_SSL_CA");
    (bootstrap, ca)
}

/// `KAFKA_PROPERTIES` as an operator writes it for a managed cluster.
fn managed_properties(ca: &str, password: &str) -> String {
    format!(
        "security.protocol=SASL_SSL;sasl.mechanisms=PLAIN;sasl.username=backbone;\
         sasl.password={password};ssl.ca.location={ca}"
    )
}

/// What a plain librdkafka client makes of the listener with `properties`: the broker count,
/// or the error.
fn metadata(bootstrap: &str, properties: &[(&str, &str)]) -> Result<usize, String> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    for (key, value) in properties {
        config.set(*key, *value);
    }
    let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
    consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map(|m| m.brokers().len())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn the_relay_and_a_projector_run_over_sasl_ssl_configured_by_kafka_properties_alone() {
    let (bootstrap, ca) = listener();
    let env = TestEnv::start("tls").await;
    let properties = managed_properties(&ca, PASSWORD);
    let managed = [
        ("KAFKA_BOOTSTRAP_SERVERS", bootstrap.as_str()),
        ("KAFKA_PROPERTIES", properties.as_str()),
    ];
    let _relay = KillOnDrop(env.spawn_process("relay", &managed));
    let mut projector_env = managed.to_vec();
    projector_env.push(("PROJECTIONS", "tracking"));
    let _projector = KillOnDrop(env.spawn_process("projector", &projector_env));

    // An order goes store → relay → topic → projector → tracking row, every hop to the broker
    // over TLS with SASL.
    let orders = env.orders();
    let order_id = place_order(&orders).await;
    let status: String = eventually(WAIT, "the order's tracking row", || async {
        sqlx::query_scalar::<_, String>("SELECT status FROM tracking.orders WHERE order_id = $1")
            .bind(&order_id)
            .fetch_optional(env.pool())
            .await
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(status, "Placed");
    let published: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE aggregate_id = $1 AND published_at IS NOT NULL",
    )
    .bind(&order_id)
    .fetch_one(env.pool())
    .await
    .expect("outbox");
    assert_eq!(published, 1, "the relay published the placement");
    env.stop().await;
}

#[test]
fn the_listener_wants_the_certificate_verified_and_the_credentials_right() {
    let (bootstrap, ca) = listener();
    let base = [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanisms", "PLAIN"),
        ("sasl.username", "backbone"),
    ];
    let with = |extra: &[(&'static str, &str)]| {
        let mut all: Vec<(&str, &str)> = base.to_vec();
        all.extend_from_slice(extra);
        metadata(&bootstrap, &all)
    };
    assert_eq!(
        with(&[
            ("sasl.password", PASSWORD),
            ("ssl.ca.location", ca.as_str())
        ]),
        Ok(1),
        "the right CA and password"
    );
    let wrong_password = with(&[
        ("sasl.password", "not-it"),
        ("ssl.ca.location", ca.as_str()),
    ]);
    assert!(wrong_password.is_err(), "{wrong_password:?}");
    // Without the CA, the broker's certificate does not verify against the system's roots.
    let unverified = with(&[("sasl.password", PASSWORD)]);
    assert!(unverified.is_err(), "{unverified:?}");
    // Plaintext to the TLS port gets nowhere.
    let plaintext = metadata(&bootstrap, &[]);
    assert!(plaintext.is_err(), "{plaintext:?}");
}
