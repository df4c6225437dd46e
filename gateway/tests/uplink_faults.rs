//! The AMQP forwarder under faults between it and the real RabbitMQ on 127.0.0.1:5672. The faults
//! come from a proxy in the path (`fault_proxy`), so the shared broker is never stopped or
//! reconfigured. Every test ends the same way: every appended record is in RabbitMQ (or, for
//! nacks, in the dead letters), the first delivery of each record comes in per-device order,
//! duplicates appear only where the scenario allows them, and the uplink's cursor reaches the last
//! record.
//!
//! Each test uses its own exchange and queue (unique names; the queue expires on its own if a
//! test dies before deleting it) and its own data directory.
#![allow(clippy::unwrap_used)]

mod fault_proxy;
mod forwarder_rig;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fault_proxy::{FaultProxy, Link, Mode};
use forwarder_rig::{check_delivery, eventually, unique, Forwarder, StateLog};
use gateway::config::{AmqpConfig, PayloadMode, RouteConfig, UplinkConfig};
use gateway::forwarder::Routes;
use gateway::forwarder::{DeadLetters, UplinkState};
use gateway::queue::{NewRecord, Queue, QueueOptions, Record};
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::time::Instant;

const BROKER: &str = "127.0.0.1:5672";
const DIRECT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The uplink's name, hence its cursor's.
const UPLINK: &str = "rmq";
const DEVICES: [&str; 3] = ["dev-a", "dev-b", "dev-c"];

fn broker() -> SocketAddr {
    BROKER.parse().unwrap()
}

fn proxied_url(p: &FaultProxy) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", p.port())
}

/// An uplink to `exchange` at `url`, from the config file's defaults (so fields added later with
/// a default need no change here), with test-sized timings. The test declares the exchange and
/// the queue itself (`declare = false`).
fn uplink(url: &str, exchange: &str) -> AmqpConfig {
    let mut c: AmqpConfig = toml::from_str(&format!(
        "name = {UPLINK:?}\nurl = {url:?}\nexchange = {exchange:?}\n"
    ))
    .unwrap();
    c.routing_key = "{topic}".into();
    c.declare = false;
    c.window = 32;
    c.confirm_timeout = Duration::from_secs(5);
    c.max_retries = 2;
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(500);
    c
}

/// A data directory with its queue and dead letters, an exchange and a queue bound to it with
/// `#`, a direct connection to RabbitMQ for the test, and the records appended so far.
struct Rig {
    _dir: tempfile::TempDir,
    opts: QueueOptions,
    queue: Queue,
    dead: DeadLetters,
    routes: Arc<Routes>,
    exchange: String,
    qname: String,
    conn: Connection,
    ch: Channel,
    /// (device, seq) of every record appended, in append order.
    expected: Vec<(String, u64)>,
    next_index: HashMap<String, usize>,
}

impl Rig {
    /// `queue_args` are added to the queue's declaration (besides an expiry for leftovers).
    async fn new(tag: &str, queue_args: &[(&str, AMQPValue)]) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = QueueOptions::new(dir.path().join("data"));
        opts.segment_bytes = 1 << 20;
        opts.max_bytes = 64 << 20;
        let (queue, _) = Queue::open(opts.clone()).unwrap();
        let dead = DeadLetters::open(&opts).unwrap();
        let exchange = unique(&format!("gw-fault-{tag}-x"));
        let qname = unique(&format!("gw-fault-{tag}-q"));
        let routes = Arc::new(Routes::new(vec![RouteConfig {
            filter: "devices/#".into(),
            uplinks: vec![UPLINK.into()],
            payload: PayloadMode::Raw,
        }]));
        let conn = Connection::connect(DIRECT_URL, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        // Auto-delete: it goes when its queue does.
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
        // A queue left behind by a test that died disappears after 5 minutes unused.
        args.insert("x-expires".into(), AMQPValue::LongInt(300_000));
        for (k, v) in queue_args {
            args.insert(ShortString::from(*k), v.clone());
        }
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
            opts,
            queue,
            dead,
            routes,
            exchange,
            qname,
            conn,
            ch,
            expected: Vec::new(),
            next_index: HashMap::new(),
        }
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

