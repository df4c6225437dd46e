//! Kafka uplink (rskafka, pure Rust, `acks=all`). Each record is keyed by its device id and goes
//! to the partition the Java client's default partitioner would pick ([`super::murmur2`]), so
//! one device's records stay in one partition, in order, and other producers using the same
//! key agree.
//!
//! Records are queued per topic and partition, in queue order. Each partition has at most ONE
//! produce request in flight (up to `max_batch` records and about `max_batch_bytes`, under the
//! broker's `message.max.bytes`, which refuses a larger batch whole); what comes meanwhile waits and goes
//! in the next request as soon as that one is answered. Requests start when the forwarder asks
//! for answers ([`KafkaUplink::next`]), so the records it sent together share a request. rskafka has no idempotent producer, so
//! this is what keeps a device's order: a retry of an earlier request can never land after a
//! later request of the same partition, because there is none. Different partitions pipeline
//! freely (their requests run concurrently). A partition's records are `Confirmed` when its
//! produce succeeded. After a connection or broker failure nothing new is started; the requests
//! still in flight are allowed to finish (each within the confirm timeout, rskafka's deadline),
//! their answers are reported, and only then the failure, so the forwarder re-sends from its
//! cursor only once nothing older can still land.
//!
//! `tls = true` wraps every broker connection (bootstrap and advertised brokers alike) in rustls
//! with the `ring` provider, trusting the system's CA store plus `ca_file`; `sasl` authenticates
//! with PLAIN or SCRAM-SHA-256/512 (rskafka's SASL, pure Rust). The password comes from the
//! config or from the environment variable it names, at each connect, and is never logged.
//!
//! Limits of rskafka 0.6 that show here: no idempotent producer (a lost response means a
//! duplicate), and headers are a map, so of several MQTT 5 user properties with the same name
//! only the last is sent.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rskafka::chrono::{DateTime, Utc};
use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use rskafka::record::Record as KafkaRecord;
use rskafka::BackoffConfig;
use tokio::task::JoinSet;

use super::murmur2::partition_for_key;
use super::{Outcome, Prepared, UplinkError};
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
    topics: HashMap<String, Vec<Arc<PartitionClient>>>,
    /// Records per produce request, at most.
    max_batch: usize,
    /// Bytes per produce request, about ([`record_size`]); one record at least.
    max_batch_bytes: usize,
    /// Per (topic, partition): records waiting for the request in flight, and whether there is
    /// one. Invariant: at most one request per partition is in flight.
    lanes: HashMap<(String, usize), Lane>,
    /// Lanes with records waiting and no request in flight: `next` starts their requests.
    idle: Vec<(String, usize)>,
    /// The requests in flight, one per busy lane. Tasks of their own, so a request goes out
    /// and its answer is read while the forwarder is busy elsewhere (rskafka writes a request
    /// only while its future is polled); dropping the set aborts them.
    running: JoinSet<Produced>,
    /// Answers decided without a request (bad or missing topic), and those of finished
    /// requests, not yet returned by `next`.
    ready: VecDeque<(u64, Outcome)>,
    /// The first failure: nothing new is started; reported once `running` is empty.
    error: Option<UplinkError>,
}

/// The records of one partition waiting for its request in flight.
#[derive(Default)]
struct Lane {
    /// Seq, record, its size ([`record_size`]).
    waiting: VecDeque<(u64, KafkaRecord, usize)>,
    busy: bool,
}

