//! The command sections: `[downlink]` (the command store) and `[[downlinks]]` (where commands
//! come from).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::uplink::{check_kafka_client, kafka_topic_byte, KafkaSasl, KAFKA_NOT_BUILT};
use super::{de, duration_value, quoted, Problem};

/// Commands kept for a device that has not subscribed yet, before they are dead-lettered.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(3600);
/// Unacknowledged AMQP deliveries per downlink: the commands on their way into the store.
pub const DEFAULT_PREFETCH: u16 = 64;
/// The largest command payload accepted (bigger ones are dead letters).
pub const DEFAULT_MAX_COMMAND_BYTES: u64 = 256 << 10;
/// The command store's bound on disk: when it is full, the downlinks stop consuming.
pub const DEFAULT_DOWNLINK_MAX_BYTES: u64 = 64 << 20;
/// Where a downlink may write, unless configured: the devices' command topics.
pub const DEFAULT_ALLOWED_TOPICS: &str = "devices/+/commands/#";
/// The MQTT topic of a Kafka command without an `mqtt_topic` header. A Kafka producer keys a
/// device's commands by its device id (so that they share a partition and stay in order), so
/// the key names the device, not the whole topic as an AMQP routing key does; the command's
/// name, if any, comes in the `mqtt_topic` header (`devices/dev-1/commands/reboot`).
pub const DEFAULT_KAFKA_COMMAND_TOPIC: &str = "devices/{key}/commands";
/// How long a Kafka fetch waits at the broker for records before it answers empty: the
/// latency of a command when the topic is idle is at most this plus the round trip, and an
/// idle downlink sends two fetches a second per partition.
pub const DEFAULT_KAFKA_MAX_WAIT: Duration = Duration::from_millis(500);
/// Bytes a Kafka fetch asks for at most (per partition): many commands in one fetch, one
/// sync, one offsets write; far below the command store's bound.
pub const DEFAULT_KAFKA_FETCH_BYTES: u64 = 1 << 20;
/// A Kafka request (metadata, fetch beyond `max_wait`) not answered within this: the
/// connection is taken as lost and made again.
pub const DEFAULT_KAFKA_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `[downlink]`: the durable store that holds commands between the upstream ack and the
/// device's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownlinkStoreConfig {
    /// Bytes of commands stored at most, all downlinks together (the total bound).
    #[serde(deserialize_with = "de::byte_size")]
    pub max_bytes: u64,
}

impl Default for DownlinkStoreConfig {
    fn default() -> Self {
        DownlinkStoreConfig {
            max_bytes: DEFAULT_DOWNLINK_MAX_BYTES,
        }
    }
}

/// One `[[downlinks]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum DownlinkConfig {
    Amqp(AmqpDownlinkConfig),
    Kafka(KafkaDownlinkConfig),
}

impl DownlinkConfig {
    pub fn name(&self) -> &str {
        match self {
            DownlinkConfig::Amqp(a) => &a.name,
            DownlinkConfig::Kafka(k) => &k.name,
        }
    }

    pub fn common(&self) -> &CommandOptions {
        match self {
            DownlinkConfig::Amqp(a) => &a.command,
            DownlinkConfig::Kafka(k) => &k.command,
        }
    }

    /// The key that holds the MQTT topic template (`topic` for AMQP; for Kafka `topic` names
    /// the Kafka topic, so the template is `mqtt_topic`).
    fn template_key(&self) -> &'static str {
        match self {
            DownlinkConfig::Amqp(_) => "topic",
            DownlinkConfig::Kafka(_) => "mqtt_topic",
        }
    }
}

/// How upstream messages become MQTT commands: the same keys for every downlink type.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandOptions {
    /// The MQTT topic when the message has no `mqtt_topic` header: `{routing_key}` (AMQP, with
    /// `.` as `/`), `{key}` (Kafka), `{routing_key[N]}` / `{key}` parts. Default `{routing_key}`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// QoS when the message has no `mqtt_qos` header (1 or 2).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Commands expire this long after they arrive when the message sets no expiry of its own.
    #[serde(default, deserialize_with = "de::optional_duration")]
    pub ttl: Option<Duration>,
    /// A command that matches no subscribed session waits this long for one, then is a dead
    /// letter.
    #[serde(default = "default_hold", deserialize_with = "de::duration")]
    pub hold: Duration,
    /// MQTT topic filters this downlink may write to.
    #[serde(default = "default_allowed_topics")]
    pub allowed_topics: Vec<String>,
    /// Largest payload accepted, in bytes.
    #[serde(
        default = "default_max_command_bytes",
        deserialize_with = "de::byte_size"
    )]
    pub max_payload: u64,
}

