//! Contracts of the payment aggregate (topic `payments`).

use super::Source;

pub(super) const SOURCES: &[Source] = &[];
