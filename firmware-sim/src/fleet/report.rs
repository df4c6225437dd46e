//! What a fleet run prints: a progress bar (or plain lines) while it runs, and a summary at the
//! end, as a table or as one JSON object.

use std::fmt;
use std::io::IsTerminal;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::device_task::DeviceOutcome;
use super::{FleetConfig, MqttVersion, Shared};
use crate::manifest::Manifest;

/// How progress is shown on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, plain lines every 5 s otherwise.
    Auto,
    Bar,
    Lines,
    Off,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    /// From a histogram of microseconds; `None` when nothing was recorded.
    pub fn from_histogram(h: &hdrhistogram::Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Latency {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        })
    }
}

/// The end-of-run summary. Counts are over all devices.
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    pub devices: usize,
    pub broker: String,
    pub mqtt: MqttVersion,
    pub qos: u8,
    pub tls: bool,
    /// Readings taken (sequence numbers used).
    pub sampled: u64,
    /// First transmissions.
    pub sent: u64,
    /// Retransmissions (after reconnects or refusals).
    pub resent: u64,
    /// Acknowledged by the broker (PUBACK / PUBCOMP); 0 with QoS 0.
    pub acked: u64,
    /// Of those, acknowledged after the device had dropped them from a full outbox.
    pub acked_after_drop: u64,
    /// MQTT 5 PUBACK/PUBREC with an error reason (each is resent).
    pub refused: u64,
    /// Readings evicted from full outboxes (drop-oldest) and never acknowledged.
    pub dropped: u64,
    /// Readings not taken because the outbox was full (block).
    pub blocked: u64,
    /// Sample slots the simulator itself was too busy to take.
    pub late: u64,
    /// Sent but never acknowledged when the run ended (with QoS 0: everything sent).
    pub unacked: u64,
    /// Still in an outbox, never sent, when the run ended.
    pub unsent: u64,
    pub connects: u64,
    /// Successful connections after a device's first.
    pub reconnects: u64,
    pub connect_errors: u64,
    pub connection_losses: u64,
    /// Publish-to-ack latency (submission to PUBACK/PUBCOMP), QoS 1 and 2 only.
    pub latency_ms: Option<Latency>,
    /// From the start until the last device stopped.
    pub elapsed_s: f64,
    /// `acked` over the time from the start to the last acknowledgement.
    pub acked_per_s: f64,
    /// `sent` over `elapsed_s`.
    pub sent_per_s: f64,
    /// Peak resident memory of this process (VmHWM), when the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    pub last_error: Option<String>,
    /// Present when the devices took commands (`--commands`).
    pub commands: Option<CommandCounts>,
    #[serde(skip)]
    pub manifest: Manifest,
}

/// What the devices did with commands, summed over the fleet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CommandCounts {
    /// Taken, by kind (duplicates included).
    pub ping: u64,
    pub set_rate: u64,
    pub reboot: u64,
    /// Taken again: a command number the device had seen (answered again, not acted on again).
    pub duplicates: u64,
    /// Not parsed or not answerable: never acted on, never answered.
    pub bad: u64,
    /// Replies sent (first transmissions), resent, and acknowledged by the broker.
    pub replies_sent: u64,
    pub replies_resent: u64,
    pub replies_acked: u64,
    /// Reboots done.
    pub reboots: u64,
}

impl CommandCounts {
    /// Commands taken (duplicates included, bad ones not).
    pub fn taken(&self) -> u64 {
        self.ping + self.set_rate + self.reboot
    }
}

