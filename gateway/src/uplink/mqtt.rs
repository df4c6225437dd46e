//! MQTT uplink: the forwarder publishes records to a (cloud) MQTT broker, 3.1.1 or 5, over TCP
//! or TLS (rustls with `ring`, optionally with a client certificate: mutual TLS), on one
//! connection per uplink, so records keep their queue order, hence each device's order.
//!
//! The packets are rumqttc's codec (`mqttbytes`, as the device side uses it); the client is our
//! own: [`client`] is the protocol state without I/O, this module the connection around it (a
//! task that reads acks, writes what the state appends, and pings on `keepalive`).
//!
//! - A record is confirmed by its PUBACK (`qos = 1`) or PUBCOMP (`qos = 2`). A PUBACK/PUBREC
//!   with a failure reason code (>= 0x80) refuses that record: it goes to the dead letters with
//!   the code named (quota exceeded and packet id in use are retried first, as a nack).
//! - The session is persistent (3.1.1 clean session 0; 5: clean start 0 and a session expiry),
//!   so a reconnect resumes it: the packet-id state of the flows in flight outlives the
//!   connection (kept per uplink, broker and client id), and when the forwarder sends from its
//!   cursor again, a publish that may have reached the broker goes with DUP and its old packet
//!   id, one the broker acknowledged with PUBREC goes on with PUBREL. The first connection of a
//!   run starts a clean session: the broker may hold packet ids of the previous run that this
//!   one does not know (and would take a new QoS 2 record under one for a duplicate); the
//!   forwarder re-sends from its cursor anyway.
//! - At most `max_inflight` flows are open at once (default: no bound but the window, 20 for
//!   3.1.1 with QoS 2), and under MQTT 5 at most the broker's receive maximum (CONNACK); the
//!   window's other records wait in order. Records go with `message_id`, `gateway_seq`,
//!   `device_id` and `mqtt_topic` user properties after the device's own; content type and
//!   payload format indicator pass through. MQTT 3.1.1 carries only the payload.

pub mod client;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify, OwnedMutexGuard};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Outcome, Prepared, UplinkError};
use crate::config::{parse_mqtt_url, MqttConfig, MqttProtocol};
use client::{Client, ConnAck, ConnectOptions, Incoming, Inflight};

/// How long the broker keeps the gateway's session after a disconnect (MQTT 5): a week, so
/// that an outage of days (see the design) still resumes it. Brokers may cap it lower.
const SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;

/// The largest packet the gateway takes from the broker: a publisher receives only acks.
const MAX_INCOMING_PACKET: usize = 64 << 10;

/// The packet-id state of each uplink session (uplink name, client id), kept across its
/// connections (a connection to another node than the last starts a clean session). A connection holds its session's lock for its whole life, so the next one
/// starts only once the previous one is gone (dropped or aborted).
static SESSIONS: LazyLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<Inflight>>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn session(key: String) -> Arc<tokio::sync::Mutex<Inflight>> {
    let mut s = SESSIONS.lock().unwrap_or_else(|e| e.into_inner());
    s.entry(key).or_default().clone()
}

/// A byte stream to the broker: TCP or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What the forwarder's side and the connection task share.
struct Shared {
    client: Client<OwnedMutexGuard<Inflight>>,
    /// Bytes to write, appended by the client state; the task takes them.
    out: BytesMut,
    /// `close` was called: write what is left (the DISCONNECT), then end.
    closing: bool,
}

type Answer = Result<(u64, Outcome), UplinkError>;

/// A connected MQTT uplink.
pub struct MqttUplink {
    name: String,
    gateway_id: String,
    shared: Arc<Mutex<Shared>>,
    /// Wakes the connection task when `out` has bytes.
    wake: Arc<Notify>,
    answers: mpsc::UnboundedReceiver<Answer>,
    /// For answers known without the broker (a message too large).
    answer_tx: mpsc::UnboundedSender<Answer>,
    failed: Arc<AtomicBool>,
    error: Option<UplinkError>,
    task: Option<JoinHandle<()>>,
    protocol: MqttProtocol,
}

