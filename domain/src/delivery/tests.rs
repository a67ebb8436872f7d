//! Given/when/then tests of every delivery command, accepted and refused, and the invariants as
//! properties.
//!
//! The journey used throughout: a store in London, the customer 3 km north of it, couriers at
//! 15 km/h (3 km of great circle are 3.9 km of road: 936 s), food ready 15 minutes after the
//! request at `t0`. A courier on schedule keeps the expected arrival at `t0 + 1836 s` while the
//! window around it narrows.

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use proptest::prelude::*;

use super::geo::EARTH_MEAN_RADIUS_METERS;
use super::*;
use crate::services::FixedClock;

type DeliveryTest = TestFramework<Delivery>;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 18, 0, 0)
        .single()
        .expect("valid instant")
}

fn secs(seconds: i64) -> DateTime<Utc> {
    t0() + Duration::seconds(seconds)
}

fn mins(minutes: i64) -> DateTime<Utc> {
    t0() + Duration::minutes(minutes)
}

fn services_at(now: DateTime<Utc>) -> DeliveryServices {
    DeliveryServices::new(Arc::new(FixedClock(now)))
}

fn at(now: DateTime<Utc>) -> DeliveryTest {
    TestFramework::with(services_at(now))
}

fn point(latitude: f64, longitude: f64) -> GeoPoint {
    GeoPoint::new(latitude, longitude).expect("valid coordinates")
}

/// A point `km` north (south if negative) of `from` along its meridian.
fn north_of(from: GeoPoint, km: f64) -> GeoPoint {
    let degrees = (km * 1_000.0 / EARTH_MEAN_RADIUS_METERS).to_degrees();
    point(from.latitude + degrees, from.longitude)
}

fn store_location() -> GeoPoint {
    point(51.5300, -0.1200)
}

fn customer_location() -> GeoPoint {
    north_of(store_location(), 3.0)
}

fn order() -> OrderId {
    OrderId::from_uuid(uuid::Uuid::from_u128(1))
}

fn store() -> StoreId {
    StoreId::from_uuid(uuid::Uuid::from_u128(2))
}

fn courier() -> CourierId {
    CourierId::from_uuid(uuid::Uuid::from_u128(3))
}

fn other_courier() -> CourierId {
    CourierId::from_uuid(uuid::Uuid::from_u128(4))
}

fn region() -> RegionCode {
    RegionCode::parse("uk-london").expect("valid region")
}

fn request() -> DeliveryCommand {
    DeliveryCommand::RequestDelivery {
        order_id: order(),
        store_id: store(),
        region: region(),
        pickup: store_location(),
        dropoff: customer_location(),
        preparation_ready_at: mins(15),
        average_speed_kmh: 15,
    }
}

fn requested() -> DeliveryEvent {
    DeliveryEvent::DeliveryRequested {
        order_id: order(),
        store_id: store(),
        region: region(),
        pickup: store_location(),
        dropoff: customer_location(),
        preparation_ready_at: mins(15),
        average_speed_kmh: 15,
        requested_at: t0(),
    }
}

/// An `EtaUpdated`, instants in seconds after `t0`.
fn eta(
    expected: i64,
    earliest: i64,
    latest: i64,
    remaining_meters: u32,
    estimated_at: DateTime<Utc>,
) -> DeliveryEvent {
    DeliveryEvent::EtaUpdated {
        expected_at: secs(expected),
        earliest_at: secs(earliest),
        latest_at: secs(latest),
        remaining_meters,
        estimated_at,
    }
}

/// Courier not located yet: assumed at the store when the food is ready (t0 + 900 s), then
/// 936 s of riding; margin 60 + 234 (riding) + 180 (preparation) + 600 (unlocated) s.
fn first_eta() -> DeliveryEvent {
    eta(1836, 762, 2910, 3_000, t0())
}

fn assigned() -> DeliveryEvent {
    DeliveryEvent::CourierAssigned {
        courier_id: courier(),
        assigned_at: mins(1),
    }
}

/// At t0 + 2 min the courier is 1.5 km south of the store.
fn located() -> DeliveryEvent {
    DeliveryEvent::CourierLocationUpdated {
        position: north_of(store_location(), -1.5),
        device_time: secs(115),
        received_at: mins(2),
    }
}

/// 468 s to the store, 312 s waiting, 936 s riding; margin 60 + 351 + 156 s.
fn located_eta() -> DeliveryEvent {
    eta(1836, 1269, 2403, 4_500, mins(2))
}

fn assigned_history() -> Vec<DeliveryEvent> {
    vec![requested(), first_eta(), assigned()]
}

