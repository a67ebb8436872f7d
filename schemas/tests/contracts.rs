//! Every event type round-trips through its Avro contract, the contracts stay BACKWARD
//! compatible with their released history, and old stored shapes are upcast.

mod common;

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use chrono::{DateTime, TimeZone, Utc};
use domain::order::{CancelledBy, Contact, DeliveryAddress, OrderEvent, RejectionReason};
use domain::services::PricedLine;
use domain::{Currency, CustomerId, MenuItemId, Money, RegionCode, StoreId};
use schemas::{upcast, Contracts};

fn at() -> DateTime<Utc> {
    Utc.timestamp_micros(1_795_000_000_123_456)
        .single()
        .expect("valid instant")
}

fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::parse("EUR").expect("EUR")).expect("non-negative")
}

fn order_samples() -> Vec<OrderEvent> {
    vec![
        OrderEvent::OrderPlaced {
            customer_id: CustomerId::new(),
            store_id: StoreId::new(),
            region: RegionCode::parse("de-berlin").expect("valid"),
            lines: vec![PricedLine {
                item_id: MenuItemId::parse("margherita").expect("valid"),
                name: "Margherita".to_owned(),
                category: "pizza".to_owned(),
                quantity: 2,
                options: vec!["extra-cheese".to_owned()],
                unit_price: eur(1_150),
                line_total: eur(2_300),
            }],
            subtotal: eur(2_300),
            discount: eur(0),
            tax: eur(437),
            delivery_fee: eur(199),
            total: eur(2_936),
            delivery_address: DeliveryAddress {
                line1: "Unter den Linden 1".to_owned(),
                line2: Some("3rd floor".to_owned()),
                city: "Berlin".to_owned(),
                postcode: "10117".to_owned(),
                latitude: 52.517,
                longitude: 13.389,
            },
            accept_by: at(),
            rating_window_days: 7,
            points_redeemed: 250,
            promotion_code: Some("WELCOME10".to_owned()),
            free_delivery: true,
            contact: Some(Contact {
                name: "Ada Lovelace".to_owned(),
                phone: Some("+49 30 1234567".to_owned()),
                email: None,
            }),
            placed_at: at(),
        },
        OrderEvent::OrderConfirmed {
            payment_reference: "pay_123".to_owned(),
            confirmed_at: at(),
        },
        OrderEvent::OrderAccepted {
            estimated_preparation_minutes: 12,
            accepted_at: at(),
        },
        OrderEvent::OrderRejected {
            reason: RejectionReason::ItemUnavailable,
            rejected_at: at(),
        },
        OrderEvent::PreparationStarted { started_at: at() },
        OrderEvent::OrderReady { ready_at: at() },
        OrderEvent::OrderOutForDelivery { departed_at: at() },
        OrderEvent::OrderDelivered { delivered_at: at() },
        OrderEvent::OrderCompleted { completed_at: at() },
        OrderEvent::OrderCancelled {
            cancelled_by: CancelledBy::Store,
            reason: "oven broke".to_owned(),
            cancelled_at: at(),
        },
        OrderEvent::OrderRated {
            stars: 4,
            comment: None,
            rated_at: at(),
        },
        OrderEvent::OrderModified {
            lines: vec![PricedLine {
                item_id: MenuItemId::parse("margherita").expect("valid"),
                name: "Margherita".to_owned(),
                category: "pizza".to_owned(),
                quantity: 1,
                options: vec![],
                unit_price: eur(1_050),
                line_total: eur(1_050),
            }],
            subtotal: eur(1_050),
            discount: eur(0),
            tax: eur(200),
            delivery_fee: eur(199),
            total: eur(1_449),
            modified_at: at(),
        },
    ]
}

#[test]
fn every_order_event_type_has_exactly_one_contract_and_a_sample() {
    common::assert_every_event_type_has_a_contract("order", &OrderEvent::TYPES, &order_samples());
}

#[test]
fn every_order_event_round_trips_through_avro_bytes() {
    common::assert_round_trips("order", order_samples());
}

#[test]
fn a_field_the_contract_does_not_know_is_refused_not_dropped() {
    let contracts = Contracts::load().expect("contracts parse");
    let payload =
        serde_json::json!({"OrderReady": {"ready_at": "2026-11-21T18:00:00Z", "oven": 3}});
    let err = contracts
        .payload_to_avro("order", &payload)
        .expect_err("unknown field refused");
    assert!(err.to_string().contains("oven"), "{err}");
    let unknown = serde_json::json!({"OrderTeleported": {}});
    assert!(contracts.payload_to_avro("order", &unknown).is_err());
}