impl FleetReport {
    pub(crate) fn new(
        cfg: &FleetConfig,
        shared: &Shared,
        outcomes: &[DeviceOutcome],
        latency_ms: Option<Latency>,
        manifest: Manifest,
    ) -> Self {
        let c = &shared.counters;
        let sum = |f: fn(&DeviceOutcome) -> u64| outcomes.iter().map(f).sum::<u64>();
        let elapsed = shared.started.elapsed().as_secs_f64();
        let acked = c.acked.load(Relaxed);
        let last_ack_s = c.last_ack_us.load(Relaxed) as f64 / 1e6;
        let sent = c.sent.load(Relaxed);
        FleetReport {
            devices: cfg.devices,
            broker: cfg.broker.clone(),
            mqtt: cfg.version,
            qos: cfg.qos,
            tls: cfg.tls.is_some(),
            sampled: sum(|o| o.stats.sampled),
            sent,
            resent: c.resent.load(Relaxed),
            acked,
            acked_after_drop: c.acked_after_drop.load(Relaxed),
            refused: c.refused.load(Relaxed),
            dropped: sum(|o| o.record.dropped.count()),
            blocked: sum(|o| o.stats.blocked),
            late: sum(|o| o.stats.late),
            unacked: sum(|o| o.record.unacked.count()),
            unsent: sum(|o| o.record.unsent.count()),
            connects: c.connects.load(Relaxed),
            reconnects: sum(|o| o.stats.connects.saturating_sub(1)),
            connect_errors: c.connect_errors.load(Relaxed),
            connection_losses: c.connection_losses.load(Relaxed),
            latency_ms,
            elapsed_s: elapsed,
            acked_per_s: if last_ack_s > 0.0 {
                acked as f64 / last_ack_s
            } else {
                0.0
            },
            sent_per_s: if elapsed > 0.0 {
                sent as f64 / elapsed
            } else {
                0.0
            },
            peak_rss_bytes: peak_rss_bytes(),
            last_error: shared.last_error(),
            commands: cfg.commands.then(|| CommandCounts {
                ping: sum(|o| o.stats.commands_ping),
                set_rate: sum(|o| o.stats.commands_set_rate),
                reboot: sum(|o| o.stats.commands_reboot),
                duplicates: sum(|o| o.stats.commands_duplicate),
                bad: sum(|o| o.stats.commands_bad),
                replies_sent: sum(|o| o.stats.replies_sent),
                replies_resent: sum(|o| o.stats.replies_resent),
                replies_acked: sum(|o| o.stats.replies_acked),
                reboots: sum(|o| o.stats.reboots),
            }),
            manifest,
        }
    }

    /// Every device took all its readings and got every one acknowledged (QoS 1/2) or written
    /// (QoS 0): nothing dropped, unacknowledged or unsent.
    pub fn all_delivered(&self) -> bool {
        let pending = self.dropped + self.unsent + if self.qos == 0 { 0 } else { self.unacked };
        pending == 0 && self.manifest.devices.len() == self.devices
    }

    /// The `bench` one-paragraph summary.
    pub fn bench_line(&self) -> String {
        let what = format!(
            "{} devices, MQTT {}, QoS {}, {}",
            self.devices,
            mqtt_name(self.mqtt),
            self.qos,
            if self.tls { "TLS" } else { "plaintext" },
        );
        let mut s = if self.qos == 0 {
            format!(
                "{what}: {:.0} publishes/s written (QoS 0 has no acks; {} in {:.2} s)",
                self.sent_per_s, self.sent, self.elapsed_s
            )
        } else {
            format!(
                "{what}: {:.0} acked publishes/s ({} acked in {:.2} s)",
                self.acked_per_s, self.acked, self.elapsed_s
            )
        };
        if let Some(l) = &self.latency_ms {
            s.push_str(&format!(
                "\nlatency  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
                l.p50, l.p90, l.p99, l.p999, l.max
            ));
        }
        s
    }
}

fn mqtt_name(v: MqttVersion) -> &'static str {
    match v {
        MqttVersion::V311 => "3.1.1",
        MqttVersion::V5 => "5",
    }
}

