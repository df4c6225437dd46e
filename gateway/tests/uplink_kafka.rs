//! The Kafka uplink against tansu (a Kafka-compatible broker, started per test on a free
//! loopback port): records from the queue arrive keyed by device id, in the partition the Java
//! default partitioner picks, in per-device order, with every header; read back by an
//! independent client (kafka-python, `tests/clients/kafka_consume.py`).
//!
//! Needs `tansu` 0.6.0 (`$TANSU`, `$CARGO_HOME/bin/tansu` or on `PATH`) and `python3` with
//! kafka-python 3.x. Without either the tests fail, saying how to install it.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gateway::config::{KafkaCompression, KafkaConfig, PayloadMode, RouteConfig, UplinkConfig};
use gateway::forwarder::Routes;
use gateway::forwarder::{self, DeadLetters};
use gateway::queue::{FsyncPolicy, NewRecord, Queue, QueueOptions};
use gateway::uplink::murmur2::partition_for_key;
use tokio_util::sync::CancellationToken;

mod tansu;
use tansu::Tansu;

const INSTALL_KAFKA_PYTHON: &str = "pip install 'kafka-python>=3,<4'";

fn unique(prefix: &str) -> String {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{n}", std::process::id())
}

fn require_kafka_python() {
    let ok = Command::new("python3")
        .args(["-c", "import kafka"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 cannot `import kafka` (the independent Kafka client of this test); \
         run the suite with `./run-tests` (the README's test command), which installs it, or \
         `{INSTALL_KAFKA_PYTHON}`"
    );
}

/// One record as kafka_consume.py prints it.
#[derive(Debug, serde::Deserialize)]
struct Consumed {
    partition: u32,
    offset: i64,
    key: Option<String>,
    value: Option<String>,
    timestamp: i64,
    headers: std::collections::HashMap<String, String>,
    murmur2_partition: Option<u32>,
}

/// Reads `expect` records of `topic` with kafka-python.
async fn consume(bootstrap: &str, topic: &str, expect: usize) -> Vec<Consumed> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/kafka_consume.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .args(["--bootstrap", bootstrap, "--topic", topic])
        .args(["--expect", &expect.to_string(), "--timeout", "30"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("kafka_consume.py finished within 60 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kafka_consume.py failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// An uplink from the config file's defaults (so keys added later with a default need no change
/// here), with test-sized timings.
fn kafka(name: &str, bootstrap: &str, topic: &str) -> KafkaConfig {
    let mut c: KafkaConfig = toml::from_str(&format!(
        "name = {name:?}\nbootstrap = [{bootstrap:?}]\ntopic = {topic:?}\n"
    ))
    .unwrap();
    c.partitions = 3;
    c.replication_factor = 1;
    c.compression = KafkaCompression::None;
    c.max_batch = 64;
    c.confirm_timeout = Duration::from_secs(10);
    c.max_retries = 3;
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_secs(1);
    c
}

fn open_queue(dir: &Path) -> (Queue, DeadLetters) {
    let mut o = QueueOptions::new(dir.join("data"));
    o.segment_bytes = 1 << 20;
    o.max_bytes = 64 << 20;
    let (queue, _) = Queue::open(o.clone()).unwrap();
    let dead = DeadLetters::open(&o).unwrap();
    (queue, dead)
}

/// Waits until the cursor `name` has passed `seq`.
async fn wait_acked(queue: &Queue, name: &str, seq: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = queue.stats();
        let c = s.cursors.iter().find(|c| c.name == name).map(|c| c.acked);
        if c.is_some_and(|a| a >= seq) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cursor {name} at {c:?}, want {seq}; cursors {:?}",
            s.cursors
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn route(filter: &str, uplinks: &[&str]) -> RouteConfig {
    RouteConfig {
        filter: filter.into(),
        uplinks: uplinks.iter().map(|u| u.to_string()).collect(),
        payload: PayloadMode::Raw,
    }
}

#[tokio::test]
async fn records_reach_kafka_keyed_by_device_in_java_partitions_in_order_with_headers() {
    require_kafka_python();
    let tansu = Tansu::start();
    let topic = unique("gw-test");
    tansu.create_topic(&topic, 3);

    let dir = tempfile::tempdir().unwrap();
    let (queue, dead) = open_queue(dir.path());
    let routes = Arc::new(Routes::new(vec![route("devices/#", &["kafka"])]));

    let props = vec![("unit".to_string(), "C".to_string())];
    // Chosen so the Java partitioner spreads them over all 3 partitions, and so that for dev-1
    // and dev-7 (negative hashes) `abs(hash) % 3` would pick another partition than the
    // Java client's `(hash & 0x7fffffff) % 3`.
    let devices = ["dev-1", "dev-4", "dev-7"];
    // 3 devices x 100 records, interleaved, with an MQTT 5 user property and a content type.
    let mut expected: Vec<(String, u64)> = Vec::new();
    for i in 0..100u32 {
        for d in devices {
            let t = format!("devices/{d}/telemetry");
            let payload = format!("{d}:{i}");
            let mut r = NewRecord::new(d, &t, payload.as_bytes());
            r.user_properties = &props;
            r.content_type = Some("text/plain");
            let seq = queue.append(&r).await.unwrap();
            expected.push((d.to_string(), seq));
        }
    }

    let stop = CancellationToken::new();
    let (stats, h) = forwarder::spawn(
        UplinkConfig::Kafka(kafka("kafka", &tansu.bootstrap(), &topic)),
        "testgw".into(),
        queue.clone(),
        routes,
        dead.clone(),
        stop.clone(),
    );
    wait_acked(&queue, "kafka", expected.last().unwrap().1).await;
    assert!(stats.confirmed.load(std::sync::atomic::Ordering::Relaxed) >= 300);

    let mut got = consume(&tansu.bootstrap(), &topic, expected.len()).await;
    assert_eq!(got.len(), expected.len());
    got.sort_by_key(|c| (c.partition, c.offset));
    let mut partition_of = std::collections::HashMap::new();
    let mut seen: Vec<(String, u64)> = Vec::new();
    for c in &got {
        let h = &c.headers;
        let device = h["device_id"].clone();
        let seq: u64 = h["gateway_seq"].parse().unwrap();
        assert_eq!(c.key.as_deref(), Some(device.as_str()), "key = device id");
        assert_eq!(h["mqtt_topic"], format!("devices/{device}/telemetry"));
        assert_eq!(h["mqtt_qos"], "1");
        assert_eq!(h["message_id"], format!("testgw-{seq}"));
        assert_eq!(h["unit"], "C", "MQTT 5 user property as header");
        assert_eq!(h["content_type"], "text/plain");
        assert!(
            c.value
                .as_deref()
                .is_some_and(|v| v.starts_with(&format!("{device}:"))),
            "{c:?}"
        );
        assert!(
            c.timestamp > 1_600_000_000_000,
            "receive time as the record timestamp: {c:?}"
        );
        // The partition the Java default partitioner picks, by kafka-python's murmur2 and ours.
        assert_eq!(Some(c.partition), c.murmur2_partition, "{c:?}");
        assert_eq!(c.partition, partition_for_key(device.as_bytes(), 3));
        let p = *partition_of.entry(device.clone()).or_insert(c.partition);
        assert_eq!(p, c.partition, "{device} in one partition");
        seen.push((device, seq));
    }
    let mut used: Vec<u32> = partition_of.values().copied().collect();
    used.sort_unstable();
    assert_eq!(used, [0, 1, 2], "the devices spread over all partitions");
    for dev in devices {
        let want: Vec<u64> = expected
            .iter()
            .filter(|(d, _)| d == dev)
            .map(|(_, s)| *s)
            .collect();
        let have: Vec<u64> = seen
            .iter()
            .filter(|(d, _)| d == dev)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(
            have, want,
            "{dev}: every record once, in order within its partition"
        );
    }
    assert_eq!(dead.count(), 0);

    stop.cancel();
    let _ = h.await;
    dead.close();
    queue.close();
    drop(tansu);
}

#[tokio::test]
async fn missing_topic_is_created_when_configured_and_dead_lettered_otherwise() {
    require_kafka_python();
    let tansu = Tansu::start();
    let created = unique("gw-created");
    let missing = unique("gw-missing");

    let dir = tempfile::tempdir().unwrap();
    let (queue, dead) = open_queue(dir.path());
    let routes = Arc::new(Routes::new(vec![route(
        "devices/#",
        &["create", "nocreate"],
    )]));
    let mut last = 0;
    for i in 0..10u32 {
        let d = if i % 2 == 0 { "dev-x" } else { "dev-y" };
        let t = format!("devices/{d}/t");
        last = queue
            .append(&NewRecord::new(d, &t, format!("{i}").as_bytes()))
            .await
            .unwrap();
    }

    let mut create = kafka("create", &tansu.bootstrap(), &created);
    create.create_topics = true;
    create.compression = KafkaCompression::Gzip;
    let stop = CancellationToken::new();
    let (_s1, h1) = forwarder::spawn(
        UplinkConfig::Kafka(create),
        "testgw".into(),
        queue.clone(),
        routes.clone(),
        dead.clone(),
        stop.clone(),
    );
    let (_s2, h2) = forwarder::spawn(
        UplinkConfig::Kafka(kafka("nocreate", &tansu.bootstrap(), &missing)),
        "testgw".into(),
        queue.clone(),
        routes,
        dead.clone(),
        stop.clone(),
    );
    wait_acked(&queue, "create", last).await;
    wait_acked(&queue, "nocreate", last).await;

    // Created with 3 partitions; gzip batches read back by an independent client.
    let got = consume(&tansu.bootstrap(), &created, 10).await;
    assert_eq!(got.len(), 10);
    for c in &got {
        assert_eq!(Some(c.partition), c.murmur2_partition, "{c:?}");
    }
    // The uplink without create_topics dead-lettered every record, with the reason.
    assert_eq!(dead.count(), 10);
    let mut dl = dead.queue().reader("check").unwrap();
    let letters = dl.read_now(20, usize::MAX).unwrap();
    assert_eq!(letters.len(), 10);
    for l in &letters {
        let prop = |k: &str| {
            l.user_properties
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(prop("x-dead-letter-uplink"), "nocreate");
        assert!(
            prop("x-dead-letter-reason").contains("does not exist"),
            "{l:?}"
        );
    }

    stop.cancel();
    let _ = h1.await;
    let _ = h2.await;
    dead.close();
    queue.close();
}

#[tokio::test]
async fn broker_outage_backs_off_then_the_backlog_drains_in_order() {
    require_kafka_python();
    let mut tansu = Tansu::start();
    let topic = unique("gw-outage");
    tansu.create_topic(&topic, 3);

    let dir = tempfile::tempdir().unwrap();
    let (queue, dead) = open_queue(dir.path());
    let routes = Arc::new(Routes::new(vec![route("devices/#", &["kafka"])]));
    let devices = ["dev-1", "dev-4", "dev-7"];
    let mut expected: Vec<(String, u64)> = Vec::new();
    let append = async |from: u32, to: u32, expected: &mut Vec<(String, u64)>| {
        for i in from..to {
            for d in devices {
                let t = format!("devices/{d}/t");
                let seq = queue
                    .append(&NewRecord::new(d, &t, format!("{d}:{i}").as_bytes()))
                    .await
                    .unwrap();
                expected.push((d.to_string(), seq));
            }
        }
    };
    append(0, 50, &mut expected).await;

    let mut cfg = kafka("kafka", &tansu.bootstrap(), &topic);
    cfg.confirm_timeout = Duration::from_secs(2);
    let stop = CancellationToken::new();
    let (stats, h) = forwarder::spawn(
        UplinkConfig::Kafka(cfg),
        "testgw".into(),
        queue.clone(),
        routes,
        dead.clone(),
        stop.clone(),
    );
    wait_acked(&queue, "kafka", expected.last().unwrap().1).await;

    // Broker down: the backlog stays in the queue, the uplink says it is not connected.
    tansu.stop();
    let acked_before = expected.last().unwrap().1;
    append(50, 100, &mut expected).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while stats.state() == forwarder::UplinkState::Connected {
        assert!(tokio::time::Instant::now() < deadline, "outage not noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let it fail to connect and back off a while.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(stats.state(), forwarder::UplinkState::Connected);
    let s = queue.stats();
    let c = s.cursors.iter().find(|c| c.name == "kafka").unwrap();
    assert_eq!(
        c.acked, acked_before,
        "nothing confirmed while the broker is down"
    );

    // Back: the backlog drains.
    tansu.restart();
    wait_acked(&queue, "kafka", expected.last().unwrap().1).await;

    let mut got = consume(&tansu.bootstrap(), &topic, expected.len()).await;
    got.sort_by_key(|c| (c.partition, c.offset));
    for dev in devices {
        let want: Vec<u64> = expected
            .iter()
            .filter(|(d, _)| d == dev)
            .map(|(_, s)| *s)
            .collect();
        // At least once: a record whose acks were lost may come again; first arrivals are in order.
        let mut have: Vec<u64> = Vec::new();
        for c in got.iter().filter(|c| c.key.as_deref() == Some(dev)) {
            let seq: u64 = c.headers["gateway_seq"].parse().unwrap();
            if !have.contains(&seq) {
                have.push(seq);
            }
        }
        assert_eq!(have, want, "{dev}: every record, first arrivals in order");
    }

    stop.cancel();
    let _ = h.await;
    dead.close();
    queue.close();
}

/// `linger`: records that come within it of each other go out together. Three records appended
/// 20 ms apart, with the longest linger allowed (1 s), to an idle uplink: the cursor goes from
/// the record before straight to the third (one round, one produce per partition), never
/// stopping at the first or second, as it does without linger. The queue does not `fdatasync`
/// each append (`FsyncPolicy::Interval`): on a loaded machine three fsyncs could take longer
/// than the linger, and what is measured here is the uplink, not the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_arriving_within_linger_are_sent_in_one_round() {
    let tansu = Tansu::start();
    let topic = unique("gw-linger");
    tansu.create_topic(&topic, 1);
    let dir = tempfile::tempdir().unwrap();
    let mut o = QueueOptions::new(dir.path().join("data"));
    o.segment_bytes = 1 << 20;
    o.max_bytes = 64 << 20;
    o.fsync = FsyncPolicy::Interval(Duration::from_secs(1));
    let (queue, _) = Queue::open(o.clone()).unwrap();
    let dead = DeadLetters::open(&o).unwrap();
    let routes = Arc::new(Routes::new(vec![route("devices/#", &["kafka"])]));
    let mut cfg = kafka("kafka", &tansu.bootstrap(), &topic);
    cfg.linger = gateway::config::MAX_KAFKA_LINGER;
    let stop = CancellationToken::new();
    let (_stats, h) = forwarder::spawn(
        UplinkConfig::Kafka(cfg),
        "lingergw".into(),
        queue.clone(),
        routes,
        dead.clone(),
        stop.clone(),
    );
    // Connected, the topic's partitions known, and idle.
    let warm = queue
        .append(&NewRecord::new("dev-1", "devices/dev-1/t", b"warm-up"))
        .await
        .unwrap();
    wait_acked(&queue, "kafka", warm).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cursor = |q: &Queue| {
        q.stats()
            .cursors
            .iter()
            .find(|c| c.name == "kafka")
            .map_or(0, |c| c.acked)
    };
    // Every value the cursor takes, sampled every millisecond while the records come in.
    let before = cursor(&queue);
    let sampler = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut seen = vec![before];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < deadline {
                let c = cursor(&queue);
                if c != *seen.last().unwrap() {
                    seen.push(c);
                }
                if c >= before + 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            seen
        })
    };
    let mut seqs = Vec::new();
    for i in 0..3 {
        seqs.push(
            queue
                .append(&NewRecord::new(
                    "dev-1",
                    "devices/dev-1/t",
                    format!("{i}").as_bytes(),
                ))
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = sampler.await.unwrap();
    assert_eq!(
        seen,
        vec![before, seqs[2]],
        "the three records were confirmed together, in one round"
    );
    let got = consume(&tansu.bootstrap(), &topic, 4).await;
    assert_eq!(got.len(), 4);
    stop.cancel();
    let _ = h.await;
    dead.close();
    queue.close();
}

/// With the default `linger` (5 ms) records still flow one by one when they trickle in.
#[tokio::test]
async fn records_trickling_in_flow_with_the_default_linger() {
    let tansu = Tansu::start();
    let topic = unique("gw-trickle");
    tansu.create_topic(&topic, 3);
    let dir = tempfile::tempdir().unwrap();
    let (queue, dead) = open_queue(dir.path());
    let routes = Arc::new(Routes::new(vec![route("devices/#", &["kafka"])]));
    let cfg = kafka("kafka", &tansu.bootstrap(), &topic);
    assert_eq!(cfg.linger, gateway::config::DEFAULT_KAFKA_LINGER);
    let stop = CancellationToken::new();
    let (_stats, h) = forwarder::spawn(
        UplinkConfig::Kafka(cfg),
        "tricklegw".into(),
        queue.clone(),
        routes,
        dead.clone(),
        stop.clone(),
    );
    for i in 0..10u32 {
        let d = ["dev-1", "dev-4", "dev-7"][i as usize % 3];
        let seq = queue
            .append(&NewRecord::new(
                d,
                &format!("devices/{d}/t"),
                format!("{i}").as_bytes(),
            ))
            .await
            .unwrap();
        wait_acked(&queue, "kafka", seq).await;
    }
    let got = consume(&tansu.bootstrap(), &topic, 10).await;
    assert_eq!(got.len(), 10);
    stop.cancel();
    let _ = h.await;
    dead.close();
    queue.close();
}
