//! Persistent sessions survive kill -9 of the real `gateway` binary (`fsync = "always"`; issue
//! 11's crash test).
//!
//! Two publishers send numbered messages one at a time, each number once: dev-00001 at QoS 1,
//! dev-00004 at QoS 2. A message is accepted when the gateway acknowledges it: PUBACK, or for
//! QoS 2 PUBREC (the gateway sends it once the record is durable, as it does PUBACK; the PUBREL /
//! PUBCOMP that follow add nothing to the custody). Two subscribers with persistent sessions
//! (MQTT 3.1.1, clean session = 0, both on `devices/+/telemetry`): dev-00003 at QoS 1 (it gets
//! both publishers' messages at QoS 1) and dev-00002 at QoS 2 (the QoS 1 publisher's at QoS 1,
//! the QoS 2 publisher's at QoS 2). The subscribers are raw clients that keep their QoS 2 receiver
//! state across their own reconnects and the gateway's restarts, as a real client's persistent
//! session must (`gateway_tests::subscribers`): they deliver a QoS 2 message at PUBLISH receipt
//! and keep its packet id until PUBREL (MQTT 3.1.1 4.3.3, method A), so a resent PUBLISH (DUP)
//! for a kept id is answered with PUBREC and not delivered again.
//!
//! Each trial: both publishers and both subscribers connect to the restarted gateway (each
//! subscriber's CONNACK must say session present), the gateway is SIGKILLed at a random moment
//! (0.3 to 1.2 s in) and started again on the same data directory. Every fourth trial both
//! subscribers are away when the kill comes, in two of four one of them is: an away subscriber
//! leaves (DISCONNECT or a dropped socket) 30 to 150 ms after the start, and messages for it are
//! published and accepted while it is away. A subscriber that stays may drop its connection at a
//! random moment and come back 20 to 300 ms later (its QoS 2 state must survive that too). At the
//! end both come back and the test waits until the gateway holds nothing more for them.
//!
//! Asserted, per subscriber: every accepted message of every publisher arrived (the session
//! bound is raised so that nothing is refused while a subscriber is away: the default 1,000
//! messages refuses some at this machine's rate, counted, not a loss); in order per publisher:
//! the sequence of first deliveries of that publisher's numbers is strictly increasing (a
//! repeated delivery of a number already delivered, a QoS 1 resend after a reconnect, is allowed
//! and is not a first delivery); at QoS 2 every message exactly once (no repeated delivery at
//! all); each message came at min(subscription, publish) QoS; every CONNACK said session present;
//! every QoS 2 id was released (PUBREL came) and the gateway holds nothing more at the end; no
//! protocol surprise (e.g. a QoS 2 PUBLISH without DUP for an id the subscriber holds awaiting
//! PUBREL: the gateway forgot that id, and a compliant receiver would not deliver that message).
//! A failing run keeps its evidence in `$TMPDIR/subs-kill-<seed>`: each subscriber's deliveries
//! (publisher, number, QoS, packet id, DUP, connection, trial) and a copy of the gateway's logs
//! and data directory (`gateway sessions inspect --data-dir` reads the session store).
//!
//! The session store compacts (a snapshot) every 20,000 events, a few times in 20 trials; a kill
//! during a big snapshot is likelier with `SUBS_KILL_TRIALS=100` (about 2 minutes), where the
//! subscribers' backlogs grow. That found two gateway bugs, both fixed: a snapshot cut off by the
//! kill reordered a session's messages at the next start (thousands of messages delivered after
//! higher numbers), and a message sent before its event was stored came back after the restart
//! as a new message with another packet id (a QoS 2 message delivered twice and, its old id still
//! held by the subscriber, the next one lost).
//!
//! One line gives the figures: `acked_q1` / `acked_q2` the accepted messages of the QoS 1 / QoS 2
//! publisher; `received_q1` the distinct messages delivered at QoS 1, summed over the subscribers
//! (dev-00003: both publishers', dev-00002: the QoS 1 publisher's), `received_q2` the distinct
//! messages delivered at QoS 2 (dev-00002); `dup_q1` / `dup_q2` repeated deliveries at QoS 1 /
//! QoS 2; `missing` accepted messages a subscriber never got; `out_of_order` first deliveries
//! after a higher number; `q2_resends_kept_out` QoS 2 resends the subscriber's stored ids kept
//! from being delivered twice; `pubrel_after_pubcomp` PUBRELs for an id already released.
//!
//! `SUBS_KILL_TRIALS` sets the number of kills (default 20), `SUBS_KILL_SEED` (or `FAULT_SEED`)
//! the seed of the random moments.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_tests::faults::{tail, Gateway, GatewaySpec, Rng};
use gateway_tests::subscribers::{
    acl, options, publish_until_gone, Leave, Subscriber, FILTER, PUBLISHER, SUBSCRIBER,
    SUBSCRIBER_QOS2,
};
use rumqttc::QoS;

