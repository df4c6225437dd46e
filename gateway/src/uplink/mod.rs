//! Uplinks: the transports the forwarder sends records through, one module per protocol
//! (`amqp`, `kafka`, `mqtt`); [`Uplink`] dispatches on the configured kind, so one forwarder
//! loop serves them all. What a record becomes on an uplink (routes, templates, payload) is the forwarder's
//! business (`forwarder::prepare`); an uplink takes [`Prepared`] messages.
//!
//! An uplink streams: [`Uplink::send`] starts sending a message and returns without waiting for
//! the upstream; [`Uplink::next`] yields the upstream's answer for each message (confirmed,
//! returned as unroutable, refused), as they come. A dropped connection or a broker failure is
//! reported by `next` after every answer that arrived before it; the forwarder then reconnects
//! and sends again from its cursor (at least once).

pub mod amqp;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod mqtt;
pub mod murmur2;

use crate::config::UplinkConfig;
use crate::queue::Record;

use amqp::AmqpUplink;
#[cfg(feature = "kafka")]
use kafka::KafkaUplink;
use mqtt::MqttUplink;

/// A connected uplink of any kind. An enum rather than a trait object: three kinds, async
/// methods, and no boxed futures on the hot path.
pub enum Uplink {
    /// Boxed, all: their connections and queues are large, and the enum is moved around.
    Amqp(Box<AmqpUplink>),
    #[cfg(feature = "kafka")]
    Kafka(Box<KafkaUplink>),
    Mqtt(Box<MqttUplink>),
}

impl Uplink {
    /// Connects to the uplink's node `node` (an index into its configured nodes, see
    /// [`UplinkConfig::nodes`]).
    pub async fn connect(
        cfg: &UplinkConfig,
        node: usize,
        gateway_id: &str,
    ) -> Result<Uplink, UplinkError> {
        Ok(match cfg {
            UplinkConfig::Amqp(a) => {
                Uplink::Amqp(Box::new(AmqpUplink::connect(a, node, gateway_id).await?))
            }
            #[cfg(feature = "kafka")]
            UplinkConfig::Kafka(k) => {
                Uplink::Kafka(Box::new(KafkaUplink::connect(k, gateway_id).await?))
            }
            UplinkConfig::Mqtt(m) => {
                Uplink::Mqtt(Box::new(MqttUplink::connect(m, node, gateway_id).await?))
            }
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

    /// Starts sending `m` (in order after the messages sent before it); its outcome comes from
    /// [`Self::next`]. Does not wait for the upstream's answer. After a failure it sends nothing
    /// ([`Self::failed`]); `next` reports the failure.
    pub async fn send(&mut self, m: &Prepared) {
        match self {
            Uplink::Amqp(u) => u.send(m).await,
            #[cfg(feature = "kafka")]
            Uplink::Kafka(u) => u.send(m).await,
            Uplink::Mqtt(u) => u.send(m),
        }
    }

    /// Whether the connection failed: send nothing more, read the remaining answers and the
    /// error from [`Self::next`].
    pub fn failed(&self) -> bool {
        match self {
            Uplink::Amqp(u) => u.failed(),
            #[cfg(feature = "kafka")]
            Uplink::Kafka(u) => u.failed(),
            Uplink::Mqtt(u) => u.failed(),
        }
    }

    /// The next answer: `(seq, outcome)`; or the failure, once every answer that arrived before
    /// it was returned. Pending while nothing is in flight. Cancel-safe (a `select!` branch).
    pub async fn next(&mut self) -> Result<(u64, Outcome), UplinkError> {
        match self {
            Uplink::Amqp(u) => u.next().await,
            #[cfg(feature = "kafka")]
            Uplink::Kafka(u) => u.next().await,
            Uplink::Mqtt(u) => u.next().await,
        }
    }

    pub async fn close(self) {
        match self {
            Uplink::Amqp(u) => u.close().await,
            #[cfg(feature = "kafka")]
            Uplink::Kafka(u) => u.close().await,
            Uplink::Mqtt(u) => u.close().await,
        }
    }
}

/// The uplink's type and where it sends (credentials masked), for logs and the operator.
pub fn describe(cfg: &UplinkConfig) -> (&'static str, String) {
    match cfg {
        UplinkConfig::Amqp(a) => (
            "amqp",
            format!(
                "{} exchange {:?}",
                a.urls()
                    .iter()
                    .map(|u| amqp::masked_url(u))
                    .collect::<Vec<_>>()
                    .join(","),
                a.exchange
            ),
        ),
        UplinkConfig::Kafka(k) => (
            "kafka",
            format!("{} topic {:?}", k.bootstrap.join(","), k.topic),
        ),
        UplinkConfig::Mqtt(m) => (
            "mqtt",
            format!(
                "{} topic {:?} (MQTT {}, QoS {})",
                m.urls()
                    .iter()
                    .map(|u| amqp::masked_url(u))
                    .collect::<Vec<_>>()
                    .join(","),
                m.topic,
                match m.protocol {
                    crate::config::MqttProtocol::V5 => "5",
                    crate::config::MqttProtocol::V311 => "3.1.1",
                },
                m.qos
            ),
        ),
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

/// A record made ready for one uplink: destination and payload decided.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub record: Record,
    /// Exchange (AMQP) or topic (Kafka, MQTT), from the uplink's template.
    pub destination: String,
    /// Routing key (AMQP) from the uplink's template; the device id (Kafka, MQTT).
    pub key: String,
    pub payload: Vec<u8>,
    pub content_type: Option<String>,
}

impl Prepared {
    /// Bytes this message holds while in flight (what `window_bytes` counts).
    pub fn size(&self) -> usize {
        self.payload.len() + self.destination.len() + self.key.len() + self.record.payload.len()
    }
}
