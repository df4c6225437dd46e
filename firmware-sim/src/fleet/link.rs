//! The MQTT transport of one device: a small MQTT 3.1.1 / 5 client of our own (packets from
//! rumqttc's `mqttbytes`, TLS from tokio-rustls), reduced to the few events the device loop
//! needs. It is ours rather than rumqttc's client because rumqttc's TLS feature brings
//! rustls-webpki 0.102 and rustls-pemfile (RustSec advisories) into every build of the fleet.
//!
//! [`Client`] queues requests without waiting; [`Loop`] owns the connection and yields one
//! [`LinkEvent`] per call of [`Loop::next`], which moves the loop into the future and hands it
//! back with the event (the device loop keeps that one future alive across its `select!`).
//! A request is taken from the queue only while the in-flight window has room, so the queue
//! holds what the device submitted beyond the window, in order.
//!
//! Retransmission is the device's job, not the client's: after a connection error the requests
//! not yet written are discarded ([`Loop::forget_pending`]); the device then resends its whole
//! outbox (and reply outbox) in order. Sessions are clean unless the device takes commands:
//! then the session is persistent (MQTT 3.1.1 clean session 0, MQTT 5 clean start 0 with a
//! session expiry), so that the broker keeps its subscription and the commands that arrive
//! while it is offline.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4 as m4;
use rumqttc::v5::mqttbytes::v5 as m5;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

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
    /// A PUBLISH from the broker (already acknowledged).
    Message(Box<Incoming>),
    /// The connection attempt failed, or the connection closed.
    Closed { error: String },
    /// Anything else (pings, PUBREC, ...).
    Other,
}

/// How long a connection attempt may take, TCP and TLS handshakes and the CONNACK together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The request side: publish, subscribe and disconnect without waiting.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::UnboundedSender<Request>,
}

/// What the device asked for, queued until the connection takes it.
enum Request {
    Publish {
        topic: String,
        qos: u8,
        payload: Bytes,
        correlation: Option<Bytes>,
    },
    Subscribe(String),
    Disconnect,
}

