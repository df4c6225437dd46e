//! The fan-out benchmark: N publishers -> M subscribers, every subscriber subscribed to every
//! publisher's topic (`devices/+/telemetry`), all over mutual TLS with the same test
//! certificates, first against the real `gateway` binary, then against a Mosquitto broker of
//! our own (a second `mosquitto` process on a free port with a temporary config, same TLS
//! setup), on the same load in the same run. Prints delivered messages/s and publish-to-delivery
//! latency (a timestamp in each payload) for both and their ratio. Figures, not a test.
//!
//! The clients speak raw MQTT 3.1.1 (CONNECT, paced PUBLISH with a window of unacknowledged
//! QoS 1, SUBSCRIBE, PUBACK) so that they cost little CPU: they share the cores with the broker.
//! The gateway stores every publish (its `queue.fsync`, default `always`) before the PUBACK and
//! before delivery; Mosquitto runs with `persistence false` (memory only). Per-subscriber bounds
//! are the defaults of each: the gateway 32 in flight / 1,000 queued, Mosquitto 20 / 1,000.
//!
//! ```text
//! cargo build --release -p gateway-tests --bin fanout-bench -p gateway --bin gateway
//! target/release/fanout-bench --publishers 10 --subscribers 10 --rate 2000 --seconds 10
//! target/release/fanout-bench --qos 0 --skip-mosquitto
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gateway_tests::bench::{
    generate_certs, mqtt_connect, nanos, pct, read_more, start_gateway, start_mosquitto, str16,
    subscriber, take_packet, varint, Deliveries,
};
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

/// What every subscriber subscribes to: every publisher's telemetry.
const FILTER: &str = "devices/+/telemetry";

struct Args {
    gateway: PathBuf,
    mosquitto: String,
    publishers: usize,
    subscribers: usize,
    qos: u8,
    /// Publishes per second, all publishers together (0: as fast as the window allows).
    rate: u64,
    seconds: u64,
    inflight: usize,
    payload: usize,
    skip_gateway: bool,
    skip_mosquitto: bool,
    json: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: fanout-bench [--gateway PATH] [--mosquitto PATH] [--publishers N] \
         [--subscribers M] [--qos 0|1] [--rate PUBLISHES_PER_S (0 = flat out)] [--seconds S] \
         [--inflight W] [--payload BYTES (>= 16)] [--skip-gateway] [--skip-mosquitto] [--json]"
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
        mosquitto: "mosquitto".into(),
        publishers: 10,
        subscribers: 10,
        qos: 1,
        rate: 2000,
        seconds: 10,
        inflight: 16,
        payload: 64,
        skip_gateway: false,
        skip_mosquitto: false,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--gateway" => a.gateway = PathBuf::from(val()),
            "--mosquitto" => a.mosquitto = val(),
            "--publishers" => a.publishers = num(val()).clamp(1, 5000) as usize,
            "--subscribers" => a.subscribers = num(val()).clamp(1, 5000) as usize,
            "--qos" => a.qos = num(val()).min(1) as u8,
            "--rate" => a.rate = num(val()),
            "--seconds" => a.seconds = num(val()).max(1),
            "--inflight" => a.inflight = num(val()).clamp(1, 60_000) as usize,
            "--payload" => a.payload = num(val()).clamp(16, 1 << 20) as usize,
            "--skip-gateway" => a.skip_gateway = true,
            "--skip-mosquitto" => a.skip_mosquitto = true,
            "--json" => a.json = true,
            _ => usage(),
        }
    }
    a
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// TLS with `id`'s certificate, CONNECT (clean session, client id `id`), CONNACK.
async fn connect(addr: SocketAddr, certs: &Path, id: &str) -> Result<(Tls, Vec<u8>)> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let tls = TlsConnector::from(gateway_tests::device_tls(certs, Some(id)));
    let mut s = tls
        .connect(ServerName::try_from("localhost")?.to_owned(), tcp)
        .await?;
    let rest = mqtt_connect(&mut s, id, 60).await?;
    Ok((s, rest))
}

