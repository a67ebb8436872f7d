//! Given/when/then tests of every payment command, accepted and refused, and the invariants as
//! properties.

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use proptest::prelude::*;

use super::*;
use crate::services::FixedClock;

type PaymentTest = TestFramework<Payment>;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 18, 0, 0)
        .single()
        .expect("valid instant")
}

fn services_at(now: DateTime<Utc>) -> PaymentServices {
    PaymentServices::new(Arc::new(FixedClock(now)))
}

fn at(now: DateTime<Utc>) -> PaymentTest {
    TestFramework::with(services_at(now))
}

fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::parse("EUR").expect("EUR")).expect("non-negative")
}

fn gbp(minor: i64) -> Money {
    Money::new(minor, Currency::parse("GBP").expect("GBP")).expect("non-negative")
}

fn order_id() -> OrderId {
    OrderId::from_uuid(Uuid::from_u128(0x0194_3c1e_8a2b_7c3d_9e4f_5a6b_7c8d_9e0f))
}

fn customer() -> CustomerId {
    CustomerId::from_uuid(Uuid::from_u128(1))
}

fn authorize(amount: Money) -> PaymentCommand {
    PaymentCommand::AuthorizePayment {
        order_id: order_id(),
        customer_id: customer(),
        amount,
        provider: "stripe".to_owned(),
        provider_reference: "pi_3Nq".to_owned(),
    }
}

fn authorized() -> PaymentEvent {
    PaymentEvent::PaymentAuthorized {
        order_id: order_id(),
        customer_id: customer(),
        amount: eur(3_000),
        provider: "stripe".to_owned(),
        provider_reference: "pi_3Nq".to_owned(),
        authorized_at: t0(),
    }
}

fn invoice() -> String {
    invoice_number(order_id(), t0())
}

fn captured(minor: i64) -> PaymentEvent {
    PaymentEvent::PaymentCaptured {
        amount: eur(minor),
        invoice_number: invoice(),
        captured_at: t0(),
    }
}

fn refund(refund_id: &str, minor: i64) -> PaymentCommand {
    PaymentCommand::RefundPayment {
        amount: eur(minor),
        reason: "cold food".to_owned(),
        refund_id: refund_id.to_owned(),
    }
}

fn refunded(refund_id: &str, minor: i64, total: i64, remaining: i64) -> PaymentEvent {
    PaymentEvent::PaymentRefunded {
        refund_id: refund_id.to_owned(),
        amount: eur(minor),
        reason: "cold food".to_owned(),
        total_refunded: eur(total),
        remaining: eur(remaining),
        refunded_at: t0(),
    }
}

fn webhook(
    provider_event_id: &str,
    kind: WebhookKind,
    amount: Option<Money>,
    refund_id: Option<&str>,
) -> PaymentCommand {
    PaymentCommand::RecordProviderWebhook {
        provider_event_id: provider_event_id.to_owned(),
        kind,
        amount,
        refund_id: refund_id.map(str::to_owned),
        detail: None,
    }
}

fn recorded(
    provider_event_id: &str,
    kind: WebhookKind,
    amount: Option<Money>,
    refund_id: Option<&str>,
    outcome: WebhookOutcome,
) -> PaymentEvent {
    PaymentEvent::ProviderWebhookRecorded {
        provider_event_id: provider_event_id.to_owned(),
        kind,
        amount,
        refund_id: refund_id.map(str::to_owned),
        detail: None,
        outcome,
        received_at: t0(),
    }
}

fn voided(reason: &str) -> PaymentEvent {
    PaymentEvent::PaymentVoided {
        reason: reason.to_owned(),
        voided_at: t0(),
    }
}

// --- authorize -------------------------------------------------------------------------------

#[test]
fn authorizing_a_payment_records_the_order_amount_and_provider_reference() {
    at(t0())
        .given_no_previous_events()
        .when(authorize(eur(3_000)))
        .then_expect_events(vec![authorized()]);
}

#[test]
fn authorizing_twice_is_refused_because_an_order_has_one_payment() {
    at(t0())
        .given(vec![authorized()])
        .when(authorize(eur(3_000)))
        .then_expect_error(PaymentError::AlreadyAuthorized);
    at(t0())
        .given(vec![authorized(), voided("customer left")])
        .when(authorize(eur(3_000)))
        .then_expect_error(PaymentError::AlreadyAuthorized);
}

