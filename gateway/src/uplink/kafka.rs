//! Kafka uplink (rskafka, pure Rust, `acks=all`). Each record is keyed by its device id and goes
//! to the partition the Java client's default partitioner would pick ([`super::murmur2`]), so
//! one device's records stay in one partition, in order, and other producers using the same
//! key agree.
//!
//! A batch is split by topic and partition, keeping queue order within each; each partition
//! gets one produce request, and the requests of a batch run concurrently. A partition's records
//! are `Confirmed` when its produce succeeded. A connection or broker failure is an error for
//! the whole batch (the forwarder reconnects and re-sends; records of partitions that did
//! succeed become duplicates, which at-least-once allows).
//!
//! `tls = true` wraps every broker connection (bootstrap and advertised brokers alike) in rustls
//! with the `ring` provider, trusting the system's CA store plus `ca_file`; `sasl` authenticates
//! with PLAIN or SCRAM-SHA-256/512 (rskafka's SASL, pure Rust). The password comes from the
//! config or from the environment variable it names, at each connect, and is never logged.
//!
//! Limits of rskafka 0.6 that show here: no idempotent producer (a lost response means a
//! duplicate), and headers are a map, so of several MQTT 5 user properties with the same name
//! only the last is sent.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures_util::future::join_all;
use rskafka::chrono::{DateTime, Utc};
use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use rskafka::record::Record as KafkaRecord;
use rskafka::BackoffConfig;

use super::murmur2::partition_for_key;
use super::{Outcome, Prepared, SendFailure, UplinkError};
use crate::config::{kafka_topic_byte, KafkaCompression, KafkaConfig, KafkaSasl, SaslMechanism};

/// Kafka's error code for an unknown topic, used as the "reply code" of a dead letter.
const UNKNOWN_TOPIC_OR_PARTITION: u16 = 3;
/// Kafka's error code for an invalid topic name.
const INVALID_TOPIC: u16 = 17;

/// A connected Kafka uplink.
pub struct KafkaUplink {
    name: String,
    gateway_id: String,
    client: Client,
    compression: Compression,
    confirm_timeout: Duration,
    /// `(partitions, replication_factor)` when the uplink creates missing topics.
    create: Option<(i32, i16)>,
    /// Partition clients per topic, index = partition id. Topics that did not exist are not
    /// remembered, so a topic created later by an operator is found.
    topics: HashMap<String, Vec<PartitionClient>>,
}

/// Broker refusals that re-sending the same records will not cure (the forwarder retries them
/// `max_retries` times, then dead-letters them).
fn is_permanent(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::ServerError {
            protocol_error: ProtocolError::MessageTooLarge
                | ProtocolError::RecordListTooLarge
                | ProtocolError::InvalidRecord
                | ProtocolError::CorruptMessage
                | ProtocolError::PolicyViolation
                | ProtocolError::InvalidTopicException,
            ..
        }
    )
}

