//! The AMQP downlink against the real RabbitMQ (127.0.0.1:5672): commands published to an
//! exchange reach subscribed devices over TLS, in order, with their MQTT 5 request/response
//! properties; offline persistent sessions get theirs when they come back (also after a gateway
//! restart); commands for nobody are held, then dead-lettered; bad messages are dead letters,
//! acked, and do not stop the consumer; a redelivered message id is delivered once. Faults, each
//! printing a `FAULT scenario=downlink-...` line: a broker outage and a black-holed link (through
//! the fault proxy), a device offline past `ttl`, a slow device whose session bound is full.

#![allow(clippy::unwrap_used)]

mod downlink_support;
mod fault_proxy;
mod ingest_support;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use downlink_support::{
    consuming, dev, downlink, payloads, receive, subscribe, text, unique, wait_for,
    CORRELATION_DATA, RESPONSE_TOPIC,
};
use gateway::config::Config;
use gateway::service::Service;
use gateway::status::Status;
use ingest_support::raw::{self, property_values, Connect};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

struct Rig {
    dir: tempfile::TempDir,
    certs: PathBuf,
    path: PathBuf,
    exchange: String,
    queue: String,
    amqp: Connection,
}

impl Rig {
    async fn new(extra: &str) -> Rig {
        Rig::with_url(URL, extra).await
    }

    /// The gateway's downlink goes to `url` (a fault proxy); the test publishes to RabbitMQ.
    async fn with_url(url: &str, extra: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        gateway::certs::generate(&certs, 6).unwrap();
        let (exchange, queue) = (unique("cmd-x"), unique("cmd-q"));
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

[[downlinks]]
name = "cmds"
type = "amqp"
url = "{url}"
queue = "{queue}"
declare = true
exchange = "{exchange}"
backoff_max = "1s"
{extra}
"#,
                data = dir.path().join("data").display(),
                c = certs.display(),
            ),
        )
        .unwrap();
        let amqp = Connection::connect(URL, ConnectionProperties::default())
            .await
            .unwrap();
        Rig {
            dir,
            certs,
            path,
            exchange,
            queue,
            amqp,
        }
    }

    async fn start(&self) -> Service {
        Service::start(Config::load(&self.path).unwrap(), self.path.clone())
            .await
            .unwrap()
    }

    /// Publishes with confirms; `props` on top of the defaults (persistent).
    async fn publish(&self, routing_key: &str, payload: &[u8], props: BasicProperties) {
        let ch = self.amqp.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        ch.basic_publish(
            self.exchange.as_str().into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            payload,
            props.with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let _ = ch.close(200, "bye".into()).await;
    }

    async fn device(&self, status: &Status, id: &str, connect: &Connect) -> raw::TlsRaw {
        downlink_support::device(&self.certs, status, id, connect).await
    }

    async fn cleanup(self) {
        let ch = self.amqp.create_channel().await.unwrap();
        let _ = ch
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = ch
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        drop(self.dir);
    }
}

