//! The order's moves after placement: payment confirmed, accepted or rejected by the store,
//! prepared, handed to a courier, delivered, completed, cancelled, expired, rated. Each moves
//! only from the states it names ([`Order::require`]), so the lifecycle only moves forward.

use chrono::{DateTime, Duration, Utc};

use super::{CancelledBy, Order, OrderError, OrderEvent, OrderStatus as S};

/// The longest payment reference, in bytes.
const MAX_PAYMENT_REFERENCE_LEN: usize = 128;
/// The longest cancellation reason, in characters.
const MAX_CANCEL_REASON_CHARS: usize = 500;
/// The longest rating comment, in characters.
const MAX_COMMENT_CHARS: usize = 2000;

impl Order {
    /// Confirming the payment: only a placed order, with a reference of sensible length.
    pub(super) fn confirm_payment(
        &self,
        now: DateTime<Utc>,
        payment_reference: String,
    ) -> Result<OrderEvent, OrderError> {
        self.require(&[S::Placed], "confirm payment for")?;
        if payment_reference.len() > MAX_PAYMENT_REFERENCE_LEN {
            return Err(OrderError::TooLong {
                field: "payment_reference",
                max: MAX_PAYMENT_REFERENCE_LEN,
            });
        }
        Ok(OrderEvent::OrderConfirmed {
            payment_reference,
            confirmed_at: now,
        })
    }

    /// Accepting: only a confirmed order, with a preparation estimate of 1 to 240 minutes.
    pub(super) fn accept_order(
        &self,
        now: DateTime<Utc>,
        estimated_preparation_minutes: u32,
    ) -> Result<OrderEvent, OrderError> {
        self.require(&[S::Confirmed], "accept")?;
        if !(1..=240).contains(&estimated_preparation_minutes) {
            return Err(OrderError::InvalidPreparationTime);
        }
        Ok(OrderEvent::OrderAccepted {
            estimated_preparation_minutes,
            accepted_at: now,
        })
    }

    /// Rejecting: only before the store accepted.
    pub(super) fn reject_order(
        &self,
        now: DateTime<Utc>,
        reason: super::RejectionReason,
    ) -> Result<OrderEvent, OrderError> {
        self.require(&[S::Placed, S::Confirmed], "reject")?;
        Ok(OrderEvent::OrderRejected {
            reason,
            rejected_at: now,
        })
    }

    /// Starting preparation: only an accepted order.
    pub(super) fn start_preparation(&self, now: DateTime<Utc>) -> Result<OrderEvent, OrderError> {
        self.require(&[S::Accepted], "start preparing")?;
        Ok(OrderEvent::PreparationStarted { started_at: now })
    }

    /// Marking ready: only an order being prepared.
    pub(super) fn mark_ready(&self, now: DateTime<Utc>) -> Result<OrderEvent, OrderError> {
        self.require(&[S::Preparing], "mark ready")?;
        Ok(OrderEvent::OrderReady { ready_at: now })
    }

    /// Handing to a courier: only a ready order.
    pub(super) fn hand_to_courier(&self, now: DateTime<Utc>) -> Result<OrderEvent, OrderError> {
        self.require(&[S::Ready], "hand to a courier")?;
        Ok(OrderEvent::OrderOutForDelivery { departed_at: now })
    }

    /// Marking delivered: only an order out for delivery.
    pub(super) fn mark_delivered(&self, now: DateTime<Utc>) -> Result<OrderEvent, OrderError> {
        self.require(&[S::OutForDelivery], "mark delivered")?;
        Ok(OrderEvent::OrderDelivered { delivered_at: now })
    }

    /// Completing: only a delivered order.
    pub(super) fn complete_order(&self, now: DateTime<Utc>) -> Result<OrderEvent, OrderError> {
        self.require(&[S::Delivered], "complete")?;
        Ok(OrderEvent::OrderCompleted { completed_at: now })
    }

    /// Cancelling, with a reason of sensible length: the customer only before preparation
    /// starts, the store once it has the payment and before the courier leaves, the platform
    /// at any point before the order reaches the customer.
    pub(super) fn cancel_order(
        &self,
        now: DateTime<Utc>,
        by: CancelledBy,
        reason: String,
    ) -> Result<OrderEvent, OrderError> {
        if reason.chars().count() > MAX_CANCEL_REASON_CHARS {
            return Err(OrderError::TooLong {
                field: "reason",
                max: MAX_CANCEL_REASON_CHARS,
            });
        }
        let allowed: &[S] = match by {
            CancelledBy::Customer => &[S::Placed, S::Confirmed, S::Accepted],
            CancelledBy::Store => &[S::Confirmed, S::Accepted, S::Preparing, S::Ready],
            // The platform ends any order that has not reached the customer: a failed or
            // returned delivery, an operator resolving a stuck flow. Once delivered the money
            // is captured, and a refund is the way back.
            CancelledBy::System => &[
                S::Placed,
                S::Confirmed,
                S::Accepted,
                S::Preparing,
                S::Ready,
                S::OutForDelivery,
            ],
        };
        if by == CancelledBy::Customer
            && matches!(self.status, S::Preparing | S::Ready | S::OutForDelivery)
        {
            return Err(OrderError::TooLateToCancel(self.status.as_str()));
        }
        self.require(allowed, "cancel")?;
        Ok(OrderEvent::OrderCancelled {
            cancelled_by: by,
            reason,
            cancelled_at: now,
        })
    }

    /// The accept-by deadline: cancels an order the store has not accepted by then; one that
    /// fires early, late, or twice, after the store acted, records nothing.
    pub(super) fn expire_acceptance(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Option<OrderEvent>, OrderError> {
        let waiting = matches!(self.status, S::Placed | S::Confirmed);
        match self.accept_by {
            Some(deadline) if waiting && now >= deadline => Ok(Some(OrderEvent::OrderCancelled {
                cancelled_by: CancelledBy::System,
                reason: "not accepted by the store in time".to_owned(),
                cancelled_at: now,
            })),
            _ if self.status == S::New => Err(OrderError::NotFound),
            _ => Ok(None),
        }
    }

    /// Rating: once, 1 to 5 stars with a comment of sensible length, on a delivered order
    /// within the rating window after delivery.
    pub(super) fn rate_order(
        &self,
        now: DateTime<Utc>,
        stars: u8,
        comment: Option<String>,
    ) -> Result<OrderEvent, OrderError> {
        self.require(&[S::Delivered, S::Completed], "rate")?;
        if !(1..=5).contains(&stars) {
            return Err(OrderError::InvalidStars);
        }
        if comment
            .as_ref()
            .is_some_and(|c| c.chars().count() > MAX_COMMENT_CHARS)
        {
            return Err(OrderError::TooLong {
                field: "comment",
                max: MAX_COMMENT_CHARS,
            });
        }
        if self.rated {
            return Err(OrderError::AlreadyRated);
        }
        let window = Duration::days(i64::from(self.rating_window_days));
        if self.delivered_at.is_some_and(|d| now > d + window) {
            return Err(OrderError::RatingWindowClosed(self.rating_window_days));
        }
        Ok(OrderEvent::OrderRated {
            stars,
            comment,
            rated_at: now,
        })
    }
}
