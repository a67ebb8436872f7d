//! # Who may do what
//!
//! **Authentication.** Every request but health, metrics, the OpenAPI document and the payment
//! provider's webhooks (signed instead, see [`crate::payments`]) carries
//! `Authorization: Bearer <JWT>`. The token is verified with the one configured algorithm
//! (HS256 with a shared secret for development; RS256 or ES256 with a PEM public key in
//! production), its `exp` (and `nbf`, when present) with a configured clock skew, its issuer and
//! audience. A token naming any other algorithm, `alg: none` included, is refused: the
//! algorithm is never taken from the token. Claims: `sub` (the caller's id: the customer's, the
//! store's, the courier's, or a staff member's), `role`, `exp`, `iat`, `iss`, `aud`.
//!
//! **Authorization.** One policy table, [`access`]: for each [`Action`] and [`Role`], denied,
//! allowed on the caller's own resources, or allowed on any. "Own" means the resource belongs to
//! the caller in the caller's role ([`Owner`]): a customer's orders, rewards, notifications and ad
//! profile; a store's orders; the deliveries (and so the orders) assigned to a courier. An
//! auditor reads everything and writes nothing; an analyst reads read models, not personal
//! feeds. Handlers name the action and the owner; nothing else decides.
//!
//! Refusals: 401 (`WWW-Authenticate: Bearer`) when the token is missing, malformed, expired,
//! wrongly signed or of another algorithm; 403 when the role may not take the action, or not on
//! this resource.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiError;
use crate::routes::{Gate, Policy};
use crate::AppState;

mod ownership;

pub use ownership::*;

mod tokens;

pub use tokens::*;

/// The roles a token can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Customer,
    Store,
    Courier,
    Admin,
    Analyst,
    Auditor,
}

impl Role {
    pub const ALL: [Self; 6] = [
        Self::Customer,
        Self::Store,
        Self::Courier,
        Self::Admin,
        Self::Analyst,
        Self::Auditor,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Store => "store",
            Self::Courier => "courier",
            Self::Admin => "admin",
            Self::Analyst => "analyst",
            Self::Auditor => "auditor",
        }
    }

    const fn column(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown role `{s}`: one of customer, store, courier, admin, analyst, auditor"
                )
            })
    }
}

/// The authenticated caller (a request extension set by [`authenticate`]; extracting it from a
/// request without a valid token is a 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub role: Role,
    pub subject: Uuid,
}

impl Principal {
    /// How the caller is recorded in event metadata (`actor`): `<role>:<id>`.
    pub fn actor(&self) -> String {
        format!("{}:{}", self.role, self.subject)
    }

    /// Allowed to take `action` on a resource belonging to `owner`, or a 403 saying why not.
    pub fn authorize(&self, action: Action, owner: &Owner) -> Result<(), ApiError> {
        match access(action, self.role) {
            Access::Any => Ok(()),
            Access::Own if owner.belongs_to(self) => Ok(()),
            Access::Own => Err(ApiError::Forbidden(format!(
                "a {} may {} only on their own resources; this one belongs to someone else",
                self.role,
                action.describe()
            ))),
            Access::Deny => Err(ApiError::Forbidden(format!(
                "the {} role may not {}",
                self.role,
                action.describe()
            ))),
        }
    }

    /// Allowed to take `action` on something that belongs to nobody in particular (lists,
    /// read models, the catalogue): only `Any` grants it.
    pub fn authorize_any(&self, action: Action) -> Result<(), ApiError> {
        self.authorize(action, &Owner::default())
    }

    /// For lists: `None` when the role sees everyone's, the caller as owner when it sees only
    /// its own (the list is then filtered to them), a 403 when it sees none.
    pub fn own_scope(&self, action: Action) -> Result<Option<Owner>, ApiError> {
        match access(action, self.role) {
            Access::Any => Ok(None),
            Access::Own => Ok(Some(Owner::of(self))),
            Access::Deny => self.authorize_any(action).map(|()| None),
        }
    }

    /// Whether the role may take `action` on any resource (not just its own).
    pub fn sees_all(&self, action: Action) -> bool {
        access(action, self.role) == Access::Any
    }
}

