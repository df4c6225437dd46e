//! The forwarding sections: `[gateway]`, `[[uplinks]]` and `[[routes]]`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use super::{de, duration_value, quoted, Problem};

/// AMQP confirm window, in records: how many may be sent and not yet settled (the forwarder
/// slides it: a new record goes out as each confirm comes back). It must hold a round trip's
/// worth of the broker's rate, or the link idles: a RabbitMQ that stores 10-12k persistent
/// msg/s needs 2,400 in flight at 200 ms and 7,200 at 600 ms (satellite). 4,096 holds > 200 ms
/// at 12k msg/s and the whole 600 ms at 6.8k; a failure re-sends at most this many (duplicates,
/// which consumers remove by message id); and with `window_bytes` it bounds the memory.
pub const DEFAULT_WINDOW: usize = 4096;
/// Kafka window, in records: with one produce request in flight per partition (order without
/// an idempotent producer), the records waiting behind it must fill the next request while the
/// current one crosses the link. Four `max_batch`es: at 200 ms round trip to a 3-partition
/// topic the default config keeps its RTT-0 rate (README, "Uplink benchmark on a long link");
/// 8,192 with 1,024-record requests kept 0.5-0.8 of it.
pub const DEFAULT_KAFKA_WINDOW: usize = 16384;
/// Records per Kafka produce request (per partition), bounded by `max_batch_bytes` too: large
/// requests cross a long link in one round trip each, and a broker pays its per-request cost
/// (tansu: a transaction) once per request.
pub const DEFAULT_KAFKA_MAX_BATCH: usize = 4096;
/// Bytes per Kafka produce request (per partition), about (each record counted as its key,
/// value and headers plus 32 bytes of framing): under the broker's `message.max.bytes`
/// (1 MiB by default), which refuses a larger record batch whole. A single record above it
/// still goes, alone.
pub const DEFAULT_KAFKA_MAX_BATCH_BYTES: usize = 900 << 10;
/// Bytes of records in flight per uplink (payloads as read and as sent, plus their addresses):
/// the memory bound of the window when payloads are large. 16 MiB holds 4,096 records of up to
/// 2 KiB each; with 64-byte sensor readings the record count binds first.
pub const DEFAULT_WINDOW_BYTES: usize = 16 << 20;
/// The most `window_bytes` may be: the forwarder holds that much in memory per uplink.
pub const MAX_WINDOW_BYTES: usize = 1 << 30;
/// A broker that has not confirmed within this is stalled: reconnect and re-send.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Nacks of one record before it goes to the dead letters.
pub const DEFAULT_MAX_RETRIES: u32 = 5;
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// `[gateway]`: this gateway's identity towards the upstream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Part of every message id (`{id}-{seq}`), so consumers can deduplicate across gateways.
    pub id: String,
    /// On SIGTERM/SIGINT, how long the forwarders may keep draining the backlog (after devices
    /// are disconnected and their last acks sent) before the uplinks are closed.
    #[serde(deserialize_with = "de::duration")]
    pub shutdown_grace: Duration,
}

/// Default for `gateway.shutdown_grace`: short enough for systemd's default 90 s stop timeout,
/// long enough to deliver what is in flight and a little backlog.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            id: "edge-gateway".into(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

impl GatewayConfig {
    pub(super) fn check(&self, problems: &mut Vec<Problem>) {
        if self.id.is_empty() || self.id.len() > 128 || self.id.chars().any(char::is_control) {
            problems.push(Problem {
                key: "gateway.id".into(),
                value: quoted(&self.id),
                reason: "use 1-128 printable characters; it is part of every message id".into(),
            });
        }
        if self.shutdown_grace > Duration::from_secs(3600) {
            problems.push(Problem {
                key: "gateway.shutdown_grace".into(),
                value: duration_value(self.shutdown_grace),
                reason: "longer than an hour; a service manager would kill the gateway first (the queue keeps the backlog anyway)".into(),
            });
        }
    }
}

/// `[[uplinks]]`: where records are forwarded, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum UplinkConfig {
    Amqp(AmqpConfig),
    Kafka(KafkaConfig),
    Mqtt(MqttConfig),
}

impl UplinkConfig {
    pub fn name(&self) -> &str {
        match self {
            UplinkConfig::Amqp(a) => &a.name,
            UplinkConfig::Kafka(k) => &k.name,
            UplinkConfig::Mqtt(m) => &m.name,
        }
    }

    /// Records sent and not yet settled, at most (`window`).
    pub fn window(&self) -> usize {
        match self {
            UplinkConfig::Amqp(a) => a.window,
            UplinkConfig::Kafka(k) => k.window,
            UplinkConfig::Mqtt(m) => m.window,
        }
    }

    /// Bytes of records in flight, at most (`window_bytes`).
    pub fn window_bytes(&self) -> usize {
        match self {
            UplinkConfig::Amqp(a) => a.window_bytes,
            UplinkConfig::Kafka(k) => k.window_bytes,
            UplinkConfig::Mqtt(m) => m.window_bytes,
        }
    }

    /// Records read from the queue at a time: a Kafka produce request's worth (`max_batch`);
    /// for AMQP and MQTT, a slice of the window.
    pub fn batch(&self) -> usize {
        match self {
            UplinkConfig::Amqp(a) => a.window.clamp(1, 256),
            UplinkConfig::Kafka(k) => k.max_batch,
            UplinkConfig::Mqtt(m) => m.window.clamp(1, 256),
        }
    }

    /// The nodes the uplink may connect to, tried in turn (AMQP and MQTT `urls` or `url`; a
    /// Kafka client finds the cluster's brokers itself from `bootstrap`: one node).
    pub fn nodes(&self) -> usize {
        match self {
            UplinkConfig::Amqp(a) => a.urls().len(),
            UplinkConfig::Kafka(_) => 1,
            UplinkConfig::Mqtt(m) => m.urls().len(),
        }
    }

    /// Node `i` as the operator may see it (no password).
    pub fn node_label(&self, i: usize) -> String {
        match self {
            UplinkConfig::Amqp(a) => a
                .urls()
                .get(i)
                .map_or_else(String::new, |u| crate::uplink::amqp::masked_url(u)),
            UplinkConfig::Kafka(k) => k.bootstrap.join(","),
            UplinkConfig::Mqtt(m) => m
                .urls()
                .get(i)
                .map_or_else(String::new, |u| crate::uplink::amqp::masked_url(u)),
        }
    }

    pub fn max_retries(&self) -> u32 {
        match self {
            UplinkConfig::Amqp(a) => a.max_retries,
            UplinkConfig::Kafka(k) => k.max_retries,
            UplinkConfig::Mqtt(m) => m.max_retries,
        }
    }

    /// Reconnect backoff: `(backoff_min, backoff_max)`.
    pub fn backoff(&self) -> (Duration, Duration) {
        match self {
            UplinkConfig::Amqp(a) => (a.backoff_min, a.backoff_max),
            UplinkConfig::Kafka(k) => (k.backoff_min, k.backoff_max),
            UplinkConfig::Mqtt(m) => (m.backoff_min, m.backoff_max),
        }
    }

