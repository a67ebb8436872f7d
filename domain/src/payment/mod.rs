//! The Payment aggregate: one payment per order (the aggregate id is the order id), from
//! authorization to capture (with an invoice of a stable number), void, and full or partial
//! refunds, plus the payment provider's webhooks, deduplicated by the provider's event id.
//!
//! The aggregate records what the provider did; the adapters talk to the provider. Its lifecycle
//! only moves forward ([`PaymentStatus::rank`] never decreases), money never goes below zero, and
//! the total refunded never exceeds what was captured, which never exceeds what was authorized.
//!
//! Idempotency lives in the events, so it survives a reload: a refund id seen before and a
//! provider event id seen before are rebuilt by [`Payment::apply`] and change nothing again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::services::Clock;
use crate::{Currency, CustomerId, Money, MoneyError, OrderId};

mod lifecycle;
mod webhook;

/// Aggregate type name in the event store and on the topics. Never renamed.
pub const AGGREGATE_TYPE: &str = "payment";

/// The longest payment provider name (`stripe`, `adyen`).
pub const MAX_PROVIDER_LEN: usize = 64;
/// The longest provider reference, refund id or provider event id.
pub const MAX_REFERENCE_LEN: usize = 128;
/// The longest free-text reason or provider detail.
pub const MAX_REASON_LEN: usize = 500;

/// Namespace of the name-based (SHA-1, UUID v5) hash behind invoice numbers. Never changed:
/// changing it would change the number of every future invoice of an order.
const INVOICE_NAMESPACE: Uuid = Uuid::from_u128(0x5e0f_f5b7_f72d_45c5_b6ba_4359_d8a4_8cc5);

/// The invoice number of an order's payment captured at `captured_at`:
/// `INV-<yyyymmdd of the capture, UTC>-<16 upper-case hex digits of a hash of the order id>`,
/// the hash being the name-based UUID v5 (SHA-1) of the order id's bytes in a fixed namespace.
///
/// Deterministic (no counter, no randomness), so the number can be recomputed by anyone who knows
/// the order; it is carried in [`PaymentEvent::PaymentCaptured`] and never recomputed. 64 bits
/// of hash make a collision within one day vanishingly unlikely even at millions of orders a day.
pub fn invoice_number(order_id: OrderId, captured_at: DateTime<Utc>) -> String {
    let hash = Uuid::new_v5(&INVOICE_NAMESPACE, order_id.as_uuid().as_bytes());
    // Digits 12 and 16 of a UUID v5 carry its version and variant, not the hash: leave them out.
    let digits: String = hash
        .simple()
        .to_string()
        .char_indices()
        .filter(|(i, _)| *i != 12 && *i != 16)
        .map(|(_, c)| c.to_ascii_uppercase())
        .take(16)
        .collect();
    format!("INV-{}-{digits}", captured_at.format("%Y%m%d"))
}

/// Where a payment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum PaymentStatus {
    #[default]
    New,
    Authorized,
    Captured,
    PartiallyRefunded,
    Refunded,
    Voided,
    Failed,
}

impl PaymentStatus {
    /// Position in the lifecycle; the final states rank above every state they can leave from.
    pub const fn rank(self) -> u8 {
        match self {
            Self::New => 0,
            Self::Authorized => 1,
            Self::Captured => 2,
            Self::PartiallyRefunded => 3,
            Self::Refunded | Self::Voided | Self::Failed => 4,
        }
    }

    /// Whether nothing can happen to the payment any more.
    pub const fn is_final(self) -> bool {
        matches!(self, Self::Refunded | Self::Voided | Self::Failed)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::New => "New",
            Self::Authorized => "Authorized",
            Self::Captured => "Captured",
            Self::PartiallyRefunded => "PartiallyRefunded",
            Self::Refunded => "Refunded",
            Self::Voided => "Voided",
            Self::Failed => "Failed",
        }
    }
}

/// What a provider webhook reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WebhookKind {
    /// The authorization succeeded (we already know: authorization is synchronous).
    Authorized,
    /// The funds were captured (for example by the provider's automatic capture).
    Captured,
    /// The authorization failed after the fact (fraud check, reversal, failed capture).
    Failed,
    /// The authorization was cancelled or expired at the provider.
    Voided,
    /// Money went back to the customer (from our refund, or one made at the provider).
    Refunded,
    /// Any other notification (disputes, payouts): recorded for audit, changes nothing.
    Other,
}