fn at_pickup_history() -> Vec<DeliveryEvent> {
    let mut history = assigned_history();
    history.extend([
        located(),
        located_eta(),
        DeliveryEvent::CourierArrivedAtPickup {
            arrived_at: mins(10),
        },
        eta(1836, 1482, 2190, 3_000, mins(10)),
    ]);
    history
}

fn picked_up_history() -> Vec<DeliveryEvent> {
    let mut history = at_pickup_history();
    history.extend([
        DeliveryEvent::PickedUpAtStore {
            picked_up_at: mins(15),
        },
        eta(1836, 1542, 2130, 3_000, mins(15)),
    ]);
    history
}

fn at_dropoff_history() -> Vec<DeliveryEvent> {
    let mut history = picked_up_history();
    history.extend([
        DeliveryEvent::CourierArrivedAtDropoff {
            arrived_at: mins(30),
        },
        eta(1800, 1800, 1860, 0, mins(30)),
    ]);
    history
}

fn delivered_history() -> Vec<DeliveryEvent> {
    let mut history = at_dropoff_history();
    history.push(DeliveryEvent::DeliveredToCustomer {
        delivered_at: mins(31),
    });
    history
}

fn failed_history() -> Vec<DeliveryEvent> {
    let mut history = at_dropoff_history();
    history.push(DeliveryEvent::DeliveryFailed {
        reason: FailureReason::CustomerUnreachable,
        failed_at: mins(40),
    });
    history
}

fn cancelled_history() -> Vec<DeliveryEvent> {
    let mut history = assigned_history();
    history.push(DeliveryEvent::DeliveryCancelled {
        reason: "store closed".to_owned(),
        cancelled_at: mins(5),
    });
    history
}

fn locate(position: GeoPoint, device_time: DateTime<Utc>) -> DeliveryCommand {
    DeliveryCommand::UpdateCourierLocation {
        position,
        device_time,
    }
}

// --- RequestDelivery ---------------------------------------------------------------------------

#[test]
fn requesting_a_delivery_records_the_route_and_publishes_a_first_estimate_with_its_uncertainty() {
    at(t0())
        .given_no_previous_events()
        .when(request())
        .then_expect_events(vec![requested(), first_eta()]);
}

#[test]
fn requesting_a_delivery_keeps_the_preparation_time_to_the_microsecond_of_the_contracts() {
    let events = at(t0())
        .given_no_previous_events()
        .when(DeliveryCommand::RequestDelivery {
            order_id: order(),
            store_id: store(),
            region: region(),
            pickup: store_location(),
            dropoff: customer_location(),
            preparation_ready_at: mins(15) + Duration::nanoseconds(1_234_567),
            average_speed_kmh: 15,
        })
        .inspect_result()
        .expect("requested");
    let Some(DeliveryEvent::DeliveryRequested {
        preparation_ready_at,
        ..
    }) = events.first()
    else {
        panic!("expected DeliveryRequested first, got {events:?}");
    };
    assert_eq!(
        *preparation_ready_at,
        mins(15) + Duration::microseconds(1_234)
    );
}

#[test]
fn requesting_a_delivery_twice_is_refused() {
    at(t0())
        .given(vec![requested()])
        .when(request())
        .then_expect_error(DeliveryError::AlreadyRequested);
}

#[test]
fn requesting_a_delivery_with_bad_figures_is_refused_with_the_reason() {
    let with = |change: fn(&mut DeliveryCommand)| {
        let mut command = request();
        change(&mut command);
        command
    };
    let cases: [(DeliveryCommand, DeliveryError); 6] = [
        (
            with(|c| {
                if let DeliveryCommand::RequestDelivery { pickup, .. } = c {
                    pickup.latitude = 91.0;
                }
            }),
            DeliveryError::InvalidCoordinates { field: "pickup" },
        ),
        (
            with(|c| {
                if let DeliveryCommand::RequestDelivery { dropoff, .. } = c {
                    dropoff.longitude = f64::NAN;
                }
            }),
            DeliveryError::InvalidCoordinates { field: "dropoff" },
        ),
        (
            with(|c| {
                if let DeliveryCommand::RequestDelivery {
                    average_speed_kmh, ..
                } = c
                {
                    *average_speed_kmh = 0;
                }
            }),
            DeliveryError::InvalidSpeed,
        ),
        (
            with(|c| {
                if let DeliveryCommand::RequestDelivery {
                    average_speed_kmh, ..
                } = c
                {
                    *average_speed_kmh = MAX_AVERAGE_SPEED_KMH + 1;
                }
            }),
            DeliveryError::InvalidSpeed,
        ),
        (
            // Latitude and longitude swapped: the drop-off lands in the Indian Ocean.
            with(|c| {
                if let DeliveryCommand::RequestDelivery { dropoff, .. } = c {
                    *dropoff = GeoPoint {
                        latitude: dropoff.longitude,
                        longitude: dropoff.latitude,
                    };
                }
            }),
            DeliveryError::TooFar { km: 7_496 },
        ),
        (
            with(|c| {
                if let DeliveryCommand::RequestDelivery {
                    preparation_ready_at,
                    ..
                } = c
                {
                    *preparation_ready_at = t0() + Duration::hours(25);
                }
            }),
            DeliveryError::PreparationTooFarAhead,
        ),
    ];
    for (command, error) in cases {
        at(t0())
            .given_no_previous_events()
            .when(command)
            .then_expect_error(error);
    }
}