    pub fn max_rate(&self) -> Option<u32> {
        match self {
            UplinkConfig::Amqp(a) => a.max_rate,
            UplinkConfig::Kafka(k) => k.max_rate,
            UplinkConfig::Mqtt(m) => m.max_rate,
        }
    }

    /// No confirm within this: the link is stalled (also bounds a graceful stop).
    pub fn confirm_timeout(&self) -> Duration {
        match self {
            UplinkConfig::Amqp(a) => a.confirm_timeout,
            UplinkConfig::Kafka(k) => k.confirm_timeout,
            UplinkConfig::Mqtt(m) => m.confirm_timeout,
        }
    }

    /// How long the forwarder waits for more records when fewer than [`Self::batch`] are ready
    /// (Kafka `linger`; zero for AMQP and MQTT, whose windows already stream).
    pub fn linger(&self) -> Duration {
        match self {
            UplinkConfig::Amqp(_) => Duration::ZERO,
            UplinkConfig::Kafka(k) => k.linger,
            UplinkConfig::Mqtt(_) => Duration::ZERO,
        }
    }
}

/// An AMQP 0-9-1 uplink (RabbitMQ).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// Names the uplink and its queue cursor.
    pub name: String,
    /// `amqp://user:pass@host:port/vhost` or `amqps://...` (credentials are never logged).
    /// One node; for a cluster use `urls`.
    #[serde(default)]
    pub url: String,
    /// The nodes of a cluster, tried in turn: on a failure the forwarder moves to the next one
    /// (with jittered backoff once it has tried them all). Instead of `url`.
    #[serde(default)]
    pub urls: Vec<String>,
    /// An environment variable holding the password (replaces the one in `url`).
    #[serde(default)]
    pub password_env: Option<String>,
    /// With `amqps://`: a PEM file of CA certificates to trust besides the system's store (for a
    /// broker with a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Exchange (template), e.g. "telemetry".
    pub exchange: String,
    /// Routing key (template); `{topic}` has `/` turned into `.`.
    #[serde(default = "default_routing_key")]
    pub routing_key: String,
    /// Declare the exchange (topic, durable) at connect; off by default.
    #[serde(default)]
    pub declare: bool,
    /// With `declare`: also declare this durable queue and bind it with `#`.
    #[serde(default)]
    pub declare_queue: Option<String>,
    /// Records sent and not yet settled, at most (a sliding window).
    #[serde(default = "default_window")]
    pub window: usize,
    /// Bytes of records in flight, at most (see [`DEFAULT_WINDOW_BYTES`]).
    #[serde(default = "default_window_bytes")]
    pub window_bytes: usize,
    #[serde(default = "default_confirm_timeout", deserialize_with = "de::duration")]
    pub confirm_timeout: Duration,
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    #[serde(default = "default_backoff_min", deserialize_with = "de::duration")]
    pub backoff_min: Duration,
    #[serde(default = "default_backoff_max", deserialize_with = "de::duration")]
    pub backoff_max: Duration,
    /// At most this many records per second to this uplink (so a backlog after a long outage
    /// does not flood the upstream). Not set: as fast as the upstream confirms.
    #[serde(default)]
    pub max_rate: Option<u32>,
}

impl AmqpConfig {
    /// The configured nodes: `urls`, or `url` alone.
    pub fn urls(&self) -> Vec<&str> {
        if self.urls.is_empty() {
            vec![self.url.as_str()]
        } else {
            self.urls.iter().map(String::as_str).collect()
        }
    }
}

/// Partitions of a topic the gateway creates (`create_topics`): a few, so keys spread, without
/// assuming a large cluster.
pub const DEFAULT_KAFKA_PARTITIONS: i32 = 3;
/// Replication of a topic the gateway creates: 1 works on a single broker (a test or a site
/// broker); set 3 for a production cluster.
pub const DEFAULT_KAFKA_REPLICATION_FACTOR: i16 = 1;

/// Compression of Kafka record batches. Only codecs with a pure-Rust implementation (the edge
/// build has no C toolchain); no snappy (tansu stores it but cannot fetch it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum KafkaCompression {
    #[default]
    None,
    Gzip,
}

/// How long a Kafka uplink waits for more records before producing a batch smaller than
/// `max_batch`: long enough that a burst from many devices goes out as one produce request per
/// partition instead of many small ones, short against the broker's own acks=all round trip.
pub const DEFAULT_KAFKA_LINGER: Duration = Duration::from_millis(5);
/// Above this, `linger` only delays records: batches fill while a produce is in flight anyway.
pub const MAX_KAFKA_LINGER: Duration = Duration::from_secs(1);

/// SASL mechanisms of a Kafka uplink (those rskafka speaks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SaslMechanism {
    /// The password goes to the broker as it is: use it only with `tls = true`.
    Plain,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "scram-sha-512")]
    ScramSha512,
}

/// `sasl = { mechanism = "...", username = "...", password_env = "..." }` on a Kafka uplink.
/// Debug never shows the password.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSasl {
    pub mechanism: SaslMechanism,
    pub username: String,
    /// The password in the config file. Prefer `password_env`.
    #[serde(default)]
    pub password: Option<String>,
    /// An environment variable holding the password (read at each connect, never logged).
    #[serde(default)]
    pub password_env: Option<String>,
}

impl fmt::Debug for KafkaSasl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSasl")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("password_env", &self.password_env)
            .finish()
    }
}

impl KafkaSasl {
    /// The password: from the config, or from the environment variable it names.
    pub fn password(&self) -> Result<String, String> {
        match (&self.password, &self.password_env) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(var)) => std::env::var(var)
                .map_err(|_| format!("environment variable {var} (sasl.password_env) is not set")),
            (None, None) => Err("sasl has neither password nor password_env".into()),
        }
    }
}

/// A Kafka uplink. Records are keyed by device id and partitioned like the Java client's
/// default partitioner, so one device's records stay in one partition, in order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Names the uplink and its queue cursor.
    pub name: String,
    /// Bootstrap brokers, `host:port` each.
    pub bootstrap: Vec<String>,
    /// Topic (template); `{topic}` has `/` turned into `.` (Kafka topic names have no `/`).
    pub topic: String,
    /// Create a missing topic (with `partitions` and `replication_factor`) when a record first
    /// needs it (a fixed topic: at connect). Off: a record for a missing topic goes to the dead
    /// letters.
    #[serde(default)]
    pub create_topics: bool,
    #[serde(default = "default_kafka_partitions")]
    pub partitions: i32,
    #[serde(default = "default_kafka_replication_factor")]
    pub replication_factor: i16,
    #[serde(default)]
    pub compression: KafkaCompression,
    /// Records per produce request (per partition), at most.
    #[serde(default = "default_kafka_max_batch")]
    pub max_batch: usize,
    /// Bytes per produce request (per partition), about (see [`DEFAULT_KAFKA_MAX_BATCH_BYTES`]).
    #[serde(default = "default_kafka_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// Records sent and not yet settled, at most (see [`DEFAULT_KAFKA_WINDOW`]).
    #[serde(default = "default_kafka_window")]
    pub window: usize,
    /// Bytes of records in flight, at most (see [`DEFAULT_WINDOW_BYTES`]).
    #[serde(default = "default_window_bytes")]
    pub window_bytes: usize,
    /// With fewer than `max_batch` records ready, wait up to this for more before producing.
    #[serde(default = "default_kafka_linger", deserialize_with = "de::duration")]
    pub linger: Duration,
    /// Speak TLS (rustls) to every broker, bootstrap and advertised alike.
    #[serde(default)]
    pub tls: bool,
    /// With `tls`: a PEM file of CA certificates to trust besides the system's store.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// SASL authentication (PLAIN or SCRAM); none by default.
    #[serde(default)]
    pub sasl: Option<KafkaSasl>,
    /// A produce (acks=all) not answered within this: stalled, reconnect and re-send.
    #[serde(default = "default_confirm_timeout", deserialize_with = "de::duration")]
    pub confirm_timeout: Duration,
    /// Refusals of one record (e.g. too large) before it goes to the dead letters.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    #[serde(default = "default_backoff_min", deserialize_with = "de::duration")]
    pub backoff_min: Duration,
    #[serde(default = "default_backoff_max", deserialize_with = "de::duration")]
    pub backoff_max: Duration,
    /// At most this many records per second to this uplink. Not set: no limit.
    #[serde(default)]
    pub max_rate: Option<u32>,
}