/// Publishes at QoS 2 (`PUBLISHER`, dev-00001, at QoS 1).
const PUBLISHER_QOS2: &str = "dev-00004";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A publisher: its device, QoS, next number and the numbers the gateway accepted.
struct Publisher {
    device: &'static str,
    /// The device number in its topic (`devices/dev-00004/telemetry`: 4).
    from: u32,
    qos: fn(u64) -> QoS,
    next: Arc<Mutex<u64>>,
    acked: Arc<Mutex<BTreeSet<u64>>>,
}

impl Publisher {
    fn new(device: &'static str, qos: fn(u64) -> QoS) -> Publisher {
        Publisher {
            device,
            from: device.trim_start_matches("dev-").parse().unwrap(),
            qos,
            next: Arc::default(),
            acked: Arc::default(),
        }
    }

    fn acked(&self) -> BTreeSet<u64> {
        self.acked.lock().unwrap().clone()
    }
}

/// What a subscriber does during one trial, after its first connection.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Connected until the kill.
    Stay,
    /// Leaves after `after` and is away when the kill comes.
    Away { after: Duration, leave: Leave },
    /// Leaves after `after`, comes back `gap` later and stays until the kill.
    Back {
        after: Duration,
        gap: Duration,
        leave: Leave,
    },
}

/// One trial of one subscriber. Returns the first connection's session-present flag (`None`:
/// no CONNACK).
async fn visit(s: Subscriber, plan: Plan, killed: Arc<AtomicBool>) -> Option<bool> {
    let (after, leave) = match plan {
        Plan::Stay => return s.run(killed, Leave::Drop).await,
        Plan::Away { after, leave } | Plan::Back { after, leave, .. } => (after, leave),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            stop.store(true, Ordering::SeqCst);
        })
    };
    let present = s.run(stop, leave).await;
    timer.abort();
    if let Plan::Back { gap, .. } = plan {
        tokio::time::sleep(gap).await;
        if !killed.load(Ordering::SeqCst) {
            // Back before the kill (or refused by a gateway killed meanwhile: nothing recorded).
            s.run(killed, Leave::Drop).await;
        }
    }
    present
}

