//! The store of keys in PostgreSQL: claims, final responses, their expiry.

use super::*;

/// The idempotency store and its settings (the state of [`middleware`]).
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub(super) pool: PgPool,
    pub(super) ttl: Duration,
    pub(super) request_timeout: Duration,
}

/// One request's claim on a key.
#[derive(Debug)]
pub(super) struct Claim {
    pub(super) scope: String,
    pub(super) key: String,
    pub(super) fingerprint: [u8; 32],
}

/// A row of another request with the same key.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct Existing {
    pub(super) fingerprint: Vec<u8>,
    pub(super) state: String,
    pub(super) status: Option<i16>,
    pub(super) headers: Option<serde_json::Value>,
    pub(super) body: Option<Vec<u8>>,
    pub(super) expired: bool,
}

impl Idempotency {
    /// Keys expire `ttl` after their response was stored; an `in_flight` claim older than twice
    /// `request_timeout` belongs to a process that died.
    pub fn new(pool: PgPool, ttl: Duration, request_timeout: Duration) -> Self {
        Self {
            pool,
            ttl,
            request_timeout,
        }
    }

    pub(super) fn stale_after(&self) -> Duration {
        self.request_timeout.saturating_mul(2)
    }

    /// Takes the key, or takes over a row that expired or whose owner died (same request
    /// only). `Some(claimed_at)` when this request owns it now.
    pub(super) async fn claim(&self, claim: &Claim) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        sqlx::query_scalar(
            "INSERT INTO idempotency_keys AS k (scope, key, fingerprint, state, created_at, expires_at) \
             VALUES ($1, $2, $3, 'in_flight', clock_timestamp(), \
                     clock_timestamp() + make_interval(secs => $4)) \
             ON CONFLICT (scope, key) DO UPDATE \
             SET fingerprint = excluded.fingerprint, state = 'in_flight', status = NULL, \
                 headers = NULL, body = NULL, created_at = excluded.created_at, \
                 expires_at = excluded.expires_at \
             WHERE (k.expires_at <= clock_timestamp() \
                    AND (k.state = 'done' \
                         OR k.created_at < clock_timestamp() - make_interval(secs => $5))) \
                OR (k.state = 'in_flight' \
                    AND k.created_at < clock_timestamp() - make_interval(secs => $5) \
                    AND k.fingerprint = excluded.fingerprint) \
             RETURNING created_at",
        )
        .bind(&claim.scope)
        .bind(&claim.key)
        .bind(&claim.fingerprint[..])
        .bind(self.ttl.as_secs_f64())
        .bind(self.stale_after().as_secs_f64())
        .fetch_optional(&self.pool)
        .await
    }

    pub(super) async fn existing(&self, claim: &Claim) -> Result<Option<Existing>, sqlx::Error> {
        sqlx::query_as(
            "SELECT fingerprint, state, status, headers, body, \
                    expires_at <= clock_timestamp() AS expired \
             FROM idempotency_keys WHERE scope = $1 AND key = $2",
        )
        .bind(&claim.scope)
        .bind(&claim.key)
        .fetch_optional(&self.pool)
        .await
    }

    pub(super) async fn store(
        &self,
        claim: &Claim,
        claimed_at: DateTime<Utc>,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), sqlx::Error> {
        let stored: serde_json::Map<String, serde_json::Value> = STORED_HEADERS
            .iter()
            .filter_map(|name| {
                let value = headers.get(name)?.to_str().ok()?;
                Some((name.as_str().to_owned(), value.into()))
            })
            .collect();
        sqlx::query(
            "UPDATE idempotency_keys \
             SET state = 'done', status = $4, headers = $5, body = $6, \
                 expires_at = clock_timestamp() + make_interval(secs => $7) \
             WHERE scope = $1 AND key = $2 AND created_at = $3 AND state = 'in_flight'",
        )
        .bind(&claim.scope)
        .bind(&claim.key)
        .bind(claimed_at)
        .bind(i16::try_from(status.as_u16()).unwrap_or(i16::MAX))
        .bind(serde_json::Value::Object(stored))
        .bind(body)
        .bind(self.ttl.as_secs_f64())
        .execute(&self.pool)
        .await
        .map(drop)
    }

    pub(super) async fn release(&self, claim: &Claim, claimed_at: DateTime<Utc>) {
        let released = sqlx::query(
            "DELETE FROM idempotency_keys \
             WHERE scope = $1 AND key = $2 AND created_at = $3 AND state = 'in_flight'",
        )
        .bind(&claim.scope)
        .bind(&claim.key)
        .bind(claimed_at)
        .execute(&self.pool)
        .await;
        if let Err(error) = released {
            // The claim stays until it is stale (twice the request timeout); then a retry acts.
            tracing::warn!(%error, "could not release an idempotency key");
        }
    }

    /// Deletes the keys that expired (never an `in_flight` claim that may still be running).
    pub async fn purge_expired(&self) -> Result<u64, sqlx::Error> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE expires_at <= clock_timestamp() \
             AND (state = 'done' OR created_at < clock_timestamp() - make_interval(secs => $1))",
        )
        .bind(self.stale_after().as_secs_f64())
        .execute(&self.pool)
        .await
        .map(|done| done.rows_affected())
    }

    /// Purges expired keys every `every`, for as long as the process runs.
    pub async fn purge_every(self, every: Duration) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match self.purge_expired().await {
                Ok(purged) => tracing::debug!(purged, "expired idempotency keys purged"),
                Err(error) => tracing::warn!(%error, "could not purge expired idempotency keys"),
            }
        }
    }

    /// Runs the request as the owner of its key, in a task of its own: the outcome is stored
    /// (or the key released) even if the client goes away or the request times out meanwhile.
    pub(super) async fn run_as_owner(
        self,
        claim: Claim,
        claimed_at: DateTime<Utc>,
        mut request: Request,
        next: Next,
    ) -> Response {
        request.extensions_mut().insert(IdempotencyKey(derived_id(
            &claim.scope,
            &claim.key,
            &claim.fingerprint,
        )));
        let owner = async move {
            let outcome = tokio::time::timeout(
                self.request_timeout,
                AssertUnwindSafe(next.run(request)).catch_unwind(),
            )
            .await;
            let response = match outcome {
                Ok(Ok(response)) => response,
                Ok(Err(_panic)) => {
                    self.release(&claim, claimed_at).await;
                    return ApiError::Internal("the handler panicked".to_owned()).into_response();
                }
                Err(_elapsed) => {
                    self.release(&claim, claimed_at).await;
                    return ApiError::timed_out(self.request_timeout).into_response();
                }
            };
            if !is_final(response.status()) {
                self.release(&claim, claimed_at).await;
                return response;
            }
            let (parts, body) = response.into_parts();
            let body = match axum::body::to_bytes(body, usize::MAX).await {
                Ok(body) => body,
                Err(error) => {
                    self.release(&claim, claimed_at).await;
                    return ApiError::internal(format!("response body: {error}")).into_response();
                }
            };
            if let Err(error) = self
                .store(&claim, claimed_at, parts.status, &parts.headers, &body)
                .await
            {
                // The response still goes out; a retry finds the claim stale later and is
                // answered by the event store (the derived ids) instead of the table.
                tracing::warn!(%error, "could not store an idempotent response");
            }
            Response::from_parts(parts, Body::from(body))
        };
        match tokio::spawn(owner.instrument(tracing::Span::current())).await {
            Ok(response) => response,
            Err(error) => {
                ApiError::internal(format!("idempotent request task: {error}")).into_response()
            }
        }
    }
}
