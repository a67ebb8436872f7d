//! Given/when/then tests of every order command, accepted and refused.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use proptest::prelude::*;

use super::*;
use crate::services::{Catalogue, FixedClock, MenuItem, MenuOption, Pricing, RegionSettings};
use crate::{Currency, MenuItemId};

type OrderTest = TestFramework<Order>;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 18, 0, 0)
        .single()
        .expect("valid instant")
}

fn region() -> RegionCode {
    RegionCode::parse("uk").expect("valid region")
}

fn gbp(minor: i64) -> Money {
    Money::new(minor, Currency::parse("GBP").expect("GBP")).expect("non-negative")
}

fn catalogue() -> Catalogue {
    let mut regions = BTreeMap::new();
    regions.insert(
        region(),
        RegionSettings {
            currency: Currency::parse("GBP").expect("GBP"),
            tax_basis_points: 2_000,
            delivery_fee_minor: 250,
            accept_within_minutes: 11,
            rating_window_days: 7,
            points_per_100_minor: 5,
            points_expire_in_days: 365,
            courier_speed_kmh: 15,
            redeem_minor_per_100_points: 100,
            donation_minor_per_100_points: 50,
        },
    );
    let mut items = BTreeMap::new();
    let mut options = BTreeMap::new();
    options.insert(
        "extra-cheese".to_owned(),
        MenuOption {
            name: "Extra cheese".to_owned(),
            surcharge_minor: 150,
        },
    );
    items.insert(
        MenuItemId::parse("margherita").expect("valid id"),
        MenuItem {
            name: "Margherita".to_owned(),
            category: "pizza".to_owned(),
            prices: BTreeMap::from([(region(), 1_000)]),
            options,
            available: true,
        },
    );
    items.insert(
        MenuItemId::parse("tiramisu").expect("valid id"),
        MenuItem {
            name: "Tiramisu".to_owned(),
            category: "dessert".to_owned(),
            prices: BTreeMap::from([(region(), 500)]),
            options: BTreeMap::new(),
            available: false,
        },
    );
    Catalogue {
        regions,
        items,
        stores: BTreeMap::from([(
            store(),
            crate::services::StoreSettings {
                name: "Pizza Hub Angel".to_owned(),
                region: region(),
                latitude: 51.53,
                longitude: -0.1,
            },
        )]),
        promotions: BTreeMap::from([(
            "WELCOME10".to_owned(),
            crate::services::Promotion {
                percent_off_bp: 1_000,
                min_subtotal_minor: 1_500,
                regions: vec![],
                active: true,
                once_per_customer: true,
            },
        )]),
        experiments: BTreeMap::new(),
    }
}

fn services_at(now: DateTime<Utc>) -> OrderServices {
    OrderServices::new(Arc::new(catalogue()), Arc::new(FixedClock(now)))
}

fn at(now: DateTime<Utc>) -> OrderTest {
    TestFramework::with(services_at(now))
}

fn address() -> DeliveryAddress {
    DeliveryAddress {
        line1: "1 High Street".to_owned(),
        line2: None,
        city: "London".to_owned(),
        postcode: "N1 1AA".to_owned(),
        latitude: 51.5,
        longitude: -0.1,
    }
}

fn line(item: &str, quantity: u32, options: &[&str]) -> RequestedLine {
    RequestedLine {
        item_id: MenuItemId::parse(item).expect("valid id"),
        quantity,
        options: options.iter().map(|o| (*o).to_owned()).collect(),
    }
}

fn customer() -> CustomerId {
    CustomerId::from_uuid(uuid::Uuid::from_u128(1))
}

fn store() -> StoreId {
    StoreId::from_uuid(uuid::Uuid::from_u128(2))
}

fn place(lines: Vec<RequestedLine>) -> OrderCommand {
    OrderCommand::PlaceOrder {
        customer_id: customer(),
        store_id: store(),
        region: Some(region()),
        lines,
        delivery_address: address(),
        contact: None,
        redeem_points: 0,
        promotion_code: None,
        free_delivery: false,
    }
}

