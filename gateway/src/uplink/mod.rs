//! Uplinks: where the forwarder sends records, and what they need from a record (routing,
//! templates, the stable message id). One module per protocol (`amqp`, `kafka`); [`Uplink`]
//! dispatches on the configured kind, so one forwarder loop serves both.
//!
//! An uplink takes a batch of prepared messages and answers, per message and in order, whether
//! the upstream confirmed it, returned it (unroutable) or refused it (nack). A dropped
//! connection or a confirm timeout is an error for the whole batch: the forwarder reconnects and
//! sends again from its cursor (at least once).

pub mod amqp;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod murmur2;

use crate::config::{PayloadMode, RouteConfig, UplinkConfig};
use crate::queue::Record;
use std::sync::Arc;

use amqp::AmqpUplink;
#[cfg(feature = "kafka")]
use kafka::KafkaUplink;

/// A connected uplink of either kind. An enum rather than a trait object: two kinds, async
/// methods, and no boxed futures on the hot path.
pub enum Uplink {
    /// Boxed: lapin's connection and channel are large, and the enum is moved around.
    Amqp(Box<AmqpUplink>),
    #[cfg(feature = "kafka")]
    Kafka(KafkaUplink),
}

impl Uplink {
    pub async fn connect(cfg: &UplinkConfig, gateway_id: &str) -> Result<Uplink, UplinkError> {
        Ok(match cfg {
            UplinkConfig::Amqp(a) => {
                Uplink::Amqp(Box::new(AmqpUplink::connect(a, gateway_id).await?))
            }
            #[cfg(feature = "kafka")]
            UplinkConfig::Kafka(k) => Uplink::Kafka(KafkaUplink::connect(k, gateway_id).await?),
            // Validation refuses such a config (see `config::uplink`); this is the backstop.
            #[cfg(not(feature = "kafka"))]
            UplinkConfig::Kafka(k) => {
                return Err(UplinkError::Connect {
                    uplink: k.name.clone(),
                    why: crate::config::KAFKA_NOT_BUILT.into(),
                })
            }
        })
    }

    /// Sends the batch in order; one outcome per message, in the batch's order.
    /// Sends the batch in order. On failure, `SendFailure::settled` holds the outcomes that did
    /// arrive for a prefix of the batch (their records are not re-sent).
    pub async fn send(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, SendFailure> {
        match self {
            Uplink::Amqp(u) => u.send(batch).await,
            #[cfg(feature = "kafka")]
            Uplink::Kafka(u) => u.send(batch).await,
        }
    }

    pub async fn close(self) {
        match self {
            Uplink::Amqp(u) => u.close().await,
            #[cfg(feature = "kafka")]
            Uplink::Kafka(u) => u.close().await,
        }
    }
}

/// The uplink's type and where it sends (credentials masked), for logs and the operator.
pub fn describe(cfg: &UplinkConfig) -> (&'static str, String) {
    match cfg {
        UplinkConfig::Amqp(a) => (
            "amqp",
            format!("{} exchange {:?}", amqp::masked_url(&a.url), a.exchange),
        ),
        UplinkConfig::Kafka(k) => (
            "kafka",
            format!("{} topic {:?}", k.bootstrap.join(","), k.topic),
        ),
    }
}

/// Destination and key of `r` on the uplink `cfg`: AMQP exchange and routing key from their
/// templates; Kafka topic from its template and the device id as key. Either way `{topic}` has
/// `/` turned into `.`.
pub fn address(cfg: &UplinkConfig, r: &Record) -> (String, String) {
    match cfg {
        UplinkConfig::Amqp(a) => (
            expand(&a.exchange, r, true),
            expand(&a.routing_key, r, true),
        ),
        UplinkConfig::Kafka(k) => (expand(&k.topic, r, true), r.device_id.clone()),
    }
}

/// What the upstream said about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored by the upstream (publisher confirm / acks=all).
    Confirmed,
    /// Unroutable: the broker returned it (reply code and text).
    Returned { code: u16, text: String },
    /// The broker refused it (nack): retried, then dead-lettered.
    Nacked,
}

