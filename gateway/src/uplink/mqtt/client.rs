//! The MQTT uplink's client protocol state, no I/O: packet ids, the acknowledgement flows of
//! QoS 1 (PUBLISH -> PUBACK) and QoS 2 (PUBLISH -> PUBREC -> PUBREL -> PUBCOMP), the broker's
//! receive maximum, and what a persistent session carries from one connection to the next.
//! The connection task ([`super`]) feeds it decoded packets and writes the bytes it appends.
//!
//! Invariants:
//! - A packet id is in [`Inflight::slots`] from the PUBLISH that uses it until its final ack
//!   (PUBACK, PUBCOMP, or a PUBACK/PUBREC with a failure code); none is used twice meanwhile.
//! - What the broker may still hold of a previous connection (a resumed session) stays in
//!   `slots` (`carried`) until the forwarder sends that record again: a publish still
//!   unacknowledged goes again with DUP and the same packet id, one whose PUBREC came goes on
//!   with PUBREL, as MQTT requires. A carried slot whose record is not sent again (its turn
//!   passed: the forwarder settled it otherwise) is cleaned up (QoS 2: PUBREL, answer ignored),
//!   so the broker never takes a later record under its packet id for a duplicate.
//! - At most `receive_max` flows are open at once (MQTT 5 CONNACK Receive Maximum); the rest
//!   wait, encoded, in `queued`, in order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::DerefMut;

use bytes::{Buf, BytesMut};
use rumqttc::mqttbytes::v4 as m4;
use rumqttc::mqttbytes::Protocol;
use rumqttc::v5::mqttbytes::v5 as m5;

use crate::config::MqttProtocol;
use crate::ingest::codec::{encode_publish, OutPublish, Version};
use crate::uplink::{Outcome, Prepared};

/// Where one packet id stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Encoded, waiting for room under the receive maximum: never written.
    Queued,
    /// PUBLISH written, no answer yet.
    Published,
    /// QoS 2: PUBREC came, PUBREL written, waiting for PUBCOMP.
    Released,
    /// A carried QoS 2 flow whose record was not sent again: PUBREL written to free the packet
    /// id at the broker; its PUBCOMP is not an answer to the forwarder.
    Cleanup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    seq: u64,
    stage: Stage,
    /// From a previous connection of the session, not yet sent again on this one.
    carried: bool,
}

/// The packet-id state of one uplink's session, kept across its connections (see
/// [`super::MqttUplink`]: a registry per uplink, broker and client id).
#[derive(Debug, Default)]
pub struct Inflight {
    slots: BTreeMap<u16, Slot>,
    /// seq -> packet id of the slots.
    by_seq: BTreeMap<u64, u16>,
    /// Records of the carried slots not sent again yet (so a publish looks only at them).
    carried: BTreeSet<u64>,
    /// Records that may have reached the broker on an earlier connection whose session is
    /// gone: they go again with DUP set.
    maybe_sent: BTreeSet<u64>,
    last_pkid: u16,
    /// A connection of this process was accepted: the broker's session state is ours. Before,
    /// it may hold QoS 2 packet ids of a previous run that we do not know.
    pub started: bool,
    /// The broker url of the last accepted connection. Another node starts a clean session:
    /// nodes of a cluster may share sessions, and this state knows only what went through the
    /// connections it saw.
    pub node: Option<String>,
}

/// The CONNACK, whichever version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// Reason code (3.1.1 return codes 1-5 are given as they are).
    pub code: u8,
    pub reason: Option<String>,
    pub receive_max: Option<u16>,
    pub max_packet: Option<u32>,
    pub max_qos: Option<u8>,
    /// MQTT 5 Server Keep Alive: the keep alive the client must use instead of its own.
    pub server_keep_alive: Option<u16>,
}

/// What the broker sends a publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    ConnAck(ConnAck),
    PubAck {
        pkid: u16,
        code: u8,
        reason: Option<String>,
    },
    PubRec {
        pkid: u16,
        code: u8,
        reason: Option<String>,
    },
    PubComp {
        pkid: u16,
    },
    PingResp,
    Disconnect {
        code: u8,
        reason: Option<String>,
    },
    /// A PUBLISH from the broker (the session has a subscription someone else made under this
    /// client id): acknowledged and dropped.
    Publish {
        qos: u8,
        pkid: u16,
    },
    /// The PUBREL of a QoS 2 PUBLISH from the broker.
    PubRel {
        pkid: u16,
    },
    /// A packet a publisher does not expect (its type).
    Unexpected(&'static str),
}

/// Why the connection must end (a protocol violation or the broker's DISCONNECT).
pub type ProtocolError = String;

/// The client side of one connection.
pub struct Client<P: DerefMut<Target = Inflight>> {
    inflight: P,
    version: Version,
    /// Flows open at once, at most.
    receive_max: usize,
    /// Largest packet the broker takes (MQTT 5), if it said.
    max_packet: Option<usize>,
    /// Flows open (slots written and not finished, cleanups included).
    open: usize,
    queued: VecDeque<(u16, BytesMut)>,
    qos: u8,
}

/// The MQTT 5 name of a PUBACK/PUBREC/CONNACK/DISCONNECT reason code.
pub fn reason_name(code: u8) -> &'static str {
    match code {
        0x00 => "success",
        0x01 => "unacceptable protocol version",
        0x02 => "identifier rejected",
        0x03 => "server unavailable",
        0x04 => "bad user name or password",
        0x05 => "not authorized",
        0x10 => "no matching subscribers",
        0x80 => "unspecified error",
        0x81 => "malformed packet",
        0x82 => "protocol error",
        0x83 => "implementation specific error",
        0x84 => "unsupported protocol version",
        0x85 => "client identifier not valid",
        0x86 => "bad user name or password",
        0x87 => "not authorized",
        0x88 => "server unavailable",
        0x89 => "server busy",
        0x8A => "banned",
        0x8B => "server shutting down",
        0x8C => "bad authentication method",
        0x8D => "keep alive timeout",
        0x8E => "session taken over",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x92 => "packet identifier not found",
        0x93 => "receive maximum exceeded",
        0x95 => "packet too large",
        0x96 => "message rate too high",
        0x97 => "quota exceeded",
        0x98 => "administrative action",
        0x99 => "payload format invalid",
        0x9A => "retain not supported",
        0x9B => "QoS not supported",
        0x9C => "use another server",
        0x9D => "server moved",
        0x9F => "connection rate exceeded",
        _ => "unknown reason code",
    }
}

