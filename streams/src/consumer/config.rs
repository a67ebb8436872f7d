//! The consumer runtime's settings.

use serde::Deserialize;

/// Projector settings.
#[derive(Debug, Clone, Deserialize)]
pub struct ProjectorConfig {
    /// `PROJECTOR_GROUP_PREFIX`: consumer groups are `<prefix><projection>` (default `backbone-`).
    #[serde(default = "default_group_prefix")]
    pub projector_group_prefix: String,
    /// `PROJECTOR_BATCH_SIZE`: records applied per transaction at most (default 2000).
    #[serde(default = "default_batch")]
    pub projector_batch_size: usize,
    /// `PROJECTOR_MAX_ATTEMPTS`: attempts before an event that fails goes to the dead letters
    /// (default 3).
    #[serde(default = "default_attempts")]
    pub projector_max_attempts: u32,
    /// `PROJECTOR_FETCH_MIN_BYTES`: the broker answers a fetch once it has this much (or after
    /// `KAFKA_FETCH_WAIT_MAX_MS`); default 1, so a new event is fetched at once (a backlog still
    /// comes in full fetches). A larger value trades latency for fewer fetches.
    #[serde(default = "default_fetch_min_bytes")]
    pub projector_fetch_min_bytes: u32,
}

const fn default_fetch_min_bytes() -> u32 {
    1
}

fn default_group_prefix() -> String {
    "backbone-".to_owned()
}
const fn default_batch() -> usize {
    2000
}
const fn default_attempts() -> u32 {
    3
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            projector_group_prefix: default_group_prefix(),
            projector_batch_size: default_batch(),
            projector_max_attempts: default_attempts(),
            projector_fetch_min_bytes: default_fetch_min_bytes(),
        }
    }
}

impl ProjectorConfig {
    pub fn from_env() -> Result<Self, envy::Error> {
        envy::from_env()
    }
}