fn placed() -> OrderEvent {
    let quote = catalogue()
        .quote(
            &region(),
            &[line("margherita", 2, &["extra-cheese"])],
            0,
            None,
        )
        .expect("priced");
    OrderEvent::OrderPlaced {
        customer_id: customer(),
        store_id: store(),
        region: region(),
        lines: quote.lines,
        subtotal: quote.subtotal,
        discount: quote.discount,
        tax: quote.tax,
        delivery_fee: quote.delivery_fee,
        total: quote.total,
        delivery_address: address(),
        accept_by: t0() + Duration::minutes(11),
        rating_window_days: 7,
        points_redeemed: 0,
        promotion_code: None,
        free_delivery: false,
        contact: None,
        placed_at: t0(),
    }
}

fn confirmed() -> OrderEvent {
    OrderEvent::OrderConfirmed {
        payment_reference: "pay-1".to_owned(),
        confirmed_at: t0(),
    }
}

fn accepted() -> OrderEvent {
    OrderEvent::OrderAccepted {
        estimated_preparation_minutes: 15,
        accepted_at: t0(),
    }
}

fn delivered_history() -> Vec<OrderEvent> {
    vec![
        placed(),
        confirmed(),
        accepted(),
        OrderEvent::PreparationStarted { started_at: t0() },
        OrderEvent::OrderReady { ready_at: t0() },
        OrderEvent::OrderOutForDelivery { departed_at: t0() },
        OrderEvent::OrderDelivered { delivered_at: t0() },
    ]
}

#[test]
fn placing_an_order_prices_it_from_the_menu_with_tax_and_delivery_fee() {
    let events = at(t0())
        .given_no_previous_events()
        .when(place(vec![line("margherita", 2, &["extra-cheese"])]))
        .inspect_result()
        .expect("placed");
    let [OrderEvent::OrderPlaced {
        subtotal,
        tax,
        delivery_fee,
        total,
        accept_by,
        lines,
        ..
    }] = events.as_slice()
    else {
        panic!("expected one OrderPlaced, got {events:?}");
    };
    assert_eq!(lines[0].unit_price, gbp(1_150));
    assert_eq!(*subtotal, gbp(2_300));
    assert_eq!(*tax, gbp(460));
    assert_eq!(*delivery_fee, gbp(250));
    assert_eq!(*total, gbp(3_010));
    assert_eq!(*accept_by, t0() + Duration::minutes(11));
}

#[test]
fn redeemed_points_are_taken_off_before_tax_and_never_beyond_the_items() {
    let mut command = place(vec![line("margherita", 2, &["extra-cheese"])]);
    if let OrderCommand::PlaceOrder { redeem_points, .. } = &mut command {
        *redeem_points = 300;
    }
    let events = at(t0())
        .given_no_previous_events()
        .when(command)
        .inspect_result()
        .expect("placed");
    let [OrderEvent::OrderPlaced {
        discount,
        tax,
        total,
        points_redeemed,
        ..
    }] = events.as_slice()
    else {
        panic!("expected one OrderPlaced, got {events:?}");
    };
    // 2300 - 300 = 2000 taxable; 20 % tax = 400; + 250 fee.
    assert_eq!(
        (*discount, *tax, *total, *points_redeemed),
        (gbp(300), gbp(400), gbp(2_650), 300)
    );

    let mut too_many = place(vec![line("margherita", 1, &[])]);
    if let OrderCommand::PlaceOrder { redeem_points, .. } = &mut too_many {
        *redeem_points = 1_001;
    }
    at(t0())
        .given_no_previous_events()
        .when(too_many)
        .then_expect_error(OrderError::Pricing(PricingError::RedemptionTooLarge {
            requested: 1_001,
            max: 1_000,
        }));
}

