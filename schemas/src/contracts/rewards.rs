//! Contracts of the rewards aggregate (topic `rewards`).

use super::Source;

pub(super) const SOURCES: &[Source] = &[];
