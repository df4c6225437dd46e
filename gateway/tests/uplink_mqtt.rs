//! The MQTT uplink against a real broker: a Mosquitto (`/usr/sbin/mosquitto`) of the test's
//! own on a free loopback port, with persistence in a temporary directory, read back by an
//! independent subscriber (`mosquitto_sub`) with a persistent session, started before anything
//! is published. Every test ends the same way: every record arrived, the first arrival of each
//! in per-device order, duplicates only where the scenario allows them, and the uplink's cursor
//! at the last record.
#![allow(clippy::unwrap_used)]

mod fault_proxy;
mod forwarder_rig;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fault_proxy::{FaultProxy, Mode};
use forwarder_rig::{check_delivery, eventually, unique, Forwarder, StateLog};
use gateway::config::{MqttConfig, PayloadMode, RouteConfig, UplinkConfig};
use gateway::forwarder::{DeadLetters, Routes, UplinkState};
use gateway::queue::{NewRecord, Queue, QueueOptions};
use gateway::uplink::Uplink;
use tokio::time::Instant;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const MOSQUITTO_SUB: &str = "/usr/bin/mosquitto_sub";
const UPLINK: &str = "cloud";
const DEVICES: [&str; 3] = ["dev-a", "dev-b", "dev-c"];

/// A loopback port in 20000-32000 that is free when we look (never 1883, 8883 or 9100).
fn free_port() -> u16 {
    for _ in 0..200 {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-32000");
}

/// A Mosquitto of the test's own, killed when dropped.
struct Mosquitto {
    child: Option<Child>,
    port: u16,
    conf: PathBuf,
    log: PathBuf,
}

impl Mosquitto {
    /// Starts it in `dir` (persistence there) with `extra` config lines; `port` is its plain
    /// listener, `tls_port` (if any) a TLS listener that `extra` describes.
    fn start(dir: &Path, extra: &str) -> Mosquitto {
        for _ in 0..3 {
            let port = free_port();
            let conf = dir.join("mosquitto.conf");
            // Not `max_queued_messages 0` (unlimited): with it Mosquitto 2.0.11 drops the
            // connection after refusing a PUBLISH (its quota check sees 0 as full).
            std::fs::write(
                &conf,
                format!(
                    "user root\npersistence true\npersistence_location {}/\nallow_anonymous true\n\
                     max_queued_messages 1000000\nlog_dest stderr\nlog_type all\n\
                     listener {port} 127.0.0.1\n{extra}",
                    dir.display(),
                ),
            )
            .unwrap();
            let mut m = Mosquitto {
                child: None,
                port,
                conf,
                log: dir.join("mosquitto.log"),
            };
            if m.spawn() {
                return m;
            }
        }
        panic!("mosquitto did not start");
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .unwrap(),
            )
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {MOSQUITTO}: {e}"));
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            if let Ok(Some(_)) = self.child.as_mut().unwrap().try_wait() {
                eprintln!("mosquitto exited:\n{}", self.log());
                return false;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it (SIGTERM: it saves its persistence, as a service manager would stop it) and
    /// starts it again on the same port and persistence directory.
    fn restart(&mut self) {
        self.stop();
        assert!(self.spawn(), "mosquitto restart failed:\n{}", self.log());
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() {
                if std::time::Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One message as the subscriber printed it.
#[derive(Debug, Clone)]
struct Got {
    topic: String,
    props: Vec<(String, String)>,
    content_type: String,
    payload_format: String,
    payload: String,
}

impl Got {
    fn prop(&self, k: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// `mosquitto_sub` with a persistent session (`-c -i id`, QoS 1), printing each message on a
/// line to a file; killed when dropped.
struct Sub {
    child: Child,
    out: PathBuf,
}

impl Sub {
    /// Subscribes to `filter` on `m` and waits until a marker published after the
    /// subscription arrives, so nothing the gateway publishes later is missed.
    fn start(m: &Mosquitto, dir: &Path, id: &str, filter: &str, v5: bool) -> Sub {
        let out = dir.join(format!("{id}.out"));
        let file = std::fs::File::create(&out).unwrap();
        let child = Command::new("stdbuf")
            .arg("-oL")
            .arg(MOSQUITTO_SUB)
            .args(["-h", "127.0.0.1", "-p", &m.port.to_string()])
            .args(["-c", "-i", id, "-q", "1", "-t", filter])
            .args(["-V", if v5 { "mqttv5" } else { "mqttv311" }])
            .args(["-F", "%t\t%P\t%C\t%F\t%p"])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {MOSQUITTO_SUB}: {e}"));
        let sub = Sub { child, out };
        let marker = filter.trim_end_matches('#').to_string() + "marker";
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let st = Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &m.port.to_string()])
                .args(["-q", "1", "-t", &marker, "-m", "marker"])
                .status()
                .unwrap();
            assert!(st.success());
            std::thread::sleep(Duration::from_millis(100));
            if sub.lines().iter().any(|g| g.topic == marker) {
                return sub;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the subscriber never got its marker:\n{}",
                m.log()
            );
        }
    }

    /// Every message so far except markers.
    fn lines(&self) -> Vec<Got> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut f = l.splitn(5, '\t');
                let topic = f.next()?.to_string();
                let props = f.next()?;
                let content_type = f.next()?.to_string();
                let payload_format = f.next()?.to_string();
                let payload = f.next()?.to_string();
                Some(Got {
                    topic,
                    props: props
                        .split(' ')
                        .filter_map(|kv| kv.split_once(':'))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    content_type,
                    payload_format,
                    payload,
                })
            })
            .collect()
    }

    fn messages(&self) -> Vec<Got> {
        self.lines()
            .into_iter()
            .filter(|g| !g.topic.ends_with("marker"))
            .collect()
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The uplink from the config file's defaults (so keys added later need no change here), with
/// test-sized timings.
fn uplink(url: &str, extra: &str) -> MqttConfig {
    let mut c: MqttConfig = toml::from_str(&format!(
        "name = {UPLINK:?}\nurl = {url:?}\ntopic = \"gw/{{topic}}\"\n{extra}"
    ))
    .unwrap();
    if !extra.contains("window") {
        c.window = 64;
    }
    c.confirm_timeout = Duration::from_secs(5);
    c.max_retries = 2;
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(500);
    c
}

/// A data directory with its queue and dead letters, and the records appended so far.
struct Rig {
    dir: tempfile::TempDir,
    opts: QueueOptions,
    queue: Queue,
    dead: DeadLetters,
    routes: Arc<Routes>,
    /// (device, seq) of every record appended, in append order.
    expected: Vec<(String, u64)>,
    /// payload -> (device, seq)
    by_payload: HashMap<String, (String, u64)>,
    next_index: HashMap<String, usize>,
}

impl Rig {
    fn new(routes: Vec<RouteConfig>) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = QueueOptions::new(dir.path().join("data"));
        opts.segment_bytes = 1 << 20;
        opts.max_bytes = 64 << 20;
        let (queue, _) = Queue::open(opts.clone()).unwrap();
        let dead = DeadLetters::open(&opts).unwrap();
        Rig {
            dir,
            opts,
            queue,
            dead,
            routes: Arc::new(Routes::new(routes)),
            expected: Vec::new(),
            by_payload: HashMap::new(),
            next_index: HashMap::new(),
        }
    }

    fn devices() -> Rig {
        Rig::new(vec![RouteConfig {
            filter: "devices/#".into(),
            uplinks: vec![UPLINK.into()],
            payload: PayloadMode::Raw,
        }])
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Appends `per_device` records for each device, interleaved, with a user property and a
    /// content type; returns the last seq.
    async fn append(&mut self, per_device: usize) -> u64 {
        let props = vec![("unit".to_string(), "C".to_string())];
        let mut last = 0;
        for _ in 0..per_device {
            for d in DEVICES {
                let i = self.next_index.entry(d.to_string()).or_insert(0);
                let topic = format!("devices/{d}/telemetry");
                let payload = format!("{d}:{i}:{}", "x".repeat(40));
                *i += 1;
                let mut r = NewRecord::new(d, &topic, payload.as_bytes());
                r.user_properties = &props;
                r.content_type = Some("text/plain");
                r.payload_format = Some(1);
                last = self.queue.append(&r).await.unwrap();
                self.expected.push((d.to_string(), last));
                self.by_payload.insert(payload, (d.to_string(), last));
            }
        }
        last
    }

    fn last(&self) -> u64 {
        self.expected.last().unwrap().1
    }

    fn spawn(&self, cfg: MqttConfig) -> Forwarder {
        forwarder_rig::spawn(
            UplinkConfig::Mqtt(cfg),
            "testgw",
            &self.queue,
            &self.routes,
            &self.dead,
        )
    }

    fn cursor(&self) -> u64 {
        forwarder_rig::cursor(&self.queue, UPLINK)
    }

    async fn wait_cursor(&self, seq: u64, timeout: Duration, f: &Forwarder) {
        forwarder_rig::wait_cursor(&self.queue, UPLINK, seq, timeout, f).await;
    }

    /// Waits until the subscriber has a copy of every record; returns (device, seq) in arrival
    /// order (identified by payload, which every protocol version carries).
    async fn received(&self, sub: &Sub, timeout: Duration) -> Vec<(String, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            let got: Vec<(String, u64)> = sub
                .messages()
                .iter()
                .map(|g| {
                    self.by_payload
                        .get(&g.payload)
                        .cloned()
                        .unwrap_or_else(|| panic!("a message nobody appended: {g:?}"))
                })
                .collect();
            let distinct: std::collections::HashSet<u64> = got.iter().map(|(_, s)| *s).collect();
            if distinct.len() >= self.expected.len() {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {} records arrived",
                distinct.len(),
                self.expected.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn finish(self) {
        tokio::task::block_in_place(|| {
            self.dead.close();
            self.queue.close();
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_the_broker_in_device_order_with_mqtt5_user_properties() {
    let mut rig = Rig::devices();
    let m = Mosquitto::start(rig.path(), "");
    let sub = Sub::start(&m, rig.path(), &unique("sub"), "gw/#", true);
    let last = rig.append(100).await;
    let f = rig.spawn(uplink(&m.url(), ""));
    rig.wait_cursor(last, Duration::from_secs(20), &f).await;
    let got = rig.received(&sub, Duration::from_secs(10)).await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(dups.is_empty(), "no fault, no duplicates: {dups:?}");
    for g in sub.messages() {
        let (device, seq) = &rig.by_payload[&g.payload];
        assert_eq!(g.topic, format!("gw/devices/{device}/telemetry"));
        assert_eq!(
            g.prop("unit"),
            Some("C"),
            "the device's own property: {g:?}"
        );
        assert_eq!(g.prop("message_id"), Some(format!("testgw-{seq}").as_str()));
        assert_eq!(g.prop("gateway_seq"), Some(seq.to_string().as_str()));
        assert_eq!(g.prop("device_id"), Some(device.as_str()));
        assert_eq!(
            g.prop("mqtt_topic"),
            Some(format!("devices/{device}/telemetry").as_str())
        );
        assert_eq!(g.content_type, "text/plain");
        assert_eq!(g.payload_format, "1");
    }
    assert_eq!(f.confirmed(), 300);
    assert_eq!(f.stats.state(), UplinkState::Connected);
    f.stop().await;
    rig.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_311_carries_the_payload_and_qos2_confirms_at_pubcomp() {
    let mut rig = Rig::devices();
    let m = Mosquitto::start(rig.path(), "");
    let sub = Sub::start(&m, rig.path(), &unique("sub"), "gw/#", false);
    let last = rig.append(50).await;
    // 3.1.1 has no receive maximum: the window must not exceed what the broker keeps in flight
    // (Mosquitto: max_inflight_messages, 20). Mosquitto 2.0.11 completes (PUBCOMP) QoS 2
    // publishes beyond it and then never delivers them: with a window of 64, 88 of 150 were
    // lost at the broker here.
    let f = rig.spawn(uplink(
        &m.url(),
        "protocol = \"3.1.1\"\nqos = 2\nwindow = 20\n",
    ));
    rig.wait_cursor(last, Duration::from_secs(20), &f).await;
    let got = rig.received(&sub, Duration::from_secs(10)).await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(dups.is_empty(), "{dups:?}");
    for g in sub.messages() {
        assert!(g.props.is_empty(), "3.1.1 carries only the payload: {g:?}");
    }
    assert_eq!(f.confirmed(), 150);
    f.stop().await;

    // MQTT 5 with QoS 2 as well, on the same broker, with a window of 64: the broker's
    // receive maximum (CONNACK) bounds the flows in flight, so nothing is lost there.
    let more = rig.append(40).await;
    let f = rig.spawn(uplink(&m.url(), "qos = 2\n"));
    rig.wait_cursor(more, Duration::from_secs(20), &f).await;
    let got = rig.received(&sub, Duration::from_secs(10)).await;
    assert!(check_delivery(&rig.expected, &got).is_empty());
    f.stop().await;
    rig.finish();
}

/// Writes a CA, a server certificate for 127.0.0.1 and a client certificate (and one from
/// another CA) into `dir`.
fn certs(
    dir: &Path,
) -> (
    PathBuf,
    PathBuf,
    PathBuf,
    PathBuf,
    PathBuf,
    PathBuf,
    PathBuf,
) {
    let (ca, _) = gateway::certs::DevCa::new().unwrap();
    let (server, server_key) = ca.server_cert(&["127.0.0.1"]).unwrap();
    let (client, client_key) = ca.device_cert("edge-gw-1").unwrap();
    let (other, _) = gateway::certs::DevCa::new().unwrap();
    let (wrong, wrong_key) = other.device_cert("edge-gw-1").unwrap();
    let w = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    (
        w("ca.pem", ca.pem()),
        w("server.pem", &server),
        w("server.key", &server_key),
        w("client.pem", &client),
        w("client.key", &client_key),
        w("wrong.pem", &wrong),
        w("wrong.key", &wrong_key),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_works_and_a_wrong_client_certificate_is_a_connect_error_saying_so() {
    let mut rig = Rig::devices();
    let (ca, server, server_key, client, client_key, wrong, wrong_key) = certs(rig.path());
    let tls_port = free_port();
    let m = Mosquitto::start(
        rig.path(),
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            ca.display(),
            server.display(),
            server_key.display()
        ),
    );
    let sub = Sub::start(&m, rig.path(), &unique("sub"), "gw/#", true);
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let tls = |cert: &Path, key: &Path| {
        format!(
            "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            ca.display().to_string(),
            cert.display().to_string(),
            key.display().to_string()
        )
    };

    // A certificate from another CA: the broker refuses it, and the error says so.
    let bad = UplinkConfig::Mqtt(uplink(&url, &tls(&wrong, &wrong_key)));
    let e = match Uplink::connect(&bad, 0, "testgw").await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("connected with a certificate from another CA"),
    };
    assert!(e.contains("certificate"), "{e}");
    assert!(e.contains("cannot connect"), "{e}");
    // No client certificate at all: refused too.
    let none = UplinkConfig::Mqtt(uplink(
        &url,
        &format!("ca_file = {:?}\n", ca.display().to_string()),
    ));
    assert!(Uplink::connect(&none, 0, "testgw").await.is_err());

    let last = rig.append(30).await;
    let f = rig.spawn(uplink(&url, &tls(&client, &client_key)));
    rig.wait_cursor(last, Duration::from_secs(20), &f).await;
    let got = rig.received(&sub, Duration::from_secs(10)).await;
    assert!(check_delivery(&rig.expected, &got).is_empty());
    f.stop().await;
    rig.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puback_refusal_becomes_a_dead_letter_naming_the_reason() {
    let mut rig = Rig::new(vec![RouteConfig {
        filter: "#".into(),
        uplinks: vec![UPLINK.into()],
        payload: PayloadMode::Raw,
    }]);
    let acl = rig.path().join("acl");
    // Anonymous clients may use gw/devices/# only.
    std::fs::write(&acl, "topic readwrite gw/devices/#\n").unwrap();
    let m = Mosquitto::start(rig.path(), &format!("acl_file {}\n", acl.display()));
    let sub = Sub::start(&m, rig.path(), &unique("sub"), "gw/devices/#", true);
    rig.append(10).await;
    let secret = rig
        .queue
        .append(&NewRecord::new("dev-z", "secret/x", b"not for the cloud"))
        .await
        .unwrap();
    let last = rig.append(10).await;
    let f = rig.spawn(uplink(&m.url(), ""));
    rig.wait_cursor(last, Duration::from_secs(20), &f).await;
    assert!(secret < last);
    let got = rig.received(&sub, Duration::from_secs(10)).await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(
        dups.is_empty(),
        "{dups:?}; reconnects {}; broker log:\n{}",
        f.reconnects(),
        m.log()
    );
    assert_eq!(rig.dead.count(), 1);
    let mut dl = rig.dead.queue().reader("check").unwrap();
    let letters = dl.read_now(10, usize::MAX).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].topic, "secret/x");
    let reason = letters[0]
        .user_properties
        .iter()
        .find(|(k, _)| k == "x-dead-letter-reason")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert!(reason.contains("0x87 not authorized"), "{reason}");
    assert_eq!(
        f.stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    f.stop().await;
    rig.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_with_a_backlog_loses_nothing_and_keeps_order() {
    let mut rig = Rig::devices();
    let mut m = Mosquitto::start(rig.path(), "");
    let sub = Sub::start(&m, rig.path(), &unique("sub"), "gw/#", true);
    let last = rig.append(700).await;
    let mut cfg = uplink(&m.url(), "");
    cfg.window = 256;
    let f = rig.spawn(cfg);
    let log = StateLog::start(f.stats.clone());
    eventually(
        Duration::from_secs(20),
        || f.confirmed() >= 200,
        || format!("confirmed {}", f.confirmed()),
    )
    .await;
    assert!(rig.cursor() < last, "the restart comes with a backlog");
    tokio::task::block_in_place(|| m.restart());
    rig.wait_cursor(last, Duration::from_secs(30), &f).await;
    let got = rig.received(&sub, Duration::from_secs(20)).await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(
        dups.len() <= 256,
        "{} duplicates, more than the window: {dups:?}",
        dups.len()
    );
    assert!(f.reconnects() >= 1, "{:?}", log.history());
    eprintln!(
        "broker restart: {} duplicates, states {:?}",
        dups.len(),
        log.history()
    );
    f.stop().await;
    rig.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_black_hole_and_reset_through_the_proxy_lose_nothing_and_keep_order() {
    let mut rig = Rig::devices();
    let m = Mosquitto::start(rig.path(), "");
    let sub = Sub::start(&m, rig.path(), &unique("sub"), "gw/#", true);
    let proxy = FaultProxy::start(m.addr()).await.unwrap();
    let url = format!("mqtt://127.0.0.1:{}", proxy.port());
    let mut cfg = uplink(&url, "");
    cfg.confirm_timeout = Duration::from_millis(800);
    cfg.backoff_min = Duration::from_millis(100);
    let window = cfg.window;

    // Refused: the forwarder backs off, keeps everything, and drains it when the broker is back.
    proxy.set_mode(Mode::Refuse);
    rig.append(50).await;
    let f = rig.spawn(cfg);
    let log = StateLog::start(f.stats.clone());
    eventually(
        Duration::from_secs(5),
        || log.seen(UplinkState::BackingOff) && proxy.refused() >= 2,
        || format!("never backing off: {:?}", log.history()),
    )
    .await;
    assert_eq!(f.sent(), 0);
    proxy.set_mode(Mode::Pass);
    rig.wait_cursor(rig.last(), Duration::from_secs(10), &f)
        .await;

    // Black hole: nothing is confirmed, the uplink stalls, and everything goes again after.
    proxy.set_mode(Mode::BlackHole);
    let before = rig.cursor();
    rig.append(40).await;
    eventually(
        Duration::from_secs(5),
        || log.seen(UplinkState::Stalled),
        || format!("never stalled: {:?}", log.history()),
    )
    .await;
    assert_eq!(rig.cursor(), before, "nothing is confirmed in a black hole");
    proxy.set_mode(Mode::Pass);
    rig.wait_cursor(rig.last(), Duration::from_secs(15), &f)
        .await;

    // Reset mid-window.
    let resets_before = proxy.resets();
    proxy.set_mode(Mode::ResetAfter(6_000));
    rig.append(200).await;
    eventually(
        Duration::from_secs(5),
        || proxy.resets() > resets_before,
        || "no reset".into(),
    )
    .await;
    proxy.set_mode(Mode::Pass);
    rig.wait_cursor(rig.last(), Duration::from_secs(15), &f)
        .await;

    let got = rig.received(&sub, Duration::from_secs(10)).await;
    let dups = check_delivery(&rig.expected, &got);
    // The black hole swallowed what it got (never at the broker); each reset re-sends at most
    // the window it cut.
    let resets = (proxy.resets() - resets_before) as usize;
    assert!(
        dups.len() <= window * resets.max(1),
        "{} duplicates, more than a window ({window}) per reset ({resets}): {dups:?}",
        dups.len()
    );
    assert!(f.reconnects() >= 2, "{:?}", log.history());
    // The session is persistent: the broker resumed it, and what may have reached it before a
    // failure went again marked DUP.
    let broker = m.log();
    assert!(
        broker.contains("Sending CONNACK to testgw (1, 0)"),
        "no resumed session:\n{broker}"
    );
    assert!(
        broker.contains("Received PUBLISH from testgw (d1, q1"),
        "nothing sent again with DUP:\n{broker}"
    );
    eprintln!(
        "faults: {} duplicates, {resets} resets, states {:?}",
        dups.len(),
        log.history()
    );
    f.stop().await;
    rig.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_names_the_connack_reason() {
    let rig = Rig::devices();
    // Only users of an (empty) password file may connect.
    let pw = rig.path().join("passwd");
    std::fs::write(&pw, "").unwrap();
    let m = Mosquitto::start(
        rig.path(),
        &format!("allow_anonymous false\npassword_file {}\n", pw.display()),
    );
    std::env::set_var("GW_MQTT_TEST_PASSWORD", "nope");
    let cfg = UplinkConfig::Mqtt(uplink(
        &m.url(),
        "username = \"nobody\"\npassword_env = \"GW_MQTT_TEST_PASSWORD\"\n",
    ));
    let e = match Uplink::connect(&cfg, 0, "testgw").await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("connected"),
    };
    assert!(e.contains("refused the connection: CONNACK 0x8"), "{e}");
    rig.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_uplink_moves_to_the_next_broker_and_shows_which_one_it_uses() {
    let mut rig = Rig::devices();
    let m = Mosquitto::start(rig.path(), "");
    let sub = Sub::start(&m, rig.path(), &unique("sub"), "gw/#", true);
    let first = FaultProxy::start(m.addr()).await.unwrap();
    first.set_mode(Mode::Refuse);
    let second = FaultProxy::start(m.addr()).await.unwrap();
    let mut cfg = uplink("", "");
    cfg.url = String::new();
    cfg.urls = vec![
        format!("mqtt://127.0.0.1:{}", first.port()),
        format!("mqtt://127.0.0.1:{}", second.port()),
    ];
    let last = rig.append(30).await;
    let f = rig.spawn(cfg);
    rig.wait_cursor(last, Duration::from_secs(15), &f).await;
    assert_eq!(
        f.stats.node(),
        format!("mqtt://127.0.0.1:{}", second.port())
    );
    assert!(first.refused() >= 1);
    let got = rig.received(&sub, Duration::from_secs(10)).await;
    assert!(check_delivery(&rig.expected, &got).is_empty());
    f.stop().await;
    rig.finish();
}

/// A forwarder aborted mid-window (as a crash would stop it), the queue closed and opened again,
/// and a new forwarder on the same cursor: with QoS 2, the new connection resumes the broker's
/// session and finishes the flows the old one left (PUBREL for what the broker had PUBRECed, DUP
/// for the rest). Nothing is missing, order holds, duplicates stay within a window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarder_killed_mid_window_resumes_from_its_cursor_with_qos2() {
    let mut rig = Rig::devices();
    let m = Mosquitto::start(rig.path(), "");
    let sub = Sub::start(&m, rig.path(), &unique("sub"), "gw/#", true);
    rig.append(300).await;
    let cfg = uplink(&m.url(), "qos = 2\n");
    let window = cfg.window;
    // A is paced so that it is still forwarding when the test kills it.
    let mut a_cfg = cfg.clone();
    a_cfg.max_rate = Some(200);
    let a = rig.spawn(a_cfg);
    eventually(
        Duration::from_secs(10),
        || a.confirmed() >= 100,
        || format!("A confirmed only {}", a.confirmed()),
    )
    .await;
    a.handle.abort();
    let _ = a.handle.await;
    let opts = rig.opts.clone();
    tokio::task::block_in_place(|| {
        rig.dead.close();
        rig.queue.close();
        let (queue, _) = Queue::open(opts.clone()).unwrap();
        rig.queue = queue;
        rig.dead = DeadLetters::open(&opts).unwrap();
    });
    let cursor = rig.cursor();
    assert!(
        cursor < rig.last(),
        "A forwarded everything: the test proves nothing"
    );
    let last = rig.append(20).await;
    let b = rig.spawn(cfg);
    rig.wait_cursor(last, Duration::from_secs(30), &b).await;
    let got = rig.received(&sub, Duration::from_secs(10)).await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(
        dups.iter().all(|&s| s > cursor),
        "records at or before the persisted cursor {cursor} came again: {dups:?}"
    );
    assert!(dups.len() <= window, "{} duplicates: {dups:?}", dups.len());
    eprintln!(
        "killed mid-window: cursor {cursor}, {} duplicates",
        dups.len()
    );
    b.stop().await;
    rig.finish();
}

/// The gateway binary, killed (SIGKILL) when dropped.
struct GatewayProcess {
    child: Child,
    log: PathBuf,
}

impl GatewayProcess {
    fn start(config: &Path, log: &Path, mqtt_port: u16) -> GatewayProcess {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut g = GatewayProcess {
            child,
            log: log.to_path_buf(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", mqtt_port)).is_err() {
            assert!(
                g.child.try_wait().unwrap().is_none(),
                "the gateway exited:\n{}",
                std::fs::read_to_string(&g.log).unwrap_or_default()
            );
            assert!(
                std::time::Instant::now() < deadline,
                "the gateway did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        g
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The gateway process killed with SIGKILL while its MQTT uplink drains a backlog, then started
/// again on the same data directory: every record the devices had acknowledged arrives, the
/// first arrival of each in per-device order, duplicates within the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_killed_with_a_backlog_loses_nothing_after_its_restart() {
    const PER_DEVICE: usize = 400;
    const WINDOW: usize = 128;
    let dir = tempfile::tempdir().unwrap();
    let m = Mosquitto::start(dir.path(), "");
    let sub = Sub::start(&m, dir.path(), &unique("sub"), "gw/#", true);
    let mqtt_port = free_port();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[queue]
data_dir = {data:?}
max_bytes = "64 MiB"
segment_bytes = "1 MiB"

[[listeners]]
bind = "127.0.0.1:{mqtt_port}"
tls = false

[auth]
allow_anonymous = true

[admin]
enabled = false

[gateway]
id = "killgw"

[[uplinks]]
name = "cloud"
type = "mqtt"
url = "{url}"
topic = "gw/{{topic}}"
window = {WINDOW}
max_rate = 300

[[routes]]
filter = "devices/#"
uplinks = ["cloud"]
"#,
            data = dir.path().join("data").display().to_string(),
            url = m.url(),
        ),
    )
    .unwrap();
    let log = dir.path().join("gateway.log");
    let mut gw = tokio::task::block_in_place(|| GatewayProcess::start(&config, &log, mqtt_port));

    // Three devices publish their records at QoS 1 (mosquitto_pub exits once all are PUBACKed,
    // i.e. durable in the gateway's queue).
    let mut expected = Vec::new();
    let mut by_payload = HashMap::new();
    let pubs: Vec<Child> = DEVICES
        .iter()
        .enumerate()
        .map(|(n, d)| {
            let mut lines = String::new();
            for i in 0..PER_DEVICE {
                let payload = format!("{d}:{i}");
                let seq = (n * 100_000 + i) as u64;
                expected.push((d.to_string(), seq));
                by_payload.insert(payload.clone(), (d.to_string(), seq));
                lines.push_str(&payload);
                lines.push('\n');
            }
            let mut child = Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string()])
                .args(["-i", d, "-q", "1", "-l"])
                .args(["-t", &format!("devices/{d}/telemetry")])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(lines.as_bytes())
                .unwrap();
            child
        })
        .collect();
    for mut p in pubs {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = p.try_wait().unwrap() {
                assert!(st.success(), "mosquitto_pub failed");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "mosquitto_pub hung");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let total = expected.len();
    let arrived = |sub: &Sub| {
        sub.messages()
            .iter()
            .map(|g| {
                by_payload
                    .get(&g.payload)
                    .cloned()
                    .unwrap_or_else(|| panic!("a message nobody sent: {g:?}"))
            })
            .collect::<Vec<_>>()
    };
    // Kill it while it drains (paced at 300 records/s: a backlog remains).
    eventually(
        Duration::from_secs(20),
        || arrived(&sub).len() >= 200,
        || format!("{} arrived before the kill", arrived(&sub).len()),
    )
    .await;
    tokio::task::block_in_place(|| gw.kill());
    let before = arrived(&sub).len();
    assert!(
        before < total,
        "everything arrived before the kill: the test proves nothing"
    );

    let _gw = tokio::task::block_in_place(|| GatewayProcess::start(&config, &log, mqtt_port));
    let distinct = |sub: &Sub| {
        arrived(sub)
            .iter()
            .map(|(_, s)| *s)
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    eventually(
        Duration::from_secs(60),
        || distinct(&sub) >= total,
        || {
            format!(
                "{} of {total} arrived after the restart; gateway log:\n{}",
                distinct(&sub),
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        },
    )
    .await;
    let got = arrived(&sub);
    let dups = check_delivery(&expected, &got);
    assert!(
        dups.len() <= WINDOW,
        "{} duplicates, more than the window: {dups:?}",
        dups.len()
    );
    eprintln!(
        "gateway SIGKILL: {before} of {total} had arrived at the kill, {} duplicates",
        dups.len()
    );
}
