//! The downlink benchmark: commands from RabbitMQ through the real `gateway` binary's AMQP
//! downlink to N subscribed devices (raw MQTT 3.1.1 over mutual TLS, QoS 1, each device on its
//! own `devices/<id>/commands/#`), and, in the same run, a bare lapin consumer (manual acks, the
//! same prefetch) draining the same number of commands from a queue of its own. Prints
//! commands/s and broker-to-device latency (a timestamp in each payload, taken just before the
//! publish) for both and their ratio. Figures, not a test.
//!
//! The commands are published first, with publisher confirms (a window of `--window`
//! unconfirmed), round robin over the devices; the clock runs from the first publish to the last
//! delivery. The gateway stores each command with `fsync` before it acks it upstream and before
//! any device gets it; the bare consumer stores nothing.
//!
//! ```text
//! cargo build --release -p gateway-tests --bin downlink-bench -p gateway --bin gateway
//! target/release/downlink-bench --devices 1000 --commands 20000
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use gateway_tests::bench::{
    generate_certs, mqtt_connect, nanos, pct, start_gateway, subscriber, Deliveries,
};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

struct Args {
    gateway: PathBuf,
    devices: usize,
    commands: u64,
    window: usize,
    prefetch: u16,
    payload: usize,
    json: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: downlink-bench [--gateway PATH] [--devices N] [--commands K] [--window W] \
         [--prefetch P] [--payload BYTES (>= 8)] [--json]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let mut a = Args {
        gateway: exe_dir.join("gateway"),
        devices: 1000,
        commands: 20_000,
        window: 1024,
        prefetch: 64,
        payload: 64,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--gateway" => a.gateway = PathBuf::from(val()),
            "--devices" => a.devices = num(val()).clamp(1, 10_000) as usize,
            "--commands" => a.commands = num(val()).max(1),
            "--window" => a.window = num(val()).clamp(1, 65_535) as usize,
            "--prefetch" => a.prefetch = num(val()).clamp(1, 65_535) as u16,
            "--payload" => a.payload = num(val()).clamp(8, 1 << 20) as usize,
            "--json" => a.json = true,
            _ => usage(),
        }
    }
    a
}

fn id(i: usize) -> String {
    format!("dev-{:05}", i + 1)
}

