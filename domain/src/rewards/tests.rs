//! Given/when/then tests of every rewards command, accepted and refused, and the ledger's
//! invariants under any sequence of commands.

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use proptest::prelude::*;

use super::*;
use crate::services::FixedClock;

type RewardsTest = TestFramework<RewardsLedger>;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 18, 0, 0)
        .single()
        .expect("valid instant")
}

fn days(n: i64) -> Duration {
    Duration::days(n)
}

fn services_at(now: DateTime<Utc>) -> RewardsServices {
    RewardsServices::new(Arc::new(FixedClock(now)))
}

fn at(now: DateTime<Utc>) -> RewardsTest {
    TestFramework::with(services_at(now))
}

fn gbp() -> Currency {
    Currency::parse("GBP").expect("GBP")
}

fn money(minor: i64) -> Money {
    Money::new(minor, gbp()).expect("non-negative")
}

fn order(n: u128) -> OrderId {
    OrderId::from_uuid(uuid::Uuid::from_u128(n))
}

fn charity() -> CharityCode {
    CharityCode::parse("food-bank-uk").expect("valid charity")
}

fn key(k: &str) -> String {
    k.to_owned()
}

/// `points` in lot `lot`, earned on order `lot` at t0 without a multiplier.
fn earned(lot: u32, points: u64, expires_at: DateTime<Utc>) -> RewardsEvent {
    RewardsEvent::PointsEarned {
        order_id: order(u128::from(lot)),
        order_total: money(i64::try_from(points).expect("small") * 100),
        points_per_100_minor: 1,
        multiplier_bp: NO_MULTIPLIER_BP,
        points,
        lot,
        expires_at,
        idempotency_key: format!("earn-{lot}"),
        earned_at: t0(),
    }
}

fn lp(lot: u32, points: u64) -> LotPoints {
    LotPoints { lot, points }
}

fn redeemed(order_n: u128, lots: Vec<LotPoints>) -> RewardsEvent {
    RewardsEvent::PointsRedeemed {
        order_id: order(order_n),
        points: lots.iter().map(|l| l.points).sum(),
        lots,
        idempotency_key: format!("redeem-{order_n}"),
        redeemed_at: t0(),
    }
}

fn subscribed(multiplier_bp: u32, until: DateTime<Utc>) -> RewardsEvent {
    RewardsEvent::SubscriptionStarted {
        tier: SubscriptionTier::Plus,
        multiplier_bp,
        free_delivery: true,
        until,
        idempotency_key: key("sub-start"),
        started_at: t0(),
    }
}

fn earn(order_n: u128, total_minor: i64, k: &str) -> RewardsCommand {
    RewardsCommand::EarnPoints {
        order_id: order(order_n),
        order_total: money(total_minor),
        points_per_100_minor: 10,
        expires_in_days: 365,
        idempotency_key: key(k),
    }
}

fn redeem(order_n: u128, points: u64, k: &str) -> RewardsCommand {
    RewardsCommand::RedeemPoints {
        order_id: order(order_n),
        points,
        idempotency_key: key(k),
    }
}

fn donate(points: u64, rate: u32, k: &str) -> RewardsCommand {
    RewardsCommand::DonatePoints {
        charity: charity(),
        points,
        minor_per_100_points: rate,
        currency: gbp(),
        idempotency_key: key(k),
    }
}

fn adjust(points: i64, reason: &str, k: &str) -> RewardsCommand {
    RewardsCommand::AdjustPoints {
        points,
        reason: reason.to_owned(),
        expires_in_days: 90,
        idempotency_key: key(k),
    }
}

fn ledger_of(events: Vec<RewardsEvent>) -> RewardsLedger {
    let mut ledger = RewardsLedger::default();
    for event in events {
        ledger.apply(event);
    }
    ledger
}

// ---- earning ----

#[test]
fn earning_on_a_completed_order_opens_a_lot_that_expires_later() {
    at(t0())
        .given_no_previous_events()
        .when(earn(1, 2_345, "earn-1"))
        .then_expect_events(vec![RewardsEvent::PointsEarned {
            order_id: order(1),
            order_total: money(2_345),
            points_per_100_minor: 10,
            multiplier_bp: NO_MULTIPLIER_BP,
            points: 234,
            lot: 1,
            expires_at: t0() + days(365),
            idempotency_key: key("earn-1"),
            earned_at: t0(),
        }]);
}

#[test]
fn earning_applies_the_multiplier_of_a_running_subscription_even_once_cancelled() {
    let events = at(t0())
        .given(vec![subscribed(15_000, t0() + days(30))])
        .when(earn(1, 2_345, "earn-1"))
        .inspect_result()
        .expect("earned");
    let [RewardsEvent::PointsEarned {
        multiplier_bp,
        points,
        ..
    }] = events.as_slice()
    else {
        panic!("expected one PointsEarned, got {events:?}");
    };
    // 2 345 minor units at 10 points per 100 is 234.5, times 1.5 is 351.75: rounded down once.
    assert_eq!((*multiplier_bp, *points), (15_000, 351));

    let cancelled = RewardsEvent::SubscriptionCancelled {
        ends_at: t0() + days(30),
        idempotency_key: key("sub-cancel"),
        cancelled_at: t0(),
    };
    let events = at(t0() + days(1))
        .given(vec![subscribed(20_000, t0() + days(30)), cancelled])
        .when(earn(1, 1_000, "earn-1"))
        .inspect_result()
        .expect("earned");
    assert!(
        matches!(
            events.as_slice(),
            [RewardsEvent::PointsEarned { points: 200, .. }]
        ),
        "{events:?}"
    );
}

