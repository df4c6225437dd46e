//! The Kafka forwarder under faults between it and a tansu broker. The faults come from a proxy
//! in the path (`fault_proxy`), and tansu advertises the proxy's address in its metadata
//! (`--advertised-listener-url`), so every connection the uplink makes, the bootstrap one and
//! those to the partition leader after the metadata, goes through the proxy.
//!
//! Every test ends the same way: every appended record is in the topic (read back by
//! kafka-python, `tests/clients/kafka_consume.py`), the first arrival of each record comes in
//! per-device order, duplicates appear only where the scenario allows them (at most one batch:
//! partitions are produced concurrently, and a failed batch is sent again whole), and the
//! uplink's cursor reaches the last record.
//!
//! Needs `tansu` 0.6.0 and python3 with kafka-python 3.x (see `uplink_kafka.rs`).
#![allow(clippy::unwrap_used)]

mod fault_proxy;
mod forwarder_rig;
mod tansu;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fault_proxy::{FaultProxy, Mode};
use forwarder_rig::{check_delivery, eventually, unique, Forwarder, StateLog};
use gateway::config::{KafkaConfig, PayloadMode, RouteConfig, UplinkConfig};
use gateway::forwarder::Routes;
use gateway::forwarder::{DeadLetters, UplinkState};
use gateway::queue::{NewRecord, Queue, QueueOptions};
use tansu::Tansu;
use tokio::time::Instant;

/// The uplink's name, hence its cursor's.
const UPLINK: &str = "kafka";
const DEVICES: [&str; 3] = ["dev-1", "dev-4", "dev-7"];

/// tansu behind a fault proxy (tansu advertises the proxy), a topic of 3 partitions, a data
/// directory with its queue and dead letters, and the records appended so far.
struct Rig {
    _dir: tempfile::TempDir,
    opts: QueueOptions,
    queue: Queue,
    dead: DeadLetters,
    routes: Arc<Routes>,
    proxy: FaultProxy,
    tansu: Tansu,
    topic: String,
    /// (device, seq) of every record appended, in append order.
    expected: Vec<(String, u64)>,
    next_index: HashMap<String, usize>,
}

impl Rig {
    async fn new(tag: &str) -> Rig {
        let mut attempt = 0;
        let (proxy, tansu) = loop {
            let port = tansu::free_port();
            let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let proxy = FaultProxy::start(target).await.unwrap();
            let advertised = proxy.addr().to_string();
            match tokio::task::spawn_blocking(move || Tansu::start_advertising(port, &advertised))
                .await
                .unwrap()
            {
                Ok(t) => break (proxy, t),
                Err(why) if attempt < 2 => {
                    eprintln!("tansu on port {port}: {why}");
                    attempt += 1;
                }
                Err(why) => panic!("tansu did not start: {why}"),
            }
        };
        let topic = unique(&format!("gw-kfault-{tag}"));
        tansu.create_topic(&topic, 3);
        let dir = tempfile::tempdir().unwrap();
        let mut opts = QueueOptions::new(dir.path().join("data"));
        opts.segment_bytes = 1 << 20;
        opts.max_bytes = 64 << 20;
        let (queue, _) = Queue::open(opts.clone()).unwrap();
        let dead = DeadLetters::open(&opts).unwrap();
        let routes = Arc::new(Routes::new(vec![RouteConfig {
            filter: "devices/#".into(),
            uplinks: vec![UPLINK.into()],
            payload: PayloadMode::Raw,
        }]));
        Rig {
            _dir: dir,
            opts,
            queue,
            dead,
            routes,
            proxy,
            tansu,
            topic,
            expected: Vec::new(),
            next_index: HashMap::new(),
        }
    }

    /// An uplink through the proxy, from the config file's defaults, with test-sized timings.
    fn uplink(&self) -> KafkaConfig {
        let mut c: KafkaConfig = toml::from_str(&format!(
            "name = {UPLINK:?}\nbootstrap = [{:?}]\ntopic = {:?}\n",
            self.proxy.addr().to_string(),
            self.topic
        ))
        .unwrap();
        c.max_batch = 32;
        c.confirm_timeout = Duration::from_secs(2);
        c.max_retries = 2;
        c.backoff_min = Duration::from_millis(50);
        c.backoff_max = Duration::from_millis(500);
        c
    }

