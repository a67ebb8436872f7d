//! Experiments as the catalogue configures them, and the pure, deterministic assignment of a
//! customer to a layer's bucket and an experiment's variant (the rules are in the [`super`]
//! module's documentation). Nothing here remembers anything: the aggregate does.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AdsError;
use crate::services::Catalogue;
use crate::{CustomerId, RegionCode};

/// Buckets of a layer: a traffic share of 1 basis point is one bucket.
pub const BUCKETS: u32 = 10_000;
/// The longest experiment id, layer, variant name or placement, in characters.
pub const MAX_CODE_CHARS: usize = 64;
/// The most variants an experiment may have.
pub const MAX_VARIANTS: usize = 20;
/// The highest weight of one variant.
pub const MAX_WEIGHT: u32 = 1_000_000;
/// The longest attribution window, in hours (90 days).
pub const MAX_ATTRIBUTION_WINDOW_HOURS: u32 = 90 * 24;

/// 1 to [`MAX_CODE_CHARS`] ASCII letters, digits, `-` or `_` (so `:` never occurs in a hash
/// input part).
pub(super) fn is_code(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_CODE_CHARS
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub(super) const CODE_RULE: &str = "1 to 64 ASCII letters, digits, '-' or '_'";

/// Identifies one experiment (its key in the catalogue), such as `welcome-offer`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ExperimentId(String);

impl ExperimentId {
    /// Parses an id: 1 to 64 ASCII letters, digits, `-` and `_`.
    pub fn parse(value: impl Into<String>) -> Result<Self, ExperimentConfigError> {
        let value = value.into();
        if is_code(&value) {
            Ok(Self(value))
        } else {
            Err(ExperimentConfigError::InvalidId(value))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ExperimentId {
    type Error = ExperimentConfigError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<ExperimentId> for String {
    fn from(value: ExperimentId) -> Self {
        value.0
    }
}

impl Borrow<str> for ExperimentId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ExperimentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One arm of an experiment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Such as `control` or `welcome10`.
    pub name: String,
    /// Relative share of the experiment's customers (1 to 1 000 000).
    pub weight: u32,
    /// The promotion code (from the catalogue) this variant shows; `null` shows none.
    #[serde(default)]
    pub promotion_code: Option<String>,
}

/// An experiment, as configured in the catalogue (its id is the catalogue key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// The layer: a customer is in at most one experiment of a layer.
    pub layer: String,
    /// Share of the layer's customers in this experiment, in basis points (0 to 10 000).
    pub traffic_bp: u32,
    pub variants: Vec<Variant>,
    /// An order placed within this many hours after the customer's first exposure is a
    /// conversion (1 to 2160).
    pub attribution_window_hours: u32,
    /// Whether customers are exposed now. An inactive experiment keeps its bucket range, so
    /// pausing it moves nobody in the other experiments of its layer.
    pub active: bool,
    /// Regions whose customers take part; empty means every region.
    #[serde(default)]
    pub regions: Vec<RegionCode>,
}

impl Experiment {
    /// Checks the experiment on its own (the layer's total share is [`check_layers`]'s job).
    pub fn validate(&self) -> Result<(), ExperimentConfigError> {
        if !is_code(&self.layer) {
            return Err(ExperimentConfigError::InvalidLayer(self.layer.clone()));
        }
        if self.traffic_bp > BUCKETS {
            return Err(ExperimentConfigError::TrafficOutOfRange(self.traffic_bp));
        }
        if self.variants.is_empty() || self.variants.len() > MAX_VARIANTS {
            return Err(ExperimentConfigError::VariantCount);
        }
        for (index, variant) in self.variants.iter().enumerate() {
            if !is_code(&variant.name) {
                return Err(ExperimentConfigError::InvalidVariantName(
                    variant.name.clone(),
                ));
            }
            if self.variants[..index]
                .iter()
                .any(|v| v.name == variant.name)
            {
                return Err(ExperimentConfigError::DuplicateVariant(
                    variant.name.clone(),
                ));
            }
            if !(1..=MAX_WEIGHT).contains(&variant.weight) {
                return Err(ExperimentConfigError::InvalidWeight(variant.name.clone()));
            }
        }
        if !(1..=MAX_ATTRIBUTION_WINDOW_HOURS).contains(&self.attribution_window_hours) {
            return Err(ExperimentConfigError::InvalidWindow(
                self.attribution_window_hours,
            ));
        }
        Ok(())
    }

    /// Whether a customer in `region` belongs to the audience.
    pub fn targets(&self, region: &RegionCode) -> bool {
        self.regions.is_empty() || self.regions.contains(region)
    }

    fn total_weight(&self) -> u64 {
        self.variants.iter().map(|v| u64::from(v.weight)).sum()
    }
}

/// Why an experiment's configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExperimentConfigError {
    #[error("`{0}` is not a valid experiment id: {CODE_RULE}")]
    InvalidId(String),
    #[error("`{0}` is not a valid layer: {CODE_RULE}")]
    InvalidLayer(String),
    #[error("traffic_bp is a share in basis points, 0 to 10000; got {0}")]
    TrafficOutOfRange(u32),
    #[error("an experiment needs 1 to {MAX_VARIANTS} variants")]
    VariantCount,
    #[error("`{0}` is not a valid variant name: {CODE_RULE}")]
    InvalidVariantName(String),
    #[error("variant `{0}` appears twice; variant names are unique within an experiment")]
    DuplicateVariant(String),
    #[error("variant `{0}` needs a weight between 1 and {MAX_WEIGHT}")]
    InvalidWeight(String),
    #[error(
        "attribution_window_hours must be between 1 and {MAX_ATTRIBUTION_WINDOW_HOURS}; got {0}"
    )]
    InvalidWindow(u32),
    #[error("variant `{variant}` shows promotion `{code}`, which is not in the catalogue; create it first")]
    UnknownPromotion { variant: String, code: String },
    #[error("region `{0}` is not served; the audience can only name regions of the catalogue")]
    UnknownRegion(RegionCode),
    #[error(
        "the experiments of layer `{layer}` would take {total_bp} basis points of traffic; a layer \
         holds at most 10000 (100 %): lower traffic_bp here or in another experiment of the layer"
    )]
    LayerOverbooked { layer: String, total_bp: u64 },
}

