//! The Kafka downlink against tansu (a Kafka-compatible broker, started per test on a free
//! loopback port): commands produced to a 3-partition topic (rskafka in the test, keyed by
//! device into the Java partitioner's partition, as a Kafka producer would) reach subscribed
//! devices over mutual TLS, in order, with their MQTT 5 request/response properties; offline
//! persistent sessions get theirs when they come back; a bad record is a dead letter and the
//! next one still arrives; a gateway restart reads on from the offsets it kept (nothing read
//! or delivered twice); records read again after a lost offsets write are recognised and not
//! stored twice; a full command store pauses fetching; a damaged offsets file stops the
//! downlink with an error naming it until it is removed; a broker restart is ridden out.
//!
//! Needs `tansu` 0.6.0 (`$TANSU`, `$CARGO_HOME/bin/tansu` or on `PATH`); without it the tests
//! fail, saying how to install it.
#![allow(clippy::unwrap_used)]

mod downlink_support;
mod ingest_support;
mod tansu;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use downlink_support::{
    consuming, dev, downlink, payloads, receive, subscribe, text, unique, wait_for,
    CORRELATION_DATA, RESPONSE_TOPIC,
};
use gateway::config::Config;
use gateway::downlink::DownlinkState;
use gateway::service::Service;
use gateway::status::Status;
use gateway::uplink::murmur2::partition_for_key;
use ingest_support::raw::{self, property_values, Connect};
use rskafka::chrono::{DateTime, Utc};
use rskafka::client::partition::{Compression, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use tansu::Tansu;

const PARTITIONS: u32 = 3;

struct Rig {
    dir: tempfile::TempDir,
    certs: PathBuf,
    path: PathBuf,
    topic: String,
    kafka: Client,
    // Last: the broker outlives the clients above.
    tansu: Tansu,
}

impl Rig {
    async fn new(extra: &str) -> Rig {
        Rig::with("", extra).await
    }

    /// `before` goes before the `[[downlinks]]` entry (other sections), `extra` into it.
    async fn with(before: &str, extra: &str) -> Rig {
        let tansu = Tansu::start();
        let topic = unique("commands");
        tansu.create_topic(&topic, PARTITIONS);
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        gateway::certs::generate(&certs, 8).unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            format!(
                r#"
[queue]
data_dir = "{data}"
segment_bytes = "1 MiB"
max_bytes = "64 MiB"

[[listeners]]
bind = "127.0.0.1:0"
tls = {{ cert = "{c}/server.pem", key = "{c}/server.key", client_ca = "{c}/ca.pem", require_client_cert = true }}

[admin]
enabled = false

{before}

[[downlinks]]
name = "kcmds"
type = "kafka"
bootstrap = ["{bootstrap}"]
topic = "{topic}"
max_wait = "100ms"
backoff_max = "1s"
{extra}
"#,
                data = dir.path().join("data").display(),
                c = certs.display(),
                bootstrap = tansu.bootstrap(),
            ),
        )
        .unwrap();
        let kafka = ClientBuilder::new(vec![tansu.bootstrap()])
            .build()
            .await
            .unwrap();
        Rig {
            dir,
            certs,
            path,
            topic,
            kafka,
            tansu,
        }
    }

    async fn start(&self) -> Service {
        Service::start(Config::load(&self.path).unwrap(), self.path.clone())
            .await
            .unwrap()
    }

    /// Produces one record keyed `key` into the partition the Java partitioner picks for it.
    async fn produce(&self, key: &str, headers: &[(&str, &[u8])], value: &[u8]) {
        let p = partition_for_key(key.as_bytes(), PARTITIONS) as i32;
        let pc = self
            .kafka
            .partition_client(self.topic.as_str(), p, UnknownTopicHandling::Retry)
            .await
            .unwrap();
        let record = Record {
            key: Some(key.as_bytes().to_vec()),
            value: Some(value.to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect::<BTreeMap<_, _>>(),
            timestamp: DateTime::<Utc>::from_timestamp_millis(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as i64,
            )
            .unwrap(),
        };
        pc.produce(vec![record], Compression::NoCompression)
            .await
            .unwrap();
    }

    async fn device(&self, status: &Status, id: &str, connect: &Connect) -> raw::TlsRaw {
        downlink_support::device(&self.certs, status, id, connect).await
    }

    fn offsets_file(&self) -> PathBuf {
        self.dir.path().join("data/downlink/kafka-kcmds.offsets")
    }
}

#[tokio::test]
async fn commands_reach_online_and_offline_devices_in_order_and_a_bad_record_is_a_dead_letter() {
    let rig = Rig::new("").await;
    let service = rig.start().await;
    let status = service.status();
    assert_eq!(status.downlinks()[0].kind, "kafka");
    assert!(
        status.downlinks()[0]
            .source
            .ends_with(&format!("topic {}", rig.topic)),
        "{}",
        status.downlinks()[0].source
    );
    let (online, offline) = (dev(1), dev(2));
    let mut a = rig
        .device(&status, &online, &Connect::v5(&online).persistent(600))
        .await;
    subscribe(&mut a, true, &online).await;
    let mut b = rig
        .device(&status, &offline, &Connect::v4(&offline).persistent(0))
        .await;
    subscribe(&mut b, false, &offline).await;
    drop(b);
    wait_for("the offline session", || status.sessions.counts().1 == 1).await;
    consuming(&status).await;

    for i in 0..5 {
        for d in [&online, &offline] {
            let topic = format!("devices/{d}/commands/ping");
            let id = format!("{d}-{i}");
            let corr = format!("corr-{i}");
            let reply = format!("devices/{d}/replies");
            rig.produce(
                d,
                &[
                    ("mqtt_topic", topic.as_bytes()),
                    ("message_id", id.as_bytes()),
                    ("mqtt_correlation_data", corr.as_bytes()),
                    ("mqtt_response_topic", reply.as_bytes()),
                ],
                format!("{d}:{i}").as_bytes(),
            )
            .await;
        }
    }
    // A record outside allowed_topics in the online device's partition, then one more
    // (no mqtt_topic header: the default template over the key).
    rig.produce(&online, &[("mqtt_topic", b"telemetry/dev-00001")], b"bad")
        .await;
    rig.produce(&online, &[], b"after-bad").await;

    let got = receive(&mut a, true, 6).await;
    let mut want: Vec<String> = (0..5).map(|i| format!("{online}:{i}")).collect();
    want.push("after-bad".into());
    assert_eq!(payloads(&got), want);
    for (i, r) in got.iter().take(5).enumerate() {
        assert_eq!(r.topic, format!("devices/{online}/commands/ping"));
        assert_eq!(r.qos, 1);
        assert_eq!(
            property_values(&r.properties, CORRELATION_DATA),
            vec![text(&format!("corr-{i}"))]
        );
        assert_eq!(
            property_values(&r.properties, RESPONSE_TOPIC),
            vec![text(&format!("devices/{online}/replies"))]
        );
    }
    assert_eq!(got[5].topic, format!("devices/{online}/commands"));

    let s = downlink(&status);
    wait_for("12 records settled", || {
        s.acked.load(Ordering::Relaxed) == 12
    })
    .await;
    assert_eq!(s.stored.load(Ordering::Relaxed), 11);
    assert_eq!(s.dead_lettered.load(Ordering::Relaxed), 1);
    let dl = status.dead.recent();
    assert!(
        dl.iter().any(
            |d| d.topic == "telemetry/dev-00001" && d.reason.contains("outside allowed_topics")
        ),
        "{dl:?}"
    );

    // The offline device comes back and gets its five, in order.
    let mut b = rig
        .device(&status, &offline, &Connect::v4(&offline).persistent(0))
        .await;
    let got = receive(&mut b, false, 5).await;
    assert_eq!(
        payloads(&got),
        (0..5).map(|i| format!("{offline}:{i}")).collect::<Vec<_>>()
    );
    wait_for("11 device acks", || {
        status.sessions.stats.commands_done.load(Ordering::Relaxed) == 11
    })
    .await;
    assert!(
        a.recv_within(Duration::from_millis(300)).await.is_err(),
        "nothing more for the online device"
    );
    service.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restart_reads_on_from_the_kept_offsets_and_delivers_nothing_twice() {
    let rig = Rig::new("").await;
    let service = rig.start().await;
    let status = service.status();
    let d = dev(5);
    let mut c = rig
        .device(&status, &d, &Connect::v4(&d).persistent(0))
        .await;
    subscribe(&mut c, false, &d).await;
    drop(c);
    wait_for("the offline session", || status.sessions.counts().1 == 1).await;
    consuming(&status).await;
    for i in 0..3 {
        rig.produce(&d, &[], format!("c{i}").as_bytes()).await;
    }
    let s = downlink(&status);
    wait_for("3 stored", || s.stored.load(Ordering::Relaxed) == 3).await;
    let commands = status.commands().unwrap();
    wait_for("3 routed", || {
        commands.router.routed.load(Ordering::Relaxed) == 3
    })
    .await;
    service.shutdown().await.unwrap();

    // The offsets were kept: the device's partition is past its three records.
    let kept = std::fs::read_to_string(rig.offsets_file()).unwrap();
    let p = partition_for_key(d.as_bytes(), PARTITIONS);
    assert!(
        kept.contains(&format!("\"{p}\": 3")),
        "partition {p} at offset 3 in:\n{kept}"
    );
    // Two more while the gateway is down.
    for i in 3..5 {
        rig.produce(&d, &[], format!("c{i}").as_bytes()).await;
    }

    let service = rig.start().await;
    let status = service.status();
    consuming(&status).await;
    let mut c = rig
        .device(&status, &d, &Connect::v4(&d).persistent(0))
        .await;
    let got = receive(&mut c, false, 5).await;
    assert_eq!(payloads(&got), ["c0", "c1", "c2", "c3", "c4"]);
    assert!(
        c.recv_within(Duration::from_millis(500)).await.is_err(),
        "each command once"
    );
    let s = downlink(&status);
    assert_eq!(
        s.consumed.load(Ordering::Relaxed),
        2,
        "the restarted downlink read only the records produced while it was down"
    );
    assert_eq!(s.duplicates.load(Ordering::Relaxed), 0);
    service.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_full_command_store_pauses_fetching_and_every_command_arrives_later_in_order() {
    // Room for about ten 100 KiB commands in the store; the offline device's session takes
    // one, so the router stops behind the second and the store fills.
    let rig = Rig::with(
        "[downlink]\nmax_bytes = \"1 MiB\"\n\n[sessions]\nmax_queued_messages = 1\n",
        "",
    )
    .await;
    let service = rig.start().await;
    let status = service.status();
    let d = dev(7);
    let mut c = rig
        .device(&status, &d, &Connect::v4(&d).persistent(0))
        .await;
    subscribe(&mut c, false, &d).await;
    drop(c);
    wait_for("the offline session", || status.sessions.counts().1 == 1).await;
    consuming(&status).await;
    const N: usize = 20;
    for i in 0..N {
        let mut payload = format!("c{i:02}:").into_bytes();
        payload.resize(100 << 10, b'x');
        rig.produce(&d, &[], &payload).await;
    }
    let s = downlink(&status);
    wait_for("the downlink to pause on the full store", || {
        s.state() == DownlinkState::Paused && s.backpressure.load(Ordering::Relaxed) >= 1
    })
    .await;
    let stored = s.stored.load(Ordering::Relaxed);
    assert!(
        stored < N as u64,
        "the broker keeps the rest: {stored} stored"
    );

    // The device comes back and reads: room again, fetching goes on, all arrive in order.
    let mut c = rig
        .device(&status, &d, &Connect::v4(&d).persistent(0))
        .await;
    let got = receive(&mut c, false, N).await;
    let prefixes: Vec<String> = got
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload[..4]).to_string())
        .collect();
    assert_eq!(
        prefixes,
        (0..N).map(|i| format!("c{i:02}:")).collect::<Vec<_>>()
    );
    wait_for("all stored", || {
        s.stored.load(Ordering::Relaxed) == N as u64
    })
    .await;
    assert_eq!(s.dead_lettered.load(Ordering::Relaxed), 0);
    service.shutdown().await.unwrap();
}

#[tokio::test]
async fn records_read_again_after_a_lost_offsets_write_are_not_stored_twice() {
    // The offline device's session takes one command; the router stops behind the second, so
    // the commands stay in the command store, as they do between the store's sync and their
    // routing.
    let rig = Rig::with("[sessions]\nmax_queued_messages = 1\n", "").await;
    let service = rig.start().await;
    let status = service.status();
    let d = dev(3);
    let mut c = rig
        .device(&status, &d, &Connect::v4(&d).persistent(0))
        .await;
    subscribe(&mut c, false, &d).await;
    drop(c);
    wait_for("the offline session", || status.sessions.counts().1 == 1).await;
    consuming(&status).await;
    for i in 0..3 {
        rig.produce(&d, &[], format!("c{i}").as_bytes()).await;
    }
    let s = downlink(&status);
    wait_for("3 stored", || s.stored.load(Ordering::Relaxed) == 3).await;
    let commands = status.commands().unwrap();
    wait_for("1 routed", || {
        commands.router.routed.load(Ordering::Relaxed) == 1
    })
    .await;
    service.shutdown().await.unwrap();
    // As if the gateway had died between the store's sync and the offsets write.
    std::fs::remove_file(rig.offsets_file()).unwrap();

    let service = rig.start().await;
    let status = service.status();
    let s = downlink(&status);
    wait_for("the 3 records settled again", || {
        s.acked.load(Ordering::Relaxed) == 3
    })
    .await;
    assert_eq!(s.consumed.load(Ordering::Relaxed), 3, "read again");
    assert_eq!(s.duplicates.load(Ordering::Relaxed), 3, "recognised");
    assert_eq!(s.stored.load(Ordering::Relaxed), 0, "not stored twice");
    // One more after them. (It also wakes the restarted router: at the time of writing, after
    // a restart it routes the commands it read at start only once a new one arrives; its
    // `reader.wait_readable()` answers at once and `next_batch` then waits for a new record.)
    rig.produce(&d, &[], b"c3").await;
    let mut c = rig
        .device(&status, &d, &Connect::v4(&d).persistent(0))
        .await;
    let got = receive(&mut c, false, 4).await;
    assert_eq!(payloads(&got), ["c0", "c1", "c2", "c3"]);
    assert!(
        c.recv_within(Duration::from_millis(500)).await.is_err(),
        "each command once"
    );
    service.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_damaged_offsets_file_stops_the_downlink_with_its_name_until_it_is_removed() {
    let rig = Rig::new("").await;
    std::fs::create_dir_all(rig.offsets_file().parent().unwrap()).unwrap();
    std::fs::write(rig.offsets_file(), b"{\"version\": 1, \"downl").unwrap();
    let service = rig.start().await;
    let status = service.status();
    let s = downlink(&status);
    let file = rig.offsets_file().display().to_string();
    wait_for("the downlink to say why it is down", || {
        s.state() == DownlinkState::Down && s.last_error().contains(&file)
    })
    .await;
    assert!(s.last_error().contains("delete it"), "{}", s.last_error());
    assert_eq!(s.consumed.load(Ordering::Relaxed), 0);
    // Removed: the downlink starts on its own (it tries again every backoff_max).
    std::fs::remove_file(rig.offsets_file()).unwrap();
    consuming(&status).await;
    let d = dev(4);
    let mut c = rig.device(&status, &d, &Connect::v4(&d)).await;
    subscribe(&mut c, false, &d).await;
    rig.produce(&d, &[], b"after-fix").await;
    let got = receive(&mut c, false, 1).await;
    assert_eq!(payloads(&got), ["after-fix"]);
    service.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_downlink_reconnects_after_a_broker_restart_and_reads_on() {
    let mut rig = Rig::new("").await;
    let service = rig.start().await;
    let status = service.status();
    let d = dev(6);
    let mut c = rig.device(&status, &d, &Connect::v4(&d)).await;
    subscribe(&mut c, false, &d).await;
    consuming(&status).await;
    rig.produce(&d, &[], b"before").await;
    assert_eq!(payloads(&receive(&mut c, false, 1).await), ["before"]);
    rig.tansu.restart();
    rig.produce(&d, &[], b"after").await;
    assert_eq!(payloads(&receive(&mut c, false, 1).await), ["after"]);
    assert!(
        c.recv_within(Duration::from_millis(300)).await.is_err(),
        "\"before\" is not read again"
    );
    service.shutdown().await.unwrap();
}