/// MQTT protocol version of an MQTT uplink (`protocol = "5"` or `"3.1.1"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum MqttProtocol {
    /// MQTT 5: the record's identity and the device's user properties go as user properties.
    #[default]
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1: only the payload (no properties in that protocol).
    #[serde(rename = "3.1.1")]
    V311,
}

/// MQTT keep alive of an uplink: a PINGREQ after this long without a packet sent, and the
/// connection counts as lost when the broker answers nothing for as long again. 30 s finds a
/// dead cellular link in under a minute at one small packet per 30 s on an idle uplink; cloud
/// brokers accept it (AWS IoT Core: 30-1200 s).
pub const DEFAULT_MQTT_KEEPALIVE: Duration = Duration::from_secs(30);

/// An MQTT uplink (a cloud MQTT broker: AWS IoT Core, Azure Event Grid, HiveMQ, EMQX,
/// Mosquitto). Its session is persistent, so a reconnect resumes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Names the uplink and its queue cursor.
    pub name: String,
    /// `mqtt://host:port` or `mqtts://host:port` (TLS). One broker; for failover use `urls`.
    #[serde(default)]
    pub url: String,
    /// Brokers tried in turn: on a failure the forwarder moves to the next one. Instead of `url`.
    #[serde(default)]
    pub urls: Vec<String>,
    /// The MQTT client id of the gateway's session; the gateway id (`[gateway] id`) if not set.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// An environment variable holding the password (read at each connect, never logged).
    #[serde(default)]
    pub password_env: Option<String>,
    /// With `mqtts://`: a PEM file of CA certificates to trust besides the system's store.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// With `mqtts://`: the gateway's client certificate (PEM chain) for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// With `cert_file`: its private key (PEM).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// Topic (template) each record is published to; `{topic}` keeps its `/`.
    #[serde(default = "default_mqtt_topic")]
    pub topic: String,
    /// 1: a record is confirmed by its PUBACK; 2: by its PUBCOMP.
    #[serde(default = "default_mqtt_qos")]
    pub qos: u8,
    #[serde(default = "default_mqtt_keepalive", deserialize_with = "de::duration")]
    pub keepalive: Duration,
    /// Records sent and not yet settled, at most; under MQTT 5 also at most the broker's
    /// receive maximum (from its CONNACK).
    #[serde(default = "default_window")]
    pub window: usize,
    /// Bytes of records in flight, at most (see [`DEFAULT_WINDOW_BYTES`]).
    #[serde(default = "default_window_bytes")]
    pub window_bytes: usize,
    /// No PUBACK (PUBCOMP) within this, or no CONNACK: stalled, reconnect and re-send.
    #[serde(default = "default_confirm_timeout", deserialize_with = "de::duration")]
    pub confirm_timeout: Duration,
    /// Transient refusals of one record (quota exceeded) before it goes to the dead letters.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    #[serde(default = "default_backoff_min", deserialize_with = "de::duration")]
    pub backoff_min: Duration,
    #[serde(default = "default_backoff_max", deserialize_with = "de::duration")]
    pub backoff_max: Duration,
    /// At most this many records per second to this uplink. Not set: no limit.
    #[serde(default)]
    pub max_rate: Option<u32>,
    /// PUBLISH flows in flight at once, at most (see [`MqttConfig::max_inflight`]).
    #[serde(default)]
    pub max_inflight: Option<u16>,
}

/// MQTT 3.1.1 with `qos = 2`: flows in flight unless `max_inflight` says otherwise. 3.1.1 has
/// no receive maximum, and a broker past its own in-flight limit may complete a QoS 2 flow and
/// drop the message (measured: Mosquitto 2.0.11, `max_inflight_messages` 20 by default, lost 88
/// of 150 with 64 in flight and none with 20).
pub const DEFAULT_MQTT311_QOS2_INFLIGHT: u16 = 20;

impl MqttConfig {
    /// PUBLISH flows in flight at once, at most: `max_inflight`; else 20 for MQTT 3.1.1 with
    /// `qos = 2` ([`DEFAULT_MQTT311_QOS2_INFLIGHT`]), else no bound but the window. Under MQTT 5
    /// the broker's receive maximum bounds it too.
    pub fn max_inflight(&self) -> usize {
        match (self.max_inflight, self.protocol, self.qos) {
            (Some(n), _, _) => usize::from(n.max(1)),
            (None, MqttProtocol::V311, 2) => usize::from(DEFAULT_MQTT311_QOS2_INFLIGHT),
            (None, _, _) => usize::MAX,
        }
    }

    /// The configured brokers: `urls`, or `url` alone.
    pub fn urls(&self) -> Vec<&str> {
        if self.urls.is_empty() {
            vec![self.url.as_str()]
        } else {
            self.urls.iter().map(String::as_str).collect()
        }
    }

    /// The client id: `client_id`, or the gateway id.
    pub fn client_id<'a>(&'a self, gateway_id: &'a str) -> &'a str {
        self.client_id.as_deref().unwrap_or(gateway_id)
    }
}

/// `host` and `port` of an `mqtt://` or `mqtts://` url (default ports 1883 and 8883), and
/// whether it is TLS; why not, otherwise.
pub fn parse_mqtt_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err("must start with mqtt:// or mqtts://".into());
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.contains('@') || hostport.contains('/') {
        return Err(
            "give only mqtt(s)://host:port (credentials go in username and password_env)".into(),
        );
    }
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("port {p:?} is not a number from 1 to 65535"))?;
            (h, port)
        }
        _ => (hostport, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("has no host".into());
    }
    Ok((tls, host.to_string(), port))
}

fn default_mqtt_topic() -> String {
    "{topic}".into()
}
fn default_mqtt_qos() -> u8 {
    1
}
fn default_mqtt_keepalive() -> Duration {
    DEFAULT_MQTT_KEEPALIVE
}