#[test]
fn an_order_modified_before_acceptance_is_priced_again() {
    let events = at(t0())
        .given(vec![placed()])
        .when(OrderCommand::ModifyOrder {
            lines: vec![line("margherita", 1, &[])],
        })
        .inspect_result()
        .expect("modified");
    let [OrderEvent::OrderModified {
        subtotal, total, ..
    }] = events.as_slice()
    else {
        panic!("expected one OrderModified, got {events:?}");
    };
    // 1000 + 20 % tax + 250 fee.
    assert_eq!((*subtotal, *total), (gbp(1_000), gbp(1_450)));
    at(t0())
        .given(vec![placed(), confirmed(), accepted()])
        .when(OrderCommand::ModifyOrder {
            lines: vec![line("margherita", 1, &[])],
        })
        .then_expect_error(OrderError::InvalidTransition {
            action: "modify",
            status: "Accepted",
        });
}

#[test]
fn a_confirmed_order_cannot_be_modified_above_what_was_confirmed() {
    at(t0())
        .given(vec![placed(), confirmed()])
        .when(OrderCommand::ModifyOrder {
            lines: vec![line("margherita", 3, &["extra-cheese"])],
        })
        .then_expect_error(OrderError::ExceedsConfirmedTotal {
            requested: gbp(3 * 1_150 + 690 + 250),
            confirmed: gbp(3_010),
        });
    at(t0())
        .given(vec![placed(), confirmed()])
        .when(OrderCommand::ModifyOrder {
            lines: vec![line("margherita", 1, &[])],
        })
        .then_expect_events(vec![OrderEvent::OrderModified {
            lines: catalogue()
                .quote(&region(), &[line("margherita", 1, &[])], 0, None)
                .expect("priced")
                .lines,
            subtotal: gbp(1_000),
            discount: gbp(0),
            tax: gbp(200),
            delivery_fee: gbp(250),
            total: gbp(1_450),
            modified_at: t0(),
        }]);
}

#[test]
fn the_stores_region_prices_the_order_and_another_region_or_an_unknown_store_is_refused() {
    let mut unnamed = place(vec![line("margherita", 1, &[])]);
    if let OrderCommand::PlaceOrder { region, .. } = &mut unnamed {
        *region = None;
    }
    let events = at(t0())
        .given_no_previous_events()
        .when(unnamed)
        .inspect_result()
        .expect("placed in the store's region");
    assert!(
        matches!(&events[..], [OrderEvent::OrderPlaced { region: placed, .. }] if *placed == region()),
        "{events:?}"
    );

    let berlin = RegionCode::parse("de-berlin").expect("region");
    let mut elsewhere = place(vec![line("margherita", 1, &[])]);
    if let OrderCommand::PlaceOrder { region, .. } = &mut elsewhere {
        *region = Some(berlin.clone());
    }
    at(t0())
        .given_no_previous_events()
        .when(elsewhere)
        .then_expect_error(OrderError::Pricing(PricingError::NotTheStoresRegion {
            named: berlin,
            store: store(),
            store_region: region(),
        }));

    let nowhere = StoreId::from_uuid(uuid::Uuid::from_u128(404));
    let mut unknown = place(vec![line("margherita", 1, &[])]);
    if let OrderCommand::PlaceOrder { store_id, .. } = &mut unknown {
        *store_id = nowhere;
    }
    at(t0())
        .given_no_previous_events()
        .when(unknown)
        .then_expect_error(OrderError::Pricing(PricingError::UnknownStore(nowhere)));
}

#[test]
fn an_option_listed_twice_on_a_line_is_refused() {
    at(t0())
        .given_no_previous_events()
        .when(place(vec![line(
            "margherita",
            1,
            &["extra-cheese", "extra-cheese"],
        )]))
        .then_expect_error(OrderError::RepeatedOption {
            item: MenuItemId::parse("margherita").expect("id"),
            option: "extra-cheese".to_owned(),
        });
}

