//! The end-to-end fault suite (issue 7): a `firmware-sim` fleet publishes QoS 1 over mutual TLS
//! to the real `gateway` binary, whose AMQP uplink reaches the real RabbitMQ through a
//! fault-injecting proxy; each scenario breaks something an edge site really sees, and ends with
//! the verifier: every acknowledged reading arrived (or exactly the losses the scenario allows,
//! counted by the gateway), none out of order per device, duplicates counted. Each prints one
//! `FAULT scenario=... acked=... delivered=... missing=... duplicates=... max_latency_ms=...
//! recovery_ms=...` line; tests/README.md says what each figure means and how each scenario
//! defines its recovery time.
//!
//! `GATEWAY_SOAK=1` turns the CI sizes into the soak sizes (100 crash rounds, 10-minute outages,
//! 1,000 devices). `FAULT_SEED` repeats the random kill moments of a run.
#![allow(clippy::unwrap_used)]

#[path = "../../gateway/tests/fault_proxy/mod.rs"]
mod fault_proxy;
#[allow(dead_code)]
#[path = "../../gateway/tests/ingest_support/raw.rs"]
mod raw;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fault_proxy::{FaultProxy, Mode};
use gateway::queue::inspect::Inspector;
use gateway_tests::faults::{
    assert_delivery, merge_manifests, pick, tail, verify, wait_until, Figures, Fleet, FleetSpec,
    Gateway, GatewaySpec, Rng, Tap, Upstream, RABBIT_PORT,
};
use lapin::types::{AMQPValue, LongString};
use raw::{Connect, Publish, RecvError};
use tokio::io::AsyncWriteExt;

fn rabbit() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], RABBIT_PORT))
}

async fn proxy() -> FaultProxy {
    FaultProxy::start(rabbit()).await.unwrap()
}

/// Waits until the tap has seen `n` messages (the path device -> upstream works).
async fn until_flowing(tap: &Tap, n: u64) {
    wait_until(
        Duration::from_secs(30),
        "the first messages upstream",
        || tap.stats().received >= n,
    )
    .await
    .unwrap();
}

/// Waits until the uplink has confirmed everything in the queue and nothing more comes in.
async fn drained(gw: &Gateway) {
    gw.drained().await;
}

// ---------------------------------------------------------------------------------------------
// 1, 2: the uplink goes away
// ---------------------------------------------------------------------------------------------

