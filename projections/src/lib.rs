//! # projections: read models built from the event topics
//!
//! A projector consumes event topics with its own consumer group and keeps a read model in its
//! own PostgreSQL schema. The [`runtime`] applies each batch of records in one transaction
//! together with the projector's checkpoint and a per-aggregate dedup (the last sequence
//! applied), so a redelivered, replayed or duplicated record changes nothing: delivery is at
//! least once, the read model is effectively once.
//!
//! Place in the flow: the relay in `streams` publishes events; projectors here turn them into
//! tables; `api` serves those tables.

pub mod ads;
pub mod analytics;
pub mod live;
pub mod notifications;
pub mod notifier;
pub mod operations;
pub mod ratings;
pub mod runtime;
pub mod tracking;

pub use ads::AdsProjection;
pub use analytics::AnalyticsProjection;
pub use notifications::NotificationsProjection;
pub use ratings::RatingsProjection;
pub use runtime::{
    ensure_schema, FirstDelivery, Projection, ProjectionError, Projector, ProjectorConfig,
    ProjectorError,
};
pub use tracking::TrackingProjection;