#[test]
fn authorizing_nothing_or_without_a_provider_is_refused_with_the_field_to_fix() {
    at(t0())
        .given_no_previous_events()
        .when(authorize(eur(0)))
        .then_expect_error(PaymentError::ZeroAmount);
    at(t0())
        .given_no_previous_events()
        .when(PaymentCommand::AuthorizePayment {
            order_id: order_id(),
            customer_id: customer(),
            amount: eur(3_000),
            provider: " ".to_owned(),
            provider_reference: "pi_3Nq".to_owned(),
        })
        .then_expect_error(PaymentError::Blank("provider"));
    at(t0())
        .given_no_previous_events()
        .when(PaymentCommand::AuthorizePayment {
            order_id: order_id(),
            customer_id: customer(),
            amount: eur(3_000),
            provider: "stripe".to_owned(),
            provider_reference: "x".repeat(129),
        })
        .then_expect_error_message("provider_reference is too long (at most 128 characters)");
}

// --- capture ---------------------------------------------------------------------------------

#[test]
fn capturing_without_an_amount_takes_the_whole_authorization_and_issues_an_invoice() {
    at(t0())
        .given(vec![authorized()])
        .when(PaymentCommand::CapturePayment { amount: None })
        .then_expect_events(vec![captured(3_000)]);
}

#[test]
fn a_partial_capture_takes_part_of_the_authorization_and_only_once() {
    at(t0())
        .given(vec![authorized()])
        .when(PaymentCommand::CapturePayment {
            amount: Some(eur(2_500)),
        })
        .then_expect_events(vec![captured(2_500)]);
    at(t0())
        .given(vec![authorized(), captured(2_500)])
        .when(PaymentCommand::CapturePayment {
            amount: Some(eur(500)),
        })
        .then_expect_error(PaymentError::InvalidTransition {
            action: "capture",
            status: "Captured",
        });
}

#[test]
fn capturing_more_than_authorized_in_another_currency_or_nothing_is_refused() {
    at(t0())
        .given(vec![authorized()])
        .when(PaymentCommand::CapturePayment {
            amount: Some(eur(3_001)),
        })
        .then_expect_error(PaymentError::CaptureExceedsAuthorized {
            requested: eur(3_001),
            authorized: eur(3_000),
        });
    at(t0())
        .given(vec![authorized()])
        .when(PaymentCommand::CapturePayment {
            amount: Some(gbp(1_000)),
        })
        .then_expect_error_message("the payment is in EUR; send the amount in EUR, not GBP");
    at(t0())
        .given(vec![authorized()])
        .when(PaymentCommand::CapturePayment {
            amount: Some(eur(0)),
        })
        .then_expect_error(PaymentError::ZeroAmount);
}

#[test]
fn a_voided_or_failed_payment_cannot_be_captured() {
    at(t0())
        .given(vec![authorized(), voided("order rejected")])
        .when(PaymentCommand::CapturePayment { amount: None })
        .then_expect_error(PaymentError::InvalidTransition {
            action: "capture",
            status: "Voided",
        });
    at(t0())
        .given(vec![
            authorized(),
            PaymentEvent::PaymentFailed {
                reason: "fraud check".to_owned(),
                failed_at: t0(),
            },
        ])
        .when(PaymentCommand::CapturePayment { amount: None })
        .then_expect_error(PaymentError::InvalidTransition {
            action: "capture",
            status: "Failed",
        });
}

#[test]
fn the_invoice_number_is_stable_for_an_order_and_differs_between_orders() {
    let number = invoice_number(order_id(), t0());
    assert_eq!(
        number,
        invoice_number(order_id(), t0() + Duration::hours(1))
    );
    assert_eq!(number.len(), "INV-20261121-".len() + 16);
    assert!(number.starts_with("INV-20261121-"), "{number}");
    assert!(number[13..]
        .chars()
        .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()));
    let other = OrderId::from_uuid(Uuid::from_u128(2));
    assert_ne!(number, invoice_number(other, t0()));
    // Pinned (computed independently with Python's hashlib): the scheme is part of the contract
    // with accounting and must never change.
    assert_eq!(number, PINNED_INVOICE_NUMBER);
}

