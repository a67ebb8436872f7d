//! Per-client rate limit: a GCRA bucket (`governor`) per caller, keyed by the authenticated
//! principal (role and id) or, for requests without a token (payment webhooks), by the peer's IP
//! address. A request over the limit is answered `429` with `Retry-After` (whole seconds, at
//! least 1) and a problem document; it never reaches a handler. Health and metrics are not
//! limited (probes and scrapers must always get through). A request whose token fails to verify
//! is counted against its peer's bucket by the authentication layer ([`crate::auth::authenticate`]),
//! so guessing tokens is throttled like any other traffic.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

use crate::auth::Principal;
use crate::error::ApiError;

type Keyed = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

/// The API's rate limiter.
pub struct ClientLimiter {
    limiter: Keyed,
    clock: DefaultClock,
}

impl std::fmt::Debug for ClientLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientLimiter").finish_non_exhaustive()
    }
}

impl ClientLimiter {
    /// `per_second` sustained requests per client with bursts of `burst`; `None` when either is 0
    /// (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<Arc<Self>> {
        let per_second = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst)?;
        Some(Arc::new(Self {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            clock: DefaultClock::default(),
        }))
    }

    /// Forgets idle clients now and then, so the table does not grow with every caller ever seen.
    pub fn spawn_housekeeping(self: &Arc<Self>, stop: CancellationToken) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(this) = this.upgrade() else { return };
                this.limiter.retain_recent();
                this.limiter.shrink_to_fit();
            }
        });
    }

    pub(crate) fn check(&self, key: &str) -> Result<(), u64> {
        self.limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(self.clock.now());
                u64::try_from(wait.as_millis().div_ceil(1000))
                    .unwrap_or(u64::MAX)
                    .max(1)
            })
    }
}

fn unlimited(path: &str) -> bool {
    path.starts_with("/health/") || path == "/metrics"
}

/// The layer: inside authentication (it keys by the principal), outside everything else.
pub async fn rate_limit(
    State(limiter): State<Arc<ClientLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    if unlimited(request.uri().path()) {
        return next.run(request).await;
    }
    let key = match request.extensions().get::<Principal>() {
        Some(principal) => principal.actor(),
        None => peer_key(&request),
    };
    match limiter.check(&key) {
        Ok(()) => next.run(request).await,
        Err(retry_after_secs) => too_many(retry_after_secs),
    }
}

/// The bucket of a caller without a (valid) token: its peer's IP address.
pub(crate) fn peer_key(request: &Request) -> String {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(
            || "peer:unknown".to_owned(),
            |c| format!("peer:{}", c.0.ip()),
        )
}

/// The 429 answer.
pub(crate) fn too_many(retry_after_secs: u64) -> Response {
    metrics::counter!("api_rate_limited_total").increment(1);
    ApiError::TooManyRequests {
        detail: format!("too many requests from this client; retry after {retry_after_secs} s"),
        retry_after_secs,
    }
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_over_its_burst_is_told_when_to_retry_while_others_go_on() {
        let limiter = ClientLimiter::new(1, 3).expect("a limit");
        for _ in 0..3 {
            assert!(limiter.check("customer:a").is_ok());
        }
        let retry = limiter.check("customer:a").expect_err("over the burst");
        assert!((1..=2).contains(&retry), "{retry}");
        assert!(limiter.check("customer:b").is_ok());
    }

    #[test]
    fn a_zero_rate_means_no_limit() {
        assert!(ClientLimiter::new(0, 10).is_none());
        assert!(ClientLimiter::new(10, 0).is_none());
    }
}
