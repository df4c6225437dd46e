//! The end-to-end benchmark: firmware-sim -> gateway (fsync = "always", mutual TLS) -> AMQP uplink
//! -> RabbitMQ -> firmware-sim verify. Prints messages/s acknowledged and delivered, what the
//! verifier found, the sample-to-verifier latency (which today includes the wait for the verifier,
//! started after the fleet), and the gateway's RSS and CPU seconds per million messages.
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
    let st = Command::new(&gateway)
        .args([
            "certs",
            "generate",
            "--devices",
            &devices.to_string(),
            "--out",
        ])
        .arg(&certs)
        .output()?;
    if !st.status.success() {
        bail!("certs: {}", String::from_utf8_lossy(&st.stderr));
    }
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
            r#"[queue]
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
    let fleet: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap_or_default();
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
    // The verifier needs the final manifest, so it starts consuming only after the fleet is
    // done: its latency includes that wait (a consumer running alongside the fleet is the next
    // step for a true end-to-end latency).
    println!(
        "sample -> verifier latency, ms (includes waiting for the verifier to start): {}",
        v["latency_ms"]
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
