//! Verifying the topic copy: every record links into its aggregate's chain and is the stored event in its published form.

use super::*;

/// Every record of some topics, from the beginning to the end each partition had when the scan
/// started (records appended meanwhile are left for the next run).
pub(crate) struct TopicScan {
    consumer: StreamConsumer,
    /// Partitions not read to their end yet, with that end (the high watermark at the start).
    ends: HashMap<(String, i32), i64>,
    /// Partitions whose oldest records were removed by retention (their low watermark > 0).
    trimmed: HashSet<(String, i32)>,
    /// Records to read.
    pub(crate) total: u64,
}

impl std::fmt::Debug for TopicScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicScan")
            .field("ends", &self.ends)
            .finish_non_exhaustive()
    }
}

impl TopicScan {
    pub(crate) fn open(kafka: &KafkaConfig, topics: &[String]) -> anyhow::Result<Self> {
        let consumer: StreamConsumer = kafka
            .client_config()
            .set("group.id", format!("replay-tools-scan-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "fetch.wait.max.ms",
                kafka.kafka_fetch_wait_max_ms.to_string(),
            )
            .create()
            .context("creating a Kafka consumer (KAFKA_BOOTSTRAP_SERVERS)")?;
        let timeout = Duration::from_secs(15);
        let mut assignment = TopicPartitionList::new();
        let mut ends = HashMap::new();
        let mut trimmed = HashSet::new();
        let mut total = 0_u64;
        tokio::task::block_in_place(|| -> anyhow::Result<()> {
            for topic in topics {
                let metadata = consumer
                    .fetch_metadata(Some(topic), timeout)
                    .with_context(|| format!("reading the metadata of topic {topic}"))?;
                let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
                    bail!("topic {topic} does not exist");
                };
                if found.error().is_some() || found.partitions().is_empty() {
                    bail!("topic {topic} does not exist or has no partitions");
                }
                for partition in found.partitions() {
                    let (low, high) = consumer
                        .fetch_watermarks(topic, partition.id(), timeout)
                        .with_context(|| {
                            format!("reading the end of {topic}/{}", partition.id())
                        })?;
                    if low > 0 {
                        trimmed.insert((topic.clone(), partition.id()));
                    }
                    if high > low {
                        assignment.add_partition_offset(
                            topic,
                            partition.id(),
                            Offset::Beginning,
                        )?;
                        ends.insert((topic.clone(), partition.id()), high);
                        total += u64::try_from(high - low).unwrap_or(0);
                    }
                }
            }
            Ok(())
        })?;
        consumer.assign(&assignment)?;
        Ok(Self {
            consumer,
            ends,
            trimmed,
            total,
        })
    }

    /// Whether a partition lost its oldest records to retention.
    pub(crate) fn is_trimmed(&self, topic: &str, partition: i32) -> bool {
        self.trimmed.contains(&(topic.to_owned(), partition))
    }

    /// The next record, or `None` once every partition was read to its end.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<OwnedMessage>> {
        loop {
            if self.ends.is_empty() {
                return Ok(None);
            }
            let message = tokio::time::timeout(Duration::from_secs(60), self.consumer.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "no record for 60 s while partitions were not read to their end: {:?}",
                        self.ends.keys().collect::<Vec<_>>()
                    )
                })?
                .context("reading a topic")?;
            let key = (message.topic().to_owned(), message.partition());
            let Some(&end) = self.ends.get(&key) else {
                continue; // appended after the scan started
            };
            if message.offset() + 1 >= end {
                self.ends.remove(&key);
            }
            if message.offset() >= end {
                continue;
            }
            return Ok(Some(message.detach()));
        }
    }
}

/// The value of a header, as text.
pub(crate) fn header<'a>(message: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// An aggregate's records seen so far in the copy.
#[derive(Debug)]
pub(super) struct CopiedChain {
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) first: i64,
    pub(super) hashes: Vec<Hash>,
}

