//! Given/when/then tests of the exposure command, accepted and refused, and properties of the
//! assignment: sticky, mutually exclusive within a layer, and shares that match the
//! configuration.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use proptest::prelude::*;
use uuid::Uuid;

use super::*;
use crate::services::FixedClock;

type AdsTest = TestFramework<AdAudience>;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 18, 0, 0)
        .single()
        .expect("valid instant")
}

fn id(value: &str) -> ExperimentId {
    ExperimentId::parse(value).expect("valid experiment id")
}

fn region(code: &str) -> RegionCode {
    RegionCode::parse(code).expect("valid region")
}

fn customer(n: u128) -> CustomerId {
    CustomerId::from_uuid(Uuid::from_u128(n))
}

fn variant(name: &str, weight: u32, promotion: Option<&str>) -> Variant {
    Variant {
        name: name.to_owned(),
        weight,
        promotion_code: promotion.map(str::to_owned),
    }
}

fn experiment(layer: &str, traffic_bp: u32, regions: &[&str]) -> Experiment {
    Experiment {
        layer: layer.to_owned(),
        traffic_bp,
        variants: vec![
            variant("control", 1, None),
            variant("welcome10", 1, Some("WELCOME10")),
        ],
        attribution_window_hours: 72,
        active: true,
        regions: regions.iter().map(|r| region(r)).collect(),
    }
}

/// Two experiments sharing layer `banner` (`a-offer` buckets 0..4000, `b-offer` 4000..7000,
/// Berlin only) and one alone in layer `menu`.
fn experiments() -> BTreeMap<ExperimentId, Experiment> {
    BTreeMap::from([
        (id("a-offer"), experiment("banner", 4_000, &[])),
        (id("b-offer"), experiment("banner", 3_000, &["de-berlin"])),
        (id("menu-test"), experiment("menu", 10_000, &[])),
    ])
}

#[derive(Debug)]
struct Fixed(BTreeMap<ExperimentId, Experiment>);

impl Experiments for Fixed {
    fn current_experiments(&self) -> BTreeMap<ExperimentId, Experiment> {
        self.0.clone()
    }
}

fn with(config: BTreeMap<ExperimentId, Experiment>, now: DateTime<Utc>) -> AdsTest {
    TestFramework::with(AdsServices::new(
        Arc::new(Fixed(config)),
        Arc::new(FixedClock(now)),
    ))
}

/// The first customer (counting from 1) whose bucket in `layer` lies in `range`.
fn customer_in(layer: &str, range: Range<u32>) -> CustomerId {
    (1..100_000u128)
        .map(customer)
        .find(|c| range.contains(&layer_bucket(*c, layer)))
        .expect("some customer falls in the range")
}

fn expose(who: CustomerId, experiment: &str, at_region: &str) -> AdsCommand {
    AdsCommand::RecordExposure {
        customer_id: who,
        experiment_id: id(experiment),
        placement: "checkout-banner".to_owned(),
        region: region(at_region),
    }
}

fn exposed(
    experiment: &str,
    layer: &str,
    variant: &str,
    promotion: Option<&str>,
    bucket: u32,
    at: DateTime<Utc>,
) -> AdsEvent {
    AdsEvent::ExposureRecorded {
        experiment_id: id(experiment),
        layer: layer.to_owned(),
        variant: variant.to_owned(),
        promotion_code: promotion.map(str::to_owned),
        placement: "checkout-banner".to_owned(),
        region: region("uk"),
        bucket,
        attribution_window_hours: 72,
        exposed_at: at,
    }
}

#[test]
fn the_buckets_are_pinned_to_sha256_so_they_never_move_between_releases() {
    // Computed independently: sha256("layer:checkout-banner:<uuid>")[..8] as big-endian % 10000.
    assert_eq!(layer_bucket(customer(0), "checkout-banner"), 9_031);
    let someone = CustomerId::from_uuid(
        Uuid::parse_str("9b1f0c1e-5d2a-4f3b-8c7d-77aa44112233").expect("uuid"),
    );
    assert_eq!(layer_bucket(someone, "checkout-banner"), 163);
    assert_eq!(variant_point(someone, "welcome-offer", 100), 67);
}