fn lock(s: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl MqttUplink {
    /// Connects to broker `node` of `cfg` (TCP, TLS, CONNECT, CONNACK), all within
    /// `confirm_timeout`: a peer that accepts TCP and then says nothing is an error like any
    /// other, and the forwarder backs off and tries again.
    pub async fn connect(
        cfg: &MqttConfig,
        node: usize,
        gateway_id: &str,
    ) -> Result<MqttUplink, UplinkError> {
        let urls = cfg.urls();
        let url = urls.get(node).or(urls.first()).copied().unwrap_or_default();
        let err = |why: String| UplinkError::Connect {
            uplink: cfg.name.clone(),
            why: format!("{}: {why}", super::amqp::masked_url(url)),
        };
        let (io, inbuf, guard, ack) = match tokio::time::timeout(
            cfg.confirm_timeout,
            handshake(cfg, url, gateway_id),
        )
        .await
        {
            Ok(r) => r.map_err(err)?,
            Err(_) => {
                return Err(err(format!(
                    "no CONNACK within {} s (confirm_timeout)",
                    cfg.confirm_timeout.as_secs_f64()
                )))
            }
        };
        tracing::debug!(uplink = %cfg.name, session_present = ack.session_present, receive_max = ?ack.receive_max, "MQTT uplink connected");
        let mut out = BytesMut::new();
        let mut client = Client::new(guard, cfg.protocol, cfg.qos, &ack, &mut out);
        client.limit_in_flight(cfg.max_inflight());
        let shared = Arc::new(Mutex::new(Shared {
            client,
            out,
            closing: false,
        }));
        let wake = Arc::new(Notify::new());
        let (answer_tx, answers) = mpsc::unbounded_channel();
        let failed = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(Conn {
            io,
            inbuf,
            shared: shared.clone(),
            wake: wake.clone(),
            tx: answer_tx.clone(),
            failed: failed.clone(),
            protocol: cfg.protocol,
            // MQTT 5: a broker's Server Keep Alive replaces ours (0: no pings).
            keepalive: match ack.server_keep_alive {
                Some(0) => Duration::from_secs(10 * 365 * 24 * 3600),
                Some(secs) => Duration::from_secs(u64::from(secs)),
                None => cfg.keepalive,
            },
            name: cfg.name.clone(),
        }));
        Ok(MqttUplink {
            name: cfg.name.clone(),
            gateway_id: gateway_id.to_string(),
            shared,
            wake,
            answers,
            answer_tx,
            failed,
            error: None,
            task: Some(task),
            protocol: cfg.protocol,
        })
    }

    /// Publishes `m` (or queues it under the broker's receive maximum); does not wait for the
    /// broker. Never blocks: the connection task writes.
    pub fn send(&mut self, m: &Prepared) {
        if self.failed() {
            return;
        }
        let r = {
            let mut s = lock(&self.shared);
            let s = &mut *s;
            s.client.publish(&self.gateway_id, m, &mut s.out)
        };
        match r {
            Ok(None) => self.wake.notify_one(),
            Ok(Some(outcome)) => {
                let _ = self.answer_tx.send(Ok((m.record.seq, outcome)));
            }
            Err(why) => {
                self.failed.store(true, Ordering::Relaxed);
                let _ = self.answer_tx.send(Err(UplinkError::Lost {
                    uplink: self.name.clone(),
                    why,
                }));
            }
        }
    }

    /// Whether the connection failed (see [`super::Uplink::failed`]).
    pub fn failed(&self) -> bool {
        self.error.is_some() || self.failed.load(Ordering::Relaxed)
    }

    /// The next answer, as acks arrive; the failure after the answers that came before it.
    /// Cancel-safe: a channel receive.
    pub async fn next(&mut self) -> Result<(u64, Outcome), UplinkError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        match self.answers.recv().await {
            Some(Ok(a)) => Ok(a),
            Some(Err(e)) => {
                self.error = Some(e.clone());
                Err(e)
            }
            // The uplink holds a sender: the channel never closes.
            None => std::future::pending().await,
        }
    }

    /// Sends DISCONNECT (normal: the session is kept) and waits, briefly, for it to be written.
    pub async fn close(mut self) {
        {
            let mut s = lock(&self.shared);
            let s = &mut *s;
            client::encode_disconnect(self.protocol, &mut s.out);
            s.closing = true;
        }
        self.wake.notify_one();
        if let Some(task) = self.task.as_mut() {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
    }
}