/// Checks the chain of the topic copy, and each record against the event store.
pub async fn verify_topics(
    pool: &PgPool,
    kafka: &KafkaConfig,
    registry: &RegistryConfig,
    cancel: &CancellationToken,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let topics = kafka.topics();
    let mut scan = TopicScan::open(kafka, &topics.all())?;
    let mut verifier = TopicVerifier {
        topics,
        decoder: EventDecoder::new(registry).context("schema registry (SCHEMA_REGISTRY_URL)")?,
        contracts: schemas::Contracts::global()?,
        findings: Findings::default(),
        chains: HashMap::new(),
    };
    let bar = progress::bar("verify topics", Some(scan.total));
    let mut records = 0_u64;
    let mut interrupted = false;
    loop {
        let batch = next_batch(&mut scan, 1000).await?;
        if batch.is_empty() {
            break;
        }
        let metas: Vec<Option<EventMeta>> = batch
            .iter()
            .map(|m| EventMeta::from_headers(m.headers()).ok())
            .collect();
        let stored = stored_events(pool, &metas).await?;
        let stored: HashMap<(&str, &str, i64), &ChainedEvent> = stored
            .iter()
            .map(|e| {
                let key = (
                    e.aggregate_type.as_str(),
                    e.aggregate_id.as_str(),
                    e.sequence,
                );
                (key, e)
            })
            .collect();
        for (message, meta) in batch.iter().zip(&metas) {
            records += 1;
            let trimmed = scan.is_trimmed(message.topic(), message.partition());
            verifier
                .record(message, meta.as_ref(), &stored, trimmed)
                .await?;
        }
        bar.set_position(records);
        if cancel.is_cancelled() {
            interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    let TopicVerifier {
        findings, chains, ..
    } = verifier;
    findings.write(out)?;
    writeln!(
        out,
        "summary: verified {records} records of {} aggregates on the topics against the event store; {} findings",
        chains.len(),
        findings.len()
    )?;
    if interrupted {
        bail!("interrupted: only {records} records were verified");
    }
    if !findings.is_empty() {
        bail!("verify found {} problems in the topic copy", findings.len());
    }
    Ok(())
}

/// Up to `size` next records of the scan.
pub(crate) async fn next_batch(
    scan: &mut TopicScan,
    size: usize,
) -> anyhow::Result<Vec<OwnedMessage>> {
    let mut batch = Vec::with_capacity(size);
    while batch.len() < size {
        match scan.next().await? {
            Some(message) => batch.push(message),
            None => break,
        }
    }
    Ok(batch)
}

/// The stored events a batch of records claim to be, in one query.
async fn stored_events(
    pool: &PgPool,
    metas: &[Option<EventMeta>],
) -> anyhow::Result<Vec<ChainedEvent>> {
    let (mut types, mut ids, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
    for meta in metas.iter().flatten() {
        types.push(meta.aggregate_type.as_str());
        ids.push(meta.aggregate_id.as_str());
        seqs.push(i64::try_from(meta.sequence).unwrap_or(i64::MAX));
    }
    sqlx::query_as(&format!(
        "SELECT {} FROM unnest($1::text[], $2::text[], $3::bigint[]) AS k(t, i, s) \
         JOIN events e ON e.aggregate_type = k.t AND e.aggregate_id = k.i AND e.sequence = k.s",
        STORED_COLUMNS
            .split(", ")
            .map(|c| format!("e.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .bind(&types)
    .bind(&ids)
    .bind(&seqs)
    .fetch_all(pool)
    .await
    .context("reading the stored events of a batch of records")
}

/// Verifies records of the topic copy one by one, against the store and the chain of the
/// records of the same aggregate seen before.
struct TopicVerifier {
    topics: streams::Topics,
    decoder: EventDecoder,
    contracts: &'static schemas::Contracts,
    findings: Findings,
    chains: HashMap<(String, String), CopiedChain>,
}

impl TopicVerifier {
    async fn record(
        &mut self,
        message: &OwnedMessage,
        meta: Option<&EventMeta>,
        stored: &HashMap<(&str, &str, i64), &ChainedEvent>,
        trimmed: bool,
    ) -> anyhow::Result<()> {
        let location = format!(
            "{}/{}@{}",
            message.topic(),
            message.partition(),
            message.offset()
        );
        let Some(meta) = meta else {
            self.findings.at(
                "record",
                &location,
                None,
                "unreadable",
                "its identity headers are missing or malformed",
            );
            return Ok(());
        };
        let sequence = i64::try_from(meta.sequence).unwrap_or(i64::MAX);
        let (t, i) = (meta.aggregate_type.as_str(), meta.aggregate_id.as_str());
        self.check_routing(message, meta, &location);
        let chain = match (
            header(message, CHAIN_PREV).and_then(|h| parse_hash(h).ok()),
            header(message, CHAIN_HASH).and_then(|h| parse_hash(h).ok()),
        ) {
            (Some(p), Some(h)) => Some((p, h)),
            _ => {
                self.findings.event(
                    t,
                    i,
                    sequence,
                    "unchained",
                    format!("{location}: no valid {CHAIN_PREV}/{CHAIN_HASH} headers"),
                );
                None
            }
        };
        if let Some((prev, hash)) = chain {
            check_copy_link(
                &mut self.chains,
                &mut self.findings,
                (message, &location, trimmed),
                (t, i, sequence),
                prev,
                hash,
            );
        }
        let Some(row) = stored.get(&(t, i, sequence)) else {
            self.findings.event(
                t,
                i,
                sequence,
                "not-in-store",
                format!("{location}: the event store has no such event"),
            );
            return Ok(());
        };
        if let Some(chain) = chain {
            self.check_chain_headers(meta, row, chain, &location);
        }
        self.check_content(message, meta, row, &location).await
    }

    /// A record is keyed by its aggregate id, on its aggregate type's topic.
    fn check_routing(&mut self, message: &OwnedMessage, meta: &EventMeta, location: &str) {
        let sequence = i64::try_from(meta.sequence).unwrap_or(i64::MAX);
        let (t, i) = (meta.aggregate_type.as_str(), meta.aggregate_id.as_str());
        if message.key() != Some(meta.aggregate_id.as_bytes()) {
            self.findings.event(
                t,
                i,
                sequence,
                "misrouted",
                format!("{location}: its key is not its aggregate id"),
            );
        }
        if self.topics.for_aggregate(t).as_deref() != Some(message.topic()) {
            self.findings.event(
                t,
                i,
                sequence,
                "misrouted",
                format!("{location}: not the topic of aggregate type {t}"),
            );
        }
    }

    /// The chain headers are the store's chain at this sequence, and the identity headers hash
    /// to them.
    fn check_chain_headers(
        &mut self,
        meta: &EventMeta,
        row: &ChainedEvent,
        (prev, hash): (Hash, Hash),
        location: &str,
    ) {
        let sequence = i64::try_from(meta.sequence).unwrap_or(i64::MAX);
        let (t, i) = (meta.aggregate_type.as_str(), meta.aggregate_id.as_str());
        if row.chain_prev.as_deref() != Some(&prev[..])
            || row.chain_hash.as_deref() != Some(&hash[..])
        {
            self.findings.event(
                t,
                i,
                sequence,
                "differs-from-store",
                format!("{location}: its chain headers are not the store's chain at this sequence"),
            );
        }
        let recorded_at = DateTime::parse_from_rfc3339(&meta.recorded_at)
            .map(|d| d.timestamp_micros())
            .unwrap_or(i64::MIN);
        let from_headers = EventContent {
            aggregate_type: t,
            aggregate_id: i,
            sequence,
            event_type: &meta.event_type,
            event_version: &row.event_version,
            payload: &row.payload,
            metadata: &row.metadata,
            event_id: meta.event_id,
            recorded_at_micros: recorded_at,
        };
        if from_headers.chain_hash(&prev) != hash {
            self.findings.event(t, i, sequence, "headers-altered", format!("{location}: its identity headers (aggregate, sequence, event type, event id, recorded_at) do not hash to its chain hash"));
        }
    }

    /// The body and metadata headers are what the relay sends for the stored event.
    async fn check_content(
        &mut self,
        message: &OwnedMessage,
        meta: &EventMeta,
        row: &ChainedEvent,
        location: &str,
    ) -> anyhow::Result<()> {
        let sequence = i64::try_from(meta.sequence).unwrap_or(i64::MAX);
        let (t, i) = (meta.aggregate_type.as_str(), meta.aggregate_id.as_str());
        match self.decoder.decode(message).await {
            Ok(decoded) => match relayed_form(self.contracts, row) {
                Ok((published, body)) => {
                    if decoded.payload().ok().as_ref() != Some(&body)
                        || decoded.contract.event_type != row.event_type
                    {
                        self.findings.event(
                            t,
                            i,
                            sequence,
                            "content-differs",
                            format!("{location}: its body is not the stored event's payload"),
                        );
                    }
                    if metadata_differs(&decoded.meta, &published.meta) {
                        self.findings.event(t, i, sequence, "metadata-differs", format!("{location}: its metadata headers are not the stored event's metadata"));
                    }
                }
                Err(e) => self.findings.event(
                    t,
                    i,
                    sequence,
                    "content-differs",
                    format!(
                        "{location}: the stored event cannot be mapped as the relay sends it: {e}"
                    ),
                ),
            },
            Err(e) if e.is_retryable() => {
                return Err(anyhow::anyhow!("schema registry unavailable: {e}"));
            }
            Err(e) => {
                self.findings
                    .event(t, i, sequence, "undecodable", format!("{location}: {e}"))
            }
        }
        Ok(())
    }
}

/// Checks one record's chain headers against the records of its aggregate seen before it.
pub(super) fn check_copy_link(
    chains: &mut HashMap<(String, String), CopiedChain>,
    findings: &mut Findings,
    (message, location, trimmed): (&OwnedMessage, &str, bool),
    (t, i, sequence): (&str, &str, i64),
    prev: Hash,
    hash: Hash,
) {
    let key = (t.to_owned(), i.to_owned());
    let Some(chain) = chains.get_mut(&key) else {
        if prev != GENESIS && !trimmed {
            findings.event(t, i, sequence, "unlinked", format!("{location}: the copy starts this aggregate at #{sequence}, chained to an event it does not hold"));
        }
        chains.insert(
            key,
            CopiedChain {
                topic: message.topic().to_owned(),
                partition: message.partition(),
                first: sequence,
                hashes: vec![hash],
            },
        );
        return;
    };
    if chain.topic != message.topic() || chain.partition != message.partition() {
        findings.event(
            t,
            i,
            sequence,
            "misrouted",
            format!(
                "{location}: its aggregate's earlier records are on {}/{}",
                chain.topic, chain.partition
            ),
        );
    }
    let last = chain.first + i64::try_from(chain.hashes.len()).unwrap_or(i64::MAX) - 1;
    if sequence == last + 1 {
        if chain.hashes.last() != Some(&prev) {
            findings.event(
                t,
                i,
                sequence,
                "unlinked",
                format!(
                    "{location}: its {CHAIN_PREV} is not the chain hash of #{last} in the copy"
                ),
            );
        }
        chain.hashes.push(hash);
    } else if sequence >= chain.first && sequence <= last {
        let index = usize::try_from(sequence - chain.first).unwrap_or(usize::MAX);
        if chain.hashes.get(index) != Some(&hash) {
            findings.event(
                t,
                i,
                sequence,
                "conflict",
                format!("{location}: a second record of #{sequence} with another chain hash"),
            );
        }
    } else if sequence < chain.first {
        findings.event(
            t,
            i,
            sequence,
            "reordered",
            format!("{location}: arrives after #{}", chain.first),
        );
    } else {
        findings.event(
            t,
            i,
            sequence,
            "deleted",
            format!("{location}: the copy skips from #{last} to #{sequence}"),
        );
        chain.first = sequence;
        chain.hashes = vec![hash];
    }
}

/// The stored event as the relay sends it ([`Published`]), and its body through the Avro mapping.
pub(super) fn relayed_form(
    contracts: &schemas::Contracts,
    row: &ChainedEvent,
) -> anyhow::Result<(Published, Json)> {
    let published = Published::of(commands::log::StoredEvent {
        aggregate_type: row.aggregate_type.clone(),
        aggregate_id: row.aggregate_id.clone(),
        sequence: row.sequence,
        event_type: row.event_type.clone(),
        event_version: row.event_version.clone(),
        payload: serde_json::from_str(&row.payload)?,
        metadata: serde_json::from_str(&row.metadata).unwrap_or(Json::Null),
        event_id: row.event_id,
        recorded_at: row.recorded_at,
    });
    let (contract, avro) = contracts.payload_to_avro(&row.aggregate_type, &published.payload)?;
    let body = contract.from_avro_as_is(&avro)?;
    Ok((published, body))
}

/// Whether a record's metadata headers differ from the published form's (its identity, checked
/// through the hash chain, aside).
pub(super) fn metadata_differs(meta: &EventMeta, published: &EventMeta) -> bool {
    meta.event_id != published.event_id
        || meta.event_type != published.event_type
        || meta.event_version != published.event_version
        || meta.occurred_at != published.occurred_at
        || meta.correlation_id != published.correlation_id
        || meta.causation_id != published.causation_id
        || meta.actor != published.actor
        || meta.command_id != published.command_id
        || meta.recorded_at != published.recorded_at
        || meta.traceparent != published.traceparent
}
