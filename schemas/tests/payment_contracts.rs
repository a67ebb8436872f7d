//! Every payment event type has exactly one Avro contract and round-trips through it.

mod common;

use chrono::{DateTime, TimeZone, Utc};
use domain::payment::{invoice_number, PaymentEvent, WebhookKind, WebhookOutcome};
use domain::{Currency, CustomerId, Money, OrderId};

fn at() -> DateTime<Utc> {
    Utc.timestamp_micros(1_795_000_000_123_456)
        .single()
        .expect("valid instant")
}

fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::parse("EUR").expect("EUR")).expect("non-negative")
}

fn samples() -> Vec<PaymentEvent> {
    let order_id = OrderId::new();
    vec![
        PaymentEvent::PaymentAuthorized {
            order_id,
            customer_id: CustomerId::new(),
            amount: eur(2_936),
            provider: "stripe".to_owned(),
            provider_reference: "pi_3PqZ2kLkdIwHu7ix0RkC9xYz".to_owned(),
            authorized_at: at(),
        },
        PaymentEvent::PaymentCaptured {
            amount: eur(2_736),
            invoice_number: invoice_number(order_id, at()),
            captured_at: at(),
        },
        PaymentEvent::PaymentVoided {
            reason: "order rejected by the store".to_owned(),
            voided_at: at(),
        },
        PaymentEvent::PaymentRefunded {
            refund_id: "rf_7c2e1d".to_owned(),
            amount: eur(1_150),
            reason: "margherita arrived cold".to_owned(),
            total_refunded: eur(1_150),
            remaining: eur(1_586),
            refunded_at: at(),
        },
        PaymentEvent::PaymentFailed {
            reason: "card reported stolen".to_owned(),
            failed_at: at(),
        },
        PaymentEvent::ProviderWebhookRecorded {
            provider_event_id: "evt_1PqZ3aLkdIwHu7ixkB1tQp0e".to_owned(),
            kind: WebhookKind::Refunded,
            amount: Some(eur(1_150)),
            refund_id: Some("rf_7c2e1d".to_owned()),
            detail: None,
            outcome: WebhookOutcome::Confirmed,
            received_at: at(),
        },
        PaymentEvent::ProviderWebhookRecorded {
            provider_event_id: "evt_1PqZ4bLkdIwHu7ixQ8mWn2Vd".to_owned(),
            kind: WebhookKind::Other,
            amount: None,
            refund_id: None,
            detail: Some("charge.dispute.created".to_owned()),
            outcome: WebhookOutcome::Ignored,
            received_at: at(),
        },
    ]
}

#[test]
fn every_payment_event_type_has_exactly_one_contract_and_a_sample() {
    common::assert_every_event_type_has_a_contract("payment", &PaymentEvent::TYPES, &samples());
}

#[test]
fn every_payment_event_round_trips_through_avro_bytes() {
    common::assert_round_trips("payment", samples());
}
