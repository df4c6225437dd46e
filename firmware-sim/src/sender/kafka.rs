//! The Kafka side of `firmware-sim command` (rskafka): records keyed by device id, produced in
//! send order, a batch of at most `window` records per produce request (acks=all).
//!
//! rskafka has no partitioner: a device's partition is `fnv1a(device id) % partitions`, which is
//! stable, so one device's commands share a partition and keep their order there. A missing topic
//! is created with one partition.

use std::collections::BTreeMap;
use std::time::Duration;

use rskafka::chrono::DateTime;
use rskafka::client::partition::{Compression, UnknownTopicHandling};
use rskafka::client::ClientBuilder;
use rskafka::record::Record;
use rskafka::BackoffConfig;

use super::{Outcome, Pace, Planned, SendConfig, SendError};
use crate::verify::kafka::parse_brokers;

/// The Kafka headers of one command, as the gateway's Kafka downlink reads them.
pub(super) fn headers(p: &Planned) -> BTreeMap<String, Vec<u8>> {
    let mut h = BTreeMap::new();
    h.insert("mqtt_topic".into(), p.topic.clone().into_bytes());
    h.insert("message_id".into(), p.id.clone().into_bytes());
    h.insert("mqtt_correlation_data".into(), p.id.clone().into_bytes());
    h.insert(
        "mqtt_response_topic".into(),
        p.reply_topic.clone().into_bytes(),
    );
    h.insert("content_type".into(), b"application/json".to_vec());
    h
}

/// Which of `partitions` a device's commands go to.
pub(super) fn partition_of(device: &str, partitions: usize) -> usize {
    (crate::device::fnv1a(device.as_bytes()) % partitions.max(1) as u64) as usize
}

/// Sends `plan` in order; returns one outcome per planned command.
pub(super) async fn send(
    brokers: &str,
    topic: &str,
    cfg: &SendConfig,
    plan: &[Planned],
    pace: &mut Pace,
    target: &str,
) -> Result<Vec<Outcome>, SendError> {
    let err = |operation: &'static str| {
        move |error: rskafka::client::error::Error| SendError::Kafka {
            operation,
            target: target.to_owned(),
            error: Box::new(error),
        }
    };
    let brokers = parse_brokers(brokers).map_err(|_| SendError::KafkaBrokers(brokers.into()))?;
    // Invariant: every rskafka call gives up by the confirm timeout (it retries for ever
    // without a deadline).
    let backoff = BackoffConfig {
        init_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(1),
        base: 2.0,
        deadline: Some(cfg.confirm_timeout),
    };
    let client = ClientBuilder::new(brokers)
        .client_id(format!("firmware-sim-command-{}", std::process::id()))
        .backoff_config(backoff)
        .build()
        .await
        .map_err(err("connect"))?;
    let topics = client.list_topics().await.map_err(err("metadata"))?;
    let mut partitions: Vec<i32> = match topics.into_iter().find(|t| t.name == topic) {
        Some(t) if !t.partitions.is_empty() => t.partitions.into_iter().collect(),
        _ => {
            client
                .controller_client()
                .map_err(err("controller"))?
                .create_topic(topic, 1, 1, 5_000)
                .await
                .map_err(err("create topic"))?;
            vec![0]
        }
    };
    partitions.sort_unstable();
    let mut clients = Vec::with_capacity(partitions.len());
    for &p in &partitions {
        clients.push(
            client
                .partition_client(topic, p, UnknownTopicHandling::Retry)
                .await
                .map_err(err("open partition"))?,
        );
    }

    let mut outcomes = vec![Outcome::Unsent; plan.len()];
    let mut start = 0;
    while start < plan.len() {
        let end = (start + cfg.window).min(plan.len());
        // Per partition, the indices of this chunk in send order.
        let mut batches: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, p) in plan.iter().enumerate().take(end).skip(start) {
            pace.next().await;
            batches
                .entry(partition_of(&p.device, clients.len()))
                .or_default()
                .push(i);
        }
        let mut failed = false;
        for (part, indices) in batches {
            let now_ms = crate::verify::now_us() as i64 / 1000;
            let records = indices
                .iter()
                .map(|&i| Record {
                    key: Some(plan[i].device.clone().into_bytes()),
                    value: Some(plan[i].payload.clone()),
                    headers: headers(&plan[i]),
                    timestamp: DateTime::from_timestamp_millis(now_ms).unwrap_or_default(),
                })
                .collect();
            let produced = tokio::time::timeout(
                cfg.confirm_timeout,
                clients[part].produce(records, Compression::NoCompression),
            )
            .await;
            let outcome = match produced {
                Ok(Ok(_offsets)) => Outcome::Confirmed,
                Ok(Err(e)) => Outcome::Failed(format!("produce to partition {part}: {e}")),
                Err(_) => Outcome::Failed(format!(
                    "no produce response within {:?}",
                    cfg.confirm_timeout
                )),
            };
            failed |= outcome != Outcome::Confirmed;
            for i in indices {
                outcomes[i] = outcome.clone();
            }
        }
        if failed {
            tracing::warn!("a produce failed; stopping");
            break;
        }
        start = end;
    }
    Ok(outcomes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sender::Target;

    #[test]
    fn records_carry_the_contract_headers_and_a_stable_partition() {
        let mut c = SendConfig::new(Target::Kafka {
            brokers: "127.0.0.1:9092".into(),
            topic: "commands".into(),
        });
        c.devices = 1;
        c.count = 1;
        let p = &c.plan()[0];
        let h = headers(p);
        assert_eq!(h["mqtt_topic"], b"devices/dev-00001/commands/ping");
        assert_eq!(h["message_id"], b"dev-00001:0");
        assert_eq!(h["mqtt_correlation_data"], b"dev-00001:0");
        assert_eq!(h["mqtt_response_topic"], b"devices/dev-00001/replies");
        assert_eq!(partition_of("dev-00001", 1), 0);
        assert_eq!(partition_of("dev-00001", 8), partition_of("dev-00001", 8));
        assert!(partition_of("dev-00002", 8) < 8);
    }
}