/// What a new (never seen) webhook did to the payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WebhookOutcome {
    /// It moved the payment; the event it caused follows in the same commit.
    Applied,
    /// The payment already reflected it (our own command got there first).
    Confirmed,
    /// Its kind has no bearing on the payment's state.
    Ignored,
    /// It disagrees with the payment (say, a capture after a void): kept for reconciliation,
    /// the payment unchanged.
    Contradicted,
}

/// What a client (or the provider, through the webhook adapter) may ask of a payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PaymentCommand {
    /// The provider authorized `amount` for the order; the adapter made the call.
    AuthorizePayment {
        order_id: OrderId,
        customer_id: CustomerId,
        amount: Money,
        provider: String,
        provider_reference: String,
    },
    /// Takes the money: `None` takes the full authorized amount, `Some` a part of it (the rest
    /// of the authorization is released). At most once.
    CapturePayment { amount: Option<Money> },
    /// Cancels an authorization that will not be captured.
    VoidPayment { reason: String },
    /// Gives back part or all of what was captured. `refund_id` is the caller's idempotency key:
    /// the same id with the same amount again is a no-op.
    RefundPayment {
        amount: Money,
        reason: String,
        refund_id: String,
    },
    /// A webhook of the payment provider (its signature already verified by the adapter). A
    /// provider event id seen before changes nothing.
    RecordProviderWebhook {
        provider_event_id: String,
        kind: WebhookKind,
        /// The amount the webhook reports, if any (`None` means the whole amount).
        amount: Option<Money>,
        /// For `Refunded`: the refund it is about (our `refund_id` when we started it).
        refund_id: Option<String>,
        /// The provider's message, such as a failure reason.
        detail: Option<String>,
    },
}

/// What happened to a payment. Names are past tense and never renamed: they are the event types
/// in the store and the Avro record names on the topics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PaymentEvent {
    PaymentAuthorized {
        order_id: OrderId,
        customer_id: CustomerId,
        amount: Money,
        provider: String,
        provider_reference: String,
        authorized_at: DateTime<Utc>,
    },
    PaymentCaptured {
        amount: Money,
        invoice_number: String,
        captured_at: DateTime<Utc>,
    },
    PaymentVoided {
        reason: String,
        voided_at: DateTime<Utc>,
    },
    PaymentRefunded {
        refund_id: String,
        amount: Money,
        reason: String,
        total_refunded: Money,
        remaining: Money,
        refunded_at: DateTime<Utc>,
    },
    PaymentFailed {
        reason: String,
        failed_at: DateTime<Utc>,
    },
    ProviderWebhookRecorded {
        provider_event_id: String,
        kind: WebhookKind,
        amount: Option<Money>,
        refund_id: Option<String>,
        detail: Option<String>,
        outcome: WebhookOutcome,
        received_at: DateTime<Utc>,
    },
}

impl PaymentEvent {
    /// Every event type, for catalogues and tests. Never reorder or rename.
    pub const TYPES: [&'static str; 6] = [
        "PaymentAuthorized",
        "PaymentCaptured",
        "PaymentVoided",
        "PaymentRefunded",
        "PaymentFailed",
        "ProviderWebhookRecorded",
    ];

    /// The status a payment is in after this event, if the event moves it.
    pub const fn status_after(&self) -> Option<PaymentStatus> {
        Some(match self {
            Self::PaymentAuthorized { .. } => PaymentStatus::Authorized,
            Self::PaymentCaptured { .. } => PaymentStatus::Captured,
            Self::PaymentVoided { .. } => PaymentStatus::Voided,
            Self::PaymentRefunded { remaining, .. } if remaining.minor() == 0 => {
                PaymentStatus::Refunded
            }
            Self::PaymentRefunded { .. } => PaymentStatus::PartiallyRefunded,
            Self::PaymentFailed { .. } => PaymentStatus::Failed,
            Self::ProviderWebhookRecorded { .. } => return None,
        })
    }

    /// When it happened in the business's time.
    pub const fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            Self::PaymentAuthorized {
                authorized_at: t, ..
            }
            | Self::PaymentCaptured { captured_at: t, .. }
            | Self::PaymentVoided { voided_at: t, .. }
            | Self::PaymentRefunded { refunded_at: t, .. }
            | Self::PaymentFailed { failed_at: t, .. }
            | Self::ProviderWebhookRecorded { received_at: t, .. } => *t,
        }
    }
}

