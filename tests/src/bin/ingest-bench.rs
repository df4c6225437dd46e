//! The ingest benchmark: starts the real `gateway` binary (fsync = "always") on loopback, drives it
//! with many MQTT-over-TLS connections publishing QoS 1, and prints acked publishes/s, PUBACK
//! latency percentiles and the gateway's RSS. `--idle N` instead connects N idle devices and
//! reports the gateway's RSS per connection.
//!
//! The load generator speaks raw MQTT 3.1.1 (CONNECT, pipelined PUBLISH, PUBACK) so that it costs
//! as little CPU as possible: it shares the 2 cores with the gateway.
//!
//! ```text
//! cargo run --release -p gateway-tests --bin ingest-bench -- --connections 100 --seconds 10
//! cargo run --release -p gateway-tests --bin ingest-bench -- --connections 100 --rate 50000
//! cargo run --release -p gateway-tests --bin ingest-bench -- --idle 1000
//! cargo run --release -p gateway-tests --bin ingest-bench -- --subscribers 2 --sub-qos 1
//! ```
//!
//! It also prints the gateway's read and write system calls per acknowledged message (`syscr`
//! and `syscw` of `/proc/PID/io`), and with `--subscribers M` runs M raw local subscribers to
//! every publisher's topic during the load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gateway_tests::bench::{
    cpu_seconds, mqtt_connect, pct, publish_packet, rss_kib, rw_syscalls, subscriber, Deliveries,
    SyscallCount,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

struct Args {
    gateway: PathBuf,
    connections: usize,
    inflight: usize,
    payload: usize,
    seconds: u64,
    rate: u64,
    idle: usize,
    /// Local subscribers to every publisher's telemetry (`devices/+/telemetry`).
    subscribers: usize,
    sub_qos: u8,
    json: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: ingest-bench [--gateway PATH] [--connections N] [--inflight W] [--payload BYTES] \
         [--seconds S] [--rate MSGS_PER_S (0 = flat out)] [--idle N] [--subscribers M] \
         [--sub-qos 0|1] [--json]"
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
        connections: 100,
        inflight: 32,
        payload: 64,
        seconds: 10,
        rate: 0,
        idle: 0,
        subscribers: 0,
        sub_qos: 0,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--gateway" => a.gateway = PathBuf::from(val()),
            "--connections" => a.connections = num(val()) as usize,
            "--inflight" => a.inflight = num(val()).clamp(1, 65_000) as usize,
            "--payload" => a.payload = num(val()) as usize,
            "--seconds" => a.seconds = num(val()),
            "--rate" => a.rate = num(val()),
            "--idle" => a.idle = num(val()) as usize,
            "--subscribers" => a.subscribers = num(val()).min(1000) as usize,
            "--sub-qos" => a.sub_qos = num(val()).min(1) as u8,
            "--json" => a.json = true,
            _ => usage(),
        }
    }
    a
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(addr: SocketAddr, tls: &TlsConnector, id: &str, keep_alive: u16) -> Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut s = tls
        .connect(ServerName::try_from("localhost")?.to_owned(), tcp)
        .await?;
    let rest = mqtt_connect(&mut s, id, keep_alive).await?;
    if !rest.is_empty() {
        bail!("{id}: unexpected bytes after the CONNACK");
    }
    Ok(s)
}