/// Every layer's experiments share at most 100 % of its traffic.
pub fn check_layers(
    experiments: &BTreeMap<ExperimentId, Experiment>,
) -> Result<(), ExperimentConfigError> {
    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    for experiment in experiments.values() {
        *totals.entry(experiment.layer.as_str()).or_default() += u64::from(experiment.traffic_bp);
    }
    match totals
        .into_iter()
        .find(|(_, total)| *total > u64::from(BUCKETS))
    {
        Some((layer, total_bp)) => Err(ExperimentConfigError::LayerOverbooked {
            layer: layer.to_owned(),
            total_bp,
        }),
        None => Ok(()),
    }
}

/// Checks that `experiment` may be stored as `id` in `catalogue` (replacing an experiment of
/// the same id): valid on its own, its promotions and regions exist, and its layer stays within
/// 100 % of traffic.
pub fn check_experiment(
    catalogue: &Catalogue,
    id: &ExperimentId,
    experiment: &Experiment,
) -> Result<(), ExperimentConfigError> {
    experiment.validate()?;
    for variant in &experiment.variants {
        if let Some(code) = &variant.promotion_code {
            if !catalogue.promotions.contains_key(code) {
                return Err(ExperimentConfigError::UnknownPromotion {
                    variant: variant.name.clone(),
                    code: code.clone(),
                });
            }
        }
    }
    if let Some(region) = experiment
        .regions
        .iter()
        .find(|r| !catalogue.regions.contains_key(*r))
    {
        return Err(ExperimentConfigError::UnknownRegion(region.clone()));
    }
    let mut after = catalogue.experiments.clone();
    after.insert(id.clone(), experiment.clone());
    check_layers(&after)
}