const PINNED_INVOICE_NUMBER: &str = "INV-20261121-554149FC0AB0D8CA";

// --- void ------------------------------------------------------------------------------------

#[test]
fn an_authorization_can_be_voided_until_it_is_captured() {
    at(t0())
        .given(vec![authorized()])
        .when(PaymentCommand::VoidPayment {
            reason: "order rejected".to_owned(),
        })
        .then_expect_events(vec![voided("order rejected")]);
    at(t0())
        .given(vec![authorized(), captured(3_000)])
        .when(PaymentCommand::VoidPayment {
            reason: "order rejected".to_owned(),
        })
        .then_expect_error(PaymentError::InvalidTransition {
            action: "void",
            status: "Captured",
        });
    at(t0())
        .given(vec![authorized()])
        .when(PaymentCommand::VoidPayment {
            reason: "x".repeat(501),
        })
        .then_expect_error(PaymentError::TooLong {
            field: "reason",
            max: 500,
        });
}

#[test]
fn commands_on_a_payment_never_authorized_are_refused_as_not_found() {
    for command in [
        PaymentCommand::CapturePayment { amount: None },
        PaymentCommand::VoidPayment {
            reason: "r".to_owned(),
        },
        refund("r1", 100),
    ] {
        at(t0())
            .given_no_previous_events()
            .when(command)
            .then_expect_error(PaymentError::NotFound);
    }
}

// --- refund ----------------------------------------------------------------------------------

#[test]
fn a_partial_refund_leaves_the_rest_refundable_and_a_second_one_can_empty_it() {
    at(t0())
        .given(vec![authorized(), captured(3_000)])
        .when(refund("r1", 1_000))
        .then_expect_events(vec![refunded("r1", 1_000, 1_000, 2_000)]);
    at(t0())
        .given(vec![
            authorized(),
            captured(3_000),
            refunded("r1", 1_000, 1_000, 2_000),
        ])
        .when(refund("r2", 2_000))
        .then_expect_events(vec![refunded("r2", 2_000, 3_000, 0)]);
}

#[test]
fn refunding_more_than_is_left_of_the_capture_is_refused() {
    at(t0())
        .given(vec![authorized(), captured(2_500)])
        .when(refund("r1", 2_501))
        .then_expect_error(PaymentError::RefundExceedsCaptured {
            requested: eur(2_501),
            refundable: eur(2_500),
        });
    at(t0())
        .given(vec![
            authorized(),
            captured(2_500),
            refunded("r1", 2_000, 2_000, 500),
        ])
        .when(refund("r2", 501))
        .then_expect_error_message(
            "cannot refund 5.01 EUR: only 5.00 EUR of the captured amount is left to refund",
        );
    at(t0())
        .given(vec![
            authorized(),
            captured(3_000),
            refunded("r1", 3_000, 3_000, 0),
        ])
        .when(refund("r2", 1))
        .then_expect_error(PaymentError::InvalidTransition {
            action: "refund",
            status: "Refunded",
        });
}

#[test]
fn a_refund_retried_with_the_same_refund_id_is_a_no_op_even_after_a_full_refund() {
    at(t0())
        .given(vec![
            authorized(),
            captured(3_000),
            refunded("r1", 1_000, 1_000, 2_000),
        ])
        .when(refund("r1", 1_000))
        .then_expect_events(vec![]);
    at(t0())
        .given(vec![
            authorized(),
            captured(3_000),
            refunded("r1", 3_000, 3_000, 0),
        ])
        .when(refund("r1", 3_000))
        .then_expect_events(vec![]);
}

#[test]
fn a_refund_id_reused_for_a_different_amount_is_refused() {
    at(t0())
        .given(vec![
            authorized(),
            captured(3_000),
            refunded("r1", 1_000, 1_000, 2_000),
        ])
        .when(refund("r1", 500))
        .then_expect_error(PaymentError::RefundIdReused {
            refund_id: "r1".to_owned(),
            amount: eur(1_000),
        });
}

