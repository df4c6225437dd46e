//! The fleet runner: N simulated devices, one tokio task each, publishing over rumqttc.
//!
//! ```text
//! run(config, shutdown)
//!   ├─ TLS client configs (once, shared where devices share a certificate)
//!   ├─ one task per device: device_task::run_device   (state machine + rumqttc event loop)
//!   │     connections spread over time (--connect-rate), reconnect with backoff and jitter
//!   ├─ progress reporter (indicatif bar on a terminal, plain lines otherwise)
//!   └─ phases: Running ─(duration over / shutdown)─> Draining ─(drain timeout)─> Abort
//!                 every device finished (count reached, all acknowledged) ends the run early
//! ```
//!
//! With `commands` on, every device also subscribes (persistent session) to its command topic,
//! answers what arrives there, and stays online until the run ends (duration, Ctrl-C) or it
//! took `expect_commands` distinct commands.
//!
//! At the end the runner collects every device's record into a [`Manifest`] and a
//! [`FleetReport`].

mod device_task;
pub mod link;
mod report;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::device::{
    Device, DeviceConfig, DeviceError, FullPolicy, LARGE_MSG, OUTBOX, REPLIES, SMALL_MSG,
};
use crate::manifest::{Manifest, ManifestError, RunInfo, VERSION};
use crate::tls::{TlsError, TlsSettings};
pub use device_task::BackoffConfig;
use device_task::{CommandCtx, DeviceCtx, DeviceOutcome};
pub use link::MqttVersion;
pub use report::{peak_rss_bytes, rss_bytes, CommandCounts, FleetReport, Latency, ProgressMode};

/// Default in-flight window and outbox per device: enough to keep a LAN link busy, small enough
/// for a microcontroller (16 x 256 B = 4 KiB).
pub const DEFAULT_OUTBOX: usize = 16;
/// Connections opened per second at start: a fleet does not power on in the same millisecond,
/// and a TLS listener should not see 10,000 handshakes at once.
pub const DEFAULT_CONNECT_RATE: f64 = 1000.0;
/// How long a timed or interrupted run waits for outstanding acknowledgements.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// MQTT keep-alive: long enough not to add traffic, short enough to notice a dead gateway.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// MQTT 5 session expiry of devices that take commands: an hour keeps commands for a device that
/// is offline through a test or a restart, without leaving sessions on a broker for ever.
pub const DEFAULT_SESSION_EXPIRY: Duration = Duration::from_secs(3600);

/// A fully resolved fleet run (the CLI merges `fleet.toml` and flags into this).
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `HOST:PORT` of the MQTT broker or gateway.
    pub broker: String,
    pub version: MqttVersion,
    pub devices: usize,
    /// Device ids are `<id_prefix><5-digit index>`, from `first_device`: `dev-00001`.
    pub id_prefix: String,
    /// Index of the first device (1): a second fleet process can run `dev-00051` onwards, so a
    /// test can bring part of the fleet online later (commands wait for it meanwhile).
    pub first_device: usize,
    /// Readings per second per device; 0 = flat out (sample whenever the outbox has room).
    pub rate: f64,
    /// Pad each payload to at least this many bytes (0: no padding).
    pub payload_bytes: usize,
    pub qos: u8,
    /// Stop sampling after this long (then drain).
    pub duration: Option<Duration>,
    /// Stop after this many readings per device.
    pub count_per_device: Option<u64>,
    /// Telemetry topic; `{id}` is replaced by the device id.
    pub topic: String,
    /// Last-will topic for the offline status message; `{id}` as above.
    pub status_topic: String,
    pub seed: u64,
    /// `None`: plaintext.
    pub tls: Option<TlsSettings>,
    /// MQTT username (`{id}` replaced) and password.
    pub credentials: Option<(String, String)>,
    /// Outbox slots per device (at most [`OUTBOX`]); also the in-flight window.
    pub outbox: usize,
    pub policy: FullPolicy,
    pub keep_alive: Duration,
    pub connect_rate: f64,
    pub backoff: BackoffConfig,
    pub drain_timeout: Duration,
    /// Write the manifest here at the end.
    pub manifest: Option<PathBuf>,
    pub progress: ProgressMode,
    /// Take commands: subscribe to `command_topic/#` with a persistent session and answer.
    pub commands: bool,
    /// Command topic; `{id}` as above. A command is published on `<command_topic>/<name>`.
    pub command_topic: String,
    /// Where replies go when a command has no MQTT 5 response topic; `{id}` as above.
    pub reply_topic: String,
    /// MQTT 5 session expiry with `commands` (MQTT 3.1.1 sessions do not expire).
    pub session_expiry: Duration,
    /// With `commands`: a device finishes once it took this many distinct commands (and its
    /// readings are done); otherwise it stays online until the run ends.
    pub expect_commands: Option<u64>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            broker: "127.0.0.1:1883".into(),
            version: MqttVersion::V311,
            devices: 10,
            id_prefix: "dev-".into(),
            first_device: 1,
            rate: 1.0,
            payload_bytes: 0,
            qos: 1,
            duration: None,
            count_per_device: None,
            topic: "devices/{id}/telemetry".into(),
            status_topic: "devices/{id}/status".into(),
            seed: 1,
            tls: None,
            credentials: None,
            outbox: DEFAULT_OUTBOX,
            policy: FullPolicy::Block,
            keep_alive: DEFAULT_KEEP_ALIVE,
            connect_rate: DEFAULT_CONNECT_RATE,
            backoff: BackoffConfig {
                min: Duration::from_millis(100),
                max: Duration::from_secs(10),
            },
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            manifest: None,
            progress: ProgressMode::Auto,
            commands: false,
            command_topic: "devices/{id}/commands".into(),
            reply_topic: "devices/{id}/replies".into(),
            session_expiry: DEFAULT_SESSION_EXPIRY,
            expect_commands: None,
        }
    }
}

