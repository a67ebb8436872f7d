//! Every delivery event type has exactly one Avro contract and round-trips through it.

mod common;

use chrono::{DateTime, TimeZone, Utc};
use domain::delivery::{DeliveryEvent, FailureReason, GeoPoint};
use domain::{CourierId, OrderId, RegionCode, StoreId};

fn at(micros: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(micros)
        .single()
        .expect("valid instant")
}

fn point(latitude: f64, longitude: f64) -> GeoPoint {
    GeoPoint::new(latitude, longitude).expect("valid coordinates")
}

fn samples() -> Vec<DeliveryEvent> {
    let courier = CourierId::new();
    vec![
        DeliveryEvent::DeliveryRequested {
            order_id: OrderId::new(),
            store_id: StoreId::new(),
            region: RegionCode::parse("de-berlin").expect("valid"),
            pickup: point(52.520_008, 13.404_954),
            dropoff: point(52.507_541, 13.390_388),
            preparation_ready_at: at(1_795_000_900_123_456),
            average_speed_kmh: 18,
            requested_at: at(1_795_000_000_123_456),
        },
        DeliveryEvent::CourierAssigned {
            courier_id: courier,
            assigned_at: at(1_795_000_060_000_001),
        },
        DeliveryEvent::CourierLocationUpdated {
            position: point(52.515_3, 13.401_7),
            device_time: at(1_795_000_118_654_321),
            received_at: at(1_795_000_120_000_042),
        },
        DeliveryEvent::EtaUpdated {
            expected_at: at(1_795_001_500_000_042),
            earliest_at: at(1_795_001_200_000_042),
            latest_at: at(1_795_001_800_000_042),
            remaining_meters: 3_412,
            estimated_at: at(1_795_000_120_000_042),
        },
        DeliveryEvent::CourierArrivedAtPickup {
            arrived_at: at(1_795_000_600_250_000),
        },
        DeliveryEvent::PickedUpAtStore {
            picked_up_at: at(1_795_000_910_999_999),
        },
        DeliveryEvent::CourierArrivedAtDropoff {
            arrived_at: at(1_795_001_480_000_007),
        },
        DeliveryEvent::DeliveredToCustomer {
            delivered_at: at(1_795_001_560_123_456),
        },
        DeliveryEvent::DeliveryFailed {
            reason: FailureReason::CustomerUnreachable,
            failed_at: at(1_795_001_900_000_300),
        },
        DeliveryEvent::ReturnedToStore {
            returned_at: at(1_795_003_000_000_300),
        },
        DeliveryEvent::FoodMarkedReady {
            ready_at: at(1_795_000_500_000_000),
            marked_at: at(1_795_000_500_250_001),
        },
        DeliveryEvent::DeliveryCancelled {
            reason: "store closed early — oven broke".to_owned(),
            cancelled_at: at(1_795_000_300_000_001),
        },
        DeliveryEvent::CourierRated {
            courier_id: courier,
            stars: 5,
            comment: Some("friendly, food still hot".to_owned()),
            rated_at: at(1_795_005_000_777_777),
        },
    ]
}

#[test]
fn every_delivery_event_type_has_exactly_one_contract_and_a_sample() {
    common::assert_every_event_type_has_a_contract("delivery", &DeliveryEvent::TYPES, &samples());
}

#[test]
fn every_delivery_event_round_trips_through_avro_bytes() {
    common::assert_round_trips("delivery", samples());
}
