//! Confluent-compatible schema registry (work in progress).