/// Why a fleet run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A setting is out of range; names the flag / `fleet.toml` key.
    #[error("invalid setting {key} = {value}: {reason}")]
    Config {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A device could not be built with these settings.
    #[error("device {id}: {error}")]
    Device { id: String, error: DeviceError },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

fn invalid(key: &'static str, value: impl ToString, reason: impl Into<String>) -> FleetError {
    FleetError::Config {
        key,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Where the run is: devices sample while `Running`, finish what is in their outbox while
/// `Draining`, and disconnect at once on `Abort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    Draining,
    Abort,
}

/// Wall-clock microseconds derived from a monotonic clock: readings get epoch timestamps that
/// never go backwards.
pub(crate) struct Clock {
    base: Instant,
    base_us: u64,
}

impl Clock {
    fn new() -> Self {
        let base_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Clock {
            base: Instant::now(),
            base_us,
        }
    }

    pub(crate) fn micros_at(&self, at: Instant) -> u64 {
        self.base_us + at.saturating_duration_since(self.base).as_micros() as u64
    }

    pub(crate) fn instant_at(&self, us: u64) -> Instant {
        self.base + Duration::from_micros(us.saturating_sub(self.base_us))
    }
}

/// Fleet-wide counters, updated by device tasks, read by the progress reporter.
#[derive(Default)]
pub(crate) struct Counters {
    pub sampled: AtomicU64,
    pub sent: AtomicU64,
    pub resent: AtomicU64,
    pub acked: AtomicU64,
    pub acked_after_drop: AtomicU64,
    pub refused: AtomicU64,
    pub dropped: AtomicU64,
    pub blocked: AtomicU64,
    pub connects: AtomicU64,
    pub connect_errors: AtomicU64,
    pub connection_losses: AtomicU64,
    pub online: AtomicU64,
    /// Microseconds from the start of the run to the latest acknowledgement.
    pub last_ack_us: AtomicU64,
    /// Commands received (PUBLISHes on a command topic), bad and duplicates included.
    pub commands: AtomicU64,
    pub commands_bad: AtomicU64,
    pub commands_duplicate: AtomicU64,
    pub replies_acked: AtomicU64,
    pub reboots: AtomicU64,
}

pub(crate) struct Shared {
    pub counters: Counters,
    pub clock: Clock,
    started: Instant,
    /// Publish-to-ack latency in microseconds.
    latency: Mutex<hdrhistogram::Histogram<u64>>,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn record_ack(&self, submitted: Instant) {
        let now = Instant::now();
        let us = now.saturating_duration_since(submitted).as_micros() as u64;
        if let Ok(mut h) = self.latency.lock() {
            h.saturating_record(us.max(1));
        }
        let since_start = now.saturating_duration_since(self.started).as_micros() as u64;
        self.counters.last_ack_us.fetch_max(since_start, Relaxed);
    }

    pub(crate) fn note_error(&self, device: &str, error: &str) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(format!("{device}: {error}"));
        }
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}

/// `host:port` → (host, port).
fn parse_broker(broker: &str) -> Result<(String, u16), FleetError> {
    let (host, port) = broker
        .rsplit_once(':')
        .ok_or_else(|| invalid("broker", broker, "expected HOST:PORT"))?;
    let port = port
        .parse::<u16>()
        .map_err(|e| invalid("broker", broker, format!("port: {e}")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid("broker", broker, "empty host"));
    }
    Ok((host.to_owned(), port))
}

impl FleetConfig {
    fn validate(&self) -> Result<(String, u16), FleetError> {
        if self.devices == 0 || self.devices > 99_999 {
            return Err(invalid("devices", self.devices, "must be 1..=99999"));
        }
        if self.first_device == 0 || self.first_device + self.devices - 1 > 99_999 {
            return Err(invalid(
                "first-device",
                self.first_device,
                "must be at least 1, and the last device at most 99999",
            ));
        }
        if self.qos > 2 {
            return Err(invalid("qos", self.qos, "must be 0, 1 or 2"));
        }
        if !(self.rate.is_finite() && self.rate >= 0.0 && self.rate <= 1_000_000.0) {
            return Err(invalid(
                "rate",
                self.rate,
                "readings per second per device, 0 (flat out) to 1000000",
            ));
        }
        if !(self.connect_rate.is_finite() && self.connect_rate > 0.0) {
            return Err(invalid(
                "connect-rate",
                self.connect_rate,
                "must be above 0",
            ));
        }
        if self.outbox == 0 || self.outbox > OUTBOX {
            return Err(invalid(
                "outbox",
                self.outbox,
                format!("must be 1..={OUTBOX}"),
            ));
        }
        if self.payload_bytes > LARGE_MSG {
            return Err(invalid(
                "payload-bytes",
                self.payload_bytes,
                format!("at most {LARGE_MSG} (the largest device message buffer)"),
            ));
        }
        if self.keep_alive < Duration::from_secs(1) {
            return Err(invalid(
                "keep-alive",
                format!("{:?}", self.keep_alive),
                "at least 1s",
            ));
        }
        if self.backoff.min.is_zero() || self.backoff.max < self.backoff.min {
            return Err(invalid(
                "reconnect",
                format!("{:?}..{:?}", self.backoff.min, self.backoff.max),
                "need 0 < min <= max",
            ));
        }
        if !self.topic.contains("{id}") {
            // Allowed, but then the upstream cannot tell devices apart by topic.
            warn!(topic = %self.topic, "topic has no {{id}}: all devices publish to one topic");
        }
        if self.commands {
            for (key, topic) in [
                ("command-topic", &self.command_topic),
                ("reply-topic", &self.reply_topic),
            ] {
                if topic.is_empty() || topic.contains(['#', '+']) {
                    return Err(invalid(key, topic, "a topic name without wildcards"));
                }
            }
            if self.command_topic.ends_with('/') {
                return Err(invalid(
                    "command-topic",
                    &self.command_topic,
                    "no trailing '/': commands arrive on <command-topic>/<name>",
                ));
            }
        }
        if self.id_prefix.len() + 5 > crate::device::MAX_ID {
            return Err(invalid(
                "id-prefix",
                &self.id_prefix,
                format!("device ids must fit {} bytes", crate::device::MAX_ID),
            ));
        }
        parse_broker(&self.broker)
    }

    /// The device ids of this fleet, in order.
    pub fn device_ids(&self) -> Vec<String> {
        (self.first_device..self.first_device + self.devices)
            .map(|i| format!("{}{i:05}", self.id_prefix))
            .collect()
    }
}

/// Raises the soft open-files limit to what the fleet needs (up to the hard limit): one socket
/// per device plus files, runtime and slack.
fn raise_fd_limit(devices: usize) -> u64 {
    let want = devices as u64 + 256;
    match rlimit::increase_nofile_limit(want) {
        Ok(got) => {
            if got < want {
                warn!(
                    limit = got,
                    wanted = want,
                    "open-files hard limit is below one socket per device; raise it (ulimit -Hn)"
                );
            }
            got
        }
        Err(e) => {
            warn!(error = %e, "could not raise the open-files limit");
            0
        }
    }
}

/// Runs the fleet until every device is done (count mode), the duration is over, or `shutdown`
/// resolves; then drains (at most `drain_timeout`) and reports.
pub async fn run(
    cfg: FleetConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<FleetReport, FleetError> {
    let (host, port) = cfg.validate()?;
    let ids = cfg.device_ids();
    let tls = match &cfg.tls {
        Some(settings) => Some(crate::tls::client_configs(settings, &ids)?),
        None => None,
    };
    let fd_limit = raise_fd_limit(cfg.devices);
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        clock: Clock::new(),
        started: Instant::now(),
        latency: Mutex::new(
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .map_err(|e| invalid("latency histogram", "", e.to_string()))?,
        ),
        last_error: Mutex::new(None),
    });
    let started_ms = shared.clock.micros_at(shared.started) / 1000;
    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let mut tasks = JoinSet::new();
    let interval_us = if cfg.rate == 0.0 {
        0
    } else {
        ((1_000_000.0 / cfg.rate).round() as u64).max(1)
    };
    let connect_gap = Duration::from_secs_f64(1.0 / cfg.connect_rate);
    let max_packet = LARGE_MSG.max(cfg.payload_bytes) + 1024;

    for (i, id) in ids.iter().enumerate() {
        let dcfg = DeviceConfig {
            seed: cfg.seed,
            interval_us,
            payload_bytes: cfg.payload_bytes,
            policy: cfg.policy,
            outbox_limit: cfg.outbox,
            count: cfg.count_per_device,
        };
        let ctx = DeviceCtx {
            id: id.clone(),
            topic: cfg.topic.replace("{id}", id),
            qos: cfg.qos,
            link: link::LinkOptions {
                version: cfg.version,
                client_id: id.clone(),
                host: host.clone(),
                port,
                tls: tls.as_ref().and_then(|t| t.get(i).cloned()),
                credentials: cfg
                    .credentials
                    .as_ref()
                    .map(|(u, p)| (u.replace("{id}", id), p.clone())),
                keep_alive: cfg.keep_alive,
                will: (
                    cfg.status_topic.replace("{id}", id),
                    serde_json::json!({ "device_id": id, "status": "offline" })
                        .to_string()
                        .into_bytes(),
                ),
                // Replies ride beside readings, so they get their own share of the window.
                inflight: (cfg.outbox + if cfg.commands { REPLIES } else { 0 }) as u16,
                max_packet,
                session_expiry: cfg.commands.then_some(cfg.session_expiry),
            },
            start_at: shared.started + connect_gap * i as u32,
            backoff: cfg.backoff,
            jitter_seed: cfg.seed ^ crate::device::fnv1a(id.as_bytes()) ^ 0x6a09_e667_f3bc_c908,
            commands: cfg.commands.then(|| CommandCtx {
                prefix: format!("{}/", cfg.command_topic.replace("{id}", id)),
                reply_topic: cfg.reply_topic.replace("{id}", id),
                expect: cfg.expect_commands,
            }),
        };
        let device_error = |error| FleetError::Device {
            id: id.clone(),
            error,
        };
        let (shared, rx) = (shared.clone(), phase_rx.clone());
        // The message buffer is fixed at compile time, as in firmware: pick the smallest fit.
        // Boxed, so the device lives once on the heap rather than (twice) in the task's future.
        if cfg.payload_bytes <= SMALL_MSG {
            let dev = Device::<SMALL_MSG, OUTBOX>::new(id, dcfg).map_err(device_error)?;
            tasks.spawn(device_task::run_device(ctx, Box::new(dev), shared, rx));
        } else {
            let dev = Device::<LARGE_MSG, OUTBOX>::new(id, dcfg).map_err(device_error)?;
            tasks.spawn(device_task::run_device(ctx, Box::new(dev), shared, rx));
        }
    }
    drop(phase_rx);
    info!(
        devices = cfg.devices,
        broker = %cfg.broker,
        qos = cfg.qos,
        tls = cfg.tls.is_some(),
        fd_limit,
        "fleet started"
    );

    let expected_total = cfg.count_per_device.map(|n| n * cfg.devices as u64);
    let progress = report::Progress::start(
        cfg.progress,
        shared.clone(),
        cfg.devices,
        cfg.qos,
        expected_total,
        cfg.duration,
    );

    let mut outcomes: Vec<DeviceOutcome> = Vec::with_capacity(cfg.devices);
    let mut phase = Phase::Running;
    let mut deadline = cfg.duration.map(|d| tokio::time::Instant::now() + d);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut shutdown_done = false;
    while !tasks.is_empty() {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok(outcome)) => outcomes.push(outcome),
                Some(Err(e)) => warn!(error = %e, "device task failed"),
                None => break,
            },
            () = sleep => {
                phase = advance(phase, &phase_tx);
                deadline = (phase == Phase::Draining)
                    .then(|| tokio::time::Instant::now() + cfg.drain_timeout);
            },
            () = &mut shutdown, if !shutdown_done => {
                shutdown_done = true;
                info!("shutdown requested: draining");
                if phase == Phase::Running {
                    phase = advance(phase, &phase_tx);
                    deadline = Some(tokio::time::Instant::now() + cfg.drain_timeout);
                }
            },
        }
    }
    progress.finish().await;
    outcomes.sort_by(|a, b| a.id.cmp(&b.id));

    let manifest = Manifest {
        version: VERSION,
        run: RunInfo {
            started_ms,
            devices: cfg.devices,
            qos: cfg.qos,
            seed: cfg.seed,
            topic: cfg.topic.clone(),
        },
        devices: outcomes
            .iter()
            .map(|o| (o.id.clone(), o.record.clone()))
            .collect(),
    };
    if let Some(path) = &cfg.manifest {
        manifest.write(path)?;
    }
    let latency = shared
        .latency
        .lock()
        .ok()
        .and_then(|h| Latency::from_histogram(&h));
    Ok(FleetReport::new(
        &cfg, &shared, &outcomes, latency, manifest,
    ))
}

