//! The feeders of a rebuild: events from the topics (raw records, decoded) or from the event
//! store (in their published form), handed to the appliers in batches.

use super::*;

/// An event record as read from a topic, kept for a dead letter.
#[derive(Debug)]
pub(super) struct RawRecord {
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) key: Option<Vec<u8>>,
    pub(super) payload: Option<Vec<u8>>,
    pub(super) header_names: Vec<String>,
    pub(super) header_values: Vec<Vec<u8>>,
    pub(super) timestamp_ms: Option<i64>,
}

/// Where an event came from, and what its application moves forward.
#[derive(Debug)]
pub(super) enum Origin {
    Topic(RawRecord),
    /// From the event store; `advances` when it moves the rebuild's position in recorded order
    /// (events of the sweep and of the swap's top-up are behind it).
    Store {
        recorded_at: DateTime<Utc>,
        advances: bool,
    },
}

/// One event to replay.
#[derive(Debug)]
pub(super) struct Item {
    pub(super) origin: Origin,
    /// Its metadata; `None` for a record without readable headers.
    pub(super) meta: Option<EventMeta>,
    /// The event, or why it does not decode.
    pub(super) event: Result<DecodedEvent, String>,
}

impl Item {
    pub(super) fn recorded_at(&self) -> Option<DateTime<Utc>> {
        match &self.origin {
            Origin::Store { recorded_at, .. } => Some(*recorded_at),
            Origin::Topic(_) => self
                .meta
                .as_ref()
                .and_then(|m| DateTime::parse_from_rfc3339(&m.recorded_at).ok())
                .map(|t| t.with_timezone(&Utc)),
        }
    }
}

/// The decoded event a topic record of this stored event decodes to: the relay's upcast and
/// metadata, and the Avro value of the contract (as the relay encodes it).
pub(super) fn store_item(row: StoredEvent, topics: &Topics, advances: bool) -> Item {
    let recorded_at = row.recorded_at;
    let Published { meta, payload } = Published::of(row);
    let topic = topics
        .for_aggregate(&meta.aggregate_type)
        .unwrap_or_default();
    let event = schemas::Contracts::global()
        .and_then(|contracts| contracts.payload_to_avro(&meta.aggregate_type, &payload))
        .map(|(contract, value)| DecodedEvent {
            meta: meta.clone(),
            contract,
            value,
            topic,
            partition: -1,
            offset: -1,
            timestamp_ms: None,
        })
        .map_err(|e| e.to_string());
    Item {
        origin: Origin::Store {
            recorded_at,
            advances,
        },
        meta: Some(meta),
        event,
    }
}

/// A position in the store's recorded order: recorded at, aggregate type, id, sequence.
pub(super) type StorePosition = (DateTime<Utc>, String, String, i64);

/// What the store feeder reads.
#[derive(Debug, Clone)]
pub(super) enum StoreQuery {
    /// Every event of these aggregate types in recorded order, after a position.
    Recorded { after: Option<StorePosition> },
    /// The events not applied in the shadow yet, in aggregate order.
    Sweep,
    /// The events the live model applied and the shadow has not, in aggregate order.
    TopUp,
}

/// The settings of a consumer that reads a backlog (the rebuild's): assigned partitions, no
/// offsets committed (the checkpoint is in PostgreSQL), and large fetches: the broker answers
/// once it has a megabyte (or after half a second at the end of the backlog), so a backlog is
/// read in full batches whatever the broker's fetch heuristics.
pub fn bulk_consumer_config(kafka: &KafkaConfig, group: &str) -> rdkafka::ClientConfig {
    let mut config = kafka.client_config();
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.min.bytes", "1048576")
        .set(
            "fetch.wait.max.ms",
            kafka.kafka_fetch_wait_max_ms.max(500).to_string(),
        );
    config
}

/// Every partition of `topics` with its low and high watermarks.
pub(super) fn watermarks(
    consumer: &BaseConsumer,
    topics: &[String],
) -> anyhow::Result<Vec<(String, i32, i64, i64)>> {
    let timeout = Duration::from_secs(10);
    let mut partitions = Vec::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .with_context(|| format!("reading the metadata of {topic}"))?;
        for described in metadata.topics() {
            if let Some(error) = described.error() {
                bail!("topic {topic}: {error:?}");
            }
            for partition in described.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(topic, partition.id(), timeout)
                    .with_context(|| {
                        format!("reading the offsets of {topic}/{}", partition.id())
                    })?;
                partitions.push((topic.clone(), partition.id(), low, high));
            }
        }
    }
    Ok(partitions)
}