impl KafkaUplink {
    pub async fn connect(cfg: &KafkaConfig, gateway_id: &str) -> Result<KafkaUplink, UplinkError> {
        let err = |why: String| UplinkError::Connect {
            uplink: cfg.name.clone(),
            why,
        };
        // Invariant: every rskafka call gives up within `confirm_timeout` (without a deadline it
        // retries forever); reconnecting with our own backoff is the forwarder's job.
        let backoff = BackoffConfig {
            init_backoff: cfg.backoff_min,
            max_backoff: cfg.backoff_max,
            base: 2.0,
            deadline: Some(cfg.confirm_timeout),
        };
        let mut builder = ClientBuilder::new(cfg.bootstrap.clone())
            .client_id(gateway_id)
            .backoff_config(backoff);
        if cfg.tls {
            builder =
                builder.tls_config(crate::tls::client_config(cfg.ca_file.as_deref()).map_err(err)?);
        }
        if let Some(sasl) = &cfg.sasl {
            builder = builder.sasl_config(sasl_config(sasl).map_err(err)?);
        }
        let build = builder.build();
        let client = match tokio::time::timeout(cfg.confirm_timeout, build).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(err(e.to_string())),
            Err(_) => {
                return Err(err(format!(
                    "no answer from {} within {:?}",
                    cfg.bootstrap.join(","),
                    cfg.confirm_timeout
                )))
            }
        };
        Ok(KafkaUplink {
            name: cfg.name.clone(),
            gateway_id: gateway_id.to_string(),
            client,
            compression: match cfg.compression {
                KafkaCompression::None => Compression::NoCompression,
                KafkaCompression::Gzip => Compression::Gzip,
            },
            confirm_timeout: cfg.confirm_timeout,
            create: cfg
                .create_topics
                .then_some((cfg.partitions, cfg.replication_factor)),
            topics: HashMap::new(),
        })
    }

    fn lost(&self, why: String) -> UplinkError {
        UplinkError::Lost {
            uplink: self.name.clone(),
            why,
        }
    }

    /// The partition count of `topic` (opening its partition clients on first use), creating the
    /// topic if configured to. `Ok(None)`: the topic does not exist and is not to be created.
    async fn partitions(&mut self, topic: &str) -> Result<Option<usize>, UplinkError> {
        if let Some(p) = self.topics.get(topic) {
            return Ok(Some(p.len()));
        }
        let mut count = self.partition_count(topic).await?;
        if count.is_none() {
            let Some((partitions, replication)) = self.create else {
                return Ok(None);
            };
            let timeout_ms = i32::try_from(self.confirm_timeout.as_millis()).unwrap_or(i32::MAX);
            let controller = self
                .client
                .controller_client()
                .map_err(|e| self.lost(e.to_string()))?;
            match controller
                .create_topic(topic, partitions, replication, timeout_ms)
                .await
            {
                Ok(()) => {
                    tracing::info!(uplink = %self.name, topic, partitions, replication, "created Kafka topic");
                }
                // Someone else created it meanwhile: use it.
                Err(KafkaError::ServerError {
                    protocol_error: ProtocolError::TopicAlreadyExists,
                    ..
                }) => {}
                Err(e) => return Err(self.lost(format!("create topic {topic}: {e}"))),
            }
            count = self.partition_count(topic).await?;
        }
        let Some(count) = count else {
            return Err(self.lost(format!(
                "topic {topic} was created but is not in the metadata"
            )));
        };
        let mut clients = Vec::with_capacity(count);
        for p in 0..count {
            let p = i32::try_from(p).map_err(|_| self.lost("too many partitions".into()))?;
            let c = self
                .client
                .partition_client(topic, p, UnknownTopicHandling::Retry)
                .await
                .map_err(|e| self.lost(format!("partition {topic}/{p}: {e}")))?;
            clients.push(c);
        }
        self.topics.insert(topic.to_string(), clients);
        Ok(Some(count))
    }

    /// The number of partitions of `topic` from fresh metadata; `None` if it does not exist.
    async fn partition_count(&self, topic: &str) -> Result<Option<usize>, UplinkError> {
        let topics = self
            .client
            .list_topics()
            .await
            .map_err(|e| self.lost(format!("metadata: {e}")))?;
        Ok(topics
            .into_iter()
            .find(|t| t.name == topic)
            .map(|t| t.partitions.len())
            .filter(|&n| n > 0))
    }

    fn record(&self, m: &Prepared) -> KafkaRecord {
        let r = &m.record;
        let mut headers = BTreeMap::new();
        // MQTT 5 user properties first, so the gateway's own headers win on a name clash.
        for (k, v) in &r.user_properties {
            headers.insert(k.clone(), v.clone().into_bytes());
        }
        headers.insert("device_id".into(), r.device_id.clone().into_bytes());
        headers.insert("mqtt_topic".into(), r.topic.clone().into_bytes());
        headers.insert("mqtt_qos".into(), r.qos.to_string().into_bytes());
        headers.insert("gateway_seq".into(), r.seq.to_string().into_bytes());
        headers.insert(
            "message_id".into(),
            format!("{}-{}", self.gateway_id, r.seq).into_bytes(),
        );
        if let Some(ct) = &m.content_type {
            headers.insert("content_type".into(), ct.clone().into_bytes());
        }
        let timestamp = i64::try_from(r.received_at_us)
            .ok()
            .and_then(DateTime::<Utc>::from_timestamp_micros)
            .unwrap_or_default();
        KafkaRecord {
            key: Some(m.key.clone().into_bytes()),
            value: Some(m.payload.clone()),
            headers,
            timestamp,
        }
    }

    /// Produces the batch (one request per partition, in queue order within each) and waits
    /// for every partition's acks=all answer within the confirm timeout.
    /// Produces the batch, one request per partition, concurrently. On a failure, the records
    /// of partitions that were confirmed all the same are reported in
    /// [`SendFailure::confirmed_beyond`], so they are not sent twice.
    pub async fn send(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, SendFailure> {
        let timeout = self.confirm_timeout;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        let error = match tokio::time::timeout(timeout, self.send_inner(batch, &mut outcomes)).await
        {
            Ok(Ok(())) => match outcomes.iter().cloned().collect::<Option<Vec<_>>>() {
                Some(all) => return Ok(all),
                None => self.lost("a record was not produced".into()),
            },
            Ok(Err(e)) => e,
            Err(_) => UplinkError::Stalled {
                uplink: self.name.clone(),
                secs: timeout.as_secs(),
            },
        };
        let prefix = outcomes.iter().take_while(|o| o.is_some()).count();
        Err(SendFailure {
            settled: outcomes[..prefix].iter().flatten().cloned().collect(),
            confirmed_beyond: (prefix..batch.len())
                .filter(|&i| matches!(outcomes[i], Some(Outcome::Confirmed)))
                .collect(),
            error,
        })
    }

    async fn send_inner(
        &mut self,
        batch: &[Prepared],
        out: &mut [Option<Outcome>],
    ) -> Result<(), UplinkError> {
        let mut counts: HashMap<&str, Option<usize>> = HashMap::new();
        for m in batch {
            let topic = m.destination.as_str();
            if valid_topic(topic) && !counts.contains_key(topic) {
                counts.insert(topic, self.partitions(topic).await?);
            }
        }
        let Plan { groups, outcomes } = plan(batch, &counts);
        let this = &*self;
        let produces = groups.iter().filter_map(|(&(topic, p), idx)| {
            let client = this.topics.get(topic)?.get(p)?;
            let records = idx.iter().map(|&i| this.record(&batch[i])).collect();
            let compression = this.compression;
            Some(async move { (idx, client.produce(records, compression).await) })
        });
        let mut failure = None;
        for (i, o) in outcomes.into_iter().enumerate() {
            if o.is_some() {
                out[i] = o;
            }
        }
        for (idx, result) in join_all(produces).await {
            let outcome = match result {
                Ok(_) => Outcome::Confirmed,
                Err(e) if is_permanent(&e) => {
                    tracing::warn!(uplink = %self.name, error = %e, "Kafka refused records");
                    Outcome::Nacked
                }
                Err(e) => {
                    failure.get_or_insert(e.to_string());
                    continue;
                }
            };
            for &i in idx {
                out[i] = Some(outcome.clone());
            }
        }
        if let Some(why) = failure {
            // Cached leaders may be stale: the reconnect starts from fresh metadata.
            return Err(self.lost(format!("produce: {why}")));
        }
        Ok(())
    }

    pub async fn close(self) {
        // rskafka has no explicit close; dropping the client closes its connections.
        drop(self);
    }
}

