//! # replay-tools: for operators, analysts and auditors
//!
//! Works beside the pipeline on the event history, the topics and the read models. It never
//! appends to the event log; what it writes is named by its subcommand: a shadow read model and
//! its swap (`rebuild --swap`), chain anchors (`anchor`), re-drive and stuck-flow requests, and a
//! customer's erasure (deleting the key that seals their personal data). It covers the read
//! models' lag and dead letters (the command-line twin of `/projections`), rebuilding a read
//! model into a shadow schema and swapping it in ([`rebuild`], [`check`]), state as of an
//! instant ([`asof`]), exporting events to JSONL, CSV and Parquet ([`export`]), an aggregate's
//! history ([`history`]), verifying the hash-chained event log ([`chain`]), reconciling
//! store, topics and read models ([`reconcile`]), and erasing a customer's personal data
//! ([`privacy`]; what is shown to people reveals it, or shows it as `[erased]`).
//!
//! Place in the flow: beside the pipeline; it reads the log through `commands::log`, maps events
//! to their published form through `streams::Published`, and knows the read models from
//! `projections::read_models`.

pub mod asof;
pub mod chain;
pub mod check;
pub mod cli;
pub mod export;
pub mod history;
pub mod privacy;
pub mod progress;
pub mod rebuild;
pub mod reconcile;
pub mod restore;

/// The allocator the replay tools run with (their binary and benchmarks declare it global):
/// decoding and mapping events allocate per field, and glibc's allocator spent about half of a
/// rebuild's decoding time in `malloc` and `free`.
pub use mimalloc::MiMalloc as Allocator;