/// The caller if a valid token came (for endpoints open to anyone that show more to some).
impl<S: Send + Sync> axum::extract::OptionalFromRequestParts<S> for Principal {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Self>().copied())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<Self>().copied().ok_or_else(|| {
            ApiError::Unauthorized(
                "this endpoint needs `Authorization: Bearer <token>` with a valid token".to_owned(),
            )
        })
    }
}

/// Whom a resource belongs to, per role that can own it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Owner {
    pub customer: Option<Uuid>,
    pub store: Option<Uuid>,
    pub courier: Option<Uuid>,
}

impl Owner {
    pub fn customer(id: Uuid) -> Self {
        Self {
            customer: Some(id),
            ..Self::default()
        }
    }

    /// What the caller owns in their role.
    pub fn of(principal: &Principal) -> Self {
        let me = Some(principal.subject);
        match principal.role {
            Role::Customer => Self::customer(principal.subject),
            Role::Store => Self {
                store: me,
                ..Self::default()
            },
            Role::Courier => Self {
                courier: me,
                ..Self::default()
            },
            Role::Admin | Role::Analyst | Role::Auditor => Self::default(),
        }
    }

    fn belongs_to(&self, principal: &Principal) -> bool {
        let owner = match principal.role {
            Role::Customer => self.customer,
            Role::Store => self.store,
            Role::Courier => self.courier,
            Role::Admin | Role::Analyst | Role::Auditor => None,
        };
        owner == Some(principal.subject)
    }
}

/// What a role may do with an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Deny,
    /// Only on resources that belong to the caller ([`Owner`]).
    Own,
    Any,
}

/// Everything the API lets a caller do, as the policy names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    PlaceOrder,
    /// Modify before acceptance, cancel as the customer, rate.
    CustomerOrderStep,
    /// Accept, reject, start preparation, mark ready, cancel as the store.
    StoreOrderStep,
    /// Take the food, hand it over.
    CourierOrderStep,
    /// Payment confirmation, completion, cancellation by the system: the platform's own steps.
    SystemOrderStep,
    ViewOrder,
    ListOrders,
    /// Locations, arrival, pickup, hand-over, failure, return.
    CourierDeliveryStep,
    /// Courier assignment and delivery cancellation.
    DispatchDeliveryStep,
    RateCourier,
    /// Donations and cancelling one's subscription.
    CustomerRewardsAction,
    /// Subscriptions started or renewed by billing, expiry, lapses, adjustments.
    OperatorRewardsAction,
    RecordAdExposure,
    /// A customer's ad profile and the promotion targeting picks for them.
    ViewAdProfile,
    ViewNotifications,
    ViewAnalytics,
    ViewRatings,
    ViewCatalogue,
    ManageCatalogue,
    ViewOperations,
    RedriveDeadLetters,
    ReadAudit,
    EraseCustomer,
    /// A customer's points balance and lots.
    ViewRewards,
    /// The order-flow steps that could not proceed.
    ViewStuckFlows,
    /// Retry a stuck flow, or resolve it by cancelling the order with compensation.
    ManageStuckFlows,
}

impl Action {
    pub const ALL: [Self; 26] = [
        Self::PlaceOrder,
        Self::CustomerOrderStep,
        Self::StoreOrderStep,
        Self::CourierOrderStep,
        Self::SystemOrderStep,
        Self::ViewOrder,
        Self::ListOrders,
        Self::CourierDeliveryStep,
        Self::DispatchDeliveryStep,
        Self::RateCourier,
        Self::CustomerRewardsAction,
        Self::OperatorRewardsAction,
        Self::RecordAdExposure,
        Self::ViewAdProfile,
        Self::ViewNotifications,
        Self::ViewAnalytics,
        Self::ViewRatings,
        Self::ViewCatalogue,
        Self::ManageCatalogue,
        Self::ViewOperations,
        Self::RedriveDeadLetters,
        Self::ReadAudit,
        Self::EraseCustomer,
        Self::ViewRewards,
        Self::ViewStuckFlows,
        Self::ManageStuckFlows,
    ];

    /// Whether the action changes anything.
    pub const fn writes(self) -> bool {
        !matches!(
            self,
            Self::ViewOrder
                | Self::ListOrders
                | Self::ViewAdProfile
                | Self::ViewNotifications
                | Self::ViewAnalytics
                | Self::ViewRatings
                | Self::ViewCatalogue
                | Self::ViewOperations
                | Self::ReadAudit
                | Self::ViewRewards
                | Self::ViewStuckFlows
        )
    }

