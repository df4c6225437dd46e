//! The MQTT transport of one device: rumqttc's client and event loop for MQTT 3.1.1 or 5,
//! reduced to the few events the device loop needs.
//!
//! rumqttc's `EventLoop::poll` is not cancel-safe (a publish can be taken from the request
//! channel and recorded as in flight before it is written), so the device loop never drops a
//! poll in progress: [`Loop::next`] moves the event loop into the future and hands it back with
//! the event, and the device loop keeps that one future alive across its `select!`.
//!
//! Retransmission is the device's job, not rumqttc's: after a connection error the requests
//! rumqttc had queued for the next session are discarded ([`Loop::forget_pending`]); the device
//! then resends its whole outbox (and reply outbox) in order. Sessions are clean unless the
//! device takes commands: then the session is persistent (MQTT 3.1.1 clean session 0, MQTT 5
//! clean start 0 with a session expiry), so that the broker keeps its subscription and the
//! commands that arrive while it is offline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{Outgoing, Transport};

/// MQTT protocol version.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
pub enum MqttVersion {
    #[serde(rename = "3.1.1")]
    #[value(name = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    #[value(name = "5")]
    V5,
}

/// Everything needed to open one device's connection.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub version: MqttVersion,
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub credentials: Option<(String, String)>,
    pub keep_alive: Duration,
    /// Topic and payload of the last will (QoS 1, not retained).
    pub will: (String, Vec<u8>),
    /// In-flight window (the device's outbox size, plus its reply slots when it takes
    /// commands).
    pub inflight: u16,
    /// Largest packet sent or accepted.
    pub max_packet: usize,
    /// `None`: clean sessions. `Some`: a persistent session; MQTT 5 asks the broker to keep it
    /// this long after a disconnect.
    pub session_expiry: Option<Duration>,
}

/// A PUBLISH the broker sent to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub topic: String,
    pub payload: Vec<u8>,
    /// MQTT 5 response topic.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data.
    pub correlation: Option<Vec<u8>>,
}

/// What happened on the connection, as the device loop sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// CONNACK accepted: the session is up.
    Connected,
    /// A PUBLISH was written to the network (`pkid` 0 for QoS 0), in submission order.
    Written { pkid: u16 },
    /// The broker took responsibility: PUBACK (QoS 1) or PUBCOMP (QoS 2).
    Acked { pkid: u16 },
    /// MQTT 5: PUBACK or PUBREC with an error reason code; the message was not accepted.
    Refused { pkid: u16, reason: String },
    /// The DISCONNECT we asked for was written.
    DisconnectSent,
    /// A PUBLISH from the broker (rumqttc has acknowledged it).
    Message(Box<Incoming>),
    /// The connection attempt failed, or the connection closed.
    Closed { error: String },
    /// Anything else (pings, PUBREC, ...).
    Other,
}

/// The request side: publish and disconnect without waiting.
#[derive(Clone)]
pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The event loop, owned by whichever future is polling it.
pub enum Loop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// A poll in progress, holding the event loop until it yields.
pub type PollFuture = Pin<Box<dyn Future<Output = (Loop, LinkEvent)> + Send>>;

/// Why a request could not be queued.
#[derive(Debug, thiserror::Error)]
#[error("request channel of the MQTT event loop: {0}")]
pub struct RequestError(String);

impl Client {
    /// Queues a PUBLISH. The channel holds more than the in-flight window, so this only fails
    /// if the event loop is gone.
    pub fn publish(&self, topic: &str, qos: u8, payload: Vec<u8>) -> Result<(), RequestError> {
        match self {
            Client::V4(c) => c
                .try_publish(topic, qos_v4(qos), false, payload)
                .map_err(|e| RequestError(e.to_string())),
            Client::V5(c) => c
                .try_publish(topic, qos_v5(qos), false, payload)
                .map_err(|e| RequestError(e.to_string())),
        }
    }