#[test]
fn a_refused_request_says_what_to_fix() {
    at(t0())
        .given_no_previous_events()
        .when(DeliveryCommand::RequestDelivery {
            order_id: order(),
            store_id: store(),
            region: region(),
            pickup: store_location(),
            dropoff: north_of(store_location(), 150.0),
            preparation_ready_at: mins(15),
            average_speed_kmh: 15,
        })
        .then_expect_error_message(
            "the drop-off is 150 km from the store, more than 100 km; \
             check the coordinates (latitude and longitude swapped?)",
        );
}

// --- AssignCourier -----------------------------------------------------------------------------

#[test]
fn assigning_a_courier_is_recorded_without_a_new_estimate_while_it_barely_moves() {
    // Unlocated courier: expected t0 + 1836 s still, the window 12 s narrower on each side.
    at(mins(1))
        .given(vec![requested(), first_eta()])
        .when(DeliveryCommand::AssignCourier {
            courier_id: courier(),
        })
        .then_expect_events(vec![assigned()]);
}

#[test]
fn assigning_the_same_courier_again_changes_nothing() {
    at(mins(2))
        .given(assigned_history())
        .when(DeliveryCommand::AssignCourier {
            courier_id: courier(),
        })
        .then_expect_events(vec![]);
}

#[test]
fn another_courier_can_take_over_until_the_store_is_reached_and_starts_unlocated() {
    // The replaced courier's position no longer counts: the estimate widens again.
    let mut history = assigned_history();
    history.extend([located(), located_eta()]);
    at(mins(3))
        .given(history)
        .when(DeliveryCommand::AssignCourier {
            courier_id: other_courier(),
        })
        .then_expect_events(vec![
            DeliveryEvent::CourierAssigned {
                courier_id: other_courier(),
                assigned_at: mins(3),
            },
            // 720 s waiting, 936 s riding; margin 60 + 234 + 144 + 600 s.
            eta(1836, 798, 2874, 3_000, mins(3)),
        ]);
    at(mins(11))
        .given(at_pickup_history())
        .when(DeliveryCommand::AssignCourier {
            courier_id: other_courier(),
        })
        .then_expect_error(DeliveryError::InvalidTransition {
            action: "assign a courier to",
            status: "ArrivedAtPickup",
        });
}

#[test]
fn assigning_a_courier_to_a_delivery_never_requested_is_refused() {
    at(t0())
        .given_no_previous_events()
        .when(DeliveryCommand::AssignCourier {
            courier_id: courier(),
        })
        .then_expect_error(DeliveryError::NotFound);
}

// --- UpdateCourierLocation ---------------------------------------------------------------------

#[test]
fn a_location_is_kept_and_publishes_a_new_estimate_when_it_moved_noticeably() {
    at(mins(2))
        .given(assigned_history())
        .when(locate(north_of(store_location(), -1.5), secs(115)))
        .then_expect_events(vec![located(), located_eta()]);
}

#[test]
fn a_location_that_barely_moves_the_estimate_publishes_no_new_one() {
    // 100 s after pickup the courier rode 300 m: expected +6 s, window -29 s / -17 s.
    let position = north_of(store_location(), 0.3);
    at(secs(1000))
        .given(picked_up_history())
        .when(locate(position, secs(995)))
        .then_expect_events(vec![DeliveryEvent::CourierLocationUpdated {
            position,
            device_time: secs(995),
            received_at: secs(1000),
        }]);
}

#[test]
fn a_location_older_than_the_kept_one_is_ignored_without_an_event() {
    let mut history = assigned_history();
    history.push(located());
    at(mins(3))
        .given(history.clone())
        .when(locate(north_of(store_location(), -1.7), secs(100)))
        .then_expect_events(vec![]);
    at(mins(3))
        .given(history)
        .when(locate(north_of(store_location(), -1.5), secs(115)))
        .then_expect_events(vec![]);
}