    fn spawn(&self, cfg: AmqpConfig) -> Forwarder {
        forwarder_rig::spawn(
            UplinkConfig::Amqp(cfg),
            "faultgw",
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

    /// Takes every message now in the queue: (device_id, gateway_seq) in arrival order. Call it
    /// once the cursor has reached the last record: every confirmed message is then enqueued.
    async fn drain(&self) -> Vec<(String, u64)> {
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
            assert_eq!(
                d.properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_string()),
                Some(format!("faultgw-{seq}")),
                "stable message id"
            );
            got.push((device, seq));
        }
        got
    }

    /// Deletes the queue and the exchange, closes the queue and the dead letters.
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
        tokio::task::block_in_place(|| {
            self.dead.close();
            self.queue.close();
        });
    }
}

/// How many publishes on channel 1, counted from the first, a server-to-client AMQP 0-9-1 byte
/// stream confirmed (`basic.ack`, single or `multiple`): the contiguous prefix of delivery tags.
fn confirmed_prefix(bytes: &[u8]) -> u64 {
    let mut through = 0u64;
    let mut single = BTreeSet::new();
    let mut i = 0;
    while i + 7 <= bytes.len() {
        let kind = bytes[i];
        let channel = u16::from_be_bytes([bytes[i + 1], bytes[i + 2]]);
        let size = u32::from_be_bytes(bytes[i + 3..i + 7].try_into().unwrap()) as usize;
        if i + 8 + size > bytes.len() {
            break; // cut off by the reset
        }
        assert_eq!(bytes[i + 7 + size], 0xCE, "frame end at {}", i + 7 + size);
        let p = &bytes[i + 7..i + 7 + size];
        // Method frame, basic (60) .ack (80): delivery-tag u64, flags (bit 0: multiple).
        if kind == 1 && channel == 1 && size >= 13 && p[..4] == [0, 60, 0, 80] {
            let tag = u64::from_be_bytes(p[4..12].try_into().unwrap());
            if p[12] & 1 == 1 {
                through = through.max(tag);
            } else {
                single.insert(tag);
            }
        }
        i += 8 + size;
    }
    while single.remove(&(through + 1)) {
        through += 1;
    }
    through
}

