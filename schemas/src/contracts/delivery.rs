//! Contracts of the delivery aggregate (topic `deliveries`).

use super::Source;

pub(super) const SOURCES: &[Source] = &[];
