//! The uplink benchmark: in one run, (a) a bare lapin publisher with publisher confirms and the
//! same confirm window, and (b) the gateway's forwarder draining a prepared backlog from the
//! queue, both to the same RabbitMQ (127.0.0.1:5672). Prints both rates and their ratio (the
//! goal: the gateway is not the bottleneck, ratio >= 0.9).
//!
//! ```text
//! cargo run --release -p gateway-tests --bin uplink-bench -- [--records 50000] [--window 256] [--payload 64]
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use gateway::config::{AmqpConfig, PayloadMode, RouteConfig, UplinkConfig};
use gateway::forwarder::{self, DeadLetters};
use gateway::queue::{NewRecord, Queue, QueueOptions};
use gateway::uplink::Routes;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use tokio_util::sync::CancellationToken;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn bare(records: usize, window: usize, payload: &[u8], exchange: &str) -> Result<f64> {
    let conn = Connection::connect(URL, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let start = Instant::now();
    let mut inflight = VecDeque::with_capacity(window);
    for i in 0..records {
        if inflight.len() >= window {
            let c: lapin::PublisherConfirm = inflight.pop_front().expect("non-empty");
            if !c.await?.is_ack() {
                bail!("nack");
            }
        }
        let mut h = FieldTable::default();
        h.insert(
            "device_id".into(),
            AMQPValue::LongString(LongString::from(&b"bench-0001"[..])),
        );
        h.insert(
            "mqtt_topic".into(),
            AMQPValue::LongString(LongString::from(&b"devices/bench-0001/t"[..])),
        );
        h.insert("mqtt_qos".into(), AMQPValue::ShortShortUInt(1));
        h.insert("gateway_seq".into(), AMQPValue::LongLongInt(i as i64));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("bare-{i}").as_str().into())
            .with_timestamp(0)
            .with_app_id("bare".into())
            .with_headers(h);
        inflight.push_back(
            ch.basic_publish(
                exchange.into(),
                "devices.bench-0001.t".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                props,
            )
            .await?,
        );
    }
    while let Some(c) = inflight.pop_front() {
        if !c.await?.is_ack() {
            bail!("nack");
        }
    }
    Ok(records as f64 / start.elapsed().as_secs_f64())
}

async fn gateway_drain(
    records: usize,
    window: usize,
    payload: &[u8],
    exchange: &str,
) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut o = QueueOptions::new(dir.path().join("data"));
    o.max_bytes = 4 << 30;
    o.segment_bytes = 64 << 20;
    let (queue, _) = Queue::open(o.clone())?;
    let mut last = 0;
    for _ in 0..records {
        last = queue
            .append(&NewRecord::new(
                "bench-0001",
                "devices/bench-0001/t",
                payload,
            ))
            .await?;
    }
    let dead = DeadLetters::open(&o)?;
    let routes = Arc::new(Routes::new(vec![RouteConfig {
        filter: "#".into(),
        uplinks: vec!["bench".into()],
        payload: PayloadMode::Raw,
    }]));
    let cfg = AmqpConfig {
        name: "bench".into(),
        url: URL.into(),
        password_env: None,
        exchange: exchange.into(),
        routing_key: "{topic}".into(),
        declare: false,
        declare_queue: None,
        window,
        confirm_timeout: Duration::from_secs(30),
        max_retries: 3,
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_secs(1),
        max_rate: None,
    };
    let stop = CancellationToken::new();
    let start = Instant::now();
    let (_stats, h) = forwarder::spawn(
        UplinkConfig::Amqp(cfg),
        "bench".into(),
        queue.clone(),
        routes,
        dead.clone(),
        stop.clone(),
    );
    loop {
        let acked = queue
            .stats()
            .cursors
            .iter()
            .find(|c| c.name == "bench")
            .map_or(0, |c| c.acked);
        if acked >= last {
            break;
        }
        if start.elapsed() > Duration::from_secs(600) {
            bail!("the forwarder did not drain the backlog in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = records as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    let _ = h.await;
    dead.close();
    queue.close();
    Ok(rate)
}

#[tokio::main]
async fn main() -> Result<()> {
    let records = arg("--records", 50_000);
    let window = arg("--window", 256);
    let payload = vec![0x5a_u8; arg("--payload", 64)];
    let tag = format!("uplink-bench-{}", std::process::id());
    let conn = Connection::connect(URL, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.exchange_declare(
        tag.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        tag.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        tag.as_str().into(),
        tag.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let a = bare(records, window, &payload, &tag).await?;
    ch.queue_purge(tag.as_str().into(), QueuePurgeOptions::default())
        .await?;
    let b = gateway_drain(records, window, &payload, &tag).await?;
    let _ = ch
        .queue_delete(tag.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(tag.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    println!(
        "{records} persistent messages, {}-byte payload, confirm window {window}",
        payload.len()
    );
    println!("bare lapin publisher:       {a:>9.0} msg/s");
    println!("gateway forwarder (backlog): {b:>8.0} msg/s");
    println!("ratio: {:.2}", b / a);
    Ok(())
}
