//! What an upstream message becomes as an MQTT command. No I/O: the AMQP and Kafka consumers
//! turn their messages into an [`Upstream`] and store what [`map`] returns.
//!
//! | MQTT | from (first found) |
//! |---|---|
//! | topic | header `mqtt_topic`; else the `topic` template over the routing key (`.` as `/`) or Kafka key |
//! | QoS | header `mqtt_qos` (0, 1, 2); else the downlink's `qos` (default 1) |
//! | message expiry | AMQP `expiration` (ms, rounded up to s); header `mqtt_message_expiry` (s); else `ttl` |
//! | response topic | header `mqtt_response_topic`; else AMQP `reply_to` |
//! | correlation data | header `mqtt_correlation_data`; else AMQP `correlation_id` |
//! | content type | AMQP `content_type`; header `content_type` (Kafka) |
//! | user properties | every other header (text, number or boolean), `x-` headers left out; plus `message_id` |

use std::time::{Duration, SystemTime};

use crate::config::CommandOptions;
use crate::queue::NewRecord;

/// Longest topic a command may have (as `[limits] max_topic_length`'s default).
pub const MAX_COMMAND_TOPIC: usize = 256;

/// A header value as the consumers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    Text(String),
    Bytes(Vec<u8>),
    Int(i64),
    Bool(bool),
    /// Anything else (tables, arrays, floats): not passed on.
    Other,
}

impl HeaderValue {
    fn text(&self) -> Option<String> {
        match self {
            HeaderValue::Text(s) => Some(s.clone()),
            HeaderValue::Bytes(b) => String::from_utf8(b.clone()).ok(),
            HeaderValue::Int(i) => Some(i.to_string()),
            HeaderValue::Bool(b) => Some(b.to_string()),
            HeaderValue::Other => None,
        }
    }

    fn bytes(&self) -> Option<Vec<u8>> {
        match self {
            HeaderValue::Text(s) => Some(s.clone().into_bytes()),
            HeaderValue::Bytes(b) => Some(b.clone()),
            _ => self.text().map(String::into_bytes),
        }
    }
}

/// One message from upstream, transport-neutral.
#[derive(Debug, Clone, Default)]
pub struct Upstream {
    /// AMQP routing key, or Kafka key (text).
    pub routing_key: String,
    pub headers: Vec<(String, HeaderValue)>,
    pub message_id: Option<String>,
    pub correlation_id: Option<Vec<u8>>,
    pub reply_to: Option<String>,
    pub content_type: Option<String>,
    /// AMQP `expiration` as sent (milliseconds, as text).
    pub expiration: Option<String>,
    pub payload: Vec<u8>,
}

impl Upstream {
    fn header(&self, name: &str) -> Option<&HeaderValue> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

/// A command ready for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub topic: String,
    pub qos: u8,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub message_expiry: Option<u32>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub message_id: Option<String>,
}

impl Command {
    /// The record to append, as received now from downlink `origin` (see [`super::origin`]).
    pub fn record<'a>(&'a self, origin: &'a str, now: SystemTime) -> NewRecord<'a> {
        NewRecord {
            received_at: now,
            device_id: origin,
            username: None,
            topic: &self.topic,
            qos: self.qos,
            retain: false,
            user_properties: &self.user_properties,
            content_type: self.content_type.as_deref(),
            payload_format: None,
            message_expiry: self.message_expiry,
            response_topic: self.response_topic.as_deref(),
            correlation_data: self.correlation_data.as_deref(),
            payload: &self.payload,
        }
    }
}

/// Headers read by [`map`] and not passed on as user properties.
const MAPPED: &[&str] = &[
    "mqtt_topic",
    "mqtt_qos",
    "mqtt_message_expiry",
    "mqtt_response_topic",
    "mqtt_correlation_data",
    "content_type",
];

