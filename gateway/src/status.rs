//! What the operator sees: the status view that the service fills and the admin endpoint reads
//! (metrics, health, readiness, the status page). It owns no state of the data path: counters are
//! the parts' own atomics, read when asked. The arrows run one way: the service writes here, the
//! admin endpoint reads from here, and neither reaches into the other.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};

use crate::forwarder::{DeadLetters, ForwarderStats};
use crate::ingest::IngestStats;
use crate::queue::{FullPolicy, Queue};
use crate::sessions::Sessions;

/// How often the status page's history gets a point, and how many points it keeps (an hour).
pub const HISTORY_EVERY: Duration = Duration::from_secs(10);
pub const HISTORY_POINTS: usize = 360;

/// One point of the status page's chart.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryPoint {
    /// Seconds since the epoch.
    pub t: u64,
    pub devices: u64,
    pub queue_records: u64,
    pub queue_bytes: u64,
    pub oldest_age_seconds: Option<f64>,
}

/// An uplink as the operator sees it.
#[derive(Debug, Clone)]
pub struct UplinkView {
    pub name: String,
    /// `amqp`, `kafka` or `mqtt`.
    pub kind: &'static str,
    /// Where it sends, credentials masked.
    pub target: String,
    pub stats: Arc<ForwarderStats>,
}

/// A downlink as the operator sees it.
#[derive(Debug, Clone)]
pub struct DownlinkView {
    pub name: String,
    /// `amqp`.
    pub kind: &'static str,
    /// Where it consumes from, credentials masked.
    pub source: String,
    pub stats: Arc<crate::downlink::DownlinkStats>,
}

impl DownlinkView {
    /// This downlink's commands that devices acknowledged.
    pub fn stats_acked_by_devices(&self, sessions: &Sessions) -> u64 {
        sessions
            .stats
            .commands_done_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&crate::downlink::origin(&self.name))
            .copied()
            .unwrap_or(0)
    }
}

/// The command store and its router, while there is one.
#[derive(Clone)]
pub struct CommandsView {
    pub store: Queue,
    pub router: Arc<crate::downlink::router::RouterStats>,
}

/// What the admin endpoint reads: shared, read-mostly, never blocks the data path.
pub struct Status {
    pub gateway_id: RwLock<String>,
    pub started: Instant,
    pub queue: Queue,
    pub ingest: Arc<IngestStats>,
    /// Subscriber sessions and retained messages (read for counts only).
    pub sessions: Arc<Sessions>,
    pub listeners: Vec<(SocketAddr, bool)>,
    pub uplinks: RwLock<Vec<UplinkView>>,
    pub downlinks: RwLock<Vec<DownlinkView>>,
    pub commands: RwLock<Option<CommandsView>>,
    pub dead: DeadLetters,
    pub history: Mutex<VecDeque<HistoryPoint>>,
    /// Listeners accept connections (false once shutdown began).
    pub accepting: AtomicBool,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// Asks the service to reload (the admin endpoint's POST /reload).
    pub control: mpsc::Sender<ReloadRequest>,
}

impl Status {
    pub fn downlinks(&self) -> Vec<DownlinkView> {
        self.downlinks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn commands(&self) -> Option<CommandsView> {
        self.commands
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn uplinks(&self) -> Vec<UplinkView> {
        self.uplinks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Why the gateway is not ready, if it is not: listeners not accepting, the queue closed or
    /// failing, or full under `backpressure` (devices are being held back). A down uplink does
    /// not count: buffering is the gateway's job.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.accepting.load(Ordering::Relaxed) {
            why.push("listeners are not accepting connections (shutting down)".to_string());
        }
        if !self.queue.is_writable() {
            why.push(
                "the queue is not writable (closed, or its last write failed: is the disk full?)"
                    .to_string(),
            );
        }
        if self.queue.options().full_policy == FullPolicy::Backpressure && self.queue.is_full() {
            why.push("the queue is full (full_policy = backpressure): devices are held back until an uplink drains it".to_string());
        }
        why
    }

    /// Adds a point to the history (the service calls it every [`HISTORY_EVERY`]).
    pub fn sample(&self) {
        let q = self.queue.stats();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let point = HistoryPoint {
            t: now.as_secs(),
            devices: self.ingest.connected.load(Ordering::Relaxed),
            queue_records: q.records,
            queue_bytes: q.bytes,
            oldest_age_seconds: age_seconds(q.oldest_time_us),
        };
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if h.len() == HISTORY_POINTS {
            h.pop_front();
        }
        h.push_back(point);
    }
}

/// Seconds since a receive time in µs since the epoch.
pub fn age_seconds(time_us: Option<u64>) -> Option<f64> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_micros();
    time_us.map(|t| (now.saturating_sub(u128::from(t))) as f64 / 1e6)
}

/// A reload asked for over the admin endpoint; `release` names removed uplinks whose cursors
/// may go (so the queue can delete records only they still needed).
pub struct ReloadRequest {
    pub release: Vec<String>,
    pub reply: oneshot::Sender<ReloadOutcome>,
}

/// What a reload did (`Ok`: the changes, including what was left alone and why) or why it was
/// rejected (`Err`: every reason; the old config keeps running).
pub type ReloadOutcome = Result<Vec<String>, Vec<String>>;