/// Why a batch could not be sent. Always retryable: reconnect, re-send from the cursor.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UplinkError {
    #[error("uplink {uplink}: cannot connect: {why}")]
    Connect { uplink: String, why: String },
    #[error("uplink {uplink}: connection lost: {why}")]
    Lost { uplink: String, why: String },
    #[error("uplink {uplink}: no confirm within {secs} s (stalled)")]
    Stalled { uplink: String, secs: u64 },
}

impl UplinkError {
    /// A bounded label for metrics and state.
    pub fn as_label(&self) -> &'static str {
        match self {
            UplinkError::Connect { .. } => "connect",
            UplinkError::Lost { .. } => "lost",
            UplinkError::Stalled { .. } => "stalled",
        }
    }
}

/// A failed send: the error, the outcomes received for a prefix of the batch before it, and
/// the records after that prefix that were confirmed all the same (Kafka produces partitions
/// concurrently: one partition's failure does not undo another's confirm).
#[derive(Debug, Clone)]
pub struct SendFailure {
    pub settled: Vec<Outcome>,
    /// Indices into the batch, beyond `settled`, of records the upstream confirmed: never sent
    /// again.
    pub confirmed_beyond: Vec<usize>,
    pub error: UplinkError,
}

/// A record made ready for one uplink: destination and payload decided.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub record: Record,
    /// Exchange (AMQP) or topic (Kafka), from the uplink's template.
    pub destination: String,
    /// Routing key (AMQP) from the uplink's template; the device id (Kafka).
    pub key: String,
    pub payload: Vec<u8>,
    pub content_type: Option<String>,
}

/// Expands a template (validated at config load) for a record.
pub fn expand(template: &str, r: &Record, dots_for_slashes: bool) -> String {
    let mut out = String::with_capacity(template.len() + r.topic.len());
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
            "topic" if dots_for_slashes => out.push_str(&r.topic.replace('/', ".")),
            "topic" => out.push_str(&r.topic),
            "client_id" => out.push_str(&r.device_id),
            "username" => out.push_str(r.username.as_deref().unwrap_or("")),
            _ => {
                if let Some(n) = name
                    .strip_prefix("topic[")
                    .and_then(|n| n.strip_suffix(']'))
                    .and_then(|n| n.parse::<usize>().ok())
                {
                    out.push_str(r.topic.split('/').nth(n).unwrap_or(""));
                }
            }
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// The routes, as the forwarders ask them.
///
/// After a reload, a record is routed by the routes in force when it was received: each version
/// applies from its first sequence number on (`at`). Otherwise moving a topic from uplink U to V
/// would strand U's backlog of it: U would skip it, and V's cursor is already past it.
#[derive(Debug, Clone)]
pub struct Routes {
    /// `(first seq, routes)`, oldest first; the first version applies to every older record.
    versions: Vec<(u64, Arc<Vec<RouteConfig>>)>,
}

/// Route versions kept for older records; beyond this many reloads the oldest is forgotten (its
/// records then take the oldest version still kept).
const ROUTE_VERSIONS: usize = 16;

/// One version of the routes.
#[derive(Debug, Clone, Copy)]
pub struct RouteSet<'a>(&'a [RouteConfig]);

impl Routes {
    pub fn new(routes: Vec<RouteConfig>) -> Routes {
        Routes {
            versions: vec![(0, Arc::new(routes))],
        }
    }

    /// These routes, with `routes` in force for records from `from_seq` on.
    pub fn then(&self, routes: Vec<RouteConfig>, from_seq: u64) -> Routes {
        let mut versions = self.versions.clone();
        versions.push((from_seq, Arc::new(routes)));
        if versions.len() > ROUTE_VERSIONS {
            versions.remove(0);
        }
        Routes { versions }
    }