fn default_kafka_max_batch() -> usize {
    DEFAULT_KAFKA_MAX_BATCH
}
fn default_kafka_max_batch_bytes() -> usize {
    DEFAULT_KAFKA_MAX_BATCH_BYTES
}
fn default_kafka_window() -> usize {
    DEFAULT_KAFKA_WINDOW
}
fn default_window_bytes() -> usize {
    DEFAULT_WINDOW_BYTES
}
fn default_kafka_linger() -> Duration {
    DEFAULT_KAFKA_LINGER
}
fn default_kafka_partitions() -> i32 {
    DEFAULT_KAFKA_PARTITIONS
}
fn default_kafka_replication_factor() -> i16 {
    DEFAULT_KAFKA_REPLICATION_FACTOR
}

fn default_routing_key() -> String {
    "{topic}".into()
}
fn default_window() -> usize {
    DEFAULT_WINDOW
}
fn default_confirm_timeout() -> Duration {
    DEFAULT_CONFIRM_TIMEOUT
}
fn default_max_retries() -> u32 {
    DEFAULT_MAX_RETRIES
}
fn default_backoff_min() -> Duration {
    DEFAULT_BACKOFF_MIN
}
fn default_backoff_max() -> Duration {
    DEFAULT_BACKOFF_MAX
}

/// Payload handling per route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadMode {
    /// Forward the device's bytes unchanged.
    #[default]
    Raw,
    /// Decode the device's CBOR and send JSON; undecodable payloads go to dead letters.
    CborToJson,
}

/// `[[routes]]`: which records go to which uplinks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// An MQTT topic filter (`+`, `#`).
    pub filter: String,
    pub uplinks: Vec<String>,
    #[serde(default)]
    pub payload: PayloadMode,
}

/// Placeholders a template may use.
pub const PLACEHOLDERS: &[&str] = &["topic", "client_id", "username"];

/// Checks a template: `{topic}`, `{client_id}`, `{username}`, `{topic[N]}`; returns why not.
pub fn check_template(t: &str) -> Result<(), String> {
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err("a '{' without its '}'".into());
        };
        let name = &after[..close];
        let ok = PLACEHOLDERS.contains(&name)
            || name
                .strip_prefix("topic[")
                .and_then(|n| n.strip_suffix(']'))
                .is_some_and(|n| n.parse::<usize>().is_ok());
        if !ok {
            return Err(format!(
                "unknown placeholder {{{name}}}; use {{topic}}, {{client_id}}, {{username}} or {{topic[N]}}"
            ));
        }
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err("a '}' without its '{'".into());
    }
    Ok(())
}

pub(super) fn check(uplinks: &[UplinkConfig], routes: &[RouteConfig], problems: &mut Vec<Problem>) {
    let mut names: Vec<&str> = Vec::new();
    for (i, u) in uplinks.iter().enumerate() {
        let key = |k: &str| format!("uplinks[{i}].{k}");
        let name = u.name();
        if names.contains(&name) {
            problems.push(Problem {
                key: key("name"),
                value: quoted(name),
                reason: "another uplink has this name; names must be unique (they name cursors)"
                    .into(),
            });
        }
        if name.is_empty()
            || name.len() > 64
            || name.starts_with('_')
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            problems.push(Problem {
                key: key("name"),
                value: quoted(name),
                reason: "use 1-64 of A-Z a-z 0-9 - _ (not starting with '_')".into(),
            });
        }
        names.push(name);
        let (backoff_min, backoff_max) = u.backoff();
        if backoff_min > backoff_max || backoff_min.is_zero() {
            problems.push(Problem {
                key: key("backoff_min"),
                value: duration_value(backoff_min),
                reason: "must be above zero and at most backoff_max".into(),
            });
        }
        if u.max_rate() == Some(0) {
            problems.push(Problem {
                key: key("max_rate"),
                value: "0".into(),
                reason: "nothing would ever be sent; remove the key for no limit".into(),
            });
        }
        match u {
            UplinkConfig::Amqp(a) => check_amqp(a, &key, problems),
            UplinkConfig::Kafka(k) => check_kafka(k, &key, problems),
            UplinkConfig::Mqtt(m) => check_mqtt(m, &key, problems),
        }
    }
    // Two MQTT uplinks with one client id on one broker would take the session over from each
    // other (and share its packet ids) without end.
    let mqtt: Vec<(usize, &MqttConfig)> = uplinks
        .iter()
        .enumerate()
        .filter_map(|(i, u)| match u {
            UplinkConfig::Mqtt(m) => Some((i, m)),
            _ => None,
        })
        .collect();
    for (n, &(i, m)) in mqtt.iter().enumerate() {
        let brokers = |m: &MqttConfig| -> Vec<(String, u16)> {
            m.urls()
                .iter()
                .filter_map(|u| parse_mqtt_url(u).ok().map(|(_, h, p)| (h, p)))
                .collect()
        };
        let mine = brokers(m);
        if let Some(&(j, other)) = mqtt[..n].iter().find(|(_, o)| {
            o.client_id == m.client_id && brokers(o).iter().any(|b| mine.contains(b))
        }) {
            problems.push(Problem {
                key: format!("uplinks[{i}].client_id"),
                value: m.client_id.as_deref().map_or("(the gateway id)".into(), quoted),
                reason: format!(
                    "uplinks[{j}] ({}) connects to the same broker with the same client id; the broker would let each take over the other's session: give one a client_id of its own",
                    other.name
                ),
            });
        }
    }
    for (i, r) in routes.iter().enumerate() {
        if let Err(e) = crate::topic::check_filter(&r.filter) {
            problems.push(Problem {
                key: format!("routes[{i}].filter"),
                value: quoted(&r.filter),
                reason: format!("not a topic filter: {e}"),
            });
        }
        if r.uplinks.is_empty() {
            problems.push(Problem {
                key: format!("routes[{i}].uplinks"),
                value: "[]".into(),
                reason: "a route must name at least one uplink".into(),
            });
        }
        for (j, u) in r.uplinks.iter().enumerate() {
            if !names.contains(&u.as_str()) {
                problems.push(Problem {
                    key: format!("routes[{i}].uplinks[{j}]"),
                    value: quoted(u),
                    reason: "no [[uplinks]] has this name".into(),
                });
            }
        }
    }
}

fn check_window(
    window: usize,
    window_bytes: usize,
    key: &dyn Fn(&str) -> String,
    problems: &mut Vec<Problem>,
) {
    if window == 0 || window > 65_535 {
        problems.push(Problem {
            key: key("window"),
            value: window.to_string(),
            reason: "must be between 1 and 65535".into(),
        });
    }
    if !(64 << 10..=MAX_WINDOW_BYTES).contains(&window_bytes) {
        problems.push(Problem {
            key: key("window_bytes"),
            value: window_bytes.to_string(),
            reason: format!(
                "must be between 65536 and {MAX_WINDOW_BYTES} (the forwarder holds that much in memory)"
            ),
        });
    }
}

