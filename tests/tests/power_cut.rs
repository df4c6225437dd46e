//! Power cuts under load (issue 17): the gateway binary with `fsync = "always"` and its
//! `data_dir` on the power-cut file system (`powercut-fs`, strict POSIX durability), a fleet
//! publishing QoS 1 over mutual TLS and recording every PUBACK, the AMQP uplink forwarding to the
//! real RabbitMQ. The power is cut (the gateway SIGKILLed, everything not yet synced dropped) as
//! [`PowerCutRig::trials`] says: at random moments, right after a random number of changes to
//! the file system (in the middle of an operation), during start-up, some cuts torn. The gateway
//! restarts on what is left.
//!
//! After every cut, before the restart, what is left is checked (see [`QueueCheck`]); at the end
//! the verifier reads RabbitMQ: every PUBACKed reading arrived, in order per device, and no
//! gateway sequence number was handed out twice. One `POWERCUT` line gives the figures.
//!
//! `GATEWAY_SOAK=1`: 1,000 trials with 30 devices (about half an hour). `FAULT_SEED` repeats a
//! run's choices.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use gateway::queue::inspect::Inspector;
use gateway_tests::faults::{
    assert_delivery, pick, tail, verify, wait_until, Fleet, FleetSpec, GatewaySpec, Rng, Tap,
    Upstream, RABBIT_PORT, UPLINK,
};
use gateway_tests::power_cut::PowerCutRig;
use lapin::types::AMQPValue;

/// What a cut left of the queue, checked before the gateway restarts on it.
#[derive(Debug, Default)]
struct QueueCheck {
    /// The uplink's cursor after the previous cut.
    cursor: u64,
    /// Records below the cursor found upstream, over all cuts.
    checked_records: u64,
}

