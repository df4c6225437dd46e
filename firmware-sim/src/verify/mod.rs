//! The end-to-end delivery verifier: reads what reached the upstream broker and compares it
//! with the fleet's manifest.
//!
//! ```text
//! manifest (run --manifest) ──┐
//!                             ├─> Tally (per device: seen set, highest seq, dups, reorders)
//! upstream queue ─ consume ───┘      └─> VerifyReport: missing / duplicates / out of order
//! ```
//!
//! Either consumer stops when every acknowledged reading has arrived (plus `settle`, to catch
//! trailing duplicates) or at the timeout.
//!
//! With a command manifest (`command --manifest`), replies to commands are checked too, or only
//! them. Replies reach the upstream through the gateway's uplink like telemetry; a message is a
//! reply when its payload is a reply (JSON `id`, `cmd`, `n`), and a bad reply when it is not
//! but its `mqtt_topic` header ends in `/replies`. Everything else is telemetry.
//!
//! ```text
//! upstream message ─┬─ reply JSON ───────────────> CommandTally (per device: answered, dups, order)
//!                   ├─ other on .../replies ─────> CommandTally bad
//!                   └─ anything else ────────────> Tally (telemetry)
//! ```
//!
//! - AMQP (`amqp`): manual acknowledgements (batched with `multiple`) and a prefetch
//!   window. Messages it consumed are acknowledged, so the queue is drained of them; messages it
//!   did not get to stay in the queue.
//! - Kafka (`kafka`): every partition of the topic from offset 0, merged. Per-device order is
//!   partition order (the gateway keys records by device id). Nothing is committed, so the
//!   topic can be verified again.

mod amqp;
mod commands;
pub(crate) mod kafka;
mod tally;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use commands::{CommandReport, CommandTally, DeviceCommandVerdict, ReplyOutOfOrder};
pub use tally::{DeviceVerdict, OutOfOrder, Tally, Totals, VerifyReport};

use crate::manifest::{CommandManifest, Manifest};

/// Where the verifier reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An AMQP 0-9-1 queue (the gateway's RabbitMQ uplink routes into it).
    Amqp { url: String, queue: String },
    /// A Kafka topic (the gateway's Kafka uplink produces into it); `brokers` is the
    /// comma-separated bootstrap list, `host:port` each.
    Kafka { brokers: String, topic: String },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Amqp { url, queue } => {
                write!(f, "amqp {} queue {queue}", redact_password(url))
            }
            Source::Kafka { brokers, topic } => write!(f, "kafka {brokers} topic {topic}"),
        }
    }
}

/// `amqp://user:secret@host` -> `amqp://user:***@host`, for reports and errors.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Default prefetch window: enough to keep the consumer busy without buffering a whole run.
pub const DEFAULT_PREFETCH: u16 = 1000;

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub source: Source,
    /// Give up waiting for missing messages after this long.
    pub timeout: Duration,
    /// Keep consuming this long after everything expected has arrived (trailing duplicates).
    pub settle: Duration,
    /// Fail when there are more duplicates than this; `None`: duplicates never fail.
    pub max_duplicates: Option<u64>,
    pub prefetch: u16,
    /// Print a progress line to stderr every few seconds.
    pub progress: bool,
}

impl VerifyOptions {
    pub fn new(source: Source) -> Self {
        VerifyOptions {
            source,
            timeout: Duration::from_secs(60),
            settle: Duration::ZERO,
            max_duplicates: None,
            prefetch: DEFAULT_PREFETCH,
            progress: false,
        }
    }
}

