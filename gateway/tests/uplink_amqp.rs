//! The AMQP uplink against the real RabbitMQ on 127.0.0.1:5672: records from the queue arrive in
//! order per device with every property and header, the cursor advances only over confirmed
//! records, and an unroutable record goes to the dead letters with the broker's reason.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gateway::config::{AmqpConfig, PayloadMode, RouteConfig, UplinkConfig};
use gateway::forwarder::Routes;
use gateway::forwarder::{self, DeadLetters};
use gateway::queue::{NewRecord, Queue, QueueOptions};
use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::AMQPValue;
use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn unique(prefix: &str) -> String {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{n}", std::process::id())
}

fn amqp(name: &str, exchange: &str, queue: Option<&str>) -> AmqpConfig {
    AmqpConfig {
        name: name.into(),
        url: URL.into(),
        urls: Vec::new(),
        password_env: None,
        ca_file: None,
        exchange: exchange.into(),
        routing_key: "{topic}".into(),
        declare: true,
        declare_queue: queue.map(str::to_string),
        window: 64,
        window_bytes: gateway::config::DEFAULT_WINDOW_BYTES,
        confirm_timeout: Duration::from_secs(10),
        max_retries: 3,
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_secs(1),
        max_rate: None,
    }
}

fn header<'a>(h: &'a lapin::types::FieldTable, k: &str) -> Option<&'a AMQPValue> {
    h.inner().get(k)
}

fn header_str(h: &lapin::types::FieldTable, k: &str) -> String {
    match header(h, k) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {k}: {other:?}"),
    }
}

#[tokio::test]
async fn records_reach_rabbitmq_in_order_with_properties_and_unroutable_ones_are_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = QueueOptions::new(dir.path().join("data"));
    o.segment_bytes = 1 << 20;
    o.max_bytes = 64 << 20;
    let (queue, _) = Queue::open(o.clone()).unwrap();
    let dead = DeadLetters::open(&o).unwrap();

    let exchange = unique("gw-test-x");
    let qname = unique("gw-test-q");
    let lost_exchange = unique("gw-test-lost");
    let routes = Arc::new(Routes::new(vec![
        RouteConfig {
            filter: "devices/#".into(),
            uplinks: vec!["rmq".into()],
            payload: PayloadMode::Raw,
        },
        RouteConfig {
            filter: "other/#".into(),
            uplinks: vec!["lost".into()],
            payload: PayloadMode::Raw,
        },
    ]));

    // 3 devices x 100 records, interleaved; one carries MQTT 5 user properties.
    let props = vec![("unit".to_string(), "C".to_string())];
    let mut expected: Vec<(String, u64)> = Vec::new();
    for i in 0..100u32 {
        for d in ["dev-a", "dev-b", "dev-c"] {
            let topic = format!("devices/{d}/telemetry");
            let payload = format!("{d}:{i}");
            let mut r = NewRecord::new(d, &topic, payload.as_bytes());
            r.user_properties = &props;
            r.content_type = Some("text/plain");
            let seq = queue.append(&r).await.unwrap();
            expected.push((d.to_string(), seq));
        }
    }
    let unroutable = queue
        .append(&NewRecord::new("dev-z", "other/x", b"nobody listens"))
        .await
        .unwrap();

    let stop = CancellationToken::new();
    let (stats, h1) = forwarder::spawn(
        UplinkConfig::Amqp(amqp("rmq", &exchange, Some(&qname))),
        "testgw".into(),
        queue.clone(),
        routes.clone(),
        dead.clone(),
        stop.clone(),
    );
    let (lost_stats, h2) = forwarder::spawn(
        UplinkConfig::Amqp(amqp("lost", &lost_exchange, None)),
        "testgw".into(),
        queue.clone(),
        routes.clone(),
        dead.clone(),
        stop.clone(),
    );

    // Consume everything with an independent client (the queue exists once the forwarder
    // declared it; until then a basic.get would close the channel).
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stats.state() != forwarder::UplinkState::Connected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "state {:?}",
            stats.state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ch = conn.create_channel().await.unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < expected.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} arrived",
            got.len()
        );
        match ch
            .basic_get(qname.as_str().into(), BasicGetOptions { no_ack: true })
            .await
        {
            Ok(Some(m)) => got.push(m.delivery),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    // Order per device and the properties of each message.
    let mut seen: Vec<(String, u64)> = Vec::new();
    for d in &got {
        let p = &d.properties;
        let h = p.headers().as_ref().unwrap();
        let device = header_str(h, "device_id");
        let seq = match header(h, "gateway_seq") {
            Some(AMQPValue::LongLongInt(s)) => *s as u64,
            other => panic!("gateway_seq: {other:?}"),
        };
        assert_eq!(
            header_str(h, "mqtt_topic"),
            format!("devices/{device}/telemetry")
        );
        assert_eq!(header(h, "mqtt_qos"), Some(&AMQPValue::ShortShortUInt(1)));
        assert_eq!(header_str(h, "unit"), "C", "MQTT 5 user property as header");
        assert_eq!(p.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            p.message_id().as_ref().map(|s| s.as_str().to_string()),
            Some(format!("testgw-{seq}"))
        );
        assert_eq!(p.app_id().as_ref().map(|s| s.as_str()), Some("testgw"));
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("text/plain")
        );
        assert!(p.timestamp().is_some());
        assert_eq!(
            d.routing_key.as_str(),
            format!("devices.{device}.telemetry")
        );
        seen.push((device, seq));
    }
    for dev in ["dev-a", "dev-b", "dev-c"] {
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
        assert_eq!(have, want, "{dev}: every record once, in order");
    }

    // The cursor advanced over what RabbitMQ confirmed; the unroutable record is a dead letter.
    let last = expected.last().unwrap().1;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = queue.stats();
        let rmq = s.cursors.iter().find(|c| c.name == "rmq").unwrap();
        let lost = s.cursors.iter().find(|c| c.name == "lost").unwrap();
        if rmq.acked >= last && lost.acked >= unroutable && dead.count() >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cursors {:?}, lost uplink {lost_stats:?}",
            s.cursors
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stats.confirmed.load(std::sync::atomic::Ordering::Relaxed) >= 300);
    let mut dl = dead.queue().reader("check").unwrap();
    let letters = dl.read_now(10, usize::MAX).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].topic, "other/x");
    let reason = letters[0]
        .user_properties
        .iter()
        .find(|(k, _)| k == "x-dead-letter-reason")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert!(reason.contains("NO_ROUTE"), "{reason}");

    stop.cancel();
    let _ = h1.await;
    let _ = h2.await;
    let _ = ch
        .queue_delete(qname.as_str().into(), QueueDeleteOptions::default())
        .await;
    for x in [&exchange, &lost_exchange] {
        let _ = ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    dead.close();
    queue.close();
}