/// A finished produce request: its lane, the seqs it carried, the result.
type Produced = ((String, usize), Vec<u64>, Result<(), KafkaError>);

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
        let client = client(
            &ClientOptions {
                bootstrap: &cfg.bootstrap,
                tls: cfg.tls,
                ca_file: cfg.ca_file.as_deref(),
                sasl: cfg.sasl.as_ref(),
                backoff_min: cfg.backoff_min,
                backoff_max: cfg.backoff_max,
                timeout: cfg.confirm_timeout,
            },
            gateway_id,
        )
        .await
        .map_err(err)?;
        let mut uplink = KafkaUplink {
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
            max_batch: cfg.max_batch.max(1),
            max_batch_bytes: cfg.max_batch_bytes,
            lanes: HashMap::new(),
            idle: Vec::new(),
            running: JoinSet::new(),
            ready: VecDeque::new(),
            error: None,
        };
        // A fixed topic's partitions are looked up now, so a connected uplink produces at once
        // (on a long link the lookups are several round trips) and a metadata failure is a
        // connect error. A missing topic is not: its records go to the dead letters (or it is
        // created) when they come. A templated topic is looked up at its first record.
        if !cfg.topic.contains('{') {
            uplink
                .partitions(&cfg.topic)
                .await
                .map_err(|e| err(e.to_string()))?;
        }
        Ok(uplink)
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
            clients.push(Arc::new(c));
        }
        self.topics.insert(topic.to_string(), clients);
        Ok(Some(count))
    }

    /// The number of partitions of `topic` from fresh metadata; `None` if it does not exist.
    async fn partition_count(&mut self, topic: &str) -> Result<Option<usize>, UplinkError> {
        let topics = match self.client.list_topics().await {
            Ok(t) => t,
            Err(e) => return Err(self.lost(format!("metadata: {e}"))),
        };
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
        if let Some(cd) = &r.correlation_data {
            headers.insert("mqtt_correlation_data".into(), cd.clone());
        }
        if let Some(rt) = &r.response_topic {
            headers.insert("mqtt_response_topic".into(), rt.clone().into_bytes());
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

    /// Queues `m` on its partition (the Java partitioner on its key) and starts the
    /// partition's request if none is in flight. A bad or missing topic is answered at once
    /// (returned: it goes to the dead letters).
    pub async fn send(&mut self, m: &Prepared) {
        if self.error.is_some() {
            return;
        }
        let topic = m.destination.as_str();
        let seq = m.record.seq;
        if !valid_topic(topic) {
            self.ready.push_back((
                seq,
                Outcome::Returned {
                    code: INVALID_TOPIC,
                    text: format!("invalid Kafka topic name {topic:?}"),
                },
            ));
            return;
        }
        let count = match self.partitions(topic).await {
            Ok(Some(n)) if n > 0 => n,
            Ok(_) => {
                self.ready.push_back((
                    seq,
                    Outcome::Returned {
                        code: UNKNOWN_TOPIC_OR_PARTITION,
                        text: format!("topic {topic} does not exist (create_topics = false)"),
                    },
                ));
                return;
            }
            Err(e) => {
                self.error = Some(e);
                return;
            }
        };
        let n = u32::try_from(count).unwrap_or(u32::MAX);
        let partition = partition_for_key(m.key.as_bytes(), n) as usize;
        let key = (topic.to_string(), partition);
        let record = self.record(m);
        let size = record_size(&record);
        let lane = self.lanes.entry(key.clone()).or_default();
        lane.waiting.push_back((seq, record, size));
        if !lane.busy && lane.waiting.len() == 1 {
            // Started by `next`: what is sent before it is polled goes in the same request.
            self.idle.push(key);
        }
    }

    /// Starts the next request of lane `key` if it has records and none in flight.
    fn start(&mut self, key: &(String, usize)) {
        let Some(lane) = self.lanes.get_mut(key) else {
            return;
        };
        if lane.busy || lane.waiting.is_empty() {
            return;
        }
        let Some(client) = self.topics.get(&key.0).and_then(|p| p.get(key.1)).cloned() else {
            return;
        };
        let sizes = lane.waiting.iter().map(|w| w.2);
        let n = batch_len(sizes, self.max_batch, self.max_batch_bytes);
        let (seqs, records): (Vec<u64>, Vec<KafkaRecord>) =
            lane.waiting.drain(..n).map(|(s, r, _)| (s, r)).unzip();
        lane.busy = true;
        let compression = self.compression;
        let key = key.clone();
        self.running.spawn(async move {
            let r = client.produce(records, compression).await.map(|_| ());
            (key, seqs, r)
        });
    }

    /// Whether a request failed (see [`super::Uplink::failed`]).
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }

    /// The next answer; the failure once every request in flight has finished. Cancel-safe.
    pub async fn next(&mut self) -> Result<(u64, Outcome), UplinkError> {
        loop {
            if self.error.is_none() {
                for key in std::mem::take(&mut self.idle) {
                    self.start(&key);
                }
            }
            if let Some(o) = self.ready.pop_front() {
                return Ok(o);
            }
            if self.running.is_empty() {
                return match &self.error {
                    Some(e) => Err(e.clone()),
                    None => std::future::pending().await,
                };
            }
            let (key, seqs, result) = match self.running.join_next().await {
                Some(Ok(produced)) => produced,
                Some(Err(e)) => {
                    let error = self.lost(format!("produce task: {e}"));
                    self.error.get_or_insert(error);
                    continue;
                }
                None => continue,
            };
            if let Some(lane) = self.lanes.get_mut(&key) {
                lane.busy = false;
            }
            let outcome = match result {
                Ok(()) => Outcome::Confirmed,
                Err(e) if is_permanent(&e) => {
                    tracing::warn!(uplink = %self.name, error = %e, "Kafka refused records");
                    Outcome::Nacked
                }
                Err(e) => {
                    // Cached leaders may be stale: the reconnect starts from fresh metadata.
                    let error = self.lost(format!("produce: {e}"));
                    self.error.get_or_insert(error);
                    continue;
                }
            };
            self.ready
                .extend(seqs.into_iter().map(|s| (s, outcome.clone())));
            if self.error.is_none() {
                self.start(&key);
            }
        }
    }

    pub async fn close(self) {
        // rskafka has no explicit close; dropping the client closes its connections.
        drop(self);
    }
}

