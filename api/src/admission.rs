//! Admission: the API takes in as much work as its database connections can carry now and
//! refuses the rest at once, `503` with `Retry-After` and nothing done, instead of letting it
//! queue until the client gives up.
//!
//! Past saturation a queue only adds waiting: every request behind it gets slower, the clients'
//! timeouts strike, they retry, and the load grows. So the API holds at most `limit` requests
//! in its handlers (by default twice its database pool: enough to keep every connection busy)
//! and a request waits at most `wait` for one of those slots. Placements wait a quarter of it:
//! when the backbone is full, new orders are turned away first and the orders already under
//! way (their steps, the courier's, the store's) keep going. The answer says to retry after a
//! second with the same `Idempotency-Key`, which the apps do.
//!
//! A request's body is read before it takes a slot, so a client sending its body slowly holds
//! no slot meanwhile (the request timeout bounds it). Probes, metrics, the console's files,
//! event streams (long-lived, holding no connection between events) and read-your-writes
//! waits (`?position=`: they wait on the projector's signal, not the database, and each client
//! may have only `API_MAX_WAITS_PER_CLIENT` of them) are never held back.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequest, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::extract::RawBody;

/// The API's admission limit (see the module documentation).
#[derive(Debug)]
pub struct Admission {
    slots: Semaphore,
    wait: Duration,
}

/// What a request is, for admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Never held back.
    Exempt,
    /// New work: an order placed.
    Placement,
    /// Everything else: steps of orders under way, queries.
    Other,
}

impl Admission {
    /// At most `limit` requests in the handlers, each waiting at most `wait` for a slot.
    pub fn new(limit: usize, wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            slots: Semaphore::new(limit.max(1)),
            wait,
        })
    }

    fn wait_for(&self, kind: Kind) -> Duration {
        match kind {
            Kind::Placement => self.wait / 4,
            Kind::Exempt | Kind::Other => self.wait,
        }
    }
}

fn kind(method: &Method, path: &str, query: Option<&str>) -> Kind {
    let waits = query.is_some_and(|q| q.split('&').any(|pair| pair.starts_with("position=")));
    let exempt = path.starts_with("/health/")
        || path == "/metrics"
        || path == "/openapi.json"
        || path.starts_with("/console")
        || path.ends_with("/stream")
        || waits;
    if exempt {
        Kind::Exempt
    } else if method == Method::POST && path == "/orders" {
        Kind::Placement
    } else {
        Kind::Other
    }
}

/// The layer: inside authentication, the rate limit (a client over its own limit is told so,
/// not that the backbone is full), the role gate and the webhooks' signatures (a request
/// refused by them takes no slot); outside idempotency and the handlers, which read the
/// database.
pub async fn admit(
    State(admission): State<Arc<Admission>>,
    request: Request,
    next: Next,
) -> Response {
    let kind = kind(
        request.method(),
        request.uri().path(),
        request.uri().query(),
    );
    if kind == Kind::Exempt {
        return next.run(request).await;
    }
    let request = if request.method() == Method::GET {
        request
    } else {
        match RawBody::from_request(request, &()).await {
            Ok(RawBody(parts, bytes)) => Request::from_parts(parts, Body::from(bytes)),
            Err(problem) => return problem.into_response(),
        }
    };
    let permit =
        match tokio::time::timeout(admission.wait_for(kind), admission.slots.acquire()).await {
            Ok(Ok(permit)) => permit,
            // Timed out (or closed, which it never is): full.
            Ok(Err(_)) | Err(_) => return at_capacity(kind),
        };
    let response = next.run(request).await;
    drop(permit);
    response
}

fn at_capacity(kind: Kind) -> Response {
    let what = if kind == Kind::Placement {
        "placement"
    } else {
        "other"
    };
    metrics::counter!("api_shed_total", "request" => what).increment(1);
    ApiError::Busy(
        "the backbone is at capacity and did nothing with this request; retry after \
         Retry-After seconds (with the same Idempotency-Key)"
            .to_owned(),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_are_new_work_and_streams_waits_probes_and_files_are_never_held_back() {
        assert_eq!(kind(&Method::POST, "/orders", None), Kind::Placement);
        assert_eq!(kind(&Method::GET, "/orders", Some("limit=5")), Kind::Other);
        assert_eq!(
            kind(&Method::POST, "/orders/o-1/actions", None),
            Kind::Other
        );
        assert_eq!(
            kind(
                &Method::GET,
                "/orders/o-1/tracking",
                Some("x=1&position=abc")
            ),
            Kind::Exempt
        );
        for path in [
            "/health/ready",
            "/metrics",
            "/openapi.json",
            "/console/",
            "/orders/o-1/tracking/stream",
            "/customers/c-1/notifications/stream",
        ] {
            assert_eq!(kind(&Method::GET, path, None), Kind::Exempt, "{path}");
        }
    }

    #[test]
    fn placements_give_up_first() {
        let admission = Admission::new(1, Duration::from_millis(800));
        assert_eq!(
            admission.wait_for(Kind::Placement),
            Duration::from_millis(200)
        );
        assert_eq!(admission.wait_for(Kind::Other), Duration::from_millis(800));
    }
}