#[test]
fn locations_before_a_courier_is_assigned_or_after_the_delivery_ended_are_refused() {
    at(mins(1))
        .given(vec![requested(), first_eta()])
        .when(locate(store_location(), mins(1)))
        .then_expect_error(DeliveryError::NoCourierAssigned);
    at(mins(1))
        .given_no_previous_events()
        .when(locate(store_location(), mins(1)))
        .then_expect_error(DeliveryError::NotFound);
    at(mins(32))
        .given(delivered_history())
        .when(locate(customer_location(), mins(32)))
        .then_expect_error_message("the delivery is Delivered; locations are no longer tracked");
    at(mins(6))
        .given(cancelled_history())
        .when(locate(store_location(), mins(6)))
        .then_expect_error(DeliveryError::TrackingEnded("Cancelled"));
}

#[test]
fn a_failed_delivery_is_still_tracked_on_its_way_back_without_an_estimate() {
    let position = north_of(store_location(), 1.0);
    at(mins(45))
        .given(failed_history())
        .when(locate(position, mins(45)))
        .then_expect_events(vec![DeliveryEvent::CourierLocationUpdated {
            position,
            device_time: mins(45),
            received_at: mins(45),
        }]);
}

#[test]
fn locations_with_bad_coordinates_or_from_a_clock_far_ahead_are_refused() {
    at(mins(3))
        .given(assigned_history())
        .when(locate(
            GeoPoint {
                latitude: 0.0,
                longitude: 181.0,
            },
            mins(3),
        ))
        .then_expect_error(DeliveryError::InvalidCoordinates { field: "position" });
    at(mins(3))
        .given(assigned_history())
        .when(locate(store_location(), mins(9)))
        .then_expect_error(DeliveryError::DeviceTimeAhead);
    let events = at(mins(3))
        .given(assigned_history())
        .when(locate(store_location(), mins(7)))
        .inspect_result()
        .expect("a clock a few minutes ahead is tolerated");
    assert!(matches!(
        events.first(),
        Some(DeliveryEvent::CourierLocationUpdated { .. })
    ));
}

#[test]
fn after_pickup_a_position_fixed_before_it_does_not_place_the_courier() {
    let mut delivery = Delivery::default();
    let mut history = assigned_history();
    history.push(DeliveryEvent::CourierLocationUpdated {
        position: north_of(store_location(), -5.0),
        device_time: mins(14),
        received_at: mins(14),
    });
    history.push(DeliveryEvent::PickedUpAtStore {
        picked_up_at: mins(15),
    });
    for event in history {
        delivery.apply(event);
    }
    let eta = delivery.estimate(mins(15)).expect("under way");
    assert_eq!(eta.remaining_meters, 3_000, "counted from the store");
    delivery.apply(DeliveryEvent::CourierLocationUpdated {
        position: north_of(store_location(), 1.0),
        device_time: mins(16),
        received_at: mins(16),
    });
    let eta = delivery.estimate(mins(16)).expect("under way");
    assert_eq!(
        eta.remaining_meters, 2_000,
        "counted from the newer position"
    );
}

// --- The way forward ---------------------------------------------------------------------------

#[test]
fn a_courier_on_schedule_keeps_the_expected_arrival_and_narrows_its_window() {
    let mut history = assigned_history();
    history.extend([located(), located_eta()]);
    at(mins(10))
        .given(history)
        .when(DeliveryCommand::ArriveAtPickup)
        .then_expect_events(vec![
            DeliveryEvent::CourierArrivedAtPickup {
                arrived_at: mins(10),
            },
            // 300 s waiting, 936 s riding; margin 60 + 234 + 60 s.
            eta(1836, 1482, 2190, 3_000, mins(10)),
        ]);
    at(mins(15))
        .given(at_pickup_history())
        .when(DeliveryCommand::PickUp)
        .then_expect_events(vec![
            DeliveryEvent::PickedUpAtStore {
                picked_up_at: mins(15),
            },
            // 936 s riding; margin 60 + 234 s.
            eta(1836, 1542, 2130, 3_000, mins(15)),
        ]);
    at(mins(30))
        .given(picked_up_history())
        .when(DeliveryCommand::ArriveAtDropoff)
        .then_expect_events(vec![
            DeliveryEvent::CourierArrivedAtDropoff {
                arrived_at: mins(30),
            },
            // At the door: one minute for the handover.
            eta(1800, 1800, 1860, 0, mins(30)),
        ]);
    at(mins(31))
        .given(at_dropoff_history())
        .when(DeliveryCommand::Deliver)
        .then_expect_events(vec![DeliveryEvent::DeliveredToCustomer {
            delivered_at: mins(31),
        }]);
}