/// `url` / `urls` of an AMQP uplink or downlink: one of them, each `amqp://` or `amqps://`.
pub(super) fn check_amqp_urls(
    url: &str,
    urls: &[String],
    key: &dyn Fn(&str) -> String,
    problems: &mut Vec<Problem>,
) {
    match (url.is_empty(), urls.is_empty()) {
        (true, true) => problems.push(Problem {
            key: key("url"),
            value: "(missing)".into(),
            reason: "give the broker's url (or urls = [...] for a cluster)".into(),
        }),
        (false, false) => problems.push(Problem {
            key: key("urls"),
            value: "(hidden)".into(),
            reason: "give either url or urls, not both".into(),
        }),
        _ => {}
    }
    let single = urls.is_empty();
    let all: Vec<&str> = if single {
        vec![url]
    } else {
        urls.iter().map(String::as_str).collect()
    };
    for (j, u) in all.iter().enumerate() {
        let scheme_ok = u.starts_with("amqp://") || u.starts_with("amqps://");
        // A missing `url` is reported above.
        let missing = single && u.is_empty();
        if !(scheme_ok || missing) {
            problems.push(Problem {
                key: if single {
                    key("url")
                } else {
                    key(&format!("urls[{j}]"))
                },
                value: "(hidden)".into(),
                reason: "must start with amqp:// or amqps://".into(),
            });
        }
    }
}

fn check_amqp(a: &AmqpConfig, key: &dyn Fn(&str) -> String, problems: &mut Vec<Problem>) {
    check_amqp_urls(&a.url, &a.urls, key, problems);
    check_window(a.window, a.window_bytes, key, problems);
    for (k, t) in [("exchange", &a.exchange), ("routing_key", &a.routing_key)] {
        if let Err(why) = check_template(t) {
            problems.push(Problem {
                key: key(k),
                value: quoted(t),
                reason: why,
            });
        }
    }
    if let Some(ca) = &a.ca_file {
        if !a.urls().iter().any(|u| u.starts_with("amqps://")) {
            problems.push(Problem {
                key: key("ca_file"),
                value: quoted(&ca.display().to_string()),
                reason: "only used with an amqps:// url; use amqps:// or remove ca_file".into(),
            });
        } else if let Err(why) = load_ca_file(ca) {
            problems.push(Problem {
                key: key("ca_file"),
                value: quoted(&ca.display().to_string()),
                reason: why,
            });
        }
    }
    if a.declare_queue.is_some() && !a.declare {
        problems.push(Problem {
            key: key("declare_queue"),
            value: quoted(a.declare_queue.as_deref().unwrap_or("")),
            reason: "only used with declare = true".into(),
        });
    }
}

/// Why a `type = "kafka"` uplink cannot run in a build without the `kafka` feature.
pub const KAFKA_NOT_BUILT: &str = "this gateway was built without the `kafka` feature (an \
    AMQP-only build); build it with `cargo build --release -p gateway` (kafka is a default \
    feature) or `--features kafka`, or use an AMQP uplink";

fn check_kafka(k: &KafkaConfig, key: &dyn Fn(&str) -> String, problems: &mut Vec<Problem>) {
    if !cfg!(feature = "kafka") {
        problems.push(Problem {
            key: key("type"),
            value: "\"kafka\"".into(),
            reason: KAFKA_NOT_BUILT.into(),
        });
    }
    check_kafka_client(
        &k.bootstrap,
        k.tls,
        k.ca_file.as_deref(),
        k.sasl.as_ref(),
        key,
        problems,
    );
    match check_template(&k.topic) {
        Err(why) => problems.push(Problem {
            key: key("topic"),
            value: quoted(&k.topic),
            reason: why,
        }),
        Ok(()) => {
            // Only the literal parts can be checked here; expanded values are checked per record.
            let literal = strip_placeholders(&k.topic);
            if k.topic.is_empty() || !literal.bytes().all(kafka_topic_byte) {
                problems.push(Problem {
                    key: key("topic"),
                    value: quoted(&k.topic),
                    reason: "a Kafka topic name has only A-Z a-z 0-9 . _ - (besides placeholders)"
                        .into(),
                });
            }
        }
    }
    if k.partitions < 1 {
        problems.push(Problem {
            key: key("partitions"),
            value: k.partitions.to_string(),
            reason: "must be at least 1".into(),
        });
    }
    if k.replication_factor < 1 {
        problems.push(Problem {
            key: key("replication_factor"),
            value: k.replication_factor.to_string(),
            reason: "must be at least 1".into(),
        });
    }
    if k.max_batch == 0 || k.max_batch > 65_535 {
        problems.push(Problem {
            key: key("max_batch"),
            value: k.max_batch.to_string(),
            reason: "must be between 1 and 65535".into(),
        });
    }
    if !(1024..=64 << 20).contains(&k.max_batch_bytes) {
        problems.push(Problem {
            key: key("max_batch_bytes"),
            value: k.max_batch_bytes.to_string(),
            reason: "must be between 1024 and 67108864 (keep it under the broker's message.max.bytes, 1 MiB by default)".into(),
        });
    }
    check_window(k.window, k.window_bytes, key, problems);
    if k.confirm_timeout.is_zero() {
        problems.push(Problem {
            key: key("confirm_timeout"),
            value: duration_value(k.confirm_timeout),
            reason: "must be above zero".into(),
        });
    }
    if k.linger > MAX_KAFKA_LINGER {
        problems.push(Problem {
            key: key("linger"),
            value: duration_value(k.linger),
            reason: format!(
                "at most {}: batches fill while a produce is in flight anyway, a longer linger \
                 only delays records; use \"0s\" to send at once",
                humantime::format_duration(MAX_KAFKA_LINGER)
            ),
        });
    }
}

/// The connection keys a Kafka uplink and a Kafka downlink share: `bootstrap`, `tls`, `ca_file`
/// and `sasl`.
pub(super) fn check_kafka_client(
    bootstrap: &[String],
    tls: bool,
    ca_file: Option<&Path>,
    sasl: Option<&KafkaSasl>,
    key: &dyn Fn(&str) -> String,
    problems: &mut Vec<Problem>,
) {
    if bootstrap.is_empty() {
        problems.push(Problem {
            key: key("bootstrap"),
            value: "[]".into(),
            reason: "name at least one broker as \"host:port\"".into(),
        });
    }
    for (j, b) in bootstrap.iter().enumerate() {
        let ok = b.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !ok {
            problems.push(Problem {
                key: key(&format!("bootstrap[{j}]")),
                value: quoted(b),
                reason: "must be \"host:port\"".into(),
            });
        }
    }
    if let Some(ca) = ca_file {
        if !tls {
            problems.push(Problem {
                key: key("ca_file"),
                value: quoted(&ca.display().to_string()),
                reason: "only used with tls = true; set tls = true or remove ca_file".into(),
            });
        } else if let Err(why) = load_ca_file(ca) {
            problems.push(Problem {
                key: key("ca_file"),
                value: quoted(&ca.display().to_string()),
                reason: why,
            });
        }
    }
    if let Some(sasl) = sasl {
        if sasl.username.is_empty() {
            problems.push(Problem {
                key: key("sasl.username"),
                value: quoted(""),
                reason: "must not be empty".into(),
            });
        }
        match (&sasl.password, &sasl.password_env) {
            (Some(_), Some(_)) => problems.push(Problem {
                key: key("sasl.password"),
                value: "(hidden)".into(),
                reason: "give either password or password_env, not both".into(),
            }),
            (None, None) => problems.push(Problem {
                key: key("sasl.password_env"),
                value: "(missing)".into(),
                reason: "name the environment variable holding the password (or set password)"
                    .into(),
            }),
            (None, Some(var)) if var.is_empty() || var.contains('=') => problems.push(Problem {
                key: key("sasl.password_env"),
                value: quoted(var),
                reason: "not an environment variable name".into(),
            }),
            _ => {}
        }
    }
}