/// Turns `m` into a command under the downlink's options, or says why it cannot be one (the
/// message then goes to the dead letters).
pub fn map(opts: &CommandOptions, m: &Upstream) -> Result<Command, String> {
    let topic = match m.header("mqtt_topic") {
        Some(v) => v
            .text()
            .ok_or_else(|| "header mqtt_topic is not text".to_string())?,
        None => expand(&opts.topic, &m.routing_key),
    };
    if topic.is_empty() {
        return Err(format!(
            "no MQTT topic: no mqtt_topic header and the topic template {:?} gives nothing for routing key {:?}",
            opts.topic, m.routing_key
        ));
    }
    crate::topic::check_name(&topic, MAX_COMMAND_TOPIC)
        .map_err(|e| format!("topic {topic:?} is not a valid MQTT topic name: {e}"))?;
    if !opts
        .allowed_topics
        .iter()
        .any(|f| crate::topic::matches(f, &topic))
    {
        return Err(format!(
            "topic {topic:?} is outside allowed_topics {:?}",
            opts.allowed_topics
        ));
    }
    let qos = match m.header("mqtt_qos") {
        Some(v) => match v.text().and_then(|t| t.trim().parse::<u8>().ok()) {
            Some(q) if q <= 2 => q,
            _ => return Err(format!("header mqtt_qos {v:?} is not 0, 1 or 2")),
        },
        None => opts.qos,
    };
    if m.payload.len() as u64 > opts.max_payload {
        return Err(format!(
            "payload of {} bytes is larger than max_payload ({} bytes)",
            m.payload.len(),
            opts.max_payload
        ));
    }
    let message_expiry = match (&m.expiration, m.header("mqtt_message_expiry")) {
        (Some(ms), _) => {
            let ms: u64 = ms
                .trim()
                .parse()
                .map_err(|_| format!("AMQP expiration {ms:?} is not a number of milliseconds"))?;
            Some(secs_ceil(Duration::from_millis(ms)))
        }
        (None, Some(v)) => match v.text().and_then(|t| t.trim().parse::<u32>().ok()) {
            Some(s) => Some(s),
            None => {
                return Err(format!(
                    "header mqtt_message_expiry {v:?} is not a number of seconds"
                ))
            }
        },
        (None, None) => opts.ttl.map(secs_ceil),
    };
    let response_topic = match m.header("mqtt_response_topic") {
        Some(v) => Some(
            v.text()
                .ok_or_else(|| "header mqtt_response_topic is not text".to_string())?,
        ),
        None => m.reply_to.clone().filter(|r| !r.is_empty()),
    };
    if let Some(r) = &response_topic {
        crate::topic::check_name(r, MAX_COMMAND_TOPIC)
            .map_err(|e| format!("response topic {r:?} is not a valid MQTT topic name: {e}"))?;
    }
    let correlation_data = match m.header("mqtt_correlation_data") {
        Some(v) => Some(
            v.bytes()
                .ok_or_else(|| "header mqtt_correlation_data is not text or bytes".to_string())?,
        ),
        None => m.correlation_id.clone(),
    };
    let content_type = m
        .content_type
        .clone()
        .or_else(|| m.header("content_type").and_then(HeaderValue::text));
    let mut user_properties: Vec<(String, String)> = m
        .headers
        .iter()
        .filter(|(k, _)| !k.starts_with("x-") && !MAPPED.iter().any(|n| k.eq_ignore_ascii_case(n)))
        .filter_map(|(k, v)| v.text().map(|t| (k.clone(), t)))
        .collect();
    if let Some(id) = &m.message_id {
        if !user_properties.iter().any(|(k, _)| k == "message_id") {
            user_properties.push(("message_id".into(), id.clone()));
        }
    }
    Ok(Command {
        topic,
        qos,
        user_properties,
        content_type,
        message_expiry,
        response_topic,
        correlation_data,
        payload: m.payload.clone(),
        message_id: m.message_id.clone(),
    })
}

fn secs_ceil(d: Duration) -> u32 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    u32::try_from(s.max(1)).unwrap_or(u32::MAX)
}

