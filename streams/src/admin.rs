//! Creates the event topics through the Kafka admin API (never relies on auto-creation).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;

/// Why topics could not be created.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("kafka admin client: {0}")]
    Client(#[from] KafkaError),
    #[error("cannot create topic {topic}: {code}")]
    Create {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

/// Creates `topics` with the configured partitions and replication; existing topics are left
/// as they are. Event topics keep their history: they are created with `cleanup.policy=delete`
/// and unlimited retention, never compaction.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[String]) -> Result<(), AdminError> {
    let admin: AdminClient<DefaultClientContext> = config.client_config().create()?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                config.kafka_partitions,
                TopicReplication::Fixed(config.kafka_replication_factor),
            )
            .set("cleanup.policy", "delete")
            .set("retention.ms", "-1")
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(AdminError::Create { topic, code }),
        }
    }
    Ok(())
}
