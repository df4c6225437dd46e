//! The MQTT session state machine of one device connection. No I/O: it takes decoded packets
//! and returns actions; the connection loop (`connection.rs`) performs them. That keeps every
//! protocol rule testable without sockets, and lets the fuzz harness drive it with raw bytes.
//!
//! The one promise it encodes: a PUBACK (QoS 1) or PUBREC (QoS 2) is only ever emitted as the
//! continuation of an [`Action::Append`], which the connection sends after the queue reported the
//! record durable, in the order the publishes arrived.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::codec::{
    reason, ConnAckProps, Connect, Inbound, Outbound, Publish, Subscription, Version, Will,
};

/// Limits a session enforces; from the `[limits]` config section.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub max_packet_size: u32,
    pub receive_maximum: u16,
    pub max_topic_length: usize,
    pub max_client_id_length: usize,
    /// How long an MQTT 3.1.1 clean-session-0 session outlives its connection, in seconds.
    pub v311_session_expiry: u32,
    /// The longest session expiry granted to an MQTT 5 client, in seconds.
    pub max_session_expiry: u32,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_packet_size: 256 << 10,
            receive_maximum: 64,
            max_topic_length: 256,
            max_client_id_length: 128,
            v311_session_expiry: 7 * 86_400,
            max_session_expiry: 30 * 86_400,
        }
    }
}

/// A message to append to the queue (a PUBLISH or a will), owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub received_at: SystemTime,
    pub device_id: String,
    pub username: Option<String>,
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub payload: Bytes,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub payload_format: Option<u8>,
    /// MQTT 5: seconds after `received_at` when the message expires.
    pub message_expiry: Option<u32>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
}

/// Who a connected device is, as decided by authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The name ACLs are written for: the certificate identity or the username (for an
    /// anonymous device, its client id).
    pub name: String,
    pub username: Option<String>,
    /// How the device proved who it is; with `name`, who owns the sessions it starts.
    pub kind: IdentityKind,
    /// The client id the connection acts under, and the device id its records carry: the one
    /// the CONNECT asked for, or the one the gateway assigned when it sent none. Always an id
    /// this identity owns (the authenticator checked it).
    pub client_id: String,
}

/// How a device proved its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    Certificate,
    Password,
    Anonymous,
}

impl Identity {
    /// An anonymous device acting under `client_id`.
    pub fn anonymous(client_id: &str) -> Identity {
        Identity {
            name: client_id.to_string(),
            username: None,
            kind: IdentityKind::Anonymous,
            client_id: client_id.to_string(),
        }
    }

    /// Who owns the sessions this identity starts: another identity may not take them over.
    /// Every anonymous device is the same owner (none can prove to be another).
    pub fn owner(&self) -> String {
        match self.kind {
            IdentityKind::Certificate => format!("cert:{}", self.name),
            IdentityKind::Password => format!("user:{}", self.name),
            IdentityKind::Anonymous => "anonymous".to_string(),
        }
    }
}

/// Why a session refused or ended something; bounded labels for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Auth,
    Acl,
    Limit,
    Malformed,
    Protocol,
    /// The identity does not own the client id (or its session belongs to another identity).
    ClientId,
    /// Too many failed logins from the CONNECT's address: its password was not checked.
    LoginThrottled,
    /// Too many password checks waiting already.
    Busy,
}

impl Refusal {
    pub fn as_label(self) -> &'static str {
        match self {
            Refusal::Auth => "auth",
            Refusal::Acl => "acl",
            Refusal::Limit => "limit",
            Refusal::Malformed => "malformed",
            Refusal::Protocol => "protocol",
            Refusal::ClientId => "client_id",
            Refusal::LoginThrottled => "login_throttled",
            Refusal::Busy => "busy",
        }
    }
}

/// What the connection must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send(Outbound),
    /// Check the credentials of this CONNECT, then call [`Session::authenticated`].
    Authenticate(Box<Connect>),
    /// Append to the queue; once durable send `ack` (if any). Acks leave in append order.
    Append {
        message: Box<Message>,
        ack: Option<Outbound>,
    },
    /// Count a refusal (metrics); the session goes on unless a `Close` follows.
    Refused(Refusal),
    /// Add these subscriptions (checked and granted: `qos` is the granted QoS) to the session;
    /// the SUBACK follows as its own action.
    Subscribe(Vec<Subscription>),
    /// Remove these filters from the session and answer with an UNSUBACK that says, per
    /// filter, whether it existed.
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    /// Hand an ack to the session's outbox.
    Delivered(SubscriberAck),
    /// Start the client's session (before its CONNACK): a new one when `clean_start`, else
    /// resume a stored one if there is one; it outlives the connection by `expiry_secs`.
    StartSession {
        clean_start: bool,
        expiry_secs: u32,
    },
    /// Close the connection after everything before it; `publish_will` says whether the will (if
    /// any, see [`Session::take_will`]) goes into the queue.
    Close {
        publish_will: bool,
    },
}

/// Decides what a connected identity may publish to and subscribe to. Implemented by
/// `auth::Acl`.
pub trait PublishAcl: Send + Sync {
    fn may_publish(&self, identity: &Identity, client_id: &str, topic: &str) -> bool;