/// Why verification could not run (as opposed to running and finding problems).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// An AMQP operation failed (connect, channel, qos, consume, ack).
    #[error("AMQP {operation} ({source_desc}): {error}")]
    Amqp {
        operation: &'static str,
        source_desc: String,
        error: lapin::Error,
    },
    /// The broker cancelled the consumer (queue deleted, node down), or every Kafka partition
    /// stream ended.
    #[error("consumer on {0} was cancelled by the broker")]
    Cancelled(String),
    /// `--kafka` is not a list of `host:port`.
    #[error("--kafka {0:?}: expected bootstrap brokers as host:port[,host:port...]")]
    KafkaBrokers(String),
    /// A Kafka operation failed after rskafka's retries (connect, metadata, open partition).
    #[error("Kafka {operation} ({source_desc}): {error}")]
    Kafka {
        operation: &'static str,
        source_desc: String,
        // Boxed: the rskafka error is large, and this enum is every `Result` of the verifier.
        error: Box<rskafka::client::error::Error>,
    },
    /// Fetching a partition failed after rskafka's retries.
    #[error("Kafka fetch of partition {partition} ({source_desc}): {error}")]
    KafkaFetch {
        partition: i32,
        source_desc: String,
        error: Box<rskafka::client::error::Error>,
    },
    /// Connecting and reading the topic's metadata took longer than the whole timeout.
    #[error("Kafka ({source_desc}): no connection and topic metadata within {after:?}")]
    KafkaSetupTimeout {
        source_desc: String,
        after: Duration,
    },
    /// The topic is not in the cluster's metadata (or has no partitions).
    #[error("Kafka topic not found ({0})")]
    TopicNotFound(String),
}

/// Consumes from `opts.source` until every acknowledged reading in `manifest` arrived (and
/// `settle` passed) or `timeout`; returns the report. `Ok` with `passed == false` means the run
/// worked and found problems.
pub async fn verify(
    opts: &VerifyOptions,
    manifest: &Manifest,
) -> Result<VerifyReport, VerifyError> {
    verify_all(opts, Some(manifest), None).await
}

/// Like [`verify`], checking telemetry against `telemetry` and/or command replies against
/// `commands` (at least one should be given; with neither it stops at once).
pub async fn verify_all(
    opts: &VerifyOptions,
    telemetry: Option<&Manifest>,
    commands: Option<&CommandManifest>,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let mut checks = Checks::new(telemetry, commands);
    let desc = opts.source.to_string();
    let timed_out = match &opts.source {
        Source::Amqp { url, queue } => amqp::consume(url, queue, opts, &mut checks, &desc).await?,
        Source::Kafka { brokers, topic } => {
            kafka::consume(brokers, topic, opts, &mut checks, &desc).await?
        }
    };
    Ok(checks.report(opts, timed_out, started.elapsed().as_secs_f64()))
}