#[test]
fn a_courier_may_pick_up_and_hand_over_without_announcing_arrival() {
    let events = at(mins(16))
        .given(assigned_history())
        .when(DeliveryCommand::PickUp)
        .inspect_result()
        .expect("picked up straight from assignment");
    assert_eq!(
        events.first(),
        Some(&DeliveryEvent::PickedUpAtStore {
            picked_up_at: mins(16),
        })
    );
    at(mins(30))
        .given(picked_up_history())
        .when(DeliveryCommand::Deliver)
        .then_expect_events(vec![DeliveryEvent::DeliveredToCustomer {
            delivered_at: mins(30),
        }]);
}

#[test]
fn steps_out_of_order_are_refused_with_the_current_status() {
    at(t0())
        .given(vec![requested(), first_eta()])
        .when(DeliveryCommand::PickUp)
        .then_expect_error(DeliveryError::InvalidTransition {
            action: "pick up",
            status: "Requested",
        });
    at(mins(20))
        .given(picked_up_history())
        .when(DeliveryCommand::ArriveAtPickup)
        .then_expect_error(DeliveryError::InvalidTransition {
            action: "arrive at the store for",
            status: "PickedUp",
        });
    at(mins(20))
        .given(at_pickup_history())
        .when(DeliveryCommand::ArriveAtDropoff)
        .then_expect_error(DeliveryError::InvalidTransition {
            action: "arrive at the customer for",
            status: "ArrivedAtPickup",
        });
    at(mins(20))
        .given(at_pickup_history())
        .when(DeliveryCommand::Deliver)
        .then_expect_error_message("cannot hand over a delivery that is ArrivedAtPickup");
    at(mins(40))
        .given(delivered_history())
        .when(DeliveryCommand::PickUp)
        .then_expect_error(DeliveryError::InvalidTransition {
            action: "pick up",
            status: "Delivered",
        });
    at(t0())
        .given_no_previous_events()
        .when(DeliveryCommand::Deliver)
        .then_expect_error(DeliveryError::NotFound);
}

// --- Side branches -----------------------------------------------------------------------------

#[test]
fn a_delivery_that_fails_at_the_door_records_why_and_goes_back_to_the_store() {
    at(mins(40))
        .given(at_dropoff_history())
        .when(DeliveryCommand::FailDelivery {
            reason: FailureReason::CustomerUnreachable,
        })
        .then_expect_events(vec![DeliveryEvent::DeliveryFailed {
            reason: FailureReason::CustomerUnreachable,
            failed_at: mins(40),
        }]);
    at(mins(55))
        .given(failed_history())
        .when(DeliveryCommand::ReturnToStore)
        .then_expect_events(vec![DeliveryEvent::ReturnedToStore {
            returned_at: mins(55),
        }]);
}

#[test]
fn a_delivery_can_fail_only_with_the_food_on_board_and_return_only_after_failing() {
    at(mins(10))
        .given(assigned_history())
        .when(DeliveryCommand::FailDelivery {
            reason: FailureReason::CourierIncident,
        })
        .then_expect_error(DeliveryError::InvalidTransition {
            action: "fail",
            status: "CourierAssigned",
        });
    at(mins(40))
        .given(delivered_history())
        .when(DeliveryCommand::FailDelivery {
            reason: FailureReason::CustomerRefused,
        })
        .then_expect_error(DeliveryError::InvalidTransition {
            action: "fail",
            status: "Delivered",
        });
    at(mins(40))
        .given(delivered_history())
        .when(DeliveryCommand::ReturnToStore)
        .then_expect_error(DeliveryError::InvalidTransition {
            action: "return to the store",
            status: "Delivered",
        });
    let mut returned = failed_history();
    returned.push(DeliveryEvent::ReturnedToStore {
        returned_at: mins(55),
    });
    at(mins(56))
        .given(returned)
        .when(DeliveryCommand::ReturnToStore)
        .then_expect_error(DeliveryError::InvalidTransition {
            action: "return to the store",
            status: "Returned",
        });
}

