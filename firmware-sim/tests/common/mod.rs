//! Helpers shared by the integration tests: unique names, the local brokers' addresses, a TCP
//! (or TLS-terminating) proxy in front of Mosquitto that can cut every connection, an
//! MQTT-to-AMQP bridge standing in for the gateway, and a certificate layout like
//! `gateway certs generate` writes.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

/// Mosquitto on the development and CI machines (plaintext, anonymous).
pub const MOSQUITTO: &str = "127.0.0.1:1883";
/// RabbitMQ on the development and CI machines.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A name no other test run uses: topic prefixes, device id prefixes, queue names.
pub fn unique(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mix =
        firmware_sim::device::fnv1a(format!("{}-{nanos}-{tag}", std::process::id()).as_bytes());
    format!("fsim{tag}{:08x}", mix as u32)
}

/// A proxy on 127.0.0.1:0 that forwards to `upstream`, optionally terminating TLS first.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: broadcast::Sender<()>,
    /// Connections accepted (TLS handshakes completed, with TLS).
    pub accepted: Arc<AtomicU64>,
    /// TLS handshakes that failed (for example: no client certificate).
    pub rejected: Arc<AtomicU64>,
    /// While set, new connections are closed at once (the broker is "down").
    refusing: Arc<AtomicBool>,
    sessions: Arc<Mutex<Sessions>>,
}

/// Connections in use since the last cut (see [`Proxy::active`]).
#[derive(Default)]
struct Sessions {
    /// Bumped by every [`Proxy::cut_all`]: connections from before it no longer count.
    generation: u64,
    active: u64,
}

/// One proxied connection's place in [`Sessions`]: counted once the client uses it, uncounted
/// when it ends (unless a cut has reset the count since).
struct Session {
    sessions: Arc<Mutex<Sessions>>,
    generation: u64,
    counted: AtomicBool,
}

impl Session {
    fn in_use(&self) {
        if self.counted.load(Ordering::Relaxed) {
            return;
        }
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if s.generation == self.generation {
            s.active += 1;
            self.counted.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.counted.load(Ordering::Relaxed) {
            let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            if s.generation == self.generation {
                s.active -= 1;
            }
        }
    }
}

/// Forwards both ways (like `copy_bidirectional`) until both sides are done, one fails, or the
/// proxy cuts. The session counts as in use once the client sends something after the server's
/// first answer: for MQTT, a packet after the CONNACK, which the client sends only once it has
/// taken the CONNACK (so the device counts itself connected).
async fn pump<C>(client: C, server: TcpStream, mut cut: broadcast::Receiver<()>, session: Session)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut server_rx, mut server_tx) = server.into_split();
    let answered = AtomicBool::new(false);
    let to_server = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = client_rx.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            if answered.load(Ordering::Relaxed) {
                session.in_use();
            }
            server_tx.write_all(&buf[..n]).await?;
        }
        server_tx.shutdown().await
    };
    let to_client = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = server_rx.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            // Before the write: whatever the client sends after reading this is counted.
            answered.store(true, Ordering::Relaxed);
            client_tx.write_all(&buf[..n]).await?;
        }
        client_tx.shutdown().await
    };
    tokio::select! {
        _ = async { tokio::try_join!(to_server, to_client) } => {}
        _ = cut.recv() => {}
    }
}