/// Why a request could not be queued.
#[derive(Debug, thiserror::Error)]
#[error("request queue of the MQTT connection: {0}")]
pub struct RequestError(&'static str);

impl Client {
    fn request(&self, r: Request) -> Result<(), RequestError> {
        self.tx
            .send(r)
            .map_err(|_| RequestError("the connection's event loop is gone"))
    }

    /// Queues a PUBLISH.
    pub fn publish(&self, topic: &str, qos: u8, payload: Vec<u8>) -> Result<(), RequestError> {
        self.request(Request::Publish {
            topic: topic.to_string(),
            qos,
            payload: payload.into(),
            correlation: None,
        })
    }

    /// Queues a PUBLISH (QoS 1) of a reply, with MQTT 5 correlation data when given (MQTT
    /// 3.1.1 has no properties: the id in the payload identifies the command).
    pub fn publish_reply(
        &self,
        topic: &str,
        payload: Vec<u8>,
        correlation: Option<&[u8]>,
    ) -> Result<(), RequestError> {
        self.request(Request::Publish {
            topic: topic.to_string(),
            qos: 1,
            payload: payload.into(),
            correlation: correlation.map(Bytes::copy_from_slice),
        })
    }

    /// Queues a SUBSCRIBE at QoS 1.
    pub fn subscribe(&self, filter: &str) -> Result<(), RequestError> {
        self.request(Request::Subscribe(filter.to_string()))
    }

    /// Queues a DISCONNECT (so the broker does not publish the last will).
    pub fn disconnect(&self) -> Result<(), RequestError> {
        self.request(Request::Disconnect)
    }
}

/// A byte stream to the broker: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One connection's state.
struct Conn {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Our QoS 1/2 publishes not yet acknowledged may number this many (the device's window,
    /// lowered to the broker's receive maximum under MQTT 5).
    window: usize,
    in_flight: usize,
    /// Packet ids of ours awaiting an answer (publishes and subscribes).
    in_use: HashSet<u16>,
    /// QoS 2 publishes from the broker awaiting their PUBREL (a resent PUBLISH is not handed
    /// to the device twice).
    incoming_qos2: HashSet<u16>,
    last_sent: Instant,
    ping_sent: Option<Instant>,
}

/// The connection side, owned by whichever future is polling it.
pub struct Loop {
    o: LinkOptions,
    rx: mpsc::UnboundedReceiver<Request>,
    conn: Option<Conn>,
    /// Events found and not yet returned, in order.
    events: VecDeque<LinkEvent>,
    /// The last packet id used: ids keep counting across connections, so a persistent
    /// session's id the broker still holds is not reused at once.
    last_pkid: u16,
}

/// A poll in progress, holding the loop until it yields.
pub type PollFuture = Pin<Box<dyn Future<Output = (Loop, LinkEvent)> + Send>>;

/// Builds the client and its loop; nothing connects until the loop is polled.
pub fn open(o: &LinkOptions) -> (Client, Loop) {
    let (tx, rx) = mpsc::unbounded_channel();
    let lp = Loop {
        o: o.clone(),
        rx,
        conn: None,
        events: VecDeque::new(),
        last_pkid: 0,
    };
    (Client { tx }, lp)
}

impl Loop {
    /// Polls once: connects first if there is no connection.
    pub fn next(mut self) -> PollFuture {
        Box::pin(async move {
            let ev = self.poll().await;
            (self, ev)
        })
    }

    /// Drops the requests not yet written (the device resends what matters) and the events of
    /// the last connection not yet returned. Returns the PUBLISHes received among those
    /// events: they were acknowledged when read, so the broker will not send them again, and
    /// dropping them would lose commands.
    pub fn forget_pending(&mut self) -> Vec<Incoming> {
        while self.rx.try_recv().is_ok() {}
        self.events
            .drain(..)
            .filter_map(|ev| match ev {
                LinkEvent::Message(m) => Some(*m),
                _ => None,
            })
            .collect()
    }

    /// Drops the connection (after our DISCONNECT was written, for a reboot) and what it kept;
    /// the next poll connects again. Returns what [`Loop::forget_pending`] returns.
    pub fn reset_connection(&mut self) -> Vec<Incoming> {
        self.conn = None;
        self.forget_pending()
    }

    async fn poll(&mut self) -> LinkEvent {
        loop {
            if let Some(ev) = self.events.pop_front() {
                return ev;
            }
            if self.conn.is_none() {
                return match tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await {
                    Ok(Ok(conn)) => {
                        self.conn = Some(conn);
                        LinkEvent::Connected
                    }
                    Ok(Err(error)) => LinkEvent::Closed { error },
                    Err(_) => LinkEvent::Closed {
                        error: format!(
                            "no CONNACK from {}:{} within {CONNECT_TIMEOUT:?}",
                            self.o.host, self.o.port
                        ),
                    },
                };
            }
            if let Err(error) = self.step().await {
                // After the events found before the failure.
                self.conn = None;
                self.events.push_back(LinkEvent::Closed { error });
            }
        }
    }

    async fn connect(&mut self) -> Result<Conn, String> {
        let (host, port) = (self.o.host.as_str(), self.o.port);
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut io: Box<dyn Io> = match &self.o.tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| format!("TLS server name {host}: {e}"))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {host}:{port}: {e}"))?;
                Box::new(tls)
            }
            None => Box::new(tcp),
        };
        let mut wbuf = BytesMut::with_capacity(256);
        encode_connect(&self.o, &mut wbuf)?;
        io.write_all(&wbuf).await.map_err(io_error)?;
        io.flush().await.map_err(io_error)?;
        wbuf.clear();
        let mut rbuf = BytesMut::with_capacity(4096);
        let receive_max = loop {
            match decode(self.o.version, &mut rbuf, self.o.max_packet)? {
                Some(In::ConnAck {
                    refused: None,
                    receive_max,
                }) => break receive_max,
                Some(In::ConnAck {
                    refused: Some(why), ..
                }) => return Err(format!("connection refused: {why}")),
                Some(_) => return Err("the broker sent a packet before its CONNACK".into()),
                None => {
                    if io.read_buf(&mut rbuf).await.map_err(io_error)? == 0 {
                        return Err("the broker closed the connection before its CONNACK".into());
                    }
                }
            }
        };
        let window = usize::from(receive_max.map_or(self.o.inflight, |r| r.min(self.o.inflight)));
        Ok(Conn {
            io,
            rbuf,
            wbuf,
            window: window.max(1),
            in_flight: 0,
            in_use: HashSet::new(),
            incoming_qos2: HashSet::new(),
            last_sent: Instant::now(),
            ping_sent: None,
        })
    }

    /// Waits for the next thing on the connection (bytes from the broker, a request while the
    /// window has room, the keep-alive) and handles it; the events found go to `self.events`.
    async fn step(&mut self) -> Result<(), String> {
        let version = self.o.version;
        let max_packet = self.o.max_packet;
        let keep_alive = self.o.keep_alive;
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        let room = c.in_flight < c.window;
        let ping_at = match c.ping_sent {
            Some(sent) => sent + keep_alive,
            None => c.last_sent + keep_alive,
        };
        let pinging = !keep_alive.is_zero();
        tokio::select! {
            read = c.io.read_buf(&mut c.rbuf) => {
                if read.map_err(io_error)? == 0 {
                    return Err("the broker closed the connection".into());
                }
                while let Some(packet) = decode(version, &mut c.rbuf, max_packet)? {
                    self.events.extend(c.receive(version, packet)?);
                }
            }
            first = self.rx.recv(), if room => {
                let Some(first) = first else {
                    return Err("the client is gone".into());
                };
                let mut next = Some(first);
                while let Some(r) = next.take() {
                    let is_publish = matches!(&r, Request::Publish { qos, .. } if *qos > 0);
                    let ev = c.request(version, r, &mut self.last_pkid, max_packet)?;
                    let disconnect = ev == LinkEvent::DisconnectSent;
                    self.events.push_back(ev);
                    if disconnect {
                        c.flush().await?;
                        let _ = c.io.shutdown().await;
                        self.conn = None;
                        return Ok(());
                    }
                    if !is_publish || c.in_flight < c.window {
                        next = self.rx.try_recv().ok();
                    }
                }
            }
            _ = tokio::time::sleep_until(ping_at), if pinging => {
                if c.ping_sent.is_some() {
                    return Err(format!("no PINGRESP within the keep-alive ({keep_alive:?})"));
                }
                c.ping_sent = Some(Instant::now());
                encode(version, Out::PingReq, &mut c.wbuf, max_packet)?;
            }
        }
        c.flush().await
    }
}

