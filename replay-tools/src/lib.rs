//! replay-tools