    /// Appends `per_device` records for each device, interleaved; returns the last seq.
    async fn append(&mut self, per_device: usize) -> u64 {
        let mut last = 0;
        for _ in 0..per_device {
            for d in DEVICES {
                let i = self.next_index.entry(d.to_string()).or_insert(0);
                let topic = format!("devices/{d}/telemetry");
                let payload = format!("{d}:{i}:{}", "x".repeat(40));
                *i += 1;
                last = self
                    .queue
                    .append(&NewRecord::new(d, &topic, payload.as_bytes()))
                    .await
                    .unwrap();
                self.expected.push((d.to_string(), last));
            }
        }
        last
    }

    fn last(&self) -> u64 {
        self.expected.last().unwrap().1
    }

    fn spawn(&self, cfg: KafkaConfig) -> Forwarder {
        forwarder_rig::spawn(
            UplinkConfig::Kafka(cfg),
            "kfaultgw",
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

    /// Every record in the topic as (device_id, gateway_seq), per partition in offset order
    /// (one device's records are all in one partition, so this is per-device arrival order).
    /// Call it once the cursor has reached the last record, with the proxy passing.
    async fn consume(&self) -> Vec<(String, u64)> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/kafka_consume.py");
        let out = tokio::process::Command::new("python3")
            .arg(script)
            .args([
                "--bootstrap",
                &self.tansu.bootstrap(),
                "--topic",
                &self.topic,
            ])
            .args(["--expect", &self.expected.len().to_string()])
            .args(["--timeout", "30"])
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), out)
            .await
            .expect("kafka_consume.py finished within 60 s")
            .expect("python3 runs (kafka-python 3.x needed: `./run-tests` installs it)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "kafka_consume.py failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let mut got: Vec<(u32, i64, String, u64)> = stdout
            .lines()
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                let h = &v["headers"];
                let device = h["device_id"].as_str().unwrap().to_string();
                assert_eq!(v["key"].as_str(), Some(device.as_str()), "key = device id");
                let seq: u64 = h["gateway_seq"].as_str().unwrap().parse().unwrap();
                assert_eq!(
                    h["message_id"].as_str(),
                    Some(format!("kfaultgw-{seq}").as_str()),
                    "stable message id"
                );
                (
                    v["partition"].as_u64().unwrap() as u32,
                    v["offset"].as_i64().unwrap(),
                    device,
                    seq,
                )
            })
            .collect();
        got.sort_by_key(|(p, o, _, _)| (*p, *o));
        got.into_iter().map(|(_, _, d, s)| (d, s)).collect()
    }

    async fn finish(self) {
        tokio::task::spawn_blocking(move || {
            self.dead.close();
            self.queue.close();
            drop(self.tansu);
        })
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_refused_backs_off_keeps_records_and_drains_them_in_order_when_it_returns() {
    let t0 = Instant::now();
    let mut rig = Rig::new("refused").await;
    rig.proxy.set_mode(Mode::Refuse);
    rig.append(50).await;
    let f = rig.spawn(rig.uplink());
    let log = StateLog::start(f.stats.clone());
    eventually(
        Duration::from_secs(10),
        || log.seen(UplinkState::BackingOff),
        || format!("never backing off: {:?}", log.history()),
    )
    .await;
    // Records keep accumulating while the broker is unreachable.
    let last = rig.append(50).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(f.sent(), 0, "nothing can be sent");
    assert!(!log.seen(UplinkState::Connected), "{:?}", log.history());
    assert_eq!(rig.cursor(), 0);
    let c = rig
        .queue
        .stats()
        .cursors
        .into_iter()
        .find(|c| c.name == UPLINK)
        .unwrap();
    assert_eq!(c.lag_records, 300, "all records wait: {c:?}");
    let tries = rig.proxy.refused();
    assert!(tries >= 2, "{tries} connection attempts: it keeps trying");

    rig.proxy.set_mode(Mode::Pass);
    rig.wait_cursor(last, Duration::from_secs(20), &f).await;
    let got = rig.consume().await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(
        dups.is_empty(),
        "nothing was sent before, so no duplicates: {dups:?}"
    );
    assert_eq!(f.stats.state(), UplinkState::Connected);
    assert_eq!(f.confirmed(), 300);
    eprintln!(
        "refused: {tries} refused connections, states {:?}, {:?}",
        log.history(),
        t0.elapsed()
    );
    f.stop().await;
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_is_detected_within_the_confirm_timeout_and_everything_is_resent_after_it() {
    let t0 = Instant::now();
    let mut rig = Rig::new("blackhole").await;
    let cfg = rig.uplink();
    let confirm_timeout = cfg.confirm_timeout;
    let f = rig.spawn(cfg);
    let log = StateLog::start(f.stats.clone());
    let before = rig.append(20).await;
    rig.wait_cursor(before, Duration::from_secs(15), &f).await;
    let sent_before = f.sent();

    rig.proxy.set_mode(Mode::BlackHole);
    let hole = Instant::now();
    let last = rig.append(40).await;
    eventually(
        confirm_timeout * 3,
        || log.seen_after(UplinkState::Stalled, hole).is_some(),
        || format!("never stalled: {:?}", log.history()),
    )
    .await;
    let detected = log.seen_after(UplinkState::Stalled, hole).unwrap() - hole;
    // The produce went out right after the hole opened: its confirm timeout ran out about
    // `confirm_timeout` later. The slack is for scheduling on a loaded machine, not a
    // performance figure: what the bound rules out is a stall noticed only by something slower
    // (TCP's own timeouts take minutes) or never.
    assert!(
        detected <= confirm_timeout + Duration::from_secs(3),
        "stall detected after {detected:?}, confirm_timeout {confirm_timeout:?}"
    );
    // Reconnects into the hole fail (no metadata answer) and back off; nothing is confirmed.
    // (At least this long: a later wake-up only gives a wrong confirm more time to show.)
    tokio::time::sleep_until(hole + confirm_timeout * 2).await;
    eventually(
        Duration::from_secs(10),
        || rig.proxy.black_holed() >= 1,
        || {
            format!(
                "no reconnect was tried into the hole: states {:?}",
                log.history()
            )
        },
    )
    .await;
    assert_eq!(rig.cursor(), before, "nothing is confirmed in a black hole");
    rig.proxy.set_mode(Mode::Pass);

    rig.wait_cursor(last, Duration::from_secs(20), &f).await;
    let got = rig.consume().await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(
        dups.is_empty(),
        "what went into the hole never reached the broker: {dups:?}"
    );
    assert!(
        f.sent() - sent_before > 120,
        "the swallowed batch was sent again: {} sent after the hole for 120 records",
        f.sent() - sent_before
    );
    assert_eq!(f.stats.state(), UplinkState::Connected);
    eprintln!(
        "black hole: stall detected after {detected:?}, states {:?}, {} connections ({} \
         black-holed), {:?}",
        log.history(),
        rig.proxy.accepted(),
        rig.proxy.black_holed(),
        t0.elapsed()
    );
    f.stop().await;
    rig.finish().await;
}

/// The "connected but stalled" half: the established connection stops answering a produce, and
/// the path is healthy again by the time the forwarder reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_produce_is_dropped_and_its_records_are_sent_again_on_a_new_connection() {
    let t0 = Instant::now();
    let mut rig = Rig::new("stalled").await;
    let mut cfg = rig.uplink();
    // Time for the test to heal the path between "stalled" and the reconnect.
    cfg.backoff_min = Duration::from_millis(400);
    cfg.backoff_max = Duration::from_secs(1);
    let f = rig.spawn(cfg);
    let log = StateLog::start(f.stats.clone());
    let before = rig.append(20).await;
    rig.wait_cursor(before, Duration::from_secs(15), &f).await;
    let sent_before = f.sent();
    let accepted_before = rig.proxy.accepted();

    rig.proxy.set_mode(Mode::BlackHole);
    let hole = Instant::now();
    let last = rig.append(40).await;
    eventually(
        Duration::from_secs(8),
        || f.stats.state() == UplinkState::Stalled,
        || format!("never stalled: {:?}", log.history()),
    )
    .await;
    assert_eq!(rig.cursor(), before, "nothing is confirmed while stalled");
    rig.proxy.set_mode(Mode::Pass);

    rig.wait_cursor(last, Duration::from_secs(20), &f).await;
    let got = rig.consume().await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(
        dups.is_empty(),
        "the stalled produce never reached the broker: {dups:?}"
    );
    assert!(
        f.sent() - sent_before > 120,
        "the stalled batch was sent again: {} sent after the stall",
        f.sent() - sent_before
    );
    assert!(
        rig.proxy.accepted() > accepted_before,
        "a new connection was made"
    );
    assert!(f.reconnects() >= 1);
    eprintln!(
        "stalled: states {:?}, stalled after {:?}, {:?}",
        log.history(),
        log.seen_after(UplinkState::Stalled, hole).map(|t| t - hole),
        t0.elapsed()
    );
    f.stop().await;
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_mid_batch_loses_nothing_and_duplicates_at_most_a_batch() {
    let t0 = Instant::now();
    let mut rig = Rig::new("reset").await;
    let last = rig.append(100).await;
    // ApiVersions and metadata are a few hundred bytes; a produce of 32 records with their
    // headers a few KiB: the reset comes in the middle of the first batches.
    rig.proxy.set_mode(Mode::ResetAfter(6_000));
    let cfg = rig.uplink();
    let batch = cfg.max_batch;
    let f = rig.spawn(cfg);
    // The cursor as last read before the reset (read first, then the reset count: a lower bound
    // of the cursor at the reset, whenever this task runs), and as first read after it (an
    // upper bound). rskafka may reconnect and confirm more between the reset and the read
    // after it, so only the lower bound says what was confirmed before the reset.
    let mut cursor_before_reset = rig.cursor();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cursor = rig.cursor();
        if rig.proxy.resets() >= 1 {
            break;
        }
        cursor_before_reset = cursor;
        assert!(Instant::now() < deadline, "no reset");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let cursor_after_reset = rig.cursor();
    rig.proxy.set_mode(Mode::Pass);
    assert!(
        cursor_after_reset < last,
        "the reset came after everything was confirmed: the test proves nothing"
    );

    rig.wait_cursor(last, Duration::from_secs(20), &f).await;
    let got = rig.consume().await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(
        dups.len() <= batch,
        "{} duplicates, more than a batch ({batch}): {dups:?}",
        dups.len()
    );
    assert!(
        dups.iter().all(|&s| s > cursor_before_reset),
        "a record behind the cursor (confirmed) was sent again: {dups:?}, cursor \
         {cursor_before_reset}"
    );
    // The cut request is sent again on a new connection: by rskafka itself (it retries a
    // request whose connection broke, within `confirm_timeout`), or by the forwarder after a
    // reconnect (then `sent` exceeds 300). Either way only unanswered requests go again. (That
    // there was a new connection is not checked by counting the proxy's connections: the count
    // at the reset cannot be read without racing that reconnect. The records unconfirmed at the
    // reset, confirmed now, went over one.)
    assert_eq!(f.confirmed(), 300, "each record counted as confirmed once");
    eprintln!(
        "reset: {} resets, cursor {cursor_before_reset}..={cursor_after_reset} at the reset, {} \
         duplicates, {} sent, {} forwarder reconnects, {:?}",
        rig.proxy.resets(),
        dups.len(),
        f.sent(),
        f.reconnects(),
        t0.elapsed()
    );
    f.stop().await;
    rig.finish().await;
}

/// A restart with a backlog: forwarder A forwards part of it (slowly: `max_rate`) and stops
/// (cleanly, or `crash`: its task aborted mid-batch); the queue is closed and opened again on the
/// same data dir, more records come in, and forwarder B resumes from the persisted cursor.
async fn restart_resumes_from_the_persisted_cursor(crash: bool) {
    let t0 = Instant::now();
    let mut rig = Rig::new(if crash { "crash" } else { "restart" }).await;
    rig.append(100).await;
    let mut slow = rig.uplink();
    slow.max_rate = Some(200);
    let batch = slow.max_batch;
    let a = rig.spawn(slow);
    let a_stats = a.stats.clone();
    eventually(
        Duration::from_secs(15),
        || a.confirmed() >= 64,
        || format!("A confirmed only {}", a.confirmed()),
    )
    .await;
    if crash {
        a.handle.abort();
        let _ = a.handle.await;
    } else {
        a.stop().await;
    }
    let a_cursor = rig.cursor();
    assert!(
        a_cursor < rig.last(),
        "A forwarded everything before it stopped: the test proves nothing"
    );
    assert!(
        a_cursor >= rig.expected[0].1 + 63,
        "A confirmed, so its cursor moved"
    );

    let opts = rig.opts.clone();
    let (queue, dead) = tokio::task::spawn_blocking({
        let (q, d) = (rig.queue.clone(), rig.dead.clone());
        move || {
            d.close();
            q.close();
            let (queue, report) = Queue::open(opts.clone()).unwrap();
            assert_eq!(report.truncated_bytes, 0);
            (queue, DeadLetters::open(&opts).unwrap())
        }
    })
    .await
    .unwrap();
    rig.queue = queue;
    rig.dead = dead;
    assert_eq!(rig.cursor(), a_cursor, "the cursor was persisted");
    rig.append(10).await;
    let last = rig.last();
    let remaining = rig.expected.iter().filter(|(_, s)| *s > a_cursor).count();

    let b = rig.spawn(rig.uplink());
    rig.wait_cursor(last, Duration::from_secs(20), &b).await;
    let got = rig.consume().await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(
        dups.iter().all(|&s| s > a_cursor),
        "records at or before the persisted cursor {a_cursor} were sent again: {dups:?}"
    );
    assert!(
        dups.len() <= batch,
        "{} duplicates, more than a batch: {dups:?}",
        dups.len()
    );
    assert!(
        b.sent() as usize <= remaining + batch,
        "B sent {} for {remaining} records after the cursor",
        b.sent()
    );
    eprintln!(
        "restart (crash: {crash}): A confirmed {} (cursor {a_cursor}), B sent {} for {remaining}, \
         {} duplicates, {:?}",
        a_stats.confirmed.load(Ordering::Relaxed),
        b.sent(),
        dups.len(),
        t0.elapsed()
    );
    b.stop().await;
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_a_backlog_resumes_from_the_persisted_cursor() {
    restart_resumes_from_the_persisted_cursor(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarder_killed_mid_batch_resumes_from_the_persisted_cursor_after_restart() {
    restart_resumes_from_the_persisted_cursor(true).await;
}

/// `max_rate` after an outage: the backlog goes out no faster than the limit. The bound is loose
/// (20% over the rate, plus one batch that may start at once); it checks the limit, not speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_limits_the_replay_of_a_backlog() {
    const RATE: u32 = 100;
    let mut rig = Rig::new("rate").await;
    let last = rig.append(100).await;
    let mut cfg = rig.uplink();
    cfg.max_rate = Some(RATE);
    cfg.max_batch = 10;
    let batch = cfg.max_batch as f64;
    let start = Instant::now();
    let f = rig.spawn(cfg);
    let mut samples = Vec::new();
    while rig.cursor() < last {
        // Confirmed first: a pause between the two reads can only loosen the bound.
        let confirmed = f.confirmed();
        let elapsed = start.elapsed();
        let bound = f64::from(RATE) * elapsed.as_secs_f64() * 1.2 + batch;
        assert!(
            confirmed as f64 <= bound,
            "{confirmed} records confirmed after {elapsed:?}: above {RATE}/s (bound {bound:.0})"
        );
        samples.push((elapsed, confirmed));
        assert!(
            elapsed < Duration::from_secs(30),
            "the backlog did not drain: cursor {} of {last}, {confirmed} confirmed",
            rig.cursor()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = start.elapsed();
    let n = rig.expected.len() as f64;
    // The last batch may start at (n - batch) / rate.
    let least = Duration::from_secs_f64((n - batch) / f64::from(RATE) / 1.2);
    assert!(
        took >= least,
        "{n} records in {took:?}: faster than {RATE}/s allows (at least {least:?})"
    );
    let got = rig.consume().await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(dups.is_empty(), "{dups:?}");
    eprintln!(
        "max_rate {RATE}/s: {n} records in {took:?}; samples (s, confirmed): {:?}",
        samples
            .iter()
            .step_by(10)
            .map(|(t, c)| (format!("{:.1}", t.as_secs_f64()), *c))
            .collect::<Vec<_>>()
    );
    f.stop().await;
    rig.finish().await;
}
