//! MQTT packet codec: rumqttc's `mqttbytes` (3.1.1: `v4`, 5: `v5`), pinned at 0.25.1, behind one
//! small, version-independent vocabulary of what a device sends and what the gateway answers.
//!
//! Gaps of that codec handled here:
//! - an MQTT 5 DISCONNECT with remaining length 0 (reason 0x00, no properties) fails to decode;
//! - AUTH (type 15) is not decoded: we report it so the session can refuse it;
//! - MQTT 3.1 (`MQIsdp`, level 3) is rejected as an invalid protocol: we recognise it so the
//!   session can answer CONNACK 0x01 (unacceptable protocol version) as 3.1 expects.
//!
//! Every decode takes untrusted bytes and returns an error, never panics.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4 as m4;
use rumqttc::mqttbytes::{self as mb, QoS};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::{self as mb5, QoS as QoS5};

/// The protocol a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

/// A device's last will, as stored with its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub payload_format: Option<u8>,
    /// MQTT 5 will properties kept for subscribers (see [`Publish`]).
    pub message_expiry: Option<u32>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
}

/// CONNECT, for either version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will: Option<Will>,
    /// MQTT 5: the largest packet the client accepts.
    pub client_max_packet: Option<u32>,
    /// MQTT 5: an enhanced authentication method (we support none).
    pub auth_method: Option<String>,
    /// MQTT 5: how many QoS 1/2 publishes from us the client takes unacknowledged.
    pub client_receive_maximum: Option<u16>,
    /// MQTT 5: seconds the session outlives the connection (absent: 0).
    pub session_expiry: Option<u32>,
    /// MQTT 5 Request Problem Information: `false` when the client sent 0 (no reason strings
    /// on anything but PUBLISH, CONNACK and DISCONNECT); absent means 1.
    pub request_problem_info: bool,
}

/// PUBLISH from a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    pub payload: Bytes,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub payload_format: Option<u8>,
    pub topic_alias: Option<u16>,
    /// MQTT 5 Message Expiry Interval, in seconds from now.
    pub message_expiry: Option<u32>,
    /// MQTT 5 request/response: where the receiver should answer, and what with.
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
}

/// One filter of a SUBSCRIBE with its options (MQTT 5 options are false / 0 under 3.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub filter: String,
    /// Requested maximum QoS.
    pub qos: u8,
    /// MQTT 5: do not send this client its own publishes.
    pub no_local: bool,
    /// MQTT 5: keep the retain flag as published instead of clearing it on live delivery.
    pub retain_as_published: bool,
    /// MQTT 5: 0 send retained messages on subscribe, 1 only for a new subscription, 2 never.
    pub retain_handling: u8,
    /// MQTT 5: the SUBSCRIBE's Subscription Identifier (one per packet, so the same for each
    /// of its filters). `Some(0)` is what the client sent and a protocol error: the session
    /// refuses it.
    pub subscription_id: Option<u32>,
}

/// PUBLISH from the gateway to a subscriber, borrowed from the message it delivers:
/// [`encode_publish`] writes it straight into the connection's buffer, so a delivery copies
/// nothing but the bytes on their way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutPublish<'a> {
    pub topic: &'a str,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    /// 0 for QoS 0.
    pub pkid: u16,
    pub payload: &'a [u8],
    /// MQTT 5 properties (dropped when encoding for 3.1.1).
    pub user_properties: &'a [(String, String)],
    pub content_type: Option<&'a str>,
    pub payload_format: Option<u8>,
    pub response_topic: Option<&'a str>,
    pub correlation_data: Option<&'a [u8]>,
    /// Seconds left of the message's expiry, when it has one.
    pub message_expiry: Option<u32>,
    /// MQTT 5: the identifiers of every subscription of the receiver that matched.
    pub subscription_ids: &'a [u32],
}

/// What a device may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Connect(Box<Connect>),
    /// A CONNECT for a protocol we do not speak (MQTT 3.1 `MQIsdp`, or an unknown level).
    UnsupportedProtocol {
        level: u8,
    },
    Publish(Publish),
    PubRel {
        pkid: u16,
    },
    /// Acks for publishes the gateway sent to a subscriber.
    PubAck {
        pkid: u16,
    },
    PubRec {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<Subscription>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        reason: u8,
    },
    Auth,
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The packet is larger than the maximum packet size.
    #[error("packet of {size} bytes exceeds the maximum packet size {max}")]
    TooLarge { size: usize, max: usize },
    /// The bytes break the protocol's encoding rules.
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// What the gateway sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    ConnAck {
        /// 3.1.1 return code (0..=5) or MQTT 5 reason code.
        code: u8,
        /// A stored session was resumed.
        session_present: bool,
        props: Option<ConnAckProps>,
    },
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PubRec {
        pkid: u16,
        reason: u8,
    },
    PubComp {
        pkid: u16,
    },
    /// One code a filter: the granted QoS (0..=2) or a failure (0x80 and up; 3.1.1 knows only
    /// 0x80, so every failure is sent as 0x80 there).
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    /// One code a filter (MQTT 5; 3.1.1's UNSUBACK carries none).
    UnsubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    PubRel {
        pkid: u16,
    },
    PingResp,
    Disconnect {
        reason: u8,
        text: Option<String>,
    },
    /// `packet` (a PUBACK, PUBREC, SUBACK or UNSUBACK) with an MQTT 5 Reason String property
    /// saying why it refuses. The session adds it only where the client allows it (Request
    /// Problem Information) and it fits the client's maximum packet size; 3.1.1 sends `packet`
    /// as it is.
    WithReason {
        packet: Box<Outbound>,
        text: String,
    },
}

