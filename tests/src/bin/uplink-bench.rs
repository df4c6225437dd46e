//! The uplink benchmark: in one run, (a) a bare lapin publisher with publisher confirms and the
//! same confirm window, and (b) the gateway's forwarder draining a prepared backlog from the
//! queue, both to the same RabbitMQ (127.0.0.1:5672). Prints both rates and their ratio (the
//! goal: the gateway is not the bottleneck, ratio >= 0.9).
//!
//! With `--kafka`, the same for Kafka against a tansu broker the bench starts on a free loopback
//! port (`tansu` from `$TANSU`, `~/.cargo/bin` or `PATH`): (a) a bare rskafka producer that sends
//! batches of the same size the same way the uplink does (split by key partition, one produce
//! per partition, concurrently, acks=all, the same headers), and (b) the forwarder draining a
//! prepared backlog of the same records. `--all` runs both benchmarks.
//!
//! ```text
//! cargo run --release -p gateway-tests --bin uplink-bench -- [--records 50000] [--window 256] [--payload 64]
//! cargo run --release -p gateway-tests --bin uplink-bench -- --kafka [--records 50000] [--batch 256] [--devices 30] [--payload 64]
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use gateway::config::{AmqpConfig, KafkaConfig, PayloadMode, RouteConfig, UplinkConfig};
use gateway::forwarder::Routes;
use gateway::forwarder::{self, DeadLetters};
use gateway::queue::{NewRecord, Queue, QueueOptions};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use tokio_util::sync::CancellationToken;

#[path = "../../../gateway/tests/tansu/mod.rs"]
mod tansu;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

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

