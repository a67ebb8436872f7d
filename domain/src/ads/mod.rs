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

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::services::{Catalogue, Clock};
use crate::{CustomerId, RegionCode};

mod experiment;

pub use experiment::{
    assign, check_experiment, check_layers, layer_bucket, layer_ranges, pick_variant,
    variant_point, Assignment, Experiment, ExperimentConfigError, ExperimentId, Variant, BUCKETS,
    MAX_ATTRIBUTION_WINDOW_HOURS, MAX_CODE_CHARS, MAX_VARIANTS, MAX_WEIGHT,
};
use experiment::{check_eligible, is_code, CODE_RULE};

/// Aggregate type name in the event store and on the topics. Never renamed.
pub const AGGREGATE_TYPE: &str = "ads";

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
    /// What a command records: each command's rule is in the function named after it.
    fn decide(
        &self,
        command: AdsCommand,
        services: &AdsServices,
    ) -> Result<Vec<AdsEvent>, AdsError> {
        match command {
            AdsCommand::RecordExposure {
                customer_id,
                experiment_id,
                placement,
                region,
            } => {
                let event =
                    self.record_exposure(services, customer_id, experiment_id, placement, region)?;
                Ok(vec![event])
            }
        }
    }

    /// Recording an exposure: at a valid placement, of an experiment the customer may see. A
    /// customer who saw it before keeps the variant first assigned ([`Self::repeat_assignment`]);
    /// otherwise the pure assignment decides ([`Self::first_assignment`]).
    fn record_exposure(
        &self,
        services: &AdsServices,
        customer_id: CustomerId,
        experiment_id: ExperimentId,
        placement: String,
        region: RegionCode,
    ) -> Result<AdsEvent, AdsError> {
        if !is_code(&placement) {
            return Err(AdsError::InvalidPlacement);
        }
        let experiments = services.experiments.current_experiments();
        let now = services.clock.now();
        let assignment = match self.assignments.get(&experiment_id) {
            Some(recorded) => {
                Self::repeat_assignment(&experiments, &experiment_id, recorded, &region)?
            }
            None => self.first_assignment(&experiments, &experiment_id, customer_id, &region)?,
        };
        Ok(AdsEvent::ExposureRecorded {
            experiment_id,
            layer: assignment.layer,
            variant: assignment.variant,
            promotion_code: assignment.promotion_code,
            placement,
            region,
            bucket: assignment.bucket,
            attribution_window_hours: assignment.attribution_window_hours,
            exposed_at: now,
        })
    }

    /// Sticky: the variant first assigned, whatever the configuration says now, as long as the
    /// experiment still exposes customers of `region`; the promotion is the variant's current
    /// one (the recorded one if the variant is gone).
    fn repeat_assignment(
        experiments: &BTreeMap<ExperimentId, Experiment>,
        experiment_id: &ExperimentId,
        recorded: &RecordedAssignment,
        region: &RegionCode,
    ) -> Result<Assignment, AdsError> {
        let experiment = experiments
            .get(experiment_id)
            .ok_or_else(|| AdsError::UnknownExperiment(experiment_id.to_string()))?;
        check_eligible(experiment_id, experiment, region)?;
        let promotion_code = experiment
            .variants
            .iter()
            .find(|v| v.name == recorded.variant)
            .map_or_else(
                || recorded.promotion_code.clone(),
                |v| v.promotion_code.clone(),
            );
        Ok(Assignment {
            experiment_id: experiment_id.clone(),
            layer: recorded.layer.clone(),
            variant: recorded.variant.clone(),
            promotion_code,
            bucket: recorded.bucket,
            attribution_window_hours: experiment.attribution_window_hours,
        })
    }

    /// A first exposure: the pure [`assign`]ment, refused when the customer already belongs to
    /// another experiment of the same layer.
    fn first_assignment(
        &self,
        experiments: &BTreeMap<ExperimentId, Experiment>,
        experiment_id: &ExperimentId,
        customer_id: CustomerId,
        region: &RegionCode,
    ) -> Result<Assignment, AdsError> {
        let assignment = assign(experiments, experiment_id.as_str(), customer_id, region)?;
        if let Some(other) = self.layers.get(&assignment.layer) {
            return Err(AdsError::InAnotherExperimentOfLayer {
                experiment: experiment_id.clone(),
                layer: assignment.layer,
                other: other.clone(),
            });
        }
        Ok(assignment)
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