/// A reason code with its name and the broker's reason string, for logs and dead letters.
pub fn describe_reason(code: u8, reason: Option<&str>) -> String {
    match reason {
        Some(r) if !r.is_empty() => format!("0x{code:02X} {} ({r})", reason_name(code)),
        _ => format!("0x{code:02X} {}", reason_name(code)),
    }
}

/// A refusal of one message: retried (then dead-lettered) when it may pass later, returned
/// (dead-lettered at once) when it will not.
fn refusal(code: u8, reason: Option<&str>) -> Outcome {
    match code {
        // Transient: the broker's quota, or a packet id it still holds (resent later).
        0x97 | 0x91 => Outcome::Nacked,
        _ => Outcome::Returned {
            code: u16::from(code),
            text: format!("MQTT {}", describe_reason(code, reason)),
        },
    }
}

/// How the gateway connects: what goes in CONNECT. Its `Debug` leaves the password out.
#[derive(Clone)]
pub struct ConnectOptions<'a> {
    pub protocol: MqttProtocol,
    pub client_id: &'a str,
    pub keep_alive_secs: u16,
    /// Start a new session (discarding the broker's), or resume it.
    pub clean: bool,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    /// MQTT 5: how long the broker keeps the session after a disconnect.
    pub session_expiry_secs: u32,
}

impl std::fmt::Debug for ConnectOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("protocol", &self.protocol)
            .field("client_id", &self.client_id)
            .field("keep_alive_secs", &self.keep_alive_secs)
            .field("clean", &self.clean)
            .field("username", &self.username)
            .field("password", &self.password.map(|_| "***"))
            .field("session_expiry_secs", &self.session_expiry_secs)
            .finish()
    }
}

/// Appends the CONNECT of `o` to `out`.
pub fn encode_connect(o: &ConnectOptions<'_>, out: &mut BytesMut) -> Result<(), String> {
    let login = o.username.map(|u| (u, o.password.unwrap_or("")));
    let r = match o.protocol {
        MqttProtocol::V311 => m4::Connect {
            protocol: Protocol::V4,
            keep_alive: o.keep_alive_secs,
            client_id: o.client_id.to_string(),
            clean_session: o.clean,
            last_will: None,
            login: login.map(|(u, p)| m4::Login::new(u, p)),
        }
        .write(out)
        .map(|_| ())
        .map_err(|e| format!("{e:?}")),
        MqttProtocol::V5 => {
            let mut props = m5::ConnectProperties::new();
            props.session_expiry_interval = Some(o.session_expiry_secs);
            m5::Connect {
                keep_alive: o.keep_alive_secs,
                client_id: o.client_id.to_string(),
                clean_start: o.clean,
                properties: Some(props),
            }
            .write(&None, &login.map(|(u, p)| m5::Login::new(u, p)), out)
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
        }
    };
    r.map_err(|e| format!("cannot encode CONNECT: {e}"))
}

/// Appends a DISCONNECT (normal: a v5 session is kept for its expiry).
pub fn encode_disconnect(protocol: MqttProtocol, out: &mut BytesMut) {
    match protocol {
        MqttProtocol::V311 => {
            let _ = m4::Disconnect.write(out);
        }
        MqttProtocol::V5 => {
            let _ = m5::Disconnect {
                reason_code: m5::DisconnectReasonCode::NormalDisconnection,
                properties: None,
            }
            .write(out);
        }
    }
}

/// Appends a PINGREQ.
pub fn encode_pingreq(protocol: MqttProtocol, out: &mut BytesMut) {
    match protocol {
        MqttProtocol::V311 => {
            let _ = m4::PingReq.write(out);
        }
        MqttProtocol::V5 => {
            let _ = m5::PingReq::write(out);
        }
    }
}

/// The seq of a slot that carries no record (the cleanup of a flow this state did not know).
const NO_RECORD: u64 = u64::MAX;

/// Acks of a PUBLISH the broker sent: PUBACK, PUBREC, PUBCOMP.
#[derive(Debug, Clone, Copy)]
enum AckKind {
    Ack,
    Rec,
    Comp,
}

fn encode_ack(version: Version, kind: AckKind, pkid: u16, out: &mut BytesMut) {
    // Fixed-size packets: writing them into a BytesMut cannot fail.
    let _ = match (version, kind) {
        (Version::V311, AckKind::Ack) => m4::PubAck::new(pkid).write(out).is_ok(),
        (Version::V311, AckKind::Rec) => m4::PubRec::new(pkid).write(out).is_ok(),
        (Version::V311, AckKind::Comp) => m4::PubComp::new(pkid).write(out).is_ok(),
        (Version::V5, AckKind::Ack) => m5::PubAck::new(pkid, None).write(out).is_ok(),
        (Version::V5, AckKind::Rec) => m5::PubRec::new(pkid, None).write(out).is_ok(),
        (Version::V5, AckKind::Comp) => m5::PubComp::new(pkid, None).write(out).is_ok(),
    };
}

fn encode_pubrel(version: Version, pkid: u16, out: &mut BytesMut) {
    match version {
        Version::V311 => {
            let _ = m4::PubRel::new(pkid).write(out);
        }
        Version::V5 => {
            let _ = m5::PubRel {
                pkid,
                reason: m5::PubRelReason::Success,
                properties: None,
            }
            .write(out);
        }
    }
}

