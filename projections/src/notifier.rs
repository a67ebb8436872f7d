//! Webhook delivery of notifications: POSTs every notification record, at most once, to
//! `NOTIFICATIONS_WEBHOOK_URL`, signed with `NOTIFICATIONS_WEBHOOK_SECRET`.
//!
//! **At most once.** A round claims the unclaimed records in id order
//! (`FOR UPDATE SKIP LOCKED`, so several workers share the queue), writes a `sending` row per
//! record into `notifications.webhook_deliveries` (keyed by customer and causing event), and
//! *commits that before POSTing*. A crash between the commit and the POST loses that
//! notification's webhook; nothing can ever send it twice — not a restarted worker, not a
//! second worker, not a read model rebuilt from scratch (its records find their log rows and
//! are skipped). After the POST the outcome is recorded: `delivered` (2xx, with
//! `delivered_at`) or `failed` (the status code, or the error: timeout, connection refused...).
//! A `sending` row older than the timeout plus a minute (the worker died during the POST) is
//! turned into `failed` with an unknown outcome.
//!
//! **A failed POST is not resent**, automatically or otherwise: the receiver may have acted on a
//! request whose answer was lost. Failures are counted (`notifications_webhook_failed_total`,
//! labelled by `reason`: `status`, `error`, `unknown`) and listed by the API
//! (`GET /admin/notifications/webhook-failures`) for an operator to follow up; the customer
//! still sees them in the app (list and stream). Deliveries are counted in
//! `notifications_webhook_sent_total`.
//!
//! **Order.** One worker sends in id order; several workers share the load without an order
//! between them. A receiver that needs order uses the `id` in the body.
//!
//! **Signature** (Stripe's scheme). Each request carries
//! `Backbone-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` and
//! `Backbone-Notification-Id: <id>`. A receiver recomputes the HMAC over the timestamp, a dot and
//! the raw body bytes, compares in constant time, and refuses timestamps older than a few
//! minutes (replays); [`verify_signature`] does exactly that. The body is the notification as
//! the API lists it (`id`, `customer_id`, `kind`, `order_id`, `event_id`, `payload`,
//! `created_at`).
//!
//! The worker wakes on the projection's live signal (`LISTEN backbone_live`) and polls every
//! `NOTIFICATIONS_WEBHOOK_POLL_MS` as a fallback.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::notifications::{Notification, NotificationsProjection, LIVE_CHANNEL};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "Backbone-Signature";
/// The header carrying the notification id (the receiver's idempotency key).
pub const ID_HEADER: &str = "Backbone-Notification-Id";

/// Webhook settings, from the environment.
#[derive(Clone, Deserialize)]
pub struct WebhookConfig {
    /// `NOTIFICATIONS_WEBHOOK_URL`: where to POST notifications; without it no worker runs.
    #[serde(default)]
    pub notifications_webhook_url: Option<String>,
    /// `NOTIFICATIONS_WEBHOOK_SECRET`: the HMAC-SHA256 key (required with the URL; never
    /// logged).
    #[serde(default)]
    pub notifications_webhook_secret: Option<String>,
    /// `NOTIFICATIONS_WEBHOOK_TIMEOUT_MS`: the whole POST, connect to last byte (default 5000).
    #[serde(default = "default_timeout_ms")]
    pub notifications_webhook_timeout_ms: u64,
    /// `NOTIFICATIONS_WEBHOOK_BATCH_SIZE`: records claimed per round (default 100).
    #[serde(default = "default_batch")]
    pub notifications_webhook_batch_size: i64,
    /// `NOTIFICATIONS_WEBHOOK_POLL_MS`: fallback poll when no live signal arrives (default 1000).
    #[serde(default = "default_poll_ms")]
    pub notifications_webhook_poll_ms: u64,
}

const fn default_timeout_ms() -> u64 {
    5_000
}
const fn default_batch() -> i64 {
    100
}
const fn default_poll_ms() -> u64 {
    1_000
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field(
                "notifications_webhook_url",
                &self.notifications_webhook_url.as_deref().map(loggable),
            )
            .field(
                "notifications_webhook_secret",
                &self
                    .notifications_webhook_secret
                    .as_ref()
                    .map(|_| "<redacted>"),
            )
            .field(
                "notifications_webhook_timeout_ms",
                &self.notifications_webhook_timeout_ms,
            )
            .field(
                "notifications_webhook_batch_size",
                &self.notifications_webhook_batch_size,
            )
            .field(
                "notifications_webhook_poll_ms",
                &self.notifications_webhook_poll_ms,
            )
            .finish()
    }
}

impl WebhookConfig {
    pub fn from_env() -> Result<Self, envy::Error> {
        envy::from_env()
    }

