//! Live updates for Server-Sent Events: one `LISTEN` connection per API process fans the read
//! models' change signals ([`streams::consumer::live`]) out to every open stream.
//!
//! A signal only says "this key of this read model changed"; each stream then re-reads the read
//! model after its own cursor, so a missed signal (a lagging receiver, a reconnect) can delay
//! an update but cannot lose or reorder one. Streams also re-read on a timer as a fallback.

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// A change signal: `key` of `channel` changed. `channel == "*"` means "anything may have
/// changed" (sent after the listener reconnected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub channel: String,
    pub key: String,
}

impl Change {
    /// Whether this signal may concern `key` of `channel`.
    pub fn concerns(&self, channel: &str, key: &str) -> bool {
        self.channel == "*" || (self.channel == channel && self.key == key)
    }
}

/// Waits until `key` of `channel` changes, or `at_most` passes (a stream re-reads anyway then:
/// a lost signal delays an update, never loses it). `false` when the hub closed: the stream ends.
pub async fn changed(
    changes: &mut broadcast::Receiver<Change>,
    channel: &str,
    key: &str,
    at_most: std::time::Duration,
) -> bool {
    let deadline = tokio::time::sleep(at_most);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return true,
            change = changes.recv() => match change {
                Ok(change) if change.concerns(channel, key) => return true,
                Ok(_) => {}
                // Missed signals may have concerned this key: re-read.
                Err(broadcast::error::RecvError::Lagged(_)) => return true,
                Err(broadcast::error::RecvError::Closed) => return false,
            },
        }
    }
}

/// Runs one read of an event stream to its end even if the client hangs up meanwhile. A hung-up
/// stream is dropped at whatever it awaits; a query cut off mid-way leaves its connection in a
/// state sqlx does not trust, so the pool closes it and PostgreSQL starts a new backend for the
/// next query (at a few dozen streams ending a second, that was a steady churn of the API's
/// connections). The read, spawned, finishes and returns its connection cleanly. `None` if the
/// read panicked.
pub async fn read_through<T: Send + 'static>(
    read: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    tokio::spawn(read).await.ok()
}

/// The process's fan-out of change signals.
#[derive(Debug)]
pub struct LiveHub {
    /// `None` once closed: every subscriber then sees `RecvError::Closed` and its stream ends.
    sender: std::sync::Mutex<Option<broadcast::Sender<Change>>>,
    stop: CancellationToken,
}

impl Drop for LiveHub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl LiveHub {
    /// Starts listening on the read models' channel.
    pub async fn start(pool: &PgPool) -> Result<Self, sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(streams::consumer::live::CHANNEL).await?;
        let (sender, _) = broadcast::channel(1024);
        let stop = CancellationToken::new();
        tokio::spawn(forward(listener, sender.clone(), stop.clone()));
        Ok(Self {
            sender: std::sync::Mutex::new(Some(sender)),
            stop,
        })
    }

    /// Signals from now on (a closed hub gives a receiver that is closed at once).
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        let sender = self.sender.lock().ok().and_then(|s| s.clone());
        sender.map_or_else(|| broadcast::channel(1).1, |s| s.subscribe())
    }

    /// Ends every open stream (on shutdown: a graceful shutdown waits for open connections, and
    /// an event stream would otherwise never end).
    pub fn close(&self) {
        self.stop.cancel();
        if let Ok(mut sender) = self.sender.lock() {
            sender.take();
        }
    }
}

async fn forward(
    mut listener: PgListener,
    sender: broadcast::Sender<Change>,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = listener.try_recv() => next,
        };
        match next {
            Ok(Some(notification)) => {
                if let Some((channel, key)) = notification.payload().split_once(':') {
                    // No receivers is fine: nobody is streaming right now.
                    let _ = sender.send(Change {
                        channel: channel.to_owned(),
                        key: key.to_owned(),
                    });
                }
            }
            Ok(None) => {
                // Reconnected: signals in between are lost, so every stream re-reads.
                tracing::warn!("live-update listener reconnected");
                let _ = sender.send(Change {
                    channel: "*".to_owned(),
                    key: String::new(),
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "live-update listener failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// How many event streams each client (the token's role and id) may hold open at once
/// (`API_MAX_STREAMS_PER_CLIENT`): each open stream holds a connection and wakes on every
/// change, so one client must not open them without bound. One more is answered 429.
#[derive(Debug)]
pub struct StreamSlots {
    max_per_client: usize,
    /// The 429's detail, given the limit.
    refusal: fn(usize) -> String,
    open: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// One open stream of a client; the slot frees when the stream ends (its body is dropped).
#[derive(Debug)]
pub struct StreamSlot {
    slots: std::sync::Arc<StreamSlots>,
    client: String,
}

impl StreamSlots {
    pub fn new(max_per_client: usize) -> std::sync::Arc<Self> {
        Self::with_refusal(max_per_client, |max| {
            format!(
                "this client already has {max} event streams open, the most it may; close one \
                 (or resume it with Last-Event-ID) before opening another"
            )
        })
    }

    /// Slots of another kind (read-your-writes waits): `refusal` words the 429.
    pub fn with_refusal(
        max_per_client: usize,
        refusal: fn(usize) -> String,
    ) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            max_per_client,
            refusal,
            open: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// A slot for `client`, or 429 when it already holds the most streams it may.
    pub fn acquire(
        self: &std::sync::Arc<Self>,
        client: &str,
    ) -> Result<StreamSlot, crate::error::ApiError> {
        let mut open = self
            .open
            .lock()
            .map_err(|_| crate::error::ApiError::internal("stream slots poisoned"))?;
        let count = open.entry(client.to_owned()).or_default();
        if *count >= self.max_per_client {
            return Err(crate::error::ApiError::TooManyRequests {
                detail: (self.refusal)(self.max_per_client),
                retry_after_secs: 5,
            });
        }
        *count += 1;
        Ok(StreamSlot {
            slots: self.clone(),
            client: client.to_owned(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.slots.open.lock() {
            if let Some(count) = open.get_mut(&self.client) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    open.remove(&self.client);
                }
            }
        }
    }
}