/// How to reach a Kafka cluster: the keys a Kafka uplink and a Kafka downlink share.
pub struct ClientOptions<'a> {
    pub bootstrap: &'a [String],
    pub tls: bool,
    pub ca_file: Option<&'a Path>,
    pub sasl: Option<&'a KafkaSasl>,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Every rskafka call (and the bootstrap) gives up within this; without a deadline rskafka
    /// retries forever.
    pub timeout: Duration,
}

/// Connects to the cluster (TLS and SASL as configured; the SASL password is read now).
pub async fn client(o: &ClientOptions<'_>, client_id: &str) -> Result<Client, String> {
    let backoff = BackoffConfig {
        init_backoff: o.backoff_min,
        max_backoff: o.backoff_max,
        base: 2.0,
        deadline: Some(o.timeout),
    };
    let mut builder = ClientBuilder::new(o.bootstrap.to_vec())
        .client_id(client_id)
        .backoff_config(backoff);
    if o.tls {
        builder = builder.tls_config(crate::tls::client_config(o.ca_file)?);
    }
    if let Some(sasl) = o.sasl {
        builder = builder.sasl_config(sasl_config(sasl)?);
    }
    match tokio::time::timeout(o.timeout, builder.build()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no answer from {} within {:?}",
            o.bootstrap.join(","),
            o.timeout
        )),
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

/// How many of the records of `sizes` (in order) go in one request: up to `max` records and
/// `max_bytes` bytes, one record at least (a record larger than `max_bytes` goes alone).
fn batch_len(sizes: impl Iterator<Item = usize>, max: usize, max_bytes: usize) -> usize {
    let mut n = 0;
    let mut bytes = 0;
    for size in sizes.take(max) {
        if n > 0 && bytes + size > max_bytes {
            break;
        }
        bytes += size;
        n += 1;
    }
    n
}

/// A record's size in a produce request, about: key, value and headers, plus 32 bytes for its
/// framing (length, attributes, timestamp and offset deltas, header counts as varints).
fn record_size(r: &KafkaRecord) -> usize {
    let key = r.key.as_ref().map_or(0, Vec::len);
    let value = r.value.as_ref().map_or(0, Vec::len);
    let headers: usize = r.headers.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    32 + key + value + headers
}

/// Whether Kafka accepts `topic` as a topic name.
fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= 249 && topic.bytes().all(kafka_topic_byte)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_takes_records_up_to_the_count_and_the_bytes_and_one_at_least() {
        fn sizes(v: &[usize]) -> impl Iterator<Item = usize> + '_ {
            v.iter().copied()
        }
        assert_eq!(batch_len(sizes(&[100; 10]), 4, 1000), 4, "the count binds");
        assert_eq!(batch_len(sizes(&[300; 10]), 8, 1000), 3, "the bytes bind");
        assert_eq!(
            batch_len(sizes(&[300, 700, 1]), 8, 1000),
            2,
            "exactly max_bytes fits"
        );
        assert_eq!(
            batch_len(sizes(&[5000, 10]), 8, 1000),
            1,
            "a large record goes alone"
        );
        assert_eq!(
            batch_len(sizes(&[10, 5000]), 8, 1000),
            1,
            "and not with the one before"
        );
        assert_eq!(batch_len(sizes(&[]), 8, 1000), 0);
    }

    #[test]
    fn a_record_is_sized_by_key_value_and_headers() {
        let mut headers = BTreeMap::new();
        headers.insert("device_id".to_string(), b"dev-1".to_vec());
        let r = KafkaRecord {
            key: Some(b"dev-1".to_vec()),
            value: Some(vec![0; 100]),
            headers,
            timestamp: DateTime::<Utc>::default(),
        };
        assert_eq!(record_size(&r), 32 + 5 + 100 + (9 + 5 + 4));
    }
}