    /// A configuration for `url` and `secret` with the default timings.
    pub fn new(url: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            notifications_webhook_url: Some(url.into()),
            notifications_webhook_secret: Some(secret.into()),
            notifications_webhook_timeout_ms: default_timeout_ms(),
            notifications_webhook_batch_size: default_batch(),
            notifications_webhook_poll_ms: default_poll_ms(),
        }
    }

    /// Whether a worker should run (a URL is set).
    pub fn enabled(&self) -> bool {
        self.notifications_webhook_url
            .as_deref()
            .is_some_and(|u| !u.trim().is_empty())
    }
}

/// A URL without credentials, query or fragment (they may hold a token), for logs.
fn loggable(url: &str) -> String {
    match reqwest::Url::parse(url.trim()) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.to_string()
        }
        Err(_) => "<not a URL>".to_owned(),
    }
}

/// Why the worker could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum NotifierError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// The signature header value for `body` sent at `timestamp` (unix seconds).
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let digest = keyed(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(digest))
}

/// HMAC-SHA256 keyed with `secret` over `<timestamp>.<body>`.
fn keyed(secret: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature header is malformed")]
    Malformed,
    #[error("the timestamp is outside the tolerance")]
    Stale,
    #[error("no signature matches")]
    Mismatch,
}

/// Checks a `Backbone-Signature` header as a receiver should: a `v1` HMAC over `t.body` that
/// matches (constant-time), and `t` within `tolerance` of `now` (unix seconds).
pub fn verify_signature(
    secret: &str,
    header: &str,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", s)) => {
                signatures.push(hex::decode(s).map_err(|_| SignatureError::Malformed)?)
            }
            _ => {}
        }
    }
    let Some(timestamp) = timestamp else {
        return Err(SignatureError::Malformed);
    };
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now.abs_diff(timestamp) > tolerance.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    // `verify_slice` compares in constant time.
    if signatures
        .iter()
        .any(|s| keyed(secret, timestamp, body).verify_slice(s).is_ok())
    {
        return Ok(());
    }
    Err(SignatureError::Mismatch)
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Records claimed (including those already sent by an earlier life of the read model).
    pub claimed: usize,
    pub delivered: usize,
    pub failed: usize,
}

/// A claimed record, and whether it is to be sent (not in the delivery log before).
#[derive(sqlx::FromRow)]
struct ClaimedRow {
    #[sqlx(flatten)]
    notification: Notification,
    to_send: bool,
}