/// Reads the assigned partitions up to their ends, in batches of decoded events.
pub(super) async fn feed_topics(
    consumer: StreamConsumer,
    decoder: EventDecoder,
    mut ends: HashMap<(String, i32), i64>,
    batch_size: usize,
    senders: Vec<mpsc::Sender<Vec<Item>>>,
    profile: Arc<Profile>,
) -> anyhow::Result<()> {
    const QUIET: Duration = Duration::from_secs(60);
    // Applier k takes the partitions p with p mod appliers = k, of every topic.
    let mut batches: Vec<Vec<Item>> = senders
        .iter()
        .map(|_| Vec::with_capacity(batch_size))
        .collect();
    let hand_over = async |batch: &mut Vec<Item>, sender: &mpsc::Sender<Vec<Item>>| {
        let waiting = Instant::now();
        let full = std::mem::replace(batch, Vec::with_capacity(batch_size));
        let open = sender.send(full).await.is_ok();
        profile.handover.add(waiting);
        open
    };
    // Every non-empty batch to its applier; `false` once the appliers are gone.
    let hand_over_all = async |batches: &mut [Vec<Item>]| {
        for (batch, sender) in batches.iter_mut().zip(&senders) {
            if !batch.is_empty() && !hand_over(batch, sender).await {
                return false;
            }
        }
        true
    };
    while !ends.is_empty() {
        let pending = batches.iter().any(|b| !b.is_empty());
        let wait = if pending {
            Duration::from_millis(2)
        } else {
            QUIET
        };
        let waiting = Instant::now();
        let received = tokio::time::timeout(wait, consumer.recv()).await;
        profile.read.add(waiting);
        let message = match received {
            Ok(message) => message.context("reading the topics")?,
            Err(_) if !pending => return Err(nothing_delivered(&ends, QUIET)),
            Err(_) => {
                // A pause in the stream: what is gathered goes now.
                if !hand_over_all(&mut batches).await {
                    return Ok(());
                }
                continue;
            }
        };
        if !before_end(&consumer, &mut ends, &message) {
            continue;
        }
        let applier = usize::try_from(message.partition()).unwrap_or(0) % senders.len();
        let decoding = Instant::now();
        let item = topic_item(&decoder, &message).await?;
        profile.decode.add(decoding);
        let batch = &mut batches[applier];
        batch.push(item);
        if batch.len() >= batch_size && !hand_over(batch, &senders[applier]).await {
            return Ok(());
        }
    }
    hand_over_all(&mut batches).await;
    Ok(())
}

/// Whether the record comes before its partition's end, so is to be replayed; with the last one,
/// the partition is done and paused (records beyond the end are skipped anyway; pausing saves
/// fetching them).
fn before_end(
    consumer: &StreamConsumer,
    ends: &mut HashMap<(String, i32), i64>,
    message: &BorrowedMessage<'_>,
) -> bool {
    let key = (message.topic().to_owned(), message.partition());
    let Some(&end) = ends.get(&key) else {
        return false;
    };
    if message.offset() >= end {
        return false;
    }
    if message.offset() + 1 >= end {
        ends.remove(&key);
        let mut done = TopicPartitionList::new();
        done.add_partition(&key.0, key.1);
        let _ = consumer.pause(&done);
    }
    true
}

/// The broker went quiet before every partition reached its end: which ones are left.
fn nothing_delivered(ends: &HashMap<(String, i32), i64>, quiet: Duration) -> anyhow::Error {
    let left: Vec<String> = ends
        .iter()
        .map(|((t, p), end)| format!("{t}/{p} (up to offset {end})"))
        .collect();
    anyhow::anyhow!(
        "the broker delivered nothing for {} s; still to read: {}",
        quiet.as_secs(),
        left.join(", ")
    )
}

/// A topic record as an event to replay; retries while the registry is unreachable.
pub(super) async fn topic_item(
    decoder: &EventDecoder,
    message: &BorrowedMessage<'_>,
) -> anyhow::Result<Item> {
    let event = match decoder
        .decode_waiting(message, Some(20), |e| {
            eprintln!("replay-tools: registry unavailable ({e}); retrying");
        })
        .await
    {
        Err(e) if e.is_retryable() => bail!("the schema registry stayed unavailable: {e}"),
        outcome => outcome.map_err(|e| e.to_string()),
    };
    let (mut header_names, mut header_values) = (Vec::new(), Vec::new());
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            header_names.push(header.key.to_owned());
            header_values.push(header.value.unwrap_or_default().to_vec());
        }
    }
    let meta = match &event {
        Ok(event) => Some(event.meta.clone()),
        Err(_) => EventMeta::from_headers(message.headers()).ok(),
    };
    Ok(Item {
        origin: Origin::Topic(RawRecord {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            header_names,
            header_values,
            timestamp_ms: message.timestamp().to_millis(),
        }),
        meta,
        event,
    })
}