fn header<'a>(r: &'a Record, k: &str) -> &'a str {
    r.user_properties
        .iter()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("dead letter without {k}: {:?}", r.user_properties))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refused_backs_off_keeps_records_and_drains_them_in_order_when_it_returns() {
    let mut rig = Rig::new("refused", &[]).await;
    let proxy = FaultProxy::start(broker()).await.unwrap();
    proxy.set_mode(Mode::Refuse);
    rig.append(50).await;
    let f = rig.spawn(uplink(&proxied_url(&proxy), &rig.exchange));
    // Two seconds of refusals from the forwarder's start (not the test's: the rig's set-up
    // takes a varying share of any fixed budget on a loaded machine).
    let spawned = Instant::now();
    let log = StateLog::start(f.stats.clone());
    eventually(
        Duration::from_secs(5),
        || log.seen(UplinkState::BackingOff),
        || format!("never backing off: {:?}", log.history()),
    )
    .await;
    // Records keep accumulating while the upstream is down.
    let last = rig.append(50).await;
    tokio::time::sleep_until(spawned + Duration::from_secs(2)).await;
    assert_eq!(f.sent(), 0);
    assert!(!log.seen(UplinkState::Connected), "{:?}", log.history());
    let c = rig
        .queue
        .stats()
        .cursors
        .into_iter()
        .find(|c| c.name == UPLINK)
        .unwrap();
    assert_eq!(c.lag_records, 300, "all records wait: {c:?}");
    let tries = proxy.refused();
    // Exponential backoff from 50 ms: a few tries, not a hot loop (and not a give-up).
    assert!((3..=40).contains(&tries), "{tries} connection attempts");

    proxy.set_mode(Mode::Pass);
    rig.wait_cursor(last, Duration::from_secs(10), &f).await;
    let got = rig.drain().await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(
        dups.is_empty(),
        "nothing was sent before, so no duplicates: {dups:?}"
    );
    assert_eq!(f.stats.state(), UplinkState::Connected);
    assert_eq!(f.confirmed(), 300);
    eprintln!(
        "refused: {tries} refused attempts, states {:?}, {:?}",
        log.history(),
        spawned.elapsed()
    );
    f.stop().await;
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_is_detected_as_stalled_and_everything_is_resent_after_it() {
    let t0 = Instant::now();
    let mut rig = Rig::new("blackhole", &[]).await;
    let proxy = FaultProxy::start(broker()).await.unwrap();
    let mut cfg = uplink(&proxied_url(&proxy), &rig.exchange);
    cfg.confirm_timeout = Duration::from_millis(500);
    cfg.backoff_min = Duration::from_millis(100);
    let f = rig.spawn(cfg);
    let log = StateLog::start(f.stats.clone());
    let before = rig.append(20).await;
    rig.wait_cursor(before, Duration::from_secs(5), &f).await;

    proxy.set_mode(Mode::BlackHole);
    let hole = Instant::now();
    let last = rig.append(40).await;
    eventually(
        Duration::from_secs(3),
        || log.seen(UplinkState::Stalled),
        || format!("never stalled: {:?}", log.history()),
    )
    .await;
    tokio::time::sleep_until(hole + Duration::from_secs(2)).await;
    assert_eq!(rig.cursor(), before, "nothing is confirmed in a black hole");
    proxy.set_mode(Mode::Pass);

    rig.wait_cursor(last, Duration::from_secs(10), &f).await;
    let got = rig.drain().await;
    let dups = check_delivery(&rig.expected, &got);
    // What went into the hole never reached the broker.
    assert!(dups.is_empty(), "{dups:?}");
    eprintln!(
        "black hole: states {:?}, {} connections ({} black-holed), {:?}",
        log.history(),
        proxy.accepted(),
        proxy.black_holed(),
        t0.elapsed()
    );
    f.stop().await;
    rig.finish().await;
}

/// The "connected but stalled" half of the black hole: the established connection stops
/// answering, and the path is healthy again by the time the forwarder reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connection_is_dropped_and_unconfirmed_records_are_sent_again() {
    let t0 = Instant::now();
    let mut rig = Rig::new("stalled", &[]).await;
    let proxy = FaultProxy::start(broker()).await.unwrap();
    let mut cfg = uplink(&proxied_url(&proxy), &rig.exchange);
    cfg.confirm_timeout = Duration::from_millis(500);
    // Time for the test to heal the path between "stalled" and the reconnect.
    cfg.backoff_min = Duration::from_millis(400);
    cfg.backoff_max = Duration::from_secs(1);
    let f = rig.spawn(cfg);
    let log = StateLog::start(f.stats.clone());
    let before = rig.append(20).await;
    rig.wait_cursor(before, Duration::from_secs(5), &f).await;
    let sent_before = f.sent();

    proxy.set_mode(Mode::BlackHole);
    let last = rig.append(40).await;
    eventually(
        Duration::from_secs(3),
        || f.stats.state() == UplinkState::Stalled,
        || format!("never stalled: {:?}", log.history()),
    )
    .await;
    assert_eq!(rig.cursor(), before, "nothing is confirmed while stalled");
    proxy.set_mode(Mode::Pass);

    rig.wait_cursor(last, Duration::from_secs(10), &f).await;
    let got = rig.drain().await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(
        dups.is_empty(),
        "the stalled batch never reached the broker: {dups:?}"
    );
    assert!(
        f.sent() - sent_before > 120,
        "the stalled batch was sent again: {} sent after the stall",
        f.sent() - sent_before
    );
    assert!(proxy.accepted() >= 2, "a new connection was made");
    eprintln!("stalled: states {:?}, {:?}", log.history(), t0.elapsed());
    f.stop().await;
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_mid_batch_loses_nothing_and_duplicates_at_most_a_window() {
    let t0 = Instant::now();
    let mut rig = Rig::new("reset", &[]).await;
    let proxy = FaultProxy::start(broker()).await.unwrap();
    let last = rig.append(100).await;
    // The handshake is well under 1 KiB and each publish about 300 bytes: the reset comes a few
    // dozen messages into the first window of 64.
    proxy.set_mode(Mode::ResetAfter(8_000));
    let mut cfg = uplink(&proxied_url(&proxy), &rig.exchange);
    cfg.window = 64;
    cfg.backoff_min = Duration::from_millis(100);
    let window = cfg.window;
    let f = rig.spawn(cfg);
    eventually(
        Duration::from_secs(5),
        || proxy.resets() >= 1,
        || "no reset".into(),
    )
    .await;
    proxy.set_mode(Mode::Pass);

    rig.wait_cursor(last, Duration::from_secs(10), &f).await;
    let got = rig.drain().await;
    let dups = check_delivery(&rig.expected, &got);
    // Each reset can re-send at most the window it cut (usually there is one reset; a loaded
    // machine may let the forwarder reconnect into a second before the proxy passes again).
    let resets = proxy.resets() as usize;
    assert!(
        dups.len() <= window * resets,
        "{} duplicates, more than a window ({window}) per reset ({resets}): {dups:?}",
        dups.len()
    );
    assert!(f.sent() > 300, "the interrupted batch was sent again");
    assert_eq!(f.confirmed(), 300, "each record counted as confirmed once");
    eprintln!(
        "reset: {} resets, {} duplicates, {} sent, {:?}",
        proxy.resets(),
        dups.len(),
        f.sent(),
        t0.elapsed()
    );
    f.stop().await;
    rig.finish().await;
}

/// The stricter half of "duplicates only for records whose confirm was lost": the path to the
/// broker dies mid-batch, the confirms of what got through still reach the gateway, then the
/// connection is reset. Those confirmed records must not be sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_confirmed_before_a_connection_dies_are_not_sent_again() {
    let t0 = Instant::now();
    let mut rig = Rig::new("acked", &[]).await;
    let proxy = FaultProxy::start(broker()).await.unwrap();
    proxy.capture_to_clients(true);
    let last = rig.append(100).await;
    proxy.set_mode(Mode::HalfDeadAfter(8_000, Duration::from_millis(300)));
    let mut cfg = uplink(&proxied_url(&proxy), &rig.exchange);
    cfg.window = 64;
    cfg.backoff_min = Duration::from_millis(100);
    let window = cfg.window;
    let f = rig.spawn(cfg);
    eventually(
        Duration::from_secs(5),
        || proxy.resets() >= 1,
        || "no reset".into(),
    )
    .await;
    proxy.set_mode(Mode::Pass);

    rig.wait_cursor(last, Duration::from_secs(10), &f).await;
    let got = rig.drain().await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(dups.len() <= window, "{dups:?}");
    // The first connection carried one batch: delivery tag k is the k-th record appended.
    let k = confirmed_prefix(&proxy.captured_to_clients()[0]) as usize;
    assert!(
        k > 0,
        "no confirm reached the gateway before the reset: inconclusive"
    );
    let confirmed_through = rig.expected[k - 1].1;
    let resent: Vec<u64> = dups
        .iter()
        .copied()
        .filter(|&s| s <= confirmed_through)
        .collect();
    eprintln!(
        "acked: {k} confirms reached the gateway before the reset, {} duplicates, {} of them \
         confirmed ones, {:?}",
        dups.len(),
        resent.len(),
        t0.elapsed()
    );
    assert!(
        resent.is_empty(),
        "{} of the {k} records whose confirm had reached the gateway were sent again: {resent:?}",
        resent.len()
    );
    f.stop().await;
    rig.finish().await;
}