/// The MQTT 5 CONNACK properties the gateway states about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAckProps {
    pub receive_maximum: u16,
    pub max_packet_size: u32,
    pub assigned_client_id: Option<String>,
    pub reason: Option<String>,
    pub server_keep_alive: Option<u16>,
    /// The session expiry the gateway grants, when it differs from what the client asked.
    pub session_expiry: Option<u32>,
}

/// MQTT 5 reason codes the gateway uses.
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const MALFORMED: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL: u8 = 0x84;
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BAD_AUTH_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    pub const PACKET_ID_IN_USE: u8 = 0x91;
    pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    pub const WILDCARD_NOT_SUPPORTED: u8 = 0xA2;
}

fn qos_u8(q: QoS) -> u8 {
    match q {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

fn qos5_u8(q: QoS5) -> u8 {
    q as u8
}

fn malformed(e: impl std::fmt::Debug) -> DecodeError {
    DecodeError::Malformed(format!("{e:?}"))
}

/// Reads the fixed header at the start of `buf`: `(packet type, header length, remaining
/// length)`, or `None` when more bytes are needed.
fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((first >> 4, 2 + i, len)));
        }
    }
    Err(DecodeError::Malformed(
        "remaining length longer than 4 bytes".into(),
    ))
}

/// Peeks at a CONNECT's protocol name and level (before we know the version).
fn connect_level(body: &[u8]) -> Option<(&[u8], u8)> {
    let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let name = body.get(2..2 + n)?;
    let level = *body.get(2 + n)?;
    Some((name, level))
}

/// Decodes one packet from the front of `buf`, consuming it. `Ok(None)`: more bytes needed
/// (nothing consumed). `version` is `None` until CONNECT was decoded.
pub fn decode(
    buf: &mut BytesMut,
    version: Option<Version>,
    max_packet: usize,
) -> Result<Option<Inbound>, DecodeError> {
    let Some((ptype, header_len, remaining)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let size = header_len + remaining;
    if size > max_packet {
        return Err(DecodeError::TooLarge {
            size,
            max: max_packet,
        });
    }
    if buf.len() < size {
        return Ok(None);
    }
    let flags = buf[0] & 0x0f;
    // Packets the vendored codec mishandles, or that we answer before knowing the version.
    match (ptype, version) {
        (1, _) => {
            if let Some((name, level)) = connect_level(&buf[header_len..size]) {
                let v = match (name, level) {
                    (b"MQTT", 4) => Some(Version::V311),
                    (b"MQTT", 5) => Some(Version::V5),
                    _ => None,
                };
                if v.is_none() {
                    buf.advance(size);
                    return Ok(Some(Inbound::UnsupportedProtocol { level }));
                }
                return decode_connect(buf, v.unwrap_or(Version::V311), size);
            }
            return Err(DecodeError::Malformed(
                "CONNECT without protocol name".into(),
            ));
        }
        (14, Some(Version::V5)) if remaining == 0 => {
            buf.advance(size);
            return Ok(Some(Inbound::Disconnect { reason: 0 }));
        }
        (15, _) => {
            buf.advance(size);
            return Ok(Some(Inbound::Auth));
        }
        (_, None) => {
            return Err(DecodeError::Malformed(format!(
                "packet type {ptype} before CONNECT"
            )))
        }
        _ => {}
    }
    // Flags fixed by the spec for everything but PUBLISH (type 3).
    let want_flags = match ptype {
        6 | 8 | 10 => 0b0010,
        3 => flags,
        _ => 0,
    };
    if flags != want_flags {
        return Err(DecodeError::Malformed(format!(
            "reserved flags {flags:#06b} on packet type {ptype}"
        )));
    }
    if ptype == 8
        && version == Some(Version::V5)
        && subscription_id_count(&buf[header_len..size]).is_some_and(|n| n > 1)
    {
        // The vendored codec would keep the last one; MQTT 5 3.8.2.1.2 forbids repeating it.
        return Err(DecodeError::Malformed(
            "subscription identifier given more than once".into(),
        ));
    }
    match version {
        Some(Version::V5) => decode_v5(buf, max_packet),
        _ => decode_v4(buf, max_packet),
    }
}

/// A variable byte integer at the start of `b`: (value, bytes), at most 4 bytes.
fn read_varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut v = 0usize;
    for (i, &byte) in b.iter().take(4).enumerate() {
        v |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// How many Subscription Identifier properties an MQTT 5 SUBSCRIBE body (after the fixed
/// header) has; `None` when its property block does not parse (the codec then says why).
fn subscription_id_count(body: &[u8]) -> Option<usize> {
    let (len, n) = read_varint(body.get(2..)?)?;
    let props = body.get(2 + n..(2 + n).checked_add(len)?)?;
    let (mut i, mut count) = (0usize, 0usize);
    while let Some(&id) = props.get(i) {
        i += 1;
        match id {
            0x0B => {
                i += read_varint(props.get(i..)?)?.1;
                count += 1;
            }
            // User property: two UTF-8 strings.
            0x26 => {
                for _ in 0..2 {
                    let l = u16::from_be_bytes([*props.get(i)?, *props.get(i + 1)?]);
                    i += 2 + usize::from(l);
                }
            }
            _ => return None,
        }
    }
    Some(count)
}

fn decode_connect(
    buf: &mut BytesMut,
    version: Version,
    size: usize,
) -> Result<Option<Inbound>, DecodeError> {
    match version {
        Version::V311 => match m4::Packet::read(buf, size) {
            Ok(m4::Packet::Connect(c)) => Ok(Some(Inbound::Connect(Box::new(Connect {
                version,
                client_id: c.client_id,
                clean_start: c.clean_session,
                keep_alive: c.keep_alive,
                username: c.login.as_ref().map(|l| l.username.clone()),
                password: c.login.map(|l| l.password),
                will: c.last_will.map(|w| Will {
                    topic: w.topic,
                    payload: w.message,
                    qos: qos_u8(w.qos),
                    retain: w.retain,
                    user_properties: Vec::new(),
                    content_type: None,
                    payload_format: None,
                    message_expiry: None,
                    response_topic: None,
                    correlation_data: None,
                }),
                client_max_packet: None,
                auth_method: None,
                client_receive_maximum: None,
                session_expiry: None,
                request_problem_info: true,
            })))),
            Ok(_) => Err(DecodeError::Malformed("expected CONNECT".into())),
            Err(e) => Err(malformed(e)),
        },
        Version::V5 => match m5::Packet::read(buf, Some(size as u32)) {
            Ok(m5::Packet::Connect(c, will, login)) => {
                let props = c.properties.unwrap_or_default();
                let will = match will {
                    Some(w) => {
                        let wp = w.properties.unwrap_or(m5::LastWillProperties {
                            delay_interval: None,
                            payload_format_indicator: None,
                            message_expiry_interval: None,
                            content_type: None,
                            response_topic: None,
                            correlation_data: None,
                            user_properties: Vec::new(),
                        });
                        Some(Will {
                            topic: String::from_utf8(w.topic.to_vec())
                                .map_err(|_| malformed("will topic is not UTF-8"))?,
                            payload: w.message,
                            qos: qos5_u8(w.qos),
                            retain: w.retain,
                            user_properties: wp.user_properties,
                            content_type: wp.content_type,
                            payload_format: wp.payload_format_indicator,
                            message_expiry: wp.message_expiry_interval,
                            response_topic: wp.response_topic,
                            correlation_data: wp.correlation_data,
                        })
                    }
                    None => None,
                };
                Ok(Some(Inbound::Connect(Box::new(Connect {
                    version,
                    client_id: c.client_id,
                    clean_start: c.clean_start,
                    keep_alive: c.keep_alive,
                    username: login.as_ref().map(|l| l.username.clone()),
                    password: login.map(|l| l.password),
                    will,
                    client_max_packet: props.max_packet_size,
                    auth_method: props.authentication_method,
                    client_receive_maximum: props.receive_maximum,
                    session_expiry: props.session_expiry_interval,
                    request_problem_info: props.request_problem_info != Some(0),
                }))))
            }
            Ok(_) => Err(DecodeError::Malformed("expected CONNECT".into())),
            Err(e) => Err(malformed(e)),
        },
    }
}

fn decode_v4(buf: &mut BytesMut, max: usize) -> Result<Option<Inbound>, DecodeError> {
    let p = m4::Packet::read(buf, max).map_err(malformed)?;
    Ok(Some(match p {
        m4::Packet::Publish(p) => Inbound::Publish(Publish {
            topic: p.topic,
            qos: qos_u8(p.qos),
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
            payload: p.payload,
            user_properties: Vec::new(),
            content_type: None,
            payload_format: None,
            topic_alias: None,
            message_expiry: None,
            response_topic: None,
            correlation_data: None,
        }),
        m4::Packet::PubRel(r) => Inbound::PubRel { pkid: r.pkid },
        m4::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| Subscription {
                    filter: f.path,
                    qos: qos_u8(f.qos),
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                    subscription_id: None,
                })
                .collect(),
        },
        m4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        m4::Packet::PingReq => Inbound::PingReq,
        m4::Packet::Disconnect => Inbound::Disconnect { reason: 0 },
        m4::Packet::Connect(_) => return Err(malformed("second CONNECT")),
        m4::Packet::PubAck(a) => Inbound::PubAck { pkid: a.pkid },
        m4::Packet::PubRec(a) => Inbound::PubRec { pkid: a.pkid },
        m4::Packet::PubComp(a) => Inbound::PubComp { pkid: a.pkid },
        other => return Err(malformed(format!("unexpected packet {other:?}"))),
    }))
}

