//! # projections: read models built from the event topics
//!
//! A projector consumes event topics with its own consumer group and keeps a read model in its
//! own PostgreSQL schema. The consumer runtime (`streams::consumer`) applies each batch of
//! records in one transaction together with the projector's checkpoint and a per-aggregate dedup
//! (the last sequence applied), so a redelivered, replayed or duplicated record changes nothing:
//! delivery is at least once, the read model is effectively once.
//!
//! Place in the flow: the relay in `streams` publishes events; projectors here turn them into
//! tables; `api` serves those tables.

pub mod ads;
pub mod analytics;
pub mod notifications;
pub mod notifier;
pub mod operations;
pub mod ratings;
pub mod read_models;
pub mod tracking;

pub use ads::AdsProjection;
pub use analytics::AnalyticsProjection;
pub use notifications::NotificationsProjection;
pub use ratings::RatingsProjection;
pub use tracking::TrackingProjection;