#[test]
fn a_promotion_code_takes_its_share_off_before_points_and_tax() {
    let mut command = place(vec![line("margherita", 2, &["extra-cheese"])]);
    if let OrderCommand::PlaceOrder {
        promotion_code,
        redeem_points,
        ..
    } = &mut command
    {
        *promotion_code = Some("WELCOME10".to_owned());
        *redeem_points = 70;
    }
    let events = at(t0())
        .given_no_previous_events()
        .when(command)
        .inspect_result()
        .expect("placed");
    let [OrderEvent::OrderPlaced {
        discount, total, ..
    }] = events.as_slice()
    else {
        panic!("expected one OrderPlaced, got {events:?}");
    };
    // 2300 - 230 (10 %) - 70 (points) = 2000; + 400 tax + 250 fee.
    assert_eq!((*discount, *total), (gbp(300), gbp(2_650)));

    let with_code = |code: &str, lines| {
        let mut command = place(lines);
        if let OrderCommand::PlaceOrder { promotion_code, .. } = &mut command {
            *promotion_code = Some(code.to_owned());
        }
        command
    };
    at(t0())
        .given_no_previous_events()
        .when(with_code("NOPE", vec![line("margherita", 2, &[])]))
        .then_expect_error(OrderError::Pricing(PricingError::UnknownPromotion(
            "NOPE".to_owned(),
        )));
    at(t0())
        .given_no_previous_events()
        .when(with_code("WELCOME10", vec![line("margherita", 1, &[])]))
        .then_expect_error(OrderError::Pricing(PricingError::PromotionNotApplicable {
            code: "WELCOME10".to_owned(),
            reason: "the items must come to at least 1500 minor units".to_owned(),
        }));
}

#[test]
fn a_subscriber_pays_no_delivery_fee() {
    let mut command = place(vec![line("margherita", 2, &["extra-cheese"])]);
    if let OrderCommand::PlaceOrder { free_delivery, .. } = &mut command {
        *free_delivery = true;
    }
    let events = at(t0())
        .given_no_previous_events()
        .when(command)
        .inspect_result()
        .expect("placed");
    let [OrderEvent::OrderPlaced {
        delivery_fee,
        total,
        free_delivery,
        ..
    }] = events.as_slice()
    else {
        panic!("expected one OrderPlaced, got {events:?}");
    };
    assert_eq!(
        (*delivery_fee, *total, *free_delivery),
        (gbp(0), gbp(2_760), true)
    );
}

#[test]
fn placing_an_order_twice_is_refused() {
    at(t0())
        .given(vec![placed()])
        .when(place(vec![line("margherita", 1, &[])]))
        .then_expect_error(OrderError::AlreadyPlaced);
}

#[test]
fn placing_an_order_with_bad_lines_is_refused_with_the_reason() {
    at(t0())
        .given_no_previous_events()
        .when(place(vec![]))
        .then_expect_error(OrderError::InvalidLineCount);
    at(t0())
        .given_no_previous_events()
        .when(place(vec![line("margherita", 0, &[])]))
        .then_expect_error(OrderError::InvalidQuantity);
    at(t0())
        .given_no_previous_events()
        .when(place(vec![line("calzone", 1, &[])]))
        .then_expect_error(OrderError::Pricing(PricingError::UnknownItem(
            MenuItemId::parse("calzone").expect("valid"),
        )));
    at(t0())
        .given_no_previous_events()
        .when(place(vec![line("tiramisu", 1, &[])]))
        .then_expect_error(OrderError::Pricing(PricingError::Unavailable(
            MenuItemId::parse("tiramisu").expect("valid"),
        )));
    at(t0())
        .given_no_previous_events()
        .when(place(vec![line("margherita", 1, &["anchovies"])]))
        .then_expect_error_message(
            "cannot price the order: menu item `margherita` has no option `anchovies`",
        );
}