/// Publishes `a.commands` commands round robin over the devices to `exchange`, each payload
/// starting with a [`nanos`] timestamp, with at most `a.window` unconfirmed. Returns when all
/// are confirmed.
async fn publish(a: &Args, exchange: &str, epoch: Instant) -> Result<()> {
    let conn = Connection::connect(URL, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let keys: Vec<String> = (0..a.devices)
        .map(|i| format!("devices.{}.commands.x", id(i)))
        .collect();
    let mut payload = vec![0x5a_u8; a.payload];
    let mut confirms = futures_util::stream::FuturesOrdered::new();
    for n in 0..a.commands {
        if confirms.len() >= a.window {
            if let Some(c) = confirms.next().await {
                let c: lapin::Result<lapin::Confirmation> = c;
                if !c?.is_ack() {
                    bail!("a command was nacked");
                }
            }
        }
        payload[..8].copy_from_slice(&nanos(epoch).to_be_bytes());
        let confirm = ch
            .basic_publish(
                exchange.into(),
                keys[n as usize % keys.len()].as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        confirms.push_back(confirm);
    }
    while let Some(c) = confirms.next().await {
        if !c?.is_ack() {
            bail!("a command was nacked");
        }
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}

async fn declare(ch: &lapin::Channel, exchange: &str, queue: Option<&str>) -> Result<()> {
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    if let Some(q) = queue {
        ch.queue_declare(
            q.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            q.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    delivered: u64,
    seconds: f64,
    p50_us: u64,
    p99_us: u64,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.delivered as f64 / self.seconds.max(1e-9)
    }
}

async fn via_gateway(a: &Args, tag: &str) -> Result<Figures> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    generate_certs(&a.gateway, a.devices, &certs)?;
    let (exchange, queue) = (format!("dlb-x-{tag}"), format!("dlb-q-{tag}"));
    let extra = format!(
        "[sessions]\nmax_queued_messages = 10000\nmax_queued_bytes = \"16 MiB\"\nmax_bytes = \"1 GiB\"\n\n\
         [downlink]\nmax_bytes = \"1 GiB\"\n\n\
         [[downlinks]]\nname = \"bench\"\ntype = \"amqp\"\nurl = \"{URL}\"\nqueue = \"{queue}\"\n\
         declare = true\nexchange = \"{exchange}\"\nprefetch = {}\n",
        a.prefetch
    );
    let (child, addr) = start_gateway(&a.gateway, dir.path(), &certs, 64, None, &extra).await?;
    let d = Deliveries::new(true);
    let stop = CancellationToken::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel(a.devices);
    let mut subs = Vec::new();
    for i in 0..a.devices {
        let device = id(i);
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = TlsConnector::from(gateway_tests::device_tls(&certs, Some(&device)));
        let mut s = tls
            .connect(ServerName::try_from("localhost")?.to_owned(), tcp)
            .await?;
        let rest = mqtt_connect(&mut s, &device, 60).await?;
        let (d, tx, stop) = (d.clone(), tx.clone(), stop.clone());
        let filter = format!("devices/{device}/commands/#");
        subs.push(tokio::spawn(async move {
            subscriber(s, rest, device, &filter, 1, d, tx, stop).await
        }));
    }
    for _ in 0..a.devices {
        rx.recv()
            .await
            .context("a subscriber ended before its SUBACK")?;
    }
    let conn = Connection::connect(URL, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    // The downlink declares its queue and binding when it connects: wait for the binding.
    let t = Instant::now();
    loop {
        if ch
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok_and(|q| q.consumer_count() > 0)
        {
            break;
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!("the gateway's downlink did not start consuming {queue}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = nanos(d.epoch);
    publish(a, &exchange, d.epoch).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while d.delivered.load(Ordering::Relaxed) < a.commands && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let mut lat = Vec::new();
    for s in subs {
        lat.extend(s.await??);
    }
    lat.sort_unstable();
    let seconds = (d
        .last_delivery
        .load(Ordering::Relaxed)
        .saturating_sub(start)) as f64
        / 1e9;
    drop(child);
    let ch = conn.create_channel().await?;
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    Ok(Figures {
        delivered: d.delivered.load(Ordering::Relaxed),
        seconds,
        p50_us: pct(&lat, 0.50),
        p99_us: pct(&lat, 0.99),
    })
}

/// The same commands drained by a bare lapin consumer (manual acks, the same prefetch).
async fn bare(a: &Args, tag: &str) -> Result<Figures> {
    let (exchange, queue) = (format!("dlb-bare-x-{tag}"), format!("dlb-bare-q-{tag}"));
    let conn = Connection::connect(URL, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    declare(&ch, &exchange, Some(&queue)).await?;
    ch.basic_qos(a.prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let epoch = Instant::now();
    let lat = Arc::new(Mutex::new(Vec::new()));
    let last = Arc::new(AtomicU64::new(0));
    let want = a.commands;
    let reader = {
        let (lat, last) = (lat.clone(), last.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while n < want {
                let Some(d) = consumer.next().await else {
                    break;
                };
                let d = d?;
                let now = nanos(epoch);
                let ts = d
                    .data
                    .get(..8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(now);
                lat.lock()
                    .map_err(|_| anyhow::anyhow!("latency lock"))?
                    .push(u32::try_from(now.saturating_sub(ts) / 1000).unwrap_or(u32::MAX));
                d.ack(BasicAckOptions::default()).await?;
                last.store(now, Ordering::Relaxed);
                n += 1;
            }
            anyhow::Ok(n)
        })
    };
    let start = nanos(epoch);
    publish(a, &exchange, epoch).await?;
    let delivered = tokio::time::timeout(Duration::from_secs(300), reader).await???;
    let mut lat = std::mem::take(&mut *lat.lock().map_err(|_| anyhow::anyhow!("latency lock"))?);
    lat.sort_unstable();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    Ok(Figures {
        delivered,
        seconds: (last.load(Ordering::Relaxed).saturating_sub(start)) as f64 / 1e9,
        p50_us: pct(&lat, 0.50),
        p99_us: pct(&lat, 0.99),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = parse_args();
    let _ = rlimit::increase_nofile_limit(65_536);
    let tag = format!(
        "{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id())
    );
    let g = via_gateway(&a, &tag).await?;
    let b = bare(&a, &tag).await?;
    let ratio = g.rate() / b.rate().max(1e-9);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "devices": a.devices, "commands": a.commands, "window": a.window, "prefetch": a.prefetch,
                "gateway": {"delivered": g.delivered, "per_s": g.rate(), "p50_us": g.p50_us, "p99_us": g.p99_us},
                "bare_lapin": {"delivered": b.delivered, "per_s": b.rate(), "p50_us": b.p50_us, "p99_us": b.p99_us},
                "ratio": ratio,
            })
        );
    } else {
        println!(
            "{} commands, {} devices, publish window {}, prefetch {}",
            a.commands, a.devices, a.window, a.prefetch
        );
        println!(
            "  gateway -> devices: {} delivered, {:.0}/s, broker-to-device p50 {} µs, p99 {} µs",
            g.delivered,
            g.rate(),
            g.p50_us,
            g.p99_us
        );
        println!(
            "  bare lapin consumer: {} consumed, {:.0}/s, broker-to-consumer p50 {} µs, p99 {} µs",
            b.delivered,
            b.rate(),
            b.p50_us,
            b.p99_us
        );
        println!("  gateway / bare: x{ratio:.2}");
    }
    Ok(())
}