#[test]
fn a_delivery_can_be_cancelled_with_a_reason_until_the_food_is_picked_up() {
    let cancel = || DeliveryCommand::CancelDelivery {
        reason: "order cancelled by the store".to_owned(),
    };
    at(mins(5))
        .given(vec![requested(), first_eta()])
        .when(cancel())
        .then_expect_events(vec![DeliveryEvent::DeliveryCancelled {
            reason: "order cancelled by the store".to_owned(),
            cancelled_at: mins(5),
        }]);
    at(mins(12))
        .given(at_pickup_history())
        .when(cancel())
        .then_expect_events(vec![DeliveryEvent::DeliveryCancelled {
            reason: "order cancelled by the store".to_owned(),
            cancelled_at: mins(12),
        }]);
    at(mins(20))
        .given(picked_up_history())
        .when(cancel())
        .then_expect_error(DeliveryError::InvalidTransition {
            action: "cancel",
            status: "PickedUp",
        });
    at(mins(6))
        .given(cancelled_history())
        .when(cancel())
        .then_expect_error(DeliveryError::InvalidTransition {
            action: "cancel",
            status: "Cancelled",
        });
}

#[test]
fn a_cancellation_without_a_reason_or_with_an_overlong_one_is_refused() {
    at(mins(5))
        .given(assigned_history())
        .when(DeliveryCommand::CancelDelivery {
            reason: "   ".to_owned(),
        })
        .then_expect_error(DeliveryError::ReasonRequired);
    at(mins(5))
        .given(assigned_history())
        .when(DeliveryCommand::CancelDelivery {
            reason: "x".repeat(MAX_REASON_CHARS + 1),
        })
        .then_expect_error(DeliveryError::TooLong {
            field: "reason",
            max: MAX_REASON_CHARS,
        });
}

// --- RateCourier -------------------------------------------------------------------------------

#[test]
fn the_courier_of_a_delivered_order_can_be_rated_once() {
    at(mins(60))
        .given(delivered_history())
        .when(DeliveryCommand::RateCourier {
            stars: 5,
            comment: Some("friendly and fast".to_owned()),
        })
        .then_expect_events(vec![DeliveryEvent::CourierRated {
            courier_id: courier(),
            stars: 5,
            comment: Some("friendly and fast".to_owned()),
            rated_at: mins(60),
        }]);
    let mut rated = delivered_history();
    rated.push(DeliveryEvent::CourierRated {
        courier_id: courier(),
        stars: 4,
        comment: None,
        rated_at: mins(60),
    });
    at(mins(61))
        .given(rated)
        .when(DeliveryCommand::RateCourier {
            stars: 5,
            comment: None,
        })
        .then_expect_error(DeliveryError::AlreadyRated);
}

#[test]
fn a_rating_outside_one_to_five_overlong_or_before_delivery_is_refused() {
    for stars in [0, 6] {
        at(mins(60))
            .given(delivered_history())
            .when(DeliveryCommand::RateCourier {
                stars,
                comment: None,
            })
            .then_expect_error(DeliveryError::InvalidStars);
    }
    at(mins(60))
        .given(delivered_history())
        .when(DeliveryCommand::RateCourier {
            stars: 3,
            comment: Some("é".repeat(MAX_COMMENT_CHARS + 1)),
        })
        .then_expect_error(DeliveryError::TooLong {
            field: "comment",
            max: MAX_COMMENT_CHARS,
        });
    at(mins(20))
        .given(picked_up_history())
        .when(DeliveryCommand::RateCourier {
            stars: 5,
            comment: None,
        })
        .then_expect_error(DeliveryError::InvalidTransition {
            action: "rate the courier of",
            status: "PickedUp",
        });
    at(mins(60))
        .given(failed_history())
        .when(DeliveryCommand::RateCourier {
            stars: 1,
            comment: None,
        })
        .then_expect_error(DeliveryError::InvalidTransition {
            action: "rate the courier of",
            status: "Failed",
        });
}

// --- Contracts of the module -------------------------------------------------------------------

#[test]
fn conflicts_with_the_state_are_told_apart_from_invalid_commands() {
    assert!(DeliveryError::AlreadyRequested.is_state_conflict());
    assert!(DeliveryError::NoCourierAssigned.is_state_conflict());
    assert!(DeliveryError::TrackingEnded("Delivered").is_state_conflict());
    assert!(DeliveryError::AlreadyRated.is_state_conflict());
    assert!(DeliveryError::InvalidTransition {
        action: "pick up",
        status: "Requested"
    }
    .is_state_conflict());
    assert!(!DeliveryError::NotFound.is_state_conflict());
    assert!(!DeliveryError::InvalidStars.is_state_conflict());
    assert!(!DeliveryError::DeviceTimeAhead.is_state_conflict());
    assert!(!DeliveryError::InvalidCoordinates { field: "pickup" }.is_state_conflict());
}