fn default_topic() -> String {
    "{routing_key}".into()
}
fn default_qos() -> u8 {
    1
}
fn default_hold() -> Duration {
    DEFAULT_HOLD
}
fn default_allowed_topics() -> Vec<String> {
    vec![DEFAULT_ALLOWED_TOPICS.into()]
}
fn default_max_command_bytes() -> u64 {
    DEFAULT_MAX_COMMAND_BYTES
}
fn default_prefetch() -> u16 {
    DEFAULT_PREFETCH
}
fn default_backoff_min() -> Duration {
    super::DEFAULT_BACKOFF_MIN
}
fn default_backoff_max() -> Duration {
    super::DEFAULT_BACKOFF_MAX
}

/// An AMQP 0-9-1 downlink: a queue consumed with manual acks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpDownlinkConfig {
    pub name: String,
    /// One node (`amqp://` or `amqps://`); for a cluster use `urls`.
    #[serde(default)]
    pub url: String,
    /// Nodes tried in turn.
    #[serde(default)]
    pub urls: Vec<String>,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The queue consumed.
    pub queue: String,
    /// Declare the queue (durable) at connect, and with `exchange` the exchange (topic,
    /// durable) and the binding.
    #[serde(default)]
    pub declare: bool,
    /// Bind the queue to this exchange (with `declare`).
    #[serde(default)]
    pub exchange: Option<String>,
    /// The binding key (default `#`).
    #[serde(default = "default_binding_key")]
    pub binding_key: String,
    /// Unacknowledged deliveries at most.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    #[serde(default = "default_backoff_min", deserialize_with = "de::duration")]
    pub backoff_min: Duration,
    #[serde(default = "default_backoff_max", deserialize_with = "de::duration")]
    pub backoff_max: Duration,
    #[serde(flatten)]
    pub command: CommandOptions,
}

fn default_binding_key() -> String {
    "#".into()
}

impl AmqpDownlinkConfig {
    /// The configured nodes: `urls`, or `url` alone.
    pub fn urls(&self) -> Vec<&str> {
        if self.urls.is_empty() {
            vec![self.url.as_str()]
        } else {
            self.urls.iter().map(String::as_str).collect()
        }
    }
}

/// Where a Kafka downlink starts in a partition it has no stored offset for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KafkaStart {
    /// The oldest record the broker still keeps: commands sent while the gateway was being
    /// installed (or before its offsets were lost) are delivered, not silently skipped.
    #[default]
    Earliest,
    /// Only records produced from now on.
    Latest,
}

/// A Kafka downlink: every partition of one topic, read from the offsets the gateway keeps
/// (`data_dir/downlink/kafka-<name>.offsets`; rskafka has no consumer groups).
///
/// Its Kafka topic is `topic`, so the MQTT topic template of the shared command keys is
/// `mqtt_topic` here (default [`DEFAULT_KAFKA_COMMAND_TOPIC`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawKafkaDownlink")]
pub struct KafkaDownlinkConfig {
    pub name: String,
    /// Bootstrap brokers, `host:port` each.
    pub bootstrap: Vec<String>,
    /// The Kafka topic consumed (all its partitions).
    pub topic: String,
    /// Speak TLS (rustls) to every broker, as the Kafka uplink does.
    pub tls: bool,
    /// With `tls`: a PEM file of CA certificates to trust besides the system's store.
    pub ca_file: Option<PathBuf>,
    /// SASL authentication (PLAIN or SCRAM), as the Kafka uplink has it.
    pub sasl: Option<KafkaSasl>,
    /// Where to begin in a partition with no stored offset.
    pub start: KafkaStart,
    /// How long a fetch waits at the broker for records.
    pub max_wait: Duration,
    /// Bytes per fetch (per partition), at most.
    pub fetch_bytes: u64,
    /// A request not answered within this (beyond `max_wait`): reconnect.
    pub request_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// The shared command keys; `command.topic` is the `mqtt_topic` template.
    pub command: CommandOptions,
}