#[test]
fn refunding_before_the_capture_or_after_a_void_is_refused() {
    at(t0())
        .given(vec![authorized()])
        .when(refund("r1", 100))
        .then_expect_error(PaymentError::InvalidTransition {
            action: "refund",
            status: "Authorized",
        });
    at(t0())
        .given(vec![authorized(), voided("order rejected")])
        .when(refund("r1", 100))
        .then_expect_error(PaymentError::InvalidTransition {
            action: "refund",
            status: "Voided",
        });
}

#[test]
fn refunding_nothing_in_another_currency_or_without_a_refund_id_is_refused() {
    let given = || vec![authorized(), captured(3_000)];
    at(t0())
        .given(given())
        .when(refund("r1", 0))
        .then_expect_error(PaymentError::ZeroAmount);
    at(t0())
        .given(given())
        .when(PaymentCommand::RefundPayment {
            amount: gbp(100),
            reason: "cold food".to_owned(),
            refund_id: "r1".to_owned(),
        })
        .then_expect_error(PaymentError::CurrencyMismatch {
            expected: Currency::parse("EUR").expect("EUR"),
            got: Currency::parse("GBP").expect("GBP"),
        });
    at(t0())
        .given(given())
        .when(refund("", 100))
        .then_expect_error(PaymentError::Blank("refund_id"));
}

// --- provider webhooks -----------------------------------------------------------------------

#[test]
fn a_capture_webhook_captures_an_authorized_payment_after_recording_the_webhook() {
    at(t0())
        .given(vec![authorized()])
        .when(webhook("evt_1", WebhookKind::Captured, None, None))
        .then_expect_events(vec![
            recorded(
                "evt_1",
                WebhookKind::Captured,
                None,
                None,
                WebhookOutcome::Applied,
            ),
            captured(3_000),
        ]);
    at(t0())
        .given(vec![authorized(), captured(3_000)])
        .when(webhook(
            "evt_2",
            WebhookKind::Captured,
            Some(eur(3_000)),
            None,
        ))
        .then_expect_events(vec![recorded(
            "evt_2",
            WebhookKind::Captured,
            Some(eur(3_000)),
            None,
            WebhookOutcome::Confirmed,
        )]);
}

#[test]
fn a_webhook_seen_before_changes_nothing_even_after_a_reload_from_events() {
    at(t0())
        .given(vec![
            authorized(),
            recorded(
                "evt_1",
                WebhookKind::Captured,
                None,
                None,
                WebhookOutcome::Applied,
            ),
            captured(3_000),
        ])
        .when(webhook("evt_1", WebhookKind::Captured, None, None))
        .then_expect_events(vec![]);
    // The same id is a no-op whatever it now claims: the provider retried, nothing else.
    at(t0())
        .given(vec![
            authorized(),
            recorded(
                "evt_9",
                WebhookKind::Other,
                None,
                None,
                WebhookOutcome::Ignored,
            ),
        ])
        .when(webhook("evt_9", WebhookKind::Failed, None, None))
        .then_expect_events(vec![]);
}

#[test]
fn a_failed_webhook_before_the_capture_fails_the_payment_with_the_providers_reason() {
    at(t0())
        .given(vec![authorized()])
        .when(PaymentCommand::RecordProviderWebhook {
            provider_event_id: "evt_1".to_owned(),
            kind: WebhookKind::Failed,
            amount: None,
            refund_id: None,
            detail: Some("card reported stolen".to_owned()),
        })
        .then_expect_events(vec![
            PaymentEvent::ProviderWebhookRecorded {
                provider_event_id: "evt_1".to_owned(),
                kind: WebhookKind::Failed,
                amount: None,
                refund_id: None,
                detail: Some("card reported stolen".to_owned()),
                outcome: WebhookOutcome::Applied,
                received_at: t0(),
            },
            PaymentEvent::PaymentFailed {
                reason: "card reported stolen".to_owned(),
                failed_at: t0(),
            },
        ]);
}

#[test]
fn a_voided_webhook_voids_an_authorization_and_confirms_our_own_void() {
    at(t0())
        .given(vec![authorized()])
        .when(webhook("evt_1", WebhookKind::Voided, None, None))
        .then_expect_events(vec![
            recorded(
                "evt_1",
                WebhookKind::Voided,
                None,
                None,
                WebhookOutcome::Applied,
            ),
            voided("the payment provider voided the authorization"),
        ]);
    at(t0())
        .given(vec![authorized(), voided("order rejected")])
        .when(webhook("evt_1", WebhookKind::Voided, None, None))
        .then_expect_events(vec![recorded(
            "evt_1",
            WebhookKind::Voided,
            None,
            None,
            WebhookOutcome::Confirmed,
        )]);
}

