//! Commands survive kill -9 of the real `gateway` binary between the broker and the device
//! (issue 12's crash test).
//!
//! A publisher sends numbered commands to RabbitMQ (publisher confirms, persistent, a unique
//! message id each) for two devices with persistent sessions (MQTT 3.1.1, clean session = 0):
//! `devices.dev-00003.commands.set` at QoS 1 and `devices.dev-00002.commands.set` with header
//! `mqtt_qos = 2`, subscribed at QoS 1 and 2. The gateway's AMQP downlink consumes them. Each
//! trial starts the gateway, lets the devices connect (dev-00003 leaves after a random moment in
//! one trial of two, so its commands wait in its offline session), and SIGKILLs the gateway at a
//! random moment (0.3 to 1.2 s in). At the end the gateway starts once more and both devices
//! stay until they have every command RabbitMQ confirmed, or 60 s pass.
//!
//! Asserted per device: every confirmed command arrived (missing = 0) and first deliveries are
//! in the order published (out_of_order = 0). Reported: repeated deliveries (`dup_q1`: QoS 1
//! resends after a reconnect; `dup_q2`: a QoS 2 command delivered twice, which happens only when
//! the kill fell between the durable store and the broker's ack and the redelivery was not
//! recognised by its message id). The figures line starts with `FAULT scenario=downlink-kill`.
//!
//! `DOWNLINK_KILL_TRIALS` sets the number of kills (default 20), `DOWNLINK_KILL_SEED` (or
//! `FAULT_SEED`) the seed of the random moments.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_tests::faults::{tail, unique, Gateway, GatewaySpec, Rng};
use gateway_tests::subscribers::{Leave, Subscriber};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const QOS1: &str = "dev-00003";
const QOS2: &str = "dev-00002";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Publishes numbered commands to both devices, one confirm at a time, until `stop`; records
/// the numbers RabbitMQ confirmed, per device.
async fn publish(
    exchange: String,
    stop: Arc<AtomicBool>,
    confirmed: Arc<Mutex<[BTreeSet<u64>; 2]>>,
) {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        for (i, (device, qos)) in [(QOS1, 1u8), (QOS2, 2)].into_iter().enumerate() {
            let mut h = FieldTable::default();
            h.insert(
                "mqtt_qos".into(),
                AMQPValue::LongString(qos.to_string().into()),
            );
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(format!("{device}:{n}").as_str().into())
                .with_headers(h);
            let confirm = ch
                .basic_publish(
                    exchange.as_str().into(),
                    format!("devices.{device}.commands.set").as_str().into(),
                    BasicPublishOptions::default(),
                    n.to_string().as_bytes(),
                    props,
                )
                .await
                .unwrap()
                .await
                .unwrap();
            if confirm.is_ack() {
                confirmed.lock().unwrap()[i].insert(n);
            }
        }
        n += 1;
        // About 400 commands a second: a backlog builds while a device is away, bounded.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_confirmed_command_reaches_its_device_in_order_across_kill_9() {
    let started = Instant::now();
    let trials: u32 = env_or("DOWNLINK_KILL_TRIALS", 20);
    let seed: u64 = std::env::var("DOWNLINK_KILL_SEED")
        .or_else(|_| std::env::var("FAULT_SEED"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(gateway_tests::faults::now_ms);
    let mut rng = Rng::new(seed);
    let (exchange, queue) = (unique("dl-kill-x"), unique("dl-kill-q"));
    // The exchange exists before the first publish (the gateway's downlink binds its queue to it).
    let admin = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ach = admin.create_channel().await.unwrap();
    ach.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut spec = GatewaySpec::new(4, 5672, &unique("dl-kill-unused"));
    // Nothing is sent up; the uplink just waits (its exchange does not exist).
    spec.extra = format!(
        r#"
[sessions]
max_queued_messages = 50000
max_queued_bytes = "64 MiB"

[[downlinks]]
name = "cmds"
type = "amqp"
url = "{URL}"
queue = "{queue}"
declare = true
exchange = "{exchange}"
backoff_min = "50ms"
backoff_max = "500ms"
"#
    );
    let mut gw = Gateway::new(spec);
    gw.start().await;
    let subs = [Subscriber::new(&gw, QOS1), Subscriber::new(&gw, QOS2)];
    assert_eq!(
        subs[0].subscribe("devices/dev-00003/commands/#", 1).await,
        1
    );
    assert_eq!(
        subs[1].subscribe("devices/dev-00002/commands/#", 2).await,
        2
    );

    let stop_publishing = Arc::new(AtomicBool::new(false));
    let confirmed: Arc<Mutex<[BTreeSet<u64>; 2]>> = Arc::default();
    let publisher = tokio::spawn(publish(
        exchange.clone(),
        stop_publishing.clone(),
        confirmed.clone(),
    ));

    for trial in 0..trials {
        if trial > 0 {
            gw.start().await;
        }
        let killed = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (i, s) in subs.iter().enumerate() {
            let s = s.clone();
            // dev-00003 leaves early in every other trial: its commands wait offline.
            let stop = if i == 0 && trial % 2 == 1 {
                let stop = Arc::new(AtomicBool::new(false));
                let (st, after) = (stop.clone(), rng.millis(30, 200));
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    st.store(true, Ordering::SeqCst);
                });
                stop
            } else {
                killed.clone()
            };
            tasks.push(tokio::spawn(async move { s.run(stop, Leave::Drop).await }));
        }
        tokio::time::sleep(rng.millis(300, 1200)).await;
        gw.kill();
        killed.store(true, Ordering::SeqCst);
        for t in tasks {
            let _ = t.await;
        }
    }
    stop_publishing.store(true, Ordering::SeqCst);
    publisher.await.unwrap();
    let confirmed = confirmed.lock().unwrap().clone();

    // The last start: both stay until they have everything (or 60 s).
    gw.start().await;
    let done = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = subs
        .iter()
        .cloned()
        .map(|s| {
            let done = done.clone();
            tokio::spawn(async move {
                while !done.load(Ordering::SeqCst) {
                    s.run(done.clone(), Leave::Disconnect).await;
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let all = subs
            .iter()
            .zip(&confirmed)
            .all(|(s, c)| s.log.lock().unwrap().numbers().is_superset(c));
        if all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }
    let clean = gw.stop(Duration::from_secs(15)).await;

    let mut report = Vec::new();
    let mut failures = Vec::new();
    for ((s, c), qos) in subs.iter().zip(&confirmed).zip([1u8, 2]) {
        let g = s.log.lock().unwrap();
        let got = g.numbers();
        let missing: Vec<u64> = c.difference(&got).copied().collect();
        let disorder = g.out_of_order();
        report.push(format!(
            "confirmed_q{qos}={} received_q{qos}={} dup_q{qos}={} missing_q{qos}={} out_of_order_q{qos}={}",
            c.len(),
            got.len(),
            g.repeats_at(qos),
            missing.len(),
            disorder.len()
        ));
        if !missing.is_empty() {
            failures.push(format!(
                "{}: {} confirmed commands never arrived, first {:?}",
                s.device,
                missing.len(),
                &missing[..missing.len().min(10)]
            ));
        }
        if !disorder.is_empty() {
            failures.push(format!(
                "{}: {} out of order, first {:?}",
                s.device,
                disorder.len(),
                &disorder[..disorder.len().min(10)]
            ));
        }
        if !g.anomalies.is_empty() {
            failures.push(format!(
                "{}: {:?}",
                s.device,
                &g.anomalies[..g.anomalies.len().min(5)]
            ));
        }
    }
    println!(
        "FAULT scenario=downlink-kill trials={trials} seed={seed} {} clean_stop={clean} elapsed_s={:.1}",
        report.join(" "),
        started.elapsed().as_secs_f64()
    );
    let _ = ach
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ach
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    assert!(
        failures.is_empty(),
        "{}\n(seed {seed}; gateway log tail:)\n{}",
        failures.join("\n"),
        tail(&gw.all_logs(), 60)
    );
    assert!(
        confirmed.iter().all(|c| c.len() > 100),
        "the run published little: {:?}",
        confirmed.iter().map(BTreeSet::len).collect::<Vec<_>>()
    );
}