/// The keys of a `type = "kafka"` downlink as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafkaDownlink {
    name: String,
    bootstrap: Vec<String>,
    topic: String,
    #[serde(default)]
    tls: bool,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    sasl: Option<KafkaSasl>,
    #[serde(default)]
    start: KafkaStart,
    #[serde(default = "default_kafka_max_wait", deserialize_with = "de::duration")]
    max_wait: Duration,
    #[serde(
        default = "default_kafka_fetch_bytes",
        deserialize_with = "de::byte_size"
    )]
    fetch_bytes: u64,
    #[serde(
        default = "default_kafka_request_timeout",
        deserialize_with = "de::duration"
    )]
    request_timeout: Duration,
    #[serde(default = "default_backoff_min", deserialize_with = "de::duration")]
    backoff_min: Duration,
    #[serde(default = "default_backoff_max", deserialize_with = "de::duration")]
    backoff_max: Duration,
    /// The MQTT topic template (the shared `topic` key under another name).
    #[serde(default)]
    mqtt_topic: Option<String>,
    #[serde(flatten)]
    command: CommandOptions,
}

impl TryFrom<RawKafkaDownlink> for KafkaDownlinkConfig {
    type Error = String;

    fn try_from(r: RawKafkaDownlink) -> Result<Self, String> {
        let mut command = r.command;
        command.topic = r
            .mqtt_topic
            .unwrap_or_else(|| DEFAULT_KAFKA_COMMAND_TOPIC.into());
        Ok(KafkaDownlinkConfig {
            name: r.name,
            bootstrap: r.bootstrap,
            topic: r.topic,
            tls: r.tls,
            ca_file: r.ca_file,
            sasl: r.sasl,
            start: r.start,
            max_wait: r.max_wait,
            fetch_bytes: r.fetch_bytes,
            request_timeout: r.request_timeout,
            backoff_min: r.backoff_min,
            backoff_max: r.backoff_max,
            command,
        })
    }
}

fn default_kafka_max_wait() -> Duration {
    DEFAULT_KAFKA_MAX_WAIT
}
fn default_kafka_fetch_bytes() -> u64 {
    DEFAULT_KAFKA_FETCH_BYTES
}
fn default_kafka_request_timeout() -> Duration {
    DEFAULT_KAFKA_REQUEST_TIMEOUT
}

/// Placeholders a downlink's `topic` template may use.
pub fn check_command_template(t: &str) -> Result<(), String> {
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err("a '{' without its '}'".into());
        };
        let name = &after[..close];
        let indexed = |p: &str| {
            name.strip_prefix(p)
                .and_then(|n| n.strip_prefix('['))
                .and_then(|n| n.strip_suffix(']'))
                .is_some_and(|n| n.parse::<usize>().is_ok())
        };
        if !(matches!(name, "routing_key" | "key") || indexed("routing_key") || indexed("key")) {
            return Err(format!(
                "unknown placeholder {{{name}}}; use {{routing_key}}, {{key}}, {{routing_key[N]}} or {{key[N]}}"
            ));
        }
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err("a '}' without its '{'".into());
    }
    Ok(())
}

pub(super) fn check(downlinks: &[DownlinkConfig], problems: &mut Vec<Problem>) {
    let mut names = HashSet::new();
    for (i, d) in downlinks.iter().enumerate() {
        let key = |k: &str| format!("downlinks[{i}].{k}");
        let name = d.name();
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            problems.push(Problem {
                key: key("name"),
                value: quoted(name),
                reason: "use 1 to 64 of A-Z a-z 0-9 - _".into(),
            });
        } else if !names.insert(name) {
            problems.push(Problem {
                key: key("name"),
                value: quoted(name),
                reason: "another downlink has this name; names must be unique".into(),
            });
        }
        let c = d.common();
        if let Err(why) = check_command_template(&c.topic) {
            problems.push(Problem {
                key: key(d.template_key()),
                value: quoted(&c.topic),
                reason: why,
            });
        }
        if !(1..=2).contains(&c.qos) {
            problems.push(Problem {
                key: key("qos"),
                value: c.qos.to_string(),
                reason: "commands go at QoS 1 or 2 (acknowledged by the device)".into(),
            });
        }
        if c.allowed_topics.is_empty() {
            problems.push(Problem {
                key: key("allowed_topics"),
                value: "[]".into(),
                reason: format!(
                    "give at least one topic filter (the default is [\"{DEFAULT_ALLOWED_TOPICS}\"])"
                ),
            });
        }
        for (j, f) in c.allowed_topics.iter().enumerate() {
            if let Err(e) = crate::topic::check_filter(f) {
                problems.push(Problem {
                    key: key(&format!("allowed_topics[{j}]")),
                    value: quoted(f),
                    reason: e.to_string(),
                });
            }
        }
        if c.max_payload == 0 || c.max_payload > 256 << 20 {
            problems.push(Problem {
                key: key("max_payload"),
                value: c.max_payload.to_string(),
                reason: "use 1 byte to 256 MiB".into(),
            });
        }
        if c.hold.is_zero() {
            problems.push(Problem {
                key: key("hold"),
                value: duration_value(c.hold),
                reason: "use at least 1s (commands that match no session wait this long)".into(),
            });
        }
        if c.ttl.is_some_and(|t| t.is_zero()) {
            problems.push(Problem {
                key: key("ttl"),
                value: "0s".into(),
                reason: "leave ttl out for no expiry, or give at least 1s".into(),
            });
        }
        match d {
            DownlinkConfig::Amqp(a) => check_amqp(a, &key, problems),
            DownlinkConfig::Kafka(k) => check_kafka(k, &key, problems),
        }
    }
}