impl fmt::Display for FleetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let row = |f: &mut fmt::Formatter<'_>, k: &str, v: String| writeln!(f, "{k:<12}{v}");
        row(
            f,
            "devices",
            format!(
                "{}  ({} MQTT {}, QoS {}, {})",
                self.devices,
                self.broker,
                mqtt_name(self.mqtt),
                self.qos,
                if self.tls { "TLS" } else { "plaintext" }
            ),
        )?;
        row(
            f,
            "sent",
            format!("{}  (+{} resent)", self.sent, self.resent),
        )?;
        if self.qos == 0 {
            row(f, "acked", "-  (QoS 0 has no acknowledgement)".into())?;
        } else {
            let mut s = self.acked.to_string();
            if self.refused > 0 {
                s.push_str(&format!(
                    "  ({} refused by the broker, resent)",
                    self.refused
                ));
            }
            row(f, "acked", s)?;
        }
        row(
            f,
            "dropped",
            format!(
                "{}  on device (outbox full, drop-oldest); blocked {} (outbox full, block)",
                self.dropped, self.blocked
            ),
        )?;
        row(
            f,
            "unacked",
            format!(
                "{}  sent, not acknowledged at the end; unsent {}",
                self.unacked, self.unsent
            ),
        )?;
        row(
            f,
            "reconnects",
            format!(
                "{}  (connection losses {}, failed connects {})",
                self.reconnects, self.connection_losses, self.connect_errors
            ),
        )?;
        match &self.latency_ms {
            Some(l) => row(
                f,
                "latency",
                format!(
                    "p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (publish to ack)",
                    l.p50, l.p99, l.max
                ),
            )?,
            None => row(f, "latency", "-".into())?,
        }
        row(
            f,
            "rate",
            format!(
                "{:.1} acked/s, {:.1} sent/s  ({:.2} s)",
                self.acked_per_s, self.sent_per_s, self.elapsed_s
            ),
        )?;
        if let Some(k) = &self.commands {
            row(
                f,
                "commands",
                format!(
                    "{}  (ping {}, set_rate {}, reboot {}; duplicates {}, bad {}); replies acked {} (+{} resent); reboots {}",
                    k.taken(),
                    k.ping,
                    k.set_rate,
                    k.reboot,
                    k.duplicates,
                    k.bad,
                    k.replies_acked,
                    k.replies_resent,
                    k.reboots
                ),
            )?;
        }
        if self.late > 0 {
            row(
                f,
                "late",
                format!(
                    "{}  sample slots skipped: the simulator was overloaded",
                    self.late
                ),
            )?;
        }
        if let Some(rss) = self.peak_rss_bytes {
            row(
                f,
                "memory",
                format!(
                    "peak RSS {:.1} MiB ({:.1} KiB per device)",
                    rss as f64 / 1048576.0,
                    rss as f64 / 1024.0 / self.devices.max(1) as f64
                ),
            )?;
        }
        if let Some(e) = &self.last_error {
            row(f, "last error", e.clone())?;
        }
        Ok(())
    }
}

/// Peak resident set size of this process, from /proc (Linux); `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Current resident set size of this process, from /proc (Linux); `None` elsewhere.
pub fn rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

fn proc_status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The progress reporter task.
pub(crate) struct Progress {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub(crate) fn start(
        mode: ProgressMode,
        shared: Arc<Shared>,
        devices: usize,
        qos: u8,
        expected: Option<u64>,
        duration: Option<Duration>,
    ) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = match mode {
            ProgressMode::Off => {
                return Progress {
                    stop: None,
                    task: None,
                }
            }
            ProgressMode::Bar => true,
            ProgressMode::Lines => false,
            ProgressMode::Auto => terminal,
        };
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let pb = bar.then(|| make_bar(expected, duration));
            let every = if bar {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(5)
            };
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut rx => break,
                }
                let c = &shared.counters;
                let done = if qos == 0 {
                    c.sent.load(Relaxed)
                } else {
                    c.acked.load(Relaxed)
                };
                let mut msg = format!(
                    "online {}/{}  sent {}  acked {}  dropped {}  reconnects {}  errors {}",
                    c.online.load(Relaxed),
                    devices,
                    c.sent.load(Relaxed),
                    c.acked.load(Relaxed),
                    c.dropped.load(Relaxed),
                    c.connection_losses.load(Relaxed),
                    c.connect_errors.load(Relaxed),
                );
                let commands = c.commands.load(Relaxed);
                if commands > 0 {
                    msg.push_str(&format!(
                        "  commands {commands}  replies acked {}  reboots {}",
                        c.replies_acked.load(Relaxed),
                        c.reboots.load(Relaxed)
                    ));
                }
                match &pb {
                    Some(pb) => {
                        pb.set_position(match expected {
                            Some(_) => done,
                            None => started.elapsed().as_millis() as u64,
                        });
                        pb.set_message(msg);
                    }
                    None => eprintln!(
                        "[{:>7.1}s] {msg}{}",
                        started.elapsed().as_secs_f64(),
                        expected
                            .map(|e| format!("  ({done}/{e})"))
                            .unwrap_or_default()
                    ),
                }
            }
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
        });
        Progress {
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the reporter and waits until the bar is cleared.
    pub(crate) async fn finish(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

fn make_bar(expected: Option<u64>, duration: Option<Duration>) -> indicatif::ProgressBar {
    let (len, template) = match (expected, duration) {
        (Some(n), _) => (n, "{elapsed_precise} [{bar:30}] {pos}/{len} {msg}"),
        (None, Some(d)) => (d.as_millis() as u64, "{elapsed_precise} [{bar:30}] {msg}"),
        (None, None) => (0, "{elapsed_precise} {spinner} {msg}"),
    };
    let pb = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}
