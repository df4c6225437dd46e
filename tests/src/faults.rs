//! Scaffolding of the end-to-end fault suite (`tests/tests/faults.rs`, issue 7): the real
//! `gateway` binary with an AMQP uplink that goes through a port the test controls (the fault
//! proxy), a `firmware-sim` fleet in the background, a live tap on the upstream for end-to-end
//! latency, the verifier, and the one-line figures each scenario prints.
//!
//! ```text
//! firmware-sim run ──mTLS──> gateway (restartable, same data dir) ──> fault proxy ──> RabbitMQ
//!   --manifest m.json              │ queue stats (Inspector, read-only)      exchange (topic)
//!                                  │ /metrics when [admin] is served          ├─ verify queue ─> firmware-sim verify
//!                                  v                                          └─ tap queue ───> Tap (latency)
//! ```
//!
//! Everything here waits with a timeout, runs on 127.0.0.1 only, and cleans up after itself:
//! processes are killed when their handles drop, RabbitMQ queues expire when unused (and are
//! deleted by [`Upstream::cleanup`]), and the exchange is auto-deleted with its last binding.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use gateway::queue::inspect::{DirStats, Inspector};
use gateway::queue::CursorStats;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::{free_port, workspace_binary};

/// RabbitMQ, shared by every test (never stopped or reconfigured by one).
pub const RABBIT_PORT: u16 = 5672;
/// The direct URL (the verifier and the tap use it; the gateway goes through the proxy).
pub const RABBIT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The uplink's name in every config here, hence its queue cursor's.
pub const UPLINK: &str = "rabbit";
/// How long a gateway may take to start listening (recovery of a big queue included).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// `GATEWAY_SOAK=1`: the long runs (100 crash rounds, 10-minute outages, 1,000 devices).
pub fn soak() -> bool {
    std::env::var("GATEWAY_SOAK").is_ok_and(|v| v == "1" || v == "true")
}

/// `ci` in the default mode, `soak` under `GATEWAY_SOAK=1`.
pub fn pick<T>(ci: T, soak_value: T) -> T {
    if soak() {
        soak_value
    } else {
        ci
    }
}