#[test]
fn an_order_moves_forward_from_confirmation_to_completion() {
    at(t0())
        .given(vec![placed()])
        .when(OrderCommand::ConfirmPayment {
            payment_reference: "pay-1".to_owned(),
        })
        .then_expect_events(vec![confirmed()]);
    at(t0())
        .given(vec![placed(), confirmed()])
        .when(OrderCommand::AcceptOrder {
            estimated_preparation_minutes: 15,
        })
        .then_expect_events(vec![accepted()]);
    at(t0())
        .given(vec![placed(), confirmed(), accepted()])
        .when(OrderCommand::StartPreparation)
        .then_expect_events(vec![OrderEvent::PreparationStarted { started_at: t0() }]);
    let mut history = delivered_history();
    history.truncate(4);
    at(t0())
        .given(history.clone())
        .when(OrderCommand::MarkReady)
        .then_expect_events(vec![OrderEvent::OrderReady { ready_at: t0() }]);
    history.push(OrderEvent::OrderReady { ready_at: t0() });
    at(t0())
        .given(history.clone())
        .when(OrderCommand::HandToCourier)
        .then_expect_events(vec![OrderEvent::OrderOutForDelivery { departed_at: t0() }]);
    history.push(OrderEvent::OrderOutForDelivery { departed_at: t0() });
    at(t0())
        .given(history)
        .when(OrderCommand::MarkDelivered)
        .then_expect_events(vec![OrderEvent::OrderDelivered { delivered_at: t0() }]);
    at(t0())
        .given(delivered_history())
        .when(OrderCommand::CompleteOrder)
        .then_expect_events(vec![OrderEvent::OrderCompleted { completed_at: t0() }]);
}

#[test]
fn steps_out_of_order_are_refused_with_the_current_status() {
    at(t0())
        .given(vec![placed()])
        .when(OrderCommand::AcceptOrder {
            estimated_preparation_minutes: 15,
        })
        .then_expect_error(OrderError::InvalidTransition {
            action: "accept",
            status: "Placed",
        });
    at(t0())
        .given(delivered_history())
        .when(OrderCommand::StartPreparation)
        .then_expect_error(OrderError::InvalidTransition {
            action: "start preparing",
            status: "Delivered",
        });
    at(t0())
        .given_no_previous_events()
        .when(OrderCommand::MarkReady)
        .then_expect_error(OrderError::NotFound);
}

#[test]
fn a_store_can_reject_before_accepting_with_a_reason() {
    at(t0())
        .given(vec![placed(), confirmed()])
        .when(OrderCommand::RejectOrder {
            reason: RejectionReason::Busy,
        })
        .then_expect_events(vec![OrderEvent::OrderRejected {
            reason: RejectionReason::Busy,
            rejected_at: t0(),
        }]);
    at(t0())
        .given(vec![placed(), confirmed(), accepted()])
        .when(OrderCommand::RejectOrder {
            reason: RejectionReason::Busy,
        })
        .then_expect_error(OrderError::InvalidTransition {
            action: "reject",
            status: "Accepted",
        });
}

#[test]
fn a_customer_can_cancel_until_preparation_starts() {
    let cancel = || OrderCommand::CancelOrder {
        by: CancelledBy::Customer,
        reason: "changed my mind".to_owned(),
    };
    at(t0())
        .given(vec![placed(), confirmed(), accepted()])
        .when(cancel())
        .then_expect_events(vec![OrderEvent::OrderCancelled {
            cancelled_by: CancelledBy::Customer,
            reason: "changed my mind".to_owned(),
            cancelled_at: t0(),
        }]);
    let mut preparing = delivered_history();
    preparing.truncate(4);
    at(t0())
        .given(preparing)
        .when(cancel())
        .then_expect_error(OrderError::TooLateToCancel("Preparing"));
    at(t0())
        .given(delivered_history())
        .when(cancel())
        .then_expect_error(OrderError::InvalidTransition {
            action: "cancel",
            status: "Delivered",
        });
}

#[test]
fn the_accept_by_deadline_cancels_only_an_order_still_waiting() {
    let late = t0() + Duration::minutes(12);
    at(late)
        .given(vec![placed(), confirmed()])
        .when(OrderCommand::ExpireAcceptance)
        .then_expect_events(vec![OrderEvent::OrderCancelled {
            cancelled_by: CancelledBy::System,
            reason: "not accepted by the store in time".to_owned(),
            cancelled_at: late,
        }]);
    at(t0() + Duration::minutes(5))
        .given(vec![placed(), confirmed()])
        .when(OrderCommand::ExpireAcceptance)
        .then_expect_events(vec![]);
    at(late)
        .given(vec![placed(), confirmed(), accepted()])
        .when(OrderCommand::ExpireAcceptance)
        .then_expect_events(vec![]);
}