impl DomainEvent for PaymentEvent {
    fn event_type(&self) -> String {
        let name = match self {
            Self::PaymentAuthorized { .. } => "PaymentAuthorized",
            Self::PaymentCaptured { .. } => "PaymentCaptured",
            Self::PaymentVoided { .. } => "PaymentVoided",
            Self::PaymentRefunded { .. } => "PaymentRefunded",
            Self::PaymentFailed { .. } => "PaymentFailed",
            Self::ProviderWebhookRecorded { .. } => "ProviderWebhookRecorded",
        };
        name.to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// A rule a payment command broke. Each says what the client can do about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PaymentError {
    #[error("the order's payment is already authorized; an order has exactly one payment")]
    AlreadyAuthorized,
    #[error("no payment was authorized for this order; authorize it first")]
    NotFound,
    #[error("an amount must be more than zero minor units")]
    ZeroAmount,
    #[error("the payment is in {expected}; send the amount in {expected}, not {got}")]
    CurrencyMismatch { expected: Currency, got: Currency },
    #[error("cannot capture {requested}: only {authorized} was authorized; capture at most that")]
    CaptureExceedsAuthorized { requested: Money, authorized: Money },
    #[error(
        "cannot refund {requested}: only {refundable} of the captured amount is left to refund"
    )]
    RefundExceedsCaptured { requested: Money, refundable: Money },
    #[error("refund id `{refund_id}` was already used for a refund of {amount}; use a new refund id for a different refund")]
    RefundIdReused { refund_id: String, amount: Money },
    #[error("cannot {action} a payment that is {status}")]
    InvalidTransition {
        action: &'static str,
        status: &'static str,
    },
    #[error("{0} must not be empty")]
    Blank(&'static str),
    #[error("{field} is too long (at most {max} characters)")]
    TooLong { field: &'static str, max: usize },
    #[error("the amounts add up beyond what can be represented: {0}")]
    Money(#[from] MoneyError),
}

impl PaymentError {
    /// True when the command conflicts with the payment's current state (HTTP 409), false when
    /// the command itself is invalid (HTTP 422).
    pub const fn is_state_conflict(&self) -> bool {
        matches!(
            self,
            Self::AlreadyAuthorized
                | Self::InvalidTransition { .. }
                | Self::RefundExceedsCaptured { .. }
        )
    }
}

/// What the payment aggregate needs from outside.
#[derive(Clone)]
pub struct PaymentServices {
    pub clock: Arc<dyn Clock>,
}

impl PaymentServices {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self { clock }
    }
}

impl fmt::Debug for PaymentServices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PaymentServices").finish_non_exhaustive()
    }
}

/// The state a payment's events add up to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Payment {
    pub status: PaymentStatus,
    pub order_id: Option<OrderId>,
    pub customer_id: Option<CustomerId>,
    pub authorized: Option<Money>,
    pub captured: Option<Money>,
    pub total_refunded: Option<Money>,
    pub invoice_number: Option<String>,
    /// Every refund by its refund id, so that a repeated refund id is recognised.
    pub refunds: BTreeMap<String, Money>,
    /// Every provider event id recorded, so that a repeated webhook is recognised.
    pub provider_event_ids: BTreeSet<String>,
}

fn text(value: &str, field: &'static str, max: usize) -> Result<(), PaymentError> {
    if value.trim().is_empty() {
        return Err(PaymentError::Blank(field));
    }
    optional_text(value, field, max)
}

fn optional_text(value: &str, field: &'static str, max: usize) -> Result<(), PaymentError> {
    if value.chars().count() > max {
        return Err(PaymentError::TooLong { field, max });
    }
    Ok(())
}

impl Payment {
    fn require(&self, allowed: &[PaymentStatus], action: &'static str) -> Result<(), PaymentError> {
        if self.status == PaymentStatus::New {
            return Err(PaymentError::NotFound);
        }
        if allowed.contains(&self.status) {
            Ok(())
        } else {
            Err(PaymentError::InvalidTransition {
                action,
                status: self.status.as_str(),
            })
        }
    }

    /// The authorized amount; every payment past `New` has one.
    fn authorized_amount(&self) -> Result<Money, PaymentError> {
        self.authorized.ok_or(PaymentError::NotFound)
    }