#[test]
fn a_refund_webhook_for_our_own_refund_only_confirms_it() {
    at(t0())
        .given(vec![
            authorized(),
            captured(3_000),
            refunded("r1", 1_000, 1_000, 2_000),
        ])
        .when(webhook(
            "evt_5",
            WebhookKind::Refunded,
            Some(eur(1_000)),
            Some("r1"),
        ))
        .then_expect_events(vec![recorded(
            "evt_5",
            WebhookKind::Refunded,
            Some(eur(1_000)),
            Some("r1"),
            WebhookOutcome::Confirmed,
        )]);
}

#[test]
fn a_refund_made_at_the_provider_is_applied_and_known_by_its_event_id() {
    at(t0())
        .given(vec![authorized(), captured(3_000)])
        .when(webhook(
            "evt_7",
            WebhookKind::Refunded,
            Some(eur(500)),
            None,
        ))
        .then_expect_events(vec![
            recorded(
                "evt_7",
                WebhookKind::Refunded,
                Some(eur(500)),
                None,
                WebhookOutcome::Applied,
            ),
            PaymentEvent::PaymentRefunded {
                refund_id: "evt_7".to_owned(),
                amount: eur(500),
                reason: "refunded at the payment provider".to_owned(),
                total_refunded: eur(500),
                remaining: eur(2_500),
                refunded_at: t0(),
            },
        ]);
    // Without an amount it refunds everything that is left.
    at(t0())
        .given(vec![
            authorized(),
            captured(3_000),
            refunded("r1", 1_000, 1_000, 2_000),
        ])
        .when(webhook("evt_8", WebhookKind::Refunded, None, Some("re_42")))
        .then_expect_events(vec![
            recorded(
                "evt_8",
                WebhookKind::Refunded,
                None,
                Some("re_42"),
                WebhookOutcome::Applied,
            ),
            PaymentEvent::PaymentRefunded {
                refund_id: "re_42".to_owned(),
                amount: eur(2_000),
                reason: "refunded at the payment provider".to_owned(),
                total_refunded: eur(3_000),
                remaining: eur(0),
                refunded_at: t0(),
            },
        ]);
}

#[test]
fn a_refund_webhook_before_the_capture_is_known_is_refused_so_the_provider_retries() {
    at(t0())
        .given(vec![authorized()])
        .when(webhook(
            "evt_3",
            WebhookKind::Refunded,
            Some(eur(500)),
            None,
        ))
        .then_expect_error(PaymentError::InvalidTransition {
            action: "refund",
            status: "Authorized",
        });
}

#[test]
fn a_webhook_that_contradicts_the_payment_is_recorded_without_changing_it() {
    at(t0())
        .given(vec![authorized(), voided("order rejected")])
        .when(webhook("evt_1", WebhookKind::Captured, None, None))
        .then_expect_events(vec![recorded(
            "evt_1",
            WebhookKind::Captured,
            None,
            None,
            WebhookOutcome::Contradicted,
        )]);
    at(t0())
        .given(vec![authorized(), captured(3_000)])
        .when(webhook("evt_2", WebhookKind::Failed, None, None))
        .then_expect_events(vec![recorded(
            "evt_2",
            WebhookKind::Failed,
            None,
            None,
            WebhookOutcome::Contradicted,
        )]);
    at(t0())
        .given(vec![authorized(), captured(2_000)])
        .when(webhook(
            "evt_3",
            WebhookKind::Refunded,
            Some(eur(2_500)),
            None,
        ))
        .then_expect_events(vec![recorded(
            "evt_3",
            WebhookKind::Refunded,
            Some(eur(2_500)),
            None,
            WebhookOutcome::Contradicted,
        )]);
    at(t0())
        .given(vec![authorized(), captured(2_000)])
        .when(webhook(
            "evt_4",
            WebhookKind::Captured,
            Some(eur(3_000)),
            None,
        ))
        .then_expect_events(vec![recorded(
            "evt_4",
            WebhookKind::Captured,
            Some(eur(3_000)),
            None,
            WebhookOutcome::Contradicted,
        )]);
}