#[test]
fn a_first_exposure_records_the_variant_the_hash_picks() {
    let who = customer_in("banner", 0..4_000);
    let config = experiments();
    let expected = assign(&config, "a-offer", who, &region("uk")).expect("in the experiment");
    with(config, t0())
        .given_no_previous_events()
        .when(expose(who, "a-offer", "uk"))
        .then_expect_events(vec![exposed(
            "a-offer",
            "banner",
            &expected.variant,
            expected.promotion_code.as_deref(),
            layer_bucket(who, "banner"),
            t0(),
        )]);
}

#[test]
fn a_repeated_exposure_keeps_the_first_variant_even_after_the_weights_change() {
    let who = customer_in("banner", 0..4_000);
    let first = assign(&experiments(), "a-offer", who, &region("uk")).expect("assigned");
    // Reweight so that the hash now picks the other variant for everyone.
    let mut config = experiments();
    let other = if first.variant == "control" {
        "welcome10"
    } else {
        "control"
    };
    for v in &mut config.get_mut("a-offer").expect("configured").variants {
        v.weight = if v.name == other { 1_000_000 } else { 1 };
    }
    let later = t0() + Duration::hours(1);
    let promotion = config["a-offer"]
        .variants
        .iter()
        .find(|v| v.name == first.variant)
        .and_then(|v| v.promotion_code.clone());
    with(config, later)
        .given(vec![exposed(
            "a-offer",
            "banner",
            &first.variant,
            first.promotion_code.as_deref(),
            first.bucket,
            t0(),
        )])
        .when(expose(who, "a-offer", "uk"))
        .then_expect_events(vec![exposed(
            "a-offer",
            "banner",
            &first.variant,
            promotion.as_deref(),
            first.bucket,
            later,
        )]);
}

#[test]
fn a_customer_outside_the_traffic_share_is_not_in_the_experiment() {
    let who = customer_in("banner", 7_000..10_000);
    with(experiments(), t0())
        .given_no_previous_events()
        .when(expose(who, "a-offer", "uk"))
        .then_expect_error(AdsError::OutsideTraffic {
            experiment: id("a-offer"),
            layer: "banner".to_owned(),
        });
}

#[test]
fn a_customer_outside_the_audience_regions_is_not_in_the_experiment() {
    let who = customer_in("banner", 4_000..7_000);
    with(experiments(), t0())
        .given_no_previous_events()
        .when(expose(who, "b-offer", "uk"))
        .then_expect_error(AdsError::OutsideAudience {
            experiment: id("b-offer"),
            region: region("uk"),
        });
}

#[test]
fn an_unknown_or_inactive_experiment_exposes_nobody() {
    let who = customer(7);
    with(experiments(), t0())
        .given_no_previous_events()
        .when(expose(who, "no-such-test", "uk"))
        .then_expect_error(AdsError::UnknownExperiment("no-such-test".to_owned()));
    let mut paused = experiments();
    paused.get_mut("menu-test").expect("configured").active = false;
    with(paused, t0())
        .given_no_previous_events()
        .when(expose(who, "menu-test", "uk"))
        .then_expect_error(AdsError::ExperimentInactive(id("menu-test")));
}

