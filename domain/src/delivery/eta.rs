//! The estimated time of arrival at the customer, with its uncertainty, as a pure function.
//!
//! ## The model
//!
//! - Travel time is the great-circle distance times [`ROUTE_FACTOR`] (roads are not straight)
//!   over the region's average courier speed, to the nearest second.
//! - Before pickup the courier first rides to the store, then waits for the food if it is not
//!   ready yet, then rides to the customer. A courier whose position is not known yet (not
//!   assigned, or no location since assignment) is assumed to reach the store when the food is
//!   ready; that assumption costs [`UNLOCATED_COURIER_MARGIN_SECONDS`] of extra uncertainty.
//! - The uncertainty is a margin either side of the expected arrival: [`BASE_MARGIN_SECONDS`]
//!   (parking, stairs, handover) plus [`TRAVEL_MARGIN_SHARE`] of the travel time left plus,
//!   before pickup, [`PREPARATION_MARGIN_SHARE`] of the preparation time left. It therefore
//!   shrinks as the courier gets closer and once the food is ready. The earliest arrival is
//!   never before now.
//! - A new estimate is worth publishing when it differs from the last published one by at
//!   least [`NOTICEABLE_CHANGE_SECONDS`] in its expected, earliest or latest instant
//!   ([`Eta::moved_noticeably_from`]); smaller changes are noise that would flood the topic
//!   with a location update every few seconds.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::geo::{haversine_meters, GeoPoint};

/// Roads are longer than the great circle: the usual urban detour factor.
pub const ROUTE_FACTOR: f64 = 1.3;
/// Margin that remains even at the door: parking, stairs, handover.
pub const BASE_MARGIN_SECONDS: i64 = 60;
/// Share of the remaining travel time added to the margin (traffic, lights, route choice).
pub const TRAVEL_MARGIN_SHARE: f64 = 0.25;
/// Share of the remaining preparation time added to the margin (kitchens run late).
pub const PREPARATION_MARGIN_SHARE: f64 = 0.20;
/// Extra margin while nobody knows where the courier is.
pub const UNLOCATED_COURIER_MARGIN_SECONDS: i64 = 600;
/// The smallest change of an estimate worth publishing.
pub const NOTICEABLE_CHANGE_SECONDS: i64 = 60;

/// Where the courier is in the journey, as far as the estimate is concerned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Leg {
    /// On the way to the store; `from` is the courier's last known position, if any.
    ToPickup { from: Option<GeoPoint> },
    /// At the store, waiting for the food.
    AtPickup,
    /// Carrying the food; `from` is where the courier last was.
    ToDropoff { from: GeoPoint },
    /// At the customer's door.
    AtDropoff,
}

/// Everything the estimate depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EtaInput {
    pub now: DateTime<Utc>,
    pub leg: Leg,
    pub pickup: GeoPoint,
    pub dropoff: GeoPoint,
    /// When the store expects the food to be ready (may be in the past).
    pub preparation_ready_at: DateTime<Utc>,
    /// The region's average courier speed; at least 1.
    pub average_speed_kmh: u32,
}

/// An estimated arrival at the customer with its uncertainty:
/// `earliest_at <= expected_at <= latest_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eta {
    pub expected_at: DateTime<Utc>,
    pub earliest_at: DateTime<Utc>,
    pub latest_at: DateTime<Utc>,
    /// Great-circle distance still to cover (through the store before pickup), in metres.
    pub remaining_meters: u32,
}

impl Eta {
    /// The width of the window the courier is expected in; never negative.
    pub fn uncertainty(&self) -> Duration {
        self.latest_at - self.earliest_at
    }

    /// Whether this estimate differs from `previous` enough to tell the customer.
    pub fn moved_noticeably_from(&self, previous: &Self) -> bool {
        let moved = |a: DateTime<Utc>, b: DateTime<Utc>| {
            (a - b).num_seconds().abs() >= NOTICEABLE_CHANGE_SECONDS
        };
        moved(self.expected_at, previous.expected_at)
            || moved(self.earliest_at, previous.earliest_at)
            || moved(self.latest_at, previous.latest_at)
    }
}

/// Seconds to ride `meters` of great circle at `speed_kmh`, to the nearest second.
pub fn travel_seconds(meters: f64, speed_kmh: u32) -> i64 {
    // km/h to m/s is a factor of 3.6. Saturating float-to-int conversion; distances on Earth
    // stay far below the limit.
    (meters * ROUTE_FACTOR * 3.6 / f64::from(speed_kmh.max(1))).round() as i64
}

