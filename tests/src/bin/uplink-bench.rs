//! The uplink benchmark: in one run, (a) a bare publisher (lapin with publisher confirms and a
//! sliding window; or an rskafka producer) and (b) the gateway's forwarder draining a prepared
//! backlog from the queue, with the same window, to the same broker, over a link of the given
//! round trip; then (c) the forwarder with the default config over the same link and, with a
//! round trip above zero, (d) the same at round trip 0, so that (c) / (d) says how much of its
//! rate the default keeps on a long link. Goals: (b) >= 0.95 x (a) at every round trip;
//! (c) >= 0.8 x (d) at 200 ms.
//!
//! The link is the fault proxy's shaper (`gateway/tests/fault_proxy/`): `--rtt-ms` splits the
//! round trip between the two directions, `--bandwidth-kbit` caps each direction.
//!
//! AMQP goes to RabbitMQ at `--url` (default the local one). With `--kafka`, the same for
//! Kafka against a tansu the bench starts on a free loopback port (`tansu` from `$TANSU`,
//! `~/.cargo/bin` or `PATH`), advertising the shaper so every broker connection is shaped: the
//! bare producer keeps one produce request of `--batch` records in flight per partition (the
//! forwarder's scheme: order without an idempotent producer), partitions in parallel. `--all`
//! runs both. `--repeat N` repeats each measurement and prints every figure.
//!
//! With `--mqtt`, towards a Mosquitto (`/usr/sbin/mosquitto`, the "cloud" broker) the bench
//! starts on a free loopback port behind the shaper, three ways of draining the same backlog:
//! (a) a Mosquitto bridge (a second, "edge" Mosquitto holding the backlog for its bridge
//! connection, which comes up once the backlog is in; `max_inflight_messages` = the window),
//! timed from its connection to the last message at a subscriber on the cloud broker; (b) a bare
//! rumqttc MQTT 5 publisher with the same window (QoS 1, the uplink's user properties), timed to
//! the last PUBACK; (c) the gateway's MQTT uplink draining the backlog from its queue, timed to
//! its cursor. The cloud broker's `max_inflight_messages` (its MQTT 5 receive maximum) is the
//! window too. `--bridge-protocol mqttv311` makes the bridge speak 3.1.1 (default mqttv50).
//!
//! ```text
//! cargo run --release -p gateway-tests --bin uplink-bench -- [--rtt-ms 200] [--records 20000] [--window 256] [--payload 64] [--url amqp://...]
//! cargo run --release -p gateway-tests --bin uplink-bench -- --kafka [--rtt-ms 200] [--records 20000] [--batch 256] [--devices 30]
//! cargo run --release -p gateway-tests --bin uplink-bench -- --mqtt [--rtt-ms 200] [--records 5000] [--window 256]
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use gateway::config::{
    AmqpConfig, KafkaConfig, MqttConfig, PayloadMode, RouteConfig, UplinkConfig,
};
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

#[path = "../../../gateway/tests/fault_proxy/mod.rs"]
mod fault_proxy;
#[path = "../../../gateway/tests/tansu/mod.rs"]
mod tansu;

use fault_proxy::{FaultProxy, Link};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn arg(name: &str, default: usize) -> usize {
    arg_str(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The link of `--rtt-ms` and `--bandwidth-kbit`.
fn link() -> Link {
    let l = Link::rtt(Duration::from_millis(arg("--rtt-ms", 0) as u64));
    match arg("--bandwidth-kbit", 0) {
        0 => l,
        k => l.capped(k as u64),
    }
}

/// `host:port` of an AMQP URL.
fn url_addr(url: &str) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = host.split('/').next().unwrap_or(host);
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5672")
    };
    host.to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{host} does not resolve"))
}

/// `url` with its host and port replaced by `addr` (through the shaper).
fn url_via(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (format!("{a}@"), h),
        None => (String::new(), rest),
    };
    let path = host.find('/').map_or("", |i| &host[i..]);
    format!("{scheme}://{auth}{addr}{path}")
}