/// rskafka's SASL config; the password is read now (from the config or its variable).
fn sasl_config(sasl: &KafkaSasl) -> Result<SaslConfig, String> {
    let credentials = Credentials::new(sasl.username.clone(), sasl.password()?);
    Ok(match sasl.mechanism {
        SaslMechanism::Plain => SaslConfig::Plain(credentials),
        SaslMechanism::ScramSha256 => SaslConfig::ScramSha256(credentials),
        SaslMechanism::ScramSha512 => SaslConfig::ScramSha512(credentials),
    })
}

/// Whether Kafka accepts `topic` as a topic name.
fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= 249 && topic.bytes().all(kafka_topic_byte)
}

/// What to produce where: record indices per `(topic, partition)`, and the outcomes already
/// decided (records whose topic is invalid or missing).
struct Plan<'a> {
    /// Invariant: each group's indices are in batch (= queue) order.
    groups: BTreeMap<(&'a str, usize), Vec<usize>>,
    outcomes: Vec<Option<Outcome>>,
}

/// Splits `batch` by topic and key partition, given each valid topic's partition count
/// (`None`: the topic does not exist). No I/O.
fn plan<'a>(batch: &'a [Prepared], counts: &HashMap<&str, Option<usize>>) -> Plan<'a> {
    let mut p = Plan {
        groups: BTreeMap::new(),
        outcomes: vec![None; batch.len()],
    };
    for (i, m) in batch.iter().enumerate() {
        let topic = m.destination.as_str();
        let count = if valid_topic(topic) {
            counts.get(topic).copied().flatten()
        } else {
            p.outcomes[i] = Some(Outcome::Returned {
                code: INVALID_TOPIC,
                text: format!("invalid Kafka topic name {topic:?}"),
            });
            continue;
        };
        match count {
            Some(n) if n > 0 => {
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                let partition = partition_for_key(m.key.as_bytes(), n) as usize;
                p.groups.entry((topic, partition)).or_default().push(i);
            }
            _ => {
                p.outcomes[i] = Some(Outcome::Returned {
                    code: UNKNOWN_TOPIC_OR_PARTITION,
                    text: format!("topic {topic} does not exist (create_topics = false)"),
                })
            }
        }
    }
    p
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::queue::Record;

    fn prepared(seq: u64, topic: &str, device: &str) -> Prepared {
        Prepared {
            record: Record {
                seq,
                received_at_us: 0,
                device_id: device.into(),
                username: None,
                topic: "t".into(),
                qos: 1,
                retain: false,
                user_properties: vec![],
                content_type: None,
                payload_format: None,
                payload: vec![],
            },
            destination: topic.into(),
            key: device.into(),
            payload: vec![],
            content_type: None,
        }
    }

    #[test]
    fn plan_groups_by_key_partition_in_batch_order_and_returns_bad_topics() {
        let devices = ["dev-a", "dev-b", "dev-c", "dev-d"];
        let mut batch: Vec<Prepared> = (0..20)
            .map(|i| prepared(i, "good", devices[i as usize % 4]))
            .collect();
        batch.push(prepared(20, "missing", "dev-a"));
        batch.push(prepared(21, "bad/name", "dev-a"));
        let counts = HashMap::from([("good", Some(3)), ("missing", None)]);
        let p = plan(&batch, &counts);

        let mut planned = 0;
        for ((topic, partition), idx) in &p.groups {
            assert_eq!(*topic, "good");
            assert!(idx.windows(2).all(|w| w[0] < w[1]), "queue order kept");
            for &i in idx {
                let want = partition_for_key(batch[i].key.as_bytes(), 3) as usize;
                assert_eq!(*partition, want);
                assert!(p.outcomes[i].is_none());
            }
            planned += idx.len();
        }
        assert_eq!(planned, 20);
        assert!(matches!(
            &p.outcomes[20],
            Some(Outcome::Returned { code: UNKNOWN_TOPIC_OR_PARTITION, text }) if text.contains("missing")
        ));
        assert!(matches!(
            &p.outcomes[21],
            Some(Outcome::Returned {
                code: INVALID_TOPIC,
                ..
            })
        ));
    }
}
