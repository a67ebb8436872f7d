//! What runs on a timer beside the consumer: due accept-by deadlines and the operators'
//! stuck-flow requests.

use super::*;

impl OrderFlow {
    /// Fires the accept-by deadlines that are due: each expires its order (a no-op if the store
    /// accepted meanwhile). Deadlines live in PostgreSQL, so they fire after a restart too; rows
    /// are claimed with `SKIP LOCKED`, so several instances share the work.
    pub async fn fire_due_deadlines(&self, pool: &PgPool) -> Result<usize, sqlx::Error> {
        let mut tx = pool.begin().await?;
        let due: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT key, order_id, correlation_id FROM order_flow.deadlines \
             WHERE fired_at IS NULL AND due_at <= now() ORDER BY due_at LIMIT 100 \
             FOR UPDATE SKIP LOCKED",
        )
        .fetch_all(&mut *tx)
        .await?;
        for (key, order_id, correlation) in &due {
            let mut context = CommandContext::repeatable("system:deadlines", key);
            if !correlation.is_empty() {
                context = context.with_correlation(correlation);
            }
            let outcome = self
                .orders
                .execute(order_id, OrderCommand::ExpireAcceptance, &context)
                .await;
            match outcome {
                Ok(_) => {}
                Err(CommandError::Rejected(e)) => {
                    // Only an order that does not exist refuses an expiry.
                    tracing::warn!(error = %e, %order_id, "deadline of an unknown order dropped");
                }
                Err(e) => {
                    tracing::warn!(error = %e, %order_id, "deadline will be retried");
                    continue;
                }
            }
            sqlx::query("UPDATE order_flow.deadlines SET fired_at = now() WHERE key = $1")
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(due.len())
    }

    /// Carries out the operators' pending stuck-flow requests (see [`crate::stuck`]), one
    /// transaction each; returns how many were handled. A request that fails for a reason other
    /// than a refusal stays pending for the next round.
    pub async fn carry_out_requests(&self, pool: &PgPool) -> Result<usize, ProjectionError> {
        let mut handled = 0;
        loop {
            let mut tx = pool.begin().await?;
            let Some(claimed) = stuck::claim_request(&mut tx).await? else {
                return Ok(handled);
            };
            let cause: Cause = serde_json::from_value(claimed.cause.clone()).map_err(|e| {
                ProjectionError::event(format!("stuck flow {}: cause unreadable: {e}", claimed.id))
            })?;
            let who = claimed
                .requested_by
                .clone()
                .unwrap_or_else(|| "system:operator".to_owned());
            if claimed.status == "retry_requested" {
                self.react(&mut tx, &cause).await?;
                // Refused again, the record was re-opened (with the new reason) by the step.
                if stuck::status(&mut tx, claimed.id).await?.as_deref() == Some("retry_requested") {
                    let resolution = format!("retried by {who}: the step went through");
                    stuck::close(&mut tx, claimed.id, "retried", &resolution).await?;
                }
            } else {
                self.resolve(&mut tx, &claimed, &cause, &who).await?;
            }
            tx.commit().await?;
            handled += 1;
        }
    }

    /// Ends a stuck order as the system, for an operator: the flow's reaction to the
    /// cancellation compensates (payment voided, points given back, delivery cancelled).
    async fn resolve(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        claimed: &stuck::Claimed,
        cause: &Cause,
        who: &str,
    ) -> Result<(), ProjectionError> {
        let note = claimed.note.as_deref().unwrap_or("no reason given");
        let mut reason = format!("resolved by an operator ({who}): {note}");
        if reason.chars().count() > 500 {
            reason = reason.chars().take(500).collect();
        }
        let mut context =
            CommandContext::repeatable(who, &format!("stuck-flow/{}/resolve", claimed.id))
                .caused_by(cause.event_id);
        if !cause.correlation_id.is_empty() {
            context = context.with_correlation(&cause.correlation_id);
        }
        let command = OrderCommand::CancelOrder {
            by: CancelledBy::System,
            reason: reason.clone(),
        };
        match self
            .orders
            .execute(&claimed.order_id, command, &context)
            .await
        {
            Ok(_) => {
                let resolution = format!(
                    "order cancelled ({reason}); the flow voids the payment, gives back \
                     redeemed points and cancels a requested delivery"
                );
                stuck::resolve_order(tx, &claimed.order_id, &resolution).await?;
            }
            Err(CommandError::Rejected(e)) if order_in(&e, &["Cancelled", "Rejected"]) => {
                let resolution = format!("the order was already over: {e}");
                stuck::resolve_order(tx, &claimed.order_id, &resolution).await?;
            }
            Err(CommandError::Rejected(e)) => {
                let reason = format!("the resolution (cancel the order) was refused: {e}");
                stuck::reopen(tx, claimed.id, &reason).await?;
            }
            Err(e) => return Err(ProjectionError::event(format!("resolve: {e}"))),
        }
        Ok(())
    }

    /// Runs, every `every` until `shutdown`: due deadlines, operators' stuck-flow requests, and
    /// the `process_manager_stuck_flows_open` gauge.
    pub async fn run_deadlines_until_stopped(
        &self,
        pool: PgPool,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.fire_due_deadlines(&pool).await {
                Ok(0) => {}
                Ok(fired) => tracing::info!(fired, "deadlines fired"),
                Err(e) => tracing::warn!(error = %e, "deadline scheduler round failed"),
            }
            match self.carry_out_requests(&pool).await {
                Ok(0) => {}
                Ok(handled) => tracing::info!(handled, "stuck-flow requests carried out"),
                Err(e) => tracing::warn!(error = %e, "stuck-flow requests will be retried"),
            }
            match stuck::unresolved(&pool).await {
                #[allow(clippy::cast_precision_loss)]
                Ok(open) => metrics::gauge!("process_manager_stuck_flows_open").set(open as f64),
                Err(e) => tracing::warn!(error = %e, "cannot count stuck flows"),
            }
        }
    }
}

/// Drops an order's pending accept-by deadline (the store answered, or the order is over).
pub(super) async fn disarm(
    tx: &mut Transaction<'static, Postgres>,
    order_id: &str,
) -> Result<(), ProjectionError> {
    sqlx::query("DELETE FROM order_flow.deadlines WHERE order_id = $1 AND fired_at IS NULL")
        .bind(order_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
