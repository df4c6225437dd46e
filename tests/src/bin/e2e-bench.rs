//! The end-to-end benchmark: firmware-sim -> gateway (fsync = "always", mutual TLS) -> AMQP uplink
//! -> RabbitMQ -> firmware-sim verify. Prints messages/s acknowledged and delivered, what the
//! verifier found (every acknowledged message, once, in order), the end-to-end latency measured
//! by a consumer of a second queue bound to the same exchange while the fleet runs (device
//! sample time to arrival), and the gateway's RSS and CPU seconds per million messages.
//!
//! ```text
//! cargo build --release -p gateway -p firmware-sim -p gateway-tests
//! ./target/release/e2e-bench [--devices 100] [--rate 100] [--seconds 20]
//! ```
//! `--rate` is readings per second per device (0 = flat out).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn proc_stat(pid: u32) -> (u64, f64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, a)| a.to_string()))
        .map(|a| {
            let f: Vec<&str> = a.split_whitespace().collect();
            let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
            (t(11) + t(12)) / 100.0
        })
        .unwrap_or(0.0);
    (rss, cpu)
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default()
        .join(name)
}

/// Consumes a second queue bound to the uplink's exchange while the fleet runs, and records
/// arrival time minus the device's sample time for every message (the true end-to-end latency:
/// sample, MQTT, disk queue, forwarder, RabbitMQ, consumer).
async fn latency_consumer(
    url: String,
    queue: String,
    stop_after: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<(Vec<u64>, Instant)> {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(2000, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "e2e-bench-latency".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    let mut lat = Vec::new();
    let mut last = Instant::now();
    loop {
        let want = stop_after.load(std::sync::atomic::Ordering::Relaxed);
        if want > 0 && lat.len() as u64 >= want {
            return Ok((lat, last));
        }
        let d = match tokio::time::timeout(Duration::from_millis(200), consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(_) => return Ok((lat, last)),
            // Nothing for 60 s after the fleet finished: report what arrived.
            Err(_) if want > 0 && last.elapsed() > Duration::from_secs(60) => {
                return Ok((lat, last))
            }
            Err(_) => continue,
        };
        last = Instant::now();
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if let Ok(t) = firmware_sim::payload::decode(&d.data) {
            lat.push(now_ms.saturating_sub(t.sample_time_ms));
        }
    }
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn main() -> Result<()> {
    let devices = arg("--devices", 100);
    let rate = arg("--rate", 100);
    let seconds = arg("--seconds", 20);
    let (gateway, sim) = (sibling("gateway"), sibling("firmware-sim"));
    for b in [&gateway, &sim] {
        if !b.exists() {
            bail!(
                "{} missing: cargo build --release -p gateway -p firmware-sim -p gateway-tests",
                b.display()
            );
        }
    }
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    gateway_tests::bench::generate_certs(&gateway, usize::try_from(devices)?, &certs)?;
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_nanos();
    let queue = format!("e2e-bench-{n}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[admin]
enabled = false

[queue]
data_dir = "{data}"
fsync = "always"
[[listeners]]
bind = "127.0.0.1:{port}"
tls = {{ cert = "{c}/server.pem", key = "{c}/server.key", client_ca = "{c}/ca.pem", require_client_cert = true }}
[limits]
max_connections = 20000
[[uplinks]]
name = "rabbit"
type = "amqp"
url = "{url}"
exchange = "{queue}"
declare = true
declare_queue = "{queue}"
[[routes]]
filter = "devices/#"
uplinks = ["rabbit"]
"#,
            data = dir.path().join("data").display(),
            c = certs.display(),
        ),
    )?;
    let mut gw = Command::new(&gateway)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("start the gateway")?;
    let pid = gw.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the gateway did not listen");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The exchange (as the uplink declares it) and a second queue for the latency consumer.
    let rt = tokio::runtime::Runtime::new()?;
    let lat_queue = format!("{queue}-latency");
    rt.block_on(async {
        use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        ch.exchange_declare(
            queue.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
        ch.queue_declare(
            lat_queue.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            lat_queue.as_str().into(),
            queue.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await?;
        anyhow::Ok(())
    })?;
    let expected = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let consumer = rt.spawn(latency_consumer(
        url.to_string(),
        lat_queue.clone(),
        expected.clone(),
    ));
    let manifest = dir.path().join("m.json");
    let (_, cpu0) = proc_stat(pid);
    let start = Instant::now();
    let run = Command::new(&sim)
        .args(["run", "--broker", &format!("127.0.0.1:{port}")])
        .arg("--certs-dir")
        .arg(&certs)
        .args([
            "--devices",
            &devices.to_string(),
            "--rate",
            &rate.to_string(),
        ])
        .args([
            "--duration",
            &format!("{seconds}s"),
            "--qos",
            "1",
            "--progress",
            "off",
            "--json",
        ])
        .arg("--manifest")
        .arg(&manifest)
        .output()?;
    let (rss, _) = proc_stat(pid);
    let fleet: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap_or_default();
    expected.store(
        fleet["acked"].as_u64().unwrap_or(1).max(1),
        std::sync::atomic::Ordering::Relaxed,
    );
    let (mut lat, last_arrival) = rt.block_on(consumer)??;
    let delivered_s = last_arrival.duration_since(start).as_secs_f64();
    lat.sort_unstable();
    let verify = Command::new(&sim)
        .args([
            "verify",
            "--amqp",
            url,
            "--queue",
            &queue,
            "--timeout",
            "120",
            "--json",
            "--expect",
        ])
        .arg(&manifest)
        .output()?;
    let elapsed = start.elapsed().as_secs_f64();
    let (_, cpu1) = proc_stat(pid);
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = gw.wait();
    let v: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap_or_default();
    let received = v["total"]["unique"].as_u64().unwrap_or(0);
    println!("fleet: {devices} devices, rate {rate}/s each, {seconds} s, QoS 1, mutual TLS, fsync=always");
    println!(
        "acked by the gateway: {} ({:.0}/s while sending)",
        fleet["acked"],
        fleet["acked_per_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "delivered and confirmed into RabbitMQ, verified: {received} unique, missing {}, out of order {}, duplicates {} ({:.0} msg/s over the whole run incl. drain)",
        v["total"]["missing"], v["total"]["out_of_order"], v["total"]["duplicates"],
        received as f64 / elapsed
    );
    println!(
        "delivered to a consumer alongside the fleet: {} in {:.1} s (last arrival) = {:.0} msg/s",
        lat.len(),
        delivered_s,
        lat.len() as f64 / delivered_s
    );
    println!(
        "end-to-end latency (device sample -> consumer), ms: p50 {}, p99 {}, max {}",
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or(0)
    );

    println!(
        "gateway: RSS {} MiB, {:.1} CPU-seconds per million messages",
        rss / 1024,
        if received > 0 {
            (cpu1 - cpu0) / received as f64 * 1e6
        } else {
            0.0
        }
    );
    if !verify.status.success() {
        bail!(
            "the verifier found problems: {}",
            String::from_utf8_lossy(&verify.stdout)
        );
    }
    Ok(())
}