#[test]
fn earning_after_the_subscription_ended_uses_no_multiplier() {
    let events = at(t0() + days(31))
        .given(vec![subscribed(20_000, t0() + days(30))])
        .when(earn(1, 1_000, "earn-1"))
        .inspect_result()
        .expect("earned");
    assert!(
        matches!(
            events.as_slice(),
            [RewardsEvent::PointsEarned {
                points: 100,
                multiplier_bp: NO_MULTIPLIER_BP,
                ..
            }]
        ),
        "{events:?}"
    );
}

#[test]
fn an_order_earns_once_even_under_a_new_key() {
    at(t0())
        .given(vec![earned(1, 500, t0() + days(365))])
        .when(earn(1, 5_000, "earn-again"))
        .then_expect_error(RewardsError::AlreadyEarnedForOrder(order(1)));
}

#[test]
fn an_order_too_small_to_earn_a_point_records_nothing() {
    at(t0())
        .given_no_previous_events()
        .when(earn(1, 9, "earn-1"))
        .then_expect_events(vec![]);
}

#[test]
fn earning_with_a_bad_rate_or_expiry_is_refused() {
    let with = |rate: u32, expires_in_days: u32| RewardsCommand::EarnPoints {
        order_id: order(1),
        order_total: money(1_000),
        points_per_100_minor: rate,
        expires_in_days,
        idempotency_key: key("earn-1"),
    };
    at(t0())
        .given_no_previous_events()
        .when(with(0, 365))
        .then_expect_error(RewardsError::InvalidEarnRate);
    at(t0())
        .given_no_previous_events()
        .when(with(MAX_EARN_RATE + 1, 365))
        .then_expect_error(RewardsError::InvalidEarnRate);
    at(t0())
        .given_no_previous_events()
        .when(with(10, 0))
        .then_expect_error(RewardsError::InvalidExpiry);
    at(t0())
        .given_no_previous_events()
        .when(with(10, MAX_EXPIRY_DAYS + 1))
        .then_expect_error(RewardsError::InvalidExpiry);
}

// ---- redeeming and restoring ----

#[test]
fn redeeming_takes_points_from_the_lots_that_expire_first() {
    // Lot 1 expires last, lot 2 first, lot 3 in between.
    let history = vec![
        earned(1, 100, t0() + days(300)),
        earned(2, 50, t0() + days(10)),
        earned(3, 80, t0() + days(100)),
    ];
    at(t0())
        .given(history)
        .when(redeem(9, 120, "redeem-9"))
        .then_expect_events(vec![RewardsEvent::PointsRedeemed {
            order_id: order(9),
            points: 120,
            lots: vec![lp(2, 50), lp(3, 70)],
            idempotency_key: key("redeem-9"),
            redeemed_at: t0(),
        }]);
}

#[test]
fn redeeming_more_than_is_available_is_refused_with_what_is_available() {
    at(t0())
        .given(vec![earned(1, 120, t0() + days(30))])
        .when(redeem(9, 121, "redeem-9"))
        .then_expect_error_message("only 120 points are available; redeem at most 120");
    at(t0())
        .given_no_previous_events()
        .when(redeem(9, 1, "redeem-9"))
        .then_expect_error(RewardsError::InsufficientPoints {
            action: "redeem",
            available: 0,
        });
}

#[test]
fn points_past_their_expiry_cannot_be_spent_before_the_sweep_records_it() {
    at(t0() + days(11))
        .given(vec![
            earned(1, 100, t0() + days(10)),
            earned(2, 30, t0() + days(20)),
        ])
        .when(redeem(9, 31, "redeem-9"))
        .then_expect_error(RewardsError::InsufficientPoints {
            action: "redeem",
            available: 30,
        });
}

#[test]
fn redeeming_needs_a_positive_amount_and_one_redemption_per_order() {
    let history = vec![
        earned(1, 500, t0() + days(30)),
        redeemed(9, vec![lp(1, 100)]),
    ];
    at(t0())
        .given(history.clone())
        .when(redeem(9, 50, "redeem-9-again"))
        .then_expect_error(RewardsError::AlreadyRedeemedForOrder(order(9)));
    at(t0())
        .given(history.clone())
        .when(redeem(10, 0, "redeem-10"))
        .then_expect_error(RewardsError::PointsOutOfRange);
    at(t0())
        .given(history)
        .when(redeem(10, MAX_POINTS_PER_WRITE + 1, "redeem-10"))
        .then_expect_error(RewardsError::PointsOutOfRange);
}

#[test]
fn a_cancelled_order_gets_exactly_its_redeemed_points_back_to_their_lots_once() {
    let history = vec![
        earned(1, 50, t0() + days(10)),
        earned(2, 100, t0() + days(20)),
        redeemed(9, vec![lp(1, 50), lp(2, 20)]),
    ];
    let restored = RewardsEvent::RedemptionRestored {
        order_id: order(9),
        points: 70,
        lots: vec![lp(1, 50), lp(2, 20)],
        idempotency_key: key("restore-9"),
        restored_at: t0(),
    };
    at(t0())
        .given(history.clone())
        .when(RewardsCommand::RestoreRedemption {
            order_id: order(9),
            idempotency_key: key("restore-9"),
        })
        .then_expect_events(vec![restored.clone()]);

    let mut after = history.clone();
    after.push(restored);
    let ledger = ledger_of(after.clone());
    assert_eq!(ledger.balance, 150);
    assert_eq!(ledger.lot(1).map(|l| l.remaining), Some(50));
    assert_eq!(ledger.lot(2).map(|l| l.remaining), Some(100));

    at(t0())
        .given(after)
        .when(RewardsCommand::RestoreRedemption {
            order_id: order(9),
            idempotency_key: key("restore-9-again"),
        })
        .then_expect_error(RewardsError::RedemptionAlreadyRestored(order(9)));
    at(t0())
        .given(history)
        .when(RewardsCommand::RestoreRedemption {
            order_id: order(8),
            idempotency_key: key("restore-8"),
        })
        .then_expect_error(RewardsError::NoRedemptionForOrder(order(8)));
}

