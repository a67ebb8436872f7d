//! Dead letters: records that could not be applied, kept with their error and re-driven on request.

use std::time::Duration;

use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Timestamp};
use sqlx::{Postgres, Transaction};

use super::projector::DeadLetter;
use super::*;
use crate::EventMeta;

/// A dead letter's record, as stored.
#[derive(sqlx::FromRow)]
pub(super) struct StoredRecord {
    id: i64,
    topic: String,
    partition: i32,
    offset: i64,
    record_key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    header_names: Vec<String>,
    header_values: Vec<Vec<u8>>,
    timestamp_ms: Option<i64>,
}

impl StoredRecord {
    fn into_message(self) -> OwnedMessage {
        let mut headers = OwnedHeaders::new();
        for (key, value) in self.header_names.iter().zip(&self.header_values) {
            headers = headers.insert(Header {
                key: key.as_str(),
                value: Some(value.as_slice()),
            });
        }
        OwnedMessage::new(
            self.payload,
            self.record_key,
            self.topic,
            self.timestamp_ms
                .map_or(Timestamp::NotAvailable, Timestamp::CreateTime),
            self.partition,
            self.offset,
            Some(headers),
        )
    }
}

impl Projector {
    pub(super) async fn record_dead_letter(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        letter: &DeadLetter<'_>,
    ) -> Result<(), ProjectionError> {
        let message = letter.message;
        tracing::error!(topic = message.topic(), partition = message.partition(), offset = message.offset(), error = %letter.error, "dead-lettering a record");
        metrics::counter!("projector_dead_letters_total", "projection" => self.schema).increment(1);
        let (mut names, mut values) = (Vec::new(), Vec::new());
        if let Some(headers) = message.headers() {
            for header in headers.iter() {
                names.push(header.key.to_owned());
                values.push(header.value.unwrap_or_default().to_vec());
            }
        }
        let event_id = EventMeta::from_headers(message.headers())
            .ok()
            .map(|m| m.event_id.to_string());
        let (aggregate_type, aggregate_id, sequence) = match &letter.identity {
            Some((t, i, s)) => (Some(t.as_str()), Some(i.as_str()), Some(*s)),
            None => (None, None, None),
        };
        sqlx::query(&format!(
            "INSERT INTO {}.dead_letters (topic, partition, \"offset\", event_id, aggregate_type, \
               aggregate_id, sequence, event_type, error, record_key, payload, header_names, \
               header_values, timestamp_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
             ON CONFLICT (topic, partition, \"offset\") DO NOTHING",
            self.schema
        ))
        .bind(message.topic())
        .bind(message.partition())
        .bind(message.offset())
        .bind(event_id)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(sequence)
        .bind(&letter.event_type)
        .bind(&letter.error)
        .bind(message.key())
        .bind(message.payload())
        .bind(&names)
        .bind(&values)
        .bind(message.timestamp().to_millis())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Copies a dead-lettered record to the dead-letter topic, with where it came from and why.
    pub(super) async fn publish_dead_letter(
        &self,
        letter: &DeadLetter<'_>,
    ) -> Result<(), ProjectionError> {
        let message = letter.message;
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for header in original.iter() {
                headers = headers.insert(header);
            }
        }
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        for (key, value) in [
            ("dead-letter-projection", self.schema),
            ("dead-letter-topic", message.topic()),
            ("dead-letter-partition", partition.as_str()),
            ("dead-letter-offset", offset.as_str()),
            ("dead-letter-error", letter.error.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.dead_letter_topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        let producer = self
            .producer
            .get_or_try_init(|| async { self.producer_config.create::<FutureProducer>() })
            .await
            .map_err(|e| ProjectionError::event(format!("dead-letter producer: {e}")))?;
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| ProjectionError::event(format!("dead-letter topic: {e}")))?;
        Ok(())
    }

    /// Applies the dead letters an operator asked to re-drive (API or CLI), each once: the dead
    /// letter's row, locked in the same transaction, moves to `redriven` with the read-model
    /// change, or back to `dead` with the new error.
    pub(super) async fn redrive_requested(&self) -> Result<(), ProjectorError> {
        let schema = self.schema;
        // One statement when nothing is requested (every second, idle or not); the
        // transaction below only when something is.
        let requested: bool = sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM {schema}.dead_letters WHERE status = 'redrive_requested')"
        ))
        .fetch_one(&self.pool)
        .await?;
        if !requested {
            return Ok(());
        }
        loop {
            let mut tx = self.pool.begin().await?;
            use_schema(&mut tx, schema).await?;
            let row: Option<StoredRecord> = sqlx::query_as(&format!(
                "SELECT id, topic, partition, \"offset\", record_key, payload, header_names, \
                        header_values, timestamp_ms \
                 FROM {schema}.dead_letters WHERE status = 'redrive_requested' \
                 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
            ))
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                return Ok(());
            };
            let id = row.id;
            let outcome = match self.decoder.decode(&row.into_message()).await {
                Err(e) if e.is_retryable() => return Err(e.into()),
                Err(e) => Err(e.to_string()),
                Ok(event) => self
                    .projection
                    .apply_batch(&mut tx, &[FirstDelivery { event: &event }])
                    .await
                    .map_err(|e| e.to_string()),
            };
            match outcome {
                Ok(()) => {
                    sqlx::query(&format!(
                        "UPDATE {schema}.dead_letters SET status = 'redriven', resolved_at = clock_timestamp() \
                         WHERE id = $1"
                    ))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    metrics::counter!("projector_redriven_total", "projection" => schema)
                        .increment(1);
                    tracing::info!(id, "dead letter re-driven");
                }
                Err(error) => {
                    tx.rollback().await?;
                    tracing::warn!(id, %error, "re-drive failed; the record stays dead");
                    sqlx::query(&format!(
                        "UPDATE {schema}.dead_letters SET status = 'dead', attempts = attempts + 1, \
                           error = $2, redrive_requested_at = NULL, failed_at = clock_timestamp() \
                         WHERE id = $1 AND status = 'redrive_requested'"
                    ))
                    .bind(id)
                    .bind(error)
                    .execute(&self.pool)
                    .await?;
                }
            }
        }
    }
}