/// The webhook delivery worker.
pub struct Notifier {
    pool: PgPool,
    http: reqwest::Client,
    url: reqwest::Url,
    secret: String,
    timeout: Duration,
    batch_size: i64,
    poll: Duration,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("url", &self.safe_url())
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// Checks the settings and creates the read model's tables (idempotent).
    pub async fn new(pool: PgPool, config: &WebhookConfig) -> Result<Self, NotifierError> {
        let url = config
            .notifications_webhook_url
            .as_deref()
            .ok_or_else(|| NotifierError::Config("NOTIFICATIONS_WEBHOOK_URL is not set".into()))?;
        let url = reqwest::Url::parse(url.trim()).map_err(|e| {
            NotifierError::Config(format!("NOTIFICATIONS_WEBHOOK_URL is not a URL: {e}"))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(NotifierError::Config(
                "NOTIFICATIONS_WEBHOOK_URL must be http or https".into(),
            ));
        }
        let secret = config
            .notifications_webhook_secret
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                NotifierError::Config(
                    "NOTIFICATIONS_WEBHOOK_SECRET is required with NOTIFICATIONS_WEBHOOK_URL"
                        .into(),
                )
            })?;
        if !(1..=1000).contains(&config.notifications_webhook_batch_size) {
            return Err(NotifierError::Config(
                "NOTIFICATIONS_WEBHOOK_BATCH_SIZE must be between 1 and 1000".into(),
            ));
        }
        let timeout = Duration::from_millis(config.notifications_webhook_timeout_ms.max(1));
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect would re-send the body elsewhere: the receiver must answer itself.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| NotifierError::Config(format!("HTTP client: {e}")))?;
        streams::consumer::ensure_schema(&NotificationsProjection, &pool).await?;
        // Exported from the start (at 0), so alerts on them work before the first POST.
        metrics::describe_counter!(
            "notifications_webhook_sent_total",
            "Notification webhooks the receiver answered with 2xx"
        );
        metrics::describe_counter!(
            "notifications_webhook_failed_total",
            "Notification webhooks that failed (not resent): reason = status, error or unknown"
        );
        metrics::counter!("notifications_webhook_sent_total").increment(0);
        for reason in ["status", "error", "unknown"] {
            metrics::counter!("notifications_webhook_failed_total", "reason" => reason)
                .increment(0);
        }
        Ok(Self {
            pool,
            http,
            url,
            secret,
            timeout,
            batch_size: config.notifications_webhook_batch_size,
            poll: Duration::from_millis(config.notifications_webhook_poll_ms.max(10)),
        })
    }

    fn safe_url(&self) -> String {
        loggable(self.url.as_str())
    }

    /// Sends until `shutdown`; the POST in flight is finished and recorded before returning.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), NotifierError> {
        tracing::info!(url = %self.safe_url(), "notification webhook worker started");
        let wake = Arc::new(Notify::new());
        let listening = CancellationToken::new();
        tokio::spawn(listen(self.pool.clone(), wake.clone(), listening.clone()));
        let _stop_listening = listening.drop_guard();
        while !shutdown.is_cancelled() {
            let round = match self.run_once(&shutdown).await {
                Ok(round) => round,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook round failed; retrying");
                    Round::default()
                }
            };
            if usize::try_from(self.batch_size).is_ok_and(|b| round.claimed >= b) {
                continue; // more may be waiting
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = wake.notified() => {}
                () = tokio::time::sleep(self.poll) => {}
            }
        }
        tracing::info!("notification webhook worker stopped");
        Ok(())
    }

    /// One round: gives up on stale `sending` rows, claims a batch (committed), POSTs each in id
    /// order and records the outcomes. Once `stop` is cancelled, the records not POSTed yet are
    /// given back to the queue (they were never sent, so that cannot send anything twice).
    pub async fn run_once(&self, stop: &CancellationToken) -> Result<Round, NotifierError> {
        self.expire_unknown_outcomes().await?;
        let (count, claimed) = self.claim().await?;
        let mut round = Round {
            claimed: count,
            ..Round::default()
        };
        for (index, notification) in claimed.iter().enumerate() {
            if stop.is_cancelled() {
                self.release(&claimed[index..]).await?;
                break;
            }
            if self.send(notification).await {
                round.delivered += 1;
            } else {
                round.failed += 1;
            }
        }
        Ok(round)
    }

    /// Gives claimed but never POSTed records back to the queue.
    async fn release(&self, unsent: &[Notification]) -> Result<(), NotifierError> {
        let ids: Vec<i64> = unsent.iter().map(|n| n.id).collect();
        let customers: Vec<uuid::Uuid> = unsent.iter().map(|n| n.customer_id).collect();
        let events: Vec<uuid::Uuid> = unsent.iter().map(|n| n.event_id).collect();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM notifications.webhook_deliveries d \
             USING unnest($1::uuid[], $2::uuid[]) AS u(customer_id, event_id) \
             WHERE d.customer_id = u.customer_id AND d.event_id = u.event_id \
               AND d.status = 'sending'",
        )
        .bind(&customers)
        .bind(&events)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE notifications.records SET webhook_claimed = false WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Claims the next unclaimed records and commits the claim (with its `sending` log rows)
    /// before anything is sent. Returns how many records were claimed, and those to send:
    /// records whose (customer, event) is already in the log — sent by an earlier life of the
    /// read model — are claimed but not sent.
    async fn claim(&self) -> Result<(usize, Vec<Notification>), NotifierError> {
        let mut tx = self.pool.begin().await?;
        let claimed: Vec<ClaimedRow> = sqlx::query_as(
            "WITH claimed AS ( \
               SELECT id, customer_id, kind, order_id, event_id, payload, created_at \
               FROM notifications.records WHERE NOT webhook_claimed \
               ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED), \
             marked AS ( \
               UPDATE notifications.records r SET webhook_claimed = true \
               FROM claimed c WHERE r.id = c.id), \
             logged AS ( \
               INSERT INTO notifications.webhook_deliveries \
                 (customer_id, event_id, notification_id, status, attempted_at) \
               SELECT customer_id, event_id, id, 'sending', clock_timestamp() FROM claimed \
               ON CONFLICT (customer_id, event_id) DO NOTHING \
               RETURNING notification_id) \
             SELECT c.*, l.notification_id IS NOT NULL AS to_send \
             FROM claimed c LEFT JOIN logged l ON l.notification_id = c.id ORDER BY c.id",
        )
        .bind(self.batch_size)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let count = claimed.len();
        let to_send = claimed
            .into_iter()
            .filter(|c| c.to_send)
            .map(|c| c.notification)
            .collect();
        Ok((count, to_send))
    }

    /// POSTs one notification and records the outcome; true when the receiver took it.
    async fn send(&self, notification: &Notification) -> bool {
        // A JSON value and plain fields: serializing cannot fail.
        let body = serde_json::to_vec(notification).unwrap_or_default();
        let timestamp = chrono::Utc::now().timestamp();
        let outcome = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature(&self.secret, timestamp, &body))
            .header(ID_HEADER, notification.id.to_string())
            .body(body)
            .send()
            .await;
        let (delivered, status, error) = match outcome {
            Ok(response) if response.status().is_success() => {
                (true, Some(i32::from(response.status().as_u16())), None)
            }
            Ok(response) => (
                false,
                Some(i32::from(response.status().as_u16())),
                Some(format!("the receiver answered {}", response.status())),
            ),
            // Without the URL: it may carry a token.
            Err(e) => (false, None, Some(e.without_url().to_string())),
        };
        if delivered {
            metrics::counter!("notifications_webhook_sent_total").increment(1);
        } else {
            let reason = if status.is_some() { "status" } else { "error" };
            metrics::counter!("notifications_webhook_failed_total", "reason" => reason)
                .increment(1);
            tracing::warn!(
                notification = notification.id,
                status,
                error = error.as_deref().unwrap_or_default(),
                "notification webhook failed; it is not resent"
            );
        }
        let recorded = sqlx::query(
            "UPDATE notifications.webhook_deliveries \
             SET status = $3, http_status = $4, error = $5, finished_at = clock_timestamp(), \
                 delivered_at = CASE WHEN $3 = 'delivered' THEN clock_timestamp() END \
             WHERE customer_id = $1 AND event_id = $2 AND status = 'sending'",
        )
        .bind(notification.customer_id)
        .bind(notification.event_id)
        .bind(if delivered { "delivered" } else { "failed" })
        .bind(status)
        .bind(error)
        .execute(&self.pool)
        .await;
        if let Err(e) = recorded {
            // The row stays `sending` and later becomes `failed` (unknown outcome); the rest of
            // the batch is still sent.
            tracing::warn!(error = %e, notification = notification.id, "webhook outcome not recorded");
        }
        delivered
    }

    /// `sending` rows older than the timeout plus a minute: the worker that claimed them died
    /// during the POST, and whether the receiver got it is unknown. They become `failed`.
    async fn expire_unknown_outcomes(&self) -> Result<(), NotifierError> {
        let grace = self.timeout + Duration::from_secs(60);
        let expired = sqlx::query(
            "UPDATE notifications.webhook_deliveries \
             SET status = 'failed', finished_at = clock_timestamp(), \
                 error = 'outcome unknown: the worker stopped during the POST' \
             WHERE status = 'sending' \
               AND attempted_at < clock_timestamp() - make_interval(secs => $1)",
        )
        .bind(grace.as_secs_f64())
        .execute(&self.pool)
        .await?
        .rows_affected();
        if expired > 0 {
            metrics::counter!("notifications_webhook_failed_total", "reason" => "unknown")
                .increment(expired);
            tracing::warn!(expired, "notification webhooks with an unknown outcome");
        }
        Ok(())
    }
}