// ---- donating ----

#[test]
fn donating_turns_points_into_money_at_the_region_rate() {
    at(t0())
        .given(vec![earned(1, 1_000, t0() + days(30))])
        .when(donate(250, 50, "donate-1"))
        .then_expect_events(vec![RewardsEvent::PointsDonated {
            charity: charity(),
            points: 250,
            minor_per_100_points: 50,
            amount: money(125),
            lots: vec![lp(1, 250)],
            idempotency_key: key("donate-1"),
            donated_at: t0(),
        }]);
}

#[test]
fn donating_too_few_points_more_than_available_or_at_no_rate_is_refused() {
    let history = vec![earned(1, 100, t0() + days(30))];
    at(t0())
        .given(history.clone())
        .when(donate(3, 30, "donate-1"))
        .then_expect_error_message(
            "at this rate the points are worth less than one minor unit; donate at least 4 points",
        );
    at(t0())
        .given(history.clone())
        .when(donate(101, 30, "donate-1"))
        .then_expect_error_message("only 100 points are available; donate at most 100");
    at(t0())
        .given(history.clone())
        .when(donate(50, 0, "donate-1"))
        .then_expect_error(RewardsError::InvalidDonationRate);
    at(t0())
        .given(history)
        .when(donate(0, 30, "donate-1"))
        .then_expect_error(RewardsError::PointsOutOfRange);
}

// ---- expiring ----

#[test]
fn expiry_takes_only_the_unspent_rest_of_due_lots_oldest_first() {
    let history = vec![
        earned(1, 100, t0() + days(20)),
        earned(2, 100, t0() + days(10)),
        earned(3, 100, t0() + days(40)),
        // Spending took lot 2 entirely and 30 of lot 1.
        redeemed(9, vec![lp(2, 100), lp(1, 30)]),
    ];
    let as_of = t0() + days(30);
    at(as_of + Duration::hours(1))
        .given(history)
        .when(RewardsCommand::ExpirePoints {
            as_of,
            idempotency_key: key("expire-1"),
        })
        .then_expect_events(vec![RewardsEvent::PointsExpired {
            points: 70,
            lots: vec![lp(1, 70)],
            as_of,
            idempotency_key: key("expire-1"),
            expired_at: as_of + Duration::hours(1),
        }]);
}

#[test]
fn expiry_lists_every_due_lot_by_expiry_and_leaves_the_rest() {
    let history = vec![
        earned(1, 10, t0() + days(20)),
        earned(2, 20, t0() + days(10)),
        earned(3, 40, t0() + days(40)),
    ];
    let now = t0() + days(25);
    let events = at(now)
        .given(history.clone())
        .when(RewardsCommand::ExpirePoints {
            as_of: now,
            idempotency_key: key("expire-1"),
        })
        .inspect_result()
        .expect("expired");
    assert!(
        matches!(events.as_slice(), [RewardsEvent::PointsExpired { points: 30, lots, .. }] if *lots == vec![lp(2, 20), lp(1, 10)]),
        "{events:?}"
    );
    let mut after = history;
    after.extend(events);
    let ledger = ledger_of(after);
    assert_eq!(ledger.balance, 40);
    assert_eq!(
        ledger.lifetime_earned, 70,
        "expiry leaves lifetime earned alone"
    );
}

#[test]
fn expiry_with_nothing_due_records_nothing_and_never_runs_ahead_of_the_clock() {
    let history = vec![earned(1, 100, t0() + days(20))];
    at(t0() + days(5))
        .given(history.clone())
        .when(RewardsCommand::ExpirePoints {
            as_of: t0() + days(5),
            idempotency_key: key("expire-1"),
        })
        .then_expect_events(vec![]);
    at(t0() + days(5))
        .given(history)
        .when(RewardsCommand::ExpirePoints {
            as_of: t0() + days(21),
            idempotency_key: key("expire-1"),
        })
        .then_expect_error(RewardsError::ExpiryInTheFuture(t0() + days(21)));
}

// ---- adjusting ----

#[test]
fn an_admin_credit_opens_a_lot_and_leaves_lifetime_earned_alone() {
    let credit = RewardsEvent::PointsAdjusted {
        points: 300,
        reason: "late delivery goodwill".to_owned(),
        lot: Some(2),
        expires_at: Some(t0() + days(90)),
        lots: vec![],
        idempotency_key: key("adjust-1"),
        adjusted_at: t0(),
    };
    let history = vec![earned(1, 100, t0() + days(30))];
    at(t0())
        .given(history.clone())
        .when(adjust(300, "late delivery goodwill", "adjust-1"))
        .then_expect_events(vec![credit.clone()]);
    let mut after = history;
    after.push(credit);
    let ledger = ledger_of(after);
    assert_eq!((ledger.balance, ledger.lifetime_earned), (400, 100));
}

#[test]
fn an_admin_deduction_takes_from_the_lots_that_expire_first_and_never_below_zero() {
    let history = vec![
        earned(1, 100, t0() + days(30)),
        earned(2, 100, t0() + days(20)),
    ];
    at(t0())
        .given(history.clone())
        .when(adjust(
            -150,
            "points earned on a refunded order",
            "adjust-1",
        ))
        .then_expect_events(vec![RewardsEvent::PointsAdjusted {
            points: -150,
            reason: "points earned on a refunded order".to_owned(),
            lot: None,
            expires_at: None,
            lots: vec![lp(2, 100), lp(1, 50)],
            idempotency_key: key("adjust-1"),
            adjusted_at: t0(),
        }]);
    at(t0())
        .given(history)
        .when(adjust(-201, "too much", "adjust-1"))
        .then_expect_error_message("only 200 points are available; deduct at most 200");
}