    /// Checks an amount is positive and in the payment's currency.
    fn check_amount(&self, amount: Money) -> Result<(), PaymentError> {
        if amount.minor() == 0 {
            return Err(PaymentError::ZeroAmount);
        }
        let expected = self.authorized_amount()?.currency();
        if amount.currency() != expected {
            return Err(PaymentError::CurrencyMismatch {
                expected,
                got: amount.currency(),
            });
        }
        Ok(())
    }

    /// What is left to refund: captured minus refunded (zero before a capture).
    fn refundable(&self) -> Result<Money, PaymentError> {
        let authorized = self.authorized_amount()?;
        let captured = self
            .captured
            .unwrap_or_else(|| Money::zero(authorized.currency()));
        let refunded = self
            .total_refunded
            .unwrap_or_else(|| Money::zero(authorized.currency()));
        Ok(captured.saturating_sub(refunded)?)
    }

    fn captured_event(&self, amount: Money, now: DateTime<Utc>) -> PaymentEvent {
        PaymentEvent::PaymentCaptured {
            amount,
            invoice_number: invoice_number(self.order_id.unwrap_or_default(), now),
            captured_at: now,
        }
    }

    /// A refund of `amount` (already checked to be positive, in the right currency and within
    /// what is refundable).
    fn refunded_event(
        &self,
        refund_id: String,
        amount: Money,
        reason: String,
        now: DateTime<Utc>,
    ) -> Result<PaymentEvent, PaymentError> {
        let currency = self.authorized_amount()?.currency();
        let total_refunded = self
            .total_refunded
            .unwrap_or_else(|| Money::zero(currency))
            .checked_add(amount)?;
        let remaining = self.refundable()?.saturating_sub(amount)?;
        Ok(PaymentEvent::PaymentRefunded {
            refund_id,
            amount,
            reason,
            total_refunded,
            remaining,
            refunded_at: now,
        })
    }

    /// What a command records. Each command's rule is in the function named after it: the
    /// payment's own moves in [`lifecycle`], the provider's webhooks in [`webhook`].
    fn decide(
        &self,
        command: PaymentCommand,
        services: &PaymentServices,
    ) -> Result<Vec<PaymentEvent>, PaymentError> {
        use PaymentCommand as C;
        let now = services.clock.now();
        Ok(match command {
            C::AuthorizePayment {
                order_id,
                customer_id,
                amount,
                provider,
                provider_reference,
            } => vec![self.authorize_payment(
                now,
                order_id,
                customer_id,
                amount,
                provider,
                provider_reference,
            )?],
            C::CapturePayment { amount } => vec![self.capture_payment(now, amount)?],
            C::VoidPayment { reason } => vec![self.void_payment(now, reason)?],
            C::RefundPayment {
                amount,
                reason,
                refund_id,
            } => Vec::from_iter(self.refund_payment(now, amount, reason, refund_id)?),
            C::RecordProviderWebhook {
                provider_event_id,
                kind,
                amount,
                refund_id,
                detail,
            } => self.record_provider_webhook(
                now,
                provider_event_id,
                kind,
                amount,
                refund_id,
                detail,
            )?,
        })
    }
}

impl Aggregate for Payment {
    const TYPE: &'static str = AGGREGATE_TYPE;
    type Command = PaymentCommand;
    type Event = PaymentEvent;
    type Error = PaymentError;
    type Services = PaymentServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command, services)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        if let Some(status) = event.status_after() {
            self.status = status;
        }
        match event {
            PaymentEvent::PaymentAuthorized {
                order_id,
                customer_id,
                amount,
                ..
            } => {
                self.order_id = Some(order_id);
                self.customer_id = Some(customer_id);
                self.authorized = Some(amount);
            }
            PaymentEvent::PaymentCaptured {
                amount,
                invoice_number,
                ..
            } => {
                self.captured = Some(amount);
                self.invoice_number = Some(invoice_number);
            }
            PaymentEvent::PaymentRefunded {
                refund_id,
                amount,
                total_refunded,
                ..
            } => {
                self.refunds.insert(refund_id, amount);
                self.total_refunded = Some(total_refunded);
            }
            PaymentEvent::ProviderWebhookRecorded {
                provider_event_id, ..
            } => {
                self.provider_event_ids.insert(provider_event_id);
            }
            PaymentEvent::PaymentVoided { .. } | PaymentEvent::PaymentFailed { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests;
