//! The AdAudience aggregate: which customer saw which variant of which experiment, where and
//! when (the aggregate id is the customer id).
//!
//! An exposure is an event. The variant is decided here, on the command side, from the
//! experiment configuration in the catalogue:
//! - **deterministic**: a customer's bucket in a layer is `SHA-256("layer:<layer>:<customer>")`
//!   (first 8 bytes, big-endian) modulo [`BUCKETS`], and their variant of an experiment is
//!   `SHA-256("variant:<experiment>:<customer>")` modulo the sum of the variants' weights. Both
//!   are stable across processes, releases and platforms (unlike `std`'s `DefaultHasher`);
//! - **mutually exclusive layers**: the experiments of a layer own consecutive bucket ranges, in
//!   experiment id order, each as wide as its traffic share ([`layer_ranges`]); a customer's
//!   bucket falls in at most one of them, and shares of a layer never add up to more than 100 %
//!   ([`check_layers`]);
//! - **sticky**: once exposed, a customer keeps the variant (and the experiment of the layer)
//!   they were first assigned, even if the configuration changes later: the aggregate remembers
//!   its assignments, and refuses an experiment of a layer in which the customer already belongs
//!   to another one.
//!
//! The pure assignment ([`assign`]) is what the aggregate uses for a first exposure; it is
//! exported for the read side (targeting) and tests.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::services::{Catalogue, Clock};
use crate::{CustomerId, RegionCode};

/// Aggregate type name in the event store and on the topics. Never renamed.
pub const AGGREGATE_TYPE: &str = "ads";

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
fn is_code(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_CODE_CHARS
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

const CODE_RULE: &str = "1 to 64 ASCII letters, digits, '-' or '_'";

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
fn check_eligible(
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

/// What a client may ask of a customer's ad audience record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdsCommand {
    /// The customer (in `region`, the market the app shows) is about to see `experiment_id` at
    /// `placement` (such as `checkout-banner`): record the exposure with their variant.
    RecordExposure {
        /// The aggregate's customer (the same as its id): the assignment hashes it.
        customer_id: CustomerId,
        experiment_id: ExperimentId,
        placement: String,
        region: RegionCode,
    },
}

/// What happened. Names are past tense and never renamed: they are the event types in the
/// store and the Avro record names on the topics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdsEvent {
    ExposureRecorded {
        experiment_id: ExperimentId,
        layer: String,
        variant: String,
        /// The promotion shown, if the variant shows one.
        promotion_code: Option<String>,
        placement: String,
        region: RegionCode,
        /// The customer's bucket in the layer (audit: why they are in this experiment).
        bucket: u32,
        /// The experiment's attribution window when the customer was exposed, so that the read
        /// side attributes conversions from the events alone.
        attribution_window_hours: u32,
        exposed_at: DateTime<Utc>,
    },
}

impl AdsEvent {
    /// Every event type, for catalogues and tests. Never reorder or rename.
    pub const TYPES: [&'static str; 1] = ["ExposureRecorded"];

    /// When it happened in the business's time.
    pub const fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            Self::ExposureRecorded { exposed_at, .. } => *exposed_at,
        }
    }
}

impl DomainEvent for AdsEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ExposureRecorded { .. } => "ExposureRecorded".to_owned(),
        }
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// A rule an ads command broke. Each says what the client can do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdsError {
    #[error("experiment `{0}` does not exist; see the experiments of GET /catalogue")]
    UnknownExperiment(String),
    #[error("experiment `{0}` is not active; it exposes nobody now")]
    ExperimentInactive(ExperimentId),
    #[error(
        "the customer is not in this experiment: region `{region}` is outside the audience of \
         experiment `{experiment}`"
    )]
    OutsideAudience {
        experiment: ExperimentId,
        region: RegionCode,
    },
    #[error(
        "the customer is not in this experiment: their bucket in layer `{layer}` falls outside \
         the traffic share of experiment `{experiment}`; show them the default instead"
    )]
    OutsideTraffic {
        experiment: ExperimentId,
        layer: String,
    },
    #[error(
        "the customer is not in this experiment: they already take part in experiment `{other}` \
         of layer `{layer}`, and the experiments of a layer are mutually exclusive"
    )]
    InAnotherExperimentOfLayer {
        experiment: ExperimentId,
        layer: String,
        other: ExperimentId,
    },
    #[error("experiment `{experiment}` is misconfigured: {reason}")]
    Misconfigured {
        experiment: ExperimentId,
        reason: String,
    },
    #[error("placement must be {CODE_RULE}, such as `checkout-banner`")]
    InvalidPlacement,
}

impl AdsError {
    /// The experiment does not exist (HTTP 404).
    pub const fn is_not_found(&self) -> bool {
        matches!(self, Self::UnknownExperiment(_))
    }

    /// True when the command conflicts with the experiment or the customer's assignments
    /// (HTTP 409), false when the command itself is invalid (HTTP 422).
    pub const fn is_state_conflict(&self) -> bool {
        !matches!(self, Self::InvalidPlacement | Self::UnknownExperiment(_))
    }
}

