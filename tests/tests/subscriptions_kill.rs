//! Persistent sessions survive kill -9 of the real `gateway` binary (`fsync = "always"`).
//!
//! A subscriber (dev-00003, MQTT 3.1.1, clean session = 0, QoS 1 on `devices/+/telemetry`) and a
//! publisher (dev-00001, QoS 1, numbered messages, one at a time) run while the gateway is
//! SIGKILLed at random moments and restarted on the same data directory. The subscriber is
//! sometimes away (disconnected) when the kill comes, so messages wait for it in its stored
//! session. After every restart the subscriber's CONNACK says session present, and at the end
//! every message the gateway PUBACKed to the publisher has reached the subscriber.
//!
//! `SUBS_KILL_TRIALS` sets the number of kills (default 8), `SUBS_KILL_SEED` the seed.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway_tests::faults::{Gateway, GatewaySpec, Rng};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, Incoming, MqttOptions, QoS, TlsConfiguration,
};

const PUBLISHER: &str = "dev-00001";
const SUBSCRIBER: &str = "dev-00003";
const FILTER: &str = "devices/+/telemetry";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn options(gw: &Gateway, device: &str) -> MqttOptions {
    let mut o = MqttOptions::new(device, "127.0.0.1", gw.port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        TlsConfiguration::Rustls(gateway_tests::device_tls(&gw.certs, Some(device))),
    ));
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(false);
    o
}

/// The subscriber: connects with clean session = 0 and records every payload it receives until
/// the connection ends or `stop` is set. Returns CONNACK's session-present flag.
async fn subscribe_until_gone(
    o: MqttOptions,
    got: Arc<Mutex<BTreeSet<u64>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Option<bool> {
    let (client, mut ev) = AsyncClient::new(o, 64);
    let mut present = None;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        match tokio::time::timeout(Duration::from_millis(200), ev.poll()).await {
            Err(_) => continue,
            Ok(Ok(Event::Incoming(Incoming::ConnAck(c)))) => {
                assert_eq!(c.code, ConnectReturnCode::Success);
                present = Some(c.session_present);
            }
            Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                let n: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
                got.lock().unwrap().insert(n);
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
        }
    }
    let _ = client.disconnect().await;
    present
}

/// The publisher: sends `next`, `next + 1`, ... one at a time and records each PUBACKed number,
/// until the connection ends or `stop` is set.
async fn publish_until_gone(
    o: MqttOptions,
    next: Arc<Mutex<u64>>,
    acked: Arc<Mutex<BTreeSet<u64>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let (client, mut ev) = AsyncClient::new(o, 8);
    let mut waiting: Option<u64> = None;
    loop {
        if waiting.is_none() {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            let n = *next.lock().unwrap();
            let topic = format!("devices/{PUBLISHER}/telemetry");
            if client
                .try_publish(topic, QoS::AtLeastOnce, false, n.to_string())
                .is_err()
            {
                break;
            }
            waiting = Some(n);
        }
        match tokio::time::timeout(Duration::from_secs(2), ev.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => {
                if let Some(n) = waiting.take() {
                    acked.lock().unwrap().insert(n);
                    *next.lock().unwrap() = n + 1;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    // Not acknowledged: it may or may not be stored; the next connection sends a new number.
    if waiting.is_some() {
        *next.lock().unwrap() += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_persistent_subscriber_gets_every_acknowledged_message_across_kill_9() {
    let trials: u32 = env_or("SUBS_KILL_TRIALS", 8);
    let mut rng = Rng::from_env("SUBS_KILL_SEED");
    let mut spec = GatewaySpec::new(3, 1, "subs-kill-unused");
    spec.extra = format!(
        "[[acl]]\nidentity = \"*\"\npublish = [\"devices/%c/#\"]\n\n\
         [[acl]]\nidentity = \"{SUBSCRIBER}\"\nsubscribe = [\"{FILTER}\"]\n"
    );
    // Room for everything published while the subscriber is away: the default 1,000 messages
    // per session refuses some at this machine's rate (the session's bound, counted, not a loss).
    spec.extra += "\n[sessions]\nmax_queued_messages = 60000\nmax_queued_bytes = \"64 MiB\"\n";
    let mut gw = Gateway::new(spec);
    gw.start().await;
    let got: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let acked: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let next = Arc::new(Mutex::new(0u64));
    // The subscription is made (and stored) before anything is published.
    {
        let (client, mut ev) = AsyncClient::new(options(&gw, SUBSCRIBER), 8);
        client.subscribe(FILTER, QoS::AtLeastOnce).await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::SubAck(a)))) => {
                    assert_eq!(a.return_codes.len(), 1);
                    break;
                }
                Ok(Ok(_)) => {}
                other => panic!("no SUBACK: {other:?}"),
            }
        }
        client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(2), ev.poll()).await;
    }
    let mut presents = Vec::new();
    for trial in 0..trials {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Every other trial the subscriber is away while messages come and the kill falls.
        let away = trial % 2 == 1;
        let sub = (!away).then(|| {
            tokio::spawn(subscribe_until_gone(
                options(&gw, SUBSCRIBER),
                got.clone(),
                stop.clone(),
            ))
        });
        let publisher = tokio::spawn(publish_until_gone(
            options(&gw, PUBLISHER),
            next.clone(),
            acked.clone(),
            stop.clone(),
        ));
        tokio::time::sleep(rng.millis(300, 1200)).await;
        gw.kill();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        publisher.await.unwrap();
        if let Some(s) = sub {
            if let Some(present) = s.await.unwrap() {
                presents.push((trial, present));
            }
        }
        gw.start().await;
    }
    // The subscriber comes back once more and everything PUBACKed must arrive.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sub = tokio::spawn(subscribe_until_gone(
        options(&gw, SUBSCRIBER),
        got.clone(),
        stop.clone(),
    ));
    let acked_all = acked.lock().unwrap().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let missing = acked_all.difference(&got.lock().unwrap()).count();
        if missing == 0 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let last_present = sub.await.unwrap();
    let missing: Vec<u64> = acked_all
        .difference(&got.lock().unwrap())
        .copied()
        .collect();
    println!(
        "SUBS-KILL trials={trials} acked={} received={} missing={}",
        acked_all.len(),
        got.lock().unwrap().len(),
        missing.len()
    );
    assert!(
        acked_all.len() > 50,
        "too few messages to prove anything: {}",
        acked_all.len()
    );
    assert!(
        missing.is_empty(),
        "{} PUBACKed but never delivered to the persistent subscriber, first {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(20)],
        gateway_tests::faults::tail(&gw.all_logs(), 40)
    );
    assert_eq!(
        last_present,
        Some(true),
        "the last reconnect resumed the session"
    );
    for (trial, present) in presents {
        assert!(present, "trial {trial}: CONNACK said no session");
    }
    gw.stop(Duration::from_secs(10)).await;
}