    /// Whether the identity may subscribe to `filter` (decided once, at SUBSCRIBE: delivery
    /// checks nothing per message). Denied unless an implementation says otherwise.
    fn may_subscribe(&self, identity: &Identity, client_id: &str, filter: &str) -> bool {
        let _ = (identity, client_id, filter);
        false
    }
}

/// An ack from a client for a publish the gateway sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriberAck {
    PubAck(u16),
    PubRec(u16),
    PubComp(u16),
}

enum State {
    AwaitConnect,
    Authenticating(Box<Connect>),
    Connected(Connected),
    Closed,
}

struct Connected {
    client_id: String,
    identity: Identity,
    /// QoS 2 packet ids whose PUBREC was (or will be) sent and whose PUBREL has not come yet.
    awaiting_rel: HashSet<u16>,
}

/// One connection's protocol state.
pub struct Session {
    limits: SessionLimits,
    version: Option<Version>,
    state: State,
    will: Option<Will>,
    /// (client id, username) the will is published as; kept after the session is closed.
    will_owner: Option<(String, Option<String>)>,
    keep_alive: u16,
    /// Acks (PUBACK/PUBREC) this session asked for, and how many the connection reports sent:
    /// the difference is what the device has in flight (MQTT 5 receive maximum).
    acks_requested: u64,
    acks_sent: u64,
    /// MQTT 5 Request Problem Information: reason strings on acks only while this holds.
    problem_info: bool,
    /// MQTT 5: the largest packet the client accepts (no reason string makes a packet larger).
    client_max_packet: Option<u32>,
}

impl Session {
    pub fn new(limits: SessionLimits) -> Session {
        Session {
            limits,
            version: None,
            state: State::AwaitConnect,
            will: None,
            keep_alive: 0,
            will_owner: None,
            acks_requested: 0,
            acks_sent: 0,
            problem_info: true,
            client_max_packet: None,
        }
    }

    /// Whether `p` fits the client's maximum packet size.
    fn fits(&self, p: &Outbound) -> bool {
        let v = self.version.unwrap_or(Version::V311);
        self.client_max_packet
            .is_none_or(|max| super::codec::encoded_len(p, v) <= max as usize)
    }

    /// `packet` (a refusing PUBACK, PUBREC, SUBACK or UNSUBACK) with `text` as its MQTT 5
    /// reason string, unless the client asked for none (Request Problem Information 0) or it
    /// would pass the client's maximum packet size; then `packet` alone.
    pub fn with_reason(&self, packet: Outbound, text: &str) -> Outbound {
        if self.version != Some(Version::V5) || !self.problem_info {
            return packet;
        }
        let with = Outbound::WithReason {
            packet: Box::new(packet),
            text: text.to_string(),
        };
        if self.fits(&with) {
            return with;
        }
        match with {
            Outbound::WithReason { packet, .. } => *packet,
            other => other,
        }
    }

    /// An MQTT 5 DISCONNECT with `code` and `text` as its reason string (DISCONNECT may carry
    /// one whatever Request Problem Information says), without it if it would not fit.
    fn disconnect(&self, code: u8, text: &str) -> Outbound {
        let with = Outbound::Disconnect {
            reason: code,
            text: Some(text.to_string()),
        };
        if self.fits(&with) {
            with
        } else {
            Outbound::Disconnect {
                reason: code,
                text: None,
            }
        }
    }

    /// The connection reports how many acks it has sent in total (before each packet).
    pub fn acks_sent(&mut self, total: u64) {
        self.acks_sent = total;
    }

    /// The protocol version, once CONNECT arrived.
    pub fn version(&self) -> Option<Version> {
        self.version
    }