impl Proxy {
    pub async fn start(
        upstream: &str,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = broadcast::channel(4);
        let refusing = Arc::new(AtomicBool::new(false));
        let refuse = refusing.clone();
        let accepted = Arc::new(AtomicU64::new(0));
        let rejected = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_owned();
        let (cut_tx, acc, rej) = (cut.clone(), accepted.clone(), rejected.clone());
        let sessions = Arc::new(Mutex::new(Sessions::default()));
        let sess = sessions.clone();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if refuse.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                // Subscribed before the generation is read: a connection of a generation that a
                // cut ends is sure to get that cut.
                let cut_rx = cut_tx.subscribe();
                let session = Session {
                    sessions: sess.clone(),
                    generation: sess.lock().unwrap_or_else(|e| e.into_inner()).generation,
                    counted: AtomicBool::new(false),
                };
                let upstream = upstream.clone();
                let acceptor = acceptor.clone();
                let (acc, rej) = (acc.clone(), rej.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    match acceptor {
                        Some(acceptor) => match acceptor.accept(client).await {
                            Ok(tls) => {
                                acc.fetch_add(1, Ordering::Relaxed);
                                pump(tls, server, cut_rx, session).await;
                            }
                            Err(_) => {
                                rej.fetch_add(1, Ordering::Relaxed);
                            }
                        },
                        None => {
                            acc.fetch_add(1, Ordering::Relaxed);
                            pump(client, server, cut_rx, session).await;
                        }
                    }
                });
            }
        });
        Ok(Proxy {
            addr,
            cut,
            accepted,
            rejected,
            refusing,
            sessions,
        })
    }

    /// Starts or stops refusing new connections.
    pub fn refuse(&self, on: bool) {
        self.refusing.store(on, Ordering::Relaxed);
    }

    /// Drops every open connection at once, both sides, without an MQTT DISCONNECT. From now
    /// on [`Proxy::active`] counts only connections made after the cut.
    pub fn cut_all(&self) {
        {
            let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            s.generation += 1;
            s.active = 0;
        }
        let _ = self.cut.send(());
    }

    /// Open connections, made since the last cut, that the client has used after the broker's
    /// first answer: with MQTT, devices that are connected (CONNACK taken) and publishing. A cut
    /// now is a connection loss for each of them.
    pub fn active(&self) -> u64 {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .active
    }

    /// Waits (polling, at most `timeout`) until [`Proxy::active`] is at least `n`.
    pub async fn wait_active(&self, n: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let active = self.active();
            if active >= n {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{active} of {n} connections in use after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Writes a CA, a server certificate for 127.0.0.1/localhost and one certificate per device in
/// the layout of `gateway certs generate`; returns a TLS server config that requires a client
/// certificate signed by that CA.
pub fn write_cert_layout(dir: &Path, ids: &[String]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "firmware-sim test CA");
    let ca = ca_params.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::create_dir_all(dir.join("devices"))?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    for id in ids {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, id.as_str());
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(dir.join(format!("devices/{id}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("devices/{id}.key")), key.serialize_pem())?;
    }
    let server_key = rcgen::KeyPair::generate()?;
    let server = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?
        .signed_by(&server_key, &issuer)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der().to_vec()))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(server.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )?;
    Ok(Arc::new(config))
}

/// Stands in for the gateway: subscribes to `filter` on Mosquitto (QoS 1) and publishes every
/// message, in arrival order, to the AMQP queue `queue`. Returns once subscribed.
pub struct Bridge {
    pub forwarded: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Bridge {
    pub async fn start(filter: &str, queue: &str, client_id: &str) -> anyhow::Result<Bridge> {
        use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

        let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ at 127.0.0.1:5672")?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;

        let mut opts = MqttOptions::new(client_id, "127.0.0.1", 1883);
        opts.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_inflight(100);
        let (client, mut el) = AsyncClient::new(opts, 64);
        client.subscribe(filter, QoS::AtLeastOnce).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("bridge subscriber: {e} (is Mosquitto on 127.0.0.1:1883?)"),
                Err(_) => bail!("bridge subscriber: no SUBACK within 5 s"),
            }
        }
        let forwarded = Arc::new(AtomicU64::new(0));
        let count = forwarded.clone();
        let queue = queue.to_owned();
        // Confirms are awaited by a second task, so the subscriber never falls behind Mosquitto
        // (which drops QoS 1 messages beyond its per-client queue limit).
        let (confirms_tx, mut confirms_rx) = tokio::sync::mpsc::unbounded_channel();
        let confirmer = tokio::spawn(async move {
            while let Some(confirm) = confirms_rx.recv().await {
                let confirm: lapin::PublisherConfirm = confirm;
                if confirm.await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let task = tokio::spawn(async move {
            let _keep = (client, conn, confirmer);
            while let Ok(ev) = el.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = ev {
                    let confirm = channel
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions::default(),
                            &p.payload,
                            lapin::BasicProperties::default(),
                        )
                        .await;
                    if let Ok(confirm) = confirm {
                        let _ = confirms_tx.send(confirm);
                    }
                }
            }
        });
        Ok(Bridge { forwarded, task })
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

/// Declares a queue only this test uses (RabbitMQ deletes it after a minute unused, should the
/// test die before deleting it).
pub async fn declare_queue(
    tag: &str,
) -> anyhow::Result<(lapin::Connection, lapin::Channel, String)> {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ at 127.0.0.1:5672 (guest/guest)")?;
    let channel = conn.create_channel().await?;
    let name = unique(tag);
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(60_000));
    channel
        .queue_declare(name.as_str().into(), QueueDeclareOptions::default(), args)
        .await?;
    Ok((conn, channel, name))
}

/// Deletes a queue made by [`declare_queue`] and closes its connection.
pub async fn delete_queue(
    conn: lapin::Connection,
    channel: lapin::Channel,
    name: &str,
) -> anyhow::Result<()> {
    channel
        .queue_delete(name.into(), lapin::options::QueueDeleteOptions::default())
        .await?;
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// Creates a persistent MQTT 5 session for each client id with a QoS 1 subscription to
/// `filter` (`{id}` = the client id), as if the device had been online before: Mosquitto then
/// keeps QoS 1 messages for it until it connects with clean start 0.
pub async fn precreate_sessions(ids: &[String], filter: &str) -> anyhow::Result<()> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    for id in ids {
        let mut opts = MqttOptions::new(id, "127.0.0.1", 1883);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_start(false)
            .set_session_expiry_interval(Some(300));
        let (client, mut el) = AsyncClient::new(opts, 8);
        client
            .subscribe(filter.replace("{id}", id), QoS::AtLeastOnce)
            .await?;
        let mut subscribed = false;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                    subscribed = true;
                    client.disconnect().await?;
                }
                Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) if subscribed => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("{id}: {e} (is Mosquitto running on 127.0.0.1:1883?)"),
                Err(_) => bail!("{id}: no SUBACK / DISCONNECT within 5 s"),
            }
        }
    }
    Ok(())
}

