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
//! cargo run --release -p gateway-tests --bin ingest-bench -- --mosquitto mosquitto
//! cargo run --release -p gateway-tests --bin ingest-bench -- --offline-sessions 10000 --seconds 5
//! ```
//!
//! Every connection is mutual TLS with a device certificate (`dev-00001`...). It also prints the
//! gateway's system calls per acknowledged message (all kinds counted by `perf stat` when perf is
//! installed; write-type calls from `/proc/PID/io` always). `--subscribers M` runs M raw local
//! subscribers to every publisher's topic during the load. `--mosquitto PATH` then runs the same
//! load against a Mosquitto process of its own (free port, `persistence false`, same
//! certificates) and prints the ratios. `--offline-sessions N` first leaves N persistent sessions
//! subscribed and offline, then runs the load and prints the gateway's RSS and session figures
//! (what piled up in them is bounded by `[sessions]`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gateway_tests::bench::{
    cpu_seconds, generate_certs, mqtt_connect, packet, pct, publish_packet, read_more, rss_kib,
    rw_syscalls, start_gateway, start_mosquitto, str16, subscriber, take_packet, Deliveries,
    SyscallCount,
};
use rustls::pki_types::ServerName;
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
    /// Persistent sessions (subscribed to every publisher's telemetry at QoS 1) that go offline
    /// before the load: what is published piles up in them, up to the session bounds.
    offline_sessions: usize,
    /// The gateway's admin endpoint (for `/metrics`).
    admin_port: u16,
    /// Run the same load against a Mosquitto of our own too (this binary).
    mosquitto: Option<String>,
    /// Local subscribers to every publisher's telemetry (`devices/+/telemetry`).
    subscribers: usize,
    sub_qos: u8,
    json: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: ingest-bench [--gateway PATH] [--connections N] [--inflight W] [--payload BYTES] \
         [--seconds S] [--rate MSGS_PER_S (0 = flat out)] [--idle N] [--subscribers M] \
         [--sub-qos 0|1] [--offline-sessions N] [--mosquitto PATH] [--json]"
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
        offline_sessions: 0,
        admin_port: gateway_tests::free_port(),
        mosquitto: None,
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
            "--offline-sessions" => a.offline_sessions = num(val()) as usize,
            "--mosquitto" => a.mosquitto = Some(val()),
            "--json" => a.json = true,
            _ => usage(),
        }
    }
    a
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Mutual TLS with device `id`'s certificate, CONNECT, CONNACK.
async fn connect(addr: SocketAddr, certs: &Path, id: &str, keep_alive: u16) -> Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let tls = TlsConnector::from(gateway_tests::device_tls(certs, Some(id)));
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

/// Publisher `i`'s device (and client id); subscribers come after the publishers.
fn device(i: usize) -> String {
    format!("dev-{:05}", i + 1)
}

/// What one run against one broker measured.
struct Figures {
    secs: f64,
    /// PUBACK latencies in µs, sorted.
    lat: Vec<u32>,
    peak_rss_kib: u64,
    cpu: f64,
    /// `/proc/PID/io` syscw.
    writes: u64,
    /// From `perf stat`, if it could count.
    syscalls: Vec<(String, u64)>,
    delivered: u64,
}

impl Figures {
    fn acked(&self) -> f64 {
        self.lat.len() as f64
    }

    fn per(&self, n: u64) -> f64 {
        if self.lat.is_empty() {
            0.0
        } else {
            n as f64 / self.acked()
        }
    }

    fn json(&self, a: &Args) -> serde_json::Value {
        serde_json::json!({
            "connections": a.connections,
            "inflight_per_connection": a.inflight,
            "payload_bytes": a.payload,
            "target_rate": a.rate,
            "acked": self.lat.len(),
            "acked_per_s": self.acked() / self.secs,
            "puback_p50_us": pct(&self.lat, 0.50),
            "puback_p99_us": pct(&self.lat, 0.99),
            "puback_max_us": self.lat.last().copied().unwrap_or(0),
            "rss_peak_kib": self.peak_rss_kib,
            "cpu_s_per_million": self.per(1) * self.cpu * 1e6,
            "write_syscalls_per_message": self.per(self.writes),
            "syscalls_per_message": self.syscalls.iter()
                .map(|(k, v)| (k.clone(), serde_json::json!(self.per(*v))))
                .collect::<serde_json::Map<String, serde_json::Value>>(),
            "subscribers": a.subscribers,
            "subscriber_qos": a.sub_qos,
            "delivered": self.delivered,
        })
    }