impl Conn {
    /// Writes what is buffered.
    async fn flush(&mut self) -> Result<(), String> {
        if !self.wbuf.is_empty() {
            self.io.write_all(&self.wbuf).await.map_err(io_error)?;
            self.io.flush().await.map_err(io_error)?;
            self.wbuf.clear();
            self.last_sent = Instant::now();
        }
        Ok(())
    }

    /// Encodes a request (written with the next flush); returns its event.
    fn request(
        &mut self,
        version: MqttVersion,
        r: Request,
        last_pkid: &mut u16,
        max: usize,
    ) -> Result<LinkEvent, String> {
        Ok(match r {
            Request::Publish {
                topic,
                qos,
                payload,
                correlation,
            } => {
                let pkid = if qos == 0 {
                    0
                } else {
                    self.in_flight += 1;
                    self.new_pkid(last_pkid)
                };
                let out = Out::Publish {
                    topic: &topic,
                    qos,
                    pkid,
                    payload,
                    correlation,
                };
                encode(version, out, &mut self.wbuf, max)?;
                LinkEvent::Written { pkid }
            }
            Request::Subscribe(filter) => {
                let pkid = self.new_pkid(last_pkid);
                encode(
                    version,
                    Out::Subscribe {
                        pkid,
                        filter: &filter,
                    },
                    &mut self.wbuf,
                    max,
                )?;
                LinkEvent::Other
            }
            Request::Disconnect => {
                encode(version, Out::Disconnect, &mut self.wbuf, max)?;
                LinkEvent::DisconnectSent
            }
        })
    }

