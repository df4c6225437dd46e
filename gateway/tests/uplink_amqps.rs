//! The AMQP uplink over TLS (`amqps://`). The shared RabbitMQ on 127.0.0.1:5672 has no TLS
//! listener and is not reconfigured: a TLS-terminating proxy (`tls_proxy`, tokio-rustls with a
//! certificate from a CA made at test time) sits in front of it, and the uplink trusts that CA
//! through `ca_file`. Records go through the forwarder and are read back from RabbitMQ with lapin.
#![allow(clippy::unwrap_used)]

mod tls_proxy;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gateway::config::{AmqpConfig, PayloadMode, RouteConfig, UplinkConfig};
use gateway::forwarder::Routes;
use gateway::forwarder::{self, DeadLetters, UplinkState};
use gateway::queue::{NewRecord, Queue, QueueOptions};
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tls_proxy::TlsProxy;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const DIRECT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const UPLINK: &str = "rmq-tls";

fn unique(prefix: &str) -> String {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{n}", std::process::id())
}

/// An `amqps://` uplink through the proxy, from the config file's defaults.
fn uplink(proxy: &TlsProxy, exchange: &str, ca_file: bool) -> AmqpConfig {
    let url = format!("amqps://guest:guest@127.0.0.1:{}/%2f", proxy.port());
    let mut text = format!("name = {UPLINK:?}\nurl = {url:?}\nexchange = {exchange:?}\n");
    if ca_file {
        text.push_str(&format!(
            "ca_file = {:?}\n",
            proxy.ca_file().display().to_string()
        ));
    }
    let mut c: AmqpConfig = toml::from_str(&text).unwrap();
    c.window = 32;
    c.confirm_timeout = Duration::from_secs(5);
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(500);
    c
}

/// Stops a forwarder and waits for it.
struct Stop {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Stop {
    async fn cancel(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("the forwarder stops within 10 s")
            .unwrap();
    }
}

/// A queue with its data dir, and an exchange with a queue bound to it on RabbitMQ.
struct Rig {
    _dir: tempfile::TempDir,
    queue: Queue,
    dead: DeadLetters,
    exchange: String,
    qname: String,
    conn: Connection,
    ch: Channel,
}

impl Rig {
    async fn new(tag: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = QueueOptions::new(dir.path().join("data"));
        opts.segment_bytes = 1 << 20;
        opts.max_bytes = 64 << 20;
        let (queue, _) = Queue::open(opts.clone()).unwrap();
        let dead = DeadLetters::open(&opts).unwrap();
        let exchange = unique(&format!("gw-{tag}-x"));
        let qname = unique(&format!("gw-{tag}-q"));
        let conn = Connection::connect(DIRECT_URL, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        let mut args = FieldTable::default();
        // Left behind by a test that died: gone after 5 minutes unused.
        args.insert("x-expires".into(), AMQPValue::LongInt(300_000));
        ch.queue_declare(
            qname.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
        ch.queue_bind(
            qname.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        Rig {
            _dir: dir,
            queue,
            dead,
            exchange,
            qname,
            conn,
            ch,
        }
    }

    fn spawn(&self, cfg: AmqpConfig) -> (Arc<forwarder::ForwarderStats>, Stop) {
        let stop = CancellationToken::new();
        let routes = Arc::new(Routes::new(vec![RouteConfig {
            filter: "devices/#".into(),
            uplinks: vec![UPLINK.into()],
            payload: PayloadMode::Raw,
        }]));
        let (stats, handle) = forwarder::spawn(
            UplinkConfig::Amqp(cfg),
            "tlsgw".into(),
            self.queue.clone(),
            routes,
            self.dead.clone(),
            stop.clone(),
        );
        (stats, Stop { stop, handle })
    }

    fn cursor(&self) -> u64 {
        self.queue
            .stats()
            .cursors
            .iter()
            .find(|c| c.name == UPLINK)
            .map_or(0, |c| c.acked)
    }

    /// (device_id, gateway_seq, payload) of every message in the queue, in arrival order.
    async fn drain(&self) -> Vec<(String, u64, Vec<u8>)> {
        let mut got = Vec::new();
        while let Some(m) = self
            .ch
            .basic_get(self.qname.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let d = m.delivery;
            let h = d.properties.headers().as_ref().expect("headers");
            let device = match h.inner().get("device_id") {
                Some(AMQPValue::LongString(s)) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                other => panic!("device_id: {other:?}"),
            };
            let seq = match h.inner().get("gateway_seq") {
                Some(AMQPValue::LongLongInt(s)) => *s as u64,
                other => panic!("gateway_seq: {other:?}"),
            };
            got.push((device, seq, d.data));
        }
        got
    }

    async fn finish(self) {
        let _ = self
            .ch
            .queue_delete(self.qname.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self
            .ch
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = self.conn.close(200, "test done".into()).await;
        self.dead.close();
        self.queue.close();
    }
}

#[tokio::test]
async fn amqps_uplink_with_ca_file_delivers_through_a_tls_terminating_proxy() {
    let proxy = TlsProxy::start(Some("127.0.0.1:5672".parse().unwrap())).await;
    let rig = Rig::new("amqps").await;
    let mut expected = Vec::new();
    for i in 0..20 {
        for d in ["dev-a", "dev-b"] {
            let payload = format!("{d}:{i}");
            let seq = rig
                .queue
                .append(&NewRecord::new(
                    d,
                    &format!("devices/{d}/t"),
                    payload.as_bytes(),
                ))
                .await
                .unwrap();
            expected.push((d.to_string(), seq, payload.into_bytes()));
        }
    }
    let last = expected.last().unwrap().1;
    let (stats, stop) = rig.spawn(uplink(&proxy, &rig.exchange, true));
    let deadline = Instant::now() + Duration::from_secs(15);
    while rig.cursor() < last {
        assert!(
            Instant::now() < deadline,
            "cursor at {} of {last}; state {:?}, TLS handshakes {}, failed {}",
            rig.cursor(),
            stats.state(),
            proxy.handshakes(),
            proxy.failed_handshakes()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(proxy.handshakes() >= 1, "the uplink spoke TLS to the proxy");
    assert_eq!(proxy.failed_handshakes(), 0);
    let got = rig.drain().await;
    assert_eq!(got, expected, "every record, once, in order, over amqps");
    stop.cancel().await;
    rig.finish().await;
}

#[tokio::test]
async fn amqps_uplink_without_the_ca_refuses_the_untrusted_certificate_and_sends_nothing() {
    let proxy = TlsProxy::start(Some("127.0.0.1:5672".parse().unwrap())).await;
    let rig = Rig::new("amqps-untrusted").await;
    rig.queue
        .append(&NewRecord::new("dev-a", "devices/dev-a/t", b"x"))
        .await
        .unwrap();
    let (stats, stop) = rig.spawn(uplink(&proxy, &rig.exchange, false));
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.failed_handshakes() < 2 {
        assert!(
            Instant::now() < deadline,
            "no failed handshake: state {:?}, handshakes {}",
            stats.state(),
            proxy.handshakes()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(proxy.handshakes(), 0, "no TLS session with an untrusted CA");
    assert_ne!(stats.state(), UplinkState::Connected);
    assert_eq!(rig.cursor(), 0, "nothing confirmed");
    assert!(rig.drain().await.is_empty());
    stop.cancel().await;
    rig.finish().await;
}
