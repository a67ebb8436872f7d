//! The rewards side of an order: points redeemed given back, points earned, points reversed
//! for a refund.

use super::*;

impl OrderFlow {
    /// Gives back the points a cancelled or rejected order redeemed (once: the ledger refuses a
    /// second restore, and refuses when the redemption never happened).
    pub(super) async fn restore_points(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
    ) -> Result<(), ProjectionError> {
        let order_id = cause.aggregate_id.as_str();
        let facts = self.facts(tx, order_id).await?;
        if facts.points_redeemed == 0 {
            return Ok(());
        }
        let step = "restore-points";
        let command = RewardsCommand::RestoreRedemption {
            order_id: parse_order_id(order_id)?,
            idempotency_key: self.context(cause, step).command_id.to_string(),
        };
        let customer = facts.customer_id.to_string();
        self.step(tx, &self.rewards, cause, step, &customer, command, |e| {
            matches!(
                e,
                RewardsError::NoRedemptionForOrder(_) | RewardsError::RedemptionAlreadyRestored(_)
            )
        })
        .await?;
        Ok(())
    }

    pub(super) async fn earn_points(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
    ) -> Result<(), ProjectionError> {
        let order_id = cause.aggregate_id.as_str();
        let step = "earn-points";
        let facts = self.facts(tx, order_id).await?;
        let region = RegionCode::parse(facts.region.clone()).map_err(ProjectionError::event)?;
        let catalogue = self.catalogue.current();
        let Some(settings) = catalogue.regions.get(&region) else {
            let reason = format!("region `{region}` has no rewards rates in the catalogue");
            return self
                .stuck(tx, cause, step, None, "EarnPoints", reason)
                .await;
        };
        let currency = Currency::parse(&facts.currency).map_err(ProjectionError::event)?;
        let order_total =
            Money::new(facts.total_minor, currency).map_err(ProjectionError::event)?;
        let command = RewardsCommand::EarnPoints {
            order_id: parse_order_id(order_id)?,
            order_total,
            points_per_100_minor: settings.points_per_100_minor,
            expires_in_days: settings.points_expire_in_days,
            idempotency_key: self.context(cause, step).command_id.to_string(),
        };
        let customer = facts.customer_id.to_string();
        let earned = self
            .step(tx, &self.rewards, cause, step, &customer, command, |e| {
                matches!(e, RewardsError::AlreadyEarnedForOrder(_))
            })
            .await?;
        if earned == Outcome::Done && facts.refunded_minor > 0 {
            // A refund arrived before the points were earned: take its share back at once.
            let refunded =
                Money::new(facts.refunded_minor, currency).map_err(ProjectionError::event)?;
            self.reverse_points(
                tx,
                cause,
                "reverse-points-refunded-earlier",
                &facts,
                refunded,
            )
            .await?;
        }
        Ok(())
    }

    pub(super) async fn reverse_points(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
        step: &'static str,
        facts: &OrderFacts,
        refunded_total: Money,
    ) -> Result<(), ProjectionError> {
        let command = RewardsCommand::ReverseEarnedPoints {
            order_id: parse_order_id(&cause.aggregate_id)?,
            refunded_total,
            idempotency_key: self.context(cause, step).command_id.to_string(),
        };
        let customer = facts.customer_id.to_string();
        self.step(tx, &self.rewards, cause, step, &customer, command, |_| {
            false
        })
        .await?;
        Ok(())
    }
}