    /// The routes for a record with sequence number `seq`.
    pub fn at(&self, seq: u64) -> RouteSet<'_> {
        let i = self
            .versions
            .iter()
            .rposition(|(from, _)| *from <= seq)
            .unwrap_or(0);
        RouteSet(self.versions.get(i).map_or(&[], |(_, r)| r.as_slice()))
    }
}

impl<'a> RouteSet<'a> {
    /// The first route sending `topic` to `uplink`, if any.
    pub fn for_uplink(self, uplink: &str, topic: &str) -> Option<&'a RouteConfig> {
        self.0.iter().find(|r| {
            r.uplinks.iter().any(|u| u == uplink) && crate::topic::matches(&r.filter, topic)
        })
    }

    /// Whether any route takes `topic`.
    pub fn any(self, topic: &str) -> bool {
        self.0
            .iter()
            .any(|r| crate::topic::matches(&r.filter, topic))
    }
}

/// Why a record cannot be prepared (it goes to the dead letters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    #[error("payload is not valid CBOR: {0}")]
    NotCbor(String),
}

/// Applies the route's payload mode.
pub fn transcode(mode: PayloadMode, r: &Record) -> Result<(Vec<u8>, Option<String>), PrepareError> {
    match mode {
        PayloadMode::Raw => Ok((r.payload.clone(), r.content_type.clone())),
        PayloadMode::CborToJson => {
            let value: ciborium::Value = ciborium::de::from_reader(r.payload.as_slice())
                .map_err(|e| PrepareError::NotCbor(e.to_string()))?;
            let json =
                serde_json::to_vec(&value).map_err(|e| PrepareError::NotCbor(e.to_string()))?;
            Ok((json, Some("application/json".into())))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rec(topic: &str) -> Record {
        Record {
            seq: 7,
            received_at_us: 0,
            device_id: "dev-1".into(),
            username: Some("alice".into()),
            topic: topic.into(),
            qos: 1,
            retain: false,
            user_properties: vec![],
            content_type: None,
            payload_format: None,
            payload: b"x".to_vec(),
        }
    }

    fn route(filter: &str, uplink: &str) -> RouteConfig {
        RouteConfig {
            filter: filter.into(),
            uplinks: vec![uplink.into()],
            payload: PayloadMode::Raw,
        }
    }

    #[test]
    fn records_keep_the_routes_they_were_received_under_after_a_reload() {
        let v1 = Routes::new(vec![route("a/#", "u")]);
        // Reload at seq 100: `a/#` moves to uplink v.
        let v2 = v1.then(vec![route("a/#", "v")], 100);
        assert!(v2.at(99).for_uplink("u", "a/x").is_some());
        assert!(v2.at(99).for_uplink("v", "a/x").is_none());
        assert!(v2.at(100).for_uplink("v", "a/x").is_some());
        assert!(v2.at(100).for_uplink("u", "a/x").is_none());
        // Many reloads: the chain stays bounded, the newest versions stay exact.
        let mut r = v2;
        for i in 0..40u64 {
            r = r.then(vec![route("a/#", &format!("w{i}"))], 200 + i);
        }
        assert_eq!(r.versions.len(), ROUTE_VERSIONS);
        assert!(r.at(239).for_uplink("w39", "a/x").is_some());
        assert!(r.at(238).for_uplink("w38", "a/x").is_some());
        assert!(r.at(1_000).for_uplink("w39", "a/x").is_some());
    }

    #[test]
    fn templates_expand_topic_levels_and_ids() {
        let r = rec("devices/dev-1/telemetry");
        assert_eq!(expand("{topic}", &r, true), "devices.dev-1.telemetry");
        assert_eq!(expand("{topic}", &r, false), "devices/dev-1/telemetry");
        assert_eq!(
            expand("t.{topic[2]}.{client_id}.{username}", &r, true),
            "t.telemetry.dev-1.alice"
        );
        assert_eq!(expand("{topic[9]}x", &r, true), "x");
    }
}