#[test]
fn every_event_is_declared_in_types_at_version_one() {
    let mut samples = delivered_history();
    samples.extend(failed_history());
    samples.extend(cancelled_history());
    samples.push(DeliveryEvent::ReturnedToStore {
        returned_at: mins(55),
    });
    samples.push(DeliveryEvent::CourierRated {
        courier_id: courier(),
        stars: 4,
        comment: None,
        rated_at: mins(60),
    });
    samples.push(DeliveryEvent::FoodMarkedReady {
        ready_at: mins(12),
        marked_at: mins(12),
    });
    let sampled: std::collections::BTreeSet<String> =
        samples.iter().map(DomainEvent::event_type).collect();
    let declared: std::collections::BTreeSet<String> = DeliveryEvent::TYPES
        .iter()
        .map(|t| (*t).to_owned())
        .collect();
    assert_eq!(sampled, declared);
    assert!(samples.iter().all(|e| e.event_version() == "1.0"));
    for event in &samples {
        let json = serde_json::to_value(event).expect("serializes");
        assert!(
            json.get(event.event_type()).is_some(),
            "the serde tag is the event type"
        );
    }
}

#[test]
fn the_aggregate_state_survives_a_json_round_trip_for_snapshots() {
    let mut delivery = Delivery::default();
    for event in picked_up_history() {
        delivery.apply(event);
    }
    let json = serde_json::to_string(&delivery).expect("serializes");
    let back: Delivery = serde_json::from_str(&json).expect("deserializes");
    assert_eq!(back, delivery);
}

#[test]
fn the_services_debug_output_hides_the_clock() {
    assert_eq!(
        format!("{:?}", services_at(t0())),
        "DeliveryServices { .. }"
    );
}

// --- Invariants --------------------------------------------------------------------------------

fn any_point() -> impl Strategy<Value = GeoPoint> {
    (51.40..51.60f64, -0.30..0.05f64).prop_map(|(lat, lon)| point(lat, lon))
}

fn any_command() -> impl Strategy<Value = DeliveryCommand> {
    prop_oneof![
        Just(request()),
        prop_oneof![Just(courier()), Just(other_courier())]
            .prop_map(|courier_id| DeliveryCommand::AssignCourier { courier_id }),
        (any_point(), 0i64..3_600).prop_map(|(position, offset)| locate(position, secs(offset))),
        Just(DeliveryCommand::ArriveAtPickup),
        Just(DeliveryCommand::PickUp),
        Just(DeliveryCommand::ArriveAtDropoff),
        Just(DeliveryCommand::Deliver),
        prop_oneof![
            Just(FailureReason::CustomerUnreachable),
            Just(FailureReason::OrderDamaged),
            Just(FailureReason::Other),
        ]
        .prop_map(|reason| DeliveryCommand::FailDelivery { reason }),
        Just(DeliveryCommand::ReturnToStore),
        Just(DeliveryCommand::CancelDelivery {
            reason: "r".to_owned()
        }),
        (0u8..7).prop_map(|stars| DeliveryCommand::RateCourier {
            stars,
            comment: None
        }),
    ]
}

/// Distinct device times (seconds after `t0`) with a position each, in a random arrival order.
fn shuffled_locations() -> impl Strategy<Value = Vec<(i64, GeoPoint)>> {
    proptest::collection::btree_map(0i64..3_600, any_point(), 1..40)
        .prop_flat_map(|by_time| Just(by_time.into_iter().collect::<Vec<_>>()).prop_shuffle())
}

