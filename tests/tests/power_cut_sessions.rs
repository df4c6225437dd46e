//! Power cuts and the session store (issue 17 for issue 11's storage): the gateway binary with
//! `fsync = "always"` and its `data_dir` on the power-cut file system, cut as
//! [`PowerCutRig::trials`] says (random moments, right after a random number of file-system
//! changes, during start-up, some cuts torn), while a publisher sends numbered QoS 1 messages and
//! records every PUBACK, and a subscriber with a persistent session (clean session = 0) comes
//! and goes. A retained message is published first.
//!
//! At the end every message the gateway PUBACKed has reached the subscriber (from its stored
//! session or routed again from the queue after a cut), and a new subscription still gets the
//! retained message. One `POWERCUT-SESSIONS` line gives the figures. 100 cuts by default,
//! `POWERCUT_SESSIONS_TRIALS=N` for N, `GATEWAY_SOAK=1` for 1,000. `FAULT_SEED` repeats a run's
//! choices.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_tests::faults::{pick, tail, GatewaySpec, Rng};
use gateway_tests::power_cut::PowerCutRig;
use gateway_tests::subscribers::{
    acl, alternate_qos, options, publish_until_gone, Leave, Subscriber, FILTER, PUBLISHER,
    SUBSCRIBER,
};
use rumqttc::{AsyncClient, Event, Incoming, QoS};

/// The retained message: published once, before the cuts, by dev-00002 on a topic the
/// subscriber's filter matches (a number, like the others, that no publisher sends).
const RETAINED: u64 = 999_999_999;