fn check_mqtt(m: &MqttConfig, key: &dyn Fn(&str) -> String, problems: &mut Vec<Problem>) {
    match (m.url.is_empty(), m.urls.is_empty()) {
        (true, true) => problems.push(Problem {
            key: key("url"),
            value: "(missing)".into(),
            reason: "give the broker's url, mqtt://host:port or mqtts://host:port (or urls = [...] for failover)".into(),
        }),
        (false, false) => problems.push(Problem {
            key: key("urls"),
            value: quoted(&m.urls.join(",")),
            reason: "give either url or urls, not both".into(),
        }),
        _ => {}
    }
    let single = m.urls.is_empty();
    let mut any_tls = false;
    for (j, u) in m.urls().iter().enumerate() {
        if single && u.is_empty() {
            continue;
        }
        match parse_mqtt_url(u) {
            Ok((tls, _, _)) => any_tls |= tls,
            Err(why) => problems.push(Problem {
                key: if single {
                    key("url")
                } else {
                    key(&format!("urls[{j}]"))
                },
                value: quoted(&crate::uplink::amqp::masked_url(u)),
                reason: why,
            }),
        }
    }
    check_window(m.window, m.window_bytes, key, problems);
    if m.max_inflight == Some(0) {
        problems.push(Problem {
            key: key("max_inflight"),
            value: "0".into(),
            reason: "nothing would ever be sent; use at least 1, or remove the key for the default"
                .into(),
        });
    }
    if let Some(id) = &m.client_id {
        if id.is_empty() || id.len() > 65_535 || id.chars().any(char::is_control) {
            problems.push(Problem {
                key: key("client_id"),
                value: quoted(id),
                reason: "use printable characters (many brokers take at most 23); remove the key to use the gateway id".into(),
            });
        }
    }
    if let Some(var) = &m.password_env {
        if var.is_empty() || var.contains('=') {
            problems.push(Problem {
                key: key("password_env"),
                value: quoted(var),
                reason: "not an environment variable name".into(),
            });
        } else if m.username.is_none() {
            problems.push(Problem {
                key: key("password_env"),
                value: quoted(var),
                reason: "MQTT sends a password only with a user name; set username too".into(),
            });
        }
    }
    match check_template(&m.topic) {
        Err(why) => problems.push(Problem {
            key: key("topic"),
            value: quoted(&m.topic),
            reason: why,
        }),
        Ok(()) => {
            if m.topic.is_empty() || m.topic.contains(['+', '#', '\0']) {
                problems.push(Problem {
                    key: key("topic"),
                    value: quoted(&m.topic),
                    reason: "a topic to publish to: not empty, no wildcards + or #; use \"{topic}\" for the device's topic".into(),
                });
            }
        }
    }
    if !(1..=2).contains(&m.qos) {
        problems.push(Problem {
            key: key("qos"),
            value: m.qos.to_string(),
            reason:
                "must be 1 (confirmed by PUBACK) or 2 (confirmed by PUBCOMP); QoS 0 has no confirm"
                    .into(),
        });
    }
    if m.keepalive < Duration::from_secs(1) || m.keepalive > Duration::from_secs(65_535) {
        problems.push(Problem {
            key: key("keepalive"),
            value: duration_value(m.keepalive),
            reason: "must be between 1s and 65535s (MQTT keeps it in whole seconds)".into(),
        });
    }
    if m.confirm_timeout.is_zero() {
        problems.push(Problem {
            key: key("confirm_timeout"),
            value: duration_value(m.confirm_timeout),
            reason: "must be above zero".into(),
        });
    }
    let path = |p: &Path| quoted(&p.display().to_string());
    for (k, file) in [
        ("ca_file", &m.ca_file),
        ("cert_file", &m.cert_file),
        ("key_file", &m.key_file),
    ] {
        if let Some(f) = file {
            if !any_tls {
                problems.push(Problem {
                    key: key(k),
                    value: path(f),
                    reason: format!("only used with an mqtts:// url; use mqtts:// or remove {k}"),
                });
            }
        }
    }
    match (&m.cert_file, &m.key_file) {
        (Some(c), None) => problems.push(Problem {
            key: key("key_file"),
            value: "(missing)".into(),
            reason: format!(
                "cert_file {} needs its private key in key_file",
                c.display()
            ),
        }),
        (None, Some(k)) => problems.push(Problem {
            key: key("cert_file"),
            value: "(missing)".into(),
            reason: format!(
                "key_file {} needs its certificate in cert_file",
                k.display()
            ),
        }),
        _ => {}
    }
    if any_tls {
        if let Some(ca) = &m.ca_file {
            if let Err(why) = load_ca_file(ca) {
                problems.push(Problem {
                    key: key("ca_file"),
                    value: path(ca),
                    reason: why,
                });
            }
        }
        if let (Some(c), Some(k)) = (&m.cert_file, &m.key_file) {
            if let Err((which, why)) = crate::tls::load_client_identity(c, k) {
                problems.push(Problem {
                    key: key(which),
                    value: path(if which == "cert_file" { c } else { k }),
                    reason: why,
                });
            }
        }
    }
}

/// Reads a PEM file of CA certificates (an uplink's `ca_file`); says why not in words an
/// operator can act on.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")".into());
    }
    Ok(certs)
}

/// Whether `b` may appear in a Kafka topic name.
pub fn kafka_topic_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-'
}