fn connack_code_v5(c: m5::ConnectReturnCode) -> u8 {
    use m5::ConnectReturnCode as C;
    match c {
        C::Success => 0x00,
        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => 0x84,
        C::BadClientId | C::ClientIdentifierNotValid => 0x85,
        C::ServiceUnavailable | C::ServerUnavailable => 0x88,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerBusy => 0x89,
        C::Banned => 0x8A,
        C::BadAuthenticationMethod => 0x8C,
        C::TopicNameInvalid => 0x90,
        C::PacketTooLarge => 0x95,
        C::QuotaExceeded => 0x97,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9A,
        C::QoSNotSupported => 0x9B,
        C::UseAnotherServer => 0x9C,
        C::ServerMoved => 0x9D,
        C::ConnectionRateExceeded => 0x9F,
    }
}

fn puback_code_v5(r: m5::PubAckReason) -> u8 {
    use m5::PubAckReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

fn pubrec_code_v5(r: m5::PubRecReason) -> u8 {
    use m5::PubRecReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

/// Decodes one packet from the front of `buf` (consuming it); `Ok(None)`: more bytes needed.
/// Untrusted bytes: errors, never panics.
pub fn decode(
    buf: &mut BytesMut,
    protocol: MqttProtocol,
    max: usize,
) -> Result<Option<Incoming>, ProtocolError> {
    // A v5 DISCONNECT without a body (reason 0x00) is valid MQTT the codec does not decode.
    if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0 {
        buf.advance(2);
        return Ok(Some(Incoming::Disconnect {
            code: 0,
            reason: None,
        }));
    }
    match protocol {
        MqttProtocol::V311 => match m4::Packet::read(buf, max) {
            Ok(p) => Ok(Some(match p {
                m4::Packet::ConnAck(c) => Incoming::ConnAck(ConnAck {
                    session_present: c.session_present,
                    code: c.code as u8,
                    reason: None,
                    receive_max: None,
                    max_packet: None,
                    max_qos: None,
                    server_keep_alive: None,
                }),
                m4::Packet::PubAck(a) => Incoming::PubAck {
                    pkid: a.pkid,
                    code: 0,
                    reason: None,
                },
                m4::Packet::PubRec(a) => Incoming::PubRec {
                    pkid: a.pkid,
                    code: 0,
                    reason: None,
                },
                m4::Packet::PubComp(a) => Incoming::PubComp { pkid: a.pkid },
                m4::Packet::PingResp => Incoming::PingResp,
                m4::Packet::Disconnect => Incoming::Disconnect {
                    code: 0,
                    reason: None,
                },
                m4::Packet::Publish(p) => Incoming::Publish {
                    qos: p.qos as u8,
                    pkid: p.pkid,
                },
                m4::Packet::PubRel(r) => Incoming::PubRel { pkid: r.pkid },
                _ => Incoming::Unexpected("a packet only clients send"),
            })),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(format!("malformed packet from the broker: {e:?}")),
        },
        MqttProtocol::V5 => match m5::Packet::read(buf, u32::try_from(max).ok()) {
            Ok(p) => Ok(Some(match p {
                m5::Packet::ConnAck(c) => {
                    let props = c.properties;
                    Incoming::ConnAck(ConnAck {
                        session_present: c.session_present,
                        code: connack_code_v5(c.code),
                        reason: props.as_ref().and_then(|p| p.reason_string.clone()),
                        receive_max: props.as_ref().and_then(|p| p.receive_max),
                        max_packet: props.as_ref().and_then(|p| p.max_packet_size),
                        max_qos: props.as_ref().and_then(|p| p.max_qos),
                        server_keep_alive: props.as_ref().and_then(|p| p.server_keep_alive),
                    })
                }
                m5::Packet::PubAck(a) => Incoming::PubAck {
                    pkid: a.pkid,
                    code: puback_code_v5(a.reason),
                    reason: a.properties.and_then(|p| p.reason_string),
                },
                m5::Packet::PubRec(a) => Incoming::PubRec {
                    pkid: a.pkid,
                    code: pubrec_code_v5(a.reason),
                    reason: a.properties.and_then(|p| p.reason_string),
                },
                m5::Packet::PubComp(a) => Incoming::PubComp { pkid: a.pkid },
                m5::Packet::PingResp(_) => Incoming::PingResp,
                m5::Packet::Disconnect(d) => Incoming::Disconnect {
                    code: d.reason_code as u8,
                    reason: d.properties.and_then(|p| p.reason_string),
                },
                m5::Packet::Publish(p) => Incoming::Publish {
                    qos: p.qos as u8,
                    pkid: p.pkid,
                },
                m5::Packet::PubRel(r) => Incoming::PubRel { pkid: r.pkid },
                m5::Packet::Auth(_) => Incoming::Unexpected("AUTH"),
                _ => Incoming::Unexpected("a packet only clients send"),
            })),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(format!("malformed packet from the broker: {e:?}")),
        },
    }
}

impl<P: DerefMut<Target = Inflight>> Client<P> {
    /// The client of a connection whose CONNACK `ack` accepted it. `ack.code` must be 0 (the
    /// caller turns a refusal into a connect error). Writes what a resumed session needs first
    /// (PUBREL of carried cleanups) to `out`.
    pub fn new(
        mut inflight: P,
        protocol: MqttProtocol,
        qos: u8,
        ack: &ConnAck,
        out: &mut BytesMut,
    ) -> Client<P> {
        let version = match protocol {
            MqttProtocol::V311 => Version::V311,
            MqttProtocol::V5 => Version::V5,
        };
        let inf = &mut *inflight;
        inf.started = true;
        let mut open = 0;
        if ack.session_present {
            // Never written: nothing of them is at the broker.
            let queued: Vec<u16> = inf
                .slots
                .iter()
                .filter(|(_, s)| s.stage == Stage::Queued)
                .map(|(&p, _)| p)
                .collect();
            for pkid in queued {
                if let Some(s) = inf.slots.remove(&pkid) {
                    inf.by_seq.remove(&s.seq);
                }
            }
            inf.carried.clear();
            for (&pkid, s) in inf.slots.iter_mut() {
                if s.stage == Stage::Cleanup {
                    s.carried = false;
                    encode_pubrel(version, pkid, out);
                    open += 1;
                } else {
                    s.carried = true;
                    inf.carried.insert(s.seq);
                }
            }
        } else {
            // The broker has no session: nothing it held is left; what was written may have
            // been delivered, so it goes again marked DUP.
            for s in inf.slots.values() {
                if s.stage != Stage::Queued && s.seq != NO_RECORD {
                    inf.maybe_sent.insert(s.seq);
                }
            }
            inf.slots.clear();
            inf.by_seq.clear();
            inf.carried.clear();
        }
        let receive_max = match version {
            Version::V5 => usize::from(ack.receive_max.unwrap_or(u16::MAX).max(1)),
            Version::V311 => usize::from(u16::MAX),
        };
        Client {
            inflight,
            version,
            receive_max,
            max_packet: ack.max_packet.map(|m| m as usize),
            open,
            queued: VecDeque::new(),
            qos,
        }
    }

    /// Lowers the flows open at once to `max` (`max_inflight`); the broker's receive maximum
    /// still bounds them under MQTT 5.
    pub fn limit_in_flight(&mut self, max: usize) {
        self.receive_max = self.receive_max.min(max.max(1));
    }

    /// Flows the broker takes at once (its receive maximum under MQTT 5).
    pub fn receive_max(&self) -> usize {
        self.receive_max
    }

    /// Flows open now (written, not finished).
    pub fn open(&self) -> usize {
        self.open
    }

    fn free_pkid(&mut self) -> Option<u16> {
        let inf = &mut *self.inflight;
        for _ in 0..u16::MAX {
            inf.last_pkid = inf.last_pkid.checked_add(1).unwrap_or(1);
            if !inf.slots.contains_key(&inf.last_pkid) {
                return Some(inf.last_pkid);
            }
        }
        None
    }

    /// Carried slots of records before `seq` that were not sent again: the forwarder settled
    /// them otherwise. QoS 1: forgotten; QoS 2: released (PUBREL) so the id is free again.
    fn clean_up_before(&mut self, seq: u64, out: &mut BytesMut) {
        if self.inflight.carried.first().is_none_or(|&c| c >= seq) {
            return;
        }
        let stale: Vec<u64> = self.inflight.carried.range(..seq).copied().collect();
        for s in stale {
            self.inflight.carried.remove(&s);
            let Some(&pkid) = self.inflight.by_seq.get(&s) else {
                continue;
            };
            let Some(slot) = self.inflight.slots.get(&pkid).copied() else {
                continue;
            };
            if !slot.carried {
                continue;
            }
            self.inflight.by_seq.remove(&s);
            if self.qos == 2 || slot.stage == Stage::Released {
                if let Some(slot) = self.inflight.slots.get_mut(&pkid) {
                    slot.stage = Stage::Cleanup;
                    slot.carried = false;
                }
                self.write_or_queue(pkid, pubrel_bytes(self.version, pkid), out);
            } else {
                self.inflight.slots.remove(&pkid);
            }
        }
    }

    fn write_or_queue(&mut self, pkid: u16, bytes: BytesMut, out: &mut BytesMut) {
        if self.open < self.receive_max && self.queued.is_empty() {
            self.open += 1;
            out.extend_from_slice(&bytes);
            if let Some(s) = self.inflight.slots.get_mut(&pkid) {
                if s.stage == Stage::Queued {
                    s.stage = Stage::Published;
                }
            }
        } else {
            self.queued.push_back((pkid, bytes));
        }
    }

    /// Writes queued flows while there is room.
    fn release_queued(&mut self, out: &mut BytesMut) {
        while self.open < self.receive_max {
            let Some((pkid, bytes)) = self.queued.pop_front() else {
                return;
            };
            self.open += 1;
            out.extend_from_slice(&bytes);
            if let Some(s) = self.inflight.slots.get_mut(&pkid) {
                if s.stage == Stage::Queued {
                    s.stage = Stage::Published;
                }
            }
        }
    }

    /// Publishes `m` (record `m.record.seq`), appending what to write to `out`. `Some`: the
    /// answer is known without the broker (the message cannot be sent). `Err`: no packet id is
    /// free (cannot happen with a window of at most 65,535).
    pub fn publish(
        &mut self,
        gateway_id: &str,
        m: &Prepared,
        out: &mut BytesMut,
    ) -> Result<Option<Outcome>, ProtocolError> {
        let seq = m.record.seq;
        self.clean_up_before(seq, out);
        if let Some(&pkid) = self.inflight.by_seq.get(&seq) {
            if let Some(slot) = self.inflight.slots.get_mut(&pkid) {
                if slot.carried {
                    slot.carried = false;
                    let stage = slot.stage;
                    self.inflight.carried.remove(&seq);
                    match stage {
                        Stage::Released => {
                            self.write_or_queue(pkid, pubrel_bytes(self.version, pkid), out);
                            return Ok(None);
                        }
                        Stage::Published | Stage::Queued => {
                            let bytes = self.publish_bytes(gateway_id, m, pkid, true);
                            return Ok(match bytes {
                                Ok(b) => {
                                    self.write_or_queue(pkid, b, out);
                                    None
                                }
                                Err(o) => {
                                    self.inflight.by_seq.remove(&seq);
                                    if self.qos == 2 && stage == Stage::Published {
                                        // The broker may hold this QoS 2 id: release it (and
                                        // keep it until the PUBCOMP), or a later record under
                                        // it would be taken for a duplicate.
                                        if let Some(s) = self.inflight.slots.get_mut(&pkid) {
                                            s.stage = Stage::Cleanup;
                                            s.seq = NO_RECORD;
                                        }
                                        let b = pubrel_bytes(self.version, pkid);
                                        self.write_or_queue(pkid, b, out);
                                    } else {
                                        self.inflight.slots.remove(&pkid);
                                    }
                                    Some(o)
                                }
                            });
                        }
                        Stage::Cleanup => {}
                    }
                }
            }
        }
        let pkid = self
            .free_pkid()
            .ok_or_else(|| "no MQTT packet identifier is free (65,535 in flight)".to_string())?;
        let dup = self.inflight.maybe_sent.remove(&seq);
        match self.publish_bytes(gateway_id, m, pkid, dup) {
            Ok(bytes) => {
                self.inflight.slots.insert(
                    pkid,
                    Slot {
                        seq,
                        stage: Stage::Queued,
                        carried: false,
                    },
                );
                self.inflight.by_seq.insert(seq, pkid);
                self.write_or_queue(pkid, bytes, out);
                Ok(None)
            }
            Err(o) => Ok(Some(o)),
        }
    }

    /// The PUBLISH of `m` under `pkid`; the refusal if it cannot be sent.
    fn publish_bytes(
        &self,
        gateway_id: &str,
        m: &Prepared,
        pkid: u16,
        dup: bool,
    ) -> Result<BytesMut, Outcome> {
        // A template may expand to no topic, or to one with a wildcard (a device id with '+'):
        // a broker would close the connection on it, and the record would go again after every
        // reconnect. It is refused here instead.
        if let Err(e) = crate::topic::check_name(&m.destination, usize::from(u16::MAX)) {
            return Err(Outcome::Returned {
                code: 0x90,
                text: format!("MQTT 0x90 topic name invalid: {:?}: {e}", m.destination),
            });
        }
        let r = &m.record;
        let mut props: Vec<(String, String)> = Vec::new();
        if self.version == Version::V5 {
            // The device's own first, then the gateway's (as the AMQP headers and Kafka headers).
            props.reserve(r.user_properties.len() + 4);
            props.extend(r.user_properties.iter().cloned());
            props.push(("message_id".into(), format!("{gateway_id}-{}", r.seq)));
            props.push(("gateway_seq".into(), r.seq.to_string()));
            props.push(("device_id".into(), r.device_id.clone()));
            props.push(("mqtt_topic".into(), r.topic.clone()));
        }
        // A payload transcoded by the route (its content type changed) is UTF-8 JSON.
        let payload_format = if m.content_type != r.content_type {
            Some(1)
        } else {
            r.payload_format
        };
        let p = OutPublish {
            topic: &m.destination,
            qos: self.qos,
            retain: false,
            dup,
            pkid,
            payload: &m.payload,
            user_properties: &props,
            content_type: m.content_type.as_deref(),
            payload_format,
            response_topic: r.response_topic.as_deref(),
            correlation_data: r.correlation_data.as_deref(),
            message_expiry: None,
            subscription_ids: &[],
        };
        let mut b = BytesMut::new();
        encode_publish(&p, self.version, &mut b);
        if b.is_empty() {
            return Err(Outcome::Returned {
                code: 0x95,
                text: "MQTT 0x95 packet too large: a topic, property or payload is beyond MQTT's limits".into(),
            });
        }
        if let Some(max) = self.max_packet {
            if b.len() > max {
                return Err(Outcome::Returned {
                    code: 0x95,
                    text: format!(
                        "MQTT 0x95 packet too large: {} bytes, the broker takes at most {max} (its maximum packet size)",
                        b.len()
                    ),
                });
            }
        }
        Ok(b)
    }

    /// Handles a packet from the broker: answers for the forwarder (`(seq, outcome)`), bytes
    /// to write appended to `out`. `Err`: the connection must end.
    pub fn handle(
        &mut self,
        p: Incoming,
        out: &mut BytesMut,
    ) -> Result<Vec<(u64, Outcome)>, ProtocolError> {
        let mut answers = Vec::new();
        match p {
            Incoming::PubAck { pkid, code, reason } => {
                if let Some(s) = self.finish(pkid) {
                    if s.stage != Stage::Cleanup {
                        answers.push((
                            s.seq,
                            if code >= 0x80 {
                                refusal(code, reason.as_deref())
                            } else {
                                Outcome::Confirmed
                            },
                        ));
                    }
                } else {
                    tracing::debug!(pkid, "PUBACK for a packet id not in flight: ignored");
                }
            }
            Incoming::PubRec { pkid, code, reason } => {
                match self.inflight.slots.get(&pkid).copied() {
                    Some(s) if code >= 0x80 => {
                        // A failed PUBREC ends the flow (no PUBREL).
                        self.finish(pkid);
                        if s.stage != Stage::Cleanup {
                            answers.push((s.seq, refusal(code, reason.as_deref())));
                        }
                    }
                    Some(s) => {
                        if s.stage == Stage::Published {
                            if let Some(slot) = self.inflight.slots.get_mut(&pkid) {
                                slot.stage = Stage::Released;
                            }
                        }
                        encode_pubrel(self.version, pkid, out);
                    }
                    // Not ours (any more): release it so the broker forgets it too, and keep the id
                    // until its PUBCOMP, so that no record takes it meanwhile (that PUBCOMP would
                    // confirm the record before its own flow).
                    None if code < 0x80 => {
                        self.inflight.slots.insert(
                            pkid,
                            Slot {
                                seq: NO_RECORD,
                                stage: Stage::Cleanup,
                                carried: false,
                            },
                        );
                        self.open += 1;
                        encode_pubrel(self.version, pkid, out);
                    }
                    None => {}
                }
            }
            Incoming::PubComp { pkid } => {
                if let Some(s) = self.finish(pkid) {
                    if s.stage != Stage::Cleanup {
                        answers.push((s.seq, Outcome::Confirmed));
                    }
                }
            }
            Incoming::PingResp => {}
            Incoming::Publish { qos, pkid } => {
                // Nothing subscribes on this connection; a persistent session may hold a
                // subscription made under the same client id. Acknowledged (so the broker does
                // not send it again at each reconnect) and dropped.
                tracing::warn!(qos, "the broker sent a PUBLISH to the MQTT uplink's session (another client subscribed under its client id?): acknowledged and dropped");
                match qos {
                    0 => {}
                    1 => encode_ack(self.version, AckKind::Ack, pkid, out),
                    _ => encode_ack(self.version, AckKind::Rec, pkid, out),
                }
            }
            Incoming::PubRel { pkid } => encode_ack(self.version, AckKind::Comp, pkid, out),
            Incoming::Disconnect { code, reason } => {
                return Err(format!(
                    "the broker disconnected: {}",
                    describe_reason(code, reason.as_deref())
                ));
            }
            Incoming::ConnAck(_) => return Err("a second CONNACK from the broker".into()),
            Incoming::Unexpected(what) => {
                return Err(format!(
                    "the broker sent {what}, which an uplink that only publishes does not expect"
                ));
            }
        }
        self.release_queued(out);
        Ok(answers)
    }

    /// Ends the flow of `pkid`: its slot, if it was ours.
    fn finish(&mut self, pkid: u16) -> Option<Slot> {
        let s = self.inflight.slots.remove(&pkid)?;
        if self.inflight.by_seq.get(&s.seq) == Some(&pkid) {
            self.inflight.by_seq.remove(&s.seq);
            self.inflight.carried.remove(&s.seq);
        }
        // Bytes not yet written (a first send, or a resend waiting for room) are dropped, so they
        // never go under an id that a later record may take; only a flow written on this
        // connection held a place among the open ones (a carried flow not sent again did not).
        let waiting = self.queued.iter().any(|(p, _)| *p == pkid);
        if waiting {
            self.queued.retain(|(p, _)| *p != pkid);
        } else if s.stage != Stage::Queued && !s.carried {
            self.open = self.open.saturating_sub(1);
        }
        Some(s)
    }
}

fn pubrel_bytes(version: Version, pkid: u16) -> BytesMut {
    let mut b = BytesMut::new();
    encode_pubrel(version, pkid, &mut b);
    b
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::queue::Record;

    fn prepared(seq: u64) -> Prepared {
        Prepared {
            record: Record {
                seq,
                received_at_us: 0,
                device_id: "d1".into(),
                username: None,
                topic: "devices/d1/t".into(),
                qos: 1,
                retain: false,
                user_properties: vec![("unit".into(), "C".into())],
                content_type: Some("text/plain".into()),
                payload_format: Some(1),
                message_expiry: None,
                response_topic: None,
                correlation_data: None,
                payload: b"21.5".to_vec(),
            },
            destination: "site/devices/d1/t".into(),
            key: "d1".into(),
            payload: b"21.5".to_vec(),
            content_type: Some("text/plain".into()),
        }
    }

    fn ack(session_present: bool, receive_max: Option<u16>) -> ConnAck {
        ConnAck {
            session_present,
            code: 0,
            reason: None,
            receive_max,
            max_packet: None,
            max_qos: None,
            server_keep_alive: None,
        }
    }

    /// Decodes every packet the client wrote, as the broker would (v5 server side).
    fn written(out: &mut BytesMut) -> Vec<m5::Packet> {
        let mut v = Vec::new();
        while !out.is_empty() {
            v.push(m5::Packet::read(out, None).unwrap());
        }
        v
    }

    fn publish_ids(ps: &[m5::Packet]) -> Vec<(u16, bool)> {
        ps.iter()
            .filter_map(|p| match p {
                m5::Packet::Publish(p) => Some((p.pkid, p.dup)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_record_whose_topic_is_empty_or_has_a_wildcard_is_refused_without_being_sent() {
        let mut inf = Inflight::default();
        let mut out = BytesMut::new();
        let mut c = Client::new(&mut inf, MqttProtocol::V5, 1, &ack(false, None), &mut out);
        for bad in ["", "devices/a+b/t", "site/#"] {
            let mut m = prepared(3);
            m.destination = bad.to_string();
            match c.publish("gw", &m, &mut out).unwrap() {
                Some(Outcome::Returned { code: 0x90, text }) => {
                    assert!(text.contains("topic name invalid"), "{text}")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(out.is_empty(), "nothing written");
        assert_eq!(c.open(), 0);
    }

    #[test]
    fn max_inflight_lowers_the_flows_open_at_once() {
        let mut inf = Inflight::default();
        let mut out = BytesMut::new();
        let mut c = Client::new(&mut inf, MqttProtocol::V311, 2, &ack(false, None), &mut out);
        c.limit_in_flight(2);
        for seq in 1..=4 {
            assert_eq!(c.publish("gw", &prepared(seq), &mut out).unwrap(), None);
        }
        assert_eq!(c.open(), 2, "two flows open, the others wait");
    }

    #[test]
    fn a_v5_publish_carries_the_identity_as_user_properties() {
        let mut inf = Inflight::default();
        let mut out = BytesMut::new();
        let mut c = Client::new(&mut inf, MqttProtocol::V5, 1, &ack(false, None), &mut out);
        assert_eq!(c.publish("gw", &prepared(7), &mut out).unwrap(), None);
        let ps = written(&mut out);
        let [m5::Packet::Publish(p)] = &ps[..] else {
            panic!("{ps:?}")
        };
        assert_eq!(&p.topic[..], b"site/devices/d1/t");
        let props = p.properties.clone().unwrap();
        assert_eq!(
            props.user_properties,
            vec![
                ("unit".to_string(), "C".to_string()),
                ("message_id".into(), "gw-7".into()),
                ("gateway_seq".into(), "7".into()),
                ("device_id".into(), "d1".into()),
                ("mqtt_topic".into(), "devices/d1/t".into()),
            ]
        );
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(props.payload_format_indicator, Some(1));
        let answers = c
            .handle(
                Incoming::PubAck {
                    pkid: p.pkid,
                    code: 0,
                    reason: None,
                },
                &mut out,
            )
            .unwrap();
        assert_eq!(answers, vec![(7, Outcome::Confirmed)]);
        assert_eq!(c.open(), 0);
    }

    #[test]
    fn a_failure_reason_is_a_refusal_named_by_its_code_and_quota_is_retried() {
        let mut inf = Inflight::default();
        let mut out = BytesMut::new();
        let mut c = Client::new(&mut inf, MqttProtocol::V5, 1, &ack(false, None), &mut out);
        c.publish("gw", &prepared(1), &mut out).unwrap();
        c.publish("gw", &prepared(2), &mut out).unwrap();
        let ids = publish_ids(&written(&mut out));
        let a = c
            .handle(
                Incoming::PubAck {
                    pkid: ids[0].0,
                    code: 0x87,
                    reason: Some("denied by ACL".into()),
                },
                &mut out,
            )
            .unwrap();
        assert_eq!(
            a,
            vec![(
                1,
                Outcome::Returned {
                    code: 0x87,
                    text: "MQTT 0x87 not authorized (denied by ACL)".into()
                }
            )]
        );
        let a = c
            .handle(
                Incoming::PubAck {
                    pkid: ids[1].0,
                    code: 0x97,
                    reason: None,
                },
                &mut out,
            )
            .unwrap();
        assert_eq!(a, vec![(2, Outcome::Nacked)]);
    }

    #[test]
    fn the_receive_maximum_bounds_the_flows_open_and_the_rest_follow_in_order() {
        let mut inf = Inflight::default();
        let mut out = BytesMut::new();
        let mut c = Client::new(
            &mut inf,
            MqttProtocol::V5,
            1,
            &ack(false, Some(2)),
            &mut out,
        );
        for seq in 1..=5 {
            c.publish("gw", &prepared(seq), &mut out).unwrap();
        }
        let first = publish_ids(&written(&mut out));
        assert_eq!(first.len(), 2);
        let a = c
            .handle(
                Incoming::PubAck {
                    pkid: first[0].0,
                    code: 0,
                    reason: None,
                },
                &mut out,
            )
            .unwrap();
        assert_eq!(a, vec![(1, Outcome::Confirmed)]);
        let next = written(&mut out);
        let [m5::Packet::Publish(p)] = &next[..] else {
            panic!("{next:?}")
        };
        // The third record, not any other: order holds.
        assert_eq!(p.pkid, 3);
        assert_eq!(c.open(), 2);
    }

    #[test]
    fn qos2_confirms_at_pubcomp_and_a_resumed_session_continues_each_flow() {
        let mut inf = Inflight::default();
        let mut out = BytesMut::new();
        {
            let mut c = Client::new(&mut inf, MqttProtocol::V5, 2, &ack(false, None), &mut out);
            for seq in 1..=3 {
                c.publish("gw", &prepared(seq), &mut out).unwrap();
            }
            let ids = publish_ids(&written(&mut out));
            // Record 1 reached PUBREC (PUBREL sent), then the connection dropped.
            let a = c
                .handle(
                    Incoming::PubRec {
                        pkid: ids[0].0,
                        code: 0,
                        reason: None,
                    },
                    &mut out,
                )
                .unwrap();
            assert!(a.is_empty());
            assert!(
                matches!(&written(&mut out)[..], [m5::Packet::PubRel(r)] if r.pkid == ids[0].0)
            );
        }
        // Reconnect, session resumed: the forwarder sends 1, 2, 3 again from its cursor.
        let mut c = Client::new(&mut inf, MqttProtocol::V5, 2, &ack(true, None), &mut out);
        for seq in 1..=3 {
            c.publish("gw", &prepared(seq), &mut out).unwrap();
        }
        let ps = written(&mut out);
        assert!(
            matches!(&ps[0], m5::Packet::PubRel(r) if r.pkid == 1),
            "{ps:?}"
        );
        assert_eq!(publish_ids(&ps[1..]), vec![(2, true), (3, true)]);
        let a = c.handle(Incoming::PubComp { pkid: 1 }, &mut out).unwrap();
        assert_eq!(a, vec![(1, Outcome::Confirmed)]);
    }

    #[test]
    fn a_pubrec_for_an_unknown_id_is_released_and_its_id_kept_until_the_pubcomp() {
        let mut inf = Inflight::default();
        let mut out = BytesMut::new();
        let mut c = Client::new(&mut inf, MqttProtocol::V5, 2, &ack(false, None), &mut out);
        let rec = Incoming::PubRec {
            pkid: 1,
            code: 0,
            reason: None,
        };
        assert!(c.handle(rec, &mut out).unwrap().is_empty());
        assert!(matches!(&written(&mut out)[..], [m5::Packet::PubRel(r)] if r.pkid == 1));
        c.publish("gw", &prepared(9), &mut out).unwrap();
        let ids = publish_ids(&written(&mut out));
        assert_eq!(ids.len(), 1);
        assert_ne!(ids[0].0, 1, "the released id is not taken meanwhile");
        // Its PUBCOMP confirms nothing of ours.
        let a = c.handle(Incoming::PubComp { pkid: 1 }, &mut out).unwrap();
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(c.open(), 1, "the record's flow alone is open");
    }

    #[test]
    fn an_early_ack_of_a_resend_waiting_for_room_drops_the_resend() {
        let mut inf = Inflight::default();
        let mut out = BytesMut::new();
        let ids = {
            let mut c = Client::new(&mut inf, MqttProtocol::V5, 1, &ack(false, None), &mut out);
            for seq in 1..=3 {
                c.publish("gw", &prepared(seq), &mut out).unwrap();
            }
            publish_ids(&written(&mut out))
        };
        // Resumed with room for one flow: 1 goes again, 2 and 3 wait.
        let mut c = Client::new(&mut inf, MqttProtocol::V5, 1, &ack(true, Some(1)), &mut out);
        for seq in 1..=3 {
            c.publish("gw", &prepared(seq), &mut out).unwrap();
        }
        assert_eq!(publish_ids(&written(&mut out)), vec![(ids[0].0, true)]);
        // The broker acks 2's first send before its resend went out.
        let a = c
            .handle(
                Incoming::PubAck {
                    pkid: ids[1].0,
                    code: 0,
                    reason: None,
                },
                &mut out,
            )
            .unwrap();
        assert_eq!(a, vec![(2, Outcome::Confirmed)]);
        assert_eq!(c.open(), 1, "2's resend never held a place");
        // 1's ack frees the place: 3 goes, 2 does not go again.
        let ack1 = Incoming::PubAck {
            pkid: ids[0].0,
            code: 0,
            reason: None,
        };
        assert_eq!(
            c.handle(ack1, &mut out).unwrap(),
            vec![(1, Outcome::Confirmed)]
        );
        assert_eq!(publish_ids(&written(&mut out)), vec![(ids[2].0, true)]);
        assert_eq!(c.open(), 1);
    }

    #[test]
    fn a_carried_qos2_flow_that_no_longer_fits_is_released_not_forgotten() {
        let mut inf = Inflight::default();
        let mut out = BytesMut::new();
        let id = {
            let mut c = Client::new(&mut inf, MqttProtocol::V5, 2, &ack(false, None), &mut out);
            c.publish("gw", &prepared(1), &mut out).unwrap();
            publish_ids(&written(&mut out))[0].0
        };
        // Resumed, but the broker now takes packets of 20 bytes at most.
        let small = ConnAck {
            max_packet: Some(20),
            ..ack(true, None)
        };
        let mut c = Client::new(&mut inf, MqttProtocol::V5, 2, &small, &mut out);
        match c.publish("gw", &prepared(1), &mut out).unwrap() {
            Some(Outcome::Returned { code: 0x95, .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&written(&mut out)[..], [m5::Packet::PubRel(r)] if r.pkid == id),
            "the id the broker may hold is released"
        );
        let a = c.handle(Incoming::PubComp { pkid: id }, &mut out).unwrap();
        assert!(a.is_empty(), "its PUBCOMP answers no record: {a:?}");
        assert_eq!(c.open(), 0);
    }

    #[test]
    fn a_publish_from_the_broker_is_acknowledged_and_dropped() {
        let mut inf = Inflight::default();
        let mut out = BytesMut::new();
        let mut c = Client::new(&mut inf, MqttProtocol::V5, 1, &ack(false, None), &mut out);
        for (p, want) in [
            (Incoming::Publish { qos: 1, pkid: 5 }, "PubAck"),
            (Incoming::Publish { qos: 2, pkid: 6 }, "PubRec"),
            (Incoming::PubRel { pkid: 6 }, "PubComp"),
        ] {
            assert!(c.handle(p, &mut out).unwrap().is_empty());
            let ps = written(&mut out);
            assert_eq!(ps.len(), 1);
            assert!(format!("{:?}", ps[0]).starts_with(want), "{ps:?}");
        }
        assert!(c
            .handle(Incoming::Publish { qos: 0, pkid: 0 }, &mut out)
            .unwrap()
            .is_empty());
        assert!(out.is_empty());
    }

    #[test]
    fn a_lost_session_sends_again_with_dup_and_a_skipped_carried_flow_is_released() {
        let mut inf = Inflight::default();
        let mut out = BytesMut::new();
        {
            let mut c = Client::new(&mut inf, MqttProtocol::V5, 2, &ack(false, None), &mut out);
            for seq in 1..=2 {
                c.publish("gw", &prepared(seq), &mut out).unwrap();
            }
            out.clear();
        }
        {
            // Resumed, but record 1 is not sent again (settled otherwise): its id is released
            // before record 2 goes.
            let mut c = Client::new(&mut inf, MqttProtocol::V5, 2, &ack(true, None), &mut out);
            c.publish("gw", &prepared(2), &mut out).unwrap();
            let ps = written(&mut out);
            assert!(
                matches!(&ps[0], m5::Packet::PubRel(r) if r.pkid == 1),
                "{ps:?}"
            );
            assert_eq!(publish_ids(&ps[1..]), vec![(2, true)]);
            // Its PUBCOMP is no answer to the forwarder.
            assert!(c
                .handle(Incoming::PubComp { pkid: 1 }, &mut out)
                .unwrap()
                .is_empty());
        }
        // The broker lost the session: record 2 goes again, DUP, under a fresh id.
        let mut c = Client::new(&mut inf, MqttProtocol::V5, 2, &ack(false, None), &mut out);
        c.publish("gw", &prepared(2), &mut out).unwrap();
        let ids = publish_ids(&written(&mut out));
        assert_eq!(ids.len(), 1);
        assert!(ids[0].1, "DUP set");
    }

    #[test]
    fn a_broker_disconnect_and_garbage_end_the_connection_with_the_reason() {
        let mut inf = Inflight::default();
        let mut out = BytesMut::new();
        let mut c = Client::new(&mut inf, MqttProtocol::V5, 1, &ack(false, None), &mut out);
        let e = c
            .handle(
                Incoming::Disconnect {
                    code: 0x8B,
                    reason: None,
                },
                &mut out,
            )
            .unwrap_err();
        assert!(e.contains("0x8B server shutting down"), "{e}");
        let mut garbage = BytesMut::from(&[0x20u8, 0x02, 0x00][..]);
        assert_eq!(decode(&mut garbage, MqttProtocol::V5, 1 << 20), Ok(None));
        let mut garbage = BytesMut::from(&[0xF0u8, 0x00][..]);
        assert!(decode(&mut garbage, MqttProtocol::V5, 1 << 20).is_err());
        let mut bare = BytesMut::from(&[0xE0u8, 0x00][..]);
        assert_eq!(
            decode(&mut bare, MqttProtocol::V5, 1 << 20),
            Ok(Some(Incoming::Disconnect {
                code: 0,
                reason: None
            }))
        );
    }
}