/// A publisher: paced publishes to `devices/<id>/telemetry` until `deadline`, QoS 1 with at most
/// `inflight` unacknowledged. Returns how many were published (QoS 1: acknowledged).
async fn publisher(
    addr: SocketAddr,
    certs: PathBuf,
    id: String,
    a: Arc<Args>,
    shared: Arc<Deliveries>,
    deadline: Instant,
) -> Result<u64> {
    let (s, mut buf) = connect(addr, &certs, &id).await?;
    let (mut rd, mut wr) = tokio::io::split(s);
    let topic = format!("devices/{id}/telemetry");
    let per_publisher = a.rate as f64 / a.publishers as f64;
    let window = Arc::new(tokio::sync::Semaphore::new(a.inflight));
    let acked = Arc::new(AtomicU64::new(0));
    let reader = {
        let (window, acked) = (window.clone(), acked.clone());
        let id = id.clone();
        tokio::spawn(async move {
            loop {
                while let Some((first, _, total)) = take_packet(&buf)? {
                    if first != 0x40 {
                        bail!("{id}: unexpected packet {first:#04x}");
                    }
                    acked.fetch_add(1, Ordering::Relaxed);
                    window.add_permits(1);
                    buf.drain(..total);
                }
                read_more(&mut rd, &mut buf).await?;
            }
        })
    };
    let start = Instant::now();
    let (mut sent, mut pkid) = (0u64, 0u16);
    let mut out = Vec::with_capacity(a.payload + 64);
    let mut payload = vec![0x5a_u8; a.payload];
    while Instant::now() < deadline {
        if per_publisher > 0.0 {
            let due = (start.elapsed().as_secs_f64() * per_publisher) as u64;
            if sent >= due {
                let next = Duration::from_secs_f64((sent + 1) as f64 / per_publisher);
                tokio::time::sleep_until((start + next).min(deadline).into()).await;
                continue;
            }
        }
        if a.qos == 1 {
            tokio::select! {
                p = window.acquire() => p?.forget(),
                _ = tokio::time::sleep_until(deadline.into()) => break,
            }
            pkid = pkid.wrapping_add(1).max(1);
        }
        payload[..8].copy_from_slice(&nanos(shared.epoch).to_be_bytes());
        out.clear();
        out.push(0x30 | (a.qos << 1));
        let len = 2 + topic.len() + if a.qos == 1 { 2 } else { 0 } + payload.len();
        varint(len, &mut out);
        str16(&topic, &mut out);
        if a.qos == 1 {
            out.extend_from_slice(&pkid.to_be_bytes());
        }
        out.extend_from_slice(&payload);
        wr.write_all(&out).await?;
        sent += 1;
    }
    if a.qos == 1 {
        let wait_until = Instant::now() + Duration::from_secs(10);
        while acked.load(Ordering::Relaxed) < sent {
            if Instant::now() > wait_until {
                bail!(
                    "{id}: {} PUBACKs missing 10 s after the end",
                    sent - acked.load(Ordering::Relaxed)
                );
            }
            if reader.is_finished() {
                reader.await??;
                bail!("{id}: reader ended");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    reader.abort();
    let _ = wr.write_all(&[0xE0, 0]).await;
    Ok(sent)
}

struct Figures {
    published: u64,
    delivered: u64,
    seconds: f64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
}

/// Runs the load against the broker at `addr`; device certificates `dev-00001..` in `certs`.
async fn run_load(a: &Arc<Args>, addr: SocketAddr, certs: &Path) -> Result<Figures> {
    let shared = Deliveries::new(true);
    let stop = CancellationToken::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel(a.subscribers);
    let mut subs = tokio::task::JoinSet::new();
    for i in 0..a.subscribers {
        let id = format!("dev-{:05}", a.publishers + i + 1);
        let (shared, tx, stop) = (shared.clone(), tx.clone(), stop.clone());
        let (qos, certs) = (a.qos, certs.to_path_buf());
        subs.spawn(async move {
            let (s, rest) = connect(addr, &certs, &id).await?;
            subscriber(s, rest, id, FILTER, qos, shared, tx, stop).await
        });
    }
    for _ in 0..a.subscribers {
        tokio::select! {
            r = rx.recv() => { r.context("subscribers")?; }
            r = subs.join_next() => bail!("a subscriber ended: {:?}", r.map(|r| r.map(|r| r.err()))),
            _ = tokio::time::sleep(Duration::from_secs(20)) => bail!("subscribers not subscribed within 20 s"),
        }
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.seconds);
    let mut pubs = tokio::task::JoinSet::new();
    for i in 0..a.publishers {
        pubs.spawn(publisher(
            addr,
            certs.to_path_buf(),
            format!("dev-{:05}", i + 1),
            a.clone(),
            shared.clone(),
            deadline,
        ));
    }
    let mut published = 0;
    while let Some(r) = pubs.join_next().await {
        published += r??;
    }
    // Deliveries still on their way: until all came, or nothing came for 3 s.
    let expected = published * a.subscribers as u64;
    let (mut seen, mut quiet_since) = (0, Instant::now());
    while shared.delivered.load(Ordering::Relaxed) < expected
        && quiet_since.elapsed() < Duration::from_secs(3)
    {
        let now = shared.delivered.load(Ordering::Relaxed);
        if now != seen {
            (seen, quiet_since) = (now, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    let mut lat = Vec::new();
    while let Some(r) = subs.join_next().await {
        lat.extend(r??);
    }
    lat.sort_unstable();
    let start_ns = u64::try_from((start - shared.epoch).as_nanos()).unwrap_or(0);
    let seconds = (shared
        .last_delivery
        .load(Ordering::Relaxed)
        .saturating_sub(start_ns) as f64
        / 1e9)
        .max(0.001);
    Ok(Figures {
        published,
        delivered: lat.len() as u64,
        seconds,
        p50_us: pct(&lat, 0.50),
        p99_us: pct(&lat, 0.99),
        max_us: lat.last().copied().map_or(0, u64::from),
    })
}

fn print(a: &Args, name: &str, f: &Figures) {
    let expected = f.published * a.subscribers as u64;
    println!(
        "{name:>9}: published {} ({:.0}/s), delivered {} of {} ({:.0}/s), latency p50 {} µs, \
         p99 {} µs, max {} µs",
        f.published,
        f.published as f64 / a.seconds as f64,
        f.delivered,
        expected,
        f.delivered as f64 / f.seconds,
        f.p50_us,
        f.p99_us,
        f.max_us
    );
}

fn json(f: &Figures) -> serde_json::Value {
    serde_json::json!({
        "published": f.published, "delivered": f.delivered,
        "delivered_per_s": f.delivered as f64 / f.seconds,
        "latency_p50_us": f.p50_us, "latency_p99_us": f.p99_us, "latency_max_us": f.max_us,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Arc::new(parse_args());
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    if !a.gateway.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p gateway --bin gateway) or pass \
             --gateway",
            a.gateway.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    generate_certs(&a.gateway, a.publishers + a.subscribers, &certs)?;
    let rate = if a.rate == 0 {
        "flat out".to_string()
    } else {
        format!("{} publishes/s offered", a.rate)
    };
    if !a.json {
        println!(
            "{} publishers -> {} subscribers (each gets every message), QoS {}, {} B payload, {}, \
             {} s, window {} per publisher; mutual TLS (TLS 1.3, same certificates) to both",
            a.publishers, a.subscribers, a.qos, a.payload, rate, a.seconds, a.inflight
        );
    }
    let mut out = serde_json::Map::new();
    let mut results = Vec::new();
    if !a.skip_gateway {
        let (child, addr) =
            start_gateway(&a.gateway, dir.path(), &certs, a.inflight, None, "").await?;
        let f = run_load(&a, addr, &certs).await?;
        drop(child);
        if !a.json {
            print(&a, "gateway", &f);
        }
        out.insert("gateway".into(), json(&f));
        results.push(f);
    }
    if !a.skip_mosquitto {
        let (child, addr) = start_mosquitto(&a.mosquitto, dir.path(), &certs).await?;
        let f = run_load(&a, addr, &certs).await?;
        drop(child);
        if !a.json {
            print(&a, "mosquitto", &f);
        }
        out.insert("mosquitto".into(), json(&f));
        results.push(f);
    }
    if let [g, m] = results.as_slice() {
        let rate = |f: &Figures| f.delivered as f64 / f.seconds;
        let ratio = |x: u64, y: u64| if y == 0 { 0.0 } else { x as f64 / y as f64 };
        let r = serde_json::json!({
            "delivered_per_s": rate(g) / rate(m).max(1e-9),
            "latency_p50": ratio(g.p50_us, m.p50_us),
            "latency_p99": ratio(g.p99_us, m.p99_us),
        });
        if !a.json {
            println!(
                "gateway / mosquitto: delivered/s x{:.2}, latency p50 x{:.2}, p99 x{:.2}",
                r["delivered_per_s"].as_f64().unwrap_or(0.0),
                r["latency_p50"].as_f64().unwrap_or(0.0),
                r["latency_p99"].as_f64().unwrap_or(0.0)
            );
        }
        out.insert("ratio_gateway_to_mosquitto".into(), r);
    }
    if a.json {
        println!("{}", serde_json::Value::Object(out));
    }
    Ok(())
}