    /// The keep-alive the client asked for, in seconds (0 = none).
    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(u64::from(self.keep_alive))
    }

    pub fn client_id(&self) -> Option<&str> {
        match &self.state {
            State::Connected(c) => Some(&c.client_id),
            _ => None,
        }
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Connected(_))
    }

    /// A QoS 2 publish whose PUBREC carried a refusal: it was not stored, so a later publish
    /// with its packet id is a new message, not a resend to acknowledge again.
    pub fn not_stored(&mut self, pkid: u16) {
        if let State::Connected(c) = &mut self.state {
            c.awaiting_rel.remove(&pkid);
        }
    }

    /// The will as a message to append, if the connection ends without a normal DISCONNECT.
    pub fn take_will(&mut self) -> Option<Message> {
        let will = self.will.take()?;
        let (device_id, username) = self.will_owner.clone()?;
        Some(Message {
            received_at: SystemTime::now(),
            device_id,
            username,
            topic: will.topic,
            qos: will.qos,
            retain: will.retain,
            payload: will.payload,
            user_properties: will.user_properties,
            content_type: will.content_type,
            payload_format: will.payload_format,
            message_expiry: will.message_expiry,
            response_topic: will.response_topic,
            correlation_data: will.correlation_data,
        })
    }

    fn close_with(&mut self, code: u8, text: &str, why: Refusal) -> Vec<Action> {
        let mut out = vec![Action::Refused(why)];
        if self.version == Some(Version::V5) {
            out.push(Action::Send(self.disconnect(code, text)));
        }
        let publish_will = self.is_connected();
        self.state = State::Closed;
        out.push(Action::Close { publish_will });
        out
    }

    /// A decode error on this connection's bytes.
    pub fn on_decode_error(&mut self, too_large: bool) -> Vec<Action> {
        if too_large {
            self.close_with(reason::PACKET_TOO_LARGE, "packet too large", Refusal::Limit)
        } else {
            self.close_with(reason::MALFORMED, "malformed packet", Refusal::Malformed)
        }
    }

    /// No packet within 1.5 x keep-alive.
    pub fn on_keep_alive_expired(&mut self) -> Vec<Action> {
        self.close_with(
            reason::KEEP_ALIVE_TIMEOUT,
            "keep alive timeout",
            Refusal::Protocol,
        )
    }

    /// Another connection took this client id over.
    pub fn on_taken_over(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        if self.version == Some(Version::V5) {
            out.push(Action::Send(self.disconnect(
                reason::SESSION_TAKEN_OVER,
                "another connection with this client id",
            )));
        }
        // The device is alive (it just reconnected): its will is not published.
        self.will = None;
        self.state = State::Closed;
        out.push(Action::Close {
            publish_will: false,
        });
        out
    }

    /// The server is shutting down.
    pub fn on_shutdown(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        if self.version == Some(Version::V5) {
            out.push(Action::Send(self.disconnect(
                reason::SERVER_SHUTTING_DOWN,
                "server shutting down",
            )));
        }
        self.will = None;
        self.state = State::Closed;
        out.push(Action::Close {
            publish_will: false,
        });
        out
    }

    /// Handles one decoded packet.
    pub fn on_packet(&mut self, packet: Inbound, acl: &dyn PublishAcl) -> Vec<Action> {
        match (&mut self.state, packet) {
            (State::Closed, _) => Vec::new(),
            (State::AwaitConnect, Inbound::UnsupportedProtocol { level }) => {
                // 3.1 and unknown levels: CONNACK "unacceptable protocol version" (0x01), in the
                // 3.x layout that such a client can read.
                self.state = State::Closed;
                tracing::debug!(level, "CONNECT with unsupported protocol level");
                vec![
                    Action::Refused(Refusal::Protocol),
                    Action::Send(Outbound::ConnAck {
                        code: 0x01,
                        session_present: false,
                        props: None,
                    }),
                    Action::Close {
                        publish_will: false,
                    },
                ]
            }
            (State::AwaitConnect, Inbound::Connect(c)) => self.on_connect(c, acl),
            (State::AwaitConnect, _) => {
                self.state = State::Closed;
                vec![
                    Action::Refused(Refusal::Protocol),
                    Action::Close {
                        publish_will: false,
                    },
                ]
            }
            (State::Authenticating(_), _) => self.close_with(
                reason::PROTOCOL_ERROR,
                "packet before CONNACK",
                Refusal::Protocol,
            ),
            (State::Connected(_), Inbound::Publish(p)) => self.on_publish(p, acl),
            (State::Connected(c), Inbound::PubRel { pkid }) => {
                c.awaiting_rel.remove(&pkid);
                vec![Action::Send(Outbound::PubComp { pkid })]
            }
            (State::Connected(_), Inbound::Subscribe { pkid, filters }) => {
                self.on_subscribe(pkid, filters, acl)
            }
            (State::Connected(_), Inbound::Unsubscribe { pkid, filters }) => {
                vec![Action::Unsubscribe { pkid, filters }]
            }
            (State::Connected(_), Inbound::PubAck { pkid }) => {
                vec![Action::Delivered(SubscriberAck::PubAck(pkid))]
            }
            (State::Connected(_), Inbound::PubRec { pkid }) => {
                vec![Action::Delivered(SubscriberAck::PubRec(pkid))]
            }
            (State::Connected(_), Inbound::PubComp { pkid }) => {
                vec![Action::Delivered(SubscriberAck::PubComp(pkid))]
            }
            (State::Connected(_), Inbound::PingReq) => vec![Action::Send(Outbound::PingResp)],
            (State::Connected(_), Inbound::Disconnect { reason }) => {
                // 0x04: "disconnect with will message".
                let publish_will = reason == 0x04;
                if !publish_will {
                    self.will = None;
                }
                self.state = State::Closed;
                vec![Action::Close { publish_will }]
            }
            // Type 15 is reserved in 3.1.1: a malformed packet there.
            (State::Connected(_), Inbound::Auth) if self.version == Some(Version::V311) => self
                .close_with(
                    reason::MALFORMED,
                    "reserved packet type",
                    Refusal::Malformed,
                ),
            (State::Connected(_), Inbound::Auth) => self.close_with(
                reason::BAD_AUTH_METHOD,
                "enhanced authentication is not supported",
                Refusal::Auth,
            ),
            (State::Connected(_), Inbound::Connect(_)) => {
                self.close_with(reason::PROTOCOL_ERROR, "second CONNECT", Refusal::Protocol)
            }
            (State::Connected(_), Inbound::UnsupportedProtocol { .. }) => self.close_with(
                reason::PROTOCOL_ERROR,
                "unexpected packet",
                Refusal::Protocol,
            ),
        }
    }

    fn refuse_connect(
        &mut self,
        v: Version,
        v4_code: u8,
        v5_code: u8,
        why: Refusal,
        text: &str,
    ) -> Vec<Action> {
        self.state = State::Closed;
        let code = if v == Version::V5 { v5_code } else { v4_code };
        vec![
            Action::Refused(why),
            Action::Send(Outbound::ConnAck {
                code,
                session_present: false,
                props: (v == Version::V5).then(|| ConnAckProps {
                    receive_maximum: self.limits.receive_maximum,
                    max_packet_size: self.limits.max_packet_size,
                    assigned_client_id: None,
                    reason: Some(text.to_string()),
                    server_keep_alive: None,
                    session_expiry: None,
                }),
            }),
            Action::Close {
                publish_will: false,
            },
        ]
    }

    /// SUBSCRIBE: each filter is checked (syntax, length, shared subscriptions, the subscribe
    /// ACL) and granted at the QoS asked for, or refused with its own code; the others of the
    /// same packet are granted all the same.
    fn on_subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<Subscription>,
        acl: &dyn PublishAcl,
    ) -> Vec<Action> {
        if filters.iter().any(|f| f.subscription_id == Some(0)) {
            return self.close_with(
                reason::PROTOCOL_ERROR,
                "subscription identifier 0",
                Refusal::Malformed,
            );
        }
        let State::Connected(c) = &self.state else {
            return Vec::new();
        };
        let (identity, client_id) = (c.identity.clone(), c.client_id.clone());
        let mut out = Vec::new();
        let mut granted = Vec::new();
        let mut codes = Vec::with_capacity(filters.len());
        for mut s in filters {
            let code = if s.filter.starts_with("$share/") {
                reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
            } else if s.filter.len() > self.limits.max_topic_length
                || crate::topic::check_filter(&s.filter).is_err()
            {
                out.push(Action::Refused(Refusal::Malformed));
                reason::TOPIC_FILTER_INVALID
            } else if !acl.may_subscribe(&identity, &client_id, &s.filter) {
                out.push(Action::Refused(Refusal::Acl));
                reason::NOT_AUTHORIZED
            } else {
                s.qos = s.qos.min(2);
                let q = s.qos;
                granted.push(s);
                q
            };
            codes.push(code);
        }
        if !granted.is_empty() {
            out.push(Action::Subscribe(granted));
        }
        let mut why: Vec<&str> = Vec::new();
        for &c in &codes {
            let text = match c {
                reason::NOT_AUTHORIZED => "not allowed by the subscribe ACL",
                reason::TOPIC_FILTER_INVALID => "invalid topic filter",
                reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED => {
                    "shared subscriptions are not supported"
                }
                _ => continue,
            };
            if !why.contains(&text) {
                why.push(text);
            }
        }
        let ack = Outbound::SubAck { pkid, codes };
        out.push(Action::Send(if why.is_empty() {
            ack
        } else {
            self.with_reason(ack, &why.join("; "))
        }));
        out
    }

    fn on_connect(&mut self, c: Box<Connect>, acl: &dyn PublishAcl) -> Vec<Action> {
        let v = c.version;
        self.version = Some(v);
        self.problem_info = c.request_problem_info;
        self.client_max_packet = c.client_max_packet;
        if c.auth_method.is_some() {
            return self.refuse_connect(
                v,
                0x04,
                reason::BAD_AUTH_METHOD,
                Refusal::Auth,
                "enhanced authentication is not supported",
            );
        }
        // An empty client id: the authenticator assigns one the identity owns (see
        // `Identity::client_id`); 3.1.1 allows that only with a clean session.
        if c.client_id.is_empty() && v == Version::V311 && !c.clean_start {
            return self.refuse_connect(
                v,
                0x02,
                reason::CLIENT_ID_NOT_VALID,
                Refusal::Protocol,
                "empty client id needs a clean session",
            );
        }
        if c.client_id.len() > self.limits.max_client_id_length
            || c.client_id.chars().any(|ch| ch.is_control())
        {
            return self.refuse_connect(
                v,
                0x02,
                reason::CLIENT_ID_NOT_VALID,
                Refusal::Limit,
                "client id too long or not printable",
            );
        }
        if let Some(w) = &c.will {
            if crate::topic::check_name(&w.topic, self.limits.max_topic_length).is_err() {
                return self.refuse_connect(
                    v,
                    0x02,
                    reason::TOPIC_NAME_INVALID,
                    Refusal::Malformed,
                    "invalid will topic",
                );
            }
        }
        let _ = acl;
        self.keep_alive = c.keep_alive;
        self.state = State::Authenticating(c.clone());
        vec![Action::Authenticate(c)]
    }

    /// The result of [`Action::Authenticate`]: `Ok(identity)` or an MQTT 5 reason code
    /// (`BAD_USER_OR_PASSWORD`, `NOT_AUTHORIZED`, `CLIENT_ID_NOT_VALID`).
    pub fn authenticated(
        &mut self,
        result: Result<Identity, u8>,
        acl: &dyn PublishAcl,
    ) -> Vec<Action> {
        let State::Authenticating(c) = std::mem::replace(&mut self.state, State::Closed) else {
            return Vec::new();
        };
        let v = c.version;
        let identity = match result {
            Ok(i) => i,
            Err(reason::CLIENT_ID_NOT_VALID) => {
                return self.refuse_connect(
                    v,
                    0x02,
                    reason::CLIENT_ID_NOT_VALID,
                    Refusal::ClientId,
                    "this identity does not own the client id",
                );
            }
            Err(code @ (reason::SERVER_BUSY | reason::CONNECTION_RATE_EXCEEDED)) => {
                let (why, text) = if code == reason::SERVER_BUSY {
                    (
                        Refusal::Busy,
                        "too many logins being checked; try again later",
                    )
                } else {
                    (
                        Refusal::LoginThrottled,
                        "too many failed logins from this address; try again later",
                    )
                };
                // 3.1.1: "server unavailable", which clients retry later.
                return self.refuse_connect(v, 0x03, code, why, text);
            }
            Err(code) => {
                let v4 = match code {
                    reason::BAD_USER_OR_PASSWORD => 0x04,
                    _ => 0x05,
                };
                return self.refuse_connect(v, v4, code, Refusal::Auth, "not authorized");
            }
        };
        // Invariant: from here on the client id is one the identity owns.
        let assigned = c.client_id.is_empty().then(|| identity.client_id.clone());
        let mut c = c;
        c.client_id = identity.client_id.clone();
        if let Some(w) = &c.will {
            if !acl.may_publish(&identity, &c.client_id, &w.topic) {
                return self.refuse_connect(
                    v,
                    0x05,
                    reason::NOT_AUTHORIZED,
                    Refusal::Acl,
                    "will topic not allowed",
                );
            }
        }
        self.will = c.will.clone();
        self.will_owner = Some((c.client_id.clone(), identity.username.clone()));
        self.state = State::Connected(Connected {
            client_id: c.client_id.clone(),
            identity,
            awaiting_rel: HashSet::new(),
        });
        let (expiry_secs, capped) = match v {
            Version::V311 if c.clean_start => (0, false),
            Version::V311 => (self.limits.v311_session_expiry, false),
            Version::V5 => {
                let asked = c.session_expiry.unwrap_or(0);
                let granted = asked.min(self.limits.max_session_expiry);
                (granted, granted != asked)
            }
        };
        vec![
            Action::StartSession {
                clean_start: c.clean_start,
                expiry_secs,
            },
            Action::Send(Outbound::ConnAck {
                code: 0,
                // The connection sets it once the session is started.
                session_present: false,
                props: (v == Version::V5).then_some(ConnAckProps {
                    receive_maximum: self.limits.receive_maximum,
                    max_packet_size: self.limits.max_packet_size,
                    assigned_client_id: assigned,
                    reason: None,
                    server_keep_alive: None,
                    session_expiry: capped.then_some(expiry_secs),
                }),
            }),
        ]
    }

    fn on_publish(&mut self, p: Publish, acl: &dyn PublishAcl) -> Vec<Action> {
        let v = self.version.unwrap_or(Version::V311);
        if p.topic_alias.is_some() {
            return self.close_with(
                reason::TOPIC_ALIAS_INVALID,
                "topic aliases are not supported (topic alias maximum is 0)",
                Refusal::Protocol,
            );
        }
        if p.topic.len() > self.limits.max_topic_length {
            return self.close_with(reason::TOPIC_NAME_INVALID, "topic too long", Refusal::Limit);
        }
        if crate::topic::check_name(&p.topic, usize::MAX).is_err() {
            return self.close_with(
                reason::TOPIC_NAME_INVALID,
                "invalid topic name",
                Refusal::Malformed,
            );
        }
        let in_flight = self.acks_requested.saturating_sub(self.acks_sent);
        if v == Version::V5 && p.qos > 0 && in_flight >= u64::from(self.limits.receive_maximum) {
            return self.close_with(
                reason::RECEIVE_MAXIMUM_EXCEEDED,
                "more unacknowledged QoS 1/2 publishes than the receive maximum",
                Refusal::Limit,
            );
        }
        if p.qos > 0 && p.pkid == 0 {
            return self.close_with(reason::PROTOCOL_ERROR, "packet id 0", Refusal::Malformed);
        }
        let State::Connected(c) = &mut self.state else {
            return Vec::new();
        };
        if !acl.may_publish(&c.identity, &c.client_id, &p.topic) {
            const WHY: &str = "not allowed by the publish ACL";
            return match (v, p.qos) {
                (Version::V5, 0) => vec![Action::Refused(Refusal::Acl)],
                (Version::V5, 1) => vec![
                    Action::Refused(Refusal::Acl),
                    Action::Send(self.with_reason(
                        Outbound::PubAck {
                            pkid: p.pkid,
                            reason: reason::NOT_AUTHORIZED,
                        },
                        WHY,
                    )),
                ],
                (Version::V5, _) => vec![
                    Action::Refused(Refusal::Acl),
                    Action::Send(self.with_reason(
                        Outbound::PubRec {
                            pkid: p.pkid,
                            reason: reason::NOT_AUTHORIZED,
                        },
                        WHY,
                    )),
                ],
                // 3.1.1 has no way to refuse a publish: close the connection.
                (Version::V311, _) => {
                    self.state = State::Closed;
                    vec![
                        Action::Refused(Refusal::Acl),
                        Action::Close { publish_will: true },
                    ]
                }
            };
        }
        if p.qos == 2 && c.awaiting_rel.contains(&p.pkid) {
            // A resend of a QoS 2 publish already stored: acknowledge again, do not store twice.
            return vec![Action::Send(Outbound::PubRec {
                pkid: p.pkid,
                reason: reason::SUCCESS,
            })];
        }
        let ack = match p.qos {
            0 => None,
            1 => Some(Outbound::PubAck {
                pkid: p.pkid,
                reason: reason::SUCCESS,
            }),
            _ => {
                c.awaiting_rel.insert(p.pkid);
                Some(Outbound::PubRec {
                    pkid: p.pkid,
                    reason: reason::SUCCESS,
                })
            }
        };
        if ack.is_some() {
            self.acks_requested += 1;
        }
        let State::Connected(c) = &mut self.state else {
            return Vec::new();
        };
        let message = Message {
            received_at: SystemTime::now(),
            device_id: c.client_id.clone(),
            username: c.identity.username.clone(),
            topic: p.topic,
            qos: p.qos,
            retain: p.retain,
            payload: p.payload,
            user_properties: p.user_properties,
            content_type: p.content_type,
            payload_format: p.payload_format,
            message_expiry: p.message_expiry,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
        };
        vec![Action::Append {
            message: Box::new(message),
            ack,
        }]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    struct DevicesOwnTree;
    impl PublishAcl for DevicesOwnTree {
        fn may_publish(&self, _: &Identity, client_id: &str, topic: &str) -> bool {
            topic.starts_with(&format!("devices/{client_id}/"))
        }

        fn may_subscribe(&self, _: &Identity, client_id: &str, filter: &str) -> bool {
            filter.starts_with(&format!("devices/{client_id}/commands/"))
        }
    }

    fn connect(v: Version, id: &str) -> Box<Connect> {
        Box::new(Connect {
            version: v,
            client_id: id.into(),
            clean_start: true,
            keep_alive: 30,
            username: None,
            password: None,
            will: None,
            client_max_packet: None,
            auth_method: None,
            client_receive_maximum: None,
            session_expiry: None,
            request_problem_info: true,
        })
    }

    fn sub(filter: &str) -> crate::ingest::codec::Subscription {
        crate::ingest::codec::Subscription {
            filter: filter.into(),
            qos: 1,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            subscription_id: None,
        }
    }

    fn publish(topic: &str, qos: u8, pkid: u16) -> Inbound {
        Inbound::Publish(Publish {
            topic: topic.into(),
            qos,
            retain: false,
            dup: false,
            pkid,
            payload: Bytes::from_static(b"x"),
            user_properties: vec![],
            content_type: None,
            payload_format: None,
            topic_alias: None,
            message_expiry: None,
            response_topic: None,
            correlation_data: None,
        })
    }

    fn connected(v: Version, id: &str) -> Session {
        let mut s = Session::new(SessionLimits::default());
        let a = s.on_packet(Inbound::Connect(connect(v, id)), &DevicesOwnTree);
        assert!(matches!(a[0], Action::Authenticate(_)));
        let ident = Identity::anonymous(id);
        let a = s.authenticated(Ok(ident), &DevicesOwnTree);
        assert!(matches!(
            a[0],
            Action::StartSession {
                clean_start: true,
                expiry_secs: 0
            }
        ));
        assert!(matches!(
            a[1],
            Action::Send(Outbound::ConnAck { code: 0, .. })
        ));
        s
    }

    #[test]
    fn qos1_publish_is_acked_only_through_an_append() {
        let mut s = connected(Version::V311, "d1");
        let a = s.on_packet(publish("devices/d1/t", 1, 7), &DevicesOwnTree);
        assert_eq!(a.len(), 1);
        match &a[0] {
            Action::Append { message, ack } => {
                assert_eq!(message.device_id, "d1");
                assert_eq!(message.topic, "devices/d1/t");
                assert_eq!(ack, &Some(Outbound::PubAck { pkid: 7, reason: 0 }));
            }
            other => panic!("expected Append, got {other:?}"),
        }
    }

    #[test]
    fn qos2_duplicate_is_not_appended_twice() {
        let mut s = connected(Version::V5, "d1");
        let a = s.on_packet(publish("devices/d1/t", 2, 9), &DevicesOwnTree);
        assert!(matches!(a[0], Action::Append { .. }));
        let a = s.on_packet(publish("devices/d1/t", 2, 9), &DevicesOwnTree);
        assert_eq!(
            a,
            vec![Action::Send(Outbound::PubRec { pkid: 9, reason: 0 })]
        );
        let a = s.on_packet(Inbound::PubRel { pkid: 9 }, &DevicesOwnTree);
        assert_eq!(a, vec![Action::Send(Outbound::PubComp { pkid: 9 })]);
        // After PUBREL the id is free: a new publish with it is a new message.
        let a = s.on_packet(publish("devices/d1/t", 2, 9), &DevicesOwnTree);
        assert!(matches!(a[0], Action::Append { .. }));
    }

    #[test]
    fn acl_denial_is_puback_0x87_in_v5_and_a_close_in_v311() {
        let mut s = connected(Version::V5, "d1");
        let a = s.on_packet(publish("devices/other/t", 1, 3), &DevicesOwnTree);
        assert_eq!(
            a,
            vec![
                Action::Refused(Refusal::Acl),
                Action::Send(Outbound::WithReason {
                    packet: Box::new(Outbound::PubAck {
                        pkid: 3,
                        reason: 0x87
                    }),
                    text: "not allowed by the publish ACL".into()
                })
            ]
        );
        let mut s = connected(Version::V311, "d1");
        let a = s.on_packet(publish("devices/other/t", 1, 3), &DevicesOwnTree);
        assert!(matches!(a.last(), Some(Action::Close { .. })));
    }

    #[test]
    fn mqtt31_gets_a_refusing_connack() {
        let mut s = Session::new(SessionLimits::default());
        let a = s.on_packet(Inbound::UnsupportedProtocol { level: 3 }, &DevicesOwnTree);
        assert!(a.contains(&Action::Send(Outbound::ConnAck {
            code: 1,
            session_present: false,
            props: None
        })));
        assert!(matches!(a.last(), Some(Action::Close { .. })));
    }

    #[test]
    fn wildcards_and_aliases_in_publish_topics_close_the_connection() {
        for bad in ["devices/d1/+", "devices/#", ""] {
            let mut s = connected(Version::V5, "d1");
            let a = s.on_packet(publish(bad, 1, 1), &DevicesOwnTree);
            assert!(matches!(a.last(), Some(Action::Close { .. })), "{bad:?}");
        }
    }

    #[test]
    fn mqtt5_publishes_beyond_the_receive_maximum_close_the_connection() {
        let mut s = Session::new(SessionLimits {
            receive_maximum: 2,
            ..SessionLimits::default()
        });
        s.on_packet(
            Inbound::Connect(connect(Version::V5, "d1")),
            &DevicesOwnTree,
        );
        s.authenticated(Ok(Identity::anonymous("d1")), &DevicesOwnTree);
        for pkid in 1..=2 {
            let a = s.on_packet(publish("devices/d1/t", 1, pkid), &DevicesOwnTree);
            assert!(matches!(a[0], Action::Append { .. }));
        }
        // One ack went out: a third publish is within the limit again.
        s.acks_sent(1);
        let a = s.on_packet(publish("devices/d1/t", 1, 3), &DevicesOwnTree);
        assert!(matches!(a[0], Action::Append { .. }));
        // QoS 0 does not count.
        let a = s.on_packet(publish("devices/d1/t", 0, 0), &DevicesOwnTree);
        assert!(matches!(a[0], Action::Append { .. }));
        let a = s.on_packet(publish("devices/d1/t", 1, 4), &DevicesOwnTree);
        assert_eq!(a[0], Action::Refused(Refusal::Limit));
        assert!(a.contains(&Action::Send(Outbound::Disconnect {
            reason: 0x93,
            text: Some("more unacknowledged QoS 1/2 publishes than the receive maximum".into())
        })));
        assert!(matches!(a.last(), Some(Action::Close { .. })));
    }

    #[test]
    fn subscribe_grants_each_allowed_filter_and_refuses_the_others_with_their_own_code() {
        let mut s = connected(Version::V5, "d1");
        let mut two = sub("devices/d1/commands/#");
        two.qos = 2;
        let a = s.on_packet(
            Inbound::Subscribe {
                pkid: 4,
                filters: vec![
                    two.clone(),
                    sub("devices/d2/commands/#"),
                    sub("a/#/b"),
                    sub("$share/g/devices/d1/commands/#"),
                    sub("devices/d1/commands/+"),
                ],
            },
            &DevicesOwnTree,
        );
        let mut plus = sub("devices/d1/commands/+");
        plus.qos = 1;
        assert_eq!(
            a,
            [
                Action::Refused(Refusal::Acl),
                Action::Refused(Refusal::Malformed),
                Action::Subscribe(vec![two, plus]),
                Action::Send(Outbound::WithReason {
                    packet: Box::new(Outbound::SubAck {
                        pkid: 4,
                        codes: vec![
                            2,
                            reason::NOT_AUTHORIZED,
                            reason::TOPIC_FILTER_INVALID,
                            reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
                            1
                        ]
                    }),
                    text: "not allowed by the subscribe ACL; invalid topic filter; shared subscriptions are not supported".into()
                })
            ]
        );
        assert!(s.is_connected());
    }

    #[test]
    fn a_subscription_identifier_of_0_closes_with_a_protocol_error() {
        let mut s = connected(Version::V5, "d1");
        let mut f = sub("devices/d1/commands/#");
        f.subscription_id = Some(0);
        let a = s.on_packet(
            Inbound::Subscribe {
                pkid: 1,
                filters: vec![f],
            },
            &DevicesOwnTree,
        );
        assert!(a.contains(&Action::Send(Outbound::Disconnect {
            reason: reason::PROTOCOL_ERROR,
            text: Some("subscription identifier 0".into())
        })));
        assert!(matches!(a.last(), Some(Action::Close { .. })));
        // Any other id is kept with the subscription.
        let mut s = connected(Version::V5, "d1");
        let mut f = sub("devices/d1/commands/#");
        f.subscription_id = Some(9);
        let a = s.on_packet(
            Inbound::Subscribe {
                pkid: 1,
                filters: vec![f.clone()],
            },
            &DevicesOwnTree,
        );
        assert_eq!(a[0], Action::Subscribe(vec![f]));
    }

    /// A v5 session whose CONNECT set these properties.
    fn connected_with(problem_info: bool, max_packet: Option<u32>) -> Session {
        let mut s = Session::new(SessionLimits::default());
        let mut c = connect(Version::V5, "d1");
        c.request_problem_info = problem_info;
        c.client_max_packet = max_packet;
        s.on_packet(Inbound::Connect(c), &DevicesOwnTree);
        s.authenticated(Ok(Identity::anonymous("d1")), &DevicesOwnTree);
        s
    }

    #[test]
    fn reason_strings_follow_request_problem_information_and_the_clients_maximum_packet_size() {
        let denied = || Inbound::Subscribe {
            pkid: 1,
            filters: vec![sub("devices/d2/commands/#")],
        };
        let plain = Outbound::SubAck {
            pkid: 1,
            codes: vec![reason::NOT_AUTHORIZED],
        };
        let mut s = connected_with(true, None);
        assert!(matches!(
            &s.on_packet(denied(), &DevicesOwnTree)[1],
            Action::Send(Outbound::WithReason { .. })
        ));
        // Request Problem Information 0: no reason string on acks; DISCONNECT keeps its own.
        let mut s = connected_with(false, None);
        assert_eq!(
            s.on_packet(denied(), &DevicesOwnTree)[1],
            Action::Send(plain.clone())
        );
        assert!(s
            .on_keep_alive_expired()
            .contains(&Action::Send(Outbound::Disconnect {
                reason: reason::KEEP_ALIVE_TIMEOUT,
                text: Some("keep alive timeout".into())
            })));
        // A maximum packet size the reason string would pass: the packet without it.
        let mut s = connected_with(true, Some(8));
        assert_eq!(
            s.on_packet(denied(), &DevicesOwnTree)[1],
            Action::Send(plain)
        );
        assert!(s
            .on_keep_alive_expired()
            .contains(&Action::Send(Outbound::Disconnect {
                reason: reason::KEEP_ALIVE_TIMEOUT,
                text: None
            })));
    }

    #[test]
    fn unsubscribe_and_subscriber_acks_go_to_the_connection() {
        let mut s = connected(Version::V311, "d1");
        let a = s.on_packet(
            Inbound::Unsubscribe {
                pkid: 5,
                filters: vec!["x/#".into()],
            },
            &DevicesOwnTree,
        );
        assert_eq!(
            a,
            [Action::Unsubscribe {
                pkid: 5,
                filters: vec!["x/#".into()]
            }]
        );
        let a = s.on_packet(Inbound::PubRec { pkid: 9 }, &DevicesOwnTree);
        assert_eq!(a, [Action::Delivered(SubscriberAck::PubRec(9))]);
        assert!(s.is_connected());
    }

    #[test]
    fn will_is_kept_unless_a_normal_disconnect_arrives() {
        let mut c = connect(Version::V5, "d1");
        c.will = Some(Will {
            topic: "devices/d1/status".into(),
            payload: Bytes::from_static(b"offline"),
            qos: 1,
            retain: false,
            user_properties: vec![],
            content_type: None,
            payload_format: None,
            message_expiry: None,
            response_topic: None,
            correlation_data: None,
        });
        let mut s = Session::new(SessionLimits::default());
        s.on_packet(Inbound::Connect(c.clone()), &DevicesOwnTree);
        s.authenticated(Ok(Identity::anonymous("d1")), &DevicesOwnTree);
        let w = s.take_will().unwrap();
        assert_eq!(w.topic, "devices/d1/status");
        assert_eq!(w.device_id, "d1");

        let mut s = Session::new(SessionLimits::default());
        s.on_packet(Inbound::Connect(c), &DevicesOwnTree);
        s.authenticated(Ok(Identity::anonymous("d1")), &DevicesOwnTree);
        let a = s.on_packet(Inbound::Disconnect { reason: 0 }, &DevicesOwnTree);
        assert_eq!(
            a,
            vec![Action::Close {
                publish_will: false
            }]
        );
        assert!(s.take_will().is_none());
    }

    #[test]
    fn failed_authentication_refuses_with_the_version_specific_code() {
        let mut s = Session::new(SessionLimits::default());
        s.on_packet(
            Inbound::Connect(connect(Version::V311, "d1")),
            &DevicesOwnTree,
        );
        let a = s.authenticated(Err(reason::BAD_USER_OR_PASSWORD), &DevicesOwnTree);
        assert!(a.contains(&Action::Send(Outbound::ConnAck {
            code: 4,
            session_present: false,
            props: None
        })));
    }
}