/// One connection publishing QoS 1 with `inflight` outstanding; returns PUBACK latencies in µs.
async fn drive(
    mut s: Tls,
    id: String,
    inflight: usize,
    payload: Arc<Vec<u8>>,
    deadline: Instant,
    per_conn_rate: f64,
) -> Result<Vec<u32>> {
    let topic = format!("devices/{id}/telemetry");
    let mut sent_at: Vec<Option<Instant>> = vec![None; 65_536];
    let mut lat = Vec::with_capacity(1 << 16);
    let (mut rd, mut wr) = tokio::io::split(&mut s);
    let mut next_pkid: u16 = 1;
    let mut outstanding = 0usize;
    let mut sent_total = 0u64;
    let start = Instant::now();
    let mut out = Vec::with_capacity(inflight * (payload.len() + 64));
    let mut inbuf = vec![0u8; 64 * 1024];
    let mut have = 0usize;
    loop {
        let now = Instant::now();
        let running = now < deadline;
        // Fill the window (subject to the rate).
        out.clear();
        while running && outstanding < inflight {
            if per_conn_rate > 0.0 {
                let allowed = (start.elapsed().as_secs_f64() * per_conn_rate) as u64;
                if sent_total >= allowed {
                    break;
                }
            }
            publish_packet(&topic, next_pkid, &payload, &mut out);
            sent_at[usize::from(next_pkid)] = Some(Instant::now());
            next_pkid = next_pkid.wrapping_add(1).max(1);
            outstanding += 1;
            sent_total += 1;
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
        }
        if !running && outstanding == 0 {
            return Ok(lat);
        }
        if outstanding == 0 {
            // Rate-limited and idle: wait for the next slot.
            tokio::time::sleep(Duration::from_micros(500)).await;
            continue;
        }
        let wait = if running {
            deadline - now
        } else {
            Duration::from_secs(10)
        };
        let n = match tokio::time::timeout(
            wait.min(Duration::from_millis(5))
                .max(Duration::from_micros(100)),
            rd.read(&mut inbuf[have..]),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => {
                if !running && Instant::now() > deadline + Duration::from_secs(10) {
                    bail!("{id}: {outstanding} PUBACKs missing 10 s after the end");
                }
                continue;
            }
        };
        if n == 0 {
            bail!("{id}: gateway closed the connection");
        }
        have += n;
        let mut at = 0;
        while have - at >= 4 {
            if inbuf[at] != 0x40 || inbuf[at + 1] != 0x02 {
                bail!("{id}: unexpected packet {:#04x}", inbuf[at]);
            }
            let pkid = u16::from_be_bytes([inbuf[at + 2], inbuf[at + 3]]);
            if let Some(t) = sent_at[usize::from(pkid)].take() {
                lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                outstanding -= 1;
            }
            at += 4;
        }
        inbuf.copy_within(at..have, 0);
        have -= at;
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Gateway {
    child: std::process::Child,
    addr: SocketAddr,
    certs: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_gateway(bin: &Path, receive_maximum: usize) -> Result<Gateway> {
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p gateway) or pass --gateway",
            bin.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let st = std::process::Command::new(bin)
        .args(["certs", "generate", "--devices", "0", "--out"])
        .arg(&certs)
        .output()?;
    if !st.status.success() {
        bail!(
            "certs generate failed: {}",
            String::from_utf8_lossy(&st.stderr)
        );
    }
    let port = free_port()?;
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[admin]
enabled = false

[queue]
data_dir = "{data}"
max_bytes = "8 GiB"
segment_bytes = "64 MiB"
fsync = "always"

[[listeners]]
bind = "127.0.0.1:{port}"
tls = {{ cert = "{c}/server.pem", key = "{c}/server.key" }}

[auth]
allow_anonymous = true

[[acl]]
identity = "*"
publish = ["devices/%c/#"]
subscribe = ["devices/+/telemetry"]

[limits]
max_connections = 20000
receive_maximum = {rm}
"#,
            data = dir.path().join("data").display(),
            c = certs.display(),
            rm = receive_maximum.min(65_535),
        ),
    )?;
    let child = std::process::Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("start the gateway")?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let gw = Gateway {
        child,
        addr,
        certs,
        _dir: dir,
    };
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(gw);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the gateway did not start listening on {addr}")
}