    const fn describe(self) -> &'static str {
        match self {
            Self::PlaceOrder => "place orders",
            Self::CustomerOrderStep => "take the customer's steps on an order",
            Self::StoreOrderStep => "take the store's steps on an order",
            Self::CourierOrderStep => "take the courier's steps on an order",
            Self::SystemOrderStep => "take the platform's own steps on an order",
            Self::ViewOrder => "view an order",
            Self::ListOrders => "list orders",
            Self::CourierDeliveryStep => "take the courier's steps on a delivery",
            Self::DispatchDeliveryStep => "assign or cancel deliveries",
            Self::RateCourier => "rate a courier",
            Self::CustomerRewardsAction => "donate points or cancel a subscription",
            Self::OperatorRewardsAction => "adjust or expire points or manage subscriptions",
            Self::RecordAdExposure => "record ad exposures",
            Self::ViewAdProfile => "view a customer's ad profile or promotion",
            Self::ViewNotifications => "view a customer's notifications",
            Self::ViewAnalytics => "view analytics or experiment results",
            Self::ViewRatings => "view ratings",
            Self::ViewCatalogue => "view the catalogue",
            Self::ManageCatalogue => "change the catalogue",
            Self::ViewOperations => "view read-model operations",
            Self::RedriveDeadLetters => "re-drive dead letters",
            Self::ReadAudit => "read the audit history",
            Self::EraseCustomer => "erase a customer's personal data",
            Self::ViewRewards => "view a customer's points",
            Self::ViewStuckFlows => "view stuck order flows",
            Self::ManageStuckFlows => "retry or resolve stuck order flows",
        }
    }
}

/// The policy: one row per action, one column per role.
#[rustfmt::skip]
pub const fn access(action: Action, role: Role) -> Access {
    use Access::{Any as A, Deny as D, Own as O};
    let row: [Access; 6] = match action {
        //                            customer store courier admin analyst auditor
        Action::PlaceOrder =>            [O,      D,    D,      A,    D,      D],
        Action::CustomerOrderStep =>     [O,      D,    D,      A,    D,      D],
        Action::StoreOrderStep =>        [D,      O,    D,      A,    D,      D],
        Action::CourierOrderStep =>      [D,      D,    O,      A,    D,      D],
        Action::SystemOrderStep =>       [D,      D,    D,      A,    D,      D],
        Action::ViewOrder =>             [O,      O,    O,      A,    A,      A],
        Action::ListOrders =>            [O,      O,    D,      A,    A,      A],
        Action::CourierDeliveryStep =>   [D,      D,    O,      A,    D,      D],
        Action::DispatchDeliveryStep =>  [D,      D,    D,      A,    D,      D],
        Action::RateCourier =>           [O,      D,    D,      A,    D,      D],
        Action::CustomerRewardsAction => [O,      D,    D,      A,    D,      D],
        Action::OperatorRewardsAction => [D,      D,    D,      A,    D,      D],
        Action::RecordAdExposure =>      [O,      D,    D,      A,    D,      D],
        Action::ViewAdProfile =>         [O,      D,    D,      A,    A,      A],
        Action::ViewNotifications =>     [O,      D,    D,      A,    D,      A],
        Action::ViewAnalytics =>         [D,      D,    D,      A,    A,      A],
        Action::ViewRatings =>           [A,      A,    A,      A,    A,      A],
        Action::ViewCatalogue =>         [A,      A,    A,      A,    A,      A],
        Action::ManageCatalogue =>       [D,      D,    D,      A,    D,      D],
        Action::ViewOperations =>        [D,      D,    D,      A,    A,      A],
        Action::RedriveDeadLetters =>    [D,      D,    D,      A,    D,      D],
        Action::ReadAudit =>             [D,      D,    D,      A,    D,      A],
        Action::EraseCustomer =>         [D,      D,    D,      A,    D,      D],
        Action::ViewRewards =>           [O,      D,    D,      A,    D,      A],
        Action::ViewStuckFlows =>        [D,      D,    D,      A,    D,      D],
        Action::ManageStuckFlows =>      [D,      D,    D,      A,    D,      D],
    };
    row[role.column()]
}

