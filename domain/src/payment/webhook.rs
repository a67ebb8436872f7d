//! The payment provider's webhooks: each is recorded once (by the provider's event id), with
//! what it did to the payment. A webhook that only repeats what the payment knows is
//! `Confirmed`; one that cannot be true of this payment is `Contradicted` and recorded without
//! touching the payment, except a refund before the capture is known, which is refused so that
//! the provider retries it after the capture arrives.

use chrono::{DateTime, Utc};

use super::{
    optional_text, text, Payment, PaymentError, PaymentEvent, PaymentStatus as S, WebhookKind,
    WebhookOutcome, WebhookOutcome as O, MAX_REASON_LEN, MAX_REFERENCE_LEN,
};
use crate::Money;

/// What a webhook did, and the event it caused, if any.
type Effect = Result<(WebhookOutcome, Option<PaymentEvent>), PaymentError>;

impl Payment {
    /// Recording a webhook: valid ids and detail, on a payment we know (the provider retries
    /// until our authorization has landed), once per provider event id, with an amount in the
    /// payment's currency. The record comes first, then the event it caused, in one commit.
    pub(super) fn record_provider_webhook(
        &self,
        now: DateTime<Utc>,
        provider_event_id: String,
        kind: WebhookKind,
        amount: Option<Money>,
        refund_id: Option<String>,
        detail: Option<String>,
    ) -> Result<Vec<PaymentEvent>, PaymentError> {
        text(&provider_event_id, "provider_event_id", MAX_REFERENCE_LEN)?;
        if let Some(refund_id) = &refund_id {
            text(refund_id, "refund_id", MAX_REFERENCE_LEN)?;
        }
        if let Some(detail) = &detail {
            optional_text(detail, "detail", MAX_REASON_LEN)?;
        }
        if self.status == S::New {
            // The provider retries; by then our authorization will have landed.
            return Err(PaymentError::NotFound);
        }
        if self.provider_event_ids.contains(&provider_event_id) {
            return Ok(vec![]);
        }
        if let Some(amount) = amount {
            self.check_amount(amount)?;
        }
        let (outcome, effect) = self.webhook_effect(
            kind,
            amount,
            refund_id.as_deref(),
            &provider_event_id,
            detail.as_deref(),
            now,
        )?;
        let recorded = PaymentEvent::ProviderWebhookRecorded {
            provider_event_id,
            kind,
            amount,
            refund_id,
            detail,
            outcome,
            received_at: now,
        };
        Ok(std::iter::once(recorded).chain(effect).collect())
    }

    /// What a webhook never seen before does, by its kind.
    fn webhook_effect(
        &self,
        kind: WebhookKind,
        amount: Option<Money>,
        refund_id: Option<&str>,
        provider_event_id: &str,
        detail: Option<&str>,
        now: DateTime<Utc>,
    ) -> Effect {
        match kind {
            // Every payment past `New` was authorized.
            WebhookKind::Authorized => Ok((O::Confirmed, None)),
            WebhookKind::Other => Ok((O::Ignored, None)),
            WebhookKind::Captured => self.webhook_captured(amount, now),
            WebhookKind::Failed => Ok(self.webhook_failed(detail, now)),
            WebhookKind::Voided => Ok(self.webhook_voided(detail, now)),
            WebhookKind::Refunded => {
                // A refund made at the provider without our refund id is known by the event id.
                let refund_id = refund_id.unwrap_or(provider_event_id);
                self.webhook_refunded(amount, refund_id, detail, now)
            }
        }
    }

    /// A capture: applied to an authorized payment (the whole amount, or a part not above the
    /// authorized one); confirmed once captured, unless it names another amount.
    fn webhook_captured(&self, amount: Option<Money>, now: DateTime<Utc>) -> Effect {
        let captured_or_later = matches!(
            self.status,
            S::Captured | S::PartiallyRefunded | S::Refunded
        );
        Ok(match self.status {
            S::Authorized => {
                let authorized = self.authorized_amount()?;
                let amount = amount.unwrap_or(authorized);
                if amount.minor() > authorized.minor() {
                    (O::Contradicted, None)
                } else {
                    (O::Applied, Some(self.captured_event(amount, now)))
                }
            }
            _ if captured_or_later => {
                if amount.is_some_and(|a| Some(a) != self.captured) {
                    (O::Contradicted, None)
                } else {
                    (O::Confirmed, None)
                }
            }
            _ => (O::Contradicted, None),
        })
    }

    /// A failure: fails an authorized payment; confirmed once failed or voided.
    fn webhook_failed(
        &self,
        detail: Option<&str>,
        now: DateTime<Utc>,
    ) -> (WebhookOutcome, Option<PaymentEvent>) {
        match self.status {
            S::Authorized => (
                O::Applied,
                Some(PaymentEvent::PaymentFailed {
                    reason: detail
                        .unwrap_or("the payment provider reported the payment failed")
                        .to_owned(),
                    failed_at: now,
                }),
            ),
            S::Failed | S::Voided => (O::Confirmed, None),
            _ => (O::Contradicted, None),
        }
    }

    /// A void: voids an authorized payment; confirmed once voided or failed.
    fn webhook_voided(
        &self,
        detail: Option<&str>,
        now: DateTime<Utc>,
    ) -> (WebhookOutcome, Option<PaymentEvent>) {
        match self.status {
            S::Authorized => (
                O::Applied,
                Some(PaymentEvent::PaymentVoided {
                    reason: detail
                        .unwrap_or("the payment provider voided the authorization")
                        .to_owned(),
                    voided_at: now,
                }),
            ),
            S::Voided | S::Failed => (O::Confirmed, None),
            _ => (O::Contradicted, None),
        }
    }

    /// A refund: confirmed when its refund id is known; refused before the capture (the
    /// provider retries); applied to a captured payment when within what is refundable (the
    /// whole rest without an amount); "everything was refunded" is old news once fully refunded.
    fn webhook_refunded(
        &self,
        amount: Option<Money>,
        refund_id: &str,
        detail: Option<&str>,
        now: DateTime<Utc>,
    ) -> Effect {
        if self.refunds.contains_key(refund_id) {
            return Ok((O::Confirmed, None));
        }
        Ok(match self.status {
            S::Authorized => {
                return Err(PaymentError::InvalidTransition {
                    action: "refund",
                    status: self.status.as_str(),
                })
            }
            S::Captured | S::PartiallyRefunded => {
                let refundable = self.refundable()?;
                let amount = amount.unwrap_or(refundable);
                if amount.minor() > refundable.minor() {
                    (O::Contradicted, None)
                } else {
                    let reason = detail
                        .unwrap_or("refunded at the payment provider")
                        .to_owned();
                    let event = self.refunded_event(refund_id.to_owned(), amount, reason, now)?;
                    (O::Applied, Some(event))
                }
            }
            // Fully refunded: "everything was refunded" is old news, a new amount is not.
            S::Refunded if amount.is_none() => (O::Confirmed, None),
            _ => (O::Contradicted, None),
        })
    }
}
