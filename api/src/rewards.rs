//! Rewards commands on a customer's ledger: donations and subscriptions for the customer,
//! adjustments by an administrator. (Earning, redeeming and restoring are done by the order flow.) Every write
//! carries an idempotency key: the same key again changes nothing.

use axum::extract::State;
use axum::http::HeaderMap;
use domain::rewards::{RewardsCommand, SubscriptionTier};
use domain::{CharityCode, RegionCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{Action, Owner, Principal};
use crate::error::{command_error, ApiError, Problem};
use crate::extract::{Body, PathParams};
use crate::idempotency::IdempotencyKey;
use crate::orders::context;
use crate::AppState;

/// A change to a customer's rewards ledger.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum RewardsAction {
    /// Give points to a named charity at the region's donation rate.
    Donate {
        #[schema(example = "food-bank-uk", max_length = 64)]
        charity: String,
        #[schema(minimum = 1, maximum = 1_000_000_000)]
        points: u64,
        /// The region whose donation rate and currency apply.
        #[schema(example = "uk")]
        region: String,
        #[schema(max_length = 128)]
        idempotency_key: String,
    },
    /// Start a subscription (the billing system calls this once paid): Plus earns 1.5x points,
    /// Premium 2x, both with free delivery; Standard 1.25x.
    StartSubscription {
        tier: TierDto,
        /// Paid until.
        until: chrono::DateTime<chrono::Utc>,
        #[schema(max_length = 128)]
        idempotency_key: String,
    },
    /// Extend a running subscription (also takes back a cancellation).
    RenewSubscription {
        until: chrono::DateTime<chrono::Utc>,
        #[schema(max_length = 128)]
        idempotency_key: String,
    },
    /// Stop renewing; benefits last until the paid period ends.
    CancelSubscription {
        #[schema(max_length = 128)]
        idempotency_key: String,
    },
    /// Expire what is left of every lot due by now (oldest first); run by the operator's
    /// scheduler per customer.
    ExpirePoints {
        #[schema(max_length = 128)]
        idempotency_key: String,
    },
    /// Record that a subscription's paid period ended without renewal (a no-op before then).
    LapseSubscription {
        #[schema(max_length = 128)]
        idempotency_key: String,
    },
    /// An administrator's correction: positive adds a lot, negative deducts.
    Adjust {
        points: i64,
        #[schema(max_length = 500)]
        reason: String,
        #[schema(max_length = 128)]
        idempotency_key: String,
    },
}

/// Subscription tiers.
/// snake_case like every value of the API; the PascalCase spellings of earlier versions are
/// still accepted.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TierDto {
    #[serde(alias = "Standard")]
    Standard,
    #[serde(alias = "Plus")]
    Plus,
    #[serde(alias = "Premium")]
    Premium,
}

impl TierDto {
    /// (tier, points multiplier in basis points, free delivery)
    const fn terms(&self) -> (SubscriptionTier, u32, bool) {
        match self {
            Self::Standard => (SubscriptionTier::Standard, 12_500, false),
            Self::Plus => (SubscriptionTier::Plus, 15_000, true),
            Self::Premium => (SubscriptionTier::Premium, 20_000, true),
        }
    }
}

/// What a rewards command did.
#[derive(Debug, Serialize, ToSchema)]
pub struct RewardsAccepted {
    pub customer_id: Uuid,
    /// Sequence of the ledger's last event.
    pub sequence: u64,
    /// Read-your-writes: pass `position.token` as `position` to a query.
    pub position: crate::positions::Position,
    /// Events appended; empty when the idempotency key was seen before.
    pub events: Vec<String>,
}

/// Change a customer's rewards ledger.
#[utoipa::path(
    post, path = "/customers/{customer_id}/rewards/actions", tag = "rewards",
    params(("customer_id" = Uuid, Path, description = "The customer")),
    request_body = RewardsAction,
    responses(
        (status = 200, description = "Recorded (or already recorded under this key)", body = RewardsAccepted),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not possible with the ledger's balance", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn act_on_rewards(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    key: Option<IdempotencyKey>,
    PathParams(raw_id): PathParams<String>,
    Body(action): Body<RewardsAction>,
) -> Result<axum::Json<RewardsAccepted>, ApiError> {
    let customer_id = Uuid::parse_str(&raw_id)
        .map_err(|_| ApiError::BadRequest(format!("`{raw_id}` is not a customer id (a UUID)")))?;
    let (command, action) = command_of(&state, action)?;
    principal.authorize(action, &Owner::customer(customer_id))?;
    let actor = principal.actor();
    let committed = state
        .rewards
        .execute(
            &customer_id.to_string(),
            command,
            &context(&headers, key, actor),
        )
        .await
        .map_err(command_error)?;
    Ok(axum::Json(RewardsAccepted {
        customer_id,
        sequence: committed.last_sequence,
        position: crate::positions::Position::new(
            "rewards",
            &committed.aggregate_id,
            committed.last_sequence,
        ),
        events: committed.event_types,
    }))
}

