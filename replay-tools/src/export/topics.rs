//! Reading the event topics from the beginning to the high watermarks seen at the start.

use super::*;

/// Reads the event topics from the beginning to the high watermarks seen at the start.
pub(super) struct TopicReader {
    pub(super) consumer: StreamConsumer,
    pub(super) decoder: streams::EventDecoder,
    /// Per (topic, partition): the offset after the last record to read.
    pub(super) ends: HashMap<(String, i32), i64>,
    pub(super) total: u64,
    pub(super) filter: Filter,
    pub(super) batch_size: usize,
    pub(super) skip_undecodable: bool,
}

pub(super) const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);

impl TopicReader {
    pub(super) async fn connect(
        kafka: &streams::KafkaConfig,
        registry: &streams::RegistryConfig,
        filter: Filter,
        contracts: &Contracts,
        batch_size: usize,
        skip_undecodable: bool,
    ) -> anyhow::Result<Self> {
        let topic_names = kafka.topics();
        let topics: Vec<String> = filter
            .aggregate_types(contracts)
            .into_iter()
            .filter_map(|a| topic_names.for_aggregate(a))
            .collect();
        let consumer: StreamConsumer = kafka
            .client_config()
            .set(
                "group.id",
                format!("replay-tools-export-{}", Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "fetch.wait.max.ms",
                kafka.kafka_fetch_wait_max_ms.to_string(),
            )
            .create()
            .context("creating the Kafka consumer (KAFKA_*)")?;
        let decoder = streams::EventDecoder::new(registry)
            .map_err(|e| anyhow!("schema registry (SCHEMA_REGISTRY_*): {e}"))?;
        // The broker calls below block: keep them off the runtime's worker threads.
        let (consumer, ends, total) = tokio::task::spawn_blocking(move || {
            let mut ends = HashMap::new();
            let mut total = 0u64;
            let mut assignment = TopicPartitionList::new();
            for topic in &topics {
                let metadata = consumer
                    .fetch_metadata(Some(topic.as_str()), KAFKA_TIMEOUT)
                    .with_context(|| format!("reading the metadata of topic {topic}"))?;
                let partitions = metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .filter(|t| t.error().is_none())
                    .map(|t| t.partitions().len())
                    .unwrap_or(0);
                if partitions == 0 {
                    bail!(
                        "topic {topic} does not exist on the broker (KAFKA_BOOTSTRAP_SERVERS, \
                         KAFKA_TOPIC_PREFIX)"
                    );
                }
                for partition in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
                    let (low, high) = consumer
                        .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)
                        .with_context(|| format!("reading the offsets of {topic}/{partition}"))?;
                    if high > low {
                        total += u64::try_from(high - low).unwrap_or(0);
                        ends.insert((topic.clone(), partition), high);
                        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
                    }
                }
            }
            if !ends.is_empty() {
                consumer.assign(&assignment)?;
            }
            Ok((consumer, ends, total))
        })
        .await??;
        Ok(Self {
            consumer,
            decoder,
            ends,
            total,
            filter,
            batch_size,
            skip_undecodable,
        })
    }

    pub(super) async fn run(
        self: Box<Self>,
        sender: mpsc::Sender<anyhow::Result<Chunk>>,
        stop: CancellationToken,
    ) {
        let total = self.total;
        if sender.send(Ok(Chunk::Total(total))).await.is_err() {
            return;
        }
        if let Err(e) = (*self).read(&sender, &stop).await {
            let _ = sender.send(Err(e.context("reading the topics"))).await;
        }
    }

    pub(super) async fn read(
        mut self,
        sender: &mpsc::Sender<anyhow::Result<Chunk>>,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        // Per aggregate, the last sequence exported: a record sent twice is exported once.
        let mut last_sequence: HashMap<(String, String), u64> = HashMap::new();
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut read = 0u64;
        while !self.ends.is_empty() && !stop.is_cancelled() {
            let message =
                match tokio::time::timeout(Duration::from_secs(2), self.consumer.recv()).await {
                    Ok(message) => message.context("consuming")?,
                    Err(_) => {
                        // Nothing for a while: a partition may end with offsets that hold no record.
                        self.drop_finished_partitions()?;
                        if !batch.is_empty() {
                            let rows = std::mem::take(&mut batch);
                            if sender.send(Ok(Chunk::Rows { rows, read })).await.is_err() {
                                return Ok(());
                            }
                            read = 0;
                        }
                        continue;
                    }
                };
            if !before_end(&mut self.ends, &message) {
                continue;
            }
            read += 1;
            match self.decode(&message).await {
                Ok(Some(row)) => {
                    let aggregate = (row.aggregate_type.clone(), row.aggregate_id.clone());
                    let sequence = u64::try_from(row.sequence).unwrap_or(0);
                    if sequence > last_sequence.get(&aggregate).copied().unwrap_or(0) {
                        last_sequence.insert(aggregate, sequence);
                        batch.push(row);
                    }
                }
                Ok(None) => {}
                Err(e) if self.skip_undecodable => {
                    let what = format!(
                        "{}/{}@{}: {e:#}",
                        message.topic(),
                        message.partition(),
                        message.offset()
                    );
                    if sender.send(Ok(Chunk::Skipped(what))).await.is_err() {
                        return Ok(());
                    }
                }
                Err(e) => {
                    // What came before it is written; the file then ends there.
                    let rows = std::mem::take(&mut batch);
                    let _ = sender.send(Ok(Chunk::Rows { rows, read })).await;
                    return Err(e.context(format!(
                        "record {}/{}@{} cannot be decoded (--skip-undecodable skips such \
                         records)",
                        message.topic(),
                        message.partition(),
                        message.offset()
                    )));
                }
            }
            // Filtered-out records move the progress bar too.
            let batch_rows = self.batch_size as u64;
            if batch.len() >= self.batch_size
                || read >= batch_rows.saturating_mul(10)
                || self.ends.is_empty()
            {
                let rows = std::mem::replace(&mut batch, Vec::with_capacity(self.batch_size));
                if sender.send(Ok(Chunk::Rows { rows, read })).await.is_err() {
                    return Ok(());
                }
                read = 0;
            }
        }
        if !batch.is_empty() || read > 0 {
            let _ = sender.send(Ok(Chunk::Rows { rows: batch, read })).await;
        }
        Ok(())
    }

    /// Forgets the partitions whose position reached the end.
    pub(super) fn drop_finished_partitions(&mut self) -> anyhow::Result<()> {
        let positions = self.consumer.position()?;
        for element in positions.elements() {
            let key = (element.topic().to_owned(), element.partition());
            if let (Some(&end), Offset::Offset(position)) = (self.ends.get(&key), element.offset())
            {
                if position >= end {
                    self.ends.remove(&key);
                }
            }
        }
        Ok(())
    }

    /// The row of a record, or `None` if the filter leaves it out (checked on the headers,
    /// before the payload is decoded).
    pub(super) async fn decode(&self, message: &impl Message) -> anyhow::Result<Option<ExportRow>> {
        let meta = streams::EventMeta::from_headers(message.headers())?;
        let recorded_at = parse_instant(&meta.recorded_at)
            .map_err(|e| anyhow!("header recorded_at `{}`: {e}", meta.recorded_at))?;
        if !self.filter.passes(&meta, recorded_at) {
            return Ok(None);
        }
        let decoded = self
            .decoder
            .decode_waiting(message, Some(4), |_| {})
            .await?;
        let optional = |s: String| (!s.is_empty()).then_some(s);
        let payload = decoded.payload()?;
        let meta = decoded.meta;
        Ok(Some(ExportRow {
            event_id: meta.event_id,
            sequence: i64::try_from(meta.sequence)?,
            event_type: decoded.contract.event_type.to_owned(),
            event_version: decoded.contract.event_version.to_owned(),
            occurred_at: parse_instant(&meta.occurred_at).ok(),
            recorded_at,
            correlation_id: optional(meta.correlation_id),
            causation_id: optional(meta.causation_id),
            actor: optional(meta.actor),
            command_id: optional(meta.command_id),
            aggregate_type: meta.aggregate_type,
            aggregate_id: meta.aggregate_id,
            payload,
            payload_as_stored: false,
        }))
    }
}

/// Whether `message` comes before its partition's end at the start (the export's window); the
/// partition is done with once its last record in the window is read.
fn before_end(ends: &mut HashMap<(String, i32), i64>, message: &impl Message) -> bool {
    let key = (message.topic().to_owned(), message.partition());
    let Some(&end) = ends.get(&key) else {
        return false;
    };
    if message.offset() + 1 >= end {
        ends.remove(&key);
    }
    message.offset() < end
}