#[test]
fn a_customer_already_in_one_experiment_of_a_layer_is_refused_by_the_others_after_a_reconfiguration(
) {
    // The customer joined `a-offer`; then `a-offer` shrank so their bucket now lies in `b-offer`.
    let who = customer_in("banner", 1_000..4_000);
    let bucket = layer_bucket(who, "banner");
    let mut config = experiments();
    config.get_mut("a-offer").expect("configured").traffic_bp = 1_000;
    config.get_mut("b-offer").expect("configured").regions = vec![];
    assert!(assign(&config, "b-offer", who, &region("uk")).is_ok());
    with(config, t0())
        .given(vec![exposed(
            "a-offer",
            "banner",
            "control",
            None,
            bucket,
            t0(),
        )])
        .when(expose(who, "b-offer", "uk"))
        .then_expect_error(AdsError::InAnotherExperimentOfLayer {
            experiment: id("b-offer"),
            layer: "banner".to_owned(),
            other: id("a-offer"),
        });
}

#[test]
fn a_placement_must_be_a_code() {
    with(experiments(), t0())
        .given_no_previous_events()
        .when(AdsCommand::RecordExposure {
            customer_id: customer(1),
            experiment_id: id("menu-test"),
            placement: "home page!".to_owned(),
            region: region("uk"),
        })
        .then_expect_error(AdsError::InvalidPlacement);
}

#[test]
fn applying_exposures_counts_them_and_keeps_the_first_assignment() {
    let mut audience = AdAudience::default();
    audience.apply(exposed("a-offer", "banner", "control", None, 12, t0()));
    let later = t0() + Duration::hours(2);
    audience.apply(exposed("a-offer", "banner", "control", None, 12, later));
    let recorded = &audience.assignments["a-offer"];
    assert_eq!(recorded.exposures, 2);
    assert_eq!(recorded.first_exposed_at, t0());
    assert_eq!(recorded.last_exposed_at, later);
    assert_eq!(audience.layers["banner"], id("a-offer"));
    assert_eq!(audience.exposures, 2);
}

#[test]
fn configurations_are_checked() {
    let catalogue = Catalogue::demo().expect("demo catalogue");
    for (key, experiment) in &catalogue.experiments {
        check_experiment(&catalogue, key, experiment).expect("demo experiments are valid");
    }
    let mut overbooked = experiment("checkout-banner", 2_001, &[]);
    assert!(matches!(
        check_experiment(&catalogue, &id("third"), &overbooked),
        Err(ExperimentConfigError::LayerOverbooked {
            total_bp: 10_001,
            ..
        })
    ));
    // Replacing an experiment counts its new share, not both.
    overbooked.traffic_bp = 7_000;
    assert!(check_experiment(&catalogue, &id("welcome-offer"), &overbooked).is_ok());
    let mut bad = experiment("x", 10, &[]);
    bad.variants[1].promotion_code = Some("NOPE".to_owned());
    assert!(matches!(
        check_experiment(&catalogue, &id("x"), &bad),
        Err(ExperimentConfigError::UnknownPromotion { .. })
    ));
    let mut bad = experiment("x", 10, &["mars"]);
    assert!(matches!(
        check_experiment(&catalogue, &id("x"), &bad),
        Err(ExperimentConfigError::UnknownRegion(_))
    ));
    bad = experiment("x", 10, &[]);
    bad.variants[0].weight = 0;
    assert!(bad.validate().is_err());
    bad = experiment("x", 10, &[]);
    bad.variants[1].name = "control".to_owned();
    assert!(matches!(
        bad.validate(),
        Err(ExperimentConfigError::DuplicateVariant(_))
    ));
    bad = experiment("x", 10, &[]);
    bad.attribution_window_hours = 0;
    assert!(bad.validate().is_err());
    assert!(ExperimentId::parse("has:colon").is_err());
}

/// Experiments of one layer with the given shares (in id order `e0`, `e1`, ...).
fn layer_of(shares: &[u32]) -> BTreeMap<ExperimentId, Experiment> {
    shares
        .iter()
        .enumerate()
        .map(|(i, share)| (id(&format!("e{i}")), experiment("layer", *share, &[])))
        .collect()
}