    fn print(&self, name: &str, a: &Args) {
        println!(
            "{name}: acked publishes: {} in {:.1}s = {:.0}/s; PUBACK p50 {} µs, p99 {} µs, max {} µs",
            self.lat.len(),
            self.secs,
            self.acked() / self.secs,
            pct(&self.lat, 0.50),
            pct(&self.lat, 0.99),
            self.lat.last().copied().unwrap_or(0)
        );
        println!(
            "{name}: peak RSS {} MiB, {:.2} CPU-seconds per million messages, {:.3} write-type \
             system calls per message (/proc/PID/io syscw)",
            self.peak_rss_kib / 1024,
            self.per(1) * self.cpu * 1e6,
            self.per(self.writes)
        );
        if self.syscalls.is_empty() {
            println!("{name}: (all system calls: install perf to have them counted)");
        } else {
            let list: Vec<String> = self
                .syscalls
                .iter()
                .map(|(k, v)| format!("{k} {:.3}", self.per(*v)))
                .collect();
            println!(
                "{name}: system calls per message (perf): {}",
                list.join(", ")
            );
        }
        if a.subscribers > 0 {
            println!(
                "{name}: {} subscribers at QoS {}: {} deliveries ({:.0}/s)",
                a.subscribers,
                a.sub_qos,
                self.delivered,
                self.delivered as f64 / self.secs
            );
        }
    }
}