    /// The next packet id not awaiting an answer.
    fn new_pkid(&mut self, last: &mut u16) -> u16 {
        loop {
            *last = last.checked_add(1).unwrap_or(1);
            if self.in_use.insert(*last) {
                return *last;
            }
        }
    }

    /// Ours answered for good: the id and its window slot are free.
    fn settle(&mut self, pkid: u16) -> bool {
        let ours = self.in_use.remove(&pkid);
        if ours {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        ours
    }

    /// Handles a packet from the broker (answers go to the write buffer); returns its events.
    fn receive(&mut self, version: MqttVersion, p: In) -> Result<Option<LinkEvent>, String> {
        let max = usize::MAX;
        Ok(match p {
            In::PubAck { pkid, refused }
            | In::PubRec {
                pkid,
                refused: refused @ Some(_),
            } => {
                if !self.settle(pkid) {
                    return Ok(Some(LinkEvent::Other));
                }
                Some(match refused {
                    None => LinkEvent::Acked { pkid },
                    Some(reason) => LinkEvent::Refused { pkid, reason },
                })
            }
            In::PubRec {
                pkid,
                refused: None,
            } => {
                encode(version, Out::PubRel(pkid), &mut self.wbuf, max)?;
                Some(LinkEvent::Other)
            }
            In::PubComp { pkid } => self.settle(pkid).then_some(LinkEvent::Acked { pkid }),
            In::PubRel { pkid } => {
                self.incoming_qos2.remove(&pkid);
                encode(version, Out::PubComp(pkid), &mut self.wbuf, max)?;
                Some(LinkEvent::Other)
            }
            In::Publish { qos, pkid, msg } => match qos {
                0 => Some(LinkEvent::Message(msg)),
                1 => {
                    encode(version, Out::PubAck(pkid), &mut self.wbuf, max)?;
                    Some(LinkEvent::Message(msg))
                }
                _ => {
                    encode(version, Out::PubRec(pkid), &mut self.wbuf, max)?;
                    self.incoming_qos2
                        .insert(pkid)
                        .then_some(LinkEvent::Message(msg))
                }
            },
            In::SubAck { pkid } => {
                self.in_use.remove(&pkid);
                Some(LinkEvent::Other)
            }
            In::PingResp => {
                self.ping_sent = None;
                Some(LinkEvent::Other)
            }
            In::Disconnect { reason } => return Err(format!("the broker disconnected: {reason}")),
            In::ConnAck { .. } => return Err("a second CONNACK from the broker".into()),
            In::Other => Some(LinkEvent::Other),
        })
    }
}

fn io_error(e: std::io::Error) -> String {
    e.to_string()
}

/// A packet from the broker, whichever the version.
enum In {
    ConnAck {
        refused: Option<String>,
        receive_max: Option<u16>,
    },
    PubAck {
        pkid: u16,
        refused: Option<String>,
    },
    PubRec {
        pkid: u16,
        refused: Option<String>,
    },
    PubRel {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
    },
    Publish {
        qos: u8,
        pkid: u16,
        msg: Box<Incoming>,
    },
    SubAck {
        pkid: u16,
    },
    PingResp,
    Disconnect {
        reason: String,
    },
    Other,
}

/// A packet to the broker, whichever the version (CONNECT has [`encode_connect`]).
enum Out<'a> {
    Publish {
        topic: &'a str,
        qos: u8,
        pkid: u16,
        payload: Bytes,
        correlation: Option<Bytes>,
    },
    Subscribe {
        pkid: u16,
        filter: &'a str,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    PingReq,
    Disconnect,
}

fn qos_v4(qos: u8) -> rumqttc::mqttbytes::QoS {
    use rumqttc::mqttbytes::QoS;
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
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

fn encode_connect(o: &LinkOptions, buf: &mut BytesMut) -> Result<(), String> {
    let keep_alive = u16::try_from(o.keep_alive.as_secs()).unwrap_or(u16::MAX);
    let written = match o.version {
        MqttVersion::V311 => {
            let mut connect = m4::Connect::new(o.client_id.as_str());
            connect.keep_alive = keep_alive;
            connect.clean_session = o.session_expiry.is_none();
            connect.last_will = Some(m4::LastWill::new(
                &o.will.0,
                o.will.1.clone(),
                qos_v4(1),
                false,
            ));
            connect.login = o
                .credentials
                .as_ref()
                .map(|(u, p)| m4::Login::new(u.as_str(), p.as_str()));
            m4::Packet::Connect(connect)
                .write(buf, usize::MAX)
                .map_err(|e| e.to_string())
        }
        MqttVersion::V5 => {
            let mut props = m5::ConnectProperties::new();
            props.session_expiry_interval = o
                .session_expiry
                .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
            props.max_packet_size = u32::try_from(o.max_packet).ok();
            let connect = m5::Connect {
                keep_alive,
                client_id: o.client_id.clone(),
                clean_start: o.session_expiry.is_none(),
                properties: Some(props),
            };
            let will = m5::LastWill::new(&o.will.0, o.will.1.clone(), qos_v5(1), false, None);
            let login = o
                .credentials
                .as_ref()
                .map(|(u, p)| m5::Login::new(u.as_str(), p.as_str()));
            m5::Packet::Connect(connect, Some(will), login)
                .write(buf, None)
                .map_err(|e| e.to_string())
        }
    };
    written
        .map(|_| ())
        .map_err(|e| format!("cannot encode the CONNECT: {e}"))
}

fn encode(
    version: MqttVersion,
    out: Out<'_>,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(), String> {
    let written = match version {
        MqttVersion::V311 => {
            let p = match out {
                Out::Publish {
                    topic,
                    qos,
                    pkid,
                    payload,
                    ..
                } => {
                    let mut p = m4::Publish::new(topic, qos_v4(qos), Vec::new());
                    p.payload = payload;
                    p.pkid = pkid;
                    m4::Packet::Publish(p)
                }
                Out::Subscribe { pkid, filter } => {
                    let mut s = m4::Subscribe::new(filter, qos_v4(1));
                    s.pkid = pkid;
                    m4::Packet::Subscribe(s)
                }
                Out::PubAck(pkid) => m4::Packet::PubAck(m4::PubAck::new(pkid)),
                Out::PubRec(pkid) => m4::Packet::PubRec(m4::PubRec::new(pkid)),
                Out::PubRel(pkid) => m4::Packet::PubRel(m4::PubRel::new(pkid)),
                Out::PubComp(pkid) => m4::Packet::PubComp(m4::PubComp::new(pkid)),
                Out::PingReq => m4::Packet::PingReq,
                Out::Disconnect => m4::Packet::Disconnect,
            };
            p.write(buf, max).map_err(|e| e.to_string())
        }
        MqttVersion::V5 => {
            let p = match out {
                Out::Publish {
                    topic,
                    qos,
                    pkid,
                    payload,
                    correlation,
                } => {
                    let props = correlation.map(|c| m5::PublishProperties {
                        correlation_data: Some(c),
                        ..Default::default()
                    });
                    let mut p = m5::Publish::new(topic, qos_v5(qos), payload, props);
                    p.pkid = pkid;
                    m5::Packet::Publish(p)
                }
                Out::Subscribe { pkid, filter } => {
                    let mut s = m5::Subscribe::new(m5::Filter::new(filter, qos_v5(1)), None);
                    s.pkid = pkid;
                    m5::Packet::Subscribe(s)
                }
                Out::PubAck(pkid) => m5::Packet::PubAck(m5::PubAck::new(pkid, None)),
                Out::PubRec(pkid) => m5::Packet::PubRec(m5::PubRec::new(pkid, None)),
                Out::PubRel(pkid) => m5::Packet::PubRel(m5::PubRel::new(pkid, None)),
                Out::PubComp(pkid) => m5::Packet::PubComp(m5::PubComp::new(pkid, None)),
                Out::PingReq => m5::Packet::PingReq(m5::PingReq),
                Out::Disconnect => m5::Packet::Disconnect(m5::Disconnect::new(
                    m5::DisconnectReasonCode::NormalDisconnection,
                )),
            };
            p.write(buf, u32::try_from(max).ok())
                .map_err(|e| e.to_string())
        }
    };
    written
        .map(|_| ())
        .map_err(|e| format!("cannot encode a packet: {e}"))
}

/// The next whole packet in `buf`, if there is one.
fn decode(version: MqttVersion, buf: &mut BytesMut, max: usize) -> Result<Option<In>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    let malformed = |e: &dyn std::fmt::Display| format!("malformed packet from the broker: {e}");
    Ok(Some(match version {
        MqttVersion::V311 => {
            use m4::{ConnectReturnCode, Packet};
            let p = match Packet::read(buf, max) {
                Ok(p) => p,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
                Err(e) => return Err(malformed(&e)),
            };
            match p {
                Packet::ConnAck(a) => In::ConnAck {
                    refused: (a.code != ConnectReturnCode::Success)
                        .then(|| format!("{:?}", a.code)),
                    receive_max: None,
                },
                Packet::PubAck(a) => In::PubAck {
                    pkid: a.pkid,
                    refused: None,
                },
                Packet::PubRec(r) => In::PubRec {
                    pkid: r.pkid,
                    refused: None,
                },
                Packet::PubRel(r) => In::PubRel { pkid: r.pkid },
                Packet::PubComp(c) => In::PubComp { pkid: c.pkid },
                Packet::Publish(p) => In::Publish {
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    msg: Box::new(Incoming {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        response_topic: None,
                        correlation: None,
                    }),
                },
                Packet::SubAck(s) => In::SubAck { pkid: s.pkid },
                Packet::PingResp => In::PingResp,
                Packet::Disconnect => In::Disconnect {
                    reason: "DISCONNECT".into(),
                },
                _ => In::Other,
            }
        }
        MqttVersion::V5 => {
            use m5::{ConnectReturnCode, Packet, PubAckReason, PubRecReason};
            let p = match Packet::read(buf, u32::try_from(max).ok()) {
                Ok(p) => p,
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
                // A DISCONNECT without a reason code (remaining length 0), which the decoder
                // does not take: the broker closes the connection normally.
                Err(rumqttc::v5::mqttbytes::Error::PayloadRequired) => {
                    return Ok(Some(In::Disconnect {
                        reason: "DISCONNECT".into(),
                    }))
                }
                Err(e) => return Err(malformed(&e)),
            };
            match p {
                Packet::ConnAck(a) => In::ConnAck {
                    refused: (a.code != ConnectReturnCode::Success)
                        .then(|| format!("{:?}", a.code)),
                    receive_max: a.properties.and_then(|p| p.receive_max),
                },
                Packet::PubAck(a) => In::PubAck {
                    pkid: a.pkid,
                    refused: match a.reason {
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                        reason => Some(format!("{reason:?}")),
                    },
                },
                Packet::PubRec(r) => In::PubRec {
                    pkid: r.pkid,
                    refused: match r.reason {
                        PubRecReason::Success | PubRecReason::NoMatchingSubscribers => None,
                        reason => Some(format!("{reason:?}")),
                    },
                },
                Packet::PubRel(r) => In::PubRel { pkid: r.pkid },
                Packet::PubComp(c) => In::PubComp { pkid: c.pkid },
                Packet::Publish(p) => {
                    let (response_topic, correlation) = match p.properties {
                        Some(props) => (
                            props.response_topic,
                            props.correlation_data.map(|c| c.to_vec()),
                        ),
                        None => (None, None),
                    };
                    In::Publish {
                        qos: p.qos as u8,
                        pkid: p.pkid,
                        msg: Box::new(Incoming {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            response_topic,
                            correlation,
                        }),
                    }
                }
                Packet::SubAck(s) => In::SubAck { pkid: s.pkid },
                Packet::PingResp(_) => In::PingResp,
                Packet::Disconnect(d) => In::Disconnect {
                    reason: format!("{:?}", d.reason_code),
                },
                _ => In::Other,
            }
        }
    }))
}
