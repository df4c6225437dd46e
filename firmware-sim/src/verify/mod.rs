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
//! - AMQP (`amqp`): manual acknowledgements (batched with `multiple`) and a prefetch
//!   window. Messages it consumed are acknowledged, so the queue is drained of them; messages it
//!   did not get to stay in the queue.
//! - Kafka (`kafka`): every partition of the topic from offset 0, merged. Per-device order is
//!   partition order (the gateway keys records by device id). Nothing is committed, so the
//!   topic can be verified again.

mod amqp;
mod kafka;
mod tally;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use tally::{DeviceVerdict, OutOfOrder, Tally, Totals, VerifyReport};

use crate::manifest::Manifest;

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
    let started = Instant::now();
    let mut tally = Tally::new(manifest);
    let timed_out = match &opts.source {
        Source::Amqp { url, queue } => {
            amqp::consume(
                url,
                queue,
                opts,
                manifest,
                &mut tally,
                &opts.source.to_string(),
            )
            .await?
        }
        Source::Kafka { brokers, topic } => {
            kafka::consume(
                brokers,
                topic,
                opts,
                manifest,
                &mut tally,
                &opts.source.to_string(),
            )
            .await?
        }
    };
    Ok(tally.report(
        manifest,
        opts.max_duplicates,
        opts.source.to_string(),
        timed_out,
        started.elapsed().as_secs_f64(),
    ))
}

/// Wall clock, epoch microseconds (0 if the clock is before 1970).
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The progress line on stderr.
pub(crate) fn print_progress(started: Instant, tally: &Tally) {
    eprintln!(
        "[{:>7.1}s] received {}  still expected {}",
        started.elapsed().as_secs_f64(),
        tally.received(),
        tally.remaining()
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
}