/// The gate in front of every route (inside [`authenticate`]): a route that is not public needs
/// a token (401) and a role the policy gives at least one of its actions (403), before any
/// parameter or body is read. Ownership of the resource is the handler's check. The gates are
/// those the route table ([`crate::routes`]) declares with each route.
pub async fn gate(State(policy): State<Arc<Policy>>, request: Request, next: Next) -> Response {
    // No matched route: the fallback answers 404.
    let Some(route) = request.extensions().get::<MatchedPath>().cloned() else {
        return next.run(request).await;
    };
    // HEAD is GET without the body (the router answers it with the GET handler).
    let method = if request.method() == Method::HEAD {
        Method::GET
    } else {
        request.method().clone()
    };
    let allowed = policy.methods(route.as_str());
    let Some(gate) = policy.gate(&method, route.as_str()) else {
        let allow = allowed
            .iter()
            .flat_map(|m| {
                if *m == Method::GET {
                    vec!["GET", "HEAD"]
                } else {
                    vec![m.as_str()]
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        return ApiError::MethodNotAllowed {
            detail: format!(
                "{} {} is not an operation of this API; {} takes {allow}",
                request.method(),
                route.as_str(),
                route.as_str()
            ),
            allow,
        }
        .into_response();
    };
    let actions = match gate {
        Gate::Public => return next.run(request).await,
        Gate::Needs(actions) => actions,
    };
    let Some(principal) = request.extensions().get::<Principal>().copied() else {
        return ApiError::Unauthorized(
            "this endpoint needs `Authorization: Bearer <token>` with a valid token".to_owned(),
        )
        .into_response();
    };
    if actions
        .iter()
        .any(|action| access(*action, principal.role) != Access::Deny)
    {
        return next.run(request).await;
    }
    ApiError::Forbidden(format!(
        "the {} role may not {}",
        principal.role,
        actions[0].describe()
    ))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs_config() -> AuthConfig {
        AuthConfig {
            auth_jwt_secret: Some(Secret::new("a-development-secret-of-32-bytes!")),
            ..AuthConfig::default()
        }
    }

    #[test]
    fn every_documented_operation_is_public_or_has_a_policy_an_admin_passes() {
        use utoipa::OpenApi;
        let doc = crate::ApiDoc::openapi();
        let (_, policy) = crate::routes().into_parts();
        let mut checked = 0;
        for (path, item) in &doc.paths.paths {
            for (method, operation) in [
                (Method::GET, &item.get),
                (Method::POST, &item.post),
                (Method::PUT, &item.put),
                (Method::PATCH, &item.patch),
                (Method::DELETE, &item.delete),
            ] {
                if operation.is_none() {
                    continue;
                }
                let actions = match policy.gate(&method, path) {
                    Some(Gate::Public) => continue,
                    Some(Gate::Needs(actions)) => actions,
                    None => panic!("{method} {path} is documented but not routed"),
                };
                assert!(
                    actions
                        .iter()
                        .any(|a| access(*a, Role::Admin) == Access::Any),
                    "{method} {path}"
                );
                checked += 1;
            }
        }
        assert!(checked > 30, "{checked}");
        // And every routed operation is documented.
        for (method, route, _) in policy.operations() {
            let documented = doc.paths.paths.get(route).is_some_and(|item| match method {
                Method::GET => item.get.is_some(),
                Method::POST => item.post.is_some(),
                Method::PUT => item.put.is_some(),
                _ => false,
            });
            assert!(documented, "{method} {route} is routed but not documented");
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let config = crate::ApiConfig {
            payments_webhook_secret: Some(Secret::new("the-webhook-secret-value")),
            auth: hs_config(),
            ..crate::ApiConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("the-webhook-secret-value"), "{shown}");
        assert!(!shown.contains("a-development-secret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn an_auditor_writes_nothing_and_an_admin_does_everything() {
        for action in Action::ALL {
            assert_eq!(access(action, Role::Admin), Access::Any, "{action:?}");
            if action.writes() {
                assert_eq!(access(action, Role::Auditor), Access::Deny, "{action:?}");
                assert_eq!(access(action, Role::Analyst), Access::Deny, "{action:?}");
            }
        }
    }

    #[test]
    fn own_access_needs_the_owner_of_the_callers_role() {
        let me = Uuid::new_v4();
        let customer = Principal {
            role: Role::Customer,
            subject: me,
        };
        assert!(customer
            .authorize(Action::ViewOrder, &Owner::customer(me))
            .is_ok());
        let theirs = Owner::customer(Uuid::new_v4());
        assert!(matches!(
            customer.authorize(Action::ViewOrder, &theirs),
            Err(ApiError::Forbidden(_))
        ));
        // A store whose id happens to equal the customer's id owns nothing of the customer's.
        let store = Principal {
            role: Role::Store,
            subject: me,
        };
        assert!(store
            .authorize(Action::ViewOrder, &Owner::customer(me))
            .is_err());
    }

    #[test]
    fn a_minted_token_verifies_and_proves_its_role_and_subject() {
        let config = hs_config();
        let subject = Uuid::new_v4();
        let token =
            mint_hs256(&config, &Claims::new(&config, Role::Store, subject, 60)).expect("minted");
        let principal = Authenticator::from_config(&config)
            .expect("config")
            .verify(&token)
            .expect("valid");
        assert_eq!(
            principal,
            Principal {
                role: Role::Store,
                subject
            }
        );
    }

    #[test]
    fn expired_tokens_pass_only_within_the_clock_skew() {
        let config = hs_config();
        let authenticator = Authenticator::from_config(&config).expect("config");
        let within = Claims::new(&config, Role::Admin, Uuid::new_v4(), -10);
        let beyond = Claims::new(&config, Role::Admin, Uuid::new_v4(), -120);
        assert!(authenticator
            .verify(&mint_hs256(&config, &within).expect("minted"))
            .is_ok());
        let refused = authenticator
            .verify(&mint_hs256(&config, &beyond).expect("minted"))
            .expect_err("expired");
        assert!(refused.contains("expired"), "{refused}");
    }

    #[test]
    fn short_or_missing_secrets_and_unknown_algorithms_are_refused_at_start() {
        assert!(matches!(
            Authenticator::from_config(&AuthConfig::default()),
            Err(AuthConfigError::Secret)
        ));
        let short = AuthConfig {
            auth_jwt_secret: Some(Secret::new("short")),
            ..AuthConfig::default()
        };
        assert!(Authenticator::from_config(&short).is_err());
        let none = AuthConfig {
            auth_jwt_algorithm: "none".to_owned(),
            ..hs_config()
        };
        assert!(matches!(
            Authenticator::from_config(&none),
            Err(AuthConfigError::Algorithm(_))
        ));
    }

    #[test]
    fn es256_tokens_verify_with_the_configured_public_key() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let config = AuthConfig {
            auth_jwt_algorithm: "ES256".to_owned(),
            auth_jwt_public_key_file: Some(PathBuf::from(format!("{dir}/es256-public.pem"))),
            ..AuthConfig::default()
        };
        let private = std::fs::read(format!("{dir}/es256-private.pem")).expect("test key");
        let subject = Uuid::new_v4();
        let claims = Claims::new(&config, Role::Courier, subject, 60);
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &claims,
            &EncodingKey::from_ec_pem(&private).expect("EC key"),
        )
        .expect("signed");
        let authenticator = Authenticator::from_config(&config).expect("config");
        assert_eq!(
            authenticator.verify(&token).expect("valid").subject,
            subject
        );
        // The same claims signed with HS256 are refused: the algorithm is the API's, not the token's.
        let hs = mint_hs256(&hs_config(), &claims).expect("minted");
        assert!(authenticator.verify(&hs).is_err());
    }

    #[test]
    fn rs256_tokens_verify_with_the_configured_public_key() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let config = AuthConfig {
            auth_jwt_algorithm: "RS256".to_owned(),
            auth_jwt_public_key_file: Some(PathBuf::from(format!("{dir}/rs256-public.pem"))),
            ..AuthConfig::default()
        };
        let private = std::fs::read(format!("{dir}/rs256-private.pem")).expect("test key");
        let claims = Claims::new(&config, Role::Analyst, Uuid::new_v4(), 60);
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(&private).expect("RSA key"),
        )
        .expect("signed");
        let authenticator = Authenticator::from_config(&config).expect("config");
        assert_eq!(
            authenticator.verify(&token).expect("valid").role,
            Role::Analyst
        );
    }
}