fn decode_v5(buf: &mut BytesMut, max: usize) -> Result<Option<Inbound>, DecodeError> {
    let p = m5::Packet::read(buf, Some(max as u32)).map_err(malformed)?;
    Ok(Some(match p {
        m5::Packet::Publish(p) => {
            let props = p.properties.unwrap_or_default();
            Inbound::Publish(Publish {
                topic: String::from_utf8(p.topic.to_vec())
                    .map_err(|_| malformed("topic is not UTF-8"))?,
                qos: qos5_u8(p.qos),
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
                payload: p.payload,
                user_properties: props.user_properties,
                content_type: props.content_type,
                payload_format: props.payload_format_indicator,
                topic_alias: props.topic_alias,
                message_expiry: props.message_expiry_interval,
                response_topic: props.response_topic,
                correlation_data: props.correlation_data,
            })
        }
        m5::Packet::PubRel(r) => Inbound::PubRel { pkid: r.pkid },
        m5::Packet::Subscribe(s) => {
            // The codec reads a variable byte integer of at most 4 bytes (so at most
            // 268,435,455, the property's maximum) and keeps the last of repeated ones.
            let subscription_id = s
                .properties
                .and_then(|p| p.id)
                .map(|id| u32::try_from(id).map_err(|_| malformed("subscription identifier")))
                .transpose()?;
            Inbound::Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| Subscription {
                        filter: f.path,
                        qos: qos5_u8(f.qos),
                        no_local: f.nolocal,
                        retain_as_published: f.preserve_retain,
                        retain_handling: f.retain_forward_rule as u8,
                        subscription_id,
                    })
                    .collect(),
            }
        }
        m5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        m5::Packet::PingReq(_) => Inbound::PingReq,
        m5::Packet::Disconnect(d) => Inbound::Disconnect {
            reason: d.reason_code as u8,
        },
        m5::Packet::Auth(_) => Inbound::Auth,
        m5::Packet::Connect(..) => return Err(malformed("second CONNECT")),
        m5::Packet::PubAck(a) => Inbound::PubAck { pkid: a.pkid },
        m5::Packet::PubRec(a) => Inbound::PubRec { pkid: a.pkid },
        m5::Packet::PubComp(a) => Inbound::PubComp { pkid: a.pkid },
        other => return Err(malformed(format!("unexpected packet {other:?}"))),
    }))
}

