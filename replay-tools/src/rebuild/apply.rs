//! Reading the history (from the topics or the store) and applying it to the shadow, once per
//! event, with dead letters for what cannot be applied.

use super::*;

impl Rebuild {
    /// Reads every partition of the read model's topics from the shadow's checkpoint to its
    /// end offset now. `false` if interrupted.
    pub(super) async fn read_topics(
        &self,
        connections: &Connections,
        interrupted: &CancellationToken,
        tally: &mut Tally,
    ) -> anyhow::Result<bool> {
        let topic_names: Vec<String> = self
            .projection
            .aggregate_types()
            .iter()
            .filter_map(|a| connections.kafka.topics().for_aggregate(a))
            .collect();
        let group = format!("{}{}-rebuild", connections.group_prefix, self.schemas.live);
        let probe: BaseConsumer = connections
            .kafka
            .client_config()
            .set("group.id", &group)
            .create()
            .context("creating the Kafka consumer")?;
        let names = topic_names.clone();
        let partitions = tokio::task::spawn_blocking(move || watermarks(&probe, &names))
            .await
            .context("reading the topics' offsets")??;
        let checkpoints: HashMap<(String, i32), i64> =
            sqlx::query_as::<_, (String, i32, i64)>(&format!(
                "SELECT topic, partition, next_offset FROM {}.checkpoints",
                self.schemas.shadow
            ))
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|(t, p, o)| ((t, p), o))
            .collect();
        let mut ends = HashMap::new();
        let mut assignment = TopicPartitionList::new();
        let mut total = 0u64;
        for (topic, partition, low, high) in partitions {
            let from = checkpoints.get(&(topic.clone(), partition)).copied();
            if from.unwrap_or(0) < low {
                bail!(
                    "{topic} partition {partition} now begins at offset {low} (older records \
                     were deleted by retention), before which the rebuild has not read: \
                     rebuild from the event store (--source store --restart)"
                );
            }
            let from = from.unwrap_or(low);
            if from < high {
                assignment
                    .add_partition_offset(&topic, partition, Offset::Offset(from))
                    .context("assigning a partition")?;
                total += u64::try_from(high - from).unwrap_or(0);
                ends.insert((topic, partition), high);
            }
        }
        let bar = progress::bar("rebuild", Some(total));
        if ends.is_empty() {
            bar.finish_and_clear();
            return Ok(true);
        }
        let consumer: StreamConsumer = bulk_consumer_config(&connections.kafka, &group)
            .create()
            .context("creating the Kafka consumer")?;
        consumer.assign(&assignment)?;
        let decoder = EventDecoder::new(&connections.registry)?;
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..self.appliers).map(|_| mpsc::channel(2)).unzip();
        let feeder = tokio::spawn(feed_topics(
            consumer,
            decoder,
            ends,
            self.batch_size,
            senders,
            self.profile.clone(),
        ));
        let completed = self.drain_all(receivers, &bar, interrupted, tally).await;
        finish(feeder, completed, &bar).await
    }

    /// One applier per receiver, side by side, each in its own transactions; `false` when
    /// interrupted (each finishes the batch in hand).
    pub(super) async fn drain_all(
        &self,
        receivers: Vec<mpsc::Receiver<Vec<Item>>>,
        bar: &ProgressBar,
        interrupted: &CancellationToken,
        tally: &mut Tally,
    ) -> anyhow::Result<bool> {
        let appliers = receivers.into_iter().map(|receiver| async move {
            let mut own = Tally::default();
            let completed = self.drain(receiver, bar, interrupted, &mut own).await?;
            Ok::<_, anyhow::Error>((completed, own))
        });
        let mut completed = true;
        for (done, own) in futures::future::try_join_all(appliers).await? {
            completed &= done;
            tally.add(&own);
        }
        Ok(completed)
    }

    /// Reads the event store in recorded order from the shadow's position, then sweeps up the
    /// events committed late. `false` if interrupted.
    pub(super) async fn read_store(
        &self,
        state: &State,
        interrupted: &CancellationToken,
        tally: &mut Tally,
    ) -> anyhow::Result<bool> {
        let after = match (
            state.store_recorded_at,
            &state.store_aggregate_type,
            &state.store_aggregate_id,
            state.store_sequence,
        ) {
            (Some(r), Some(t), Some(i), Some(s)) => Some((r, t.clone(), i.clone(), s)),
            _ => None,
        };
        let types = self.aggregate_types();
        let total: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events e WHERE e.aggregate_type = ANY($1) \
               AND ($2::timestamptz IS NULL OR e.recorded_at <= $2) \
               AND ($3::timestamptz IS NULL \
                    OR (e.recorded_at, e.aggregate_type, e.aggregate_id, e.sequence) > ($3, $4, $5, $6))",
        )
        .bind(&types)
        .bind(self.as_of)
        .bind(after.as_ref().map(|a| a.0))
        .bind(after.as_ref().map(|a| a.1.clone()))
        .bind(after.as_ref().map(|a| a.2.clone()))
        .bind(after.as_ref().map(|a| a.3))
        .fetch_one(&self.pool)
        .await?;
        let bar = progress::bar("rebuild", Some(u64::try_from(total).unwrap_or(0)));
        if !self
            .store_pass(StoreQuery::Recorded { after }, &bar, interrupted, tally)
            .await?
        {
            return Ok(false);
        }
        let bar = progress::bar("late commits", None);
        self.store_pass(StoreQuery::Sweep, &bar, interrupted, tally)
            .await
    }

    pub(super) fn aggregate_types(&self) -> Vec<String> {
        self.projection
            .aggregate_types()
            .iter()
            .map(|a| (*a).to_owned())
            .collect()
    }

    pub(super) async fn store_pass(
        &self,
        query: StoreQuery,
        bar: &ProgressBar,
        interrupted: &CancellationToken,
        tally: &mut Tally,
    ) -> anyhow::Result<bool> {
        let (sender, receiver) = mpsc::channel(2);
        let feeder = tokio::spawn(feed_store(
            self.pool.clone(),
            query,
            self.aggregate_types(),
            self.as_of,
            self.schemas.clone(),
            self.topics.clone(),
            self.batch_size,
            sender,
            self.profile.clone(),
        ));
        let completed = self.drain(receiver, bar, interrupted, tally).await;
        finish(feeder, completed, bar).await
    }

    /// Applies batches as they come; `false` when interrupted (the batch in hand is applied).
    pub(super) async fn drain(
        &self,
        mut receiver: mpsc::Receiver<Vec<Item>>,
        bar: &ProgressBar,
        interrupted: &CancellationToken,
        tally: &mut Tally,
    ) -> anyhow::Result<bool> {
        loop {
            let waiting = Instant::now();
            let batch = tokio::select! {
                biased;
                () = interrupted.cancelled() => return Ok(false),
                batch = receiver.recv() => batch,
            };
            self.profile.starved.add(waiting);
            let Some(batch) = batch else {
                return Ok(true);
            };
            self.apply(&batch, tally).await?;
            bar.inc(batch.len() as u64);
        }
    }

    /// Applies a batch as the projector does ([`apply_isolating`]): the whole batch, retried;
    /// then event by event, an event that keeps failing dead-lettered. Appliers side by side may
    /// meet on shared rows: that contention is retried without counting against the batch.
    pub(super) async fn apply(&self, items: &[Item], tally: &mut Tally) -> anyhow::Result<()> {
        let applied = apply_isolating(
            items.len(),
            self.attempts,
            is_contention,
            |range, refuse| async move { self.apply_once(&items[range], refuse.as_deref()).await },
        )
        .await?;
        for done in &applied {
            tally.add(done);
        }
        Ok(())
    }

    /// One transaction in the shadow: dedup, handlers, dead letters,
    /// position. With `refuse`, the (single) event is dead-lettered with that error.
    pub(super) async fn apply_once(
        &self,
        items: &[Item],
        refuse: Option<&str>,
    ) -> Result<Tally, ProjectionError> {
        let shadow = &self.schemas.shadow;
        let mut done = Tally {
            read: items.len() as u64,
            ..Tally::default()
        };
        let phase = Instant::now();
        let mut tx = self.enter().await?;
        self.profile.enter.add(phase);
        let phase = Instant::now();
        let (replayed, of_item, mut dead) = self.replayable(items, refuse, &mut done);
        let verdicts = apply_replayed(self.projection.as_ref(), shadow, &mut tx, &replayed).await?;
        self.profile.handlers.add(phase);
        let phase = Instant::now();
        for ((verdict, item), replayed) in verdicts.iter().zip(&of_item).zip(&replayed) {
            match verdict {
                ReplayVerdict::Applied => done.applied += 1,
                ReplayVerdict::Duplicate => done.duplicates += 1,
                ReplayVerdict::Gap => done.gaps += 1,
                ReplayVerdict::Refused => {
                    let error = replayed.event.err().unwrap_or_default().to_owned();
                    dead.push((*item, error));
                }
            }
        }
        for (item, error) in &dead {
            self.record_dead_letter(&mut tx, item, error).await?;
            done.dead += 1;
        }
        self.record_position(&mut tx, items, done.applied).await?;
        self.profile.bookkeeping.add(phase);
        let phase = Instant::now();
        tx.commit().await?;
        self.profile.commit.add(phase);
        self.profile.transactions.fetch_add(1, Ordering::Relaxed);
        Ok(done)
    }

    /// The items to replay, in order (each with its item), and those dead-lettered outright
    /// (no readable headers); items recorded after the as-of instant are counted and left.
    fn replayable<'i>(
        &self,
        items: &'i [Item],
        refuse: Option<&'i str>,
        done: &mut Tally,
    ) -> (
        Vec<ReplayedEvent<'i>>,
        Vec<&'i Item>,
        Vec<(&'i Item, String)>,
    ) {
        let mut replayed = Vec::with_capacity(items.len());
        let mut of_item = Vec::with_capacity(items.len());
        let mut dead: Vec<(&Item, String)> = Vec::new();
        for item in items {
            if let (Some(as_of), Some(recorded_at)) = (self.as_of, item.recorded_at()) {
                if recorded_at > as_of {
                    done.later += 1;
                    continue;
                }
            }
            let Some(meta) = &item.meta else {
                // Not ours to order (no readable headers): dead-lettered, as the projector does.
                let error = match (&item.event, refuse) {
                    (_, Some(e)) => e.to_owned(),
                    (Err(e), None) => e.clone(),
                    (Ok(_), None) => "record without event headers".to_owned(),
                };
                dead.push((item, error));
                continue;
            };
            replayed.push(ReplayedEvent {
                aggregate_type: &meta.aggregate_type,
                aggregate_id: &meta.aggregate_id,
                sequence: i64::try_from(meta.sequence).unwrap_or(i64::MAX),
                event: match (refuse, &item.event) {
                    (Some(e), _) => Err(e),
                    (None, Err(e)) => Err(e.as_str()),
                    (None, Ok(event)) => Ok(event),
                },
            });
            of_item.push(item);
        }
        (replayed, of_item, dead)
    }

    /// Where the rebuild stands after a batch (per partition for the topics, in recorded
    /// order for the store), and how many events it applied, in the batch's transaction.
    async fn record_position(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        items: &[Item],
        applied: u64,
    ) -> Result<(), ProjectionError> {
        let shadow = &self.schemas.shadow;
        let mut checkpoints: HashMap<(&str, i32), (i64, Option<&str>)> = HashMap::new();
        let mut position = None;
        for item in items {
            match &item.origin {
                Origin::Topic(record) => {
                    let entry = checkpoints
                        .entry((record.topic.as_str(), record.partition))
                        .or_insert((0, None));
                    entry.0 = entry.0.max(record.offset + 1);
                    if let Some(meta) = &item.meta {
                        entry.1 = Some(meta.recorded_at.as_str());
                    }
                }
                Origin::Store {
                    recorded_at,
                    advances: true,
                } => position = Some((recorded_at, item.meta.as_ref())),
                Origin::Store { .. } => {}
            }
        }
        let checkpoints = checkpoints
            .into_iter()
            .map(|((topic, partition), (next, recorded))| (topic, partition, next, recorded));
        streams::consumer::store_checkpoints(tx, shadow, checkpoints).await?;
        if let Some((recorded_at, Some(meta))) = position {
            sqlx::query(&format!(
                "UPDATE {shadow}.rebuild_state SET store_recorded_at = $1, store_aggregate_type = $2, \
                   store_aggregate_id = $3, store_sequence = $4"
            ))
            .bind(recorded_at)
            .bind(&meta.aggregate_type)
            .bind(&meta.aggregate_id)
            .bind(i64::try_from(meta.sequence).unwrap_or(i64::MAX))
            .execute(&mut **tx)
            .await?;
        }
        sqlx::query(&format!(
            "UPDATE {shadow}.rebuild_state SET applied = applied + $1"
        ))
        .bind(i64::try_from(applied).unwrap_or(i64::MAX))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// A dead letter in the shadow, as the projector records one. An event from the store has
    /// no record: partition -1 and a negative offset numbered by the rebuild.
    pub(super) async fn record_dead_letter(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        item: &Item,
        error: &str,
    ) -> Result<(), ProjectionError> {
        let shadow = &self.schemas.shadow;
        let meta = item.meta.as_ref();
        let (topic, partition, offset, key, payload, names, values, timestamp_ms) =
            match &item.origin {
                Origin::Topic(r) => (
                    r.topic.clone(),
                    r.partition,
                    r.offset,
                    r.key.clone(),
                    r.payload.clone(),
                    r.header_names.clone(),
                    r.header_values.clone(),
                    r.timestamp_ms,
                ),
                Origin::Store { .. } => {
                    let number: i64 = sqlx::query_scalar(&format!(
                    "UPDATE {shadow}.rebuild_state SET store_dead_letters = store_dead_letters + 1 \
                         RETURNING store_dead_letters"
                ))
                    .fetch_one(&mut **tx)
                    .await?;
                    let topic = meta
                        .and_then(|m| self.topics.for_aggregate(&m.aggregate_type))
                        .unwrap_or_default();
                    (topic, -1, -number, None, None, vec![], vec![], None)
                }
            };
        sqlx::query(&format!(
            "INSERT INTO {shadow}.dead_letters (topic, partition, \"offset\", event_id, aggregate_type, \
               aggregate_id, sequence, event_type, error, record_key, payload, header_names, \
               header_values, timestamp_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
             ON CONFLICT (topic, partition, \"offset\") DO NOTHING"
        ))
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .bind(meta.map(|m| m.event_id.to_string()))
        .bind(meta.map(|m| m.aggregate_type.as_str()))
        .bind(meta.map(|m| m.aggregate_id.as_str()))
        .bind(meta.map(|m| i64::try_from(m.sequence).unwrap_or(i64::MAX)))
        .bind(meta.map(|m| m.event_type.as_str()))
        .bind(error)
        .bind(key)
        .bind(payload)
        .bind(names)
        .bind(values)
        .bind(timestamp_ms)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// A deadlock or a serialization failure: the transaction lost a race and is worth running
/// again as it is.
pub(super) fn is_contention(error: &ProjectionError) -> bool {
    matches!(
        error,
        ProjectionError::Database(sqlx::Error::Database(e))
            if matches!(e.code().as_deref(), Some("40P01" | "40001"))
    )
}