proptest! {
    #[test]
    fn delivery_states_only_move_forward(
        commands in proptest::collection::vec(any_command(), 1..40),
    ) {
        let mut delivery = Delivery::default();
        for (step, command) in (0i64..).zip(commands) {
            let services = services_at(secs(30 * step));
            let before = delivery.status;
            if let Ok(events) = delivery.decide(command, &services) {
                for event in events {
                    delivery.apply(event);
                }
            }
            prop_assert!(delivery.status.rank() >= before.rank());
            if before.is_final() {
                prop_assert_eq!(delivery.status, before, "a final state is final");
            }
        }
    }

    #[test]
    fn the_kept_location_is_the_newest_by_device_time_whatever_the_arrival_order(
        locations in shuffled_locations(),
    ) {
        let services = services_at(t0() + Duration::hours(2));
        let mut delivery = Delivery::default();
        for event in assigned_history() {
            delivery.apply(event);
        }
        let mut newest: Option<(i64, GeoPoint)> = None;
        for (offset, position) in locations {
            let events = delivery
                .decide(locate(position, secs(offset)), &services)
                .expect("a valid location is accepted");
            let is_newer = newest.is_none_or(|(kept, _)| offset > kept);
            prop_assert_eq!(
                events
                    .iter()
                    .any(|e| matches!(e, DeliveryEvent::CourierLocationUpdated { .. })),
                is_newer,
                "an event exactly when the location is newer"
            );
            for event in events {
                delivery.apply(event);
            }
            if is_newer {
                newest = Some((offset, position));
            }
            let (offset, position) = newest.expect("at least one location");
            prop_assert_eq!(
                delivery.courier_position,
                Some(CourierPosition { position, device_time: secs(offset) })
            );
        }
    }

    #[test]
    fn every_published_estimate_has_a_non_negative_uncertainty_and_earliest_before_latest(
        commands in proptest::collection::vec(any_command(), 1..40),
    ) {
        let mut delivery = Delivery::default();
        for (step, command) in (0i64..).zip(commands) {
            let now = secs(30 * step);
            if let Ok(events) = delivery.decide(command, &services_at(now)) {
                for event in events {
                    if let DeliveryEvent::EtaUpdated { expected_at, earliest_at, latest_at, .. } = &event {
                        prop_assert!(earliest_at <= expected_at);
                        prop_assert!(expected_at <= latest_at);
                        prop_assert!(*latest_at - *earliest_at >= Duration::zero());
                        prop_assert!(*earliest_at >= now);
                    }
                    delivery.apply(event);
                }
            }
        }
    }
}

// --- The store's "ready" ----------------------------------------------------------------------

#[test]
fn food_marked_ready_early_brings_the_estimate_forward_to_the_couriers_ride() {
    // Accepted for 15 minutes of preparation; after 2 the store says ready, with the courier
    // 580 m from the store. The estimate no longer waits 13 minutes for the food.
    let mut history = assigned_history();
    history.push(DeliveryEvent::CourierLocationUpdated {
        position: north_of(store_location(), -0.58),
        device_time: mins(2),
        received_at: mins(2),
    });
    let mut before = Delivery::default();
    for event in history.clone() {
        before.apply(event);
    }
    let waiting = before.estimate(mins(2)).expect("under way");
    let events = before
        .decide(
            DeliveryCommand::MarkFoodReady { ready_at: mins(2) },
            &services_at(mins(2)),
        )
        .expect("accepted");
    assert_eq!(
        events.first(),
        Some(&DeliveryEvent::FoodMarkedReady {
            ready_at: mins(2),
            marked_at: mins(2),
        })
    );
    let Some(DeliveryEvent::EtaUpdated {
        expected_at,
        earliest_at,
        latest_at,
        ..
    }) = events.get(1).cloned()
    else {
        panic!("a new estimate is published: {events:?}");
    };
    // 580 m to the store and 3 km on to the customer, at 15 km/h with the detour factor: 1117 s.
    let ride = eta::travel_seconds(580.0, 15) + eta::travel_seconds(3_000.0, 15);
    assert_eq!(expected_at, mins(2) + Duration::seconds(ride));
    assert!(
        expected_at < waiting.expected_at,
        "{expected_at} vs {waiting:?}"
    );
    assert!(earliest_at >= mins(2) && latest_at > expected_at);
    // The window is that of the ride alone: no preparation margin is left.
    assert!(
        (latest_at - earliest_at).num_seconds()
            < (waiting.latest_at - waiting.earliest_at).num_seconds(),
        "narrower than while waiting for the food"
    );
}

#[test]
fn food_marked_ready_again_or_after_pickup_changes_nothing_and_never_in_the_future() {
    let mut history = assigned_history();
    history.push(DeliveryEvent::FoodMarkedReady {
        ready_at: mins(3),
        marked_at: mins(3),
    });
    at(mins(4))
        .given(history.clone())
        .when(DeliveryCommand::MarkFoodReady { ready_at: mins(4) })
        .then_expect_events(vec![]);
    let mut picked_up = assigned_history();
    picked_up.push(DeliveryEvent::PickedUpAtStore {
        picked_up_at: mins(5),
    });
    at(mins(6))
        .given(picked_up)
        .when(DeliveryCommand::MarkFoodReady { ready_at: mins(6) })
        .then_expect_events(vec![]);
    // A clock ahead at the store does not put readiness in the future.
    let mut delivery = Delivery::default();
    for event in assigned_history() {
        delivery.apply(event);
    }
    let events = delivery
        .decide(
            DeliveryCommand::MarkFoodReady { ready_at: mins(9) },
            &services_at(mins(7)),
        )
        .expect("accepted");
    assert!(matches!(
        events.first(),
        Some(DeliveryEvent::FoodMarkedReady { ready_at, .. }) if *ready_at == mins(7)
    ));
}