#[test]
fn an_adjustment_needs_a_reason_a_non_zero_amount_and_a_valid_expiry() {
    at(t0())
        .given_no_previous_events()
        .when(adjust(0, "nothing", "adjust-1"))
        .then_expect_error(RewardsError::InvalidAdjustment);
    at(t0())
        .given_no_previous_events()
        .when(adjust(i64::MIN, "everything", "adjust-1"))
        .then_expect_error(RewardsError::InvalidAdjustment);
    at(t0())
        .given_no_previous_events()
        .when(adjust(10, "   ", "adjust-1"))
        .then_expect_error(RewardsError::InvalidReason);
    at(t0())
        .given_no_previous_events()
        .when(adjust(10, &"x".repeat(MAX_REASON_CHARS + 1), "adjust-1"))
        .then_expect_error(RewardsError::InvalidReason);
    at(t0())
        .given_no_previous_events()
        .when(RewardsCommand::AdjustPoints {
            points: 10,
            reason: "goodwill".to_owned(),
            expires_in_days: 0,
            idempotency_key: key("adjust-1"),
        })
        .then_expect_error(RewardsError::InvalidExpiry);
}

// ---- idempotency ----

fn every_command(k: &str) -> Vec<RewardsCommand> {
    vec![
        earn(5, 1_000, k),
        redeem(6, 10, k),
        RewardsCommand::RestoreRedemption {
            order_id: order(9),
            idempotency_key: key(k),
        },
        donate(10, 100, k),
        RewardsCommand::ExpirePoints {
            as_of: t0() + days(100),
            idempotency_key: key(k),
        },
        adjust(5, "goodwill", k),
        adjust(-5, "correction", k),
        RewardsCommand::StartSubscription {
            tier: SubscriptionTier::Premium,
            multiplier_bp: 20_000,
            free_delivery: true,
            until: t0() + days(400),
            idempotency_key: key(k),
        },
        RewardsCommand::RenewSubscription {
            until: t0() + days(400),
            idempotency_key: key(k),
        },
        RewardsCommand::CancelSubscription {
            idempotency_key: key(k),
        },
        RewardsCommand::LapseSubscription {
            idempotency_key: key(k),
        },
    ]
}

#[test]
fn a_key_seen_before_makes_any_command_a_no_op() {
    let history = vec![
        earned(1, 100, t0() + days(10)),
        redeemed(9, vec![lp(1, 40)]),
        subscribed(15_000, t0() + days(30)),
    ];
    for seen in ["earn-1", "redeem-9", "sub-start"] {
        for command in every_command(seen) {
            at(t0() + days(50))
                .given(history.clone())
                .when(command)
                .then_expect_events(vec![]);
        }
    }
}

#[test]
fn a_blank_or_overlong_idempotency_key_is_refused() {
    for bad in [String::new(), "  ".to_owned(), "k".repeat(129)] {
        for command in every_command(&bad) {
            at(t0())
                .given_no_previous_events()
                .when(command)
                .then_expect_error(RewardsError::InvalidIdempotencyKey);
        }
    }
}

#[test]
fn keys_are_rebuilt_from_the_events() {
    let ledger = ledger_of(vec![
        earned(1, 100, t0() + days(10)),
        redeemed(9, vec![lp(1, 40)]),
    ]);
    assert!(ledger.processed_keys.contains_key("earn-1"));
    assert!(ledger.processed_keys.contains_key("redeem-9"));
    assert_eq!(ledger.processed_keys.len(), 2);
}

// ---- subscriptions ----

fn start(multiplier_bp: u32, until: DateTime<Utc>, k: &str) -> RewardsCommand {
    RewardsCommand::StartSubscription {
        tier: SubscriptionTier::Plus,
        multiplier_bp,
        free_delivery: true,
        until,
        idempotency_key: key(k),
    }
}

#[test]
fn a_customer_can_start_a_subscription_when_none_is_running() {
    at(t0())
        .given_no_previous_events()
        .when(start(15_000, t0() + days(30), "sub-start"))
        .then_expect_events(vec![subscribed(15_000, t0() + days(30))]);
    at(t0() + days(31))
        .given(vec![subscribed(15_000, t0() + days(30))])
        .when(start(12_000, t0() + days(61), "sub-start-2"))
        .then_expect_events(vec![RewardsEvent::SubscriptionStarted {
            tier: SubscriptionTier::Plus,
            multiplier_bp: 12_000,
            free_delivery: true,
            until: t0() + days(61),
            idempotency_key: key("sub-start-2"),
            started_at: t0() + days(31),
        }]);
}

#[test]
fn starting_a_second_subscription_or_a_bad_one_is_refused() {
    at(t0() + days(1))
        .given(vec![subscribed(15_000, t0() + days(30))])
        .when(start(15_000, t0() + days(60), "sub-start-2"))
        .then_expect_error(RewardsError::SubscriptionAlreadyActive(t0() + days(30)));
    at(t0())
        .given_no_previous_events()
        .when(start(9_999, t0() + days(30), "sub-start"))
        .then_expect_error(RewardsError::InvalidMultiplier);
    at(t0())
        .given_no_previous_events()
        .when(start(MAX_MULTIPLIER_BP + 1, t0() + days(30), "sub-start"))
        .then_expect_error(RewardsError::InvalidMultiplier);
    at(t0())
        .given_no_previous_events()
        .when(start(15_000, t0(), "sub-start"))
        .then_expect_error(RewardsError::InvalidUntil);
}

