//! The live catalogue: regions, menu items, stores, promotions and ad experiments, managed by
//! administrators and read by pricing (the API), the order flow (rates, store locations) and
//! ad exposures (experiment configuration).
//!
//! Entries live in PostgreSQL (`catalogue_entries`, one JSON document each, with who changed it
//! and when); every process keeps a snapshot and refreshes it after its own writes and
//! periodically ([`CatalogueStore::refresh_every`]), so a change reaches every instance within
//! the refresh interval. An empty table is seeded from a catalogue file at start.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use domain::ads::{Experiment, ExperimentId, Experiments};
use domain::services::{
    Catalogue, MenuItem, Pricing, PricingError, Promotion, Quote, RegionSettings, RequestedLine,
    StoreSettings,
};
use domain::{MenuItemId, RegionCode, StoreId};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The catalogue that seeds an empty table: the JSON file at `path`, or the built-in demo one.
pub fn seed_catalogue(path: Option<&str>) -> Result<Catalogue, String> {
    let parsed = match path {
        Some(path) => Catalogue::from_json(
            &std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read catalogue {path}: {e}"))?,
        ),
        None => Catalogue::demo(),
    };
    parsed.map_err(|e| format!("invalid catalogue: {e}"))
}

/// Why the catalogue could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("catalogue entry {kind}/{key} is not valid: {reason}")]
    Invalid {
        kind: String,
        key: String,
        reason: String,
    },
}

/// The catalogue in PostgreSQL, with this process's snapshot of it.
#[derive(Debug)]
pub struct CatalogueStore {
    pool: PgPool,
    snapshot: RwLock<Arc<Catalogue>>,
}

impl CatalogueStore {
    /// Loads the catalogue, seeding an empty table with `seed`.
    pub async fn load(pool: PgPool, seed: &Catalogue) -> Result<Self, CatalogueError> {
        let store = Self {
            pool,
            snapshot: RwLock::new(Arc::new(Catalogue::default())),
        };
        store.seed_if_empty(seed).await?;
        store.refresh().await?;
        Ok(store)
    }

    /// Seeds an empty table in one transaction, under a lock: processes starting together (the
    /// API and the process manager) never see the table half seeded, and seed it once.
    async fn seed_if_empty(&self, seed: &Catalogue) -> Result<(), CatalogueError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('catalogue_entries:seed'))")
            .execute(&mut *tx)
            .await?;
        let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM catalogue_entries")
            .fetch_one(&mut *tx)
            .await?;
        if entries > 0 {
            return Ok(());
        }
        for (code, settings) in &seed.regions {
            write(&mut *tx, "region", code.as_str(), settings, "seed").await?;
        }
        for (id, item) in &seed.items {
            write(&mut *tx, "item", id.as_str(), item, "seed").await?;
        }
        for (id, store) in &seed.stores {
            write(&mut *tx, "store", &id.to_string(), store, "seed").await?;
        }
        for (code, promotion) in &seed.promotions {
            write(&mut *tx, "promotion", code, promotion, "seed").await?;
        }
        for (id, experiment) in &seed.experiments {
            write(&mut *tx, "experiment", id.as_str(), experiment, "seed").await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Catalogue> {
        self.snapshot
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Reads every entry again.
    pub async fn refresh(&self) -> Result<(), CatalogueError> {
        let rows: Vec<(String, String, serde_json::Value)> =
            sqlx::query_as("SELECT kind, key, value FROM catalogue_entries")
                .fetch_all(&self.pool)
                .await?;
        let mut catalogue = Catalogue::default();
        for (kind, key, value) in rows {
            let invalid = |reason: String| CatalogueError::Invalid {
                kind: kind.clone(),
                key: key.clone(),
                reason,
            };
            let text = |e: &dyn std::fmt::Display| e.to_string();
            match kind.as_str() {
                "region" => {
                    catalogue.regions.insert(
                        RegionCode::parse(key.clone()).map_err(|e| invalid(text(&e)))?,
                        serde_json::from_value(value).map_err(|e| invalid(text(&e)))?,
                    );
                }
                "item" => {
                    catalogue.items.insert(
                        MenuItemId::parse(key.clone()).map_err(|e| invalid(text(&e)))?,
                        serde_json::from_value(value).map_err(|e| invalid(text(&e)))?,
                    );
                }
                "store" => {
                    catalogue.stores.insert(
                        key.parse::<StoreId>().map_err(|e| invalid(text(&e)))?,
                        serde_json::from_value(value).map_err(|e| invalid(text(&e)))?,
                    );
                }
                "experiment" => {
                    catalogue.experiments.insert(
                        ExperimentId::parse(key.clone()).map_err(|e| invalid(text(&e)))?,
                        serde_json::from_value(value).map_err(|e| invalid(text(&e)))?,
                    );
                }
                _ => {
                    catalogue.promotions.insert(
                        key.clone(),
                        serde_json::from_value(value).map_err(|e| invalid(text(&e)))?,
                    );
                }
            }
        }
        if let Ok(mut snapshot) = self.snapshot.write() {
            *snapshot = Arc::new(catalogue);
        }
        Ok(())
    }

    /// Refreshes the snapshot every `every` until `shutdown`.
    pub async fn refresh_every(&self, every: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "catalogue refresh failed; keeping the last snapshot");
            }
        }
    }

    async fn write<T: Serialize>(
        &self,
        kind: &str,
        key: &str,
        value: &T,
        actor: &str,
    ) -> Result<(), CatalogueError> {
        write(&self.pool, kind, key, value, actor).await
    }

    /// Creates or replaces a region's settings.
    pub async fn put_region(
        &self,
        code: &RegionCode,
        settings: &RegionSettings,
        actor: &str,
    ) -> Result<(), CatalogueError> {
        self.write("region", code.as_str(), settings, actor).await?;
        self.refresh().await
    }

    /// Creates or replaces a menu item (prices per region, options, availability).
    pub async fn put_item(
        &self,
        id: &MenuItemId,
        item: &MenuItem,
        actor: &str,
    ) -> Result<(), CatalogueError> {
        self.write("item", id.as_str(), item, actor).await?;
        self.refresh().await
    }

    /// Creates or replaces a store.
    pub async fn put_store(
        &self,
        id: StoreId,
        store: &StoreSettings,
        actor: &str,
    ) -> Result<(), CatalogueError> {
        self.write("store", &id.to_string(), store, actor).await?;
        self.refresh().await
    }

    /// Creates or replaces a promotion code.
    pub async fn put_promotion(
        &self,
        code: &str,
        promotion: &Promotion,
        actor: &str,
    ) -> Result<(), CatalogueError> {
        self.write("promotion", code, promotion, actor).await?;
        self.refresh().await
    }
}

