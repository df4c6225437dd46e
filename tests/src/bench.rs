//! What the benchmarks (`ingest-bench`, `fanout-bench`) share: raw MQTT 3.1.1 framing for load
//! generators that cost little CPU, a raw subscriber, child processes, and the figures read from
//! `/proc` (CPU time, RSS, read and write system calls).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub use crate::raw::varint;

/// A whole packet: first byte, remaining length, body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    varint(body.len(), &mut p);
    p.extend_from_slice(body);
    p
}

/// A length-prefixed string.
pub fn str16(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// An MQTT 3.1.1 CONNECT with clean session and `keep_alive` seconds.
pub fn connect_packet(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    str16(client_id, &mut body);
    packet(0x10, &body)
}

/// A QoS 1 PUBLISH, appended to `out`.
pub fn publish_packet(topic: &str, pkid: u16, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x32);
    varint(2 + topic.len() + 2 + payload.len(), out);
    str16(topic, out);
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend_from_slice(payload);
}

/// One whole packet from the front of `buf`: (first byte, body range, total length).
pub fn take_packet(buf: &[u8]) -> Result<Option<(u8, std::ops::Range<usize>, usize)>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let (mut len, mut i) = (0usize, 1usize);
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            bail!("bad remaining length");
        }
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    Ok(Some((first, i..i + len, i + len)))
}

/// Reads what is there into `buf`; the peer closing is an error.
pub async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 64 * 1024];
    let n = r.read(&mut chunk).await?;
    if n == 0 {
        bail!("the broker closed the connection");
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Sends CONNECT on `s` and waits for a successful CONNACK; returns what came after it.
pub async fn mqtt_connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    id: &str,
    keep_alive: u16,
) -> Result<Vec<u8>> {
    s.write_all(&connect_packet(id, keep_alive)).await?;
    let mut buf = Vec::new();
    loop {
        if let Some((first, body, total)) = take_packet(&buf)? {
            if first != 0x20 || buf[body.clone()] != [0, 0] {
                bail!("{id}: CONNACK refused: {:?}", &buf[..total]);
            }
            buf.drain(..total);
            return Ok(buf);
        }
        read_more(s, &mut buf).await?;
    }
}

/// The `p` quantile of sorted figures.
pub fn pct(sorted: &[u32], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    u64::from(sorted[i.min(sorted.len() - 1)])
}

/// Resident set size of process `pid` in KiB (0 if unknown).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU seconds process `pid` has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    // utime + stime in clock ticks (fields 14 and 15 of /proc/PID/stat).
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(after) = s.rsplit_once(')').map(|(_, a)| a) else {
        return 0.0;
    };
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Read-type and write-type system calls process `pid` has made (`syscr`, `syscw` of
/// `/proc/PID/io`: read, readv, recvmsg... and write, writev, sendmsg...; not epoll or fsync).
pub fn rw_syscalls(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("syscr:"), field("syscw:"))
}