fn connector(certs: &Path) -> Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.join("ca.pem"))? {
        roots.add(c?)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(cfg)))
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = parse_args();
    // Thousands of sockets on both sides of loopback.
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    let gw = start_gateway(&a.gateway, a.inflight.max(64)).await?;
    let pid = gw.child.id();
    let tls = connector(&gw.certs)?;

    if a.idle > 0 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = rss_kib(pid);
        let mut conns = Vec::with_capacity(a.idle);
        for i in 0..a.idle {
            conns.push(connect(gw.addr, &tls, &format!("idle-{i:05}"), 300).await?);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_kib(pid);
        let per = (after.saturating_sub(before)) as f64 / a.idle as f64;
        if a.json {
            println!(
                "{}",
                serde_json::json!({"idle_connections": a.idle, "rss_before_kib": before,
                    "rss_after_kib": after, "rss_per_connection_kib": per})
            );
        } else {
            println!(
                "{} idle TLS connections: gateway RSS {} KiB -> {} KiB, {:.1} KiB per connection",
                a.idle, before, after, per
            );
        }
        drop(conns);
        return Ok(());
    }

    // Local subscribers first: each gets every publish (QoS 0 or 1; a slow one drops, counted).
    let deliveries = Deliveries::new(false);
    let stop_subs = tokio_util::sync::CancellationToken::new();
    let mut subs = tokio::task::JoinSet::new();
    if a.subscribers > 0 {
        let (tx, mut rx) = tokio::sync::mpsc::channel(a.subscribers);
        for i in 0..a.subscribers {
            let id = format!("sub-{i:05}");
            let s = connect(gw.addr, &tls, &id, 60).await?;
            subs.spawn(subscriber(
                s,
                Vec::new(),
                id,
                "devices/+/telemetry",
                a.sub_qos,
                deliveries.clone(),
                tx.clone(),
                stop_subs.clone(),
            ));
        }
        for _ in 0..a.subscribers {
            tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .context("subscribers not subscribed within 20 s")?
                .context("a subscriber ended")?;
        }
    }
    let mut streams = Vec::with_capacity(a.connections);
    for i in 0..a.connections {
        streams.push(connect(gw.addr, &tls, &format!("bench-{i:05}"), 60).await?);
    }
    let payload = Arc::new(vec![0x5a_u8; a.payload]);
    let per_conn_rate = if a.rate == 0 {
        0.0
    } else {
        a.rate as f64 / a.connections as f64
    };
    let cpu0 = cpu_seconds(pid);
    let (reads0, writes0) = rw_syscalls(pid);
    let perf = SyscallCount::start(pid);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, s) in streams.into_iter().enumerate() {
        tasks.spawn(drive(
            s,
            format!("bench-{i:05}"),
            a.inflight,
            payload.clone(),
            deadline,
            per_conn_rate,
        ));
    }
    let mut lat = Vec::new();
    let mut peak_rss = 0;
    loop {
        tokio::select! {
            r = tasks.join_next() => match r {
                Some(r) => lat.extend(r.context("load task")??),
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => peak_rss = peak_rss.max(rss_kib(pid)),
        }
    }
    let secs = start
        .elapsed()
        .as_secs_f64()
        .min(a.seconds as f64)
        .max(0.001);
    let cpu = cpu_seconds(pid) - cpu0;
    let (reads1, writes1) = rw_syscalls(pid);
    let syscalls = perf.map(SyscallCount::stop).unwrap_or_default();
    let (reads, writes) = (reads1 - reads0, writes1 - writes0);
    stop_subs.cancel();
    while let Some(r) = subs.join_next().await {
        r.context("subscriber task")??;
    }
    let delivered = deliveries
        .delivered
        .load(std::sync::atomic::Ordering::Relaxed);
    lat.sort_unstable();
    let acked = lat.len() as f64;
    let per = |n: u64| if acked > 0.0 { n as f64 / acked } else { 0.0 };
    let report = serde_json::json!({
        "connections": a.connections,
        "inflight_per_connection": a.inflight,
        "payload_bytes": a.payload,
        "target_rate": a.rate,
        "acked": lat.len(),
        "acked_per_s": acked / secs,
        "puback_p50_us": pct(&lat, 0.50),
        "puback_p99_us": pct(&lat, 0.99),
        "puback_max_us": lat.last().copied().unwrap_or(0),
        "gateway_rss_peak_kib": peak_rss,
        "gateway_cpu_s_per_million": if acked > 0.0 { cpu / acked * 1e6 } else { 0.0 },
        "gateway_proc_io_syscr": reads,
        "gateway_proc_io_syscw": writes,
        "gateway_write_syscalls_per_message": per(writes),
        "gateway_syscalls": syscalls.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<String, serde_json::Value>>(),
        "gateway_syscalls_per_message": syscalls.iter().map(|(k, v)| (k.clone(), serde_json::json!(per(*v)))).collect::<serde_json::Map<String, serde_json::Value>>(),
        "subscribers": a.subscribers,
        "subscriber_qos": a.sub_qos,
        "delivered": delivered,
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "{} connections x {} in flight, {} B payload, fsync=always{}",
            a.connections,
            a.inflight,
            a.payload,
            if a.rate > 0 {
                format!(", target {} msg/s", a.rate)
            } else {
                ", flat out".into()
            }
        );
        println!(
            "acked publishes: {} in {:.1}s = {:.0}/s",
            lat.len(),
            secs,
            acked / secs
        );
        println!(
            "PUBACK latency: p50 {} µs, p99 {} µs, max {} µs",
            pct(&lat, 0.50),
            pct(&lat, 0.99),
            lat.last().copied().unwrap_or(0)
        );
        println!(
            "gateway: peak RSS {} MiB, {:.1} CPU-seconds per million messages",
            peak_rss / 1024,
            if acked > 0.0 { cpu / acked * 1e6 } else { 0.0 }
        );
        println!(
            "gateway write-type system calls per message: {:.3} ({} in all; /proc/PID/io syscw)",
            per(writes),
            writes
        );
        if syscalls.is_empty() {
            println!("(all system calls: install perf to have them counted)");
        } else {
            let list: Vec<String> = syscalls
                .iter()
                .map(|(k, v)| format!("{k} {:.3}", per(*v)))
                .collect();
            println!(
                "gateway system calls per message (perf): {}",
                list.join(", ")
            );
        }
        if a.subscribers > 0 {
            println!(
                "{} local subscribers at QoS {}: {} deliveries ({:.0}/s)",
                a.subscribers,
                a.sub_qos,
                delivered,
                delivered as f64 / secs
            );
        }
    }
    Ok(())
}