/// The uplink is cut (`refuse`: connections reset at once) or swallowed (`black hole`) for the
/// outage; devices keep publishing into the queue meanwhile; afterwards the backlog drains while
/// live traffic continues. Recovery: from the end of the outage until the uplink confirmed every
/// record that was in the queue at that moment.
async fn uplink_outage(scenario: &str, mode: Mode) {
    let devices = pick(50, 1000);
    let rate = pick(2.0, 0.5);
    let outage = Duration::from_secs(pick(30, 600));
    let up = Upstream::new(scenario, &[]).await;
    let proxy = proxy().await;
    let mut gw = Gateway::new(GatewaySpec::new(devices, proxy.port(), &up.exchange));
    gw.start().await;
    let tap = Tap::start(&up.tap_queue).await;
    let fleet = Fleet::start(&gw, &FleetSpec::new(devices, rate), "fleet");
    let t = Instant::now();
    until_flowing(&tap, devices as u64).await;
    eprintln!("{scenario}: flowing after {:?}", t.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;

    proxy.set_mode(mode);
    if mode == Mode::Refuse {
        proxy.cut_all();
    }
    let fault_start = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (acked_early, seq_early) = (gw.cursor().unwrap().acked, gw.last_seq());
    let rest = outage.saturating_sub(fault_start.elapsed());
    tokio::time::sleep(rest).await;
    let (acked_late, seq_late) = (gw.cursor().unwrap().acked, gw.last_seq());
    proxy.set_mode(Mode::Pass);
    let recovery = gw.wait_forwarded(seq_late, Duration::from_secs(300)).await;
    eprintln!("{scenario}: outage over after {:?}", fault_start.elapsed());
    let reconnects = match gw.metrics().await {
        Some(m) => m.get("gateway_uplink_reconnects_total"),
        None => None,
    };

    // Live traffic on top of the drained backlog, then the end.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = Instant::now();
    let run = fleet.stop(Duration::from_secs(60)).await;
    let stopped = t.elapsed();
    drained(&gw).await;
    let v = verify(&run.manifest, &up.queue, 60, 2).await;
    eprintln!(
        "{scenario}: fleet stop {stopped:?}, drain + verify {:?}",
        t.elapsed() - stopped
    );
    let tap = tap.stop().await;
    Figures::new(scenario, &v, &tap, recovery).print();
    up.cleanup().await;

    assert_delivery(&v, 0);
    assert_eq!(
        acked_early, acked_late,
        "nothing may be confirmed through a dead uplink"
    );
    let live = (devices as f64 * rate * 0.5 * (outage.as_secs() - 5) as f64) as u64;
    assert!(
        seq_late - seq_early >= live,
        "devices kept publishing into the queue during the outage: {} records, expected >= {live}",
        seq_late - seq_early
    );
    assert_eq!(
        run.get("connection_losses"),
        0,
        "an uplink outage must not touch device connections: {}",
        run.summary
    );
    if let Some(n) = reconnects {
        assert!(n >= 1.0, "the uplink's reconnect was counted");
    }
    match mode {
        Mode::Refuse => assert!(proxy.refused() > 0, "the gateway kept trying to reconnect"),
        Mode::BlackHole => assert!(
            proxy.black_holed() > 0,
            "the gateway noticed the stall and reconnected (into the hole)"
        ),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s01_uplink_outage_backlog_drains_while_live_traffic_continues() {
    uplink_outage("1-uplink-outage", Mode::Refuse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s02_black_holed_uplink_is_detected_reconnected_and_resent() {
    uplink_outage("2-black-hole", Mode::BlackHole).await;
}

// ---------------------------------------------------------------------------------------------
// 3, 4: the gateway crashes
// ---------------------------------------------------------------------------------------------

/// SIGKILL at random moments under load, restart on the same data dir. Recovery: the longest,
/// over the rounds, from the kill until the restarted gateway had forwarded everything the dead
/// one had stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s03_gateway_killed_at_random_moments_under_load_loses_nothing_acknowledged() {
    let scenario = "3-gateway-crash";
    let rounds = pick(10, 100);
    let devices = pick(20, 1000);
    let rate = pick(5.0, 0.5);
    let mut rng = Rng::from_env(scenario);
    let up = Upstream::new("crash", &[]).await;
    let proxy = proxy().await;
    let mut gw = Gateway::new(GatewaySpec::new(devices, proxy.port(), &up.exchange));
    gw.start().await;
    let tap = Tap::start(&up.tap_queue).await;
    let fleet = Fleet::start(&gw, &FleetSpec::new(devices, rate), "fleet");
    until_flowing(&tap, devices as u64).await;

    let mut recovery = Duration::ZERO;
    for _ in 0..rounds {
        tokio::time::sleep(rng.millis(200, 2500)).await;
        gw.kill();
        let killed = Instant::now();
        let stored = gw.last_seq();
        let persisted = gw.cursor().map_or(0, |c| c.acked);
        gw.start().await;
        let after = gw.cursor().map_or(0, |c| c.acked);
        assert!(
            after >= persisted,
            "the cursor went back: {persisted} -> {after}"
        );
        gw.wait_forwarded(stored, Duration::from_secs(120)).await;
        recovery = recovery.max(killed.elapsed());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let run = fleet.stop(Duration::from_secs(60)).await;
    drained(&gw).await;
    let v = verify(&run.manifest, &up.queue, 60, 2).await;
    let tap = tap.stop().await;
    Figures::new(scenario, &v, &tap, recovery).print();
    up.cleanup().await;

    assert_delivery(&v, 0);
    assert!(
        run.get("reconnects") >= devices as u64,
        "devices reconnected after the kills: {}",
        run.summary
    );
    assert_eq!(
        gw.all_logs().matches("queue ready").count(),
        rounds + 1,
        "one recovery per start"
    );
}

/// A large backlog (uplink refused while the fleet publishes flat out), then the uplink returns
/// and the gateway is SIGKILLed several times while it drains. Nothing may be missing, and each
/// crash may re-send at most one confirm window. Recovery: from the last restart until the
/// backlog was drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s04_crash_during_backlog_drain_resumes_from_the_cursor_within_the_confirm_window() {
    let scenario = "4-crash-during-drain";
    let window = 256u64;
    let devices = pick(50, 1000);
    let per_device = pick(300, 100);
    let crashes = pick(3u64, 20);
    let mut rng = Rng::from_env(scenario);
    let up = Upstream::new("drain", &[]).await;
    let proxy = proxy().await;
    proxy.set_mode(Mode::Refuse);
    let mut spec = GatewaySpec::new(devices, proxy.port(), &up.exchange);
    // A paced drain: the kills land in the middle of it, not after it.
    spec.uplink = format!("window = {window}\nmax_rate = 3000\n");
    let mut gw = Gateway::new(spec);
    gw.start().await;
    let tap = Tap::start(&up.tap_queue).await;
    let mut fs = FleetSpec::new(devices, 0.0);
    fs.count_per_device = Some(per_device);
    let run = Fleet::start(&gw, &fs, "fleet")
        .wait(Duration::from_secs(300))
        .await;
    assert_eq!(
        run.get("acked"),
        devices as u64 * per_device,
        "{}",
        run.summary
    );
    let stats = gw.stats().unwrap();
    let (first, last) = (stats.first_seq.unwrap(), stats.last_seq.unwrap());
    assert_eq!(
        gw.cursor().map_or(0, |c| c.acked),
        0,
        "nothing forwarded yet"
    );

    proxy.set_mode(Mode::Pass);
    let span = last - first;
    let mut restarted = Instant::now();
    for i in 1..=crashes {
        let base = first + span * i / (crashes + 1);
        let target = base + rng.range(0, span / (crashes + 1) / 2);
        wait_until(
            Duration::from_secs(120),
            "the drain to reach the kill point",
            || gw.cursor().is_some_and(|c| c.acked >= target),
        )
        .await
        .unwrap();
        gw.kill();
        let persisted = gw.cursor().unwrap().acked;
        assert!(persisted < last, "killed after the drain ended");
        gw.start().await;
        restarted = Instant::now();
        let resumed = gw.cursor().unwrap().acked;
        assert!(
            resumed >= persisted,
            "cursor went back: {persisted} -> {resumed}"
        );
    }
    gw.wait_forwarded(last, Duration::from_secs(300)).await;
    let recovery = restarted.elapsed();
    let v = verify(&run.manifest, &up.queue, 60, 2).await;
    let tap = tap.stop().await;
    Figures::new(scenario, &v, &tap, recovery).print();
    up.cleanup().await;

    assert_delivery(&v, 0);
    assert!(
        v.total("duplicates") <= crashes * window,
        "{} duplicates after {crashes} crashes: more than a confirm window ({window}) each",
        v.total("duplicates")
    );
}

// ---------------------------------------------------------------------------------------------
// 5, 6: the queue is full
// ---------------------------------------------------------------------------------------------

const SMALL_QUEUE: u64 = 256 << 10;

fn small_queue(policy: &str) -> String {
    format!("segment_bytes = \"64 KiB\"\nmax_bytes = {SMALL_QUEUE}\nfull_policy = \"{policy}\"\n")
}

/// Backpressure: a small queue and no uplink; 3.1.1 devices are held back (no PUBACK, their
/// outboxes fill), MQTT 5 devices get "quota exceeded" and resend; the queue never grows past
/// `max_bytes`; when the uplink returns everything drains, nothing lost. Recovery: from the
/// uplink's return until the full queue was forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s05_full_queue_under_backpressure_holds_devices_back_and_loses_nothing() {
    let scenario = "5-queue-full-backpressure";
    let (v3_devices, v5_devices) = (pick(20, 500), pick(10, 500));
    let up = Upstream::new("backpressure", &[]).await;
    let proxy = proxy().await;
    proxy.set_mode(Mode::Refuse);
    let mut spec = GatewaySpec::new(v3_devices, proxy.port(), &up.exchange);
    spec.more_devices = vec![("mq5-".into(), v5_devices)];
    spec.queue = small_queue("backpressure");
    spec.extra = "[limits]\nquota_wait = \"1s\"\n".into();
    let mut gw = Gateway::new(spec);
    gw.start().await;
    let tap = Tap::start(&up.tap_queue).await;
    let v3 = Fleet::start(&gw, &FleetSpec::new(v3_devices, 5.0), "v3");
    let mut s5 = FleetSpec::new(v5_devices, 5.0);
    s5.id_prefix = "mq5-".into();
    s5.mqtt5 = true;
    s5.outbox = Some(1); // strict order across refusals
    let v5 = Fleet::start(&gw, &s5, "v5");

    // Full: nothing appended for 2 s (the uplink is down, so nothing frees space).
    let mut seen = (0, Instant::now());
    wait_until(Duration::from_secs(90), "the queue to fill", || {
        let last = gw.last_seq();
        if last != seen.0 {
            seen = (last, Instant::now());
        }
        last > 0 && seen.1.elapsed() >= Duration::from_secs(2)
    })
    .await
    .unwrap();
    let hold = Duration::from_secs(pick(10, 120));
    let t = Instant::now();
    let mut max_bytes = 0;
    let seq_full = gw.last_seq();
    while t.elapsed() < hold {
        max_bytes = max_bytes.max(gw.stats().unwrap().bytes);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seq_still = gw.last_seq();
    let quota = match gw.metrics().await {
        Some(m) => m
            .series
            .get("gateway_refusals_total{reason=\"quota\"}")
            .copied(),
        None => None,
    };
    proxy.set_mode(Mode::Pass);
    let recovery = gw.wait_forwarded(seq_still, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (r3, r5) = tokio::join!(
        v3.stop(Duration::from_secs(60)),
        v5.stop(Duration::from_secs(60))
    );
    drained(&gw).await;
    let merged = merge_manifests(
        &[&r3.manifest, &r5.manifest],
        &gw.dir.path().join("merged.json"),
    );
    let v = verify(&merged, &up.queue, 60, 2).await;
    let tap = tap.stop().await;
    Figures::new(scenario, &v, &tap, recovery).print();
    up.cleanup().await;

    assert_delivery(&v, 0);
    assert!(
        max_bytes <= SMALL_QUEUE,
        "the queue grew to {max_bytes} bytes, past max_bytes {SMALL_QUEUE}"
    );
    assert!(
        max_bytes >= SMALL_QUEUE / 2,
        "the queue filled up: {max_bytes} bytes"
    );
    assert_eq!(
        seq_still, seq_full,
        "nothing may be appended while the queue is full and nothing drains"
    );
    assert!(
        r3.get("blocked") > 0,
        "3.1.1 devices were held back (readings skipped while their outbox was full): {}",
        r3.summary
    );
    assert!(
        r5.get("refused") > 0,
        "MQTT 5 devices were told quota exceeded: {}",
        r5.summary
    );
    if let Some(q) = quota {
        assert!(q >= 1.0, "quota refusals counted by the gateway");
    }
}

/// Drop-oldest: a small queue and no uplink; the queue drops whole old segments to make room.
/// The verifier's missing readings are exactly the gateway's dropped-records count (the uplink
/// cursor's in `gateway queue stats`, and `gateway_queue_dropped_records_total` when the admin
/// endpoint serves it), and for every device they are older than everything of that device the
/// queue kept. Recovery: from the uplink's return until the queue was forwarded.
///
/// The uplink is down from the start: a record in flight when an uplink dies may have reached
/// the broker unconfirmed, and if drop-oldest then drops it, it is counted as dropped although
/// it arrived (at-least-once cannot know); that would make "exactly" a matter of luck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s06_full_queue_under_drop_oldest_loses_exactly_the_counted_oldest_records() {
    drop_oldest(false).await;
}

/// Drop-oldest after the uplink had forwarded part of the oldest segment: the dropped-records
/// metric counts only the records lost, like the cursor does, not those every uplink had
/// already confirmed (it did once: fixed in `State::drop_front`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s06_dropped_records_metric_counts_only_records_lost() {
    drop_oldest(true).await;
}

/// `forward_first`: the uplink works at first and dies in the middle of the run.
async fn drop_oldest(forward_first: bool) {
    let scenario = "6-queue-full-drop-oldest";
    let devices = pick(20, 1000);
    let up = Upstream::new("dropoldest", &[]).await;
    let proxy = proxy().await;
    let mut spec = GatewaySpec::new(devices, proxy.port(), &up.exchange);
    spec.queue = small_queue("drop-oldest");
    if !forward_first {
        proxy.set_mode(Mode::Refuse);
    }
    let mut gw = Gateway::new(spec);
    gw.start().await;
    let tap = Tap::start(&up.tap_queue).await;
    let fleet = Fleet::start(&gw, &FleetSpec::new(devices, pick(10.0, 1.0)), "fleet");
    if forward_first {
        until_flowing(&tap, devices as u64).await;
        proxy.set_mode(Mode::Refuse);
        proxy.cut_all();
    }
    wait_until(Duration::from_secs(120), "drop-oldest to drop", || {
        gw.cursor().is_some_and(|c| c.dropped > 0)
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: cursors {:?}, {} bytes\n{}",
            gw.stats().map(|s| s.cursors),
            gw.stats().map_or(0, |s| s.bytes),
            tail(&gw.log(), 20)
        )
    });
    tokio::time::sleep(Duration::from_secs(pick(3, 60))).await;
    let run = fleet.stop(Duration::from_secs(60)).await;

    // What the queue kept, per device: the oldest kept reading.
    let cursor = gw.cursor().unwrap();
    let insp = Inspector::open(&gw.data_dir).unwrap();
    let mut oldest_kept: BTreeMap<String, u64> = BTreeMap::new();
    for r in insp.records(cursor.acked + 1, usize::MAX).unwrap() {
        if let Ok(t) = firmware_sim::payload::decode(&r.payload) {
            oldest_kept.entry(t.device_id).or_insert(t.seq);
        }
    }
    let last = gw.last_seq();
    proxy.set_mode(Mode::Pass);
    let recovery = gw.wait_forwarded(last, Duration::from_secs(120)).await;
    let dropped = gw.cursor().unwrap().dropped;
    let metric = match gw.metrics().await {
        Some(m) => m.get("gateway_queue_dropped_records_total"),
        None => None,
    };
    let v = verify(&run.manifest, &up.queue, 20, 2).await;
    let tap = tap.stop().await;
    Figures::new(scenario, &v, &tap, recovery).print();
    up.cleanup().await;

    eprintln!("{scenario}: dropped (cursor) {dropped}, metric {metric:?}");
    assert!(dropped > 0);
    assert_eq!(v.total("out_of_order"), 0, "{}", v.brief());
    if forward_first {
        let m = metric.expect("the admin endpoint serves gateway_queue_dropped_records_total");
        assert_eq!(
            m as u64, dropped,
            "gateway_queue_dropped_records_total must count the records lost, as the cursor does"
        );
        // Records in flight at the cut may have arrived although dropped (one window at most).
        assert!(
            v.total("missing") <= dropped && dropped <= v.total("missing") + 256,
            "missing {} vs dropped {dropped}: {}",
            v.total("missing"),
            v.brief()
        );
    } else {
        assert_eq!(
            v.total("missing"),
            dropped,
            "missing must be exactly the dropped-records count: {}",
            v.brief()
        );
        if let Some(m) = metric {
            assert_eq!(m as u64, dropped, "gateway_queue_dropped_records_total");
        }
    }
    for (device, (n, ranges)) in v.missing_by_device() {
        assert!(n > 0);
        let kept = oldest_kept.get(&device).copied().unwrap_or(u64::MAX);
        for (a, b) in ranges {
            assert!(
                a <= b && b < kept,
                "{device}: missing {a}..={b} is not older than the oldest kept reading {kept}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7, 8: the disk
// ---------------------------------------------------------------------------------------------

/// A tmpfs mounted for the test (root needed, as on the development and CI machines); unmounted
/// when dropped, even after a failed assertion.
struct SmallFs {
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Result<SmallFs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mount = dir.path().join("fs");
        std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mount)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallFs { mount, _dir: dir })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mount)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
    }
}

/// Fills the filesystem with `path` until ENOSPC, then gives back `leave` bytes.
fn fill(path: &Path, leave: u64) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 16 << 10];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
        assert!(written < 1 << 30, "the filesystem never filled");
    }
    let _ = f.sync_all();
    let keep = written.saturating_sub(leave);
    f.set_len(keep).unwrap();
    let _ = f.sync_all();
    keep
}