#[test]
fn a_running_subscription_can_be_renewed_to_a_later_end_even_after_cancelling() {
    let renew = |until: DateTime<Utc>| RewardsCommand::RenewSubscription {
        until,
        idempotency_key: key("sub-renew"),
    };
    at(t0() + days(29))
        .given(vec![subscribed(15_000, t0() + days(30))])
        .when(renew(t0() + days(60)))
        .then_expect_events(vec![RewardsEvent::SubscriptionRenewed {
            until: t0() + days(60),
            idempotency_key: key("sub-renew"),
            renewed_at: t0() + days(29),
        }]);
    at(t0())
        .given(vec![subscribed(15_000, t0() + days(30))])
        .when(renew(t0() + days(30)))
        .then_expect_error(RewardsError::RenewalMustExtend(t0() + days(30)));
    at(t0() + days(30))
        .given(vec![subscribed(15_000, t0() + days(30))])
        .when(renew(t0() + days(60)))
        .then_expect_error(RewardsError::NoActiveSubscription);
    at(t0())
        .given_no_previous_events()
        .when(renew(t0() + days(60)))
        .then_expect_error(RewardsError::NoActiveSubscription);

    let ledger = ledger_of(vec![
        subscribed(15_000, t0() + days(30)),
        RewardsEvent::SubscriptionCancelled {
            ends_at: t0() + days(30),
            idempotency_key: key("sub-cancel"),
            cancelled_at: t0(),
        },
        RewardsEvent::SubscriptionRenewed {
            until: t0() + days(60),
            idempotency_key: key("sub-renew"),
            renewed_at: t0(),
        },
    ]);
    let subscription = ledger.subscription.expect("subscribed");
    assert_eq!(subscription.status, SubscriptionStatus::Active);
    assert_eq!(subscription.until, t0() + days(60));
}

#[test]
fn cancelling_keeps_the_benefits_until_the_paid_period_ends() {
    let cancelled = RewardsEvent::SubscriptionCancelled {
        ends_at: t0() + days(30),
        idempotency_key: key("sub-cancel"),
        cancelled_at: t0() + days(2),
    };
    at(t0() + days(2))
        .given(vec![subscribed(15_000, t0() + days(30))])
        .when(RewardsCommand::CancelSubscription {
            idempotency_key: key("sub-cancel"),
        })
        .then_expect_events(vec![cancelled.clone()]);
    let history = vec![subscribed(15_000, t0() + days(30)), cancelled];
    let ledger = ledger_of(history.clone());
    assert!(ledger.free_delivery_at(t0() + days(29)));
    assert_eq!(ledger.multiplier_bp_at(t0() + days(29)), 15_000);
    assert!(!ledger.free_delivery_at(t0() + days(30)));
    assert_eq!(ledger.multiplier_bp_at(t0() + days(30)), NO_MULTIPLIER_BP);

    at(t0() + days(3))
        .given(history)
        .when(RewardsCommand::CancelSubscription {
            idempotency_key: key("sub-cancel-2"),
        })
        .then_expect_error(RewardsError::SubscriptionAlreadyCancelled(t0() + days(30)));
    at(t0())
        .given_no_previous_events()
        .when(RewardsCommand::CancelSubscription {
            idempotency_key: key("sub-cancel"),
        })
        .then_expect_error(RewardsError::NoActiveSubscription);
}

#[test]
fn a_subscription_lapses_only_once_its_end_has_passed() {
    let lapse = || RewardsCommand::LapseSubscription {
        idempotency_key: key("sub-lapse"),
    };
    let lapsed = RewardsEvent::SubscriptionLapsed {
        idempotency_key: key("sub-lapse"),
        lapsed_at: t0() + days(30),
    };
    at(t0() + days(30))
        .given(vec![subscribed(15_000, t0() + days(30))])
        .when(lapse())
        .then_expect_events(vec![lapsed.clone()]);
    // Renewed meanwhile: the old timer changes nothing.
    at(t0() + days(29))
        .given(vec![subscribed(15_000, t0() + days(30))])
        .when(lapse())
        .then_expect_events(vec![]);
    at(t0() + days(40))
        .given(vec![subscribed(15_000, t0() + days(30)), lapsed.clone()])
        .when(RewardsCommand::LapseSubscription {
            idempotency_key: key("sub-lapse-2"),
        })
        .then_expect_events(vec![]);
    at(t0())
        .given_no_previous_events()
        .when(lapse())
        .then_expect_error(RewardsError::NoSubscription);

    let ledger = ledger_of(vec![subscribed(15_000, t0() + days(30)), lapsed]);
    assert!(!ledger.free_delivery_at(t0() + days(31)));
}

// ---- contracts of the module ----

#[test]
fn every_event_type_is_listed_and_at_version_one() {
    let samples = vec![
        earned(1, 100, t0()),
        redeemed(9, vec![lp(1, 1)]),
        RewardsEvent::RedemptionRestored {
            order_id: order(9),
            points: 1,
            lots: vec![lp(1, 1)],
            idempotency_key: key("r"),
            restored_at: t0(),
        },
        RewardsEvent::PointsDonated {
            charity: charity(),
            points: 100,
            minor_per_100_points: 50,
            amount: money(50),
            lots: vec![lp(1, 100)],
            idempotency_key: key("d"),
            donated_at: t0(),
        },
        RewardsEvent::PointsExpired {
            points: 1,
            lots: vec![lp(1, 1)],
            as_of: t0(),
            idempotency_key: key("e"),
            expired_at: t0(),
        },
        RewardsEvent::PointsAdjusted {
            points: -1,
            reason: "r".to_owned(),
            lot: None,
            expires_at: None,
            lots: vec![lp(1, 1)],
            idempotency_key: key("a"),
            adjusted_at: t0(),
        },
        subscribed(15_000, t0()),
        RewardsEvent::SubscriptionRenewed {
            until: t0(),
            idempotency_key: key("sr"),
            renewed_at: t0(),
        },
        RewardsEvent::SubscriptionCancelled {
            ends_at: t0(),
            idempotency_key: key("sc"),
            cancelled_at: t0(),
        },
        RewardsEvent::SubscriptionLapsed {
            idempotency_key: key("sl"),
            lapsed_at: t0(),
        },
        RewardsEvent::PointsReversed {
            order_id: order(1),
            refunded_total: money(100),
            points: 1,
            unrecovered: 0,
            lots: vec![lp(1, 1)],
            idempotency_key: key("rv"),
            reversed_at: t0(),
        },
    ];
    let types: Vec<String> = samples.iter().map(DomainEvent::event_type).collect();
    assert_eq!(types, RewardsEvent::TYPES.map(str::to_owned));
    assert!(samples.iter().all(|e| e.event_version() == "1.0"));
    assert!(samples.iter().all(|e| e.occurred_at() == t0()));
}

