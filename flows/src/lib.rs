//! # flows: the process managers
//!
//! A process manager consumes events on the consumer runtime (`streams::consumer`: its own
//! consumer group, per-aggregate dedup, checkpoint and dead letters, in one transaction with its
//! own state) and issues repeatable commands through the write side (`commands`).
//!
//! Place in the flow: the relay publishes events; [`OrderFlow`] reacts to them by commanding
//! other aggregates; those commands append events that the relay publishes in turn.

pub mod order_flow;

pub use order_flow::{OrderFlow, DEMO_PROVIDER};
