//! The consumer runtime, shared by read models (`projections`) and process managers (`flows`):
//! consume, decode, dedup, apply, checkpoint, in one PostgreSQL transaction.
//!
//! A consumer implements [`Projection`]; a [`Projector`] runs it with its own consumer group and
//! keeps, in the consumer's own schema, the checkpoint and a per-aggregate dedup (the last
//! sequence applied) beside the consumer's tables, so a redelivered, replayed or duplicated record
//! changes nothing: delivery is at least once, application exactly once. A record that cannot be
//! applied goes to the [`dead_letters`] with its error; [`lag`] is measured from the consumer's own
//! fetch statistics; [`replay`] applies a rebuilt history through the same dedup.

mod config;
pub mod dead_letters;
mod isolation;
pub mod lag;
pub mod live;
mod projection;
mod projector;
pub mod replay;
mod schema;

pub use config::ProjectorConfig;
pub use isolation::apply_isolating;
pub use lag::{lag_probe, WatermarkContext};
pub use projection::{FirstDelivery, Projection, ProjectionError};
pub use projector::{Projector, ProjectorError, DEAD_LETTER_TOPIC};
pub use replay::{apply_replayed, ReplayVerdict, ReplayedEvent};
pub use schema::{create_tables, ensure_schema, resume_from, store_checkpoints, use_schema};

/// The live-update channel ([`live`]) on which the projector of `read_model`
/// announces, per aggregate, that it applied more of its events: the signal's key is
/// `<aggregate_type>:<aggregate_id>`, and the new position is in `<read_model>.applied`.
pub fn applied_channel(read_model: &str) -> String {
    format!("applied.{read_model}")
}