/// Connects `device` (clean session = 0 unless `clean`), optionally subscribes to [`FILTER`]
/// and publishes `publish` (retained), then returns what came within `wait`: (payload, retain).
async fn session(
    gw: &gateway_tests::faults::Gateway,
    device: &str,
    clean: bool,
    subscribe: bool,
    publish: Option<(&str, u64)>,
    wait: Duration,
) -> Vec<(u64, bool)> {
    let (mut o, _tunnel) = options(gw, device).await;
    o.set_clean_session(clean);
    let (client, mut ev) = AsyncClient::new(o, 8);
    if subscribe {
        client.subscribe(FILTER, QoS::AtLeastOnce).await.unwrap();
    }
    if let Some((topic, n)) = publish {
        client
            .publish(topic, QoS::AtLeastOnce, true, n.to_string())
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    let mut acks_due = usize::from(subscribe) + usize::from(publish.is_some());
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, ev.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::SubAck(_) | Incoming::PubAck(_)))) => {
                acks_due = acks_due.saturating_sub(1);
            }
            Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                let n = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
                got.push((n, p.retain));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("{device}: connection failed: {e}"),
            Err(_) => break,
        }
    }
    assert_eq!(acks_due, 0, "{device}: SUBACK / PUBACK missing");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), ev.poll()).await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_power_cut_loses_no_message_of_a_persistent_session_nor_the_retained_one() {
    let scenario = "power-cut-sessions";
    // 100 cuts (about 80 s here); `POWERCUT_SESSIONS_TRIALS` sets another number.
    let trials = std::env::var("POWERCUT_SESSIONS_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(pick(100, 1000));
    let started = Instant::now();
    let mut rng = Rng::from_env(scenario);
    // The uplink points at a closed port: the queue keeps everything (the router's cursor alone
    // frees nothing), so each cut leaves records the router may have to route again.
    let mut spec = GatewaySpec::new(3, 1, "powercut-sessions-unused");
    spec.queue = "fsync = \"always\"\nsegment_bytes = \"1 MiB\"\nmax_bytes = \"64 MiB\"\n".into();
    spec.extra = acl();
    // Room for everything published while the subscriber is away (the session's bound is not
    // what this test is about).
    spec.extra += "\n[sessions]\nmax_queued_messages = 60000\nmax_queued_bytes = \"64 MiB\"\n";
    let mut rig = PowerCutRig::new(spec, scenario);

    // The persistent subscription and the retained message, before any cut.
    rig.gw.start().await;
    let first = session(
        &rig.gw,
        SUBSCRIBER,
        false,
        true,
        None,
        Duration::from_millis(500),
    )
    .await;
    assert!(first.is_empty(), "{first:?}");
    let retained_topic = "devices/dev-00002/telemetry";
    session(
        &rig.gw,
        "dev-00002",
        true,
        false,
        Some((retained_topic, RETAINED)),
        Duration::from_millis(300),
    )
    .await;
    assert!(rig.gw.stop(Duration::from_secs(10)).await);

    let sub = Subscriber::new(&rig.gw, SUBSCRIBER);
    let acked: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let next = Arc::new(Mutex::new(0u64));
    let done = Arc::new(AtomicBool::new(false));
    // Publisher: reconnects after every cut and goes on numbering.
    let publisher = {
        let ((o, tunnel), next, acked, done) = (
            options(&rig.gw, PUBLISHER).await,
            next.clone(),
            acked.clone(),
            done.clone(),
        );
        tokio::spawn(async move {
            let _tunnel = tunnel;
            while !done.load(Ordering::SeqCst) {
                publish_until_gone(
                    o.clone(),
                    alternate_qos,
                    next.clone(),
                    acked.clone(),
                    done.clone(),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Subscriber: connected for a while, away for a while, again and again.
    let subscriber = {
        let (sub, done) = (sub.clone(), done.clone());
        let mut rng = Rng::from_env("power-cut-sessions-subscriber");
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let leave = Arc::new(AtomicBool::new(false));
                let stay = rng.millis(200, 900);
                let timer = {
                    let leave = leave.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(stay).await;
                        leave.store(true, Ordering::SeqCst);
                    })
                };
                sub.run(leave, Leave::Disconnect).await;
                timer.abort();
                tokio::time::sleep(rng.millis(100, 900)).await;
            }
        })
    };

    rig.trials(trials, &mut rng, async |_, _| {}).await;

    // The last start: everything PUBACKed reaches the subscriber.
    rig.gw.start().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    done.store(true, Ordering::SeqCst);
    publisher.await.unwrap();
    subscriber.await.unwrap();
    let acked_all = acked.lock().unwrap().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let left = Arc::new(AtomicBool::new(false));
        let timer = {
            let left = left.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                left.store(true, Ordering::SeqCst);
            })
        };
        sub.run(left, Leave::Disconnect).await;
        timer.abort();
        let missing: Vec<u64> = acked_all
            .difference(&sub.log.lock().unwrap().numbers())
            .copied()
            .collect();
        if missing.is_empty() || tokio::time::Instant::now() > deadline {
            break missing;
        }
    };
    // A new subscription gets the retained message (a clean session of its own id).
    let retained = session(
        &rig.gw,
        SUBSCRIBER,
        true,
        true,
        None,
        Duration::from_millis(800),
    )
    .await;
    let t = rig.totals.clone();
    let logs = rig.gw.all_logs();
    println!(
        "POWERCUT-SESSIONS trials={} at_a_change={} torn={} acked={} received={} missing={} \
         retained_after={} lost_ops={} lost_bytes={} lost_dir_changes={} ({:.0} s)",
        t.cuts,
        t.at_change,
        t.torn,
        acked_all.len(),
        sub.log.lock().unwrap().numbers().len(),
        missing.len(),
        retained.contains(&(RETAINED, true)),
        t.ops,
        t.bytes,
        t.dirs,
        started.elapsed().as_secs_f64()
    );
    assert!(
        !logs.contains("panicked"),
        "a gateway panicked:\n{}",
        tail(&logs, 40)
    );
    assert!(
        acked_all.len() >= trials,
        "only {} messages PUBACKed in {trials} trials",
        acked_all.len()
    );
    assert!(
        missing.is_empty(),
        "{} PUBACKed messages never reached the persistent subscriber, first {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        tail(&logs, 40)
    );
    assert!(
        retained.contains(&(RETAINED, true)),
        "the retained message is gone after the cuts: a new subscription got {retained:?}"
    );
    rig.finish().await;
}