/// Wakes the worker on the projection's live signals; reconnects on failure (the poll covers
/// the gap).
async fn listen(pool: PgPool, wake: Arc<Notify>, stop: CancellationToken) {
    let prefix = format!("{LIVE_CHANNEL}:");
    while !stop.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "webhook worker cannot LISTEN; polling only");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
        };
        if let Err(e) = listener.listen(streams::consumer::live::CHANNEL).await {
            tracing::warn!(error = %e, "webhook worker cannot LISTEN; polling only");
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(5)) => continue,
            }
        }
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                next = listener.try_recv() => next,
            };
            match next {
                Ok(Some(n)) if n.payload().starts_with(&prefix) => wake.notify_one(),
                Ok(Some(_)) => {}
                // Reconnected: something may have been missed.
                Ok(None) => wake.notify_one(),
                Err(e) => {
                    tracing::warn!(error = %e, "webhook worker's LISTEN failed; reconnecting");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_with_its_secret_and_timestamp_only() {
        let body = br#"{"id":1}"#;
        let header = signature("s3cret", 1_700_000_000, body);
        assert!(header.starts_with("t=1700000000,v1="));
        let tolerance = Duration::from_secs(300);
        assert_eq!(
            verify_signature("s3cret", &header, body, 1_700_000_100, tolerance),
            Ok(())
        );
        assert_eq!(
            verify_signature("other", &header, body, 1_700_000_100, tolerance),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature("s3cret", &header, br#"{"id":2}"#, 1_700_000_100, tolerance),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature("s3cret", &header, body, 1_700_001_000, tolerance),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify_signature("s3cret", "v1=00", body, 1_700_000_000, tolerance),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn the_secret_is_never_printed() {
        let config =
            WebhookConfig::new("http://user:pw@127.0.0.1:9/hook?token=t0k", "do-not-print");
        let printed = format!("{config:?}");
        for secret in ["do-not-print", "pw", "t0k"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(printed.contains("127.0.0.1:9/hook"), "{printed}");
        assert!(config.enabled());
    }
}
