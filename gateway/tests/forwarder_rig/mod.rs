//! The test rig shared by the forwarder fault tests (uplink_faults for AMQP, uplink_kafka_faults
//! for Kafka, uplink_mqtt): unique names, polling, a forwarder's state log and handle, its
//! cursor, and the delivery check.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use gateway::config::UplinkConfig;
use gateway::forwarder::{self, DeadLetters, ForwarderStats, Routes, UplinkState};
use gateway::queue::Queue;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub fn unique(prefix: &str) -> String {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Polls `cond` every 2 ms until it holds; panics with `what()` after `timeout`.
pub async fn eventually(
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
    what: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {}", what());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Every state a forwarder passes through (sampled every millisecond), with when it was first
/// seen, so a short-lived one such as `Stalled` is seen.
pub struct StateLog {
    seen: Arc<Mutex<Vec<(UplinkState, Instant)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StateLog {
    pub fn start(stats: Arc<ForwarderStats>) -> StateLog {
        let seen = Arc::new(Mutex::new(vec![(stats.state(), Instant::now())]));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let now = stats.state();
                {
                    let mut v = s.lock().unwrap();
                    if v.last().map(|(st, _)| *st) != Some(now) {
                        v.push((now, Instant::now()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        StateLog { seen, task }
    }

    /// When `state` was first seen at or after `since`.
    pub fn seen_after(&self, state: UplinkState, since: Instant) -> Option<Instant> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find(|(s, t)| *s == state && *t >= since)
            .map(|(_, t)| *t)
    }

    pub fn seen(&self, state: UplinkState) -> bool {
        self.seen.lock().unwrap().iter().any(|(s, _)| *s == state)
    }

    pub fn history(&self) -> Vec<UplinkState> {
        self.seen.lock().unwrap().iter().map(|(s, _)| *s).collect()
    }
}

impl Drop for StateLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running forwarder.
pub struct Forwarder {
    pub stats: Arc<ForwarderStats>,
    pub handle: tokio::task::JoinHandle<()>,
    pub stop: CancellationToken,
}

impl Forwarder {
    pub fn sent(&self) -> u64 {
        self.stats.sent.load(Ordering::Relaxed)
    }
    pub fn confirmed(&self) -> u64 {
        self.stats.confirmed.load(Ordering::Relaxed)
    }

    pub fn nacked(&self) -> u64 {
        self.stats.nacked.load(Ordering::Relaxed)
    }
    pub fn reconnects(&self) -> u64 {
        self.stats.reconnects.load(Ordering::Relaxed)
    }

    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.handle)
            .await
            .expect("the forwarder did not stop within 15 s of its cancellation")
            .unwrap();
    }
}

/// Starts the forwarder of `cfg` (gateway id `gateway_id`) on `queue`.
pub fn spawn(
    cfg: UplinkConfig,
    gateway_id: &str,
    queue: &Queue,
    routes: &Arc<Routes>,
    dead: &DeadLetters,
) -> Forwarder {
    let stop = CancellationToken::new();
    let (stats, handle) = forwarder::spawn(
        cfg,
        gateway_id.into(),
        queue.clone(),
        routes.clone(),
        dead.clone(),
        stop.clone(),
    );
    Forwarder {
        stats,
        handle,
        stop,
    }
}

/// Cursor `name`'s confirmed position (0 before the forwarder made it).
pub fn cursor(queue: &Queue, name: &str) -> u64 {
    queue
        .stats()
        .cursors
        .iter()
        .find(|c| c.name == name)
        .map_or(0, |c| c.acked)
}

/// Waits until cursor `name` reaches `seq`; the failure tells what forwarder `f` was doing.
pub async fn wait_cursor(queue: &Queue, name: &str, seq: u64, timeout: Duration, f: &Forwarder) {
    eventually(
        timeout,
        || cursor(queue, name) >= seq,
        || {
            format!(
                "cursor at {} of {seq}; state {:?}, sent {}, confirmed {}, nacked {}, reconnects {}",
                cursor(queue, name),
                f.stats.state(),
                f.sent(),
                f.confirmed(),
                f.nacked(),
                f.reconnects()
            )
        },
    )
    .await;
}

/// Checks `got` (the topic's records, per device in arrival order) against `expected`: nothing
/// foreign, nothing missing, the first arrival of each record in per-device order. Returns the
/// seqs that arrived more than once (once per extra copy).
pub fn check_delivery(expected: &[(String, u64)], got: &[(String, u64)]) -> Vec<u64> {
    let device_of: HashMap<u64, &str> = expected.iter().map(|(d, s)| (*s, d.as_str())).collect();
    let mut want: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (d, s) in expected {
        want.entry(d.as_str()).or_default().push(*s);
    }
    let mut next: HashMap<&str, usize> = HashMap::new();
    let mut seen = HashSet::new();
    let mut dups = Vec::new();
    for (d, s) in got {
        assert_eq!(
            device_of.get(s).copied(),
            Some(d.as_str()),
            "record seq {s} from {d} was never appended (or under another device)"
        );
        if !seen.insert(*s) {
            dups.push(*s);
            continue;
        }
        let w = &want[d.as_str()];
        let i = next.entry(d.as_str()).or_insert(0);
        assert_eq!(
            w.get(*i),
            Some(s),
            "{d}: first arrivals out of order or with a gap: expected seq {:?}, got {s}",
            w.get(*i)
        );
        *i += 1;
    }
    for (d, w) in &want {
        let n = next.get(d).copied().unwrap_or(0);
        assert_eq!(
            n,
            w.len(),
            "{d}: {n} of {} records arrived; first missing seq {}",
            w.len(),
            w[n.min(w.len() - 1)]
        );
    }
    dups
}