/// A child process killed (and reaped) when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `addr` accepts connections, or `child` exits, or 10 s passed.
pub async fn wait_listening(addr: SocketAddr, child: &mut Child, what: &str) -> Result<()> {
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(st) = child.0.try_wait()? {
            bail!("{what} exited at start: {st}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} did not start listening on {addr}")
}

/// Nanoseconds since `epoch` (the timestamp fan-out payloads carry in their first 8 bytes).
pub fn nanos(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Counters the raw subscribers of one run share.
pub struct Deliveries {
    pub epoch: Instant,
    pub delivered: AtomicU64,
    /// Nanoseconds since `epoch` of the last delivery.
    pub last_delivery: AtomicU64,
    /// Payloads start with a [`nanos`] timestamp: record publish-to-delivery latency.
    pub timestamps: bool,
}

impl Deliveries {
    pub fn new(timestamps: bool) -> Arc<Deliveries> {
        Arc::new(Deliveries {
            epoch: Instant::now(),
            delivered: AtomicU64::new(0),
            last_delivery: AtomicU64::new(0),
            timestamps,
        })
    }
}

/// A raw subscriber on a connected stream (`buf`: bytes read after the CONNACK): subscribes to
/// `filter` at `qos`, acks QoS 1 deliveries, counts them and, with timestamps, records each
/// one's latency in µs, until `stop`. `subscribed` is told once the SUBACK granted it.
#[allow(clippy::too_many_arguments)]
pub async fn subscriber<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    mut buf: Vec<u8>,
    id: String,
    filter: &str,
    qos: u8,
    d: Arc<Deliveries>,
    subscribed: tokio::sync::mpsc::Sender<()>,
    stop: CancellationToken,
) -> Result<Vec<u32>> {
    let mut body = vec![0, 1];
    str16(filter, &mut body);
    body.push(qos);
    s.write_all(&packet(0x82, &body)).await?;
    let mut lat = Vec::with_capacity(if d.timestamps { 1 << 16 } else { 0 });
    let mut acks = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while let Some((first, range, total)) = take_packet(&buf)? {
            let body = &buf[range];
            match first >> 4 {
                9 => {
                    if body.get(2).is_none_or(|&c| c >= 0x80) {
                        bail!("{id}: SUBSCRIBE refused: {body:?}");
                    }
                    let _ = subscribed.send(()).await;
                }
                3 => {
                    let q = (first >> 1) & 3;
                    let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
                    let mut at = 2 + tlen;
                    if q > 0 {
                        acks.extend_from_slice(&[0x40, 2, body[at], body[at + 1]]);
                        at += 2;
                    }
                    let now = nanos(d.epoch);
                    if d.timestamps {
                        let ts = body
                            .get(at..at + 8)
                            .and_then(|b| <[u8; 8]>::try_from(b).ok())
                            .map(u64::from_be_bytes)
                            .context("payload without a timestamp")?;
                        lat.push(u32::try_from(now.saturating_sub(ts) / 1000).unwrap_or(u32::MAX));
                    }
                    d.delivered.fetch_add(1, Ordering::Relaxed);
                    d.last_delivery.fetch_max(now, Ordering::Relaxed);
                }
                13 => {}
                t => bail!("{id}: unexpected packet type {t}"),
            }
            buf.drain(..total);
        }
        if !acks.is_empty() {
            s.write_all(&acks).await?;
            acks.clear();
        }
        let n = tokio::select! {
            r = s.read(&mut chunk) => r?,
            _ = stop.cancelled() => {
                let _ = s.write_all(&[0xE0, 0]).await;
                return Ok(lat);
            }
        };
        if n == 0 {
            bail!("{id}: the broker closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// System calls of a process counted by `perf stat` (tracepoints, so every kind: `recvfrom`,
/// `epoll_wait`, `futex`... which `/proc/PID/io` does not count), while it runs. `None` when
/// `perf` is not installed or may not trace (then [`rw_syscalls`] is what there is).
pub struct SyscallCount {
    child: std::process::Child,
}

/// The system calls [`SyscallCount`] counts one by one (besides all of them together).
pub const COUNTED_SYSCALLS: [&str; 9] = [
    "writev",
    "write",
    "sendto",
    "read",
    "recvfrom",
    "epoll_wait",
    "futex",
    "fdatasync",
    "pwrite64",
];

impl SyscallCount {
    pub fn start(pid: u32) -> Option<SyscallCount> {
        let mut events = vec!["raw_syscalls:sys_enter".to_string()];
        events.extend(
            COUNTED_SYSCALLS
                .iter()
                .map(|s| format!("syscalls:sys_enter_{s}")),
        );
        let child = std::process::Command::new("perf")
            .args([
                "stat",
                "-x",
                ",",
                "-e",
                &events.join(","),
                "-p",
                &pid.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        Some(SyscallCount { child })
    }

    /// Stops counting: (name, count) for "all" and each of [`COUNTED_SYSCALLS`] perf reported.
    pub fn stop(self) -> Vec<(String, u64)> {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let Ok(out) = self.child.wait_with_output() else {
            return Vec::new();
        };
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                let count = f.first()?.trim().parse().ok()?;
                let event = f.get(2)?;
                let name = if *event == "raw_syscalls:sys_enter" {
                    "all"
                } else {
                    event.strip_prefix("syscalls:sys_enter_")?
                };
                Some((name.to_string(), count))
            })
            .collect()
    }
}

/// `gateway certs generate`: a test CA, a server certificate and `devices` device certificates
/// (`dev-00001`...) in `out`.
pub fn generate_certs(
    gateway: &std::path::Path,
    devices: usize,
    out: &std::path::Path,
) -> Result<()> {
    let st = std::process::Command::new(gateway)
        .args([
            "certs",
            "generate",
            "--devices",
            &devices.to_string(),
            "--out",
        ])
        .arg(out)
        .output()
        .with_context(|| format!("run {}", gateway.display()))?;
    if !st.status.success() {
        bail!(
            "certs generate failed: {}",
            String::from_utf8_lossy(&st.stderr)
        );
    }
    Ok(())
}

/// Mosquitto of our own (never the machine's on 1883), binary `bin`: mutual TLS with the
/// certificates in `certs`, no persistence, its default per-client bounds; config in `dir`.
pub async fn start_mosquitto(
    bin: &str,
    dir: &std::path::Path,
    certs: &std::path::Path,
) -> Result<(Child, SocketAddr)> {
    let port = crate::free_port();
    let cfg = dir.join("mosquitto.conf");
    // Run as ourselves: as root, Mosquitto would switch to the user `mosquitto`, who cannot
    // read the temporary directory.
    let user = std::process::Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into());
    std::fs::write(
        &cfg,
        format!(
            "user {user}\npersistence false\nlog_dest stderr\nlog_type error\n\
             listener {port} 127.0.0.1\nallow_anonymous true\n\
             cafile {c}/ca.pem\ncertfile {c}/server.pem\nkeyfile {c}/server.key\n\
             require_certificate true\n",
            c = certs.display(),
        ),
    )?;
    let mut child = Child(
        std::process::Command::new(bin)
            .arg("-c")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            // It logs every TLS connection the load generator drops at the end.
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("start {bin} (Debian's mosquitto)"))?,
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    wait_listening(addr, &mut child, "mosquitto").await?;
    Ok((child, addr))
}

/// The benchmarks' gateway (binary `bin`, config and data in `dir`): `fsync = "always"`, mutual
/// TLS with the certificates in `certs`, every device may publish its own tree and subscribe to
/// everyone's telemetry and its own commands; `receive_maximum` per device; the admin endpoint
/// on `admin_port` if given; `extra` TOML appended (a downlink, say). Returns it once it
/// listens.
pub async fn start_gateway(
    bin: &std::path::Path,
    dir: &std::path::Path,
    certs: &std::path::Path,
    receive_maximum: usize,
    admin_port: Option<u16>,
    extra: &str,
) -> Result<(Child, SocketAddr)> {
    let port = crate::free_port();
    let cfg = dir.join("gateway.toml");
    let admin = match admin_port {
        Some(p) => format!("enabled = true\nlisten = \"127.0.0.1:{p}\""),
        None => "enabled = false".into(),
    };
    std::fs::write(
        &cfg,
        format!(
            r#"[admin]
{admin}

[queue]
data_dir = "{data}"
max_bytes = "8 GiB"
segment_bytes = "64 MiB"
fsync = "always"

[[listeners]]
bind = "127.0.0.1:{port}"
tls = {{ cert = "{c}/server.pem", key = "{c}/server.key", client_ca = "{c}/ca.pem", require_client_cert = true }}

[[acl]]
identity = "*"
publish = ["devices/%c/#"]
subscribe = ["devices/+/telemetry", "devices/%c/commands/#"]

[limits]
max_connections = 20000
receive_maximum = {rm}

{extra}
"#,
            data = dir.join("gateway-data").display(),
            c = certs.display(),
            rm = receive_maximum.clamp(64, 65_535),
        ),
    )?;
    let mut child = Child(
        std::process::Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            // BENCH_GATEWAY_LOG=1: its warnings on this process's stderr (a failing run).
            .stderr(if std::env::var_os("BENCH_GATEWAY_LOG").is_some() {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::null()
            })
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?,
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    wait_listening(addr, &mut child, "the gateway").await?;
    Ok((child, addr))
}
