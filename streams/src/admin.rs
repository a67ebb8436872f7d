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
    #[error("topic {topic} was created but the broker's metadata did not show it within 30 s")]
    NotVisible { topic: String },
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
    wait_until_visible(config, topics).await
}

/// Returns once the broker's metadata shows every one of `topics` with its partitions. Kafka
/// acknowledges a creation when the controller has recorded it, a moment before the brokers'
/// metadata shows it; a consumer that subscribes in between sees no such topic and gets no
/// partitions of it until its next metadata refresh, minutes later.
async fn wait_until_visible(config: &KafkaConfig, topics: &[String]) -> Result<(), AdminError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = config.client_config().create()?;
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for topic in &topics {
            loop {
                let visible = client
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .is_ok_and(|metadata| {
                        metadata.topics().iter().any(|t| {
                            t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                        })
                    });
                if visible {
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    return Err(AdminError::NotVisible {
                        topic: topic.clone(),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    })
    .await
    // Only a panic of the closure fails the join.
    .unwrap_or(Err(AdminError::Client(KafkaError::Canceled)))
}