/// The load against the broker at `addr` (process `pid`).
async fn run_load(a: &Args, addr: SocketAddr, pid: u32, certs: &Path) -> Result<Figures> {
    // Local subscribers first: each gets every publish (QoS 0 or 1; a slow one drops, counted).
    let deliveries = Deliveries::new(false);
    let stop_subs = tokio_util::sync::CancellationToken::new();
    let mut subs = tokio::task::JoinSet::new();
    if a.subscribers > 0 {
        let (tx, mut rx) = tokio::sync::mpsc::channel(a.subscribers);
        for i in 0..a.subscribers {
            let id = device(a.connections + i);
            let s = connect(addr, certs, &id, 60).await?;
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
        streams.push(connect(addr, certs, &device(i), 60).await?);
    }
    let payload = Arc::new(vec![0x5a_u8; a.payload]);
    let per_conn_rate = if a.rate == 0 {
        0.0
    } else {
        a.rate as f64 / a.connections as f64
    };
    let cpu0 = cpu_seconds(pid);
    let (_, writes0) = rw_syscalls(pid);
    let perf = SyscallCount::start(pid);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, s) in streams.into_iter().enumerate() {
        tasks.spawn(drive(
            s,
            device(i),
            a.inflight,
            payload.clone(),
            deadline,
            per_conn_rate,
        ));
    }
    let mut lat = Vec::new();
    let mut peak_rss_kib = 0;
    loop {
        tokio::select! {
            r = tasks.join_next() => match r {
                Some(r) => lat.extend(r.context("load task")??),
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => peak_rss_kib = peak_rss_kib.max(rss_kib(pid)),
        }
    }
    let secs = start
        .elapsed()
        .as_secs_f64()
        .min(a.seconds as f64)
        .max(0.001);
    let cpu = cpu_seconds(pid) - cpu0;
    let (_, writes1) = rw_syscalls(pid);
    let syscalls = perf.map(SyscallCount::stop).unwrap_or_default();
    stop_subs.cancel();
    while let Some(r) = subs.join_next().await {
        r.context("subscriber task")??;
    }
    lat.sort_unstable();
    Ok(Figures {
        secs,
        lat,
        peak_rss_kib,
        cpu,
        writes: writes1 - writes0,
        syscalls,
        delivered: deliveries
            .delivered
            .load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// One persistent session: CONNECT with clean session 0, SUBSCRIBE at QoS 1, SUBACK,
/// DISCONNECT (the session stays, offline).
async fn leave_session(addr: SocketAddr, certs: &Path, id: &str) -> Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let tls = TlsConnector::from(gateway_tests::device_tls(certs, Some(id)));
    let mut s = tls
        .connect(ServerName::try_from("localhost")?.to_owned(), tcp)
        .await?;
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x00, 0, 60];
    str16(id, &mut body);
    s.write_all(&packet(0x10, &body)).await?;
    let mut sub = vec![0, 1];
    str16("devices/+/telemetry", &mut sub);
    sub.push(1);
    s.write_all(&packet(0x82, &sub)).await?;
    let mut buf = Vec::new();
    let mut acked = false;
    while !acked {
        while let Some((first, body, total)) = take_packet(&buf)? {
            match first >> 4 {
                2 if buf[body.clone()][1] != 0 => bail!("{id}: CONNACK refused"),
                9 if buf[body.clone()].get(2).is_none_or(|&c| c >= 0x80) => {
                    bail!("{id}: SUBSCRIBE refused")
                }
                9 => acked = true,
                _ => {}
            }
            buf.drain(..total);
        }
        if !acked {
            read_more(&mut s, &mut buf).await?;
        }
    }
    s.write_all(&[0xE0, 0]).await?;
    let _ = s.shutdown().await;
    Ok(())
}

/// The gateway's `/metrics` (admin endpoint on loopback).
async fn metrics(port: u16) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// The value of the series `name` (with its labels as written) in a metrics page.
fn series(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(f64::NAN)
}

/// `--offline-sessions N`: N persistent sessions go offline, then the load runs; the gateway's
/// RSS and its session figures before and after.
async fn offline(a: &Args, addr: SocketAddr, pid: u32, certs: &Path) -> Result<()> {
    let rss0 = rss_kib(pid);
    let start = Instant::now();
    let ids: Vec<String> = (0..a.offline_sessions)
        .map(|i| device(a.connections + a.subscribers + i))
        .collect();
    for chunk in ids.chunks(64) {
        let mut set = tokio::task::JoinSet::new();
        for id in chunk {
            let (id, certs) = (id.clone(), certs.to_path_buf());
            set.spawn(async move { leave_session(addr, &certs, &id).await });
        }
        while let Some(r) = set.join_next().await {
            r.context("session task")??;
        }
    }
    let made = start.elapsed().as_secs_f64();
    // Wait until every session is offline (the gateway sees each DISCONNECT).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut page = metrics(a.admin_port).await?;
    while series(&page, "gateway_sessions{state=\"offline\"}") < a.offline_sessions as f64 {
        if Instant::now() > deadline {
            bail!("not all {} sessions offline after 30 s", a.offline_sessions);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        page = metrics(a.admin_port).await?;
    }
    let rss1 = rss_kib(pid);
    let g = run_load(a, addr, pid, certs).await?;
    // Let the router finish routing what was published.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let page = metrics(a.admin_port).await?;
    let rss2 = rss_kib(pid);
    let figures = serde_json::json!({
        "offline_sessions": a.offline_sessions,
        "seconds_to_make_them": made,
        "rss_start_kib": rss0,
        "rss_with_offline_sessions_kib": rss1,
        "rss_after_load_kib": rss2,
        "rss_peak_during_load_kib": g.peak_rss_kib,
        "acked": g.lat.len(),
        "acked_per_s": g.acked() / g.secs,
        "session_queued_messages": series(&page, "gateway_session_queued_messages"),
        "session_queued_bytes": series(&page, "gateway_session_queued_bytes"),
        "dropped_refused_full": series(&page, "gateway_session_messages_dropped_total{reason=\"refused_full\"}"),
        "routed": series(&page, "gateway_session_messages_routed_total"),
    });
    if a.json {
        println!("{figures}");
    } else {
        println!("{}", serde_json::to_string_pretty(&figures)?);
    }
    Ok(())
}

/// `--idle N`: the gateway's RSS per idle TLS connection.
async fn idle(a: &Args, addr: SocketAddr, pid: u32, certs: &Path) -> Result<()> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid);
    let mut conns = Vec::with_capacity(a.idle);
    for i in 0..a.idle {
        conns.push(connect(addr, certs, &device(i), 300).await?);
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
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = parse_args();
    // Thousands of sockets on both sides of loopback.
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    if !a.gateway.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p gateway) or pass --gateway",
            a.gateway.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let devices = if a.idle > 0 {
        a.idle
    } else {
        a.connections + a.subscribers + a.offline_sessions
    };
    generate_certs(&a.gateway, devices, &certs)?;
    let (child, addr) = start_gateway(
        &a.gateway,
        dir.path(),
        &certs,
        a.inflight,
        Some(a.admin_port),
        "",
    )
    .await?;
    if a.offline_sessions > 0 {
        return offline(&a, addr, child.0.id(), &certs).await;
    }
    if a.idle > 0 {
        return idle(&a, addr, child.0.id(), &certs).await;
    }
    if !a.json {
        println!(
            "{} connections x {} in flight, {} B payload, QoS 1, mutual TLS{}; gateway fsync=always{}",
            a.connections,
            a.inflight,
            a.payload,
            if a.rate > 0 {
                format!(", target {} msg/s", a.rate)
            } else {
                ", flat out".into()
            },
            if a.mosquitto.is_some() {
                ", Mosquitto persistence false"
            } else {
                ""
            }
        );
    }
    let g = run_load(&a, addr, child.0.id(), &certs).await?;
    drop(child);
    let mut out = serde_json::Map::new();
    out.insert("gateway".into(), g.json(&a));
    if !a.json {
        g.print("gateway", &a);
    }
    if let Some(bin) = &a.mosquitto {
        let (child, addr) = start_mosquitto(bin, dir.path(), &certs).await?;
        let m = run_load(&a, addr, child.0.id(), &certs).await?;
        drop(child);
        if !a.json {
            m.print("mosquitto", &a);
        }
        let rate = (g.acked() / g.secs) / (m.acked() / m.secs).max(1e-9);
        let cpu = (g.per(1) * g.cpu) / (m.per(1) * m.cpu).max(1e-12);
        if !a.json {
            println!(
                "gateway / mosquitto: acked/s x{rate:.2}, CPU per message x{cpu:.2}, PUBACK p50 x{:.2}, p99 x{:.2}",
                pct(&g.lat, 0.5) as f64 / pct(&m.lat, 0.5).max(1) as f64,
                pct(&g.lat, 0.99) as f64 / pct(&m.lat, 0.99).max(1) as f64,
            );
        }
        out.insert("mosquitto".into(), m.json(&a));
        out.insert(
            "ratio_gateway_to_mosquitto".into(),
            serde_json::json!({"acked_per_s": rate, "cpu_per_message": cpu}),
        );
    }
    if a.json {
        println!("{}", serde_json::Value::Object(out));
    }
    Ok(())
}