/// Expands a `topic` template (validated at config load): `{routing_key}` and `{key}` with
/// `.` as `/`, `{routing_key[N]}` / `{key[N]}` the N-th `.`-separated part.
pub fn expand(template: &str, key: &str) -> String {
    let mut out = String::with_capacity(template.len() + key.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = &after[..close];
        match name {
            "routing_key" | "key" => out.push_str(&key.replace('.', "/")),
            _ => {
                let n = name
                    .strip_prefix("routing_key[")
                    .or_else(|| name.strip_prefix("key["))
                    .and_then(|n| n.strip_suffix(']'))
                    .and_then(|n| n.parse::<usize>().ok());
                if let Some(n) = n {
                    out.push_str(key.split('.').nth(n).unwrap_or(""));
                }
            }
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn opts() -> CommandOptions {
        let c = Config::from_toml_str(
            r#"
            [[downlinks]]
            name = "c"
            type = "amqp"
            url = "amqp://127.0.0.1"
            queue = "commands"
            "#,
        )
        .expect("config");
        c.downlinks[0].common().clone()
    }

    fn msg(rk: &str) -> Upstream {
        Upstream {
            routing_key: rk.into(),
            payload: b"hi".to_vec(),
            ..Upstream::default()
        }
    }

    #[test]
    fn routing_key_becomes_the_topic() {
        let c = map(&opts(), &msg("devices.dev-00001.commands.reboot")).expect("map");
        assert_eq!(c.topic, "devices/dev-00001/commands/reboot");
        assert_eq!(c.qos, 1);
        assert_eq!(c.message_expiry, None);
    }

    #[test]
    fn headers_and_properties_map_to_mqtt5() {
        let mut m = msg("ignored");
        m.headers = vec![
            (
                "mqtt_topic".into(),
                HeaderValue::Text("devices/d1/commands/x".into()),
            ),
            ("mqtt_qos".into(), HeaderValue::Int(2)),
            ("site".into(), HeaderValue::Text("north".into())),
            ("x-death".into(), HeaderValue::Other),
            ("n".into(), HeaderValue::Int(7)),
        ];
        m.message_id = Some("m-1".into());
        m.correlation_id = Some(b"corr".to_vec());
        m.reply_to = Some("devices/d1/replies".into());
        m.content_type = Some("application/json".into());
        m.expiration = Some("1500".into());
        let c = map(&opts(), &m).expect("map");
        assert_eq!(c.topic, "devices/d1/commands/x");
        assert_eq!(c.qos, 2);
        assert_eq!(c.message_expiry, Some(2));
        assert_eq!(c.response_topic.as_deref(), Some("devices/d1/replies"));
        assert_eq!(c.correlation_data.as_deref(), Some(&b"corr"[..]));
        assert_eq!(c.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            c.user_properties,
            vec![
                ("site".to_string(), "north".to_string()),
                ("n".to_string(), "7".to_string()),
                ("message_id".to_string(), "m-1".to_string())
            ]
        );
    }

    #[test]
    fn bad_input_is_refused_with_the_reason() {
        let o = opts();
        let why = map(&o, &msg("telemetry.d1")).expect_err("refused");
        assert!(why.contains("outside allowed_topics"), "{why}");
        let why = map(&o, &msg("")).expect_err("refused");
        assert!(why.contains("no MQTT topic"), "{why}");
        let why = map(&o, &msg("devices.+.commands.x")).expect_err("refused");
        assert!(why.contains("not a valid MQTT topic"), "{why}");
        let mut m = msg("devices.d1.commands.x");
        m.payload = vec![0; (o.max_payload + 1) as usize];
        assert!(map(&o, &m).expect_err("refused").contains("max_payload"));
        let mut m = msg("devices.d1.commands.x");
        m.headers = vec![("mqtt_qos".into(), HeaderValue::Text("3".into()))];
        assert!(map(&o, &m).expect_err("refused").contains("mqtt_qos"));
        let mut m = msg("devices.d1.commands.x");
        m.expiration = Some("soon".into());
        assert!(map(&o, &m).expect_err("refused").contains("expiration"));
        let mut m = msg("devices.d1.commands.x");
        m.headers = vec![("mqtt_topic".into(), HeaderValue::Bytes(vec![0xff]))];
        assert!(map(&o, &m).expect_err("refused").contains("not text"));
    }

    #[test]
    fn templates_expand_parts() {
        assert_eq!(
            expand("devices/{key}/commands", "d1"),
            "devices/d1/commands"
        );
        assert_eq!(expand("x/{routing_key[1]}", "a.b.c"), "x/b");
        assert_eq!(expand("{routing_key}", "a.b"), "a/b");
    }
}
