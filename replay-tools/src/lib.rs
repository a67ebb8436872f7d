//! # replay-tools: for analysts and auditors
//!
//! Reads the event history without issuing commands: rebuilding read models from the topics or
//! the event store, materialising state as of an instant, exporting events (JSONL, CSV,
//! Parquet), verifying the hash chain of the event log and reconciling store, topics and read
//! models. Place in the flow: beside the pipeline, reading the `events` table and the topics.
//!
//! Not built yet: this crate reserves its place in the workspace.