/// A name no other test run uses (RabbitMQ is shared).
pub fn unique(prefix: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Wall clock in milliseconds since the epoch (the devices' `sample_time_ms` clock).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// SplitMix64: reproducible random kill moments without a dependency. The seed comes from
/// `FAULT_SEED` or the clock, and is printed so that a failing run can be repeated.
pub struct Rng(u64);

impl Rng {
    pub fn from_env(scenario: &str) -> Rng {
        let seed = std::env::var("FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{scenario}: FAULT_SEED={seed}");
        Rng(seed)
    }

    /// A given seed (a test with a seed variable of its own).
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next_u64() % (hi - lo)
        }
    }

    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

/// Sends `signal` (e.g. "TERM", "KILL") to a process.
pub fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Polls `cond` every 50 ms until it holds; `Err(what)` after `timeout`.
pub async fn wait_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        if cond() {
            return Ok(t.elapsed());
        }
        if t.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream: exchange, verify queue, tap queue
// ---------------------------------------------------------------------------------------------

/// The test's part of RabbitMQ: a topic exchange (auto-deleted with its last binding), the queue
/// the verifier reads, and the tap queue for latency, both bound with `#`.
pub struct Upstream {
    pub exchange: String,
    /// What the verifier consumes.
    pub queue: String,
    /// What the [`Tap`] consumes.
    pub tap_queue: String,
}

impl Upstream {
    /// Declares them. `verify_args` go into the verify queue's declaration (e.g. `x-max-length`
    /// and `x-overflow = reject-publish` for a nack storm). Queues expire after 15 minutes unused,
    /// so a test that dies leaves nothing behind for long.
    pub async fn new(tag: &str, verify_args: &[(&str, AMQPValue)]) -> Upstream {
        let up = Upstream {
            exchange: unique(&format!("fault-{tag}-x")),
            queue: unique(&format!("fault-{tag}-q")),
            tap_queue: unique(&format!("fault-{tag}-tap")),
        };
        let conn = Connection::connect(RABBIT_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 (guest/guest)");
        let ch = conn.create_channel().await.expect("an AMQP channel");
        ch.exchange_declare(
            up.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the exchange");
        for (q, extra) in [(&up.queue, verify_args), (&up.tap_queue, &[][..])] {
            let mut args = FieldTable::default();
            args.insert("x-expires".into(), AMQPValue::LongInt(900_000));
            for (k, v) in extra {
                args.insert(ShortString::from(*k), v.clone());
            }
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .expect("declare a queue");
            ch.queue_bind(
                q.as_str().into(),
                up.exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind a queue");
        }
        let _ = conn.close(200, "declared".into()).await;
        up
    }

    /// Deletes the queues and the exchange (best effort; they expire anyway).
    pub async fn cleanup(&self) {
        let Ok(conn) = Connection::connect(RABBIT_URL, ConnectionProperties::default()).await
        else {
            return;
        };
        if let Ok(ch) = conn.create_channel().await {
            for q in [&self.queue, &self.tap_queue] {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = ch
                .exchange_delete(
                    self.exchange.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await;
        }
        let _ = conn.close(200, "cleanup".into()).await;
    }
}

/// What the tap saw.
#[derive(Debug, Default, Clone)]
pub struct TapStats {
    /// Messages consumed (duplicates included).
    pub received: u64,
    /// Messages that were not telemetry (e.g. a last will).
    pub undecodable: u64,
    /// The largest `arrival - sample_time_ms`, device sample to upstream arrival.
    pub max_latency_ms: u64,
    /// Telemetry messages per device id: to see who reached the upstream.
    pub by_device: BTreeMap<String, u64>,
    /// How long the tap ran (about the whole scenario).
    pub ran_for: Duration,
}

/// A device's reading: (device id, the device's sequence number).
pub type ReadingId = (String, u64);

/// What a tap started with [`Tap::start_recording_seqs`] keeps: the reading that each gateway
/// sequence number (the `gateway_seq` header) carried.
#[derive(Debug, Default)]
pub struct SeqLog {
    /// Every sequence number that arrived; a message that is not a reading (a last will) is
    /// `("", 0)`.
    pub readings: HashMap<u64, ReadingId>,
    /// Sequence numbers that arrived carrying two different readings: the gateway reused one.
    pub reused: Vec<(u64, ReadingId, ReadingId)>,
}

impl SeqLog {
    fn record(&mut self, seq: u64, reading: ReadingId) {
        match self.readings.get(&seq) {
            Some(first) if *first != reading => self.reused.push((seq, first.clone(), reading)),
            Some(_) => {}
            None => {
                self.readings.insert(seq, reading);
            }
        }
    }
}

/// The `gateway_seq` header of an upstream message.
fn gateway_seq(p: &lapin::BasicProperties) -> Option<u64> {
    match p.headers().as_ref()?.inner().get("gateway_seq")? {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

/// A live consumer of the tap queue: measures end-to-end latency while the scenario runs (the
/// verifier runs after the fleet, when latency no longer means anything).
pub struct Tap {
    started: Instant,
    stats: Arc<Mutex<TapStats>>,
    seqs: Option<Arc<Mutex<SeqLog>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Tap {
    pub async fn start(queue: &str) -> Tap {
        Tap::start_with(queue, None).await
    }

    /// A tap that also keeps the reading of every gateway sequence number ([`Tap::seqs`]).
    pub async fn start_recording_seqs(queue: &str) -> Tap {
        Tap::start_with(queue, Some(Arc::default())).await
    }

    async fn start_with(queue: &str, seqs: Option<Arc<Mutex<SeqLog>>>) -> Tap {
        let conn = Connection::connect(RABBIT_URL, ConnectionProperties::default())
            .await
            .expect("tap: connect to RabbitMQ");
        let ch = conn.create_channel().await.expect("tap: channel");
        ch.basic_qos(500, lapin::options::BasicQosOptions::default())
            .await
            .expect("tap: qos");
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                unique("tap").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("tap: consume");
        let stats = Arc::new(Mutex::new(TapStats::default()));
        let stop = CancellationToken::new();
        let (s, st, log) = (stats.clone(), stop.clone(), seqs.clone());
        let task = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    n = consumer.next() => n,
                    _ = st.cancelled() => break,
                };
                let Some(Ok(d)) = next else { break };
                let arrived = now_ms();
                let reading = firmware_sim::payload::decode(&d.data);
                {
                    let mut t = s.lock().unwrap_or_else(|e| e.into_inner());
                    t.received += 1;
                    match &reading {
                        Ok(r) => {
                            t.max_latency_ms = t
                                .max_latency_ms
                                .max(arrived.saturating_sub(r.sample_time_ms));
                            *t.by_device.entry(r.device_id.clone()).or_default() += 1;
                        }
                        Err(_) => t.undecodable += 1,
                    }
                }
                if let (Some(log), Some(seq)) = (&log, gateway_seq(&d.properties)) {
                    let id = reading.map_or((String::new(), 0), |r| (r.device_id, r.seq));
                    log.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(seq, id);
                }
                let _ = d.acker.ack(BasicAckOptions::default()).await;
            }
            let _ = ch.close(200, "tap done".into()).await;
            let _ = conn.close(200, "tap done".into()).await;
        });
        Tap {
            started: Instant::now(),
            stats,
            seqs,
            stop,
            task,
        }
    }

    /// Reads the sequence-number log of a tap started with [`Tap::start_recording_seqs`].
    pub fn seqs<R>(&self, f: impl FnOnce(&SeqLog) -> R) -> R {
        let log = self
            .seqs
            .as_ref()
            .expect("a tap started with start_recording_seqs");
        f(&log.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn stats(&self) -> TapStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub async fn stop(self) -> TapStats {
        self.stop.cancel();
        let stats = self.stats.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        let mut s = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        s.ran_for = self.started.elapsed();
        s
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway process
// ---------------------------------------------------------------------------------------------

/// What the gateway is started with. Defaults: the devices `dev-00001..`, the queue in the
/// test's temporary directory, `fsync = "always"`, an AMQP uplink named [`UPLINK`] to
/// `127.0.0.1:<uplink_port>` (the proxy) with test-sized timings, routing `devices/#`.
#[derive(Debug, Clone)]
pub struct GatewaySpec {
    /// Certificates `dev-00001..dev-<devices>`.
    pub devices: usize,
    /// More certificates: `(id_prefix, count)` make `<prefix>00001..` (firmware-sim's naming).
    pub more_devices: Vec<(String, usize)>,
    /// The queue directory; `None`: `data/` in the test's temporary directory.
    pub data_dir: Option<PathBuf>,
    /// Extra lines for `[queue]` (e.g. `max_bytes = "128 KiB"`).
    pub queue: String,
    /// Extra lines for the `[[uplinks]]` entry (e.g. `window = 64`).
    pub uplink: String,
    /// Extra TOML (whole sections: `[limits]`, `[[acl]]`, ...).
    pub extra: String,
    /// Where the uplink connects (the fault proxy's port).
    pub uplink_port: u16,
    pub exchange: String,
}

impl GatewaySpec {
    pub fn new(devices: usize, uplink_port: u16, exchange: &str) -> GatewaySpec {
        GatewaySpec {
            devices,
            more_devices: Vec::new(),
            data_dir: None,
            queue: String::new(),
            uplink: String::new(),
            extra: String::new(),
            uplink_port,
            exchange: exchange.to_string(),
        }
    }
}

/// The real gateway binary on a fixed port, data dir and config, that a test can start, kill
/// (SIGKILL) and stop (SIGTERM) as often as it likes. Killed when dropped.
pub struct Gateway {
    pub spec: GatewaySpec,
    pub dir: tempfile::TempDir,
    pub certs: PathBuf,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    /// The admin endpoint's port, when this build of the gateway accepts `[admin]`.
    pub admin_port: Option<u16>,
    child: Option<Child>,
    starts: u32,
}

impl Gateway {
    /// Writes the certificates and the config; does not start the gateway.
    pub fn new(spec: GatewaySpec) -> Gateway {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let certs = dir.path().join("certs");
        gateway::certs::generate(&certs, spec.devices).expect("generate certificates");
        if !spec.more_devices.is_empty() {
            let ca = gateway::certs::DevCa::load(&certs).expect("load the test CA");
            for (prefix, n) in &spec.more_devices {
                for i in 1..=*n {
                    let id = format!("{prefix}{i:05}");
                    let (cert, key) = ca.device_cert(&id).expect("a device certificate");
                    std::fs::write(certs.join("devices").join(format!("{id}.pem")), cert)
                        .expect("write a device certificate");
                    std::fs::write(certs.join("devices").join(format!("{id}.key")), key)
                        .expect("write a device key");
                }
            }
        }
        let data_dir = spec
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        let config = dir.path().join("gateway.toml");
        let port = free_port();
        let mut gw = Gateway {
            spec,
            dir,
            certs,
            data_dir,
            config,
            port,
            admin_port: None,
            child: None,
            starts: 0,
        };
        let admin_port = free_port();
        gw.write_config(Some(admin_port));
        if gw.check_config().is_ok() {
            gw.admin_port = Some(admin_port);
        } else {
            gw.write_config(None);
            if let Err(e) = gw.check_config() {
                panic!("the test's gateway config is invalid: {e}");
            }
        }
        gw
    }

    fn write_config(&self, admin_port: Option<u16>) {
        let s = &self.spec;
        let admin = admin_port
            .map(|p| format!("[admin]\nlisten = \"127.0.0.1:{p}\"\n"))
            .unwrap_or_default();
        let text = format!(
            r#"[queue]
data_dir = "{data}"
{queue}

[[listeners]]
bind = "127.0.0.1:{port}"
tls = {{ cert = "{c}/server.pem", key = "{c}/server.key", client_ca = "{c}/ca.pem", require_client_cert = true }}

[gateway]
id = "faults"

[[uplinks]]
name = "{UPLINK}"
type = "amqp"
url = "amqp://guest:guest@127.0.0.1:{uport}/%2f"
exchange = "{exchange}"
routing_key = "{{topic}}"
declare = false
confirm_timeout = "3s"
backoff_min = "100ms"
backoff_max = "1s"
{uplink}

[[routes]]
filter = "devices/#"
uplinks = ["{UPLINK}"]

{admin}
{extra}
"#,
            data = self.data_dir.display(),
            queue = s.queue,
            port = self.port,
            c = self.certs.display(),
            uport = s.uplink_port,
            exchange = s.exchange,
            uplink = s.uplink,
            extra = s.extra,
        );
        std::fs::write(&self.config, text).expect("write the gateway config");
    }

    fn check_config(&self) -> Result<(), String> {
        let out = Command::new(workspace_binary("gateway", "gateway"))
            .arg("check-config")
            .arg("--config")
            .arg(&self.config)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("gateway-{n}.log"))
    }

    /// The log of the current (last) run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    /// The logs of every run, oldest first.
    pub fn all_logs(&self) -> String {
        (1..=self.starts)
            .map(|n| std::fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts the gateway process and returns at once, with the moment it was started (a test
    /// that kills it during its start-up, while the queue recovers). [`Gateway::start`] also
    /// waits until it listens.
    pub fn spawn(&mut self) -> Instant {
        assert!(self.child.is_none(), "the gateway is already running");
        self.starts += 1;
        let log = File::create(self.log_path(self.starts)).expect("create the gateway log");
        let t = Instant::now();
        let child = Command::new(workspace_binary("gateway", "gateway"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("FAULT_GATEWAY_LOG").unwrap_or_else(|_| "info,rustls=error".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the gateway");
        self.child = Some(child);
        t
    }

    /// Starts the gateway and waits until it listens for devices; returns how long that took
    /// (queue recovery included). Panics, with the log, when it exits or does not listen.
    pub async fn start(&mut self) -> Duration {
        let t = self.spawn();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "the gateway exited at start ({status}):\n{}",
                    tail(&self.log(), 40)
                );
            }
            if self.log().contains("listening for MQTT devices") {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < START_TIMEOUT,
                "the gateway did not listen within {START_TIMEOUT:?}:\n{}",
                tail(&self.log(), 40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running (not exited, not killed).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit (SIGKILL after `timeout`); whether it exited cleanly.
    pub async fn stop(&mut self, timeout: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        signal(c.id(), "TERM");
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// `gateway queue stats` in-process (read-only; works while the gateway runs).
    pub fn stats(&self) -> Option<DirStats> {
        Inspector::open(&self.data_dir).ok().map(|i| i.stats())
    }

    /// The uplink's cursor.
    pub fn cursor(&self) -> Option<CursorStats> {
        self.stats()?.cursors.into_iter().find(|c| c.name == UPLINK)
    }

    /// The highest sequence number in the queue (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.stats().and_then(|s| s.last_seq).unwrap_or(0)
    }

    /// Waits until the uplink confirmed every record up to `seq`; returns how long it took.
    pub async fn wait_forwarded(&self, seq: u64, timeout: Duration) -> Duration {
        match wait_until(timeout, "the uplink to confirm the backlog", || {
            self.cursor().is_some_and(|c| c.acked >= seq)
        })
        .await
        {
            Ok(d) => d,
            Err(e) => panic!("{e}: through seq {seq}, cursor {:?}", self.cursor()),
        }
    }

    /// Waits until the uplink has confirmed everything in the queue and nothing more comes in.
    pub async fn drained(&self) {
        let t = Instant::now();
        loop {
            let last = self.last_seq();
            self.wait_forwarded(last, Duration::from_secs(120)).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            if self.last_seq() == last {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(180), "never drained");
        }
    }

    /// The Prometheus text at `/metrics`, when the admin endpoint is served.
    pub async fn metrics(&self) -> Option<Metrics> {
        let port = self.admin_port?;
        let body = http_get(port, "/metrics").await?;
        Some(Metrics::parse(&body))
    }

    /// Runs `gateway queue <args> --data-dir D`; returns (success, stdout, stderr).
    pub fn queue_tool(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(workspace_binary("gateway", "gateway"))
            .arg("queue")
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .output()
            .expect("run gateway queue");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The dead letters (read in-process from `data/dead-letters`): (device id, device seq)
    /// of each telemetry record, and the number of records in total.
    pub fn dead_letters(&self) -> (Vec<(String, u64)>, usize) {
        let dir = self.data_dir.join("dead-letters");
        let Ok(insp) = Inspector::open(&dir) else {
            return (Vec::new(), 0);
        };
        let records = insp.records(0, usize::MAX).unwrap_or_default();
        let n = records.len();
        let readings = records
            .iter()
            .filter_map(|r| firmware_sim::payload::decode(&r.payload).ok())
            .map(|t| (t.device_id, t.seq))
            .collect();
        (readings, n)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of a log, for panic messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A GET on 127.0.0.1:`port` (HTTP/1.0, 5 s); the body on 200.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.")
            .then_some(())
            .filter(|_| head.split_whitespace().nth(1) == Some("200"))?;
        Some(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()
        .flatten()
}

/// Prometheus text, summed per metric name over its labels (and kept per full series).
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    pub by_name: HashMap<String, f64>,
    pub series: HashMap<String, f64>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut m = Metrics::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.trim().parse::<f64>() else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series).to_string();
            *m.by_name.entry(name).or_default() += v;
            m.series.insert(series.to_string(), v);
        }
        m
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.by_name.get(name).copied()
    }
}

// ---------------------------------------------------------------------------------------------
// The fleet
// ---------------------------------------------------------------------------------------------

/// A `firmware-sim run` configuration; every field maps to one flag.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub devices: usize,
    pub id_prefix: String,
    /// Readings per second per device (0: flat out).
    pub rate: f64,
    pub mqtt5: bool,
    pub outbox: Option<usize>,
    pub payload_bytes: Option<usize>,
    /// Stop after this many readings per device; `None`: run until stopped (SIGTERM).
    pub count_per_device: Option<u64>,
    /// Extra flags.
    pub args: Vec<String>,
}

impl FleetSpec {
    pub fn new(devices: usize, rate: f64) -> FleetSpec {
        FleetSpec {
            devices,
            id_prefix: "dev-".into(),
            rate,
            mqtt5: false,
            outbox: None,
            payload_bytes: None,
            count_per_device: None,
            args: Vec::new(),
        }
    }
}

/// A fleet running in the background. Killed when dropped.
pub struct Fleet {
    child: tokio::process::Child,
    pub manifest: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
}

/// A finished fleet: its summary (`--json`) and manifest.
#[derive(Debug)]
pub struct FleetRun {
    pub summary: Value,
    pub manifest: PathBuf,
    pub exit_code: Option<i32>,
}

impl FleetRun {
    pub fn get(&self, key: &str) -> u64 {
        self.summary[key].as_u64().unwrap_or(0)
    }
}

impl Fleet {
    /// Starts `firmware-sim run` against the gateway with per-device certificates (QoS 1,
    /// reconnects within 1 s, at most 1 s of reconnect backoff).
    pub fn start(gw: &Gateway, spec: &FleetSpec, name: &str) -> Fleet {
        let dir = gw.dir.path();
        let manifest = dir.join(format!("{name}.manifest.json"));
        let stdout = dir.join(format!("{name}.out.json"));
        let stderr = dir.join(format!("{name}.err.log"));
        let mut cmd =
            tokio::process::Command::new(workspace_binary("firmware-sim", "firmware-sim"));
        cmd.args(["run", "--broker", &format!("127.0.0.1:{}", gw.port)])
            .arg("--certs-dir")
            .arg(&gw.certs)
            .args(["--devices", &spec.devices.to_string()])
            .args(["--id-prefix", &spec.id_prefix])
            .args(["--rate", &spec.rate.to_string()])
            .args(["--qos", "1", "--progress", "off", "--json"])
            .args(["--reconnect-min", "100ms", "--reconnect-max", "1s"])
            .args(["--drain-timeout", "20s", "--connect-rate", "500"])
            .args(["--mqtt-version", if spec.mqtt5 { "5" } else { "3.1.1" }])
            .arg("--manifest")
            .arg(&manifest);
        match spec.count_per_device {
            Some(n) => cmd.args(["--count-per-device", &n.to_string()]),
            None => cmd.args(["--duration", "3600"]),
        };
        if let Some(n) = spec.outbox {
            cmd.args(["--outbox", &n.to_string()]);
        }
        if let Some(b) = spec.payload_bytes {
            cmd.args(["--payload-bytes", &b.to_string()]);
        }
        cmd.args(&spec.args)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("fleet stdout file"))
            .stderr(File::create(&stderr).expect("fleet stderr file"))
            .kill_on_drop(true);
        let child = cmd.spawn().expect("start firmware-sim run");
        Fleet {
            child,
            manifest,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the fleet to finish on its own (`count_per_device`).
    pub async fn wait(mut self, timeout: Duration) -> FleetRun {
        let status = tokio::time::timeout(timeout, self.child.wait()).await;
        let code = match status {
            Ok(Ok(s)) => s.code(),
            _ => {
                let _ = self.child.kill().await;
                panic!(
                    "the fleet did not finish within {timeout:?}:\n{}",
                    tail(
                        &std::fs::read_to_string(&self.stderr).unwrap_or_default(),
                        20
                    )
                );
            }
        };
        self.finish(code)
    }

    /// Stops sampling (SIGTERM: the fleet drains its outboxes, then writes the manifest).
    pub async fn stop(self, timeout: Duration) -> FleetRun {
        if let Some(pid) = self.child.id() {
            signal(pid, "TERM");
        }
        self.wait(timeout).await
    }

    fn finish(self, code: Option<i32>) -> FleetRun {
        let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        assert!(
            matches!(code, Some(0) | Some(1)),
            "the fleet failed to run (exit {code:?}): {out}\n{}",
            tail(&err, 20)
        );
        let summary: Value = out
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l.trim()).ok())
            .unwrap_or_else(|| panic!("no JSON summary from the fleet: {out}\n{}", tail(&err, 20)));
        assert!(
            self.manifest.exists(),
            "the fleet wrote no manifest: {out}\n{}",
            tail(&err, 20)
        );
        FleetRun {
            summary,
            manifest: self.manifest.clone(),
            exit_code: code,
        }
    }
}

/// Merges manifests of fleets with disjoint device ids into one (one verifier run for all).
pub fn merge_manifests(parts: &[&Path], out: &Path) -> PathBuf {
    let mut merged: Option<firmware_sim::manifest::Manifest> = None;
    for p in parts {
        let m = firmware_sim::manifest::Manifest::read(p).expect("read a manifest");
        match merged.as_mut() {
            None => merged = Some(m),
            Some(all) => {
                all.run.devices += m.run.devices;
                all.devices.extend(m.devices);
            }
        }
    }
    merged
        .expect("at least one manifest")
        .write(out)
        .expect("write the merged manifest");
    out.to_path_buf()
}

// ---------------------------------------------------------------------------------------------
// The verifier and the figures
// ---------------------------------------------------------------------------------------------

/// The verifier's JSON report.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub json: Value,
    pub exit_code: Option<i32>,
}

impl Verdict {
    /// A figure from `total` (received, unique, missing, duplicates, out_of_order, expected,
    /// undecodable, unknown, ...).
    pub fn total(&self, key: &str) -> u64 {
        self.json["total"][key].as_u64().unwrap_or(0)
    }

    /// Per device: (missing count, missing ranges as reported: the first few).
    pub fn missing_by_device(&self) -> BTreeMap<String, (u64, Vec<(u64, u64)>)> {
        let mut out = BTreeMap::new();
        if let Some(devs) = self.json["devices"].as_object() {
            for (id, d) in devs {
                let n = d["missing"].as_u64().unwrap_or(0);
                if n == 0 {
                    continue;
                }
                let ranges = d["missing_ranges"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|r| Some((r[0].as_u64()?, r[1].as_u64()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                out.insert(id.clone(), (n, ranges));
            }
        }
        out
    }

    /// Short text for assertion messages: the totals, and the first devices with problems.
    pub fn brief(&self) -> String {
        let problems: Vec<String> = self.json["devices"]
            .as_object()
            .map(|devs| {
                devs.iter()
                    .filter(|(_, d)| {
                        d["missing"].as_u64().unwrap_or(0) > 0
                            || d["out_of_order"].as_u64().unwrap_or(0) > 0
                    })
                    .take(5)
                    .map(|(id, d)| {
                        format!(
                            "{id}: missing {} {}, out of order {}, duplicates {}",
                            d["missing"],
                            d["missing_ranges"],
                            d["out_of_order_examples"],
                            d["duplicate_examples"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        format!(
            "total {} failures {} timed_out {} devices [{}]",
            self.json["total"],
            self.json["failures"],
            self.json["timed_out"],
            problems.join("; ")
        )
    }
}

/// Runs `firmware-sim verify --amqp` on `queue` against `manifest`. `settle`: keep reading that
/// long after everything expected arrived (to count trailing duplicates).
pub async fn verify(manifest: &Path, queue: &str, timeout_s: u64, settle_s: u64) -> Verdict {
    let out = tokio::time::timeout(
        Duration::from_secs(timeout_s + settle_s + 30),
        tokio::process::Command::new(workspace_binary("firmware-sim", "firmware-sim"))
            .args(["verify", "--amqp", RABBIT_URL, "--queue", queue])
            .args(["--timeout", &format!("{timeout_s}s")])
            .args(["--settle", &format!("{settle_s}s")])
            .args(["--json", "--expect"])
            .arg(manifest)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the verifier finishes")
    .expect("run firmware-sim verify");
    let text = String::from_utf8_lossy(&out.stdout);
    let json: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "verifier output is not JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Verdict {
        json,
        exit_code: out.status.code(),
    }
}

/// The figures of one scenario: the one line it prints.
#[derive(Debug, Clone)]
pub struct Figures {
    pub scenario: String,
    /// Readings the gateway acknowledged to devices (PUBACK): the manifests' `acked`.
    pub acked: u64,
    /// Distinct readings that reached the upstream (the verifier's `unique`).
    pub delivered: u64,
    /// Acknowledged readings that never arrived.
    pub missing: u64,
    /// Arrivals of a reading that had already arrived (at-least-once allows them).
    pub duplicates: u64,
    /// Largest device-sample-to-upstream-arrival time (the tap, live).
    pub max_latency_ms: u64,
    /// The scenario's recovery time (see tests/README.md for each definition).
    pub recovery_ms: u64,
    /// Wall time of the scenario (not part of the line; printed beside it).
    pub took: Duration,
}

impl Figures {
    pub fn new(scenario: &str, v: &Verdict, tap: &TapStats, recovery: Duration) -> Figures {
        Figures {
            scenario: scenario.into(),
            acked: v.total("expected"),
            delivered: v.total("unique"),
            missing: v.total("missing"),
            duplicates: v.total("duplicates"),
            max_latency_ms: tap.max_latency_ms,
            recovery_ms: recovery.as_millis() as u64,
            took: tap.ran_for,
        }
    }

    pub fn line(&self) -> String {
        format!(
            "FAULT scenario={} acked={} delivered={} missing={} duplicates={} max_latency_ms={} recovery_ms={}",
            self.scenario,
            self.acked,
            self.delivered,
            self.missing,
            self.duplicates,
            self.max_latency_ms,
            self.recovery_ms
        )
    }

    /// Prints the line straight to stderr (not captured by the test harness, so it shows in
    /// every run), and appends it to `$FAULT_REPORT` when that is set.
    pub fn print(&self) {
        let line = self.line();
        let _ = writeln!(
            std::io::stderr(),
            "{line}\n({} took {:.0} s)",
            self.scenario,
            self.took.as_secs_f64()
        );
        if let Ok(path) = std::env::var("FAULT_REPORT") {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{line}");
            }
        }
    }
}

/// The common end of a scenario: nothing acknowledged missing beyond `allowed_missing`, nothing
/// out of order, nothing from outside the manifest.
pub fn assert_delivery(v: &Verdict, allowed_missing: u64) {
    assert_eq!(v.total("out_of_order"), 0, "out of order: {}", v.brief());
    assert_eq!(
        v.total("missing"),
        allowed_missing,
        "missing acknowledged messages: {}",
        v.brief()
    );
    assert!(
        !v.json["timed_out"].as_bool().unwrap_or(false) || allowed_missing > 0,
        "the verifier timed out: {}",
        v.brief()
    );
    assert_eq!(v.total("unknown"), 0, "unknown readings: {}", v.brief());
}