/// A connection that dies while the forwarder has nothing to send; the next records arrive.
/// Returns the forwarder and the proxy after checking the delivery.
async fn cut_while_idle(rig: &mut Rig) -> (Forwarder, FaultProxy) {
    let proxy = FaultProxy::start(broker()).await.unwrap();
    let f = rig.spawn(uplink(&proxied_url(&proxy), &rig.exchange));
    let first = rig.append(10).await;
    rig.wait_cursor(first, Duration::from_secs(5), &f).await;
    proxy.cut_all();
    eventually(
        Duration::from_secs(2),
        || proxy.active() == 0,
        || "the cut connection is still open".into(),
    )
    .await;
    let last = rig.append(10).await;
    rig.wait_cursor(last, Duration::from_secs(10), &f).await;
    let got = rig.drain().await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(dups.is_empty(), "{dups:?}");
    assert_eq!(proxy.cut(), 1);
    assert_eq!(proxy.accepted(), 2, "one new connection");
    assert_eq!(f.stats.state(), UplinkState::Connected);
    (f, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_while_idle_is_remade_at_the_next_send_and_loses_nothing() {
    let mut rig = Rig::new("cut", &[]).await;
    let (f, _proxy) = cut_while_idle(&mut rig).await;
    f.stop().await;
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_after_a_lost_connection_is_counted() {
    let mut rig = Rig::new("recount", &[]).await;
    let (f, _proxy) = cut_while_idle(&mut rig).await;
    assert_eq!(f.reconnects(), 1, "one reconnect after the cut");
    f.stop().await;
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_nacks_are_retried_then_dead_lettered_never_counted_as_confirmed() {
    let t0 = Instant::now();
    const LIMIT: usize = 5;
    let mut rig = Rig::new(
        "nack",
        &[
            ("x-max-length", AMQPValue::LongInt(LIMIT as i32)),
            (
                "x-overflow",
                AMQPValue::LongString(LongString::from("reject-publish")),
            ),
        ],
    )
    .await;
    let last = rig.append(7).await;
    let total = rig.expected.len();
    let over = total - LIMIT;
    let cfg = uplink(DIRECT_URL, &rig.exchange);
    let max_retries = cfg.max_retries as usize;
    let f = rig.spawn(cfg);
    rig.wait_cursor(last, Duration::from_secs(10), &f).await;

    assert_eq!(f.confirmed(), LIMIT as u64, "only what the queue took");
    assert_eq!(
        f.nacked(),
        (over * (max_retries + 1)) as u64,
        "each refused record: tried once, retried max_retries times"
    );
    assert_eq!(f.stats.dead_lettered.load(Ordering::Relaxed), over as u64);
    assert_eq!(f.stats.returned.load(Ordering::Relaxed), 0);
    assert_eq!(rig.dead.count(), over as u64);

    // The queue holds the first LIMIT records; the dead letters hold the rest, in order, with the
    // reason; together they are everything that was appended.
    let got = rig.drain().await;
    assert_eq!(got.len(), LIMIT);
    let dups = check_delivery(&rig.expected[..LIMIT], &got);
    assert!(dups.is_empty(), "{dups:?}");
    let letters = tokio::task::block_in_place(|| {
        let mut r = rig.dead.queue().reader("check").unwrap();
        r.read_now(1000, usize::MAX).unwrap()
    });
    let dead: Vec<(String, u64)> = letters
        .iter()
        .map(|r| {
            let reason = header(r, "x-dead-letter-reason");
            assert!(reason.contains("nack"), "{reason}");
            assert_eq!(header(r, "x-dead-letter-uplink"), UPLINK);
            (
                r.device_id.clone(),
                header(r, "x-original-seq").parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(dead, rig.expected[LIMIT..].to_vec());
    eprintln!(
        "nack: {} confirmed, {} nacks, {} dead letters, reason {:?}, {:?}",
        f.confirmed(),
        f.nacked(),
        rig.dead.count(),
        header(&letters[0], "x-dead-letter-reason"),
        t0.elapsed()
    );
    f.stop().await;
    rig.finish().await;
}

/// A restart with a backlog: forwarder A forwards part of it and stops (cleanly through its
/// token, or `crash`: aborted mid-batch); the queue is closed and opened again on the same data
/// dir, more records come in, and forwarder B resumes from the persisted cursor.
async fn restart_resumes_from_the_persisted_cursor(crash: bool) {
    let t0 = Instant::now();
    let mut rig = Rig::new(if crash { "crash" } else { "restart" }, &[]).await;
    rig.append(400).await;
    let cfg = uplink(DIRECT_URL, &rig.exchange);
    let window = cfg.window;
    // A is paced (a window of 32 at once, then 100 records/s) so that it is still forwarding
    // when the test stops it, however late a loaded machine lets the test look; B is not.
    let mut a_cfg = cfg.clone();
    a_cfg.max_rate = Some(100);
    let a = rig.spawn(a_cfg);
    let a_stats = a.stats.clone();
    eventually(
        Duration::from_secs(10),
        || a.confirmed() >= 96,
        || format!("A confirmed only {}", a.confirmed()),
    )
    .await;
    if crash {
        a.handle.abort();
        let _ = a.handle.await;
    } else {
        a.stop().await;
    }
    // What A had confirmed; an aborted A may not have persisted the last of it (its cursor
    // write runs beside the sending: one write in flight, lost with the crash).
    let a_confirmed = rig.cursor();
    assert!(
        a_confirmed < rig.last(),
        "A forwarded everything before it stopped: the test proves nothing"
    );
    assert!(
        a_confirmed >= rig.expected[0].1 + 95,
        "A confirmed, so its cursor moved"
    );

    // Restart: close everything and open the same data dir again.
    let rig_opts = rig.opts.clone();
    tokio::task::block_in_place(|| {
        rig.dead.close();
        rig.queue.close();
        let (queue, report) = Queue::open(rig_opts.clone()).unwrap();
        assert_eq!(report.truncated_bytes, 0);
        rig.queue = queue;
        rig.dead = DeadLetters::open(&rig_opts).unwrap();
    });
    let a_cursor = rig.cursor();
    if crash {
        assert!(
            a_cursor <= a_confirmed && a_cursor + window as u64 >= a_confirmed,
            "the persisted cursor ({a_cursor}) is at most a window behind what A confirmed ({a_confirmed}), never ahead"
        );
    } else {
        assert_eq!(a_cursor, a_confirmed, "a clean stop persists the cursor");
    }
    rig.append(20).await;
    let last = rig.last();
    let remaining = rig.expected.iter().filter(|(_, s)| *s > a_cursor).count();

    let b = rig.spawn(cfg);
    rig.wait_cursor(last, Duration::from_secs(10), &b).await;
    let got = rig.drain().await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(
        dups.iter().all(|&s| s > a_cursor),
        "records at or before the persisted cursor {a_cursor} were sent again: {dups:?}"
    );
    assert!(
        dups.len() <= window,
        "{} duplicates, more than a window: {dups:?}",
        dups.len()
    );
    assert!(
        b.sent() as usize <= remaining + window,
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

/// A cluster (`urls`): the first node refuses, so the forwarder moves on to the second and
/// delivers there, showing it as its node; when that one dies and the first returns, it moves
/// back. Nothing is lost and the order holds across the moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_uplink_fails_over_to_the_next_node_and_shows_which_one_it_uses() {
    let mut rig = Rig::new("failover", &[]).await;
    let a = FaultProxy::start(broker()).await.unwrap();
    let b = FaultProxy::start(broker()).await.unwrap();
    a.set_mode(Mode::Refuse);
    let mut cfg = uplink("", &rig.exchange);
    cfg.url = String::new();
    cfg.urls = vec![proxied_url(&a), proxied_url(&b)];
    let first = rig.append(20).await;
    let f = rig.spawn(cfg);
    rig.wait_cursor(first, Duration::from_secs(10), &f).await;
    assert!(a.refused() >= 1, "node a was tried first");
    let node = f.stats.node();
    assert!(
        node.contains(&format!(":{}/", b.port())) && !node.contains("guest:guest"),
        "the node in use, without its password: {node}"
    );

    // Node b dies (its connections reset, new ones refused); node a is back.
    b.set_mode(Mode::Refuse);
    a.set_mode(Mode::Pass);
    b.cut_all();
    let last = rig.append(20).await;
    rig.wait_cursor(last, Duration::from_secs(10), &f).await;
    let node = f.stats.node();
    assert!(node.contains(&format!(":{}/", a.port())), "{node}");
    let got = rig.drain().await;
    let dups = check_delivery(&rig.expected, &got);
    assert!(dups.is_empty(), "{dups:?}");
    f.stop().await;
    rig.finish().await;
}

/// A long, thin link (200 ms round trip, 1 Mbit/s each way) through the three faults a WAN
/// uplink sees, one after the other while a backlog drains: an outage (connections reset, new
/// ones refused, for a second), a reset in the middle of the window, and a black hole (detected
/// as a stall). Nothing is missing, each device's order holds, and the duplicates stay within
/// one window per fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shaped_link_outage_reset_and_black_hole_lose_nothing_and_keep_order() {
    let t0 = Instant::now();
    let mut rig = Rig::new("shaped", &[]).await;
    let link = Link::rtt(Duration::from_millis(200)).capped(1000);
    let proxy = FaultProxy::start_shaped(broker(), link).await.unwrap();
    let mut cfg = uplink(&proxied_url(&proxy), &rig.exchange);
    cfg.window = 128;
    cfg.confirm_timeout = Duration::from_secs(2);
    cfg.backoff_min = Duration::from_millis(100);
    let window = cfg.window as u64;
    rig.append(300).await;
    let f = rig.spawn(cfg);
    let log = StateLog::start(f.stats.clone());
    let progress = |rig: &Rig, n: u64| {
        let target = rig.cursor() + n;
        move |rig: &Rig| rig.cursor() >= target
    };

    // 1. Outage.
    let moved = progress(&rig, 100);
    eventually(
        Duration::from_secs(20),
        || moved(&rig),
        || "no progress before the outage".into(),
    )
    .await;
    proxy.set_mode(Mode::Refuse);
    proxy.cut_all();
    rig.append(100).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set_mode(Mode::Pass);

    // 2. A reset in the middle of the window (about 60 messages into it).
    let moved = progress(&rig, 100);
    eventually(
        Duration::from_secs(20),
        || moved(&rig),
        || "no progress after the outage".into(),
    )
    .await;
    proxy.set_mode(Mode::ResetAfter(20_000));
    eventually(
        Duration::from_secs(20),
        || proxy.resets() >= 1,
        || "no reset".into(),
    )
    .await;
    proxy.set_mode(Mode::Pass);

    // 3. A black hole, until the forwarder calls the link stalled.
    let moved = progress(&rig, 100);
    eventually(
        Duration::from_secs(20),
        || moved(&rig),
        || "no progress after the reset".into(),
    )
    .await;
    let hole = Instant::now();
    proxy.set_mode(Mode::BlackHole);
    eventually(
        Duration::from_secs(10),
        || log.seen_after(UplinkState::Stalled, hole).is_some(),
        || format!("never stalled: {:?}", log.history()),
    )
    .await;
    proxy.set_mode(Mode::Pass);

    rig.append(100).await;
    rig.wait_cursor(rig.last(), Duration::from_secs(60), &f)
        .await;
    let got = rig.drain().await;
    let dups = check_delivery(&rig.expected, &got);
    let faults = 1 + proxy.resets() + proxy.cut() + 1;
    assert!(
        dups.len() as u64 <= faults * window,
        "{} duplicates, more than a window ({window}) per fault ({faults})",
        dups.len()
    );
    eprintln!(
        "shaped link (200 ms, 1 Mbit/s): {} records, {} duplicates, {} resets, {} cut, states {:?}, {:?}",
        rig.expected.len(),
        dups.len(),
        proxy.resets(),
        proxy.cut(),
        log.history(),
        t0.elapsed()
    );
    f.stop().await;
    rig.finish().await;
}