/// The forwarder of `cfg` (named "bench") draining a prepared backlog of `records` records,
/// spread over `devices` devices; records/s.
async fn gateway_drain(
    records: usize,
    devices: usize,
    payload: &[u8],
    cfg: UplinkConfig,
) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut o = QueueOptions::new(dir.path().join("data"));
    o.max_bytes = 4 << 30;
    o.segment_bytes = 64 << 20;
    let (queue, _) = Queue::open(o.clone())?;
    let mut last = 0;
    let names: Vec<(String, String)> = (0..devices.max(1))
        .map(|d| {
            let id = format!("bench-{d:04}");
            let topic = format!("devices/{id}/t");
            (id, topic)
        })
        .collect();
    for i in 0..records {
        let (id, topic) = &names[i % names.len()];
        last = queue.append(&NewRecord::new(id, topic, payload)).await?;
    }
    let dead = DeadLetters::open(&o)?;
    let routes = Arc::new(Routes::new(vec![RouteConfig {
        filter: "#".into(),
        uplinks: vec!["bench".into()],
        payload: PayloadMode::Raw,
    }]));
    let stop = CancellationToken::new();
    let start = Instant::now();
    let (_stats, h) = forwarder::spawn(
        cfg,
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

/// The AMQP uplink of the bench, from the config file's defaults.
fn amqp_config(exchange: &str, window: usize) -> Result<UplinkConfig> {
    let mut c: AmqpConfig = toml::from_str(&format!(
        "name = \"bench\"\nurl = {URL:?}\nexchange = {exchange:?}\n"
    ))?;
    c.window = window;
    c.confirm_timeout = Duration::from_secs(30);
    Ok(UplinkConfig::Amqp(c))
}

/// The Kafka uplink of the bench, from the config file's defaults (linger included).
fn kafka_config(bootstrap: &str, topic: &str, batch: usize) -> Result<UplinkConfig> {
    let mut c: KafkaConfig = toml::from_str(&format!(
        "name = \"bench\"\nbootstrap = [{bootstrap:?}]\ntopic = {topic:?}\n"
    ))?;
    c.max_batch = batch;
    c.confirm_timeout = Duration::from_secs(30);
    Ok(UplinkConfig::Kafka(c))
}

/// A bare rskafka producer: batches of `batch` records, each split by key partition (the Java
/// partitioner, as the uplink does), one produce per partition, concurrently, acks=all, with the
/// headers the uplink sends. Records/s.
async fn bare_kafka(
    bootstrap: &str,
    topic: &str,
    records: usize,
    batch: usize,
    devices: usize,
    payload: &[u8],
) -> Result<f64> {
    use std::collections::BTreeMap;

    use gateway::uplink::murmur2::partition_for_key;
    use rskafka::chrono::{DateTime, Utc};
    use rskafka::client::partition::{Compression, UnknownTopicHandling};
    use rskafka::client::ClientBuilder;
    use rskafka::record::Record;

    let client = ClientBuilder::new(vec![bootstrap.to_string()])
        .client_id("bare")
        .build()
        .await?;
    let partitions = client
        .list_topics()
        .await?
        .into_iter()
        .find(|t| t.name == topic)
        .map(|t| t.partitions.len())
        .unwrap_or(0);
    if partitions == 0 {
        bail!("topic {topic} not found");
    }
    let mut clients = Vec::new();
    for p in 0..partitions {
        clients.push(
            client
                .partition_client(topic, i32::try_from(p)?, UnknownTopicHandling::Retry)
                .await?,
        );
    }
    let ids: Vec<String> = (0..devices.max(1))
        .map(|d| format!("bench-{d:04}"))
        .collect();
    let start = Instant::now();
    let mut i = 0;
    while i < records {
        let n = batch.min(records - i);
        let mut groups: Vec<Vec<Record>> = vec![Vec::new(); partitions];
        for seq in i..i + n {
            let id = &ids[seq % ids.len()];
            let mut headers = BTreeMap::new();
            headers.insert("device_id".to_string(), id.clone().into_bytes());
            headers.insert(
                "mqtt_topic".to_string(),
                format!("devices/{id}/t").into_bytes(),
            );
            headers.insert("mqtt_qos".to_string(), b"1".to_vec());
            headers.insert("gateway_seq".to_string(), seq.to_string().into_bytes());
            headers.insert("message_id".to_string(), format!("bare-{seq}").into_bytes());
            let p = partition_for_key(id.as_bytes(), u32::try_from(partitions)?) as usize;
            groups[p].push(Record {
                key: Some(id.clone().into_bytes()),
                value: Some(payload.to_vec()),
                headers,
                timestamp: DateTime::<Utc>::from_timestamp_micros(now_us()).unwrap_or_default(),
            });
        }
        let produces = groups
            .into_iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .map(|(p, g)| clients[p].produce(g, Compression::NoCompression));
        for r in futures_util::future::join_all(produces).await {
            r?;
        }
        i += n;
    }
    Ok(records as f64 / start.elapsed().as_secs_f64())
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

async fn kafka_bench(records: usize, payload: &[u8]) -> Result<()> {
    let batch = arg("--batch", 256);
    let devices = arg("--devices", 30);
    let broker = tokio::task::spawn_blocking(tansu::Tansu::start).await?;
    let bootstrap = broker.bootstrap();
    let (bare_topic, gw_topic) = (
        format!("bench-bare-{}", std::process::id()),
        format!("bench-gw-{}", std::process::id()),
    );
    broker.create_topic(&bare_topic, 3);
    broker.create_topic(&gw_topic, 3);
    let a = bare_kafka(&bootstrap, &bare_topic, records, batch, devices, payload).await?;
    let cfg = kafka_config(&bootstrap, &gw_topic, batch)?;
    let linger = cfg.linger();
    let b = gateway_drain(records, devices, payload, cfg).await?;
    tokio::task::spawn_blocking(move || drop(broker)).await?;
    println!(
        "Kafka (tansu 0.6, sqlite, on loopback): {records} records, {}-byte payload, {devices} \
         devices over 3 partitions, batch {batch}, acks=all, no compression",
        payload.len()
    );
    println!("bare rskafka producer:       {a:>8.0} rec/s");
    println!("gateway forwarder (backlog): {b:>8.0} rec/s (linger {linger:?})");
    println!("ratio: {:.2}", b / a);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let records = arg("--records", 50_000);
    let window = arg("--window", 256);
    let payload = vec![0x5a_u8; arg("--payload", 64)];
    if flag("--kafka") {
        return kafka_bench(records, &payload).await;
    }
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
    let b = gateway_drain(records, 1, &payload, amqp_config(&tag, window)?).await?;
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
    if flag("--all") {
        println!();
        kafka_bench(records, &payload).await?;
    }
    Ok(())
}
