//! The one list of read models: the projector hosts them, `replay-tools` rebuilds and checks
//! them, the API creates their schemas and waits on their positions. A new read model is added
//! here and nowhere else.

use std::sync::Arc;

use streams::consumer::Projection;

use crate::{
    AdsProjection, AnalyticsProjection, NotificationsProjection, RatingsProjection,
    TrackingProjection,
};

/// Every read model, in the order a projector starts them.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(TrackingProjection),
        Arc::new(RatingsProjection),
        Arc::new(AnalyticsProjection),
        Arc::new(AdsProjection),
        Arc::new(NotificationsProjection),
    ]
}

/// The names of every read model, in the order of [`all`].
pub fn names() -> Vec<&'static str> {
    all().iter().map(|p| p.name()).collect()
}

/// A read model by name.
pub fn by_name(name: &str) -> Result<Arc<dyn Projection>, UnknownReadModel> {
    all()
        .into_iter()
        .find(|p| p.name() == name)
        .ok_or_else(|| UnknownReadModel(name.to_owned()))
}

/// A name that is not a read model's.
#[derive(Debug, thiserror::Error)]
#[error("unknown read model `{0}`; known: {known}", known = names().join(", "))]
pub struct UnknownReadModel(pub String);

#[cfg(test)]
mod tests {
    use super::all;
    use streams::consumer::Projection;

    /// A rebuild drops the query-only indexes by name and gets them back from the DDL: each
    /// must be an index that the projection's own DDL creates.
    #[test]
    fn query_only_indexes_are_created_by_their_ddl() {
        for projection in all() {
            for index in projection.query_only_indexes() {
                let ddl = format!(
                    "CREATE INDEX IF NOT EXISTS {index} ON {}.",
                    projection.name()
                );
                assert!(
                    projection.schema_sql().contains(&ddl),
                    "{}: {index} is not created by its DDL",
                    projection.name()
                );
            }
        }
        assert!(!crate::AnalyticsProjection.query_only_indexes().is_empty());
    }

    #[test]
    fn names_are_unique() {
        let mut names = super::names();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all().len());
    }
}