/// The estimated arrival at the customer (see the module docs for the model).
pub fn estimate_arrival(input: &EtaInput) -> Eta {
    let speed = input.average_speed_kmh;
    let ready_in = (input.preparation_ready_at - input.now)
        .num_seconds()
        .max(0);
    let store_to_customer = haversine_meters(input.pickup, input.dropoff);

    // (metres left, seconds riding, seconds waiting at the store, seconds of preparation that
    // still make the estimate uncertain, whether the courier's position is unknown)
    let (remaining, riding, waiting, preparing, unlocated) = match input.leg {
        Leg::ToPickup { from } => {
            let to_store = from.map_or(0.0, |from| haversine_meters(from, input.pickup));
            let to_store_seconds = travel_seconds(to_store, speed);
            (
                to_store + store_to_customer,
                to_store_seconds + travel_seconds(store_to_customer, speed),
                (ready_in - to_store_seconds).max(0),
                ready_in,
                from.is_none(),
            )
        }
        Leg::AtPickup => (
            store_to_customer,
            travel_seconds(store_to_customer, speed),
            ready_in,
            ready_in,
            false,
        ),
        Leg::ToDropoff { from } => {
            let left = haversine_meters(from, input.dropoff);
            (left, travel_seconds(left, speed), 0, 0, false)
        }
        Leg::AtDropoff => (0.0, 0, 0, 0, false),
    };

    let margin = BASE_MARGIN_SECONDS
        + (riding as f64 * TRAVEL_MARGIN_SHARE).round() as i64
        + (preparing as f64 * PREPARATION_MARGIN_SHARE).round() as i64
        + if unlocated {
            UNLOCATED_COURIER_MARGIN_SECONDS
        } else {
            0
        };
    let expected_at = input.now + Duration::seconds(riding + waiting);
    Eta {
        expected_at,
        earliest_at: (expected_at - Duration::seconds(margin)).max(input.now),
        latest_at: expected_at + Duration::seconds(margin),
        // Saturating; at most half the Earth's circumference twice, far below u32::MAX.
        remaining_meters: remaining.round() as u32,
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use proptest::prelude::*;

    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 21, 18, 0, 0)
            .single()
            .expect("valid instant")
    }

    fn point(latitude: f64, longitude: f64) -> GeoPoint {
        GeoPoint::new(latitude, longitude).expect("valid coordinates")
    }

    /// A point `km` north of `from` along its meridian.
    fn north_of(from: GeoPoint, km: f64) -> GeoPoint {
        let degrees = (km * 1_000.0 / super::super::geo::EARTH_MEAN_RADIUS_METERS).to_degrees();
        point(from.latitude + degrees, from.longitude)
    }

    fn store() -> GeoPoint {
        point(51.5300, -0.1200)
    }

    fn customer() -> GeoPoint {
        north_of(store(), 3.0)
    }

    fn input(leg: Leg, ready_in_minutes: i64) -> EtaInput {
        EtaInput {
            now: now(),
            leg,
            pickup: store(),
            dropoff: customer(),
            preparation_ready_at: now() + Duration::minutes(ready_in_minutes),
            average_speed_kmh: 15,
        }
    }

    #[test]
    fn travel_time_is_the_route_distance_over_the_average_speed() {
        // 3 km of great circle is 3.9 km of road; at 15 km/h that is 15.6 minutes.
        assert_eq!(travel_seconds(3_000.0, 15), 936);
        assert_eq!(travel_seconds(0.0, 15), 0);
    }

    #[test]
    fn a_courier_carrying_the_food_arrives_after_the_ride_with_a_quarter_of_it_as_margin() {
        let eta = estimate_arrival(&input(Leg::ToDropoff { from: store() }, 0));
        assert_eq!(eta.expected_at, now() + Duration::seconds(936));
        assert_eq!(eta.latest_at, now() + Duration::seconds(936 + 60 + 234));
        assert_eq!(eta.earliest_at, now() + Duration::seconds(936 - 60 - 234));
        assert_eq!(eta.remaining_meters, 3_000);
    }

    #[test]
    fn a_courier_early_at_the_store_waits_for_the_food() {
        let eta = estimate_arrival(&input(Leg::AtPickup, 20));
        assert_eq!(eta.expected_at, now() + Duration::seconds(20 * 60 + 936));
        // 60 s + 25 % of 936 s riding + 20 % of 1200 s preparing.
        assert_eq!(
            eta.latest_at - eta.expected_at,
            Duration::seconds(60 + 234 + 240)
        );
    }

    #[test]
    fn a_courier_late_to_the_store_does_not_wait_for_food_that_is_already_ready() {
        let from = north_of(store(), -3.0);
        let eta = estimate_arrival(&input(Leg::ToPickup { from: Some(from) }, 5));
        assert_eq!(eta.expected_at, now() + Duration::seconds(936 + 936));
        assert_eq!(eta.remaining_meters, 6_000);
    }

    #[test]
    fn an_unlocated_courier_is_assumed_at_the_store_when_the_food_is_ready_with_a_wider_margin() {
        let located = estimate_arrival(&input(
            Leg::ToPickup {
                from: Some(store()),
            },
            15,
        ));
        let unlocated = estimate_arrival(&input(Leg::ToPickup { from: None }, 15));
        assert_eq!(unlocated.expected_at, located.expected_at);
        assert_eq!(
            unlocated.uncertainty() - located.uncertainty(),
            Duration::seconds(UNLOCATED_COURIER_MARGIN_SECONDS * 2)
        );
    }

    #[test]
    fn the_earliest_arrival_is_never_in_the_past() {
        let eta = estimate_arrival(&input(Leg::AtDropoff, 0));
        assert_eq!(eta.expected_at, now());
        assert_eq!(eta.earliest_at, now());
        assert_eq!(
            eta.latest_at,
            now() + Duration::seconds(BASE_MARGIN_SECONDS)
        );
        assert_eq!(eta.remaining_meters, 0);
    }

    #[test]
    fn the_uncertainty_shrinks_as_the_courier_gets_closer() {
        let far = estimate_arrival(&input(
            Leg::ToDropoff {
                from: north_of(customer(), 5.0),
            },
            0,
        ));
        let near = estimate_arrival(&input(
            Leg::ToDropoff {
                from: north_of(customer(), 1.0),
            },
            0,
        ));
        assert!(near.uncertainty() < far.uncertainty());
        assert!(near.expected_at < far.expected_at);
    }

    #[test]
    fn only_a_change_of_a_minute_or_more_is_noticeable() {
        let eta = estimate_arrival(&input(Leg::AtPickup, 10));
        let shifted = |seconds: i64| Eta {
            expected_at: eta.expected_at + Duration::seconds(seconds),
            ..eta
        };
        assert!(!shifted(59).moved_noticeably_from(&eta));
        assert!(shifted(60).moved_noticeably_from(&eta));
        assert!(shifted(-60).moved_noticeably_from(&eta));
        let narrower = Eta {
            latest_at: eta.latest_at - Duration::seconds(90),
            ..eta
        };
        assert!(narrower.moved_noticeably_from(&eta));
    }

    fn any_point() -> impl Strategy<Value = GeoPoint> {
        (-90.0..=90.0f64, -180.0..=180.0f64).prop_map(|(lat, lon)| point(lat, lon))
    }

    fn any_leg() -> impl Strategy<Value = Leg> {
        prop_oneof![
            proptest::option::of(any_point()).prop_map(|from| Leg::ToPickup { from }),
            Just(Leg::AtPickup),
            any_point().prop_map(|from| Leg::ToDropoff { from }),
            Just(Leg::AtDropoff),
        ]
    }

    proptest! {
        #[test]
        fn the_uncertainty_is_never_negative_and_earliest_is_at_most_latest(
            leg in any_leg(),
            pickup in any_point(),
            dropoff in any_point(),
            ready_in_seconds in -86_400i64..86_400,
            average_speed_kmh in 1u32..=120,
        ) {
            let now = now();
            let eta = estimate_arrival(&EtaInput {
                now,
                leg,
                pickup,
                dropoff,
                preparation_ready_at: now + Duration::seconds(ready_in_seconds),
                average_speed_kmh,
            });
            prop_assert!(eta.uncertainty() >= Duration::zero());
            prop_assert!(eta.earliest_at <= eta.expected_at);
            prop_assert!(eta.expected_at <= eta.latest_at);
            prop_assert!(eta.earliest_at >= now);
        }

        #[test]
        fn a_courier_closer_to_the_customer_never_has_a_wider_window(
            near_km in 0.0f64..20.0,
            extra_km in 0.0f64..20.0,
        ) {
            let near = estimate_arrival(&input(Leg::ToDropoff { from: north_of(customer(), near_km) }, 0));
            let far = estimate_arrival(&input(
                Leg::ToDropoff { from: north_of(customer(), near_km + extra_km) },
                0,
            ));
            prop_assert!(near.uncertainty() <= far.uncertainty());
            prop_assert!(near.expected_at <= far.expected_at);
        }
    }
}