/// Appends the PUBLISH `p` to `out`, for a client of `version` (3.1.1 gets no properties).
/// Strings and binary fields longer than MQTT's 65,535 bytes, or a packet beyond its 256 MiB,
/// cannot be encoded: logged, nothing appended (messages that came in as MQTT never are).
pub fn encode_publish(p: &OutPublish<'_>, version: Version, out: &mut BytesMut) {
    let v5 = version == Version::V5;
    let too_long = [Some(p.topic), p.content_type, p.response_topic]
        .into_iter()
        .flatten()
        .map(str::len)
        .chain(p.correlation_data.map(<[u8]>::len))
        .chain(
            p.user_properties
                .iter()
                .flat_map(|(k, v)| [k.len(), v.len()]),
        )
        .any(|n| n > usize::from(u16::MAX));
    let mut props = 0usize;
    if v5 {
        props += p.payload_format.map_or(0, |_| 2);
        props += p.message_expiry.map_or(0, |_| 5);
        props += p.content_type.map_or(0, |t| 3 + t.len());
        props += p.response_topic.map_or(0, |t| 3 + t.len());
        props += p.correlation_data.map_or(0, |c| 3 + c.len());
        props += p
            .user_properties
            .iter()
            .map(|(k, v)| 5 + k.len() + v.len())
            .sum::<usize>();
        props += p
            .subscription_ids
            .iter()
            .map(|&id| 1 + varint_len(id as usize))
            .sum::<usize>();
    }
    let remaining = 2
        + p.topic.len()
        + if p.qos > 0 { 2 } else { 0 }
        + if v5 { varint_len(props) + props } else { 0 }
        + p.payload.len();
    if too_long || remaining > MAX_REMAINING_LENGTH {
        tracing::error!(
            topic = p.topic,
            remaining,
            "a message too large for an MQTT PUBLISH was not sent"
        );
        return;
    }
    out.reserve(5 + remaining);
    let qos = p.qos.min(2);
    out.put_u8(0x30 | (u8::from(p.dup && qos > 0) << 3) | (qos << 1) | u8::from(p.retain));
    put_varint(remaining, out);
    put_str(p.topic, out);
    if qos > 0 {
        out.put_u16(p.pkid);
    }
    if v5 {
        put_varint(props, out);
        if let Some(f) = p.payload_format {
            out.put_u8(0x01);
            out.put_u8(f);
        }
        if let Some(e) = p.message_expiry {
            out.put_u8(0x02);
            out.put_u32(e);
        }
        if let Some(t) = p.content_type {
            out.put_u8(0x03);
            put_str(t, out);
        }
        if let Some(t) = p.response_topic {
            out.put_u8(0x08);
            put_str(t, out);
        }
        if let Some(c) = p.correlation_data {
            out.put_u8(0x09);
            out.put_u16(c.len() as u16);
            out.put_slice(c);
        }
        for &id in p.subscription_ids {
            out.put_u8(0x0B);
            put_varint(id as usize, out);
        }
        for (k, v) in p.user_properties {
            out.put_u8(0x26);
            put_str(k, out);
            put_str(v, out);
        }
    }
    out.put_slice(p.payload);
}

/// The largest remaining length MQTT's variable byte integer can say.
const MAX_REMAINING_LENGTH: usize = 268_435_455;

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(mut n: usize, out: &mut BytesMut) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if n == 0 {
            return;
        }
    }
}

/// A length-prefixed string (its length checked by the caller).
fn put_str(s: &str, out: &mut BytesMut) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

/// Appends the encoding of `p` to `out`.
pub fn encode(p: &Outbound, version: Version, out: &mut BytesMut) {
    let r = match version {
        Version::V311 => encode_v4(p, out).map_err(|e| format!("{e:?}")),
        Version::V5 => encode_v5(p, out).map_err(|e| format!("{e:?}")),
    };
    // Our own packets are small and well-formed; a failure here is a bug, logged not panicked.
    if let Err(error) = r {
        tracing::error!(%error, packet = ?p, "could not encode an outgoing packet");
    }
}

fn encode_v4(p: &Outbound, out: &mut BytesMut) -> Result<usize, mb::Error> {
    match p {
        Outbound::WithReason { packet, .. } => encode_v4(packet, out),
        Outbound::ConnAck {
            code,
            session_present,
            ..
        } => {
            // CONNACK for 3.1.1 (and the 3.1 refusal): fixed header, flags, return code.
            out.extend_from_slice(&[0x20, 0x02, u8::from(*session_present), *code]);
            Ok(4)
        }
        Outbound::PubAck { pkid, .. } => m4::PubAck::new(*pkid).write(out),
        Outbound::PubRec { pkid, .. } => m4::PubRec::new(*pkid).write(out),
        Outbound::PubComp { pkid } => m4::PubComp::new(*pkid).write(out),
        Outbound::SubAck { pkid, codes } => {
            let codes = codes
                .iter()
                .map(|&c| match c {
                    0 => m4::SubscribeReasonCode::Success(QoS::AtMostOnce),
                    1 => m4::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    2 => m4::SubscribeReasonCode::Success(QoS::ExactlyOnce),
                    _ => m4::SubscribeReasonCode::Failure,
                })
                .collect();
            m4::SubAck::new(*pkid, codes).write(out)
        }
        Outbound::UnsubAck { pkid, .. } => m4::UnsubAck::new(*pkid).write(out),
        Outbound::PubRel { pkid } => m4::PubRel::new(*pkid).write(out),
        Outbound::PingResp => m4::PingResp.write(out),
        // 3.1.1 has no server DISCONNECT: the connection is just closed.
        Outbound::Disconnect { .. } => Ok(0),
    }
}

