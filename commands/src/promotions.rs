//! Promotion limits that span orders: a code with `once_per_customer` discounts one order per
//! customer. The order aggregate sees one order at a time, so the command side reserves the use
//! in `promotion_claims` (one row per code and customer, naming the order) before appending the
//! order, and concurrent placements serialize on that row's primary key.
//!
//! A claim's order id makes it safe against crashes: while its order exists in the event store
//! the claim stands; a claim whose order never appeared is released by the placement that was
//! refused, or, after [`PromotionClaims::grace`] (a crash between the claim and the append), is
//! taken over by the next order that asks.

use std::time::Duration;

use sqlx::PgPool;

/// Why a claim could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another order of this customer holds the promotion.
    #[error("promotion `{code}` is limited to one order per customer, and order {order_id} already used it")]
    Used { code: String, order_id: String },
    #[error("promotion claims: {0}")]
    Database(#[from] sqlx::Error),
}

/// The claims of once-per-customer promotions.
#[derive(Debug, Clone)]
pub struct PromotionClaims {
    pool: PgPool,
    grace: Duration,
}

impl PromotionClaims {
    /// `grace`: how long a claim whose order has not appeared stays reserved; longer than any
    /// placement may take (the API's request timeout).
    pub fn new(pool: PgPool, grace: Duration) -> Self {
        Self { pool, grace }
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Reserves `code` for `order_id` of `customer_id`. Succeeds when the customer has no claim,
    /// when the claim is this order's (a retry), or when it is older than the grace period and
    /// its order never appeared (taken over). Otherwise the customer has used the promotion.
    pub async fn claim(
        &self,
        code: &str,
        customer_id: &str,
        order_id: &str,
    ) -> Result<(), ClaimError> {
        let holder: Option<String> = sqlx::query_scalar(
            "INSERT INTO promotion_claims AS c (code, customer_id, order_id) VALUES ($1, $2, $3) \
             ON CONFLICT (code, customer_id) DO UPDATE \
             SET order_id = excluded.order_id, claimed_at = clock_timestamp() \
             WHERE c.order_id = excluded.order_id \
                OR (c.claimed_at < clock_timestamp() - make_interval(secs => $4) \
                    AND NOT EXISTS (SELECT 1 FROM events e \
                                    WHERE e.aggregate_type = 'order' AND e.aggregate_id = c.order_id)) \
             RETURNING order_id",
        )
        .bind(code)
        .bind(customer_id)
        .bind(order_id)
        .bind(self.grace.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        if holder.is_some() {
            return Ok(());
        }
        let order_id: String = sqlx::query_scalar(
            "SELECT order_id FROM promotion_claims WHERE code = $1 AND customer_id = $2",
        )
        .bind(code)
        .bind(customer_id)
        .fetch_optional(&self.pool)
        .await?
        .unwrap_or_default();
        Err(ClaimError::Used {
            code: code.to_owned(),
            order_id,
        })
    }

    /// Gives back the claim of `order_id` (its placement was refused), unless its order exists.
    pub async fn release(
        &self,
        code: &str,
        customer_id: &str,
        order_id: &str,
    ) -> Result<(), ClaimError> {
        sqlx::query(
            "DELETE FROM promotion_claims c \
             WHERE code = $1 AND customer_id = $2 AND order_id = $3 \
               AND NOT EXISTS (SELECT 1 FROM events e \
                               WHERE e.aggregate_type = 'order' AND e.aggregate_id = c.order_id)",
        )
        .bind(code)
        .bind(customer_id)
        .bind(order_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Claims again, from the event store, every promotion its orders used (the first order of
    /// each code and customer holds it), after the store was restored from the topics: the
    /// claims live beside the events, not in them. Codes that are not once-per-customer are
    /// claimed too; no placement asks about them. Returns the claims recorded.
    pub async fn restore_from_events(pool: &PgPool) -> Result<u64, ClaimError> {
        let restored = sqlx::query(
            "INSERT INTO promotion_claims (code, customer_id, order_id, claimed_at) \
             SELECT DISTINCT ON (code, customer_id) code, customer_id, aggregate_id, recorded_at \
             FROM (SELECT e.payload -> 'OrderPlaced' ->> 'promotion_code' AS code, \
                          e.payload -> 'OrderPlaced' ->> 'customer_id' AS customer_id, \
                          e.aggregate_id, e.recorded_at \
                   FROM events e \
                   WHERE e.aggregate_type = 'order' AND e.event_type = 'OrderPlaced') placed \
             WHERE code IS NOT NULL AND customer_id IS NOT NULL \
             ORDER BY code, customer_id, recorded_at \
             ON CONFLICT (code, customer_id) DO NOTHING",
        )
        .execute(pool)
        .await?;
        Ok(restored.rows_affected())
    }
}