    /// Queues a PUBLISH (QoS 1) of a reply, with MQTT 5 correlation data when given (MQTT
    /// 3.1.1 has no properties: the id in the payload identifies the command).
    pub fn publish_reply(
        &self,
        topic: &str,
        payload: Vec<u8>,
        correlation: Option<&[u8]>,
    ) -> Result<(), RequestError> {
        match self {
            Client::V4(c) => c
                .try_publish(topic, qos_v4(1), false, payload)
                .map_err(|e| RequestError(e.to_string())),
            Client::V5(c) => {
                let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    correlation_data: correlation.map(|c| c.to_vec().into()),
                    ..Default::default()
                };
                c.try_publish_with_properties(topic, qos_v5(1), false, payload, props)
                    .map_err(|e| RequestError(e.to_string()))
            }
        }
    }

    /// Queues a SUBSCRIBE at QoS 1.
    pub fn subscribe(&self, filter: &str) -> Result<(), RequestError> {
        match self {
            Client::V4(c) => c
                .try_subscribe(filter, qos_v4(1))
                .map_err(|e| RequestError(e.to_string())),
            Client::V5(c) => c
                .try_subscribe(filter, qos_v5(1))
                .map_err(|e| RequestError(e.to_string())),
        }
    }

    /// Queues a DISCONNECT (so the broker does not publish the last will).
    pub fn disconnect(&self) -> Result<(), RequestError> {
        match self {
            Client::V4(c) => c.try_disconnect().map_err(|e| RequestError(e.to_string())),
            Client::V5(c) => c.try_disconnect().map_err(|e| RequestError(e.to_string())),
        }
    }
}

impl Loop {
    /// Polls once: connects first if there is no connection.
    pub fn next(self) -> PollFuture {
        Box::pin(async move {
            match self {
                Loop::V4(mut el) => {
                    let ev = translate_v4(el.poll().await);
                    (Loop::V4(el), ev)
                }
                Loop::V5(mut el) => {
                    let ev = translate_v5(el.poll().await);
                    (Loop::V5(el), ev)
                }
            }
        })
    }

    /// Drops what rumqttc saved from the last connection for replay (the device resends), the
    /// events of that connection not yet polled, and a pending packet-id collision. rumqttc's
    /// `clean` keeps the events: with MQTT 3.1.1 the CONNACK of the next connection is returned
    /// before them, so a stale "written" event would be paired with that connection's first
    /// publish, shifting every later pairing by one (a reading marked acknowledged by its
    /// predecessor's ack, another waiting for ever on a packet id of the dead connection).
    /// A collision kept across the reconnect would stop the new connection taking requests.
    ///
    /// Returns the PUBLISHes received among those events: rumqttc may already have acknowledged
    /// them (its acks go out with the read that found them), so the broker will not send them
    /// again, and dropping them would lose commands.
    pub fn forget_pending(&mut self) -> Vec<Incoming> {
        let received = |ev: LinkEvent| match ev {
            LinkEvent::Message(m) => Some(*m),
            _ => None,
        };
        match self {
            Loop::V4(el) => {
                el.pending.clear();
                el.state.collision = None;
                el.state
                    .events
                    .drain(..)
                    .filter_map(|ev| received(translate_v4(Ok(ev))))
                    .collect()
            }
            Loop::V5(el) => {
                el.pending.clear();
                el.state.collision = None;
                el.state
                    .events
                    .drain(..)
                    .filter_map(|ev| received(translate_v5(Ok(ev))))
                    .collect()
            }
        }
    }

    /// Drops the connection (after our DISCONNECT was written, for a reboot) and everything
    /// rumqttc kept of it; the next poll connects again. Returns what [`Loop::forget_pending`]
    /// returns.
    pub fn reset_connection(&mut self) -> Vec<Incoming> {
        match self {
            Loop::V4(el) => el.clean(),
            Loop::V5(el) => el.clean(),
        }
        self.forget_pending()
    }
}