#[test]
fn errors_about_the_ledger_state_are_conflicts_and_bad_commands_are_not() {
    assert!(RewardsError::InsufficientPoints {
        action: "redeem",
        available: 3
    }
    .is_state_conflict());
    assert!(RewardsError::AlreadyEarnedForOrder(order(1)).is_state_conflict());
    assert!(RewardsError::SubscriptionAlreadyActive(t0()).is_state_conflict());
    assert!(!RewardsError::InvalidIdempotencyKey.is_state_conflict());
    assert!(!RewardsError::PointsOutOfRange.is_state_conflict());
    assert!(!RewardsError::DonationTooSmall { min_points: 2 }.is_state_conflict());
}

#[test]
fn the_ledger_survives_a_snapshot_round_trip() {
    let ledger = ledger_of(vec![
        earned(1, 100, t0() + days(10)),
        redeemed(9, vec![lp(1, 40)]),
        subscribed(15_000, t0() + days(30)),
    ]);
    let json = serde_json::to_value(&ledger).expect("serializes");
    let back: RewardsLedger = serde_json::from_value(json).expect("deserializes");
    assert_eq!(back, ledger);
}

// ---- invariants ----

fn any_key() -> impl Strategy<Value = String> {
    // A small pool, so that keys repeat.
    (0u8..16).prop_map(|k| format!("k{k}"))
}

/// Any command, with instants relative to t0 (see [`shifted`]).
fn any_command() -> impl Strategy<Value = RewardsCommand> {
    let order_id = (1u128..5).prop_map(order);
    prop_oneof![
        (
            order_id.clone(),
            0i64..50_000,
            0u32..20,
            0u32..60,
            any_key()
        )
            .prop_map(|(order_id, total, rate, expiry, k)| {
                RewardsCommand::EarnPoints {
                    order_id,
                    order_total: money(total),
                    points_per_100_minor: rate,
                    expires_in_days: expiry,
                    idempotency_key: k,
                }
            }),
        (order_id.clone(), 0u64..3_000, any_key()).prop_map(|(order_id, points, k)| {
            RewardsCommand::RedeemPoints {
                order_id,
                points,
                idempotency_key: k,
            }
        }),
        (order_id.clone(), any_key()).prop_map(|(order_id, k)| {
            RewardsCommand::RestoreRedemption {
                order_id,
                idempotency_key: k,
            }
        }),
        (order_id, 0i64..60_000, any_key()).prop_map(|(order_id, refunded, k)| {
            RewardsCommand::ReverseEarnedPoints {
                order_id,
                refunded_total: money(refunded),
                idempotency_key: k,
            }
        }),
        (0u64..3_000, 0u32..10, any_key()).prop_map(|(points, rate, k)| donate(points, rate, &k)),
        (0i64..10, any_key()).prop_map(|(back, k)| RewardsCommand::ExpirePoints {
            // Resolved against the clock in the property: `back` days before now.
            as_of: t0() - days(back),
            idempotency_key: k,
        }),
        (-3_000i64..3_000, 1u32..60, any_key()).prop_map(|(points, expiry, k)| {
            RewardsCommand::AdjustPoints {
                points,
                reason: "r".to_owned(),
                expires_in_days: expiry,
                idempotency_key: k,
            }
        }),
        (10_000u32..30_000, 1i64..40, any::<bool>(), any_key()).prop_map(
            |(multiplier_bp, until, free_delivery, k)| RewardsCommand::StartSubscription {
                tier: SubscriptionTier::Standard,
                multiplier_bp,
                free_delivery,
                until: t0() + days(until),
                idempotency_key: k,
            }
        ),
        (1i64..80, any_key()).prop_map(|(until, k)| RewardsCommand::RenewSubscription {
            until: t0() + days(until),
            idempotency_key: k,
        }),
        any_key().prop_map(|k| RewardsCommand::CancelSubscription { idempotency_key: k }),
        any_key().prop_map(|k| RewardsCommand::LapseSubscription { idempotency_key: k }),
    ]
}

/// Shifts the command's instants by `shift`, so that they stay near the moving clock.
fn shifted(command: RewardsCommand, shift: Duration) -> RewardsCommand {
    match command {
        RewardsCommand::ExpirePoints {
            as_of,
            idempotency_key,
        } => RewardsCommand::ExpirePoints {
            as_of: as_of + shift,
            idempotency_key,
        },
        RewardsCommand::StartSubscription {
            tier,
            multiplier_bp,
            free_delivery,
            until,
            idempotency_key,
        } => RewardsCommand::StartSubscription {
            tier,
            multiplier_bp,
            free_delivery,
            until: until + shift,
            idempotency_key,
        },
        RewardsCommand::RenewSubscription {
            until,
            idempotency_key,
        } => RewardsCommand::RenewSubscription {
            until: until + shift,
            idempotency_key,
        },
        other => other,
    }
}

