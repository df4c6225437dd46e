//! A raw MQTT client: hand-written packets over a TLS (or plain TCP) stream, so tests can send
//! exactly the bytes they mean (DUP resends, MQTT 3.1, malformed packets) and see exactly the
//! packets the gateway answers with (reason codes, DISCONNECT before the close).
//!
//! The encoder is written from the MQTT 3.1.1 / 5 specifications, independently of the codec
//! under test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything the tests wait for is bounded by this unless they say otherwise.
pub const WAIT: Duration = Duration::from_secs(5);

/// MQTT control packet types (the high nibble of the first byte).
pub mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
}

/// One packet as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub kind: u8,
    pub flags: u8,
    pub body: Vec<u8>,
}

impl Packet {
    /// The packet identifier of an ack (PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK).
    pub fn pkid(&self) -> u16 {
        u16::from_be_bytes([self.body[0], self.body[1]])
    }

    /// The reason code of an MQTT 5 PUBACK/PUBREC (absent means success).
    pub fn ack_reason(&self) -> u8 {
        self.body.get(2).copied().unwrap_or(0)
    }

    /// The session-present flag of a CONNACK.
    pub fn session_present(&self) -> bool {
        assert_eq!(self.kind, kind::CONNACK, "expected CONNACK, got {self:?}");
        self.body[0] & 1 == 1
    }

    /// The return code (3.1.1) or reason code (5) of a CONNACK.
    pub fn connack_code(&self) -> u8 {
        assert_eq!(self.kind, kind::CONNACK, "expected CONNACK, got {self:?}");
        self.body[1]
    }

    /// The reason code of an MQTT 5 DISCONNECT (absent means normal disconnection).
    pub fn disconnect_reason(&self) -> u8 {
        assert_eq!(
            self.kind,
            kind::DISCONNECT,
            "expected DISCONNECT, got {self:?}"
        );
        self.body.first().copied().unwrap_or(0)
    }

    /// The properties of an MQTT 5 CONNACK as (identifier, value bytes).
    pub fn connack_properties(&self) -> Vec<(u8, Vec<u8>)> {
        assert_eq!(self.kind, kind::CONNACK, "expected CONNACK, got {self:?}");
        let (len, n) = read_varint(&self.body[2..]);
        parse_properties(&self.body[2 + n..2 + n + len])
    }

    /// The reason codes of a SUBACK (after the MQTT 5 properties, if `v5`).
    pub fn suback_codes(&self, v5: bool) -> Vec<u8> {
        assert_eq!(self.kind, kind::SUBACK, "expected SUBACK, got {self:?}");
        let mut at = 2;
        if v5 {
            let (len, n) = read_varint(&self.body[at..]);
            at += n + len;
        }
        self.body[at..].to_vec()
    }
}

fn read_varint(b: &[u8]) -> (usize, usize) {
    let mut v = 0usize;
    for (i, byte) in b.iter().take(4).enumerate() {
        v |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return (v, i + 1);
        }
    }
    panic!("bad variable byte integer {b:?}");
}

/// Splits an MQTT 5 property block into (identifier, value) pairs.
fn parse_properties(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((&id, rest)) = b.split_first() {
        let len = match id {
            // Byte
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            // Two byte integer
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            // Four byte integer
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            // UTF-8 string or binary data
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
                2 + usize::from(u16::from_be_bytes([rest[0], rest[1]]))
            }
            // User property: two strings
            0x26 => {
                let a = 2 + usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                a + 2 + usize::from(u16::from_be_bytes([rest[a], rest[a + 1]]))
            }
            // Subscription identifier (variable byte integer)
            0x0B => read_varint(rest).1,
            other => panic!("unknown property {other:#x}"),
        };
        out.push((id, rest[..len].to_vec()));
        b = &rest[len..];
    }
    out
}

/// Why no packet came.
#[derive(Debug)]
pub enum RecvError {
    /// The gateway closed the connection (EOF, reset, or a TLS alert).
    Closed(String),
    /// Nothing within the time allowed.
    Timeout,
}

/// A stream with a read buffer that yields whole MQTT packets.
pub struct Raw<S> {
    pub stream: S,
    buf: Vec<u8>,
}

/// A raw client over TLS.
pub type TlsRaw = Raw<tokio_rustls::client::TlsStream<TcpStream>>;