/// A failing run's evidence, kept in the temporary directory: each subscriber's deliveries in
/// order (publisher, number, QoS, packet id, DUP, connection, trial) and a copy of the gateway's
/// directory (its logs and data: `gateway sessions inspect` reads the session store). Returns
/// where.
fn keep_evidence(
    gw: &Gateway,
    subs: &[(Subscriber, u8); 2],
    trial_starts: &[[usize; 2]],
    seed: u64,
) -> String {
    let dir = std::env::temp_dir().join(format!("subs-kill-{seed}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (s, _)) in subs.iter().enumerate() {
        let g = s.log.lock().unwrap();
        let mut text = String::new();
        for d in &g.deliveries {
            let trial = trial_starts
                .iter()
                .rposition(|t| t[i] <= d.connection)
                .map_or(-1, |t| t as i64);
            text += &format!(
                "from={} n={} qos={} pkid={} dup={} connection={} trial={trial}\n",
                d.from, d.n, d.qos, d.pkid, d.dup, d.connection
            );
        }
        std::fs::write(dir.join(format!("{}.deliveries", s.device)), text).unwrap();
    }
    let _ = std::process::Command::new("cp")
        .arg("-a")
        .arg(gw.dir.path())
        .arg(dir.join("gateway"))
        .status();
    format!("evidence kept in {}", dir.display())
}

fn leave(rng: &mut Rng) -> Leave {
    if rng.range(0, 2) == 0 {
        Leave::Disconnect
    } else {
        Leave::Drop
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn persistent_subscribers_get_every_accepted_message_in_order_qos2_exactly_once_across_kill_9(
) {
    let started = Instant::now();
    let trials: u32 = env_or("SUBS_KILL_TRIALS", 20);
    let seed: u64 = std::env::var("SUBS_KILL_SEED")
        .or_else(|_| std::env::var("FAULT_SEED"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("SUBS_KILL_SEED={seed}");
    let mut rng = Rng::new(seed);
    let mut spec = GatewaySpec::new(4, 1, "subs-kill-unused");
    spec.extra = acl();
    // Room for everything published while a subscriber is away: the default 1,000 messages per
    // session refuses some at this machine's rate (the session's bound, counted, not a loss).
    spec.extra += "\n[sessions]\nmax_queued_messages = 60000\nmax_queued_bytes = \"64 MiB\"\n";
    let mut gw = Gateway::new(spec);
    gw.start().await;

    // The subscriptions are made (and stored) before anything is published.
    let subs = [
        (Subscriber::new(&gw, SUBSCRIBER), 1u8),
        (Subscriber::new(&gw, SUBSCRIBER_QOS2), 2u8),
    ];
    for (s, qos) in &subs {
        assert_eq!(s.subscribe(FILTER, *qos).await, *qos, "{}", s.device);
    }
    let pubs = [
        Publisher::new(PUBLISHER, |_| QoS::AtLeastOnce),
        Publisher::new(PUBLISHER_QOS2, |_| QoS::ExactlyOnce),
    ];

    // (trial, subscriber, CONNACK session present of its first connection after the restart)
    let mut presents = Vec::new();
    let mut away_at_kill = [0u32; 2];
    // Each subscriber's connection count when each trial started (for a failing run's dump).
    let mut trial_starts: Vec<[usize; 2]> = Vec::new();
    for trial in 0..trials {
        trial_starts.push(
            subs.each_ref()
                .map(|(s, _)| s.log.lock().unwrap().session_present.len()),
        );
        let killed = Arc::new(AtomicBool::new(false));
        let kill_at = rng.range(300, 1200);
        let mut visits = Vec::new();
        for (i, (s, _)) in subs.iter().enumerate() {
            // Trials 1, 3, 5, ...: dev-00003 away at the kill; 2, 3, 6, 7, ...: dev-00002.
            let away = (trial >> i) & 1 == 1;
            let plan = if away {
                away_at_kill[i] += 1;
                Plan::Away {
                    after: rng.millis(30, 150),
                    leave: leave(&mut rng),
                }
            } else if rng.range(0, 2) == 0 {
                Plan::Stay
            } else {
                Plan::Back {
                    after: rng.millis(50, kill_at),
                    gap: rng.millis(20, 300),
                    leave: leave(&mut rng),
                }
            };
            visits.push((
                s.device.clone(),
                tokio::spawn(visit(s.clone(), plan, killed.clone())),
            ));
        }
        let mut publishers = Vec::new();
        for p in &pubs {
            let (o, tunnel) = options(&gw, p.device).await;
            let publish =
                publish_until_gone(o, p.qos, p.next.clone(), p.acked.clone(), killed.clone());
            publishers.push(tokio::spawn(async move {
                let _tunnel = tunnel;
                publish.await
            }));
        }
        tokio::time::sleep(Duration::from_millis(kill_at)).await;
        gw.kill();
        killed.store(true, Ordering::SeqCst);
        for p in publishers {
            p.await.unwrap();
        }
        for (device, v) in visits {
            presents.push((trial, device, v.await.unwrap()));
        }
        gw.start().await;
    }

    // Both come back once more and stay until the gateway holds nothing more for them (every
    // QoS 2 message released too) and every accepted message arrived.
    let acked: Vec<BTreeSet<u64>> = pubs.iter().map(Publisher::acked).collect();
    trial_starts.push(
        subs.each_ref()
            .map(|(s, _)| s.log.lock().unwrap().session_present.len()),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let last: Vec<_> = subs
        .iter()
        .map(|(s, _)| {
            (
                s.device.clone(),
                tokio::spawn(visit(s.clone(), Plan::Stay, stop.clone())),
            )
        })
        .collect();
    let missing = |s: &Subscriber| -> Vec<(u32, u64)> {
        let g = s.log.lock().unwrap();
        pubs.iter()
            .zip(&acked)
            .flat_map(|(p, a)| {
                let got = g.numbers_from(p.from);
                a.difference(&got).map(|n| (p.from, *n)).collect::<Vec<_>>()
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let queued_at_end = loop {
        let all_in = subs.iter().all(|(s, _)| missing(s).is_empty())
            && subs
                .iter()
                .all(|(s, _)| s.log.lock().unwrap().awaiting_rel() == 0);
        let queued = gw
            .metrics()
            .await
            .and_then(|m| m.get("gateway_session_queued_messages"));
        if (all_in && queued == Some(0.0)) || Instant::now() > deadline {
            break queued;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, Ordering::SeqCst);
    for (device, v) in last {
        presents.push((trials, device, v.await.unwrap()));
    }

    // The figures.
    let logs = gw.all_logs();
    let mut received = [0usize; 3];
    let mut dups = [0u64; 3];
    let (mut missing_n, mut out_of_order_n, mut kept_out, mut pubrel_unknown) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    for (s, sub_qos) in &subs {
        let m = missing(s);
        let g = s.log.lock().unwrap();
        for q in [1, 2] {
            received[q] += g.distinct_at(q as u8);
            dups[q] += g.repeats_at(q as u8);
        }
        kept_out += g.qos2_resends_ignored;
        pubrel_unknown += g.pubrels_unknown;
        missing_n += m.len();
        if !m.is_empty() {
            failures.push(format!(
                "{}: {} accepted messages never arrived (publisher, number), first {:?}",
                s.device,
                m.len(),
                &m[..m.len().min(20)]
            ));
        }
        let bad = g.out_of_order();
        out_of_order_n += bad.len();
        if !bad.is_empty() {
            failures.push(format!(
                "{}: {} first deliveries after a higher number (publisher, number, highest \
                 before), first {:?}",
                s.device,
                bad.len(),
                &bad[..bad.len().min(20)]
            ));
        }
        let twice = g.qos2_duplicates();
        if !twice.is_empty() {
            failures.push(format!(
                "{}: {} QoS 2 messages delivered more than once (publisher, number), first {:?}",
                s.device,
                twice.len(),
                &twice[..twice.len().min(20)]
            ));
        }
        for p in &pubs {
            let publish_qos = if p.device == PUBLISHER_QOS2 { 2 } else { 1 };
            let want = publish_qos.min(*sub_qos);
            let wrong = g
                .deliveries
                .iter()
                .filter(|d| d.from == p.from && d.qos != want)
                .count();
            if wrong > 0 {
                failures.push(format!(
                    "{}: {wrong} messages of {} not at QoS {want}",
                    s.device, p.device
                ));
            }
        }
        if !g.anomalies.is_empty() {
            failures.push(format!(
                "{}: protocol surprises, first {:?}",
                s.device,
                &g.anomalies[..g.anomalies.len().min(5)]
            ));
        }
        if let Some(f) = g.session_present.iter().position(|p| !p) {
            failures.push(format!(
                "{}: CONNACK of its connection {f} said no session ({} connections)",
                s.device,
                g.session_present.len()
            ));
        }
        if g.awaiting_rel() != 0 {
            failures.push(format!(
                "{}: {} QoS 2 messages never released (no PUBREL)",
                s.device,
                g.awaiting_rel()
            ));
        }
    }
    for (trial, device, present) in &presents {
        if *present != Some(true) {
            failures.push(format!(
                "trial {trial}: {device}'s first CONNACK after the restart: {present:?} (want \
                 session present)"
            ));
        }
    }
    let connections: usize = subs
        .iter()
        .map(|(s, _)| s.log.lock().unwrap().session_present.len())
        .sum();
    println!(
        "SUBS-KILL trials={trials} acked_q1={} acked_q2={} received_q1={} received_q2={} \
         dup_q1={} dup_q2={} missing={missing_n} out_of_order={out_of_order_n} \
         q2_resends_kept_out={kept_out} pubrel_after_pubcomp={pubrel_unknown} \
         subscriber_connections={connections} away_at_kill={away_at_kill:?} \
         queued_at_end={queued_at_end:?} ({:.0} s)",
        acked[0].len(),
        acked[1].len(),
        received[1],
        received[2],
        dups[1],
        dups[2],
        started.elapsed().as_secs_f64()
    );
    assert!(
        !logs.contains("panicked"),
        "a gateway panicked:\n{}",
        tail(&logs, 40)
    );
    for (p, a) in pubs.iter().zip(&acked) {
        assert!(
            a.len() > 50,
            "{}: too few messages accepted to prove anything: {}",
            p.device,
            a.len()
        );
    }
    let evidence = if failures.is_empty() {
        String::new()
    } else {
        keep_evidence(&gw, &subs, &trial_starts, seed)
    };
    assert!(
        failures.is_empty(),
        "SUBS_KILL_SEED={seed}\n{}\n{evidence}\n{}",
        failures.join("\n"),
        tail(&logs, 40)
    );
    assert_eq!(
        queued_at_end,
        Some(0.0),
        "the gateway still holds messages for the subscribers"
    );
    gw.stop(Duration::from_secs(10)).await;
}