#[test]
fn an_authorized_webhook_confirms_and_other_kinds_are_ignored() {
    at(t0())
        .given(vec![authorized()])
        .when(webhook(
            "evt_1",
            WebhookKind::Authorized,
            Some(eur(3_000)),
            None,
        ))
        .then_expect_events(vec![recorded(
            "evt_1",
            WebhookKind::Authorized,
            Some(eur(3_000)),
            None,
            WebhookOutcome::Confirmed,
        )]);
    at(t0())
        .given(vec![authorized(), captured(3_000)])
        .when(webhook("evt_2", WebhookKind::Other, None, None))
        .then_expect_events(vec![recorded(
            "evt_2",
            WebhookKind::Other,
            None,
            None,
            WebhookOutcome::Ignored,
        )]);
}

#[test]
fn a_webhook_before_the_authorization_is_refused_so_the_provider_retries() {
    at(t0())
        .given_no_previous_events()
        .when(webhook("evt_1", WebhookKind::Captured, None, None))
        .then_expect_error(PaymentError::NotFound);
}

#[test]
fn a_webhook_in_another_currency_or_without_an_event_id_is_refused() {
    at(t0())
        .given(vec![authorized()])
        .when(webhook(
            "evt_1",
            WebhookKind::Captured,
            Some(gbp(3_000)),
            None,
        ))
        .then_expect_error(PaymentError::CurrencyMismatch {
            expected: Currency::parse("EUR").expect("EUR"),
            got: Currency::parse("GBP").expect("GBP"),
        });
    at(t0())
        .given(vec![authorized()])
        .when(webhook("", WebhookKind::Captured, None, None))
        .then_expect_error(PaymentError::Blank("provider_event_id"));
    at(t0())
        .given(vec![authorized()])
        .when(webhook("evt_1", WebhookKind::Refunded, None, Some(" ")))
        .then_expect_error(PaymentError::Blank("refund_id"));
}

#[test]
fn conflicts_with_the_payments_state_are_told_apart_from_invalid_commands() {
    assert!(PaymentError::AlreadyAuthorized.is_state_conflict());
    assert!(PaymentError::InvalidTransition {
        action: "void",
        status: "Captured"
    }
    .is_state_conflict());
    assert!(PaymentError::RefundExceedsCaptured {
        requested: eur(2),
        refundable: eur(1)
    }
    .is_state_conflict());
    assert!(!PaymentError::ZeroAmount.is_state_conflict());
    assert!(!PaymentError::NotFound.is_state_conflict());
    assert!(!PaymentError::Blank("refund_id").is_state_conflict());
}

#[test]
fn a_payment_survives_a_snapshot_round_trip_with_its_idempotency_keys() {
    let mut payment = Payment::default();
    for event in [
        authorized(),
        recorded(
            "evt_1",
            WebhookKind::Captured,
            None,
            None,
            WebhookOutcome::Applied,
        ),
        captured(3_000),
        refunded("r1", 1_000, 1_000, 2_000),
    ] {
        payment.apply(event);
    }
    assert_eq!(payment.status, PaymentStatus::PartiallyRefunded);
    assert_eq!(payment.invoice_number.as_deref(), Some(invoice().as_str()));
    let json = serde_json::to_string(&payment).expect("serializes");
    let back: Payment = serde_json::from_str(&json).expect("deserializes");
    assert_eq!(back, payment);
    assert!(back.provider_event_ids.contains("evt_1"));
    assert_eq!(back.refunds.get("r1"), Some(&eur(1_000)));
}

// --- invariants ------------------------------------------------------------------------------

fn any_money() -> impl Strategy<Value = Money> {
    prop_oneof![
        9 => (0i64..4_000).prop_map(eur),
        1 => (0i64..4_000).prop_map(gbp),
    ]
}

fn any_kind() -> impl Strategy<Value = WebhookKind> {
    prop_oneof![
        Just(WebhookKind::Authorized),
        Just(WebhookKind::Captured),
        Just(WebhookKind::Failed),
        Just(WebhookKind::Voided),
        Just(WebhookKind::Refunded),
        Just(WebhookKind::Other),
    ]
}