/// 4.5 standard deviations of a share `p` measured over `n` draws, plus rounding slack.
fn tolerance(p: f64, n: usize) -> f64 {
    4.5 * (p * (1.0 - p) / n as f64).sqrt() + 0.002
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn the_same_customer_always_gets_the_same_variant(
        who in any::<u128>(),
        weights in proptest::collection::vec(1u32..100, 1..6),
        other_layer_share in 0u32..=10_000,
    ) {
        let who = customer(who);
        let mut config = BTreeMap::from([(id("exp"), Experiment {
            variants: weights
                .iter()
                .enumerate()
                .map(|(i, w)| variant(&format!("v{i}"), *w, None))
                .collect(),
            ..experiment("layer", 10_000, &[])
        })]);
        let first = assign(&config, "exp", who, &region("uk")).expect("full traffic");
        prop_assert_eq!(&assign(&config, "exp", who, &region("uk")).expect("again"), &first);
        // Experiments of other layers change nothing.
        config.insert(id("a-other"), experiment("other", other_layer_share, &[]));
        prop_assert_eq!(&assign(&config, "exp", who, &region("uk")).expect("still"), &first);
    }

    #[test]
    fn experiments_of_one_layer_never_share_a_customer(
        shares in proptest::collection::vec(0u32..4_000, 1..5),
        start in any::<u64>(),
    ) {
        let config = layer_of(&shares);
        for n in 0..500u64 {
            let who = customer(u128::from(start) + u128::from(n));
            let accepted: Vec<&ExperimentId> = config
                .keys()
                .filter(|e| assign(&config, e.as_str(), who, &region("uk")).is_ok())
                .collect();
            prop_assert!(accepted.len() <= 1, "{who} is in {accepted:?}");
            // ... and the one it is in owns the customer's bucket.
            let bucket = layer_bucket(who, "layer");
            let owner = layer_ranges(&config, "layer")
                .into_iter()
                .find(|(_, r)| r.contains(&bucket))
                .map(|(e, _)| e);
            prop_assert_eq!(accepted.first().copied(), owner);
        }
    }

    #[test]
    fn traffic_and_variant_shares_match_the_configuration_over_10000_customers(
        shares in proptest::collection::vec(1u32..5_000, 1..3),
        weights in proptest::collection::vec(1u32..20, 2..5),
        start in any::<u64>(),
    ) {
        const CUSTOMERS: usize = 10_000;
        let mut config = layer_of(&shares);
        let weighted = id("e0");
        config.get_mut(&weighted).expect("e0").variants = weights
            .iter()
            .enumerate()
            .map(|(i, w)| variant(&format!("v{i}"), *w, None))
            .collect();
        let customers: Vec<CustomerId> = (0..CUSTOMERS)
            .map(|n| customer(u128::from(start) * 100_000 + n as u128))
            .collect();
        for (experiment, share) in config.keys().zip(&shares) {
            let accepted = customers
                .iter()
                .filter(|c| assign(&config, experiment.as_str(), **c, &region("uk")).is_ok())
                .count();
            let expected = f64::from(*share) / 10_000.0;
            let measured = accepted as f64 / CUSTOMERS as f64;
            prop_assert!(
                (measured - expected).abs() <= tolerance(expected, CUSTOMERS),
                "{experiment}: {measured} of customers, configured {expected}"
            );
        }
        // The variant split, over 10 000 customers of the experiment.
        let total: u32 = weights.iter().sum();
        let mut counts = vec![0usize; weights.len()];
        for who in &customers {
            let picked = pick_variant(&config[&weighted], weighted.as_str(), *who).expect("variants");
            let index: usize = picked.name[1..].parse().expect("v<index>");
            counts[index] += 1;
        }
        for (index, weight) in weights.iter().enumerate() {
            let expected = f64::from(*weight) / f64::from(total);
            let measured = counts[index] as f64 / CUSTOMERS as f64;
            prop_assert!(
                (measured - expected).abs() <= tolerance(expected, CUSTOMERS),
                "v{index}: {measured}, configured {expected}"
            );
        }
    }
}