impl Drop for MqttUplink {
    fn drop(&mut self) {
        // Aborting releases the session's lock (with its state) for the next connection.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// TCP, TLS, CONNECT and CONNACK. The error does not name the url (the caller does).
async fn handshake(
    cfg: &MqttConfig,
    url: &str,
    gateway_id: &str,
) -> Result<(Box<dyn Io>, BytesMut, OwnedMutexGuard<Inflight>, ConnAck), String> {
    let (tls, host, port) = parse_mqtt_url(url)?;
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("TCP connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let identity = match (&cfg.cert_file, &cfg.key_file) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    let mut io: Box<dyn Io> = if tls {
        let config = crate::tls::client_config_with_identity(cfg.ca_file.as_deref(), identity)?;
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("{host:?} is not a TLS server name: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    let client_id = cfg.client_id(gateway_id);
    let mut guard = session(format!("{}\n{client_id}", cfg.name))
        .lock_owned()
        .await;
    let password = match &cfg.password_env {
        Some(var) => Some(
            std::env::var(var)
                .map_err(|_| format!("environment variable {var} (password_env) is not set"))?,
        ),
        None => None,
    };
    let keep_alive_secs = u16::try_from(cfg.keepalive.as_secs()).unwrap_or(u16::MAX);
    let mut out = BytesMut::new();
    client::encode_connect(
        &ConnectOptions {
            protocol: cfg.protocol,
            client_id,
            keep_alive_secs,
            // A run's first connection forgets the session of an earlier run (see above): its
            // packet ids are unknown to this run, and the forwarder re-sends from its cursor.
            // So does a connection to another node than the last one.
            clean: !guard.started || guard.node.as_deref() != Some(url),
            username: cfg.username.as_deref(),
            password: password.as_deref(),
            session_expiry_secs: SESSION_EXPIRY_SECS,
        },
        &mut out,
    )?;
    let refused_cert = |e: &dyn std::fmt::Display| {
        if identity.is_some() {
            format!(
                "connection lost before CONNACK: {e} (the broker may have refused the TLS client certificate in cert_file)"
            )
        } else {
            format!("connection lost before CONNACK: {e}")
        }
    };
    io.write_all(&out).await.map_err(|e| refused_cert(&e))?;
    io.flush().await.map_err(|e| refused_cert(&e))?;
    let mut inbuf = BytesMut::with_capacity(4096);
    let ack = loop {
        match client::decode(&mut inbuf, cfg.protocol, MAX_INCOMING_PACKET)? {
            Some(Incoming::ConnAck(ack)) => break ack,
            Some(other) => return Err(format!("expected CONNACK, the broker sent {other:?}")),
            None => {}
        }
        match io.read_buf(&mut inbuf).await {
            Ok(0) => return Err(refused_cert(&"the broker closed the connection")),
            Ok(_) => {}
            Err(e) => return Err(refused_cert(&e)),
        }
    };
    if ack.code != 0 {
        return Err(format!(
            "the broker refused the connection: CONNACK {}",
            client::describe_reason(ack.code, ack.reason.as_deref())
        ));
    }
    if let Some(max) = ack.max_qos {
        if max < cfg.qos {
            return Err(format!(
                "the broker takes QoS {max} at most (CONNACK maximum QoS); set qos = {max}"
            ));
        }
    }
    guard.node = Some(url.to_string());
    Ok((io, inbuf, guard, ack))
}

/// The connection task's parts.
struct Conn {
    io: Box<dyn Io>,
    inbuf: BytesMut,
    shared: Arc<Mutex<Shared>>,
    wake: Arc<Notify>,
    tx: mpsc::UnboundedSender<Answer>,
    failed: Arc<AtomicBool>,
    protocol: MqttProtocol,
    keepalive: Duration,
    name: String,
}

async fn run(c: Conn) {
    let tx = c.tx.clone();
    let failed = c.failed.clone();
    let name = c.name.clone();
    if let Some(why) = drive(c).await {
        failed.store(true, Ordering::Relaxed);
        let _ = tx.send(Err(UplinkError::Lost { uplink: name, why }));
    }
}

/// Writes some of `buf` (`Some(bytes written)`), or flushes when it is empty (`None`).
/// Cancel-safe, as both are.
async fn write_or_flush(
    wr: &mut (impl AsyncWrite + Unpin),
    buf: &[u8],
) -> std::io::Result<Option<usize>> {
    if buf.is_empty() {
        wr.flush().await.map(|()| None)
    } else {
        wr.write(buf).await.map(Some)
    }
}

/// Reads and writes until the connection fails (the reason) or is closed (`None`).
async fn drive(c: Conn) -> Option<String> {
    let Conn {
        io,
        mut inbuf,
        shared,
        wake,
        tx,
        protocol,
        keepalive,
        ..
    } = c;
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut wbuf = BytesMut::new();
    let mut flushed = true;
    let mut last_write = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    loop {
        let closing = {
            let mut s = lock(&shared);
            if wbuf.is_empty() && !s.out.is_empty() {
                wbuf = s.out.split();
            }
            s.closing
        };
        if wbuf.is_empty() && flushed {
            if closing {
                let _ = wr.shutdown().await;
                return None;
            }
            if ping_sent.is_none() && Instant::now() >= last_write + keepalive {
                client::encode_pingreq(protocol, &mut wbuf);
                ping_sent = Some(Instant::now());
            }
        }
        let idle = wbuf.is_empty() && flushed && ping_sent.is_none();
        tokio::select! {
            r = rd.read_buf(&mut inbuf) => match r {
                Ok(0) => return Some("the broker closed the connection".into()),
                Ok(_) => {
                    ping_sent = None;
                    let mut s = lock(&shared);
                    let s = &mut *s;
                    loop {
                        let p = match client::decode(&mut inbuf, protocol, MAX_INCOMING_PACKET) {
                            Ok(Some(p)) => p,
                            Ok(None) => break,
                            Err(e) => return Some(e),
                        };
                        match s.client.handle(p, &mut s.out) {
                            Ok(answers) => {
                                for a in answers {
                                    let _ = tx.send(Ok(a));
                                }
                            }
                            Err(e) => return Some(e),
                        }
                    }
                }
                Err(e) => return Some(e.to_string()),
            },
            r = write_or_flush(&mut wr, &wbuf), if !wbuf.is_empty() || !flushed => match r {
                Ok(Some(0)) => return Some("the connection takes no more bytes".into()),
                Ok(Some(n)) => {
                    wbuf.advance(n);
                    flushed = false;
                    last_write = Instant::now();
                }
                Ok(None) => flushed = true,
                Err(e) => return Some(e.to_string()),
            },
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(last_write + keepalive), if idle => {}
            _ = tokio::time::sleep_until(ping_sent.unwrap_or_else(Instant::now) + keepalive), if ping_sent.is_some() => {
                return Some(format!(
                    "no answer to PINGREQ within {} s (keepalive)",
                    keepalive.as_secs()
                ));
            }
        }
    }
}