/// A template without its `{...}` placeholders.
fn strip_placeholders(t: &str) -> String {
    let mut out = String::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        match rest[open..].find('}') {
            Some(close) => rest = &rest[open + close + 1..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn templates_accept_known_placeholders_and_name_unknown_ones() {
        assert!(check_template("{topic}").is_ok());
        assert!(check_template("site.{client_id}.{topic[1]}").is_ok());
        assert!(check_template("plain").is_ok());
        let e = check_template("{device}").unwrap_err();
        assert!(e.contains("{device}"), "{e}");
        assert!(check_template("{topic").is_err());
        assert!(check_template("{topic[x]}").is_err());
    }

    fn problems(text: &str) -> Vec<String> {
        match crate::config::Config::from_toml_str(text) {
            Err(crate::config::ConfigError::Invalid { problems }) => {
                problems.iter().map(|p| p.to_string()).collect()
            }
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn kafka_uplink_parses_with_defaults() {
        let c = crate::config::Config::from_toml_str(
            r#"
            [[uplinks]]
            name = "kafka"
            type = "kafka"
            bootstrap = ["127.0.0.1:9092"]
            topic = "site1.{topic[0]}"
            compression = "gzip"
            confirm_timeout = "5s"
            "#,
        )
        .unwrap();
        let UplinkConfig::Kafka(k) = &c.uplinks[0] else {
            panic!("{:?}", c.uplinks[0]);
        };
        assert_eq!(k.compression, KafkaCompression::Gzip);
        assert!(!k.create_topics);
        assert_eq!(k.partitions, DEFAULT_KAFKA_PARTITIONS);
        assert_eq!(k.replication_factor, DEFAULT_KAFKA_REPLICATION_FACTOR);
        assert_eq!(k.max_batch, DEFAULT_KAFKA_MAX_BATCH);
        assert_eq!(k.max_batch_bytes, DEFAULT_KAFKA_MAX_BATCH_BYTES);
        assert_eq!(k.window, DEFAULT_KAFKA_WINDOW);
        assert_eq!(k.confirm_timeout, Duration::from_secs(5));
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn a_kafka_max_batch_bytes_out_of_range_is_named() {
        let p = problems(
            "[[uplinks]]\nname = \"k\"\ntype = \"kafka\"\nbootstrap = [\"h:1\"]\ntopic = \"t\"\nmax_batch_bytes = 100\n",
        );
        assert!(
            p.iter().any(|p| p.contains("uplinks[0].max_batch_bytes")
                && p.contains("100")
                && p.contains("message.max.bytes")),
            "{p:?}"
        );
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn kafka_linger_tls_and_sasl_parse_and_the_password_never_shows_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let c = crate::config::Config::from_toml_str(&format!(
            r#"
            [[uplinks]]
            name = "kafka"
            type = "kafka"
            bootstrap = ["127.0.0.1:9093"]
            topic = "t"
            linger = "20ms"
            tls = true
            ca_file = {ca:?}
            sasl = {{ mechanism = "scram-sha-512", username = "gw", password = "s3cret" }}
            "#,
            ca = ca.display().to_string()
        ))
        .unwrap();
        let UplinkConfig::Kafka(k) = &c.uplinks[0] else {
            panic!("{:?}", c.uplinks[0]);
        };
        assert_eq!(k.linger, Duration::from_millis(20));
        assert_eq!(c.uplinks[0].linger(), Duration::from_millis(20));
        assert!(k.tls);
        assert_eq!(k.ca_file.as_deref(), Some(ca.as_path()));
        let sasl = k.sasl.as_ref().unwrap();
        assert_eq!(sasl.mechanism, SaslMechanism::ScramSha512);
        assert_eq!(sasl.password().unwrap(), "s3cret");
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");

        // Defaults: 5 ms linger, no TLS, no SASL.
        let c = crate::config::Config::from_toml_str(
            "[[uplinks]]\nname = \"k\"\ntype = \"kafka\"\nbootstrap = [\"h:1\"]\ntopic = \"t\"\n",
        )
        .unwrap();
        let UplinkConfig::Kafka(k) = &c.uplinks[0] else {
            panic!()
        };
        assert_eq!(k.linger, DEFAULT_KAFKA_LINGER);
        assert!(!k.tls && k.ca_file.is_none() && k.sasl.is_none());
    }

    #[cfg(not(feature = "kafka"))]
    #[test]
    fn a_kafka_uplink_without_the_kafka_feature_names_the_key_and_the_feature() {
        let p = problems(
            "[[uplinks]]\nname = \"k\"\ntype = \"kafka\"\nbootstrap = [\"h:1\"]\ntopic = \"t\"\n",
        );
        assert_eq!(
            p,
            vec![format!("uplinks[0].type = \"kafka\": {KAFKA_NOT_BUILT}")]
        );
    }

    #[test]
    fn kafka_linger_tls_and_sasl_problems_name_the_key() {
        let p = problems(
            r#"
            [[uplinks]]
            name = "kafka"
            type = "kafka"
            bootstrap = ["h:9092"]
            topic = "t"
            linger = "5s"
            ca_file = "/nonexistent/ca.pem"
            sasl = { mechanism = "plain", username = "", password = "x", password_env = "P" }
            "#,
        )
        .join("\n");
        for key in [
            "uplinks[0].linger = \"5s\"",
            "uplinks[0].ca_file",
            "only used with tls = true",
            "uplinks[0].sasl.username",
            "uplinks[0].sasl.password = (hidden)",
        ] {
            assert!(p.contains(key), "{key} missing in:\n{p}");
        }
        assert!(!p.contains("\"x\""), "the password is not shown: {p}");
        let p = problems(
            r#"
            [[uplinks]]
            name = "kafka"
            type = "kafka"
            bootstrap = ["h:9092"]
            topic = "t"
            tls = true
            ca_file = "/nonexistent/ca.pem"
            sasl = { mechanism = "scram-sha-256", username = "gw" }
            "#,
        )
        .join("\n");
        for key in [
            "uplinks[0].ca_file = \"/nonexistent/ca.pem\": cannot read it",
            "uplinks[0].sasl.password_env",
        ] {
            assert!(p.contains(key), "{key} missing in:\n{p}");
        }
        let e = crate::config::Config::from_toml_str(
            "[[uplinks]]\nname = \"k\"\ntype = \"kafka\"\nbootstrap = [\"h:1\"]\ntopic = \"t\"\nsasl = { mechanism = \"gssapi\", username = \"u\", password = \"p\" }\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("gssapi"), "{e}");
    }

    #[test]
    fn amqp_urls_name_a_cluster_instead_of_url_and_the_window_has_bounds() {
        let c = crate::config::Config::from_toml_str(
            r#"
            [[uplinks]]
            name = "a"
            type = "amqp"
            urls = ["amqp://u:p@h1:5672/%2f", "amqps://u:p@h2:5671/%2f"]
            exchange = "x"
            "#,
        )
        .unwrap();
        let UplinkConfig::Amqp(a) = &c.uplinks[0] else {
            panic!()
        };
        assert_eq!(a.urls().len(), 2);
        assert_eq!(c.uplinks[0].nodes(), 2);
        assert_eq!(c.uplinks[0].node_label(1), "amqps://u:***@h2:5671/%2f");
        assert_eq!(a.window, DEFAULT_WINDOW);
        assert_eq!(a.window_bytes, DEFAULT_WINDOW_BYTES);
        let p = problems(
            r#"
            [[uplinks]]
            name = "a"
            type = "amqp"
            url = "amqp://h:5672"
            urls = ["amqp://h:5672", "http://secret@h:1"]
            exchange = "x"
            window_bytes = 10
            "#,
        )
        .join("\n");
        for want in [
            "uplinks[0].urls = (hidden): give either url or urls",
            "uplinks[0].urls[1] = (hidden)",
            "uplinks[0].window_bytes = 10",
        ] {
            assert!(p.contains(want), "{want} missing in:\n{p}");
        }
        assert!(!p.contains("secret"), "{p}");
    }

    #[test]
    fn amqp_ca_file_needs_amqps_and_a_pem_file() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.txt");
        std::fs::write(&not_pem, "hello").unwrap();
        let p = problems(&format!(
            r#"
            [[uplinks]]
            name = "a"
            type = "amqp"
            url = "amqp://guest:guest@127.0.0.1:5672/%2f"
            exchange = "x"
            ca_file = {f:?}
            [[uplinks]]
            name = "b"
            type = "amqp"
            url = "amqps://guest:guest@127.0.0.1:5671/%2f"
            exchange = "x"
            ca_file = {f:?}
            "#,
            f = not_pem.display().to_string()
        ))
        .join("\n");
        assert!(p.contains("uplinks[0].ca_file"), "{p}");
        assert!(p.contains("only used with an amqps:// url"), "{p}");
        assert!(p.contains("uplinks[1].ca_file"), "{p}");
        assert!(p.contains("holds no PEM certificate"), "{p}");
    }

    #[test]
    fn mqtt_uplink_parses_with_defaults_and_failover_urls() {
        let c = crate::config::Config::from_toml_str(
            r#"
            [gateway]
            id = "site-7"
            [[uplinks]]
            name = "cloud"
            type = "mqtt"
            urls = ["mqtts://a.example:8883", "mqtt://b.example"]
            "#,
        )
        .unwrap();
        let UplinkConfig::Mqtt(m) = &c.uplinks[0] else {
            panic!("{:?}", c.uplinks[0]);
        };
        assert_eq!(m.protocol, MqttProtocol::V5);
        assert_eq!(m.qos, 1);
        assert_eq!(m.topic, "{topic}");
        assert_eq!(m.keepalive, DEFAULT_MQTT_KEEPALIVE);
        assert_eq!(m.window, DEFAULT_WINDOW);
        assert_eq!(m.client_id(&c.gateway.id), "site-7");
        assert_eq!(c.uplinks[0].nodes(), 2);
        assert_eq!(c.uplinks[0].batch(), 256);
        assert_eq!(
            parse_mqtt_url("mqtt://b.example").unwrap(),
            (false, "b.example".to_string(), 1883)
        );
        assert_eq!(
            parse_mqtt_url("mqtts://a.example:8884/").unwrap(),
            (true, "a.example".to_string(), 8884)
        );
        let c = crate::config::Config::from_toml_str(
            "[[uplinks]]\nname = \"m\"\ntype = \"mqtt\"\nurl = \"mqtt://h:1\"\nprotocol = \"3.1.1\"\nqos = 2\nclient_id = \"gw-1\"\nkeepalive = \"10s\"\n",
        )
        .unwrap();
        let UplinkConfig::Mqtt(m) = &c.uplinks[0] else {
            panic!()
        };
        assert_eq!(m.protocol, MqttProtocol::V311);
        assert_eq!((m.qos, m.client_id("x")), (2, "gw-1"));
        assert_eq!(m.keepalive, Duration::from_secs(10));
        // 3.1.1 with QoS 2 keeps 20 flows in flight unless told otherwise; the others, no bound.
        assert_eq!(m.max_inflight(), 20);
        let c = crate::config::Config::from_toml_str(
            "[[uplinks]]\nname = \"m\"\ntype = \"mqtt\"\nurl = \"mqtt://h:1\"\nmax_inflight = 100\n",
        )
        .unwrap();
        let UplinkConfig::Mqtt(m) = &c.uplinks[0] else {
            panic!()
        };
        assert_eq!(m.max_inflight(), 100);
    }

    #[test]
    fn two_mqtt_uplinks_with_one_client_id_on_one_broker_are_refused() {
        let p = problems(
            r#"
            [[uplinks]]
            name = "a"
            type = "mqtt"
            url = "mqtt://h:1883"
            [[uplinks]]
            name = "b"
            type = "mqtt"
            urls = ["mqtt://other:1883", "mqtt://h"]
            [[uplinks]]
            name = "c"
            type = "mqtt"
            url = "mqtt://h:1883"
            client_id = "gw-c"
            max_inflight = 0
            "#,
        )
        .join("\n");
        assert!(
            p.contains("uplinks[1].client_id = (the gateway id): uplinks[0] (a) connects to the same broker"),
            "{p}"
        );
        assert!(!p.contains("uplinks[2].client_id"), "{p}");
        assert!(p.contains("uplinks[2].max_inflight = 0"), "{p}");
    }

    #[test]
    fn mqtt_uplink_problems_name_the_key_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        std::fs::write(&cert, "not a certificate").unwrap();
        let p = problems(&format!(
            r#"
            [[uplinks]]
            name = "m"
            type = "mqtt"
            url = "mqtt://user:secret@h:1883"
            topic = "site/+/{{device}}"
            qos = 0
            keepalive = "0s"
            password_env = "P"
            ca_file = {f:?}
            cert_file = {f:?}
            [[uplinks]]
            name = "n"
            type = "mqtt"
            urls = ["mqtts://h:1", "amqp://h:2"]
            topic = "a/#"
            key_file = {f:?}
            [[uplinks]]
            name = "o"
            type = "mqtt"
            url = "mqtts://h:1"
            cert_file = {f:?}
            key_file = {f:?}
            "#,
            f = cert.display().to_string()
        ))
        .join("\n");
        for want in [
            "uplinks[0].url",
            "credentials go in username and password_env",
            "uplinks[0].topic = \"site/+/{device}\": unknown placeholder",
            "uplinks[0].qos = 0: must be 1",
            "uplinks[0].keepalive",
            "uplinks[0].password_env = \"P\": MQTT sends a password only with a user name",
            "uplinks[0].ca_file",
            "only used with an mqtts:// url",
            "uplinks[0].key_file = (missing)",
            "uplinks[1].urls[1]",
            "must start with mqtt:// or mqtts://",
            "uplinks[1].topic = \"a/#\"",
            "uplinks[1].cert_file = (missing)",
            "uplinks[2].cert_file",
            "holds no PEM certificate",
        ] {
            assert!(p.contains(want), "{want} missing in:\n{p}");
        }
        assert!(!p.contains("secret"), "{p}");
        let e = crate::config::Config::from_toml_str(
            "[[uplinks]]\nname = \"m\"\ntype = \"mqtt\"\nurl = \"mqtt://h\"\nprotocol = \"4\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("`3.1.1`"), "{e}");
    }

    #[test]
    fn kafka_uplink_problems_name_the_key() {
        let p = problems(
            r#"
            [[uplinks]]
            name = "kafka"
            type = "kafka"
            bootstrap = ["localhost", "h:0"]
            topic = "bad/topic.{device}"
            partitions = 0
            "#,
        );
        let all = p.join("\n");
        for key in [
            "uplinks[0].bootstrap[0]",
            "uplinks[0].bootstrap[1]",
            "uplinks[0].topic",
            "uplinks[0].partitions",
        ] {
            assert!(all.contains(key), "{key} missing in:\n{all}");
        }
        let p = problems(
            r#"
            [[uplinks]]
            name = "kafka"
            type = "kafka"
            bootstrap = ["h:9092"]
            topic = "bad/topic"
            "#,
        );
        assert!(p.join("").contains("uplinks[0].topic"), "{p:?}");
        let e = crate::config::Config::from_toml_str(
            "[[uplinks]]\nname = \"k\"\ntype = \"kafka\"\nbootstrap = [\"h:1\"]\ntopic = \"t\"\ncompression = \"snappy\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("snappy"), "{e}");
    }
}