/// Moves to the next phase and tells every device.
fn advance(phase: Phase, tx: &watch::Sender<Phase>) -> Phase {
    let next = match phase {
        Phase::Running => Phase::Draining,
        Phase::Draining | Phase::Abort => Phase::Abort,
    };
    let _ = tx.send(next);
    next
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_parse_or_name_the_key() {
        assert_eq!(
            parse_broker("127.0.0.1:1883").unwrap(),
            ("127.0.0.1".into(), 1883)
        );
        assert_eq!(parse_broker("[::1]:8883").unwrap(), ("::1".into(), 8883));
        let err = parse_broker("localhost").unwrap_err().to_string();
        assert!(err.contains("broker") && err.contains("HOST:PORT"), "{err}");
        assert!(parse_broker("h:99999").is_err());
    }

    #[test]
    fn validation_names_the_setting() {
        let bad = |f: fn(&mut FleetConfig)| {
            let mut c = FleetConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.qos = 3).contains("qos = 3"));
        assert!(bad(|c| c.outbox = 0).contains("outbox"));
        assert!(bad(|c| c.payload_bytes = 100_000).contains("payload-bytes"));
        assert!(bad(|c| c.rate = -1.0).contains("rate"));
        assert!(bad(|c| c.devices = 0).contains("devices"));
        assert!(bad(|c| {
            c.commands = true;
            c.command_topic = "devices/{id}/commands/#".into()
        })
        .contains("command-topic"));
    }

    #[test]
    fn device_ids_are_numbered_from_one() {
        let c = FleetConfig {
            devices: 3,
            ..Default::default()
        };
        assert_eq!(c.device_ids(), ["dev-00001", "dev-00002", "dev-00003"]);
        let c = FleetConfig {
            devices: 2,
            first_device: 51,
            ..Default::default()
        };
        assert_eq!(c.device_ids(), ["dev-00051", "dev-00052"]);
        assert!(c.validate().is_ok());
        let c = FleetConfig {
            devices: 2,
            first_device: 99_999,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("first-device"));
    }
}
