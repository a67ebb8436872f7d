//! Every ads event type has exactly one contract and round-trips through it.

mod common;

use chrono::{DateTime, TimeZone, Utc};
use domain::ads::{AdsEvent, ExperimentId};
use domain::RegionCode;

fn at(micros: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(micros)
        .single()
        .expect("valid instant")
}

fn samples() -> Vec<AdsEvent> {
    let exposure = |promotion_code: Option<&str>| AdsEvent::ExposureRecorded {
        experiment_id: ExperimentId::parse("welcome-offer").expect("valid"),
        layer: "checkout-banner".to_owned(),
        variant: if promotion_code.is_some() {
            "welcome10".to_owned()
        } else {
            "control".to_owned()
        },
        promotion_code: promotion_code.map(str::to_owned),
        placement: "home-carousel".to_owned(),
        region: RegionCode::parse("de-berlin").expect("valid"),
        bucket: 9_999,
        attribution_window_hours: 72,
        exposed_at: at(1_795_000_000_123_456),
    };
    vec![exposure(Some("WELCOME10")), exposure(None)]
}

#[test]
fn every_ads_event_type_has_exactly_one_contract_and_a_sample() {
    common::assert_every_event_type_has_a_contract("ads", &AdsEvent::TYPES, &samples());
}

#[test]
fn every_ads_event_round_trips_through_avro_bytes() {
    common::assert_round_trips("ads", samples());
}