#[test]
fn every_contract_can_read_every_released_version_of_itself() {
    let contracts = Contracts::load().expect("contracts parse");
    let history = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("avro/history");
    let mut checked = 0;
    for aggregate in std::fs::read_dir(&history).expect("history exists") {
        let aggregate = aggregate.expect("entry");
        for file in std::fs::read_dir(aggregate.path()).expect("aggregate dir") {
            let path = file.expect("entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("utf-8 name");
            let event_type = name.split('.').next().expect("Event.vN.avsc");
            let old = Schema::parse_str(&std::fs::read_to_string(&path).expect("readable"))
                .expect("released schema parses");
            let aggregate_type = aggregate.file_name().to_string_lossy().into_owned();
            let current = contracts
                .get(&aggregate_type, event_type)
                .expect("a released event type keeps its contract");
            SchemaCompatibility::can_read(&old, &current.schema).unwrap_or_else(|e| {
                panic!("{name}: the current contract cannot read data written with it: {e}")
            });
            checked += 1;
        }
    }
    assert!(checked > 0, "no released history was checked");
}

#[test]
fn the_history_check_catches_a_new_required_field() {
    let contracts = Contracts::load().expect("contracts parse");
    let current = &contracts
        .get("order", "OrderReady")
        .expect("contract")
        .schema;
    let breaking = Schema::parse_str(
        r#"{"type":"record","name":"OrderReady","namespace":"backbone.order","fields":[
            {"name":"ready_at","type":{"type":"long","logicalType":"timestamp-micros"}},
            {"name":"shelf","type":"string"}]}"#,
    )
    .expect("parses");
    assert!(SchemaCompatibility::can_read(current, &breaking).is_err());
}

#[test]
fn an_order_cancelled_v1_from_the_store_is_read_as_the_current_version() {
    let stored = serde_json::json!({"OrderCancelled": {
        "reason": "payment timed out",
        "cancelled_at": "2026-01-02T03:04:05Z"
    }});
    let (version, payload) = upcast("OrderCancelled", "1.0", stored);
    assert_eq!(version, "2.0.0");
    let event: OrderEvent = serde_json::from_value(payload).expect("upcast payload deserializes");
    assert_eq!(
        event,
        OrderEvent::OrderCancelled {
            cancelled_by: CancelledBy::System,
            reason: "payment timed out".to_owned(),
            cancelled_at: Utc
                .with_ymd_and_hms(2026, 1, 2, 3, 4, 5)
                .single()
                .expect("valid"),
        }
    );
    let current = serde_json::json!({"OrderCancelled": {
        "cancelled_by": "Customer", "reason": "r", "cancelled_at": "2026-01-02T03:04:05Z"
    }});
    let (version, untouched) = upcast("OrderCancelled", "2.0", current.clone());
    assert_eq!((version.as_str(), &untouched), ("2.0", &current));
}

#[test]
fn an_order_placed_without_a_contact_reads_as_none_from_the_store_and_from_older_records() {
    let contracts = Contracts::load().expect("contracts parse");
    let mut event = order_samples().remove(0);
    if let OrderEvent::OrderPlaced { contact, .. } = &mut event {
        *contact = None;
    }
    // Stored before contacts existed: no `contact` key at all.
    let mut stored = serde_json::to_value(&event).expect("serializes");
    stored["OrderPlaced"]
        .as_object_mut()
        .expect("an object")
        .remove("contact");
    let from_store: OrderEvent = serde_json::from_value(stored.clone()).expect("deserializes");
    assert_eq!(from_store, event);
    let (contract, value) = contracts
        .payload_to_avro("order", &stored)
        .expect("the contract's default fills the missing contact");
    // A record written with the previous version (v2) has no contact field at all.
    let apache_avro::types::Value::Record(fields) = value else {
        panic!("a record");
    };
    let older = apache_avro::types::Value::Record(
        fields
            .into_iter()
            .filter(|(name, _)| name != "contact")
            .collect(),
    );
    let back: OrderEvent = contracts
        .avro_to_event(contract, older)
        .expect("an older record resolves to the current contract");
    assert_eq!(back, event);
}