#[test]
fn a_delivered_order_can_be_rated_once_within_the_window() {
    at(t0() + Duration::days(1))
        .given(delivered_history())
        .when(OrderCommand::RateOrder {
            stars: 5,
            comment: Some("hot and fast".to_owned()),
        })
        .then_expect_events(vec![OrderEvent::OrderRated {
            stars: 5,
            comment: Some("hot and fast".to_owned()),
            rated_at: t0() + Duration::days(1),
        }]);
    let mut rated = delivered_history();
    rated.push(OrderEvent::OrderRated {
        stars: 4,
        comment: None,
        rated_at: t0(),
    });
    at(t0())
        .given(rated)
        .when(OrderCommand::RateOrder {
            stars: 5,
            comment: None,
        })
        .then_expect_error(OrderError::AlreadyRated);
    at(t0() + Duration::days(8))
        .given(delivered_history())
        .when(OrderCommand::RateOrder {
            stars: 5,
            comment: None,
        })
        .then_expect_error(OrderError::RatingWindowClosed(7));
    at(t0())
        .given(delivered_history())
        .when(OrderCommand::RateOrder {
            stars: 6,
            comment: None,
        })
        .then_expect_error(OrderError::InvalidStars);
    at(t0())
        .given(vec![placed()])
        .when(OrderCommand::RateOrder {
            stars: 5,
            comment: None,
        })
        .then_expect_error(OrderError::InvalidTransition {
            action: "rate",
            status: "Placed",
        });
}

fn any_command() -> impl Strategy<Value = OrderCommand> {
    prop_oneof![
        Just(place(vec![line("margherita", 1, &[])])),
        Just(OrderCommand::ConfirmPayment {
            payment_reference: "p".to_owned()
        }),
        (1u32..4).prop_map(|q| OrderCommand::ModifyOrder {
            lines: vec![line("margherita", q, &[])]
        }),
        Just(OrderCommand::AcceptOrder {
            estimated_preparation_minutes: 10
        }),
        Just(OrderCommand::RejectOrder {
            reason: RejectionReason::Busy
        }),
        Just(OrderCommand::StartPreparation),
        Just(OrderCommand::MarkReady),
        Just(OrderCommand::HandToCourier),
        Just(OrderCommand::MarkDelivered),
        Just(OrderCommand::CompleteOrder),
        prop_oneof![
            Just(CancelledBy::Customer),
            Just(CancelledBy::Store),
            Just(CancelledBy::System)
        ]
        .prop_map(|by| OrderCommand::CancelOrder {
            by,
            reason: "r".to_owned()
        }),
        Just(OrderCommand::ExpireAcceptance),
        (0u8..7).prop_map(|stars| OrderCommand::RateOrder {
            stars,
            comment: None
        }),
    ]
}

proptest! {
    #[test]
    fn order_states_only_move_forward(commands in proptest::collection::vec(any_command(), 1..30), minutes in 0i64..30) {
        let services = services_at(t0() + Duration::minutes(minutes));
        let mut order = Order::default();
        for command in commands {
            let before = order.status;
            if let Ok(events) = order.decide(command, &services) {
                for event in events {
                    order.apply(event);
                }
            }
            prop_assert!(order.status.rank() >= before.rank());
            if before.rank() == 8 {
                prop_assert_eq!(order.status, before, "a final state is final");
            }
            if let Some(total) = order.total {
                prop_assert!(total.minor() >= 0);
            }
        }
    }
}

#[test]
fn the_contact_is_carried_into_the_placed_event_as_given_even_when_sealed() {
    let sealed = "pii:v1:00000000-0000-0000-0000-000000000001:c2VhbGVkLW5hbWU";
    let mut command = place(vec![line("margherita", 1, &[])]);
    if let OrderCommand::PlaceOrder { contact, .. } = &mut command {
        *contact = Some(Contact {
            name: sealed.to_owned(),
            phone: None,
            email: Some(sealed.to_owned()),
        });
    }
    let events = at(t0())
        .given_no_previous_events()
        .when(command)
        .inspect_result()
        .expect("placed");
    let [OrderEvent::OrderPlaced {
        contact: Some(contact),
        ..
    }] = events.as_slice()
    else {
        panic!("expected one OrderPlaced with a contact, got {events:?}");
    };
    assert_eq!(contact.name, sealed);
    assert_eq!(contact.email.as_deref(), Some(sealed));
}