impl QueueCheck {
    /// The cursor never moves past what RabbitMQ confirmed: every record still on disk at or
    /// below it has arrived upstream (the gateway is dead, so nothing more will). And a cut never
    /// moves it back: it was synced before any segment behind it was deleted.
    async fn after_cut(&mut self, data_dir: &Path, tap: &Tap, ctx: &str) {
        let (cursor, on_disk) = if data_dir.join("segments").is_dir() {
            let insp = Inspector::open(data_dir)
                .unwrap_or_else(|e| panic!("{ctx}: the queue left by the cut cannot be read: {e}"));
            let cursor = insp
                .stats()
                .cursors
                .into_iter()
                .find(|c| c.name == UPLINK)
                .map_or(0, |c| c.acked);
            let seqs: Vec<u64> = insp
                .records(0, usize::MAX)
                .unwrap_or_else(|e| panic!("{ctx}: reading the records left: {e}"))
                .iter()
                .map(|r| r.seq)
                .collect();
            (cursor, seqs)
        } else {
            (0, Vec::new())
        };
        assert!(
            cursor >= self.cursor,
            "{ctx}: the cut moved the uplink's cursor back from {} to {cursor} (is the data dir \
             or the cursor file durable?)",
            self.cursor
        );
        let confirmed: Vec<u64> = on_disk.into_iter().filter(|&s| s <= cursor).collect();
        let upstream = |tap: &Tap| {
            tap.seqs(|log| {
                confirmed
                    .iter()
                    .filter(|s| !log.readings.contains_key(s))
                    .copied()
                    .collect::<Vec<u64>>()
            })
        };
        if wait_until(
            Duration::from_secs(20),
            "records below the cursor upstream",
            || upstream(tap).is_empty(),
        )
        .await
        .is_err()
        {
            let missing = upstream(tap);
            panic!(
                "{ctx}: the cursor ({cursor}) is past {} record(s) RabbitMQ never confirmed: {:?}",
                missing.len(),
                &missing[..missing.len().min(10)]
            );
        }
        self.checked_records += confirmed.len() as u64;
        self.cursor = cursor;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_at_any_moment_loses_no_pubacked_message() {
    let scenario = "power-cut";
    let trials = pick(100, 1000);
    let devices = pick(10, 30);
    let started = Instant::now();
    let mut rng = Rng::from_env(scenario);
    // The verify queue is read only at the end: it must outlive the run (a soak run takes about
    // half an hour; the default expiry of an unused test queue is 15 minutes).
    let expires = AMQPValue::LongInt(pick(900_000, 7_200_000));
    let up = Upstream::new("powercut", &[("x-expires", expires)]).await;
    let mut spec = GatewaySpec::new(devices, RABBIT_PORT, &up.exchange);
    // 1 MiB segments: several rolls and retention deletes in a run. Preallocation (pre-zeroed
    // spare segments) on or off by the seed: both ways of growing a segment meet the cuts.
    let preallocate = rng.range(0, 2) == 1;
    spec.queue = format!(
        "fsync = \"always\"\nsegment_bytes = \"1 MiB\"\nmax_bytes = \"64 MiB\"\n\
         preallocate = {preallocate}\n"
    );
    let mut rig = PowerCutRig::new(spec, scenario);
    let tap = Tap::start_recording_seqs(&up.tap_queue).await;
    let mut fleet_spec = FleetSpec::new(devices, 50.0);
    fleet_spec.payload_bytes = Some(200);
    let fleet = Fleet::start(&rig.gw, &fleet_spec, "fleet");

    let mut check = QueueCheck::default();
    rig.trials(trials, &mut rng, async |data_dir, ctx| {
        check.after_cut(data_dir, &tap, ctx).await
    })
    .await;

    rig.gw.start().await;
    let run = fleet.stop(Duration::from_secs(60)).await;
    rig.gw.drained().await;
    // The verifier reads everything upstream (a soak run: about 800,000 messages).
    let v = verify(&run.manifest, &up.queue, pick(60, 1200), 2).await;
    let reused = tap.seqs(|log| log.reused.clone());
    let tap_stats = tap.stop().await;
    let logs = rig.gw.all_logs();
    let quarantined: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("to quarantine"))
        .collect();
    let truncated = logs.matches("torn tail truncated").count();
    let t = rig.totals.clone();
    let line = format!(
        "POWERCUT preallocate={preallocate} trials={} at_a_change={} torn={} acked={} delivered={} missing={} duplicates={} \
         out_of_order={} seq_reused={} records_checked_below_cursor={} lost_ops={} lost_bytes={} \
         lost_dir_changes={} torn_tails_truncated={}",
        t.cuts,
        t.at_change,
        t.torn,
        v.total("expected"),
        v.total("unique"),
        v.total("missing"),
        v.total("duplicates"),
        v.total("out_of_order"),
        reused.len(),
        check.checked_records,
        t.ops,
        t.bytes,
        t.dirs,
        truncated,
    );
    let _ = writeln!(
        std::io::stderr(),
        "{line}\n({scenario} took {:.0} s; torn files: {}; upstream received {})\n\
         gateway warnings and errors over all runs:\n{}",
        started.elapsed().as_secs_f64(),
        summarize(&t.torn_files),
        tap_stats.received,
        warnings(&logs),
    );
    up.cleanup().await;

    assert!(
        !logs.contains("panicked"),
        "a gateway panicked:\n{}",
        tail(&logs, 40)
    );
    assert_delivery(&v, 0);
    assert!(
        reused.is_empty(),
        "gateway sequence numbers carried two different readings: {:?}",
        &reused[..reused.len().min(5)]
    );
    assert!(
        quarantined.is_empty(),
        "a cut left damage in the middle of a segment:\n{}",
        quarantined.join("\n")
    );
    assert!(
        v.total("expected") >= trials as u64,
        "only {} readings were PUBACKed in {trials} trials: the test did not exercise the gateway",
        v.total("expected")
    );
    // The queue never needs a person: every restart served (checked by each start), and the
    // operator's tool finds nothing to repair after the last clean stop.
    rig.gw.stop(Duration::from_secs(30)).await;
    let (ok, out, err) = rig.gw.queue_tool(&["verify"]);
    assert!(ok, "gateway queue verify after the last stop:\n{out}{err}");
    rig.finish().await;
}

/// "name x count" for the files the torn cuts tore.
fn summarize(paths: &[std::path::PathBuf]) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for p in paths.iter().map(|p| p.display().to_string()) {
        // Segment names differ by their base: count them as one kind.
        let kind = if p.ends_with(".seg") && !p.contains(".spare") {
            "data/segments/<base>.seg".to_string()
        } else {
            p
        };
        *counts.entry(kind).or_insert(0) += 1;
    }
    counts
        .iter()
        .map(|(k, n)| format!("{k} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// "count  LEVEL message" for each distinct warning or error in the gateway's logs (the message
/// without its fields), most frequent first.
fn warnings(logs: &str) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for line in logs.lines() {
        let Some(level) = ["WARN", "ERROR"]
            .into_iter()
            .find(|l| line.contains(&format!(" {l} ")))
        else {
            continue;
        };
        let rest = line.split_once(&format!(" {level} ")).map_or("", |x| x.1);
        let message = rest.split_once(": ").map_or(rest, |x| x.1);
        let words: Vec<&str> = message
            .split_whitespace()
            .take_while(|w| !w.contains('='))
            .collect();
        *counts
            .entry(format!("{level} {}", words.join(" ")))
            .or_insert(0) += 1;
    }
    let mut list: Vec<(u64, String)> = counts.into_iter().map(|(m, n)| (n, m)).collect();
    list.sort_by(|a, b| b.cmp(a));
    list.iter()
        .map(|(n, m)| format!("{n:6}  {m}"))
        .collect::<Vec<_>>()
        .join("\n")
}