impl CatalogueStore {
    /// Creates or replaces an ad experiment. It is checked against the catalogue as stored (its
    /// promotions and regions exist, its layer keeps at most 100 % of traffic) under a lock, so
    /// two administrators writing to one layer at once cannot overbook it together.
    pub async fn put_experiment(
        &self,
        id: &ExperimentId,
        experiment: &Experiment,
        actor: &str,
    ) -> Result<(), CatalogueError> {
        let invalid = |reason: String| CatalogueError::Invalid {
            kind: "experiment".to_owned(),
            key: id.to_string(),
            reason,
        };
        let value = serde_json::to_value(experiment).map_err(|e| invalid(e.to_string()))?;
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('catalogue_entries:experiment'))")
            .execute(&mut *tx)
            .await?;
        let rows: Vec<(String, serde_json::Value)> = sqlx::query_as(
            "SELECT key, value FROM catalogue_entries WHERE kind = 'experiment' AND key <> $1",
        )
        .bind(id.as_str())
        .fetch_all(&mut *tx)
        .await?;
        // The rest of the catalogue (promotions, regions) from the snapshot, refreshed first so
        // that an entry just written by another instance counts.
        self.refresh().await?;
        let mut catalogue = (*self.current()).clone();
        catalogue.experiments.clear();
        for (key, value) in rows {
            let other = ExperimentId::parse(key).map_err(|e| invalid(e.to_string()))?;
            let other_experiment: Experiment =
                serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
            catalogue.experiments.insert(other, other_experiment);
        }
        domain::ads::check_experiment(&catalogue, id, experiment)
            .map_err(|e| invalid(e.to_string()))?;
        sqlx::query(
            "INSERT INTO catalogue_entries (kind, key, value, updated_by) \
             VALUES ('experiment', $1, $2, $3) \
             ON CONFLICT (kind, key) DO UPDATE \
             SET value = excluded.value, updated_by = excluded.updated_by, \
                 updated_at = clock_timestamp()",
        )
        .bind(id.as_str())
        .bind(value)
        .bind(actor)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.refresh().await
    }
}

impl Experiments for CatalogueStore {
    fn current_experiments(&self) -> std::collections::BTreeMap<ExperimentId, Experiment> {
        self.current().experiments.clone()
    }
}

impl Pricing for CatalogueStore {
    fn store_region(&self, store: &StoreId) -> Result<RegionCode, PricingError> {
        self.current().store_region(store)
    }

    fn quote(
        &self,
        region: &RegionCode,
        lines: &[RequestedLine],
        redeem_points: u64,
        promotion: Option<&str>,
    ) -> Result<Quote, PricingError> {
        self.current()
            .quote(region, lines, redeem_points, promotion)
    }

    fn store_location(&self, store: &domain::StoreId) -> Option<domain::delivery::GeoPoint> {
        self.current().store_location(store)
    }
}

/// Creates or replaces one entry.
async fn write<'c, T: Serialize>(
    executor: impl sqlx::PgExecutor<'c>,
    kind: &str,
    key: &str,
    value: &T,
    actor: &str,
) -> Result<(), CatalogueError> {
    let value = serde_json::to_value(value).map_err(|e| CatalogueError::Invalid {
        kind: kind.to_owned(),
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    sqlx::query(
        "INSERT INTO catalogue_entries (kind, key, value, updated_by) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (kind, key) DO UPDATE \
         SET value = excluded.value, updated_by = excluded.updated_by, \
             updated_at = clock_timestamp()",
    )
    .bind(kind)
    .bind(key)
    .bind(value)
    .bind(actor)
    .execute(executor)
    .await?;
    Ok(())
}