#[test]
fn a_contact_without_a_name_is_refused() {
    let mut command = place(vec![line("margherita", 1, &[])]);
    if let OrderCommand::PlaceOrder { contact, .. } = &mut command {
        *contact = Some(Contact {
            name: "  ".to_owned(),
            phone: Some("+44 20 7946 0000".to_owned()),
            email: None,
        });
    }
    at(t0())
        .given_no_previous_events()
        .when(command)
        .then_expect_error(OrderError::ContactWithoutName);
}

#[test]
fn an_order_remembers_where_it_goes_and_whom_to_contact() {
    let mut order = Order::default();
    order.apply(placed());
    assert_eq!(order.delivery_address, Some(address()));
    assert_eq!(order.contact, None);
}

fn out_for_delivery_history() -> Vec<OrderEvent> {
    vec![
        placed(),
        confirmed(),
        accepted(),
        OrderEvent::PreparationStarted { started_at: t0() },
        OrderEvent::OrderReady { ready_at: t0() },
        OrderEvent::OrderOutForDelivery { departed_at: t0() },
    ]
}

#[test]
fn the_platform_ends_an_order_whose_delivery_failed_with_the_reason() {
    let reason = "the delivery failed: CustomerUnreachable".to_owned();
    at(t0())
        .given(out_for_delivery_history())
        .when(OrderCommand::CancelOrder {
            by: CancelledBy::System,
            reason: reason.clone(),
        })
        .then_expect_events(vec![OrderEvent::OrderCancelled {
            cancelled_by: CancelledBy::System,
            reason,
            cancelled_at: t0(),
        }]);
    // The customer and the store still cannot once the food is on its way.
    at(t0())
        .given(out_for_delivery_history())
        .when(OrderCommand::CancelOrder {
            by: CancelledBy::Customer,
            reason: "late".to_owned(),
        })
        .then_expect_error(OrderError::TooLateToCancel("OutForDelivery"));
    at(t0())
        .given(out_for_delivery_history())
        .when(OrderCommand::CancelOrder {
            by: CancelledBy::Store,
            reason: "late".to_owned(),
        })
        .then_expect_error(OrderError::InvalidTransition {
            action: "cancel",
            status: "OutForDelivery",
        });
    // Once delivered, the money was captured: a refund is the way back, not a cancellation.
    at(t0())
        .given(delivered_history())
        .when(OrderCommand::CancelOrder {
            by: CancelledBy::System,
            reason: "r".to_owned(),
        })
        .then_expect_error(OrderError::InvalidTransition {
            action: "cancel",
            status: "Delivered",
        });
}

#[test]
fn an_order_whose_drop_off_no_courier_could_reach_is_refused_at_placement() {
    let mut catalogue = catalogue();
    catalogue.stores.insert(
        store(),
        crate::services::StoreSettings {
            name: "Angel".to_owned(),
            region: region(),
            latitude: 51.5322,
            longitude: -0.1058,
        },
    );
    let services = OrderServices::new(Arc::new(catalogue), Arc::new(FixedClock(t0())));
    let mut far = place(vec![line("margherita", 1, &[])]);
    if let OrderCommand::PlaceOrder {
        delivery_address, ..
    } = &mut far
    {
        // Edinburgh: 531 km from a London store.
        delivery_address.latitude = 55.95;
        delivery_address.longitude = -3.19;
    }
    TestFramework::<Order>::with(services.clone())
        .given_no_previous_events()
        .when(far)
        .then_expect_error(OrderError::TooFarForDelivery {
            km: 531,
            max_km: crate::delivery::MAX_DELIVERY_DISTANCE_KM,
        });
    // Around the corner is fine.
    let near = TestFramework::<Order>::with(services)
        .given_no_previous_events()
        .when(place(vec![line("margherita", 1, &[])]))
        .inspect_result();
    assert!(near.is_ok(), "{near:?}");
}
