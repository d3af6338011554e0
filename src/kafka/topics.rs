//! Creates the gateway's own reply topic (PROTOCOL 6.1) when it is missing.
//!
//! Runs on the consumer's thread before it subscribes: Kafka may be
//! unreachable when the gateway starts, and the gateway must come up and
//! store requests anyway, so creation is retried there until it succeeds.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("cannot create a Kafka admin client: {0}")]
    Client(KafkaError),
    #[error("creating topic {topic} failed: {source}")]
    Create { topic: String, source: KafkaError },
    #[error("Kafka refused to create topic {topic}: {code}")]
    Refused {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

/// What [`ensure`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Ensured {
    Created,
    Existed,
}

/// Creates `topic` with `partitions` unless it exists. The replication
/// factor is the broker's default (`-1`, KIP-464): a hub cannot know how
/// many brokers the cluster has.
pub fn ensure(cfg: &KafkaConfig, topic: &str, partitions: i32) -> Result<Ensured, TopicError> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &cfg.brokers);
    // TLS, SASL and the like apply to the admin client too; client-specific
    // settings it does not know are ignored by librdkafka with a warning.
    for (k, v) in &cfg.properties {
        config.set(k, v);
    }
    let admin: AdminClient<DefaultClientContext> = config.create().map_err(TopicError::Client)?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
    let options = AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(10)))
        .operation_timeout(Some(Duration::from_secs(10)));
    let results = smol::block_on(admin.create_topics([&new], &options)).map_err(|source| {
        TopicError::Create {
            topic: topic.to_owned(),
            source,
        }
    })?;
    match results.into_iter().next() {
        Some(Ok(_)) | None => Ok(Ensured::Created),
        Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(Ensured::Existed),
        Some(Err((_, code))) => Err(TopicError::Refused {
            topic: topic.to_owned(),
            code,
        }),
    }
}