fn check_amqp(a: &AmqpDownlinkConfig, key: &dyn Fn(&str) -> String, problems: &mut Vec<Problem>) {
    super::uplink::check_amqp_urls(&a.url, &a.urls, key, problems);
    if a.queue.is_empty() {
        problems.push(Problem {
            key: key("queue"),
            value: "\"\"".into(),
            reason: "name the queue to consume".into(),
        });
    }
    if a.exchange.is_some() && !a.declare {
        problems.push(Problem {
            key: key("exchange"),
            value: quoted(a.exchange.as_deref().unwrap_or("")),
            reason: "the binding is made only with declare = true; set it, or bind the queue yourself and leave exchange out".into(),
        });
    }
    if a.prefetch == 0 {
        problems.push(Problem {
            key: key("prefetch"),
            value: "0".into(),
            reason: "0 would mean no limit; use 1 to 65535".into(),
        });
    }
    if a.backoff_min > a.backoff_max || a.backoff_min.is_zero() {
        problems.push(Problem {
            key: key("backoff_min"),
            value: duration_value(a.backoff_min),
            reason: "must be more than 0 and at most backoff_max".into(),
        });
    }
}

fn check_kafka(k: &KafkaDownlinkConfig, key: &dyn Fn(&str) -> String, problems: &mut Vec<Problem>) {
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
    if k.topic.is_empty() || k.topic.len() > 249 || !k.topic.bytes().all(kafka_topic_byte) {
        problems.push(Problem {
            key: key("topic"),
            value: quoted(&k.topic),
            reason: "name the Kafka topic to consume: 1 to 249 of A-Z a-z 0-9 . _ - (the MQTT \
                     topic template is mqtt_topic)"
                .into(),
        });
    }
    if k.max_wait.is_zero() || k.max_wait > Duration::from_secs(60) {
        problems.push(Problem {
            key: key("max_wait"),
            value: duration_value(k.max_wait),
            reason: "use 1ms to 60s (how long a fetch waits at the broker for records)".into(),
        });
    }
    if k.fetch_bytes < 1024 || k.fetch_bytes > 64 << 20 {
        problems.push(Problem {
            key: key("fetch_bytes"),
            value: k.fetch_bytes.to_string(),
            reason: "use 1 KiB to 64 MiB".into(),
        });
    }
    if k.request_timeout < Duration::from_secs(1) {
        problems.push(Problem {
            key: key("request_timeout"),
            value: duration_value(k.request_timeout),
            reason: "use at least 1s".into(),
        });
    }
    if k.backoff_min > k.backoff_max || k.backoff_min.is_zero() {
        problems.push(Problem {
            key: key("backoff_min"),
            value: duration_value(k.backoff_min),
            reason: "must be more than 0 and at most backoff_max".into(),
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        assert!(check_command_template("{routing_key}").is_ok());
        assert!(check_command_template("devices/{key}/commands").is_ok());
        assert!(check_command_template("a/{routing_key[2]}").is_ok());
        assert!(check_command_template("{topic}").is_err());
        assert!(check_command_template("{key").is_err());
    }

    fn problems(body: &str) -> String {
        let text = format!(
            "[[downlinks]]\nname = \"c\"\ntype = \"amqp\"\nurl = \"amqp://h\"\nqueue = \"q\"\n{body}"
        );
        match crate::config::Config::from_toml_str(&text) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_downlink_keys_are_named_with_the_reason() {
        assert_eq!(problems(""), "", "the minimal downlink is valid");
        for (body, key, why) in [
            (
                "topic = \"{topic}\"",
                "downlinks[0].topic",
                "unknown placeholder",
            ),
            ("qos = 0", "downlinks[0].qos", "QoS 1 or 2"),
            (
                "exchange = \"x\"",
                "downlinks[0].exchange",
                "declare = true",
            ),
            (
                "allowed_topics = [\"a/#/b\"]",
                "downlinks[0].allowed_topics[0]",
                "",
            ),
            (
                "allowed_topics = []",
                "downlinks[0].allowed_topics",
                "at least one",
            ),
            ("prefetch = 0", "downlinks[0].prefetch", "1 to 65535"),
            ("hold = \"0s\"", "downlinks[0].hold", "at least 1s"),
            ("max_payload = \"0\"", "downlinks[0].max_payload", "1 byte"),
        ] {
            let e = problems(body);
            assert!(e.contains(key) && e.contains(why), "{body}: {e}");
        }
        let e = crate::config::Config::from_toml_str(
            "[[downlinks]]\nname = \"c\"\ntype = \"amqp\"\nurl = \"ftp://h\"\nqueue = \"q\"\n",
        )
        .expect_err("bad scheme")
        .to_string();
        assert!(
            e.contains("downlinks[0].url") && e.contains("amqp://"),
            "{e}"
        );
    }

    fn kafka_problems(text: &str) -> Vec<String> {
        match crate::config::Config::from_toml_str(text) {
            Err(crate::config::ConfigError::Invalid { problems }) => {
                problems.iter().map(|p| p.to_string()).collect()
            }
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    const KAFKA: &str = "[[downlinks]]\nname = \"k\"\ntype = \"kafka\"\nbootstrap = [\"h:9092\"]\ntopic = \"commands\"\n";

    #[test]
    #[cfg(feature = "kafka")]
    fn kafka_downlink_defaults() {
        let c = crate::config::Config::from_toml_str(KAFKA).unwrap();
        let DownlinkConfig::Kafka(k) = &c.downlinks[0] else {
            panic!("{:?}", c.downlinks[0]);
        };
        assert_eq!(k.topic, "commands");
        assert_eq!(k.command.topic, DEFAULT_KAFKA_COMMAND_TOPIC);
        assert_eq!(k.start, KafkaStart::Earliest);
        assert_eq!(k.max_wait, DEFAULT_KAFKA_MAX_WAIT);
        assert_eq!(k.fetch_bytes, DEFAULT_KAFKA_FETCH_BYTES);
        assert_eq!(k.command.qos, 1);
        assert_eq!(k.command.allowed_topics, [DEFAULT_ALLOWED_TOPICS]);
        assert!(!k.tls && k.sasl.is_none());
    }

    #[test]
    fn kafka_downlink_unknown_keys_and_bad_values_name_the_key() {
        let e = crate::config::Config::from_toml_str(&format!("{KAFKA}bogus = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = crate::config::Config::from_toml_str(&format!("{KAFKA}start = \"middle\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("middle") && e.contains("earliest"), "{e}");
        let p = kafka_problems(
            r#"
            [[downlinks]]
            name = "k"
            type = "kafka"
            bootstrap = ["nohost"]
            topic = "a/b"
            mqtt_topic = "devices/{device}/x"
            max_wait = "2m"
            fetch_bytes = 10
            ca_file = "/nonexistent/ca.pem"
            sasl = { mechanism = "plain", username = "u" }
            "#,
        )
        .join("\n");
        for want in [
            "downlinks[0].bootstrap[0] = \"nohost\"",
            "downlinks[0].topic = \"a/b\"",
            "downlinks[0].mqtt_topic = \"devices/{device}/x\": unknown placeholder",
            "downlinks[0].max_wait",
            "downlinks[0].fetch_bytes = 10",
            "downlinks[0].ca_file",
            "downlinks[0].sasl.password_env",
        ] {
            assert!(p.contains(want), "{want} missing in:\n{p}");
        }
    }

    #[test]
    #[cfg(feature = "kafka")]
    fn the_commented_kafka_example_in_the_default_config_is_valid() {
        let text = crate::config::DEFAULT_CONFIG;
        let start = text
            .find("# [[downlinks]]\n# name = \"kcmds\"")
            .expect("the Kafka downlink example");
        let example: String = text[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", l.trim_start_matches('#').trim_start()))
            .collect();
        let c = crate::config::Config::from_toml_str(&example).expect("the example parses");
        let DownlinkConfig::Kafka(k) = &c.downlinks[0] else {
            panic!("{:?}", c.downlinks[0]);
        };
        assert_eq!(k.command.topic, DEFAULT_KAFKA_COMMAND_TOPIC);
        assert_eq!(k.max_wait, DEFAULT_KAFKA_MAX_WAIT);
        assert_eq!(k.fetch_bytes, DEFAULT_KAFKA_FETCH_BYTES);
        assert_eq!(k.request_timeout, DEFAULT_KAFKA_REQUEST_TIMEOUT);
    }
}