/// Disk full: the data dir is a small tmpfs that ballast fills; appends fail cleanly (the
/// devices get no PUBACK and are held back), the gateway stays up and `gateway queue verify`
/// finds no damage; after the ballast goes, it carries on. Recovery: from freeing the space (and
/// the uplink's return) until everything stored was forwarded.
///
/// Devices keep one publish in flight here (`--outbox 1`); the test below has 16 in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s07_disk_full_fails_appends_cleanly_and_the_gateway_carries_on() {
    disk_full("7-disk-full", 1).await;
}

/// The same with 16 publishes in flight per device. This once broke per-device order: a
/// device's publish N failed with the full disk while its N+1, already in the next batch, was
/// stored, and after the resend upstream saw N+1 before N (about half the runs). Now a failed
/// batch fails the records appended while it was written, and a connection's next append is
/// refused once an earlier one failed (`Queue::try_append_after`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s07_disk_full_keeps_per_device_order_with_publishes_in_flight() {
    disk_full("7-disk-full-inflight", 16).await;
}

async fn disk_full(scenario: &str, outbox: usize) {
    let fs = match SmallFs::mount("4m") {
        Ok(fs) => fs,
        Err(why) => panic!(
            "{scenario}: cannot mount a small tmpfs here ({why}): the disk-full scenarios need \
             root; run the suite with `./run-tests` (the README's test command) as root, as CI does"
        ),
    };
    let devices = pick(20, 200);
    let up = Upstream::new("diskfull", &[]).await;
    let proxy = proxy().await;
    proxy.set_mode(Mode::Refuse);
    let mut spec = GatewaySpec::new(devices, proxy.port(), &up.exchange);
    spec.data_dir = Some(fs.mount.join("data"));
    spec.queue = "segment_bytes = \"64 KiB\"\nmax_bytes = \"64 MiB\"\n".into();
    let mut gw = Gateway::new(spec);
    gw.start().await;
    let tap = Tap::start(&up.tap_queue).await;
    let ballast = fs.mount.join("ballast");
    fill(&ballast, 384 << 10);
    let mut fs_spec = FleetSpec::new(devices, 10.0);
    fs_spec.payload_bytes = Some(500);
    fs_spec.outbox = Some(outbox);
    let fleet = Fleet::start(&gw, &fs_spec, "fleet");

    wait_until(
        Duration::from_secs(60),
        "an append to fail on the full disk",
        || gw.log().contains("append failed"),
    )
    .await
    .unwrap();
    let full_at = gw.last_seq();
    tokio::time::sleep(Duration::from_secs(pick(5, 60))).await;
    assert!(gw.is_running(), "the gateway died on a full disk");
    let still = gw.last_seq();
    let disk_full_refusals = match gw.metrics().await {
        Some(m) => m
            .series
            .get("gateway_refusals_total{reason=\"disk_full\"}")
            .copied(),
        None => None,
    };
    let (ok, out, err) = gw.queue_tool(&["verify"]);
    assert!(ok, "queue verify on the full disk: {out}\n{err}");

    std::fs::remove_file(&ballast).unwrap();
    proxy.set_mode(Mode::Pass);
    let recovery = gw.wait_forwarded(still, Duration::from_secs(120)).await;
    wait_until(Duration::from_secs(30), "appends to work again", || {
        gw.last_seq() > still + devices as u64
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let run = fleet.stop(Duration::from_secs(60)).await;
    drained(&gw).await;
    let v = verify(&run.manifest, &up.queue, 60, 2).await;
    let tap = tap.stop().await;
    Figures::new(scenario, &v, &tap, recovery).print();
    up.cleanup().await;
    let clean_stop = gw.stop(Duration::from_secs(30)).await;
    let (ok, out, err) = gw.queue_tool(&["verify"]);

    assert_delivery(&v, 0);
    assert!(clean_stop, "the gateway stops cleanly after a full disk");
    eprintln!("{scenario}: disk-full refusals {disk_full_refusals:?}");
    if let Some(n) = disk_full_refusals {
        assert!(n >= 1.0, "refused appends on the full disk are counted");
    }
    assert!(ok, "queue verify after the run: {out}\n{err}");
    assert!(
        still - full_at < devices as u64 * 10,
        "the full disk took {} records",
        still - full_at
    );
    assert!(
        run.get("connection_losses") > 0 || run.get("blocked") > 0,
        "devices were held back: {}",
        run.summary
    );
    drop(gw);
    drop(fs);
}

/// One frame of a segment file: where it starts, how long it is, its record's seq.
struct Frame {
    offset: u64,
    len: u64,
    seq: u64,
}

/// The frames of a segment file (format in gateway/src/queue/mod.rs: 16-byte header, then
/// `len:u32le crc:u32le body[len]`, the body starting with `seq:u64le`), up to `end`.
fn frames(bytes: &[u8], end: u64) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut off = 16usize;
    while off + 16 <= end as usize {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        if len == 0 || off + 8 + len > end as usize {
            break;
        }
        let seq = u64::from_le_bytes(bytes[off + 8..off + 16].try_into().unwrap());
        out.push(Frame {
            offset: off as u64,
            len: (8 + len) as u64,
            seq,
        });
        off += 8 + len;
    }
    out
}

/// Corruption at rest: the gateway is stopped, bytes are flipped in a middle segment and the
/// last segment is cut short; after the restart the damaged record is quarantined and counted,
/// the torn tail truncated, and everything else delivered. The only acceptable losses, reported
/// as missing, are exactly the records destroyed. Recovery: from the restart until the queue
/// was forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s08_corruption_at_rest_is_quarantined_and_counted_and_the_rest_delivered() {
    let scenario = "8-corruption-at-rest";
    let devices = pick(20, 200);
    let up = Upstream::new("corrupt", &[]).await;
    let proxy = proxy().await;
    proxy.set_mode(Mode::Refuse);
    let mut spec = GatewaySpec::new(devices, proxy.port(), &up.exchange);
    spec.queue = "segment_bytes = \"64 KiB\"\n".into();
    let mut gw = Gateway::new(spec);
    gw.start().await;
    let tap = Tap::start(&up.tap_queue).await;
    let mut fs = FleetSpec::new(devices, 20.0);
    fs.payload_bytes = Some(300);
    let fleet = Fleet::start(&gw, &fs, "fleet");
    wait_until(Duration::from_secs(120), "six segments", || {
        gw.stats().is_some_and(|s| s.segments >= 6)
    })
    .await
    .unwrap();
    let run = fleet.stop(Duration::from_secs(60)).await;
    assert!(
        gw.stop(Duration::from_secs(30)).await,
        "clean stop (SIGTERM)"
    );

    // Before the damage: every record's reading, and the frames of the segments.
    let insp = Inspector::open(&gw.data_dir).unwrap();
    let reading: BTreeMap<u64, (String, u64)> = insp
        .records(0, usize::MAX)
        .unwrap()
        .into_iter()
        .filter_map(|r| {
            let t = firmware_sim::payload::decode(&r.payload).ok()?;
            Some((r.seq, (t.device_id, t.seq)))
        })
        .collect();
    let segs: Vec<_> = insp
        .segments()
        .iter()
        .filter(|s| s.meta.records > 0)
        .map(|s| s.meta.clone())
        .collect();
    assert!(segs.len() >= 4, "{} segments with records", segs.len());
    let seg_path = |base: u64| gw.data_dir.join("segments").join(format!("{base:020}.seg"));
    // Flip bytes inside one record of a middle segment.
    let mid = &segs[segs.len() / 2];
    let mut bytes = std::fs::read(seg_path(mid.base)).unwrap();
    let fr = frames(&bytes, mid.bytes);
    assert_eq!(
        fr.len() as u64,
        mid.records,
        "frame walk of the middle segment"
    );
    let victim = &fr[fr.len() / 2];
    let at = (victim.offset + victim.len / 2) as usize;
    for b in &mut bytes[at..at + 8] {
        *b ^= 0xff;
    }
    std::fs::write(seg_path(mid.base), &bytes).unwrap();
    let quarantined: BTreeSet<u64> = [victim.seq].into();
    // Cut the last segment inside its last quarter: a torn tail of 5 bytes.
    let tail_seg = segs.last().unwrap();
    let tail_bytes = std::fs::read(seg_path(tail_seg.base)).unwrap();
    let tf = frames(&tail_bytes, tail_seg.bytes);
    let cut = &tf[tf.len() * 3 / 4];
    let torn = 5u64;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(seg_path(tail_seg.base))
        .unwrap();
    f.set_len(cut.offset + torn).unwrap();
    drop(f);
    let truncated: BTreeSet<u64> = tf[tf.len() * 3 / 4..].iter().map(|f| f.seq).collect();
    let destroyed: BTreeSet<(String, u64)> = quarantined
        .iter()
        .chain(&truncated)
        .filter_map(|s| reading.get(s).cloned())
        .collect();

    gw.start().await;
    let restarted = Instant::now();
    proxy.set_mode(Mode::Pass);
    wait_until(
        Duration::from_secs(120),
        "the queue to be forwarded",
        || gw.cursor().is_some_and(|c| c.lag_records == 0),
    )
    .await
    .unwrap();
    let recovery = restarted.elapsed();
    let log = gw.log();
    let quarantine_logged: u64 = log
        .lines()
        .filter(|l| l.contains("copied to quarantine"))
        .filter_map(|l| field(l, "records"))
        .sum();
    let truncated_logged = log
        .lines()
        .find(|l| l.contains("queue ready"))
        .and_then(|l| field(l, "truncated_bytes"));
    let metric = match gw.metrics().await {
        Some(m) => m.get("gateway_queue_quarantined_records_total"),
        None => None,
    };
    let stats = gw.stats().unwrap();
    let v = verify(&run.manifest, &up.queue, 20, 2).await;
    let tap = tap.stop().await;
    Figures::new(scenario, &v, &tap, recovery).print();
    up.cleanup().await;

    // The verifier's missing readings are exactly the destroyed ones.
    let mut missing: BTreeSet<(String, u64)> = BTreeSet::new();
    for (device, (_, ranges)) in v.missing_by_device() {
        for (a, b) in ranges {
            for s in a..=b {
                missing.insert((device.clone(), s));
            }
        }
    }
    eprintln!(
        "{scenario}: destroyed {} (quarantined {quarantined:?}, truncated {}), gateway: quarantined {quarantine_logged} (metric {metric:?}), truncated_bytes {truncated_logged:?}, quarantine files {}",
        destroyed.len(),
        truncated.len(),
        stats.quarantine_files
    );
    assert_eq!(v.total("out_of_order"), 0, "{}", v.brief());
    assert_eq!(
        v.total("missing"),
        destroyed.len() as u64,
        "missing must be exactly the destroyed records: {}",
        v.brief()
    );
    assert_eq!(
        missing, destroyed,
        "the missing readings are the destroyed ones"
    );
    assert_eq!(
        quarantine_logged,
        quarantined.len() as u64,
        "the gateway counts the quarantined records:\n{}",
        tail(&log, 30)
    );
    if let Some(m) = metric {
        assert_eq!(m as u64, quarantined.len() as u64, "quarantine metric");
    }
    assert_eq!(truncated_logged, Some(torn), "torn tail bytes counted");
    assert!(stats.quarantine_files >= 1, "the damaged bytes were kept");
}