fn debits(event: &RewardsEvent) -> &[LotPoints] {
    match event {
        RewardsEvent::PointsRedeemed { lots, .. }
        | RewardsEvent::PointsDonated { lots, .. }
        | RewardsEvent::PointsExpired { lots, .. }
        | RewardsEvent::PointsReversed { lots, .. }
        | RewardsEvent::PointsAdjusted { lots, .. } => lots,
        _ => &[],
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_ledger_keeps_its_invariants_under_any_sequence_of_commands(
        steps in proptest::collection::vec((any_command(), 0i64..72), 1..60)
    ) {
        let mut ledger = RewardsLedger::default();
        let mut now = t0();
        for (command, hours) in steps {
            now += Duration::hours(hours);
            let services = services_at(now);
            let command = shifted(command, now - t0());
            let before = ledger.clone();
            let key_seen = before.processed_keys.contains_key(command.idempotency_key());

            // What refunds took back in this step (the books may close on the order meanwhile).
            let mut taken_back = 0_u64;
            if let Ok(events) = ledger.decide(command.clone(), &services) {
                if key_seen {
                    prop_assert!(events.is_empty(), "a repeated key produced {events:?}");
                }
                for event in events {
                    // No overdraft: every debit fits in what its lot still holds.
                    for taken in debits(&event) {
                        let lot = ledger.lot(taken.lot).expect("a debit names an existing lot");
                        prop_assert!(taken.points > 0);
                        prop_assert!(taken.points <= lot.remaining, "{taken:?} from {lot:?}");
                        if let RewardsEvent::PointsExpired { as_of, .. } = &event {
                            // Expiry takes exactly the unspent rest of a due lot.
                            prop_assert_eq!(taken.points, lot.remaining);
                            prop_assert!(lot.expires_at <= *as_of);
                        } else {
                            // Spending never touches a lot past its expiry.
                            prop_assert!(lot.expires_at > now);
                        }
                    }
                    if let RewardsEvent::PointsReversed { points, unrecovered, .. } = &event {
                        taken_back += points + unrecovered;
                    }
                    let change = event.balance_change();
                    let balance_before = ledger.balance;
                    ledger.apply(event);
                    prop_assert_eq!(
                        i128::from(ledger.balance),
                        i128::from(balance_before) + i128::from(change)
                    );
                }
                // The same command again, with the same key, changes nothing.
                let after = ledger.clone();
                let again = ledger.decide(command, &services);
                prop_assert_eq!(again, Ok(vec![]));
                prop_assert_eq!(&ledger, &after);
            }

            if key_seen {
                prop_assert_eq!(&ledger, &before, "a repeated key changed the ledger");
            }
            let in_lots: u64 = ledger.lots.values().map(|l| l.remaining).sum();
            prop_assert_eq!(ledger.balance, in_lots);
            prop_assert!(ledger.lots.values().all(|l| l.remaining <= l.points));
            prop_assert!(ledger.available_at(now) <= ledger.balance);
            // Lifetime earned grows but by what a refund takes back; an order never has more
            // taken back than it earned.
            prop_assert!(ledger.lifetime_earned + taken_back >= before.lifetime_earned);
            prop_assert!(ledger.earnings.values().all(|e| e.reversed <= e.points));
        }
    }
}

fn reverse(order_n: u128, refunded_minor: i64, k: &str) -> RewardsCommand {
    RewardsCommand::ReverseEarnedPoints {
        order_id: order(order_n),
        refunded_total: money(refunded_minor),
        idempotency_key: key(k),
    }
}

#[test]
fn a_refund_takes_back_the_refunded_share_of_the_points_from_the_orders_own_lot_first() {
    // Order 2 earned 100 points on a total of 10000; lot 1 (another order) expires sooner.
    let history = vec![
        earned(1, 50, t0() + days(10)),
        earned(2, 100, t0() + days(365)),
    ];
    at(t0())
        .given(history.clone())
        .when(reverse(2, 2_500, "refund-1"))
        .then_expect_events(vec![RewardsEvent::PointsReversed {
            order_id: order(2),
            refunded_total: money(2_500),
            points: 25,
            unrecovered: 0,
            lots: vec![lp(2, 25)],
            idempotency_key: key("refund-1"),
            reversed_at: t0(),
        }]);
    // Refunds are cumulative: the whole total refunded takes back the rest, and no more.
    let partly = RewardsEvent::PointsReversed {
        order_id: order(2),
        refunded_total: money(2_500),
        points: 25,
        unrecovered: 0,
        lots: vec![lp(2, 25)],
        idempotency_key: key("refund-1"),
        reversed_at: t0(),
    };
    at(t0())
        .given(vec![history[0].clone(), history[1].clone(), partly.clone()])
        .when(reverse(2, 10_000, "refund-2"))
        .then_expect_events(vec![RewardsEvent::PointsReversed {
            order_id: order(2),
            refunded_total: money(10_000),
            points: 75,
            unrecovered: 0,
            lots: vec![lp(2, 75)],
            idempotency_key: key("refund-2"),
            reversed_at: t0(),
        }]);
    // The same refunded total again (a redelivered refund) takes nothing more.
    at(t0())
        .given(vec![history[0].clone(), history[1].clone(), partly])
        .when(reverse(2, 2_500, "refund-1-again"))
        .then_expect_events(vec![]);
}

#[test]
fn a_fully_refunded_order_keeps_none_of_its_points_nor_its_lifetime_credit() {
    let mut ledger = RewardsLedger::default();
    ledger.apply(earned(1, 40, t0() + days(365)));
    let events = ledger
        .decide(reverse(1, 4_000, "refund"), &services_at(t0()))
        .expect("reversed");
    for event in events {
        ledger.apply(event);
    }
    assert_eq!(ledger.balance, 0);
    assert_eq!(ledger.lifetime_earned, 0);
    assert_eq!(ledger.earnings[&order(1)].reversed, 40);
}

#[test]
fn points_already_spent_are_taken_from_other_lots_and_what_is_left_is_written_off() {
    // Order 1 earned 100 (all redeemed on order 9); order 2 earned 30 since.
    let history = vec![
        earned(1, 100, t0() + days(365)),
        redeemed(9, vec![lp(1, 100)]),
        earned(2, 30, t0() + days(365)),
    ];
    at(t0())
        .given(history)
        .when(reverse(1, 10_000, "refund"))
        .then_expect_events(vec![RewardsEvent::PointsReversed {
            order_id: order(1),
            refunded_total: money(10_000),
            points: 30,
            unrecovered: 70,
            lots: vec![lp(2, 30)],
            idempotency_key: key("refund"),
            reversed_at: t0(),
        }]);
}

#[test]
fn a_refund_of_an_order_that_earned_nothing_yet_changes_nothing() {
    at(t0())
        .given(vec![earned(1, 100, t0() + days(365))])
        .when(reverse(7, 500, "refund"))
        .then_expect_events(vec![]);
}

#[test]
fn a_refund_in_another_currency_is_refused() {
    let eur = Money::new(500, Currency::parse("EUR").expect("EUR")).expect("amount");
    at(t0())
        .given(vec![earned(1, 100, t0() + days(365))])
        .when(RewardsCommand::ReverseEarnedPoints {
            order_id: order(1),
            refunded_total: eur,
            idempotency_key: key("refund"),
        })
        .then_expect_error(RewardsError::RefundCurrencyMismatch {
            order_id: order(1),
            expected: gbp(),
            got: Currency::parse("EUR").expect("EUR"),
        });
}

// ---- closing the books ----

/// Decides `command` at `now` and applies what it records; returns the events.
fn run(
    ledger: &mut RewardsLedger,
    command: RewardsCommand,
    now: DateTime<Utc>,
) -> Vec<RewardsEvent> {
    let events = ledger.decide(command, &services_at(now)).expect("accepted");
    for event in &events {
        ledger.apply(event.clone());
    }
    events
}

fn restore(order_n: u128, k: &str) -> RewardsCommand {
    RewardsCommand::RestoreRedemption {
        order_id: order(order_n),
        idempotency_key: key(k),
    }
}

#[test]
fn a_ledger_closes_its_books_on_what_is_past_the_window_and_stops_growing() {
    // 400 days of one order a day (100 points, expiring after 30 days), a redemption of 30 on
    // another order every day, and the weekly sweep of expired points.
    let mut ledger = RewardsLedger::default();
    let mut history = Vec::new();
    for day in 0..400_i64 {
        let now = t0() + days(day);
        let n = u128::try_from(day).expect("a day");
        let mut commands = vec![
            RewardsCommand::EarnPoints {
                order_id: order(n),
                order_total: money(1_000),
                points_per_100_minor: 10,
                expires_in_days: 30,
                idempotency_key: format!("earn-{day}"),
            },
            redeem(1_000_000 + n, 30, &format!("redeem-{day}")),
        ];
        if day % 7 == 6 {
            commands.push(RewardsCommand::ExpirePoints {
                as_of: now,
                idempotency_key: format!("sweep-{day}"),
            });
        }
        for command in commands {
            history.extend(run(&mut ledger, command, now));
        }
    }
    let open = usize::try_from(BOOKS_OPEN_DAYS).expect("days") + 2;
    assert_eq!(ledger.lots_opened, 400);
    assert!(ledger.earnings.len() <= open, "{}", ledger.earnings.len());
    assert!(
        ledger.redemptions.len() <= open,
        "{}",
        ledger.redemptions.len()
    );
    assert!(ledger.processed_keys.len() <= 2 * open + open / 7 + 1);
    // The lots still holding points (30 days of them, and a week before the sweep) and those
    // an open redemption could give points back to: bounded by the window, not by 400 days.
    assert!(ledger.lots.len() <= 37 + 2 * open, "{}", ledger.lots.len());
    // Nothing spendable went: the balance is what every event put in and took out.
    let moved: i128 = history
        .iter()
        .map(|event| match event {
            RewardsEvent::PointsEarned { points, .. } => i128::from(*points),
            RewardsEvent::PointsRedeemed { points, .. }
            | RewardsEvent::PointsExpired { points, .. } => -i128::from(*points),
            _ => 0,
        })
        .sum();
    assert_eq!(i128::from(ledger.balance), moved);
    assert_eq!(
        ledger.balance,
        ledger.lots.values().map(|l| l.remaining).sum::<u64>()
    );
    assert_eq!(ledger.lifetime_earned, 400 * 100);
    // A replay closes the same books: the state is the events' fold.
    assert_eq!(ledger_of(history), ledger);
}

#[test]
fn past_the_window_a_refund_takes_nothing_back_and_a_restore_is_refused_saying_why() {
    let mut ledger = RewardsLedger::default();
    run(&mut ledger, earn(1, 10_000, "earn-1"), t0());
    run(&mut ledger, redeem(2, 30, "redeem-2"), t0());
    // Within the window both still act.
    let within = t0() + days(BOOKS_OPEN_DAYS - 1);
    let mut open = ledger.clone();
    assert_eq!(run(&mut open, restore(2, "restore-2"), within).len(), 1);
    assert_eq!(
        run(&mut open, reverse(1, 10_000, "refund-1"), within).len(),
        1
    );
    // Past it (an event of day 91 closes the books on day 0), they no longer do.
    let after = t0() + days(BOOKS_OPEN_DAYS + 1);
    run(&mut ledger, earn(3, 1_000, "earn-3"), after);
    assert!(!ledger.earnings.contains_key(&order(1)));
    assert_eq!(
        run(&mut ledger, reverse(1, 10_000, "refund-1"), after),
        vec![]
    );
    let refused = ledger
        .decide(restore(2, "restore-2"), &services_at(after))
        .expect_err("refused");
    assert_eq!(refused, RewardsError::NoRedemptionForOrder(order(2)));
    assert!(refused.to_string().contains("last 90 days"), "{refused}");
    // The points themselves stay: 1,000 earned, 30 redeemed, 100 earned since.
    assert_eq!(ledger.available_at(after), 1_000 - 30 + 100);
}