fn any_refund_id() -> impl Strategy<Value = String> {
    (1u8..4).prop_map(|n| format!("r{n}"))
}

fn any_command() -> impl Strategy<Value = PaymentCommand> {
    prop_oneof![
        2 => any_money().prop_map(authorize),
        2 => proptest::option::of(any_money()).prop_map(|amount| PaymentCommand::CapturePayment { amount }),
        1 => Just(PaymentCommand::VoidPayment {
            reason: "r".to_owned()
        }),
        3 => (any_money(), any_refund_id()).prop_map(|(amount, refund_id)| {
            PaymentCommand::RefundPayment {
                amount,
                reason: "r".to_owned(),
                refund_id,
            }
        }),
        4 => (
            1u8..5,
            any_kind(),
            proptest::option::of(any_money()),
            proptest::option::of(any_refund_id())
        )
            .prop_map(|(n, kind, amount, refund_id)| {
                PaymentCommand::RecordProviderWebhook {
                    provider_event_id: format!("evt_{n}"),
                    kind,
                    amount,
                    refund_id,
                    detail: None,
                }
            }),
    ]
}

fn run(payment: &mut Payment, command: PaymentCommand, services: &PaymentServices) -> bool {
    match payment.decide(command, services) {
        Ok(events) => {
            for event in events {
                payment.apply(event);
            }
            true
        }
        Err(_) => false,
    }
}

/// A command that names an idempotency key (refund id, provider event id) seen before.
fn repeats_a_key(payment: &Payment, command: &PaymentCommand) -> bool {
    match command {
        PaymentCommand::RefundPayment { refund_id, .. } => payment.refunds.contains_key(refund_id),
        PaymentCommand::RecordProviderWebhook {
            provider_event_id, ..
        } => payment.provider_event_ids.contains(provider_event_id),
        _ => false,
    }
}

proptest! {
    #[test]
    fn payment_states_only_move_forward_and_refunds_never_exceed_captures(
        commands in proptest::collection::vec(any_command(), 1..40)
    ) {
        let services = services_at(t0());
        let mut payment = Payment::default();
        for command in commands {
            let before = payment.clone();
            run(&mut payment, command, &services);
            prop_assert!(payment.status.rank() >= before.status.rank());
            if before.status.is_final() {
                prop_assert_eq!(payment.status, before.status, "a final state is final");
            }
            let authorized = payment.authorized.map_or(0, |m| m.minor());
            let captured = payment.captured.map_or(0, |m| m.minor());
            let refunded = payment.total_refunded.map_or(0, |m| m.minor());
            prop_assert!(0 <= refunded && refunded <= captured && captured <= authorized);
            let sum: i64 = payment.refunds.values().map(Money::minor).sum();
            prop_assert_eq!(sum, refunded, "the refunds add up to the total refunded");
            if let Some(amount) = payment.authorized {
                for money in [payment.captured, payment.total_refunded].into_iter().flatten() {
                    prop_assert_eq!(money.currency(), amount.currency());
                }
            }
            prop_assert_eq!(
                payment.status == PaymentStatus::Refunded,
                refunded > 0 && refunded == captured
            );
        }
    }

    #[test]
    fn a_repeated_refund_id_or_webhook_id_never_changes_the_payment_twice(
        commands in proptest::collection::vec(any_command(), 1..40)
    ) {
        let services = services_at(t0());
        let mut payment = Payment::default();
        for command in commands {
            if repeats_a_key(&payment, &command) {
                let before = payment.clone();
                if let Ok(events) = payment.decide(command.clone(), &services) {
                    prop_assert!(events.is_empty(), "a repeat emitted {:?}", events);
                }
                run(&mut payment, command, &services);
                prop_assert_eq!(&payment, &before);
                continue;
            }
            if run(&mut payment, command.clone(), &services) {
                // Delivered again straight away (a retry): nothing more happens.
                let before = payment.clone();
                if matches!(
                    command,
                    PaymentCommand::RefundPayment { .. } | PaymentCommand::RecordProviderWebhook { .. }
                ) {
                    let again = payment.decide(command, &services);
                    prop_assert_eq!(again, Ok(vec![]));
                    prop_assert_eq!(&payment, &before);
                }
            }
        }
    }
}