/// Builds the client and event loop; nothing connects until the loop is polled.
pub fn open(o: &LinkOptions) -> (Client, Loop) {
    let transport = match &o.tls {
        Some(config) => {
            Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config.clone()))
        }
        None => Transport::tcp(),
    };
    // Room for the whole in-flight window plus a SUBSCRIBE and a DISCONNECT.
    let cap = usize::from(o.inflight) + 4;
    match o.version {
        MqttVersion::V311 => {
            let mut opts = rumqttc::MqttOptions::new(&o.client_id, &o.host, o.port);
            opts.set_transport(transport)
                .set_keep_alive(o.keep_alive)
                .set_clean_session(o.session_expiry.is_none())
                .set_inflight(o.inflight)
                .set_max_packet_size(o.max_packet, o.max_packet)
                .set_last_will(rumqttc::LastWill::new(
                    &o.will.0,
                    o.will.1.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                ));
            if let Some((user, pass)) = &o.credentials {
                opts.set_credentials(user, pass);
            }
            let (client, el) = rumqttc::AsyncClient::new(opts, cap);
            (Client::V4(client), Loop::V4(Box::new(el)))
        }
        MqttVersion::V5 => {
            let mut opts = rumqttc::v5::MqttOptions::new(&o.client_id, &o.host, o.port);
            opts.set_transport(transport)
                .set_keep_alive(o.keep_alive)
                .set_clean_start(o.session_expiry.is_none())
                .set_session_expiry_interval(
                    o.session_expiry
                        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
                )
                .set_outgoing_inflight_upper_limit(o.inflight)
                .set_max_packet_size(u32::try_from(o.max_packet).ok())
                .set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                    &o.will.0,
                    o.will.1.clone(),
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    None,
                ));
            if let Some((user, pass)) = &o.credentials {
                opts.set_credentials(user, pass);
            }
            let (client, el) = rumqttc::v5::AsyncClient::new(opts, cap);
            (Client::V5(client), Loop::V5(Box::new(el)))
        }
    }
}

fn qos_v4(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos_v5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn translate_outgoing(o: Outgoing) -> LinkEvent {
    match o {
        Outgoing::Publish(pkid) => LinkEvent::Written { pkid },
        Outgoing::Disconnect => LinkEvent::DisconnectSent,
        _ => LinkEvent::Other,
    }
}

fn translate_v4(ev: Result<rumqttc::Event, rumqttc::ConnectionError>) -> LinkEvent {
    use rumqttc::{ConnectReturnCode, Event, Packet};
    match ev {
        Ok(Event::Incoming(Packet::ConnAck(ack))) => match ack.code {
            ConnectReturnCode::Success => LinkEvent::Connected,
            code => LinkEvent::Closed {
                error: format!("connection refused: {code:?}"),
            },
        },
        Ok(Event::Incoming(Packet::PubAck(ack))) => LinkEvent::Acked { pkid: ack.pkid },
        Ok(Event::Incoming(Packet::PubComp(comp))) => LinkEvent::Acked { pkid: comp.pkid },
        Ok(Event::Incoming(Packet::Publish(p))) => LinkEvent::Message(Box::new(Incoming {
            topic: p.topic,
            payload: p.payload.to_vec(),
            response_topic: None,
            correlation: None,
        })),
        Ok(Event::Incoming(_)) => LinkEvent::Other,
        Ok(Event::Outgoing(o)) => translate_outgoing(o),
        Err(e) => LinkEvent::Closed {
            error: e.to_string(),
        },
    }
}

fn translate_v5(ev: Result<rumqttc::v5::Event, rumqttc::v5::ConnectionError>) -> LinkEvent {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason, PubRecReason};
    use rumqttc::v5::Event;
    match ev {
        Ok(Event::Incoming(Packet::ConnAck(ack))) => match ack.code {
            ConnectReturnCode::Success => LinkEvent::Connected,
            code => LinkEvent::Closed {
                error: format!("connection refused: {code:?}"),
            },
        },
        Ok(Event::Incoming(Packet::PubAck(ack))) => match ack.reason {
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                LinkEvent::Acked { pkid: ack.pkid }
            }
            reason => LinkEvent::Refused {
                pkid: ack.pkid,
                reason: format!("{reason:?}"),
            },
        },
        Ok(Event::Incoming(Packet::PubRec(rec))) => match rec.reason {
            PubRecReason::Success | PubRecReason::NoMatchingSubscribers => LinkEvent::Other,
            reason => LinkEvent::Refused {
                pkid: rec.pkid,
                reason: format!("{reason:?}"),
            },
        },
        Ok(Event::Incoming(Packet::PubComp(comp))) => LinkEvent::Acked { pkid: comp.pkid },
        Ok(Event::Incoming(Packet::Publish(p))) => {
            let (response_topic, correlation) = match p.properties {
                Some(props) => (
                    props.response_topic,
                    props.correlation_data.map(|c| c.to_vec()),
                ),
                None => (None, None),
            };
            LinkEvent::Message(Box::new(Incoming {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.to_vec(),
                response_topic,
                correlation,
            }))
        }
        Ok(Event::Incoming(_)) => LinkEvent::Other,
        Ok(Event::Outgoing(o)) => translate_outgoing(o),
        Err(e) => LinkEvent::Closed {
            error: e.to_string(),
        },
    }
}