/// The first 8 bytes of the SHA-256 of `parts` joined with `:`, as a big-endian integer.
fn stable_hash(parts: &[&str]) -> u64 {
    let mut hasher = Sha256::new();
    for (index, part) in parts.iter().enumerate() {
        if index > 0 {
            hasher.update(b":");
        }
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The customer's bucket in `layer`, `0..BUCKETS`.
pub fn layer_bucket(customer: CustomerId, layer: &str) -> u32 {
    let bucket = stable_hash(&["layer", layer, &customer.to_string()]) % u64::from(BUCKETS);
    u32::try_from(bucket).unwrap_or(0)
}

/// The customer's point on an experiment's weight line, `0..total_weight` (0 for no weight).
pub fn variant_point(customer: CustomerId, experiment_id: &str, total_weight: u64) -> u64 {
    if total_weight == 0 {
        return 0;
    }
    stable_hash(&["variant", experiment_id, &customer.to_string()]) % total_weight
}

/// The bucket range each experiment of `layer` owns: consecutive ranges in experiment id order,
/// each `traffic_bp` buckets wide (inactive experiments included, so pausing one moves nobody
/// else). Ranges never overlap and never pass [`BUCKETS`], even if a configuration overbooked
/// the layer.
pub fn layer_ranges<'a>(
    experiments: &'a BTreeMap<ExperimentId, Experiment>,
    layer: &str,
) -> Vec<(&'a ExperimentId, Range<u32>)> {
    let mut start = 0u32;
    experiments
        .iter()
        .filter(|(_, e)| e.layer == layer)
        .map(|(id, e)| {
            let end = start.saturating_add(e.traffic_bp).min(BUCKETS);
            let range = start..end;
            start = end;
            (id, range)
        })
        .collect()
}

/// The variant of `experiment` for `customer` (by weight). `None` only for an experiment
/// without variants.
pub fn pick_variant<'e>(
    experiment: &'e Experiment,
    experiment_id: &str,
    customer: CustomerId,
) -> Option<&'e Variant> {
    let mut point = variant_point(customer, experiment_id, experiment.total_weight());
    for variant in &experiment.variants {
        let weight = u64::from(variant.weight);
        if point < weight {
            return Some(variant);
        }
        point -= weight;
    }
    None
}

/// A customer's place in an experiment, as decided from the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub experiment_id: ExperimentId,
    pub layer: String,
    pub variant: String,
    pub promotion_code: Option<String>,
    /// The customer's bucket in the layer.
    pub bucket: u32,
    pub attribution_window_hours: u32,
}

/// Whether the experiment exposes customers of `region` now.
pub(super) fn check_eligible(
    id: &ExperimentId,
    experiment: &Experiment,
    region: &RegionCode,
) -> Result<(), AdsError> {
    if !experiment.active {
        return Err(AdsError::ExperimentInactive(id.clone()));
    }
    if !experiment.targets(region) {
        return Err(AdsError::OutsideAudience {
            experiment: id.clone(),
            region: region.clone(),
        });
    }
    Ok(())
}

/// The pure assignment of `customer` (in `region`) to `experiment_id`: refused when the
/// experiment is unknown or inactive, the region is outside its audience, or the customer's
/// bucket in the layer falls outside the experiment's range; otherwise the weighted variant.
pub fn assign(
    experiments: &BTreeMap<ExperimentId, Experiment>,
    experiment_id: &str,
    customer: CustomerId,
    region: &RegionCode,
) -> Result<Assignment, AdsError> {
    let (id, experiment) = experiments
        .get_key_value(experiment_id)
        .ok_or_else(|| AdsError::UnknownExperiment(experiment_id.to_owned()))?;
    check_eligible(id, experiment, region)?;
    let bucket = layer_bucket(customer, &experiment.layer);
    let in_range = layer_ranges(experiments, &experiment.layer)
        .into_iter()
        .any(|(owner, range)| owner == id && range.contains(&bucket));
    if !in_range {
        return Err(AdsError::OutsideTraffic {
            experiment: id.clone(),
            layer: experiment.layer.clone(),
        });
    }
    let variant =
        pick_variant(experiment, id.as_str(), customer).ok_or_else(|| AdsError::Misconfigured {
            experiment: id.clone(),
            reason: "it has no variants".to_owned(),
        })?;
    Ok(Assignment {
        experiment_id: id.clone(),
        layer: experiment.layer.clone(),
        variant: variant.name.clone(),
        promotion_code: variant.promotion_code.clone(),
        bucket,
        attribution_window_hours: experiment.attribution_window_hours,
    })
}