/// `key=value` (a number) from a log line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
}

// ---------------------------------------------------------------------------------------------
// 9: broker-side faults through the proxy
// ---------------------------------------------------------------------------------------------

/// The link to the broker is reset in the middle of batches (every connection after a few
/// kilobytes), then slowed (each chunk delayed); nothing is lost and each reset re-sends at most
/// a confirm window. Recovery: from the link's return to normal until the backlog was forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s09a_link_resets_mid_batch_and_a_slow_link_lose_nothing() {
    let scenario = "9a-reset-and-slow-link";
    let devices = pick(30, 1000);
    let window = 256u64;
    let up = Upstream::new("resets", &[]).await;
    let proxy = proxy().await;
    let mut spec = GatewaySpec::new(devices, proxy.port(), &up.exchange);
    spec.uplink = format!("window = {window}\n");
    let mut gw = Gateway::new(spec);
    gw.start().await;
    let tap = Tap::start(&up.tap_queue).await;
    let fleet = Fleet::start(&gw, &FleetSpec::new(devices, pick(10.0, 1.0)), "fleet");
    until_flowing(&tap, devices as u64).await;

    proxy.set_mode(Mode::ResetAfter(24 << 10));
    tokio::time::sleep(Duration::from_secs(pick(10, 120))).await;
    let resets = proxy.resets();
    proxy.set_mode(Mode::Delay(Duration::from_millis(150)));
    tokio::time::sleep(Duration::from_secs(pick(8, 120))).await;
    proxy.set_mode(Mode::Pass);
    let recovery = gw
        .wait_forwarded(gw.last_seq(), Duration::from_secs(120))
        .await;
    let run = fleet.stop(Duration::from_secs(60)).await;
    drained(&gw).await;
    let v = verify(&run.manifest, &up.queue, 60, 2).await;
    let tap = tap.stop().await;
    Figures::new(scenario, &v, &tap, recovery).print();
    up.cleanup().await;

    assert_delivery(&v, 0);
    assert!(resets >= 3, "the link was reset mid-batch: {resets} resets");
    assert!(
        v.total("duplicates") <= (proxy.resets() + proxy.cut() + 1) * window,
        "{} duplicates after {} resets",
        v.total("duplicates"),
        proxy.resets()
    );
}