/// The ledger command an action asks for, and who may ask it (the customer, or operators).
fn command_of(
    state: &AppState,
    action: RewardsAction,
) -> Result<(RewardsCommand, Action), ApiError> {
    let invalid = |e: domain::ids::IdError| ApiError::Unprocessable(e.to_string());
    Ok(match action {
        RewardsAction::Donate {
            charity,
            points,
            region,
            idempotency_key,
        } => {
            let region = RegionCode::parse(region).map_err(invalid)?;
            let catalogue = state.catalogue.current();
            let settings = catalogue.regions.get(&region).ok_or_else(|| {
                ApiError::Unprocessable(format!("region `{region}` is not served"))
            })?;
            (
                RewardsCommand::DonatePoints {
                    charity: CharityCode::parse(charity).map_err(invalid)?,
                    points,
                    minor_per_100_points: settings.donation_minor_per_100_points,
                    currency: settings.currency,
                    idempotency_key,
                },
                Action::CustomerRewardsAction,
            )
        }
        RewardsAction::StartSubscription {
            tier,
            until,
            idempotency_key,
        } => {
            let (tier, multiplier_bp, free_delivery) = tier.terms();
            (
                RewardsCommand::StartSubscription {
                    tier,
                    multiplier_bp,
                    free_delivery,
                    until,
                    idempotency_key,
                },
                Action::OperatorRewardsAction,
            )
        }
        RewardsAction::RenewSubscription {
            until,
            idempotency_key,
        } => (
            RewardsCommand::RenewSubscription {
                until,
                idempotency_key,
            },
            Action::OperatorRewardsAction,
        ),
        RewardsAction::ExpirePoints { idempotency_key } => (
            RewardsCommand::ExpirePoints {
                as_of: chrono::Utc::now(),
                idempotency_key,
            },
            Action::OperatorRewardsAction,
        ),
        RewardsAction::LapseSubscription { idempotency_key } => (
            RewardsCommand::LapseSubscription { idempotency_key },
            Action::OperatorRewardsAction,
        ),
        RewardsAction::CancelSubscription { idempotency_key } => (
            RewardsCommand::CancelSubscription { idempotency_key },
            Action::CustomerRewardsAction,
        ),
        RewardsAction::Adjust {
            points,
            reason,
            idempotency_key,
        } => (
            RewardsCommand::AdjustPoints {
                points,
                reason,
                expires_in_days: 365,
                idempotency_key,
            },
            Action::OperatorRewardsAction,
        ),
    })
}

/// One lot of points: what it was credited with, what is left of it, and when that expires.
#[derive(Debug, Serialize, ToSchema)]
pub struct LotView {
    /// The lot's number in the ledger (1, 2, ...).
    pub lot: u32,
    /// Points the lot was credited with.
    pub points: u64,
    /// Points left in it (not spent, donated, expired or taken back).
    pub remaining: u64,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// Past its expiry: what remains is no longer spendable.
    pub expired: bool,
}

/// A running or past subscription.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    #[schema(example = "Plus")]
    pub tier: String,
    /// `Active`, `Cancelled` (runs until `until`) or `Lapsed`.
    #[schema(example = "Active")]
    pub status: String,
    pub until: chrono::DateTime<chrono::Utc>,
    /// Points multiplier in basis points (15000 = 1.5x).
    pub multiplier_bp: u32,
    pub free_delivery: bool,
}

/// A customer's points: the spendable balance and every lot with its expiry.
#[derive(Debug, Serialize, ToSchema)]
pub struct RewardsBalance {
    pub customer_id: Uuid,
    /// Points spendable now (unexpired lots' remaining points).
    pub balance: u64,
    /// Points earned on orders and not taken back by a refund (what tiers use).
    pub lifetime_earned: u64,
    /// Lots with points left, the soonest to expire first (they are spent first).
    pub lots: Vec<LotView>,
    pub subscription: Option<SubscriptionView>,
    /// Sequence of the ledger's last event: the balance as of that event.
    pub sequence: u64,
}

/// A customer's points balance and lots with their expiry dates, read from the ledger itself
/// (always current). A customer reads only their own.
#[utoipa::path(
    get, path = "/customers/{customer_id}/rewards", tag = "rewards",
    params(("customer_id" = Uuid, Path, description = "The customer")),
    responses(
        (status = 200, description = "Balance and lots (zero and none for a customer who never earned)", body = RewardsBalance),
        (status = 400, description = "Not a customer id", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Someone else's ledger", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn balance(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(raw_id): PathParams<String>,
) -> Result<axum::Json<RewardsBalance>, ApiError> {
    let customer_id = Uuid::parse_str(&raw_id)
        .map_err(|_| ApiError::BadRequest(format!("`{raw_id}` is not a customer id (a UUID)")))?;
    principal.authorize(Action::ViewRewards, &Owner::customer(customer_id))?;
    let id = customer_id.to_string();
    let sequence = state
        .rewards
        .current_sequence(&id)
        .await
        .map_err(ApiError::internal)?;
    let now = chrono::Utc::now();
    let mut view = state
        .rewards
        .state(&id, |ledger| {
            let mut lots: Vec<LotView> = ledger
                .lots
                .values()
                .filter(|l| l.remaining > 0)
                .map(|l| LotView {
                    lot: l.lot,
                    points: l.points,
                    remaining: l.remaining,
                    expires_at: l.expires_at,
                    expired: l.expires_at <= now,
                })
                .collect();
            lots.sort_by_key(|l| (l.expires_at, l.lot));
            RewardsBalance {
                customer_id,
                balance: ledger.available_at(now),
                lifetime_earned: ledger.lifetime_earned,
                lots,
                subscription: ledger.subscription.as_ref().map(|s| SubscriptionView {
                    tier: format!("{:?}", s.tier),
                    status: format!("{:?}", s.status),
                    until: s.until,
                    multiplier_bp: s.multiplier_bp,
                    free_delivery: s.free_delivery,
                }),
                sequence: 0,
            }
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    view.sequence = sequence;
    Ok(axum::Json(view))
}
