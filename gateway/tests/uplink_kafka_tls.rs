//! The Kafka uplink over TLS and with SASL, against tansu.
//!
//! TLS: tansu 0.6 has no working TLS listener, so a TLS-terminating proxy (`tls_proxy`,
//! tokio-rustls with a certificate from a CA made at test time) sits in front of it, and tansu
//! advertises the proxy's address in its metadata: every connection of the uplink, bootstrap and
//! partition leader alike, speaks TLS to the proxy. Records are read back over TLS too (rskafka).
//!
//! SASL: tansu with `--authentication` refuses every request but ApiVersions and the SASL ones
//! until the client has authenticated, and checks SCRAM against the credentials in its database
//! (made with `tansu user create` before authentication is switched on). Its PLAIN check accepts
//! any password, so PLAIN is not tested against it.
//!
//! Needs `tansu` 0.6.0 (see `uplink_kafka.rs`).
#![allow(clippy::unwrap_used)]

mod tansu;
mod tls_proxy;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gateway::config::{KafkaConfig, PayloadMode, RouteConfig, UplinkConfig};
use gateway::forwarder::Routes;
use gateway::forwarder::{self, DeadLetters, ForwarderStats, UplinkState};
use gateway::queue::{NewRecord, Queue, QueueOptions};
use rskafka::client::partition::UnknownTopicHandling;
use rskafka::client::{ClientBuilder, Credentials, SaslConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tansu::Tansu;
use tls_proxy::TlsProxy;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const UPLINK: &str = "kafka-secure";
const DEVICES: [&str; 3] = ["dev-1", "dev-4", "dev-7"];

fn unique(prefix: &str) -> String {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{n}", std::process::id())
}

/// An environment variable this process was started with, and its value, to serve as the SCRAM
/// password given by `sasl.password_env`. The test does not set one: `std::env::set_var` while
/// other threads (other tests, tokio workers, C code calling `getenv`) may read the environment
/// is undefined behaviour. `cargo test` sets `CARGO_PKG_NAME` for the test binaries it runs;
/// otherwise any variable whose value makes a plain command-line argument will do.
fn password_in_the_environment() -> (String, String) {
    let usable = |v: &str| {
        !v.is_empty()
            && v != "wrong"
            && v != "edge-uplink-user"
            && v.len() <= 64
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if let Ok(v) = std::env::var("CARGO_PKG_NAME") {
        if usable(&v) {
            return ("CARGO_PKG_NAME".into(), v);
        }
    }
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(_, v)| usable(v))
        .min()
        .expect("an environment variable with a value usable as the password")
}

/// An uplink from `extra` TOML lines on top of the config file's defaults.
fn uplink(bootstrap: &str, topic: &str, extra: &str) -> KafkaConfig {
    let mut c: KafkaConfig = toml::from_str(&format!(
        "name = {UPLINK:?}\nbootstrap = [{bootstrap:?}]\ntopic = {topic:?}\n{extra}"
    ))
    .unwrap();
    c.max_batch = 32;
    c.confirm_timeout = Duration::from_secs(3);
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(500);
    c
}

/// A queue with records of three devices, and a forwarder to start on it.
struct Rig {
    _dir: tempfile::TempDir,
    queue: Queue,
    dead: DeadLetters,
    expected: Vec<(String, u64)>,
}

impl Rig {
    async fn new(per_device: usize) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = QueueOptions::new(dir.path().join("data"));
        opts.segment_bytes = 1 << 20;
        opts.max_bytes = 64 << 20;
        let (queue, _) = Queue::open(opts.clone()).unwrap();
        let dead = DeadLetters::open(&opts).unwrap();
        let mut expected = Vec::new();
        for i in 0..per_device {
            for d in DEVICES {
                let seq = queue
                    .append(&NewRecord::new(
                        d,
                        &format!("devices/{d}/t"),
                        format!("{d}:{i}").as_bytes(),
                    ))
                    .await
                    .unwrap();
                expected.push((d.to_string(), seq));
            }
        }
        Rig {
            _dir: dir,
            queue,
            dead,
            expected,
        }
    }

    fn spawn(
        &self,
        cfg: KafkaConfig,
    ) -> (
        Arc<ForwarderStats>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let stop = CancellationToken::new();
        let routes = Arc::new(Routes::new(vec![RouteConfig {
            filter: "devices/#".into(),
            uplinks: vec![UPLINK.into()],
            payload: PayloadMode::Raw,
        }]));
        let (stats, h) = forwarder::spawn(
            UplinkConfig::Kafka(cfg),
            "securegw".into(),
            self.queue.clone(),
            routes,
            self.dead.clone(),
            stop.clone(),
        );
        (stats, stop, h)
    }

    fn cursor(&self) -> u64 {
        self.queue
            .stats()
            .cursors
            .iter()
            .find(|c| c.name == UPLINK)
            .map_or(0, |c| c.acked)
    }

    async fn wait_cursor(&self, stats: &ForwarderStats, what: impl Fn() -> String) {
        let last = self.expected.last().unwrap().1;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.cursor() < last {
            assert!(
                Instant::now() < deadline,
                "cursor at {} of {last}; state {:?}; {}",
                self.cursor(),
                stats.state(),
                what()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn finish(self) {
        tokio::task::spawn_blocking(move || {
            self.dead.close();
            self.queue.close();
        })
        .await
        .unwrap();
    }
}

/// Reads the whole topic (3 partitions) with rskafka through `builder`'s transport: (device,
/// gateway_seq) per partition in offset order.
async fn read_back(builder: ClientBuilder, topic: &str) -> Vec<(String, u64)> {
    let client = tokio::time::timeout(Duration::from_secs(10), builder.build())
        .await
        .expect("the reading client connects within 10 s")
        .unwrap();
    let mut got = Vec::new();
    for p in 0..3 {
        let pc = client
            .partition_client(topic, p, UnknownTopicHandling::Retry)
            .await
            .unwrap();
        let mut offset = 0;
        loop {
            let (records, high_watermark) = tokio::time::timeout(
                Duration::from_secs(10),
                pc.fetch_records(offset, 1..1_000_000, 100),
            )
            .await
            .expect("fetch within 10 s")
            .unwrap();
            for r in &records {
                let h = &r.record.headers;
                let device = String::from_utf8(h["device_id"].clone()).unwrap();
                assert_eq!(
                    r.record.key.as_deref(),
                    Some(device.as_bytes()),
                    "key = device id"
                );
                let seq = String::from_utf8(h["gateway_seq"].clone())
                    .unwrap()
                    .parse()
                    .unwrap();
                got.push((device, seq));
                offset = r.offset + 1;
            }
            if offset >= high_watermark {
                break;
            }
        }
    }
    got
}

/// Every appended record exactly once, each device's in order (one device, one partition).
fn assert_all_once_in_order(expected: &[(String, u64)], got: &[(String, u64)]) {
    assert_eq!(got.len(), expected.len(), "{got:?}");
    for d in DEVICES {
        let want: Vec<u64> = expected
            .iter()
            .filter(|(x, _)| x == d)
            .map(|(_, s)| *s)
            .collect();
        let have: Vec<u64> = got
            .iter()
            .filter(|(x, _)| x == d)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(have, want, "{d}");
    }
}

/// A TLS proxy and a tansu behind it that advertises the proxy; a topic of 3 partitions.
async fn tansu_behind_tls() -> (TlsProxy, Tansu, String) {
    let proxy = TlsProxy::start(None).await;
    let mut attempt = 0;
    let tansu = loop {
        let port = tansu::free_port();
        let advertised = proxy.addr().to_string();
        match tokio::task::spawn_blocking(move || Tansu::start_advertising(port, &advertised))
            .await
            .unwrap()
        {
            Ok(t) => break t,
            Err(why) if attempt < 2 => {
                eprintln!("tansu on port {port}: {why}");
                attempt += 1;
            }
            Err(why) => panic!("tansu did not start: {why}"),
        }
    };
    proxy.set_target(format!("127.0.0.1:{}", tansu.port).parse().unwrap());
    let topic = unique("gw-tls");
    tansu.create_topic(&topic, 3);
    (proxy, tansu, topic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_uplink_with_tls_and_ca_file_delivers_through_a_tls_terminating_proxy() {
    let (proxy, tansu, topic) = tansu_behind_tls().await;
    let rig = Rig::new(20).await;
    let ca = proxy.ca_file().display().to_string();
    let cfg = uplink(
        &proxy.addr().to_string(),
        &topic,
        &format!("tls = true\nca_file = {ca:?}\n"),
    );
    let (stats, stop, h) = rig.spawn(cfg);
    rig.wait_cursor(&stats, || {
        format!(
            "TLS handshakes {}, failed {}",
            proxy.handshakes(),
            proxy.failed_handshakes()
        )
    })
    .await;
    assert!(proxy.handshakes() >= 1, "the uplink spoke TLS");
    assert_eq!(proxy.failed_handshakes(), 0);

    // Read back over TLS as well (the broker advertises only the TLS address).
    let roots = CertificateDer::pem_file_iter(proxy.ca_file())
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let mut store = rustls::RootCertStore::empty();
    store.add_parsable_certificates(roots);
    let tls = rustls::ClientConfig::builder_with_provider(gateway::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    let got = read_back(
        ClientBuilder::new(vec![proxy.addr().to_string()]).tls_config(Arc::new(tls)),
        &topic,
    )
    .await;
    assert_all_once_in_order(&rig.expected, &got);

    stop.cancel();
    let _ = h.await;
    rig.finish().await;
    drop(tansu);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_uplink_with_tls_refuses_a_broker_certificate_it_does_not_trust() {
    let (proxy, tansu, topic) = tansu_behind_tls().await;
    let rig = Rig::new(2).await;
    // No ca_file: the test CA is in no system store.
    let (stats, stop, h) = rig.spawn(uplink(&proxy.addr().to_string(), &topic, "tls = true\n"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.failed_handshakes() < 1 || stats.state() != UplinkState::BackingOff {
        assert!(
            Instant::now() < deadline,
            "state {:?}, handshakes {}, failed {}",
            stats.state(),
            proxy.handshakes(),
            proxy.failed_handshakes()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(proxy.handshakes(), 0, "no TLS session with an untrusted CA");
    assert_eq!(stats.sent.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(rig.cursor(), 0, "nothing confirmed");
    stop.cancel();
    let _ = h.await;
    rig.finish().await;
    drop(tansu);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_uplink_authenticates_with_scram_and_a_wrong_password_is_refused() {
    // Not a value any usable password can have (`usable` refuses it), so a bug that sent the
    // username, or some other value, as the password could not pass.
    const USER: &str = "edge-uplink-user";
    let (var, password) = password_in_the_environment();
    assert_ne!(password, USER);
    let mut tansu = tokio::task::spawn_blocking(Tansu::start).await.unwrap();
    let topic = unique("gw-sasl");
    tansu.create_topic(&topic, 3);
    tansu.create_user(USER, &password, "scram512");
    tansu.restart_with(&["--authentication"]);

    // A wrong password: the broker refuses, the uplink backs off, nothing is confirmed.
    let wrong = Rig::new(2).await;
    let sasl = format!(
        "sasl = {{ mechanism = \"scram-sha-512\", username = {USER:?}, password = \"wrong\" }}\n"
    );
    let (stats, stop, h) = wrong.spawn(uplink(&tansu.bootstrap(), &topic, &sasl));
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.state() != UplinkState::BackingOff {
        assert!(Instant::now() < deadline, "state {:?}", stats.state());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(stats.state(), UplinkState::Connected);
    assert_eq!(wrong.cursor(), 0, "nothing confirmed with a wrong password");
    stop.cancel();
    let _ = h.await;
    wrong.finish().await;

    // The right one, from the environment variable the config names.
    let rig = Rig::new(10).await;
    let sasl = format!(
        "sasl = {{ mechanism = \"scram-sha-512\", username = {USER:?}, password_env = {var:?} }}\n"
    );
    let (stats, stop, h) = rig.spawn(uplink(&tansu.bootstrap(), &topic, &sasl));
    rig.wait_cursor(&stats, || "SCRAM-SHA-512".into()).await;
    let got = read_back(
        ClientBuilder::new(vec![tansu.bootstrap()]).sasl_config(SaslConfig::ScramSha512(
            Credentials::new(USER.into(), password),
        )),
        &topic,
    )
    .await;
    assert_all_once_in_order(&rig.expected, &got);
    stop.cancel();
    let _ = h.await;
    rig.finish().await;
    tokio::task::spawn_blocking(move || drop(tansu))
        .await
        .unwrap();
}
