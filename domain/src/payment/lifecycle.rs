//! The payment's own commands: authorize, capture, void and refund. The lifecycle only moves
//! forward ([`Payment::require`]), and the money checks keep every amount positive, in the
//! payment's currency, and within what the previous step allowed.

use chrono::{DateTime, Utc};

use super::{
    optional_text, text, Payment, PaymentError, PaymentEvent, PaymentStatus as S, MAX_PROVIDER_LEN,
    MAX_REASON_LEN, MAX_REFERENCE_LEN,
};
use crate::{CustomerId, Money, OrderId};

impl Payment {
    /// Authorizing: once per order, a non-zero amount, and the provider's name and reference.
    pub(super) fn authorize_payment(
        &self,
        now: DateTime<Utc>,
        order_id: OrderId,
        customer_id: CustomerId,
        amount: Money,
        provider: String,
        provider_reference: String,
    ) -> Result<PaymentEvent, PaymentError> {
        if self.status != S::New {
            return Err(PaymentError::AlreadyAuthorized);
        }
        if amount.minor() == 0 {
            return Err(PaymentError::ZeroAmount);
        }
        text(&provider, "provider", MAX_PROVIDER_LEN)?;
        text(&provider_reference, "provider_reference", MAX_REFERENCE_LEN)?;
        Ok(PaymentEvent::PaymentAuthorized {
            order_id,
            customer_id,
            amount,
            provider,
            provider_reference,
            authorized_at: now,
        })
    }

    /// Capturing: only an authorized payment, once; the whole authorized amount, or a part of
    /// it in its currency, never more.
    pub(super) fn capture_payment(
        &self,
        now: DateTime<Utc>,
        amount: Option<Money>,
    ) -> Result<PaymentEvent, PaymentError> {
        self.require(&[S::Authorized], "capture")?;
        let authorized = self.authorized_amount()?;
        let amount = match amount {
            Some(amount) => {
                self.check_amount(amount)?;
                if amount.minor() > authorized.minor() {
                    return Err(PaymentError::CaptureExceedsAuthorized {
                        requested: amount,
                        authorized,
                    });
                }
                amount
            }
            None => authorized,
        };
        Ok(self.captured_event(amount, now))
    }

    /// Voiding: only an authorized payment (not yet captured), with a reason of sensible length.
    pub(super) fn void_payment(
        &self,
        now: DateTime<Utc>,
        reason: String,
    ) -> Result<PaymentEvent, PaymentError> {
        optional_text(&reason, "reason", MAX_REASON_LEN)?;
        self.require(&[S::Authorized], "void")?;
        Ok(PaymentEvent::PaymentVoided {
            reason,
            voided_at: now,
        })
    }

    /// Refunding: a captured payment, a positive amount in its currency, never more than is
    /// left to refund. The same refund id with the same amount again records nothing, even
    /// after a full refund; with another amount it is refused.
    pub(super) fn refund_payment(
        &self,
        now: DateTime<Utc>,
        amount: Money,
        reason: String,
        refund_id: String,
    ) -> Result<Option<PaymentEvent>, PaymentError> {
        text(&refund_id, "refund_id", MAX_REFERENCE_LEN)?;
        optional_text(&reason, "reason", MAX_REASON_LEN)?;
        if amount.minor() == 0 {
            return Err(PaymentError::ZeroAmount);
        }
        if self.status == S::New {
            return Err(PaymentError::NotFound);
        }
        // A retried refund is answered before the state is looked at: after a full refund the
        // retry of that very refund still succeeds, doing nothing.
        match self.refunds.get(&refund_id) {
            Some(done) if *done == amount => return Ok(None),
            Some(done) => {
                return Err(PaymentError::RefundIdReused {
                    refund_id,
                    amount: *done,
                })
            }
            None => {}
        }
        self.check_amount(amount)?;
        self.require(&[S::Captured, S::PartiallyRefunded], "refund")?;
        let refundable = self.refundable()?;
        if amount.minor() > refundable.minor() {
            return Err(PaymentError::RefundExceedsCaptured {
                requested: amount,
                refundable,
            });
        }
        self.refunded_event(refund_id, amount, reason, now)
            .map(Some)
    }
}
