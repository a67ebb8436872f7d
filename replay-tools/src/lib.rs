//! # replay-tools: for operators, analysts and auditors
//!
//! Reads the event history and the read models' bookkeeping without issuing commands. Today:
//! the read models' lag and dead letters (list, re-drive), the command-line twin of the API's
//! `/projections` endpoints. To come (issue #6): rebuilding read models from the topics or the
//! event store, materialising state as of an instant, exporting events (JSONL, CSV, Parquet),
//! verifying the hash chain of the event log and reconciling store, topics and read models.
//!
//! Place in the flow: beside the pipeline, reading the database the projectors write.

pub mod asof;
pub mod chain;
pub mod check;
pub mod cli;
pub mod export;
pub mod history;
pub mod progress;
pub mod rebuild;
pub mod reconcile;