/// What one verification checks, and its running counts.
pub struct Checks<'a> {
    telemetry: Option<(&'a Manifest, Tally)>,
    commands: Option<(&'a CommandManifest, CommandTally)>,
    /// Messages of a kind not being checked (telemetry when only commands are, or replies
    /// when only telemetry is).
    ignored: u64,
}

impl<'a> Checks<'a> {
    pub fn new(telemetry: Option<&'a Manifest>, commands: Option<&'a CommandManifest>) -> Self {
        Checks {
            telemetry: telemetry.map(|m| (m, Tally::new(m))),
            commands: commands.map(|m| (m, CommandTally::new(m))),
            ignored: 0,
        }
    }

    /// Everything expected has arrived.
    pub fn complete(&self) -> bool {
        self.remaining() == 0
    }

    /// Acknowledged readings and confirmed commands still without an arrival / answer.
    pub fn remaining(&self) -> u64 {
        self.telemetry.as_ref().map_or(0, |(_, t)| t.remaining())
            + self.commands.as_ref().map_or(0, |(_, c)| c.remaining())
    }

    /// Messages received so far.
    pub fn received(&self) -> u64 {
        self.telemetry.as_ref().map_or(0, |(_, t)| t.received())
            + self.commands.as_ref().map_or(0, |(_, c)| c.received())
            + self.ignored
    }

    /// Records one upstream message: its payload, its `mqtt_topic` and `mqtt_correlation_data`
    /// headers (when it has them), and its arrival time (epoch microseconds).
    pub fn record(
        &mut self,
        payload: &[u8],
        topic: Option<&str>,
        correlation: Option<&[u8]>,
        now_us: u64,
    ) {
        if let Ok(reply) = crate::command::parse_reply(payload) {
            match &mut self.commands {
                Some((_, c)) => c.record(&reply.id, correlation),
                None => self.ignored += 1,
            }
            return;
        }
        if topic.is_some_and(|t| t.ends_with("/replies")) {
            match &mut self.commands {
                Some((_, c)) => c.record_bad(),
                None => self.ignored += 1,
            }
            return;
        }
        match &mut self.telemetry {
            Some((m, t)) => record_message(t, m, payload, now_us),
            None => self.ignored += 1,
        }
    }

    pub(crate) fn report(
        &self,
        opts: &VerifyOptions,
        timed_out: bool,
        elapsed_s: f64,
    ) -> VerifyReport {
        let source = opts.source.to_string();
        let mut report = match &self.telemetry {
            Some((m, t)) => t.report(m, opts.max_duplicates, source, timed_out, elapsed_s),
            None => {
                let empty = Manifest {
                    version: crate::manifest::VERSION,
                    run: crate::manifest::RunInfo {
                        started_ms: 0,
                        devices: 0,
                        qos: 1,
                        seed: 0,
                        topic: String::new(),
                    },
                    devices: Default::default(),
                };
                let mut r = Tally::new(&empty).report(&empty, None, source, timed_out, elapsed_s);
                r.telemetry_checked = false;
                r
            }
        };
        report.ignored = self.ignored;
        if let Some((m, c)) = &self.commands {
            let cr = c.report(m);
            report
                .failures
                .extend(cr.failures(timed_out, opts.max_duplicates));
            report.commands = Some(cr);
        }
        report.passed = report.failures.is_empty();
        report
    }
}

/// Wall clock, epoch microseconds (0 if the clock is before 1970).
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The progress line on stderr.
pub(crate) fn print_progress(started: Instant, checks: &Checks<'_>) {
    eprintln!(
        "[{:>7.1}s] received {}  still expected {}",
        started.elapsed().as_secs_f64(),
        checks.received(),
        checks.remaining()
    );
}

/// Decodes one upstream message and records it. `now_us`: arrival time, epoch microseconds.
pub(crate) fn record_message(tally: &mut Tally, manifest: &Manifest, bytes: &[u8], now_us: u64) {
    match crate::payload::decode(bytes) {
        Ok(t) => {
            let latency = now_us.checked_sub(t.sample_time_ms.saturating_mul(1000));
            tally.record(manifest, &t.device_id, t.seq, latency);
        }
        Err(_) => tally.record_undecodable(),
    }
}

/// When a consumer stops: at the deadline, or `settle` after everything expected has arrived
/// (to catch trailing duplicates). Shared by the AMQP and Kafka consumers.
pub(crate) struct StopRule {
    deadline: std::time::Instant,
    settle: std::time::Duration,
    complete_at: Option<std::time::Instant>,
}

impl StopRule {
    pub(crate) fn new(deadline: std::time::Instant, settle: std::time::Duration) -> StopRule {
        StopRule {
            deadline,
            settle,
            complete_at: None,
        }
    }

    /// `None` once everything arrived and the settle time passed; otherwise the instant at which
    /// to stop waiting for more.
    pub(crate) fn next(&mut self, complete: bool) -> Option<std::time::Instant> {
        if complete {
            let at = *self.complete_at.get_or_insert_with(std::time::Instant::now);
            if at.elapsed() >= self.settle {
                return None;
            }
        }
        Some(match self.complete_at {
            Some(at) => self.deadline.min(at + self.settle),
            None => self.deadline,
        })
    }

    /// Whether everything expected had arrived.
    pub(crate) fn completed(&self) -> bool {
        self.complete_at.is_some()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_password("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_password("amqp://host"), "amqp://host");
    }

    fn telemetry(device: &str, seq: u64) -> Vec<u8> {
        let reading = crate::payload::Reading {
            device_id: device,
            seq,
            sample_time_ms: 1,
            temp_c: 20.0,
            humidity_pct: 50.0,
            battery_v: 3.7,
        };
        let mut out = heapless::Vec::<u8, 256>::new();
        crate::payload::encode(&reading, 0, &mut out).unwrap();
        out.to_vec()
    }

    #[test]
    fn replies_are_told_from_telemetry_and_both_are_checked() {
        use crate::manifest::{CommandRecord, CommandRunInfo, DeviceRecord, RunInfo};
        let telemetry_manifest = Manifest {
            version: crate::manifest::VERSION,
            run: RunInfo {
                started_ms: 0,
                devices: 1,
                qos: 1,
                seed: 1,
                topic: "t".into(),
            },
            devices: [(
                "a".to_string(),
                DeviceRecord {
                    next_seq: 2,
                    acked: (0..2).collect(),
                    ..Default::default()
                },
            )]
            .into_iter()
            .collect(),
        };
        let command_manifest = CommandManifest {
            version: crate::manifest::VERSION,
            kind: crate::manifest::COMMANDS_KIND.into(),
            run: CommandRunInfo {
                started_ms: 0,
                devices: 1,
                count: 2,
                target: "t".into(),
            },
            devices: [(
                "a".to_string(),
                CommandRecord {
                    confirmed: vec!["a:0".into(), "a:1".into()],
                    unconfirmed: vec![],
                },
            )]
            .into_iter()
            .collect(),
        };
        let reply = |n: u64| format!(r#"{{"id":"a:{n}","cmd":"ping","n":{n}}}"#).into_bytes();
        let opts = VerifyOptions::new(Source::Amqp {
            url: "amqp://x".into(),
            queue: "q".into(),
        });
        let stream = |c: &mut Checks<'_>| {
            c.record(&telemetry("a", 0), Some("devices/a/telemetry"), None, 0);
            c.record(&reply(0), Some("devices/a/replies"), Some(b"a:0"), 0);
            c.record(b"garbage", Some("devices/a/replies"), None, 0);
            // Without headers (another uplink), a reply is still known by its payload.
            c.record(&reply(1), None, None, 0);
            c.record(&telemetry("a", 1), None, None, 0);
        };

        let mut both = Checks::new(Some(&telemetry_manifest), Some(&command_manifest));
        assert_eq!(both.remaining(), 4);
        stream(&mut both);
        assert!(both.complete());
        let r = both.report(&opts, false, 0.1);
        assert!(r.passed, "{r}");
        assert_eq!(
            (r.total.received, r.total.undecodable, r.ignored),
            (2, 0, 0)
        );
        let c = r.commands.as_ref().unwrap();
        assert_eq!((c.answered, c.bad, c.missing), (2, 1, 0));

        // Commands only: telemetry is ignored, not undecodable; a missing answer fails.
        let mut only = Checks::new(None, Some(&command_manifest));
        only.record(&telemetry("a", 0), None, None, 0);
        only.record(&reply(1), None, None, 0);
        assert!(!only.complete());
        let r = only.report(&opts, true, 0.1);
        assert!(!r.passed);
        assert!(!r.telemetry_checked);
        assert_eq!(r.ignored, 1);
        let text = r.to_string();
        assert!(text.contains("telemetry    not checked"), "{text}");
        assert!(text.contains("missing 1 [a:0]"), "{text}");
        assert!(
            text.contains("FAIL: 1 confirmed command(s) never answered at the timeout"),
            "{text}"
        );

        // Telemetry only (as before): replies are ignored, telemetry passes.
        let mut tel = Checks::new(Some(&telemetry_manifest), None);
        stream(&mut tel);
        let r = tel.report(&opts, false, 0.1);
        assert!(r.passed && r.commands.is_none(), "{r}");
        assert_eq!(r.ignored, 3);
    }
}