/// TCP connect and TLS handshake (server name "localhost") within [`WAIT`].
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsRaw> {
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
    };
    tokio::time::timeout(WAIT, connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS connect timed out"))?
        .map(Raw::new)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    pub fn new(stream: S) -> Raw<S> {
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes` and flushes them.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// The next whole packet within `within`.
    pub async fn recv_within(&mut self, within: Duration) -> Result<Packet, RecvError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(p) = self.take_packet() {
                return Ok(p);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(RecvError::Timeout),
                Ok(Ok(0)) => return Err(RecvError::Closed("EOF".into())),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(RecvError::Closed(e.to_string())),
            }
        }
    }

    /// The next packet within [`WAIT`]; panics if none comes.
    pub async fn recv(&mut self) -> Packet {
        match self.recv_within(WAIT).await {
            Ok(p) => p,
            Err(e) => panic!("expected a packet from the gateway, got {e:?}"),
        }
    }

    /// Reads until the gateway closes the connection (within `within`), returning every packet
    /// that came before the close. Panics if the connection is still open after `within`.
    pub async fn until_closed(&mut self, within: Duration) -> Vec<Packet> {
        let mut packets = Vec::new();
        loop {
            match self.recv_within(within).await {
                Ok(p) => packets.push(p),
                Err(RecvError::Closed(_)) => return packets,
                Err(RecvError::Timeout) => {
                    panic!("the gateway did not close the connection within {within:?}; got {packets:?}")
                }
            }
        }
    }

    /// Whether the connection is still open: nothing arrives and no close within `quiet`.
    pub async fn is_open_after(&mut self, quiet: Duration) -> bool {
        matches!(self.recv_within(quiet).await, Err(RecvError::Timeout))
    }

    fn take_packet(&mut self) -> Option<Packet> {
        let first = *self.buf.first()?;
        let mut len = 0usize;
        let mut i = 1;
        loop {
            let b = *self.buf.get(i)?;
            len |= usize::from(b & 0x7f) << (7 * (i - 1));
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            assert!(i <= 4, "the gateway sent a bad remaining length");
        }
        if self.buf.len() < i + len {
            return None;
        }
        let body = self.buf[i..i + len].to_vec();
        self.buf.drain(..i + len);
        Some(Packet {
            kind: first >> 4,
            flags: first & 0x0f,
            body,
        })
    }

    /// Sends CONNECT and returns the CONNACK.
    pub async fn connect(&mut self, c: &Connect) -> Packet {
        self.send(&c.encode()).await.unwrap();
        self.recv().await
    }

    /// Sends a PUBLISH.
    pub async fn publish(&mut self, p: &Publish) {
        self.send(&p.encode()).await.unwrap();
    }

    /// Sends a QoS 1 PUBLISH and returns its PUBACK (asserting the packet id).
    pub async fn publish_qos1(
        &mut self,
        v5: bool,
        topic: &str,
        pkid: u16,
        payload: &[u8],
    ) -> Packet {
        self.publish(&Publish::new(v5, topic, payload).qos(1, pkid))
            .await;
        let ack = self.recv().await;
        assert_eq!(ack.kind, kind::PUBACK, "expected PUBACK, got {ack:?}");
        assert_eq!(ack.pkid(), pkid);
        ack
    }
}

/// MQTT's variable byte integer.
pub fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A whole packet from its first byte and body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// A last will.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

/// A CONNECT packet.
#[derive(Debug, Clone)]
pub struct Connect {
    pub protocol: &'static str,
    pub level: u8,
    pub client_id: String,
    pub keep_alive: u16,
    pub clean: bool,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// MQTT 5 session expiry interval property, in seconds.
    pub session_expiry: Option<u32>,
    /// More MQTT 5 CONNECT properties, already encoded (identifier and value).
    pub properties: Vec<u8>,
}

impl Connect {
    /// MQTT 3.1.1 (`MQTT`, level 4), keep-alive 30 s, clean session.
    pub fn v4(client_id: &str) -> Connect {
        Connect {
            protocol: "MQTT",
            level: 4,
            client_id: client_id.into(),
            keep_alive: 30,
            clean: true,
            will: None,
            username: None,
            password: None,
            session_expiry: None,
            properties: Vec::new(),
        }
    }

    /// Adds an encoded MQTT 5 CONNECT property (identifier and value bytes).
    pub fn property(mut self, id: u8, value: &[u8]) -> Connect {
        self.properties.push(id);
        self.properties.extend_from_slice(value);
        self
    }

    /// Keeps the session (3.1.1 clean session = 0; MQTT 5 clean start = 0 with this expiry).
    pub fn persistent(mut self, expiry_secs: u32) -> Connect {
        self.clean = false;
        if self.level == 5 {
            self.session_expiry = Some(expiry_secs);
        }
        self
    }

    /// Clean start (MQTT 5) that still keeps the new session for `expiry_secs`.
    pub fn clean_with_expiry(mut self, expiry_secs: u32) -> Connect {
        self.clean = true;
        self.session_expiry = Some(expiry_secs);
        self
    }

    /// MQTT 5 (`MQTT`, level 5).
    pub fn v5(client_id: &str) -> Connect {
        Connect {
            level: 5,
            ..Connect::v4(client_id)
        }
    }

    /// MQTT 3.1 (`MQIsdp`, level 3).
    pub fn v31(client_id: &str) -> Connect {
        Connect {
            protocol: "MQIsdp",
            level: 3,
            ..Connect::v4(client_id)
        }
    }

    pub fn keep_alive(mut self, secs: u16) -> Connect {
        self.keep_alive = secs;
        self
    }

    pub fn will(mut self, topic: &str, payload: &[u8], qos: u8) -> Connect {
        self.will = Some(Will {
            topic: topic.into(),
            payload: payload.to_vec(),
            qos,
            retain: false,
        });
        self
    }

    /// Sets the will's retain flag (a will must be set first).
    pub fn will_retain(mut self) -> Connect {
        self.will.as_mut().expect("a will to retain").retain = true;
        self
    }

    pub fn login(mut self, user: &str, password: &str) -> Connect {
        self.username = Some(user.into());
        self.password = Some(password.into());
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let v5 = self.level == 5;
        let mut b = Vec::new();
        string(self.protocol.as_bytes(), &mut b);
        b.push(self.level);
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | (w.qos << 3) | (u8::from(w.retain) << 5);
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        b.push(flags);
        b.extend_from_slice(&self.keep_alive.to_be_bytes());
        if v5 {
            let mut props = Vec::new();
            if let Some(e) = self.session_expiry {
                props.push(0x11);
                props.extend_from_slice(&e.to_be_bytes());
            }
            props.extend_from_slice(&self.properties);
            varint(props.len(), &mut b);
            b.extend_from_slice(&props);
        }
        string(self.client_id.as_bytes(), &mut b);
        if let Some(w) = &self.will {
            if v5 {
                b.push(0); // no will properties
            }
            string(w.topic.as_bytes(), &mut b);
            string(&w.payload, &mut b);
        }
        if let Some(u) = &self.username {
            string(u.as_bytes(), &mut b);
        }
        if let Some(p) = &self.password {
            string(p.as_bytes(), &mut b);
        }
        packet(0x10, &b)
    }
}

/// A PUBLISH packet.
#[derive(Debug, Clone)]
pub struct Publish {
    pub v5: bool,
    pub topic: String,
    pub qos: u8,
    pub pkid: u16,
    pub dup: bool,
    pub retain: bool,
    pub payload: Vec<u8>,
    /// MQTT 5 properties, already encoded (without their length).
    pub properties: Vec<u8>,
}

impl Publish {
    /// QoS 0 until [`Publish::qos`] says otherwise.
    pub fn new(v5: bool, topic: &str, payload: &[u8]) -> Publish {
        Publish {
            v5,
            topic: topic.into(),
            qos: 0,
            pkid: 0,
            dup: false,
            retain: false,
            payload: payload.to_vec(),
            properties: Vec::new(),
        }
    }

    pub fn qos(mut self, qos: u8, pkid: u16) -> Publish {
        self.qos = qos;
        self.pkid = pkid;
        self
    }

    pub fn dup(mut self) -> Publish {
        self.dup = true;
        self
    }

    pub fn retain(mut self) -> Publish {
        self.retain = true;
        self
    }

    /// Adds an encoded MQTT 5 property (identifier and value bytes).
    pub fn property(mut self, id: u8, value: &[u8]) -> Publish {
        self.properties.push(id);
        self.properties.extend_from_slice(value);
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let first = 0x30 | (u8::from(self.dup) << 3) | (self.qos << 1) | u8::from(self.retain);
        let mut b = Vec::new();
        string(self.topic.as_bytes(), &mut b);
        if self.qos > 0 {
            b.extend_from_slice(&self.pkid.to_be_bytes());
        }
        if self.v5 {
            varint(self.properties.len(), &mut b);
            b.extend_from_slice(&self.properties);
        }
        b.extend_from_slice(&self.payload);
        packet(first, &b)
    }
}

/// PUBREL for `pkid` (the short form, valid in 3.1.1 and 5).
pub fn pubrel(pkid: u16) -> Vec<u8> {
    packet(0x62, &pkid.to_be_bytes())
}

/// SUBSCRIBE for `filters` at QoS 1.
pub fn subscribe(v5: bool, pkid: u16, filters: &[&str]) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    if v5 {
        b.push(0);
    }
    for f in filters {
        string(f.as_bytes(), &mut b);
        b.push(1);
    }
    packet(0x82, &b)
}

/// SUBSCRIBE for `(filter, options byte)` pairs (the byte is the QoS for 3.1.1; MQTT 5 adds
/// no-local 0x04, retain-as-published 0x08 and retain handling << 4).
pub fn subscribe_with(v5: bool, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    if v5 {
        b.push(0);
    }
    for (f, o) in filters {
        string(f.as_bytes(), &mut b);
        b.push(*o);
    }
    packet(0x82, &b)
}

/// UNSUBSCRIBE for `filters`.
pub fn unsubscribe(v5: bool, pkid: u16, filters: &[&str]) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    if v5 {
        b.push(0);
    }
    for f in filters {
        string(f.as_bytes(), &mut b);
    }
    packet(0xA2, &b)
}

/// PUBACK / PUBREC / PUBCOMP for `pkid` from a subscriber (short form).
pub fn puback(pkid: u16) -> Vec<u8> {
    packet(0x40, &pkid.to_be_bytes())
}

pub fn pubrec(pkid: u16) -> Vec<u8> {
    packet(0x50, &pkid.to_be_bytes())
}

pub fn pubcomp(pkid: u16) -> Vec<u8> {
    packet(0x70, &pkid.to_be_bytes())
}

/// A PUBLISH as a subscriber receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    pub pkid: u16,
    pub payload: Vec<u8>,
    /// MQTT 5 properties (empty for 3.1.1).
    pub properties: Vec<(u8, Vec<u8>)>,
}

impl Packet {
    /// This PUBLISH's parts (panics on another packet).
    pub fn publish(&self, v5: bool) -> Received {
        assert_eq!(self.kind, kind::PUBLISH, "expected PUBLISH, got {self:?}");
        let qos = (self.flags >> 1) & 3;
        let tlen = usize::from(u16::from_be_bytes([self.body[0], self.body[1]]));
        let topic = String::from_utf8(self.body[2..2 + tlen].to_vec()).unwrap();
        let mut at = 2 + tlen;
        let mut pkid = 0;
        if qos > 0 {
            pkid = u16::from_be_bytes([self.body[at], self.body[at + 1]]);
            at += 2;
        }
        let mut properties = Vec::new();
        if v5 {
            let (len, n) = read_varint(&self.body[at..]);
            properties = parse_properties(&self.body[at + n..at + n + len]);
            at += n + len;
        }
        Received {
            topic,
            qos,
            dup: self.flags & 0x08 != 0,
            retain: self.flags & 0x01 != 0,
            pkid,
            payload: self.body[at..].to_vec(),
            properties,
        }
    }

    /// The reason codes of an MQTT 5 UNSUBACK.
    pub fn unsuback_codes(&self) -> Vec<u8> {
        assert_eq!(self.kind, kind::UNSUBACK, "expected UNSUBACK, got {self:?}");
        let (len, n) = read_varint(&self.body[2..]);
        self.body[2 + n + len..].to_vec()
    }
}

pub const PINGREQ: [u8; 2] = [0xC0, 0x00];
/// DISCONNECT with remaining length 0 (3.1.1, and the short form of MQTT 5's normal disconnect).
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// MQTT 5 DISCONNECT with a reason code and no properties.
pub fn disconnect_v5(reason: u8) -> Vec<u8> {
    packet(0xE0, &[reason, 0])
}

/// MQTT 5 SUBSCRIBE with encoded `properties` (without their length) for `(filter, options)`.
pub fn subscribe_v5_props(pkid: u16, properties: &[u8], filters: &[(&str, u8)]) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    varint(properties.len(), &mut b);
    b.extend_from_slice(properties);
    for (f, o) in filters {
        string(f.as_bytes(), &mut b);
        b.push(*o);
    }
    packet(0x82, &b)
}

/// A Subscription Identifier property (0x0B, variable byte integer).
pub fn subscription_id(id: usize) -> Vec<u8> {
    let mut b = vec![0x0B];
    varint(id, &mut b);
    b
}

impl Packet {
    /// The properties of an MQTT 5 ack with a packet id and a reason code (PUBACK, PUBREC,
    /// SUBACK, UNSUBACK) as (identifier, value bytes); empty when the packet has none.
    pub fn ack_properties(&self) -> Vec<(u8, Vec<u8>)> {
        let at = match self.kind {
            kind::SUBACK | kind::UNSUBACK => 2,
            _ => 3,
        };
        if self.body.len() <= at {
            return Vec::new();
        }
        let (len, n) = read_varint(&self.body[at..]);
        parse_properties(&self.body[at + n..at + n + len])
    }

    /// The properties of an MQTT 5 DISCONNECT (empty when it has none).
    pub fn disconnect_properties(&self) -> Vec<(u8, Vec<u8>)> {
        assert_eq!(
            self.kind,
            kind::DISCONNECT,
            "expected DISCONNECT, got {self:?}"
        );
        if self.body.len() <= 1 {
            return Vec::new();
        }
        let (len, n) = read_varint(&self.body[1..]);
        parse_properties(&self.body[1 + n..1 + n + len])
    }
}

/// The values of property `id` in `props`, in order.
pub fn property_values(props: &[(u8, Vec<u8>)], id: u8) -> Vec<Vec<u8>> {
    props
        .iter()
        .filter(|(i, _)| *i == id)
        .map(|(_, v)| v.clone())
        .collect()
}