fn encode_v5(p: &Outbound, out: &mut BytesMut) -> Result<usize, mb5::Error> {
    match p {
        Outbound::WithReason { packet, text } => encode_v5_with_reason(packet, text, out),
        Outbound::ConnAck {
            code,
            session_present,
            props,
        } => {
            let properties = props.as_ref().map(|c| m5::ConnAckProperties {
                session_expiry_interval: c.session_expiry,
                receive_max: Some(c.receive_maximum),
                max_qos: None,
                retain_available: None,
                max_packet_size: Some(c.max_packet_size),
                assigned_client_identifier: c.assigned_client_id.clone(),
                topic_alias_max: Some(0),
                reason_string: c.reason.clone(),
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                // Absent: available (subscription identifiers are sent with each PUBLISH).
                subscription_identifiers_available: None,
                shared_subscription_available: Some(0),
                server_keep_alive: c.server_keep_alive,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
            m5::ConnAck {
                session_present: *session_present,
                code: connect_return_code(*code),
                properties,
            }
            .write(out)
        }
        Outbound::PubAck { pkid, reason } => m5::PubAck {
            pkid: *pkid,
            reason: puback_reason(*reason),
            properties: None,
        }
        .write(out),
        Outbound::PubRec { pkid, reason } => m5::PubRec {
            pkid: *pkid,
            reason: pubrec_reason(*reason),
            properties: None,
        }
        .write(out),
        Outbound::PubComp { pkid } => m5::PubComp {
            pkid: *pkid,
            reason: m5::PubCompReason::Success,
            properties: None,
        }
        .write(out),
        Outbound::SubAck { pkid, codes } => m5::SubAck {
            pkid: *pkid,
            return_codes: codes.iter().map(|&c| suback_reason(c)).collect(),
            properties: None,
        }
        .write(out),
        Outbound::UnsubAck { pkid, codes } => m5::UnsubAck {
            pkid: *pkid,
            reasons: codes.iter().map(|&c| unsuback_reason(c)).collect(),
            properties: None,
        }
        .write(out),
        Outbound::PubRel { pkid } => m5::PubRel {
            pkid: *pkid,
            reason: m5::PubRelReason::Success,
            properties: None,
        }
        .write(out),
        Outbound::PingResp => m5::PingResp::write(out),
        Outbound::Disconnect { reason, text } => m5::Disconnect {
            reason_code: disconnect_reason(*reason),
            properties: text.as_ref().map(|t| m5::DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(t.clone()),
                user_properties: Vec::new(),
                server_reference: None,
            }),
        }
        .write(out),
    }
}

/// `p` with `text` as its Reason String (the packets that have one; others as they are).
fn encode_v5_with_reason(
    p: &Outbound,
    text: &str,
    out: &mut BytesMut,
) -> Result<usize, mb5::Error> {
    let reason_string = Some(text.to_string());
    match p {
        Outbound::PubAck { pkid, reason } => m5::PubAck {
            pkid: *pkid,
            reason: puback_reason(*reason),
            properties: Some(m5::PubAckProperties {
                reason_string,
                user_properties: Vec::new(),
            }),
        }
        .write(out),
        Outbound::PubRec { pkid, reason } => m5::PubRec {
            pkid: *pkid,
            reason: pubrec_reason(*reason),
            properties: Some(m5::PubRecProperties {
                reason_string,
                user_properties: Vec::new(),
            }),
        }
        .write(out),
        Outbound::SubAck { pkid, codes } => m5::SubAck {
            pkid: *pkid,
            return_codes: codes.iter().map(|&c| suback_reason(c)).collect(),
            properties: Some(m5::SubAckProperties {
                reason_string,
                user_properties: Vec::new(),
            }),
        }
        .write(out),
        Outbound::UnsubAck { pkid, codes } => m5::UnsubAck {
            pkid: *pkid,
            reasons: codes.iter().map(|&c| unsuback_reason(c)).collect(),
            properties: Some(m5::UnsubAckProperties {
                reason_string,
                user_properties: Vec::new(),
            }),
        }
        .write(out),
        Outbound::Disconnect { reason, .. } => encode_v5(
            &Outbound::Disconnect {
                reason: *reason,
                text: reason_string,
            },
            out,
        ),
        other => encode_v5(other, out),
    }
}

/// The size of `p` encoded for `version` (to keep within a client's maximum packet size).
pub fn encoded_len(p: &Outbound, version: Version) -> usize {
    let mut b = BytesMut::new();
    encode(p, version, &mut b);
    b.len()
}

fn connect_return_code(code: u8) -> m5::ConnectReturnCode {
    use m5::ConnectReturnCode as C;
    match code {
        reason::SUCCESS => C::Success,
        reason::MALFORMED => C::MalformedPacket,
        reason::PROTOCOL_ERROR => C::ProtocolError,
        reason::IMPLEMENTATION_SPECIFIC => C::ImplementationSpecificError,
        reason::UNSUPPORTED_PROTOCOL => C::UnsupportedProtocolVersion,
        reason::CLIENT_ID_NOT_VALID => C::ClientIdentifierNotValid,
        reason::BAD_USER_OR_PASSWORD => C::BadUserNamePassword,
        reason::NOT_AUTHORIZED => C::NotAuthorized,
        reason::SERVER_BUSY => C::ServerBusy,
        reason::BAD_AUTH_METHOD => C::BadAuthenticationMethod,
        reason::QUOTA_EXCEEDED => C::QuotaExceeded,
        reason::CONNECTION_RATE_EXCEEDED => C::ConnectionRateExceeded,
        reason::PACKET_TOO_LARGE => C::PacketTooLarge,
        reason::RETAIN_NOT_SUPPORTED => C::RetainNotSupported,
        reason::TOPIC_NAME_INVALID => C::TopicNameInvalid,
        _ => C::UnspecifiedError,
    }
}

fn puback_reason(code: u8) -> m5::PubAckReason {
    use m5::PubAckReason as R;
    match code {
        reason::SUCCESS => R::Success,
        reason::IMPLEMENTATION_SPECIFIC => R::ImplementationSpecificError,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_NAME_INVALID => R::TopicNameInvalid,
        reason::PACKET_ID_IN_USE => R::PacketIdentifierInUse,
        reason::QUOTA_EXCEEDED => R::QuotaExceeded,
        _ => R::UnspecifiedError,
    }
}

fn pubrec_reason(code: u8) -> m5::PubRecReason {
    use m5::PubRecReason as R;
    match code {
        reason::SUCCESS => R::Success,
        reason::IMPLEMENTATION_SPECIFIC => R::ImplementationSpecificError,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_NAME_INVALID => R::TopicNameInvalid,
        reason::PACKET_ID_IN_USE => R::PacketIdentifierInUse,
        reason::QUOTA_EXCEEDED => R::QuotaExceeded,
        _ => R::UnspecifiedError,
    }
}

fn suback_reason(code: u8) -> m5::SubscribeReasonCode {
    use m5::SubscribeReasonCode as R;
    match code {
        0 => R::Success(QoS5::AtMostOnce),
        1 => R::Success(QoS5::AtLeastOnce),
        2 => R::Success(QoS5::ExactlyOnce),
        reason::IMPLEMENTATION_SPECIFIC => R::ImplementationSpecific,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_FILTER_INVALID => R::TopicFilterInvalid,
        reason::PACKET_ID_IN_USE => R::PkidInUse,
        reason::QUOTA_EXCEEDED => R::QuotaExceeded,
        reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED => R::SharedSubscriptionsNotSupported,
        reason::WILDCARD_NOT_SUPPORTED => R::WildcardSubscriptionsNotSupported,
        _ => R::Unspecified,
    }
}

fn unsuback_reason(code: u8) -> m5::UnsubAckReason {
    use m5::UnsubAckReason as R;
    match code {
        reason::SUCCESS => R::Success,
        reason::NO_SUBSCRIPTION_EXISTED => R::NoSubscriptionExisted,
        reason::IMPLEMENTATION_SPECIFIC => R::ImplementationSpecificError,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_FILTER_INVALID => R::TopicFilterInvalid,
        reason::PACKET_ID_IN_USE => R::PacketIdentifierInUse,
        _ => R::UnspecifiedError,
    }
}

fn disconnect_reason(code: u8) -> m5::DisconnectReasonCode {
    use m5::DisconnectReasonCode as D;
    match code {
        reason::SUCCESS => D::NormalDisconnection,
        reason::MALFORMED => D::MalformedPacket,
        reason::PROTOCOL_ERROR => D::ProtocolError,
        reason::IMPLEMENTATION_SPECIFIC => D::ImplementationSpecificError,
        reason::NOT_AUTHORIZED => D::NotAuthorized,
        reason::SERVER_BUSY => D::ServerBusy,
        reason::SERVER_SHUTTING_DOWN => D::ServerShuttingDown,
        reason::KEEP_ALIVE_TIMEOUT => D::KeepAliveTimeout,
        reason::SESSION_TAKEN_OVER => D::SessionTakenOver,
        reason::TOPIC_NAME_INVALID => D::TopicNameInvalid,
        reason::RECEIVE_MAXIMUM_EXCEEDED => D::ReceiveMaximumExceeded,
        reason::TOPIC_ALIAS_INVALID => D::TopicAliasInvalid,
        reason::PACKET_TOO_LARGE => D::PacketTooLarge,
        reason::QUOTA_EXCEEDED => D::QuotaExceeded,
        reason::QOS_NOT_SUPPORTED => D::QoSNotSupported,
        reason::RETAIN_NOT_SUPPORTED => D::RetainNotSupported,
        _ => D::UnspecifiedError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(write: impl FnOnce(&mut BytesMut)) -> BytesMut {
        let mut b = BytesMut::new();
        write(&mut b);
        b
    }

    fn decode_one(mut b: BytesMut, v: Version) -> Inbound {
        let p = decode(&mut b, Some(v), 1 << 16)
            .expect("decodes")
            .expect("whole");
        assert!(b.is_empty(), "the packet was consumed whole");
        p
    }

    #[test]
    fn subscribe_v311_gives_each_filter_and_its_qos() {
        let mut s = m4::Subscribe::new("devices/d1/commands/#", QoS::ExactlyOnce);
        s.pkid = 7;
        s.filters
            .push(m4::SubscribeFilter::new("a/+/b".into(), QoS::AtMostOnce));
        let b = bytes_of(|b| {
            s.write(b).expect("encodes");
        });
        let Inbound::Subscribe { pkid, filters } = decode_one(b, Version::V311) else {
            panic!("not a SUBSCRIBE")
        };
        assert_eq!(pkid, 7);
        let got: Vec<_> = filters.iter().map(|f| (f.filter.as_str(), f.qos)).collect();
        assert_eq!(got, [("devices/d1/commands/#", 2), ("a/+/b", 0)]);
        assert!(filters
            .iter()
            .all(|f| !f.no_local && !f.retain_as_published && f.retain_handling == 0));
    }

    #[test]
    fn subscribe_v5_keeps_the_subscription_options() {
        let s = m5::Subscribe {
            pkid: 9,
            filters: vec![m5::Filter {
                path: "x/#".into(),
                qos: QoS5::AtLeastOnce,
                nolocal: true,
                preserve_retain: true,
                retain_forward_rule: m5::RetainForwardRule::Never,
            }],
            properties: Some(m5::SubscribeProperties {
                id: Some(268_435_455),
                user_properties: Vec::new(),
            }),
        };
        let b = bytes_of(|b| {
            s.write(b).expect("encodes");
        });
        let Inbound::Subscribe { pkid, filters } = decode_one(b, Version::V5) else {
            panic!("not a SUBSCRIBE")
        };
        assert_eq!(pkid, 9);
        assert_eq!(
            filters,
            [Subscription {
                filter: "x/#".into(),
                qos: 1,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
                subscription_id: Some(268_435_455),
            }]
        );
    }

    #[test]
    fn a_v5_publish_keeps_expiry_response_topic_and_correlation_data() {
        let props = m5::PublishProperties {
            message_expiry_interval: Some(90),
            response_topic: Some("devices/d1/replies".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            ..Default::default()
        };
        let mut p = m5::Publish::new("devices/d1/req", QoS5::AtLeastOnce, "x", Some(props));
        p.pkid = 4;
        let b = bytes_of(|b| {
            p.write(b).expect("encodes");
        });
        let Inbound::Publish(p) = decode_one(b, Version::V5) else {
            panic!("not a PUBLISH")
        };
        assert_eq!(p.message_expiry, Some(90));
        assert_eq!(p.response_topic.as_deref(), Some("devices/d1/replies"));
        assert_eq!(p.correlation_data.as_deref(), Some(&b"\x00\x01"[..]));
    }

    #[test]
    fn a_subscription_identifier_given_twice_does_not_decode() {
        // pkid 1; properties: user property ("k", "v"), id 5, id 6; filter "a", QoS 1.
        let body = [
            0, 1, 11, 0x26, 0, 1, b'k', 0, 1, b'v', 0x0B, 5, 0x0B, 6, 0, 1, b'a', 1,
        ];
        let mut b = BytesMut::from(&[0x82, body.len() as u8][..]);
        b.extend_from_slice(&body);
        assert!(matches!(
            decode(&mut b, Some(Version::V5), 1 << 16),
            Err(DecodeError::Malformed(_))
        ));
        // Once is fine.
        let body = [0, 1, 2, 0x0B, 5, 0, 1, b'a', 1];
        let mut b = BytesMut::from(&[0x82, body.len() as u8][..]);
        b.extend_from_slice(&body);
        let Ok(Some(Inbound::Subscribe { filters, .. })) =
            decode(&mut b, Some(Version::V5), 1 << 16)
        else {
            panic!("not a SUBSCRIBE")
        };
        assert_eq!(filters[0].subscription_id, Some(5));
    }

    #[test]
    fn unsubscribe_and_acks_from_a_subscriber_decode_with_their_ids() {
        let u = m4::Unsubscribe {
            pkid: 3,
            topics: vec!["a/b".into(), "c/#".into()],
        };
        let b = bytes_of(|b| {
            u.write(b).expect("encodes");
        });
        assert_eq!(
            decode_one(b, Version::V311),
            Inbound::Unsubscribe {
                pkid: 3,
                filters: vec!["a/b".into(), "c/#".into()]
            }
        );
        let b = bytes_of(|b| {
            m4::PubAck::new(11).write(b).expect("encodes");
        });
        assert_eq!(decode_one(b, Version::V311), Inbound::PubAck { pkid: 11 });
        let b = bytes_of(|b| {
            m5::PubRec::new(12, None).write(b).expect("encodes");
        });
        assert_eq!(decode_one(b, Version::V5), Inbound::PubRec { pkid: 12 });
        let b = bytes_of(|b| {
            m5::PubComp::new(13, None).write(b).expect("encodes");
        });
        assert_eq!(decode_one(b, Version::V5), Inbound::PubComp { pkid: 13 });
    }

    fn out_publish(qos: u8, user_properties: &[(String, String)]) -> OutPublish<'_> {
        OutPublish {
            topic: "devices/d1/commands/reboot",
            qos,
            retain: true,
            dup: qos > 0,
            pkid: if qos > 0 { 42 } else { 0 },
            payload: b"now",
            user_properties,
            content_type: Some("text/plain"),
            payload_format: Some(1),
            response_topic: Some("r/t"),
            correlation_data: Some(b"c1"),
            message_expiry: Some(30),
            subscription_ids: &[1, 300],
        }
    }

    fn props() -> Vec<(String, String)> {
        vec![("k".into(), "v".into())]
    }

    #[test]
    fn publish_to_a_v5_subscriber_carries_its_properties() {
        let mut b = BytesMut::new();
        encode_publish(&out_publish(1, &props()), Version::V5, &mut b);
        let len = b.len();
        let Ok(m5::Packet::Publish(p)) = m5::Packet::read(&mut b, Some(len as u32)) else {
            panic!("not a PUBLISH")
        };
        assert_eq!(&p.topic[..], b"devices/d1/commands/reboot");
        assert_eq!(
            (p.qos, p.retain, p.dup, p.pkid),
            (QoS5::AtLeastOnce, true, true, 42)
        );
        assert_eq!(&p.payload[..], b"now");
        let props = p.properties.expect("properties");
        assert_eq!(props.response_topic.as_deref(), Some("r/t"));
        assert_eq!(props.correlation_data.as_deref(), Some(&b"c1"[..]));
        assert_eq!(props.message_expiry_interval, Some(30));
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(props.user_properties, vec![("k".into(), "v".into())]);
        assert_eq!(props.subscription_identifiers, [1, 300]);
    }

    #[test]
    fn publish_edge_cases_encode_as_the_spec_says() {
        // The largest subscription identifier, no properties but it, QoS 0 without DUP.
        let none: Vec<(String, String)> = Vec::new();
        let p = OutPublish {
            topic: "t",
            qos: 0,
            retain: false,
            dup: true,
            pkid: 0,
            payload: &[],
            user_properties: &none,
            content_type: None,
            payload_format: None,
            response_topic: None,
            correlation_data: None,
            message_expiry: None,
            subscription_ids: &[268_435_455],
        };
        let mut b = BytesMut::new();
        encode_publish(&p, Version::V5, &mut b);
        assert_eq!(b[0], 0x30, "QoS 0 never carries DUP");
        let len = b.len();
        let Ok(m5::Packet::Publish(got)) = m5::Packet::read(&mut b, Some(len as u32)) else {
            panic!("not a PUBLISH")
        };
        assert_eq!(
            got.properties.expect("properties").subscription_identifiers,
            [268_435_455]
        );
        // A payload whose remaining length needs 3 bytes, as 3.1.1 and 5.
        let big = vec![7u8; 20_000];
        for v in [Version::V311, Version::V5] {
            let mut b = BytesMut::new();
            encode_publish(
                &OutPublish {
                    payload: &big,
                    qos: 2,
                    pkid: 7,
                    ..p
                },
                v,
                &mut b,
            );
            let len = b.len();
            let payload = match v {
                Version::V311 => match m4::Packet::read(&mut b, len) {
                    Ok(m4::Packet::Publish(got)) => got.payload,
                    other => panic!("{other:?}"),
                },
                Version::V5 => match m5::Packet::read(&mut b, Some(len as u32)) {
                    Ok(m5::Packet::Publish(got)) => got.payload,
                    other => panic!("{other:?}"),
                },
            };
            assert_eq!(payload.len(), 20_000);
        }
        // A string MQTT cannot carry: nothing is appended.
        let long = "x".repeat(70_000);
        let mut b = BytesMut::new();
        encode_publish(
            &OutPublish {
                response_topic: Some(&long),
                ..p
            },
            Version::V5,
            &mut b,
        );
        assert!(b.is_empty());
    }

    #[test]
    fn publish_to_a_v311_subscriber_drops_the_v5_properties() {
        for qos in [0, 2] {
            let mut b = BytesMut::new();
            encode_publish(&out_publish(qos, &props()), Version::V311, &mut b);
            let len = b.len();
            let Ok(m4::Packet::Publish(p)) = m4::Packet::read(&mut b, len) else {
                panic!("not a PUBLISH")
            };
            assert_eq!(p.topic, "devices/d1/commands/reboot");
            assert_eq!(qos_u8(p.qos), qos);
            assert_eq!(p.pkid, if qos > 0 { 42 } else { 0 });
            assert_eq!(&p.payload[..], b"now");
        }
    }

    #[test]
    fn a_reason_string_goes_with_v5_acks_and_not_with_v311() {
        let text = "not authorized".to_string();
        let with = |packet| Outbound::WithReason {
            packet: Box::new(packet),
            text: text.clone(),
        };
        let mut b = BytesMut::new();
        encode(
            &with(Outbound::PubAck {
                pkid: 3,
                reason: reason::QUOTA_EXCEEDED,
            }),
            Version::V5,
            &mut b,
        );
        let len = b.len();
        let Ok(m5::Packet::PubAck(a)) = m5::Packet::read(&mut b, Some(len as u32)) else {
            panic!("not a PUBACK")
        };
        assert_eq!(a.reason, m5::PubAckReason::QuotaExceeded);
        assert_eq!(
            a.properties.and_then(|p| p.reason_string).as_deref(),
            Some("not authorized")
        );
        let mut b = BytesMut::new();
        let suback = Outbound::SubAck {
            pkid: 4,
            codes: vec![reason::NOT_AUTHORIZED],
        };
        encode(&with(suback.clone()), Version::V5, &mut b);
        let len = b.len();
        let Ok(m5::Packet::SubAck(a)) = m5::Packet::read(&mut b, Some(len as u32)) else {
            panic!("not a SUBACK")
        };
        assert_eq!(
            a.properties.and_then(|p| p.reason_string).as_deref(),
            Some("not authorized")
        );
        assert_eq!(encoded_len(&with(suback.clone()), Version::V5), len);
        // 3.1.1: the packet as it is.
        let (mut plain, mut wrapped) = (BytesMut::new(), BytesMut::new());
        encode(&suback, Version::V311, &mut plain);
        encode(&with(suback), Version::V311, &mut wrapped);
        assert_eq!(plain, wrapped);
    }

    #[test]
    fn suback_codes_are_granted_qos_or_failures_per_version() {
        let ack = Outbound::SubAck {
            pkid: 5,
            codes: vec![1, reason::NOT_AUTHORIZED, 2, 0],
        };
        let mut b = BytesMut::new();
        encode(&ack, Version::V311, &mut b);
        // 3.1.1 knows one failure code, 0x80.
        assert_eq!(&b[..], &[0x90, 0x06, 0x00, 0x05, 0x01, 0x80, 0x02, 0x00]);
        let mut b = BytesMut::new();
        encode(&ack, Version::V5, &mut b);
        let len = b.len();
        let Ok(m5::Packet::SubAck(s)) = m5::Packet::read(&mut b, Some(len as u32)) else {
            panic!("not a SUBACK")
        };
        assert_eq!(
            s.return_codes,
            [
                m5::SubscribeReasonCode::Success(QoS5::AtLeastOnce),
                m5::SubscribeReasonCode::NotAuthorized,
                m5::SubscribeReasonCode::Success(QoS5::ExactlyOnce),
                m5::SubscribeReasonCode::Success(QoS5::AtMostOnce),
            ]
        );
    }
}