/// A nack storm: the upstream queue holds at most a few hundred messages and rejects the rest
/// (`x-overflow = reject-publish`); the gateway retries each nacked record `max_retries` times,
/// then dead-letters it. The verifier's missing readings are exactly the dead letters. Recovery:
/// from the fleet's end until every record was settled (confirmed or dead-lettered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s09b_nack_storm_dead_letters_exactly_what_the_broker_refused() {
    let scenario = "9b-nack-storm";
    let limit = 400i32;
    let devices = pick(20, 200);
    let per_device = pick(50, 100);
    let up = Upstream::new(
        "nack",
        &[
            ("x-max-length", AMQPValue::LongInt(limit)),
            (
                "x-overflow",
                AMQPValue::LongString(LongString::from("reject-publish")),
            ),
        ],
    )
    .await;
    let proxy = proxy().await;
    let mut spec = GatewaySpec::new(devices, proxy.port(), &up.exchange);
    spec.uplink = "max_retries = 2\n".into();
    let mut gw = Gateway::new(spec);
    gw.start().await;
    let tap = Tap::start(&up.tap_queue).await;
    let mut fs = FleetSpec::new(devices, 20.0);
    fs.count_per_device = Some(per_device);
    let run = Fleet::start(&gw, &fs, "fleet")
        .wait(Duration::from_secs(120))
        .await;
    let ended = Instant::now();
    let last = gw.last_seq();
    gw.wait_forwarded(last, Duration::from_secs(120)).await;
    let recovery = ended.elapsed();
    let dead_metric = match gw.metrics().await {
        Some(m) => m.get("gateway_uplink_records_dead_lettered_total"),
        None => None,
    };
    let (dead, dead_records) = gw.dead_letters();
    let (ok, listing, err) = gw.queue_tool(&["dead-letters", "--limit", "1000000"]);
    assert!(ok, "{err}");
    let listed = listing.lines().filter(|l| l.contains("nacked")).count();
    let v = verify(&run.manifest, &up.queue, 15, 2).await;
    let tap = tap.stop().await;
    Figures::new(scenario, &v, &tap, recovery).print();
    up.cleanup().await;

    eprintln!(
        "{scenario}: {} dead letters ({dead_records} records, {listed} listed as nacked)",
        dead.len()
    );
    assert_eq!(v.total("out_of_order"), 0, "{}", v.brief());
    assert_eq!(v.total("unique"), limit as u64, "the queue took its limit");
    assert_eq!(dead.len(), dead_records, "every dead letter is a reading");
    assert_eq!(
        listed, dead_records,
        "`gateway queue dead-letters` lists them"
    );
    if let Some(n) = dead_metric {
        assert_eq!(
            n as usize, dead_records,
            "dead letters counted in the metrics"
        );
    }
    assert_eq!(
        v.total("missing"),
        dead.len() as u64,
        "missing must be exactly the dead letters: {}",
        v.brief()
    );
    let dead_set: BTreeSet<(String, u64)> = dead.into_iter().collect();
    for (device, (n, ranges)) in v.missing_by_device() {
        let of_device = dead_set.iter().filter(|(d, _)| *d == device).count() as u64;
        assert_eq!(n, of_device, "{device}: missing vs dead letters");
        for (a, b) in ranges {
            for s in a..=b {
                assert!(dead_set.contains(&(device.clone(), s)), "{device} {s}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 10: hostile devices beside good ones
// ---------------------------------------------------------------------------------------------

/// Whether the gateway closes the connection within `within` (reading and discarding).
async fn closed_within<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    c: &mut raw::Raw<S>,
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv_within(left).await {
            Ok(_) => continue,
            Err(RecvError::Closed(_)) => return true,
            Err(RecvError::Timeout) => return false,
        }
    }
}

/// A hostile device: connects with a valid certificate, then misbehaves; returns whether the
/// gateway cut it off as it should. Err: the session could not be set up (TLS handshake or
/// CONNECT not done in time, e.g. on a machine slowed down by the flood), so nothing hostile was
/// sent; the caller tries again. A CONNACK refusing the device is a failure, not an Err.
async fn hostile_session(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    id: &str,
    kind: u8,
) -> Result<bool, String> {
    let mut c = raw::tls_connect(addr, tls)
        .await
        .map_err(|e| format!("TLS connect: {e}"))?;
    let v5 = kind == 4;
    let connect = if v5 { Connect::v5(id) } else { Connect::v4(id) };
    c.send(&connect.encode())
        .await
        .map_err(|e| format!("CONNECT: {e}"))?;
    // Generous: the CONNACK can be slow to come while the gateway is busy with the flood of
    // handshakes beside this session; what is checked is how the hostile packet is handled.
    match c.recv_within(Duration::from_secs(15)).await {
        Ok(p) if p.kind == raw::kind::CONNACK && p.connack_code() == 0 => {}
        Ok(p) if p.kind == raw::kind::CONNACK => return Ok(false),
        Ok(p) => return Err(format!("packet type {} instead of a CONNACK", p.kind)),
        Err(e) => return Err(format!("no CONNACK: {e:?}")),
    }
    let bytes: Vec<u8> = match kind {
        // Malformed: reserved packet type 0.
        0 => vec![0x00, 0x00],
        // Malformed: a remaining length of five bytes.
        1 => vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x7f],
        // Oversized: a 128 KiB publish (the limit here is 64 KiB).
        2 => Publish::new(false, &format!("devices/{id}/x"), &vec![b'x'; 128 << 10])
            .qos(1, 1)
            .encode(),
        // Oversized by its header alone: 200 MB announced, nothing sent.
        3 => vec![0x32, 0x80, 0x80, 0x80, 0x60],
        // Outside its ACL (another device's topic), MQTT 5: refused with 0x87, not stored.
        4 => Publish::new(true, "devices/dev-00001/telemetry", b"acl-violation")
            .qos(1, 7)
            .encode(),
        // Outside its ACL, 3.1.1: the connection is closed.
        _ => Publish::new(false, "devices/dev-00001/telemetry", b"acl-violation")
            .qos(1, 7)
            .encode(),
    };
    if c.send(&bytes).await.is_err() {
        return Ok(true); // already closed
    }
    if v5 {
        return Ok(match c.recv_within(Duration::from_secs(15)).await {
            Ok(p) => p.kind == raw::kind::PUBACK && p.ack_reason() == 0x87,
            Err(_) => false,
        });
    }
    // Well within the keep-alive expiry (45 s for the 30 s keep-alive), which would close it too.
    Ok(closed_within(&mut c, Duration::from_secs(15)).await)
}

/// The connect timeout (TLS handshake and CONNECT) of scenario 10's gateway. Long enough that a
/// legitimate handshake slowed down by the attack on a loaded machine is not cut by it.
const S10_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Slow-loris TLS: TCP connect, then a TLS ClientHello one byte every 500 ms. The gateway must
/// drop it by its connect timeout ([`S10_CONNECT_TIMEOUT`]); returns how long that took, or None
/// if it was still connected after 6 connect timeouts.
async fn slow_loris(addr: SocketAddr) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let t = Instant::now();
    // The start of a TLS ClientHello record; never completed.
    let hello = [
        0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    let mut i = 0;
    while t.elapsed() < 6 * S10_CONNECT_TIMEOUT {
        if s.write_all(&[hello[i % hello.len()]]).await.is_err() {
            return Some(t.elapsed());
        }
        i += 1;
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    None
}

/// Hostile clients beside a good fleet: malformed and oversized packets, slow-loris TLS, publishes
/// outside the ACL and a flood of connects. The good devices' readings are all delivered, no
/// hostile payload reaches the upstream, and the gateway is still up. Recovery: from the end of
/// the attack until everything stored was forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s10_hostile_devices_do_not_harm_the_good_ones_or_the_gateway() {
    let scenario = "10-hostile-devices";
    let devices = pick(20, 1000);
    let up = Upstream::new("hostile", &[]).await;
    let proxy = proxy().await;
    let mut spec = GatewaySpec::new(devices, proxy.port(), &up.exchange);
    spec.more_devices = vec![("bad-".into(), 6)];
    spec.extra = format!(
        "[limits]\nmax_packet_size = \"64 KiB\"\nconnect_timeout = \"{}s\"\n",
        S10_CONNECT_TIMEOUT.as_secs()
    );
    let mut gw = Gateway::new(spec);
    gw.start().await;
    let tap = Tap::start(&up.tap_queue).await;
    let fleet = Fleet::start(&gw, &FleetSpec::new(devices, 5.0), "fleet");
    until_flowing(&tap, devices as u64).await;
    let addr = SocketAddr::from(([127, 0, 0, 1], gw.port));
    let before = tap.stats().received;

    let rounds = pick(5, 50);
    let mut tasks = tokio::task::JoinSet::new();
    for kind in 0..6u8 {
        let id = format!("bad-{:05}", kind + 1);
        let tls = gateway_tests::device_tls(&gw.certs, Some(&id));
        tasks.spawn(async move {
            let mut ok = 0;
            for _ in 0..rounds {
                // A session that could not be set up sent nothing hostile (and is not counted
                // as a refusal of its kind): it is tried again, a few times at most.
                for attempt in 1..=3 {
                    match hostile_session(addr, tls.clone(), &id, kind).await {
                        Ok(handled) => {
                            ok += usize::from(handled);
                            break;
                        }
                        Err(e) => eprintln!("{id}: attempt {attempt}: {e}"),
                    }
                }
            }
            (format!("kind {kind}"), ok, rounds)
        });
    }
    let loris = pick(30, 300);
    tasks.spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..loris {
            set.spawn(slow_loris(addr));
        }
        let mut ok = 0;
        while let Some(r) = set.join_next().await {
            // Cut by the connect timeout (with room for a slow scheduler), well before the
            // client gives up by itself.
            if r.ok()
                .flatten()
                .is_some_and(|d| d < 3 * S10_CONNECT_TIMEOUT)
            {
                ok += 1;
            }
        }
        ("slow-loris".to_string(), ok, loris)
    });
    let flood = pick(300, 2000);
    let anon = gateway_tests::device_tls(&gw.certs, None);
    tasks.spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..flood {
            let anon = anon.clone();
            set.spawn(async move {
                // Half plain TCP that says nothing, half TLS without a client certificate.
                if i % 2 == 0 {
                    let s = tokio::net::TcpStream::connect(addr).await.ok();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    drop(s);
                } else {
                    let _ = raw::tls_connect(addr, anon).await;
                }
            });
        }
        while set.join_next().await.is_some() {}
        ("connect-flood".to_string(), flood, flood)
    });
    let mut failures = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (what, ok, of) = r.unwrap();
        eprintln!("{scenario}: {what}: {ok}/{of} handled as expected");
        if ok != of {
            failures.push(format!("{what}: {ok}/{of}"));
        }
    }
    let attack_end = Instant::now();
    let during = tap.stats().received - before;
    let refusals: BTreeMap<String, f64> = match gw.metrics().await {
        Some(m) => m
            .series
            .into_iter()
            .filter(|(k, _)| k.starts_with("gateway_refusals_total"))
            .collect(),
        None => BTreeMap::new(),
    };
    eprintln!("{scenario}: {refusals:?}");
    assert!(gw.is_running(), "the gateway died under attack");
    gw.wait_forwarded(gw.last_seq(), Duration::from_secs(60))
        .await;
    let recovery = attack_end.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let run = fleet.stop(Duration::from_secs(60)).await;
    drained(&gw).await;
    let v = verify(&run.manifest, &up.queue, 60, 2).await;
    let tap = tap.stop().await;
    Figures::new(scenario, &v, &tap, recovery).print();
    up.cleanup().await;

    assert!(gw.is_running(), "the gateway is still up");
    assert_delivery(&v, 0);
    assert!(
        failures.is_empty(),
        "hostile clients not handled: {failures:?}"
    );
    assert!(during > 0, "good traffic flowed during the attack");
    assert_eq!(
        v.total("undecodable"),
        0,
        "a hostile payload reached the upstream"
    );
    assert_eq!(tap.undecodable, 0, "a hostile payload reached the upstream");
    if !refusals.is_empty() {
        let r = |reason: &str| {
            refusals
                .get(&format!("gateway_refusals_total{{reason=\"{reason}\"}}"))
                .copied()
                .unwrap_or(0.0) as usize
        };
        // Each kind of hostile session is refused once per round, and counted as what it was.
        assert_eq!(r("malformed"), 2 * rounds, "malformed packets counted");
        assert_eq!(r("limit"), 2 * rounds, "oversized packets counted");
        assert_eq!(r("acl"), 2 * rounds, "publishes outside the ACL counted");
        // Every slow-loris client is refused as a timeout. A handshake of the flood (or of a
        // hostile session) that the load made slower than the connect timeout is a timeout too,
        // so both are lower bounds: together they count at least every slow-loris client and
        // every anonymous TLS handshake of the flood.
        assert!(r("timeout") >= loris, "slow-loris clients timed out");
        assert!(
            r("tls") + r("timeout") >= flood / 2 + loris,
            "failed handshakes counted"
        );
    }
    assert!(
        tap.by_device.keys().all(|d| d.starts_with("dev-")),
        "only good devices upstream: {:?}",
        tap.by_device.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        run.get("connection_losses"),
        0,
        "good devices were not disconnected: {}",
        run.summary
    );
}
