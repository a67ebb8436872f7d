//! Contracts of the ads aggregate (topic `ads`).

use super::Source;

pub(super) const SOURCES: &[Source] = sources!("ads":
    "ExposureRecorded" @ "1.0",
);