/// Where a customer stands in one experiment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedAssignment {
    pub layer: String,
    pub variant: String,
    /// The promotion shown at the latest exposure.
    pub promotion_code: Option<String>,
    pub bucket: u32,
    pub first_exposed_at: DateTime<Utc>,
    pub last_exposed_at: DateTime<Utc>,
    pub exposures: u64,
}

/// The state a customer's exposures add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdAudience {
    /// Per experiment, the customer's sticky assignment.
    pub assignments: BTreeMap<ExperimentId, RecordedAssignment>,
    /// Per layer, the one experiment the customer takes part in.
    pub layers: BTreeMap<String, ExperimentId>,
    /// Exposures over every experiment.
    pub exposures: u64,
}

/// The experiments configured now (the catalogue's, refreshed by the adapter).
pub trait Experiments: Send + Sync {
    fn current_experiments(&self) -> BTreeMap<ExperimentId, Experiment>;
}

impl Experiments for Catalogue {
    fn current_experiments(&self) -> BTreeMap<ExperimentId, Experiment> {
        self.experiments.clone()
    }
}

/// What the ads aggregate needs from outside.
#[derive(Clone)]
pub struct AdsServices {
    pub experiments: Arc<dyn Experiments>,
    pub clock: Arc<dyn Clock>,
}

impl AdsServices {
    pub fn new(experiments: Arc<dyn Experiments>, clock: Arc<dyn Clock>) -> Self {
        Self { experiments, clock }
    }
}

impl fmt::Debug for AdsServices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdsServices").finish_non_exhaustive()
    }
}

impl AdAudience {
    fn decide(
        &self,
        command: AdsCommand,
        services: &AdsServices,
    ) -> Result<Vec<AdsEvent>, AdsError> {
        let AdsCommand::RecordExposure {
            customer_id,
            experiment_id,
            placement,
            region,
        } = command;
        if !is_code(&placement) {
            return Err(AdsError::InvalidPlacement);
        }
        let experiments = services.experiments.current_experiments();
        let now = services.clock.now();
        let event = match self.assignments.get(&experiment_id) {
            // Sticky: the variant first assigned, whatever the configuration says now; the
            // promotion is the variant's current one (the recorded one if the variant is gone).
            Some(recorded) => {
                let experiment = experiments
                    .get(&experiment_id)
                    .ok_or_else(|| AdsError::UnknownExperiment(experiment_id.to_string()))?;
                check_eligible(&experiment_id, experiment, &region)?;
                let promotion_code = experiment
                    .variants
                    .iter()
                    .find(|v| v.name == recorded.variant)
                    .map_or_else(
                        || recorded.promotion_code.clone(),
                        |v| v.promotion_code.clone(),
                    );
                AdsEvent::ExposureRecorded {
                    experiment_id,
                    layer: recorded.layer.clone(),
                    variant: recorded.variant.clone(),
                    promotion_code,
                    placement,
                    region,
                    bucket: recorded.bucket,
                    attribution_window_hours: experiment.attribution_window_hours,
                    exposed_at: now,
                }
            }
            None => {
                let assignment =
                    assign(&experiments, experiment_id.as_str(), customer_id, &region)?;
                if let Some(other) = self.layers.get(&assignment.layer) {
                    return Err(AdsError::InAnotherExperimentOfLayer {
                        experiment: experiment_id,
                        layer: assignment.layer,
                        other: other.clone(),
                    });
                }
                AdsEvent::ExposureRecorded {
                    experiment_id,
                    layer: assignment.layer,
                    variant: assignment.variant,
                    promotion_code: assignment.promotion_code,
                    placement,
                    region,
                    bucket: assignment.bucket,
                    attribution_window_hours: assignment.attribution_window_hours,
                    exposed_at: now,
                }
            }
        };
        Ok(vec![event])
    }
}

impl Aggregate for AdAudience {
    const TYPE: &'static str = AGGREGATE_TYPE;
    type Command = AdsCommand;
    type Event = AdsEvent;
    type Error = AdsError;
    type Services = AdsServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command, services)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        let AdsEvent::ExposureRecorded {
            experiment_id,
            layer,
            variant,
            promotion_code,
            bucket,
            exposed_at,
            ..
        } = event;
        self.exposures = self.exposures.saturating_add(1);
        self.layers
            .entry(layer.clone())
            .or_insert_with(|| experiment_id.clone());
        self.assignments
            .entry(experiment_id)
            .and_modify(|a| {
                a.promotion_code.clone_from(&promotion_code);
                a.last_exposed_at = exposed_at;
                a.exposures = a.exposures.saturating_add(1);
            })
            .or_insert(RecordedAssignment {
                layer,
                variant,
                promotion_code,
                bucket,
                first_exposed_at: exposed_at,
                last_exposed_at: exposed_at,
                exposures: 1,
            });
    }
}

#[cfg(test)]
mod tests;
