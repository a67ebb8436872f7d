//! Every rewards event type has exactly one contract and round-trips through it.

mod common;

use chrono::{DateTime, TimeZone, Utc};
use domain::rewards::{LotPoints, RewardsEvent, SubscriptionTier};
use domain::{CharityCode, Currency, Money, OrderId};

fn at(micros: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(micros)
        .single()
        .expect("valid instant")
}

fn gbp(minor: i64) -> Money {
    Money::new(minor, Currency::parse("GBP").expect("GBP")).expect("non-negative")
}

fn lots() -> Vec<LotPoints> {
    vec![
        LotPoints {
            lot: 3,
            points: 120,
        },
        LotPoints { lot: 7, points: 30 },
    ]
}

fn samples() -> Vec<RewardsEvent> {
    let now = at(1_795_000_000_123_456);
    let in_a_year = at(1_826_536_000_654_321);
    vec![
        RewardsEvent::PointsEarned {
            order_id: OrderId::new(),
            order_total: gbp(2_936),
            points_per_100_minor: 10,
            multiplier_bp: 15_000,
            points: 440,
            lot: 8,
            expires_at: in_a_year,
            idempotency_key: "order-completed:9b1f0c1e".to_owned(),
            earned_at: now,
        },
        RewardsEvent::PointsRedeemed {
            order_id: OrderId::new(),
            points: 150,
            lots: lots(),
            idempotency_key: "checkout:5d2a".to_owned(),
            redeemed_at: now,
        },
        RewardsEvent::RedemptionRestored {
            order_id: OrderId::new(),
            points: 150,
            lots: lots(),
            idempotency_key: "order-cancelled:5d2a".to_owned(),
            restored_at: now,
        },
        RewardsEvent::PointsDonated {
            charity: CharityCode::parse("food-bank-uk").expect("valid"),
            points: 150,
            minor_per_100_points: 50,
            amount: gbp(75),
            lots: lots(),
            idempotency_key: "donate:77aa".to_owned(),
            donated_at: now,
        },
        RewardsEvent::PointsExpired {
            points: 150,
            lots: lots(),
            as_of: at(1_794_999_000_000_001),
            idempotency_key: "expiry-run:2026-11-18".to_owned(),
            expired_at: now,
        },
        RewardsEvent::PointsAdjusted {
            points: 500,
            reason: "late delivery goodwill".to_owned(),
            lot: Some(9),
            expires_at: Some(in_a_year),
            lots: vec![],
            idempotency_key: "support-ticket:4411".to_owned(),
            adjusted_at: now,
        },
        RewardsEvent::PointsAdjusted {
            points: -150,
            reason: "points earned on a refunded order".to_owned(),
            lot: None,
            expires_at: None,
            lots: lots(),
            idempotency_key: "support-ticket:4412".to_owned(),
            adjusted_at: now,
        },
        RewardsEvent::SubscriptionStarted {
            tier: SubscriptionTier::Plus,
            multiplier_bp: 15_000,
            free_delivery: true,
            until: in_a_year,
            idempotency_key: "billing:sub_123:start".to_owned(),
            started_at: now,
        },
        RewardsEvent::SubscriptionRenewed {
            until: at(1_858_072_000_000_007),
            idempotency_key: "billing:sub_123:renew-1".to_owned(),
            renewed_at: now,
        },
        RewardsEvent::SubscriptionCancelled {
            ends_at: in_a_year,
            idempotency_key: "billing:sub_123:cancel".to_owned(),
            cancelled_at: now,
        },
        RewardsEvent::SubscriptionLapsed {
            idempotency_key: "billing:sub_123:lapse".to_owned(),
            lapsed_at: in_a_year,
        },
        RewardsEvent::PointsReversed {
            order_id: OrderId::new(),
            refunded_total: gbp(1_468),
            points: 150,
            unrecovered: 70,
            lots: lots(),
            idempotency_key: "payment-refunded:9b1f0c1e".to_owned(),
            reversed_at: now,
        },
    ]
}

#[test]
fn every_rewards_event_type_has_exactly_one_contract_and_a_sample() {
    common::assert_every_event_type_has_a_contract("rewards", &RewardsEvent::TYPES, &samples());
}

#[test]
fn every_rewards_event_round_trips_through_avro_bytes() {
    common::assert_round_trips("rewards", samples());
}