#[tokio::test]
async fn commands_reach_online_and_offline_devices_in_order_with_request_response_properties() {
    let rig = Rig::new("").await;
    let service = rig.start().await;
    let status = service.status();
    let (online, offline) = (dev(1), dev(2));
    let mut a = rig
        .device(&status, &online, &Connect::v5(&online).persistent(600))
        .await;
    subscribe(&mut a, true, &online).await;
    // The second device subscribes with a persistent session, then goes away.
    let mut b = rig
        .device(&status, &offline, &Connect::v4(&offline).persistent(0))
        .await;
    subscribe(&mut b, false, &offline).await;
    drop(b);
    wait_for("the offline session", || status.sessions.counts().1 == 1).await;
    wait_for("the downlink to consume", || {
        downlink(&status).state() == gateway::downlink::DownlinkState::Consuming
    })
    .await;

    for i in 0..5 {
        for d in [&online, &offline] {
            rig.publish(
                &format!("devices.{d}.commands.ping"),
                format!("{d}:{i}").as_bytes(),
                BasicProperties::default()
                    .with_message_id(format!("{d}-{i}").as_str().into())
                    .with_correlation_id(format!("corr-{i}").as_str().into())
                    .with_reply_to(format!("devices/{d}/replies").as_str().into()),
            )
            .await;
        }
    }
    let got = receive(&mut a, true, 5).await;
    assert_eq!(
        payloads(&got),
        (0..5).map(|i| format!("{online}:{i}")).collect::<Vec<_>>()
    );
    for (i, r) in got.iter().enumerate() {
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
    // Every message was acked upstream once it was stored.
    let s = downlink(&status);
    wait_for("10 upstream acks", || s.acked.load(Ordering::Relaxed) == 10).await;
    assert_eq!(s.stored.load(Ordering::Relaxed), 10);

    // The offline device comes back and gets its five, in order.
    let mut b = rig
        .device(&status, &offline, &Connect::v4(&offline).persistent(0))
        .await;
    let got = receive(&mut b, false, 5).await;
    assert_eq!(
        payloads(&got),
        (0..5).map(|i| format!("{offline}:{i}")).collect::<Vec<_>>()
    );
    wait_for("10 device acks", || {
        status.sessions.stats.commands_done.load(Ordering::Relaxed) == 10
    })
    .await;
    // The same per downlink, in /metrics and /api/status.
    let view = &status.downlinks()[0];
    assert_eq!(view.stats_acked_by_devices(&status.sessions), 10);
    assert_eq!(status.commands().unwrap().router.of("cmds").routed, 10);
    let metrics = gateway::admin::metrics::render(&status).unwrap();
    for line in [
        r#"gateway_downlink_commands_acked_by_devices_total{downlink="cmds"} 10"#,
        r#"gateway_downlink_commands_routed_total{downlink="cmds"} 10"#,
        r#"gateway_downlink_stored_total{downlink="cmds"} 10"#,
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    assert!(
        a.recv_within(Duration::from_millis(300)).await.is_err(),
        "nothing more for the online device"
    );
    service.shutdown().await.unwrap();
    rig.cleanup().await;
}

#[tokio::test]
async fn bad_messages_are_dead_letters_acked_upstream_and_the_consumer_goes_on() {
    let rig = Rig::new("max_payload = \"2000 KiB\"").await;
    let service = rig.start().await;
    let status = service.status();
    let d = dev(1);
    let mut a = rig.device(&status, &d, &Connect::v4(&d)).await;
    subscribe(&mut a, false, &d).await;
    wait_for("the downlink to consume", || {
        downlink(&status).state() == gateway::downlink::DownlinkState::Consuming
    })
    .await;
    // Outside allowed_topics; too large; a bad QoS header; a bad expiry header (RabbitMQ
    // itself refuses a bad AMQP expiration).
    rig.publish("telemetry.dev-00001", b"x", BasicProperties::default())
        .await;
    rig.publish(
        &format!("devices.{d}.commands.big"),
        &vec![b'x'; 2100 << 10],
        BasicProperties::default(),
    )
    .await;
    let mut h = FieldTable::default();
    h.insert("mqtt_qos".into(), AMQPValue::LongString("7".into()));
    rig.publish(
        &format!("devices.{d}.commands.q"),
        b"x",
        BasicProperties::default().with_headers(h),
    )
    .await;
    let mut h = FieldTable::default();
    h.insert(
        "mqtt_message_expiry".into(),
        AMQPValue::LongString("soon".into()),
    );
    rig.publish(
        &format!("devices.{d}.commands.e"),
        b"x",
        BasicProperties::default().with_headers(h),
    )
    .await;
    // Larger than a command-store segment (1 MiB) though within max_payload: it can never be
    // stored; a dead letter too, not a message handed back forever.
    rig.publish(
        &format!("devices.{d}.commands.huge"),
        &vec![b'x'; 1536 << 10],
        BasicProperties::default(),
    )
    .await;
    // A good one after them still arrives.
    rig.publish(
        &format!("devices.{d}.commands.ok"),
        b"fine",
        BasicProperties::default(),
    )
    .await;
    let got = receive(&mut a, false, 1).await;
    assert_eq!(payloads(&got), ["fine"]);
    let s = downlink(&status);
    wait_for("6 upstream acks", || s.acked.load(Ordering::Relaxed) == 6).await;
    assert_eq!(s.dead_lettered.load(Ordering::Relaxed), 5);
    let reasons: Vec<String> = status.dead.recent().into_iter().map(|d| d.reason).collect();
    for want in [
        "outside allowed_topics",
        "max_payload",
        "mqtt_qos",
        "mqtt_message_expiry",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "a dead letter mentions {want:?}: {reasons:?}"
        );
    }
    service.shutdown().await.unwrap();
    rig.cleanup().await;
}

#[tokio::test]
async fn a_command_for_nobody_waits_for_a_subscriber_then_goes_to_the_dead_letters() {
    let rig = Rig::new("hold = \"2s\"").await;
    let service = rig.start().await;
    let status = service.status();
    wait_for("the downlink to consume", || {
        downlink(&status).state() == gateway::downlink::DownlinkState::Consuming
    })
    .await;
    let (late, never) = (dev(3), dev(4));
    rig.publish(
        &format!("devices.{late}.commands.x"),
        b"for-late",
        BasicProperties::default(),
    )
    .await;
    rig.publish(
        &format!("devices.{never}.commands.x"),
        b"for-never",
        BasicProperties::default(),
    )
    .await;
    let commands = status.commands().unwrap();
    wait_for("two held commands", || {
        commands.router.held.load(Ordering::Relaxed) == 2
    })
    .await;
    let mut c = rig.device(&status, &late, &Connect::v4(&late)).await;
    subscribe(&mut c, false, &late).await;
    let got = receive(&mut c, false, 1).await;
    assert_eq!(payloads(&got), ["for-late"]);
    wait_for("the unclaimed command to be dead-lettered", || {
        commands.router.dead_unmatched.load(Ordering::Relaxed) == 1
    })
    .await;
    let dl = status.dead.recent();
    assert!(
        dl.iter()
            .any(|d| d.topic == format!("devices/{never}/commands/x") && d.reason.contains("hold")),
        "{dl:?}"
    );
    wait_for("no held command", || {
        commands.router.held.load(Ordering::Relaxed) == 0
    })
    .await;
    service.shutdown().await.unwrap();
    rig.cleanup().await;
}

#[tokio::test]
async fn commands_for_an_offline_device_survive_a_gateway_restart_and_a_redelivery_is_not_sent_twice(
) {
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
    wait_for("the downlink to consume", || {
        downlink(&status).state() == gateway::downlink::DownlinkState::Consuming
    })
    .await;
    for i in 0..3 {
        rig.publish(
            &format!("devices.{d}.commands.set"),
            format!("c{i}").as_bytes(),
            BasicProperties::default().with_message_id(format!("id-{i}").as_str().into()),
        )
        .await;
    }
    // The same message id again (as the broker sends after a lost ack): not stored twice.
    rig.publish(
        &format!("devices.{d}.commands.set"),
        b"c1-again",
        BasicProperties::default().with_message_id("id-1".into()),
    )
    .await;
    let s = downlink(&status);
    wait_for("4 upstream acks", || s.acked.load(Ordering::Relaxed) == 4).await;
    assert_eq!(s.duplicates.load(Ordering::Relaxed), 1);
    let commands = status.commands().unwrap();
    wait_for("3 routed", || {
        commands.router.routed.load(Ordering::Relaxed) == 3
    })
    .await;
    service.shutdown().await.unwrap();

    let service = rig.start().await;
    let status = service.status();
    let mut c = rig
        .device(&status, &d, &Connect::v4(&d).persistent(0))
        .await;
    let got = receive(&mut c, false, 3).await;
    assert_eq!(payloads(&got), ["c0", "c1", "c2"]);
    assert!(
        c.recv_within(Duration::from_millis(500)).await.is_err(),
        "each command once: the restarted router skips what the session already has"
    );
    service.shutdown().await.unwrap();
    rig.cleanup().await;
}

#[tokio::test]
async fn commands_published_during_a_broker_outage_or_a_black_hole_arrive_after_it_in_order() {
    let target = "127.0.0.1:5672".parse().unwrap();
    let proxy = fault_proxy::FaultProxy::start(target).await.unwrap();
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port());
    let rig = Rig::with_url(&url, "backoff_min = \"50ms\"").await;
    let service = rig.start().await;
    let status = service.status();
    let d = dev(1);
    let mut c = rig.device(&status, &d, &Connect::v4(&d)).await;
    subscribe(&mut c, false, &d).await;
    consuming(&status).await;
    let t = std::time::Instant::now();
    let mut n = 0;
    let mut send = |k: usize| {
        let v: Vec<String> = (n..n + k).map(|i| format!("c{i}")).collect();
        n += k;
        v
    };
    // Outage: every connection refused and the current one cut.
    proxy.set_mode(fault_proxy::Mode::Refuse);
    proxy.cut_all();
    wait_for("the downlink to notice", || {
        downlink(&status).state() != gateway::downlink::DownlinkState::Consuming
    })
    .await;
    let first = send(5);
    for p in &first {
        // With message ids: a redelivery after a cut (its ack lost with the connection) is
        // recognised and not delivered twice.
        rig.publish(
            &format!("devices.{d}.commands.x"),
            p.as_bytes(),
            BasicProperties::default().with_message_id(p.as_str().into()),
        )
        .await;
    }
    proxy.set_mode(fault_proxy::Mode::Pass);
    assert_eq!(payloads(&receive(&mut c, false, 5).await), first);
    // Black hole: the link takes bytes and answers nothing; the consumer notices only through
    // the heartbeat or a reconnect, so cut it after a while as a router dropping state would.
    proxy.set_mode(fault_proxy::Mode::BlackHole);
    proxy.cut_all();
    let second = send(5);
    for p in &second {
        // With message ids: a redelivery after a cut (its ack lost with the connection) is
        // recognised and not delivered twice.
        rig.publish(
            &format!("devices.{d}.commands.x"),
            p.as_bytes(),
            BasicProperties::default().with_message_id(p.as_str().into()),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set_mode(fault_proxy::Mode::Pass);
    proxy.cut_all();
    assert_eq!(payloads(&receive(&mut c, false, 5).await), second);
    assert!(
        c.recv_within(Duration::from_millis(300)).await.is_err(),
        "nothing twice"
    );
    let s = downlink(&status);
    println!(
        "FAULT scenario=downlink-outage published=10 delivered=10 missing=0 duplicates=0 redeliveries_recognised={} connects={} recovery_ms={}",
        s.duplicates.load(Ordering::Relaxed),
        s.connects.load(Ordering::Relaxed),
        t.elapsed().as_millis()
    );
    assert!(
        s.connects.load(Ordering::Relaxed) >= 3,
        "reconnected after each fault"
    );
    service.shutdown().await.unwrap();
    rig.cleanup().await;
}

#[tokio::test]
async fn a_command_for_a_device_offline_past_ttl_is_a_dead_letter_with_the_reason() {
    let rig = Rig::new("ttl = \"1s\"").await;
    let service = rig.start().await;
    let status = service.status();
    let d = dev(2);
    let mut c = rig
        .device(&status, &d, &Connect::v4(&d).persistent(0))
        .await;
    subscribe(&mut c, false, &d).await;
    drop(c);
    wait_for("the offline session", || status.sessions.counts().1 == 1).await;
    consuming(&status).await;
    for i in 0..2 {
        rig.publish(
            &format!("devices.{d}.commands.x"),
            format!("late{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    let commands = status.commands().unwrap();
    wait_for("two expired commands in the dead letters", || {
        commands.router.dead_expired.load(Ordering::Relaxed) == 2
    })
    .await;
    let dl = status.dead.recent();
    assert!(
        dl.iter()
            .filter(|x| x.reason.contains("expired in the session of dev-00002"))
            .count()
            == 2,
        "{dl:?}"
    );
    let mut c = rig
        .device(&status, &d, &Connect::v4(&d).persistent(0))
        .await;
    assert!(
        c.recv_within(Duration::from_millis(500)).await.is_err(),
        "an expired command is not sent"
    );
    println!(
        "FAULT scenario=downlink-ttl published=2 delivered=0 dead_lettered_expired=2 missing=0"
    );
    service.shutdown().await.unwrap();
    rig.cleanup().await;
}

#[tokio::test]
async fn a_qos0_command_for_an_offline_device_waits_in_its_session_and_is_not_dropped() {
    let rig = Rig::new("").await;
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
    for (i, qos) in ["0", "1", "0"].iter().enumerate() {
        let mut h = FieldTable::default();
        h.insert("mqtt_qos".into(), AMQPValue::LongString((*qos).into()));
        rig.publish(
            &format!("devices.{d}.commands.x"),
            format!("q{qos}-{i}").as_bytes(),
            BasicProperties::default().with_headers(h),
        )
        .await;
    }
    let commands = status.commands().unwrap();
    wait_for("three commands routed", || {
        commands.router.routed.load(Ordering::Relaxed) == 3
    })
    .await;
    let mut c = rig
        .device(&status, &d, &Connect::v4(&d).persistent(0))
        .await;
    let got = receive(&mut c, false, 3).await;
    assert_eq!(payloads(&got), ["q0-0", "q1-1", "q0-2"]);
    assert_eq!(
        got.iter().map(|r| r.qos).collect::<Vec<_>>(),
        [0, 1, 0],
        "each at the QoS it was sent with"
    );
    assert_eq!(
        status.sessions.stats.dropped_qos0.load(Ordering::Relaxed),
        0,
        "no QoS 0 command dropped"
    );
    service.shutdown().await.unwrap();
    rig.cleanup().await;
}

#[tokio::test]
async fn a_slow_device_with_a_full_bound_holds_its_commands_back_in_order_none_dropped() {
    let rig = Rig::new("").await;
    // A session holds 3 commands at most.
    let text = std::fs::read_to_string(&rig.path).unwrap();
    std::fs::write(
        &rig.path,
        format!("{text}\n[sessions]\nmax_queued_messages = 3\n"),
    )
    .unwrap();
    let service = rig.start().await;
    let status = service.status();
    let d = dev(3);
    let mut c = rig.device(&status, &d, &Connect::v4(&d)).await;
    subscribe(&mut c, false, &d).await;
    consuming(&status).await;
    for i in 0..10 {
        rig.publish(
            &format!("devices.{d}.commands.x"),
            format!("s{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    // The device reads but does not acknowledge: three are in flight, the rest wait.
    let mut unacked = Vec::new();
    for _ in 0..3 {
        unacked.push(
            c.recv_within(Duration::from_secs(10))
                .await
                .unwrap()
                .publish(false),
        );
    }
    let commands = status.commands().unwrap();
    wait_for("routing to block on the full session", || {
        commands.router.blocked.load(Ordering::Relaxed) >= 1
    })
    .await;
    assert!(
        c.recv_within(Duration::from_millis(300)).await.is_err(),
        "no fourth before an ack"
    );
    assert_eq!(commands.router.pending.load(Ordering::Relaxed), 7);
    assert_eq!(
        status.sessions.stats.refused_full.load(Ordering::Relaxed),
        0,
        "none refused"
    );
    // Now it acknowledges: the rest come, in order.
    for r in &unacked {
        c.send(&raw::puback(r.pkid)).await.unwrap();
    }
    let mut got = unacked;
    got.extend(receive(&mut c, false, 7).await);
    assert_eq!(
        payloads(&got),
        (0..10).map(|i| format!("s{i}")).collect::<Vec<_>>()
    );
    println!(
        "FAULT scenario=downlink-full-session published=10 delivered=10 missing=0 duplicates=0 blocked={}",
        commands.router.blocked.load(Ordering::Relaxed)
    );
    service.shutdown().await.unwrap();
    rig.cleanup().await;
}

#[tokio::test]
async fn a_held_command_survives_a_restart_and_reaches_a_device_that_subscribes_after_it() {
    let rig = Rig::new("").await;
    let service = rig.start().await;
    let status = service.status();
    consuming(&status).await;
    let d = dev(6);
    rig.publish(
        &format!("devices.{d}.commands.x"),
        b"held",
        BasicProperties::default(),
    )
    .await;
    let commands = status.commands().unwrap();
    wait_for("the held command", || {
        commands.router.held.load(Ordering::Relaxed) == 1
    })
    .await;
    service.shutdown().await.unwrap();

    // No new command arrives after the restart: the router reads the held one again by itself.
    let service = rig.start().await;
    let status = service.status();
    let commands = status.commands().unwrap();
    wait_for("the command held again after the restart", || {
        commands.router.held.load(Ordering::Relaxed) == 1
    })
    .await;
    let mut c = rig.device(&status, &d, &Connect::v4(&d)).await;
    subscribe(&mut c, false, &d).await;
    assert_eq!(payloads(&receive(&mut c, false, 1).await), ["held"]);
    service.shutdown().await.unwrap();
    rig.cleanup().await;
}