/// What the [`Downlink`] stand-in saw of one command on the AMQP side.
#[derive(Debug, Clone)]
pub struct SeenCommand {
    pub routing_key: String,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub payload: Vec<u8>,
}

/// Stands in for the gateway's AMQP downlink: consumes `queue` and publishes every command to
/// Mosquitto as MQTT 5, QoS 1, on the routing key with `.` as `/`, with `reply_to` as the response
/// topic and `correlation_id` as the correlation data; acks after Mosquitto's PUBACK.
pub struct Downlink {
    pub seen: Arc<Mutex<Vec<SeenCommand>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Downlink {
    pub async fn start(queue: &str, client_id: &str) -> anyhow::Result<Downlink> {
        use futures_util::StreamExt;
        use lapin::options::{BasicAckOptions, BasicConsumeOptions};
        use rumqttc::v5::mqttbytes::v5::PublishProperties;
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::{AsyncClient, MqttOptions};

        let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ at 127.0.0.1:5672")?;
        let channel = conn.create_channel().await?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                format!("{client_id}-consumer").as_str().into(),
                BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await?;
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", 1883);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(opts, 256);
        // The event loop only needs to run; publishes are awaited through the request channel.
        let pump = tokio::spawn(async move { while el.poll().await.is_ok() {} });
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let _keep = (conn, pump);
            while let Some(Ok(d)) = consumer.next().await {
                let p = &d.properties;
                let s = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|v| v.to_string());
                let cmd = SeenCommand {
                    routing_key: d.routing_key.to_string(),
                    message_id: s(p.message_id()),
                    correlation_id: s(p.correlation_id()),
                    reply_to: s(p.reply_to()),
                    content_type: s(p.content_type()),
                    delivery_mode: *p.delivery_mode(),
                    payload: d.data.clone(),
                };
                let props = PublishProperties {
                    response_topic: cmd.reply_to.clone(),
                    correlation_data: cmd.correlation_id.clone().map(|c| c.into_bytes().into()),
                    ..Default::default()
                };
                let topic = cmd.routing_key.replace('.', "/");
                if let Ok(mut l) = log.lock() {
                    l.push(cmd.clone());
                }
                if client
                    .publish_with_properties(topic, QoS::AtLeastOnce, false, cmd.payload, props)
                    .await
                    .is_err()
                {
                    break;
                }
                let _ = d.acker.ack(BasicAckOptions::default()).await;
            }
        });
        Ok(Downlink { seen, task })
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

/// Stands in for the gateway's uplink for replies: subscribes (MQTT 5) to `filter` and publishes
/// each message to the AMQP queue `queue` with the headers the gateway sets (`mqtt_topic`, and
/// `mqtt_correlation_data` when the message had correlation data). Returns once subscribed.
pub struct ReplyBridge {
    task: tokio::task::JoinHandle<()>,
}

impl ReplyBridge {
    pub async fn start(filter: &str, queue: &str, client_id: &str) -> anyhow::Result<ReplyBridge> {
        use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
        use lapin::types::{AMQPValue, FieldTable, LongString};
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::{AsyncClient, Event, MqttOptions};

        let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ at 127.0.0.1:5672")?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", 1883);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(opts, 64);
        client.subscribe(filter, QoS::AtLeastOnce).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("reply bridge: {e} (is Mosquitto on 127.0.0.1:1883?)"),
                Err(_) => bail!("reply bridge: no SUBACK within 5 s"),
            }
        }
        let queue = queue.to_owned();
        let task = tokio::spawn(async move {
            let _keep = (client, conn);
            while let Ok(ev) = el.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = ev {
                    let mut headers = FieldTable::default();
                    headers.insert(
                        "mqtt_topic".into(),
                        AMQPValue::LongString(LongString::from(p.topic.to_vec())),
                    );
                    if let Some(cd) = p.properties.and_then(|pr| pr.correlation_data) {
                        headers.insert(
                            "mqtt_correlation_data".into(),
                            AMQPValue::LongString(LongString::from(cd.to_vec())),
                        );
                    }
                    let _ = channel
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions::default(),
                            &p.payload,
                            lapin::BasicProperties::default().with_headers(headers),
                        )
                        .await;
                }
            }
        });
        Ok(ReplyBridge { task })
    }

    pub fn stop(self) {
        self.task.abort();
    }
}