/// The query a store pass runs, where it resumes, and whether its rows advance the rebuild's
/// position: in recorded order from a position (the main pass), each aggregate past what the
/// shadow applied (the sweep), or what the live model applied and the shadow has not (the
/// top-up before a swap).
fn store_sql(query: StoreQuery, schemas: &Schemas) -> (String, Option<StorePosition>, bool) {
    let Schemas { live, shadow, .. } = schemas;
    match query {
        StoreQuery::Recorded { after } => (
            format!(
                "SELECT {STORED_COLUMNS} FROM events e WHERE e.aggregate_type = ANY($1) \
                   AND ($2::timestamptz IS NULL OR e.recorded_at <= $2) \
                   AND ($3::timestamptz IS NULL \
                        OR (e.recorded_at, e.aggregate_type, e.aggregate_id, e.sequence) > ($3, $4, $5, $6)) \
                 ORDER BY e.recorded_at, e.aggregate_type, e.aggregate_id, e.sequence"
            ),
            after,
            true,
        ),
        StoreQuery::Sweep => (
            format!(
                "SELECT {STORED_COLUMNS} FROM events e \
                 LEFT JOIN {shadow}.applied a \
                   ON a.aggregate_type = e.aggregate_type AND a.aggregate_id = e.aggregate_id \
                 WHERE e.aggregate_type = ANY($1) \
                   AND ($2::timestamptz IS NULL OR e.recorded_at <= $2) \
                   AND e.sequence > coalesce(a.last_sequence, 0) \
                 ORDER BY e.aggregate_type, e.aggregate_id, e.sequence"
            ),
            None,
            false,
        ),
        StoreQuery::TopUp => (
            format!(
                "SELECT {STORED_COLUMNS} FROM {live}.applied l \
                 LEFT JOIN {shadow}.applied s \
                   ON s.aggregate_type = l.aggregate_type AND s.aggregate_id = l.aggregate_id \
                 JOIN events e ON e.aggregate_type = l.aggregate_type \
                   AND e.aggregate_id = l.aggregate_id \
                   AND e.sequence > coalesce(s.last_sequence, 0) \
                   AND e.sequence <= l.last_sequence \
                 WHERE coalesce(s.last_sequence, 0) < l.last_sequence \
                   AND e.aggregate_type = ANY($1) \
                   AND ($2::timestamptz IS NULL OR e.recorded_at <= $2) \
                 ORDER BY e.aggregate_type, e.aggregate_id, e.sequence"
            ),
            None,
            false,
        ),
    }
}

/// Streams events from the store, in batches.
#[allow(clippy::too_many_arguments)]
pub(super) async fn feed_store(
    pool: PgPool,
    query: StoreQuery,
    types: Vec<String>,
    as_of: Option<DateTime<Utc>>,
    schemas: Schemas,
    topics: Topics,
    batch_size: usize,
    sender: mpsc::Sender<Vec<Item>>,
    profile: Arc<Profile>,
) -> anyhow::Result<()> {
    let (sql, after, advances) = store_sql(query, &schemas);
    let mut connection = pool.acquire().await?;
    let mut query = sqlx::query_as::<_, StoredEvent>(&sql)
        .bind(&types)
        .bind(as_of);
    if advances {
        query = query
            .bind(after.as_ref().map(|a| a.0))
            .bind(after.as_ref().map(|a| a.1.clone()))
            .bind(after.as_ref().map(|a| a.2.clone()))
            .bind(after.as_ref().map(|a| a.3));
    }
    let mut rows = query.fetch(&mut *connection);
    let mut batch = Vec::with_capacity(batch_size);
    loop {
        let waiting = Instant::now();
        let Some(row) = rows.try_next().await? else {
            break;
        };
        profile.read.add(waiting);
        let decoding = Instant::now();
        batch.push(store_item(row, &topics, advances));
        profile.decode.add(decoding);
        if batch.len() >= batch_size {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
            let waiting = Instant::now();
            if sender.send(full).await.is_err() {
                return Ok(());
            }
            profile.handover.add(waiting);
        }
    }
    if !batch.is_empty() {
        let _ = sender.send(batch).await;
    }
    Ok(())
}