async fn bare(
    url: &str,
    records: usize,
    window: usize,
    payload: &[u8],
    exchange: &str,
) -> Result<f64> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
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
    // The backlog is prepared, not measured: no fsync per append (50,000 in a row would take
    // minutes on a loaded machine). The forwarder's cursor writes are synced as always.
    o.fsync = gateway::queue::FsyncPolicy::Interval(Duration::from_secs(1));
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
    let spawned = Instant::now();
    let (stats, h) = forwarder::spawn(
        cfg,
        "bench".into(),
        queue.clone(),
        routes,
        dead.clone(),
        stop.clone(),
    );
    // The clock starts once the uplink is connected, as the bare publisher's does: the
    // handshake takes several round trips on a long link and is not what is measured.
    while stats.state() != forwarder::UplinkState::Connected {
        if spawned.elapsed() > Duration::from_secs(60) {
            bail!("the forwarder did not connect in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let start = Instant::now();
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

/// The AMQP uplink of the bench, from the config's defaults; `window` replaces the default's.
fn amqp_config(url: &str, exchange: &str, window: Option<usize>) -> Result<UplinkConfig> {
    let mut c: AmqpConfig = toml::from_str(&format!(
        "name = \"bench\"\nurl = {url:?}\nexchange = {exchange:?}\n"
    ))?;
    if let Some(w) = window {
        c.window = w;
    }
    c.confirm_timeout = Duration::from_secs(30);
    Ok(UplinkConfig::Amqp(c))
}

/// The Kafka uplink of the bench, from the config's defaults (linger included); `batch`
/// replaces the default `max_batch`.
fn kafka_config(bootstrap: &str, topic: &str, batch: Option<usize>) -> Result<UplinkConfig> {
    let mut c: KafkaConfig = toml::from_str(&format!(
        "name = \"bench\"\nbootstrap = [{bootstrap:?}]\ntopic = {topic:?}\n"
    ))?;
    if let Some(b) = batch {
        c.max_batch = b;
    }
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
    // Records per partition, in order.
    let mut lanes: Vec<Vec<Record>> = vec![Vec::new(); partitions];
    for seq in 0..records {
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
        lanes[p].push(Record {
            key: Some(id.clone().into_bytes()),
            value: Some(payload.to_vec()),
            headers,
            timestamp: DateTime::<Utc>::from_timestamp_micros(now_us()).unwrap_or_default(),
        });
    }
    let start = Instant::now();
    // One request in flight per partition, partitions in parallel.
    let produces = lanes
        .into_iter()
        .zip(&clients)
        .map(|(mut lane, client)| async move {
            while !lane.is_empty() {
                let rest = lane.split_off(batch.min(lane.len()));
                client
                    .produce(
                        std::mem::replace(&mut lane, rest),
                        Compression::NoCompression,
                    )
                    .await?;
            }
            Ok::<(), anyhow::Error>(())
        });
    for r in futures_util::future::join_all(produces).await {
        r?;
    }
    Ok(records as f64 / start.elapsed().as_secs_f64())
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Runs `f` `--repeat` times; returns every figure.
async fn repeat<F, Fut>(mut f: F) -> Result<Vec<f64>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<f64>>,
{
    let mut out = Vec::new();
    for _ in 0..arg("--repeat", 1).max(1) {
        out.push(f().await?);
    }
    Ok(out)
}

fn figures(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:>7.0}"))
        .collect::<Vec<_>>()
        .join(" /")
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Prints the figures of one run: (a) bare, (b) forwarder, (c) default config, (d) default at
/// RTT 0 (if measured).
fn report(unit: &str, a: &[f64], b: &[f64], c: &[f64], d: Option<&[f64]>) {
    let l = link();
    println!(
        "link: rtt {} ms, bandwidth {}",
        (l.up_delay + l.down_delay).as_millis(),
        l.kbit_per_s
            .map_or("unlimited".to_string(), |k| format!("{k} kbit/s each way"))
    );
    println!("bare publisher, same window:        {} {unit}", figures(a));
    println!("gateway forwarder, same window:     {} {unit}", figures(b));
    println!("ratio forwarder / bare: {:.2}", mean(b) / mean(a));
    println!("gateway forwarder, default config:  {} {unit}", figures(c));
    if let Some(d) = d {
        println!("  the same at rtt 0:                {} {unit}", figures(d));
        println!(
            "default config at this rtt / at rtt 0: {:.2}",
            mean(c) / mean(d)
        );
    }
}

async fn kafka_bench(records: usize, payload: &[u8]) -> Result<()> {
    let batch = arg("--batch", 256);
    let devices = arg("--devices", 30);
    let (proxy, broker) = loop {
        let port = tansu::free_port();
        let target: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let proxy = FaultProxy::start_shaped(target, link()).await?;
        let advertised = proxy.addr().to_string();
        match tokio::task::spawn_blocking(move || {
            tansu::Tansu::start_advertising(port, &advertised)
        })
        .await?
        {
            Ok(t) => break (proxy, t),
            Err(why) => eprintln!("tansu on port {port}: {why}; trying another port"),
        }
    };
    let bootstrap = proxy.addr().to_string();
    let mut n = 0;
    let mut topic = || {
        n += 1;
        let t = format!("bench-{}-{n}", std::process::id());
        broker.create_topic(&t, 3);
        t
    };
    let mut topics = Vec::new();
    let a = repeat(|| {
        let t = topic();
        topics.push(t.clone());
        let bootstrap = bootstrap.clone();
        async move { bare_kafka(&bootstrap, &t, records, batch, devices, payload).await }
    })
    .await?;
    let b = repeat(|| {
        let t = topic();
        let cfg = kafka_config(&bootstrap, &t, Some(batch));
        async move { gateway_drain(records, devices, payload, cfg?).await }
    })
    .await?;
    let c = repeat(|| {
        let t = topic();
        let cfg = kafka_config(&bootstrap, &t, None);
        async move { gateway_drain(records, devices, payload, cfg?).await }
    })
    .await?;
    let d = if link() != Link::default() {
        proxy.set_link(Link::default());
        Some(
            repeat(|| {
                let t = topic();
                let cfg = kafka_config(&bootstrap, &t, None);
                async move { gateway_drain(records, devices, payload, cfg?).await }
            })
            .await?,
        )
    } else {
        None
    };
    drop(proxy);
    tokio::task::spawn_blocking(move || drop(broker)).await?;
    println!(
        "Kafka (tansu 0.6, sqlite, on loopback): {records} records, {}-byte payload, {devices} \
         devices over 3 partitions, acks=all, no compression; same window = max_batch {batch}, \
         one request in flight per partition; default config = max_batch {}, window {}",
        payload.len(),
        gateway::config::DEFAULT_KAFKA_MAX_BATCH,
        gateway::config::DEFAULT_KAFKA_WINDOW,
    );
    report("rec/s", &a, &b, &c, d.as_deref());
    Ok(())
}

async fn amqp_bench(records: usize, payload: &[u8]) -> Result<()> {
    let window = arg("--window", 256);
    let url = arg_str("--url").unwrap_or_else(|| URL.to_string());
    let proxy = FaultProxy::start_shaped(url_addr(&url)?, link()).await?;
    let shaped = url_via(&url, proxy.addr());
    let tag = format!("uplink-bench-{}", std::process::id());
    // Set-up and purges go to the broker directly.
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
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
    let purge = || async {
        ch.queue_purge(tag.as_str().into(), QueuePurgeOptions::default())
            .await
            .map(|_| ())
    };
    let mut a = Vec::new();
    let mut b = Vec::new();
    let mut c = Vec::new();
    for _ in 0..arg("--repeat", 1).max(1) {
        a.push(bare(&shaped, records, window, payload, &tag).await?);
        purge().await?;
        b.push(
            gateway_drain(
                records,
                1,
                payload,
                amqp_config(&shaped, &tag, Some(window))?,
            )
            .await?,
        );
        purge().await?;
        c.push(gateway_drain(records, 1, payload, amqp_config(&shaped, &tag, None)?).await?);
        purge().await?;
    }
    let d = if link() != Link::default() {
        proxy.set_link(Link::default());
        let mut d = Vec::new();
        for _ in 0..arg("--repeat", 1).max(1) {
            d.push(gateway_drain(records, 1, payload, amqp_config(&shaped, &tag, None)?).await?);
            purge().await?;
        }
        Some(d)
    } else {
        None
    };
    let _ = ch
        .queue_delete(tag.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(tag.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    println!(
        "AMQP ({}): {records} persistent messages, {}-byte payload; same window = {window} \
         (sliding, publisher confirms); default config = window {}",
        gateway::uplink::amqp::masked_url(&url),
        payload.len(),
        gateway::config::DEFAULT_WINDOW,
    );
    report("msg/s", &a, &b, &c, d.as_deref());
    Ok(())
}

/// A loopback port in 20000-32000 that is free when we look.
fn free_port() -> Result<u16> {
    for _ in 0..200 {
        let port = 20_000 + std::process::id() as u16 % 97 * 100 + rand_u16() % 100;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in 20000-32000")
}

fn rand_u16() -> u16 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (n / 1000 % 65_536) as u16
}

/// A Mosquitto of the bench's own, killed when dropped.
struct Mosquitto {
    child: std::process::Child,
    port: u16,
}

impl Mosquitto {
    fn start(dir: &std::path::Path, name: &str, extra: &str) -> Result<Mosquitto> {
        let port = free_port()?;
        let conf = dir.join(format!("{name}.conf"));
        let data = dir.join(name);
        std::fs::create_dir_all(&data)?;
        std::fs::write(
            &conf,
            format!(
                "user root\npersistence true\npersistence_location {}/\nallow_anonymous true\n\
                 max_queued_messages 10000000\nlistener {port} 127.0.0.1\n{extra}",
                data.display()
            ),
        )?;
        let child = std::process::Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?)
            .spawn()?;
        let m = Mosquitto { child, port };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("mosquitto {name} did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A subscriber on `port` (QoS 1) that exits after `n` messages.
fn subscriber(port: u16, n: usize) -> Result<std::process::Child> {
    Ok(std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-q", "1", "-t", "gw/#", "-C", &n.to_string(), "-F", "%U"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?)
}

/// Waits until the subscriber has its `n` messages.
fn subscriber_done(child: std::process::Child, n: usize) -> Result<()> {
    let out = child.wait_with_output()?;
    let got = String::from_utf8_lossy(&out.stdout).lines().count();
    if got < n {
        bail!("the subscriber got {got} of {n}");
    }
    Ok(())
}

/// (a) A Mosquitto bridge draining a backlog of `records` from an edge Mosquitto to `cloud`
/// through `proxy` (refusing until the backlog is in).
async fn bridge(
    dir: &std::path::Path,
    cloud: &Mosquitto,
    proxy: &FaultProxy,
    records: usize,
    window: usize,
    payload: &[u8],
) -> Result<f64> {
    proxy.set_mode(fault_proxy::Mode::Refuse);
    let edge = Mosquitto::start(
        dir,
        "edge",
        &format!(
            "max_inflight_messages {window}\n\
             connection cloud\naddress {}\ntopic devices/# out 1 \"\" gw/\n\
             cleansession false\nclientid edge-bridge-{}\nbridge_protocol_version {}\n\
             restart_timeout 1\n",
            proxy.addr(),
            std::process::id(),
            arg_str("--bridge-protocol").unwrap_or_else(|| "mqttv50".into())
        ),
    )?;
    let sub = subscriber(cloud.port, records)?;
    // The backlog, at QoS 1, into the edge broker.
    let body = String::from_utf8_lossy(payload).replace('\n', " ");
    let mut lines = String::new();
    for _ in 0..records {
        lines.push_str(&body);
        lines.push('\n');
    }
    let mut p = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &edge.port.to_string()])
        .args(["-q", "1", "-l", "-t", "devices/bench-0001/t"])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = p.stdin.take().ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        stdin.write_all(lines.as_bytes())?;
    }
    if !p.wait()?.success() {
        bail!("mosquitto_pub into the edge broker failed");
    }
    let before = proxy.accepted();
    proxy.set_mode(fault_proxy::Mode::Pass);
    // The clock starts when the bridge's connection is made (the others' start at their
    // CONNACK, a round trip later): its reconnect backoff is not what is measured.
    let wait = Instant::now();
    while proxy.accepted() == before {
        if wait.elapsed() > Duration::from_secs(60) {
            bail!("the bridge did not connect in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let start = Instant::now();
    tokio::task::spawn_blocking(move || subscriber_done(sub, records)).await??;
    let rate = records as f64 / start.elapsed().as_secs_f64();
    drop(edge);
    std::fs::remove_dir_all(dir.join("edge"))?;
    Ok(rate)
}

/// (b) A bare rumqttc MQTT 5 publisher with `window` in flight; records/s to the last PUBACK.
async fn bare_mqtt(
    addr: std::net::SocketAddr,
    records: usize,
    window: usize,
    payload: &[u8],
) -> Result<f64> {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};
    let mut o = MqttOptions::new(
        format!("bare-{}", std::process::id()),
        addr.ip().to_string(),
        addr.port(),
    );
    o.set_keep_alive(Duration::from_secs(30));
    o.set_outgoing_inflight_upper_limit(u16::try_from(window).unwrap_or(u16::MAX));
    let (client, mut events) = AsyncClient::new(o, window * 2);
    let payload = payload.to_vec();
    let mut acked = 0usize;
    let mut start = None;
    let publisher = tokio::spawn(async move {
        for i in 0..records {
            let props = PublishProperties {
                content_type: None,
                user_properties: vec![
                    ("message_id".into(), format!("bare-{i}")),
                    ("gateway_seq".into(), i.to_string()),
                    ("device_id".into(), "bench-0001".into()),
                    ("mqtt_topic".into(), "devices/bench-0001/t".into()),
                ],
                ..PublishProperties::default()
            };
            if client
                .publish_with_properties(
                    "gw/devices/bench-0001/t",
                    QoS::AtLeastOnce,
                    false,
                    payload.clone(),
                    props,
                )
                .await
                .is_err()
            {
                return;
            }
        }
    });
    while acked < records {
        match events.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => start = Some(Instant::now()),
            Ok(Event::Incoming(Incoming::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => bail!("bare publisher: {e}"),
        }
    }
    let rate = records as f64 / start.map_or(1e-9, |s| s.elapsed().as_secs_f64());
    publisher.abort();
    Ok(rate)
}

/// The MQTT uplink of the bench, from the config's defaults, with `window`.
fn mqtt_config(addr: std::net::SocketAddr, window: usize) -> Result<UplinkConfig> {
    let mut c: MqttConfig = toml::from_str(&format!(
        "name = \"bench\"\nurl = \"mqtt://{addr}\"\ntopic = \"gw/{{topic}}\"\n"
    ))?;
    c.window = window;
    c.client_id = Some(format!("bench-gw-{}-{}", std::process::id(), rand_u16()));
    c.confirm_timeout = Duration::from_secs(30);
    Ok(UplinkConfig::Mqtt(c))
}

async fn mqtt_bench(records: usize, payload: &[u8]) -> Result<()> {
    let window = arg("--window", 256);
    let dir = tempfile::tempdir()?;
    let cloud = Mosquitto::start(
        dir.path(),
        "cloud",
        &format!("max_inflight_messages {window}\n"),
    )?;
    let cloud_addr: std::net::SocketAddr = format!("127.0.0.1:{}", cloud.port).parse()?;
    let proxy = FaultProxy::start_shaped(cloud_addr, link()).await?;
    let mut a = Vec::new();
    let mut b = Vec::new();
    let mut c = Vec::new();
    for _ in 0..arg("--repeat", 1).max(1) {
        a.push(bridge(dir.path(), &cloud, &proxy, records, window, payload).await?);
        b.push(bare_mqtt(proxy.addr(), records, window, payload).await?);
        c.push(gateway_drain(records, 1, payload, mqtt_config(proxy.addr(), window)?).await?);
    }
    let l = link();
    println!(
        "MQTT to Mosquitto 2.0.11: {records} messages, QoS 1, {}-byte payload, window {window}; \
         link: rtt {} ms",
        payload.len(),
        (l.up_delay + l.down_delay).as_millis()
    );
    println!("(a) Mosquitto bridge:               {} msg/s", figures(&a));
    println!("(b) bare MQTT 5 publisher:          {} msg/s", figures(&b));
    println!("(c) gateway MQTT uplink:            {} msg/s", figures(&c));
    println!(
        "ratios: uplink / bridge {:.2}, uplink / bare {:.2}",
        mean(&c) / mean(&a),
        mean(&c) / mean(&b)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let records = arg("--records", 20_000);
    let payload = vec![0x5a_u8; arg("--payload", 64)];
    if flag("--kafka") {
        return kafka_bench(records, &payload).await;
    }
    if flag("--mqtt") {
        return mqtt_bench(records, &payload).await;
    }
    amqp_bench(records, &payload).await?;
    if flag("--all") {
        println!();
        kafka_bench(records, &payload).await?;
    }
    Ok(())
}
