//! One forwarder per uplink: read from the uplink's cursor, prepare (route, template, payload),
//! send a window, await the confirms, and advance the cursor over the contiguous prefix that is
//! settled (confirmed, not routed to this uplink, or dead-lettered with a reason). Anything
//! else (a dropped connection, a stall, a nack) rewinds the reader to the cursor and sends again:
//! at least once, in queue order, hence in per-device order.
//!
//! Records that match no route at all are moved to the dead letters by a separate task with its
//! own cursor (`_unrouted`), so they are kept and counted, never silently dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::UplinkConfig;
use crate::queue::{FsyncPolicy, FullPolicy, Queue, QueueError, QueueOptions, Record};
use crate::uplink::{address, transcode, Outcome, Prepared, Routes, Uplink, UplinkError};

/// Where records go that cannot be delivered: a small queue of its own in
/// `data_dir/dead-letters`, so it is as crash-safe as the main one. Each record keeps its fields
/// and gains user properties `x-dead-letter-reason`, `x-dead-letter-uplink`,
/// `x-dead-letter-time` and `x-original-seq`.
#[derive(Clone)]
pub struct DeadLetters {
    queue: Queue,
    count: Arc<AtomicU64>,
    recent: Arc<Mutex<std::collections::VecDeque<DeadLetter>>>,
}

/// One dead letter as the status page shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// Seconds since the epoch.
    pub time: f64,
    pub uplink: String,
    pub reason: String,
    pub topic: String,
    pub device: String,
    pub seq: u64,
}

/// Dead letters kept in memory for the status page (the store keeps them all).
const RECENT_DEAD_LETTERS: usize = 20;

/// Bound of the dead-letter store: it must not take the main queue's space.
const DEAD_LETTER_MAX_BYTES: u64 = 64 << 20;

impl DeadLetters {
    /// Opens (creating) the store under `main`'s data directory. Blocking.
    pub fn open(main: &QueueOptions) -> Result<DeadLetters, QueueError> {
        let mut o = QueueOptions::new(main.data_dir.join("dead-letters"));
        o.segment_bytes = 1 << 20;
        o.max_bytes = DEAD_LETTER_MAX_BYTES;
        o.fsync = FsyncPolicy::Always;
        // Bounded; what it drops is counted per cursor like any queue's.
        o.full_policy = FullPolicy::DropOldest;
        let (queue, _) = Queue::open(o)?;
        Ok(DeadLetters {
            queue,
            count: Arc::new(AtomicU64::new(0)),
            recent: Arc::new(Mutex::new(std::collections::VecDeque::new())),
        })
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Records dead-lettered since start.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The latest dead letters of this run, newest first.
    pub fn recent(&self) -> Vec<DeadLetter> {
        let r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        r.iter().rev().cloned().collect()
    }

    /// Stores `r` with the reason; durable when this returns `Ok`.
    pub async fn put(&self, r: &Record, uplink: &str, reason: &str) -> Result<(), QueueError> {
        let mut props = r.user_properties.clone();
        props.push(("x-dead-letter-reason".into(), reason.into()));
        props.push(("x-dead-letter-uplink".into(), uplink.into()));
        props.push((
            "x-dead-letter-time".into(),
            humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        ));
        props.push(("x-original-seq".into(), r.seq.to_string()));
        self.queue.append(&r.to_new(&props)).await?;
        self.count.fetch_add(1, Ordering::Relaxed);
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == RECENT_DEAD_LETTERS {
                recent.pop_front();
            }
            recent.push_back(DeadLetter {
                time: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
                uplink: uplink.into(),
                reason: reason.into(),
                topic: r.topic.clone(),
                device: r.device_id.clone(),
                seq: r.seq,
            });
        }
        tracing::warn!(
            uplink,
            seq = r.seq,
            reason,
            "record moved to the dead letters"
        );
        Ok(())
    }

    pub fn close(&self) {
        self.queue.close();
    }
}

/// An uplink's state, for the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UplinkState {
    Connecting,
    Connected,
    BackingOff,
    Stalled,
}

/// Counters and state of one forwarder.
#[derive(Debug)]
pub struct ForwarderStats {
    pub name: String,
    pub state: Mutex<UplinkState>,
    pub sent: AtomicU64,
    pub confirmed: AtomicU64,
    pub nacked: AtomicU64,
    pub returned: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub reconnects: AtomicU64,
    /// The state last written to the log: a retry (backing off -> connecting -> backing off)
    /// is not news, so the log shows each real change once, not every attempt.
    logged: Mutex<Option<UplinkState>>,
}

impl ForwarderStats {
    fn new(name: &str) -> Arc<ForwarderStats> {
        Arc::new(ForwarderStats {
            name: name.to_string(),
            state: Mutex::new(UplinkState::Connecting),
            sent: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            nacked: AtomicU64::new(0),
            returned: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            logged: Mutex::new(None),
        })
    }

    /// Sets the state; logs only when it changes (not once per retry).
    fn set(&self, s: UplinkState, why: Option<&UplinkError>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        let retrying = s == UplinkState::Connecting
            && matches!(
                *logged,
                Some(UplinkState::BackingOff | UplinkState::Stalled)
            );
        if *logged == Some(s) || retrying {
            match why {
                Some(e) => {
                    tracing::debug!(uplink = %self.name, state = ?s, error = %e, "uplink state (unchanged since last logged)")
                }
                None => tracing::debug!(uplink = %self.name, state = ?s, "uplink state (retrying)"),
            }
            return;
        }
        match why {
            Some(e) => {
                tracing::warn!(uplink = %self.name, state = ?s, error = %e, "uplink state changed; records stay queued and are sent once it is back (retries are not logged)")
            }
            None => tracing::info!(uplink = %self.name, state = ?s, "uplink state changed"),
        }
        *logged = Some(s);
    }

    pub fn state(&self) -> UplinkState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Keeps an uplink at or below `max_rate` records per second (a replay limit).
struct Pace {
    rate: Option<f64>,
    start: tokio::time::Instant,
    sent: u64,
}

impl Pace {
    fn new(rate: Option<u32>) -> Pace {
        Pace {
            rate: rate.map(f64::from),
            start: tokio::time::Instant::now(),
            sent: 0,
        }
    }

    /// Waits until `n` more records may go. After an idle spell the budget restarts, so an
    /// idle uplink does not build up a burst.
    async fn wait(&mut self, n: usize) {
        let Some(rate) = self.rate else {
            return;
        };
        let now = tokio::time::Instant::now();
        let due = self.start + Duration::from_secs_f64(self.sent as f64 / rate);
        if now > due + Duration::from_secs(1) {
            self.start = now;
            self.sent = 0;
        } else if due > now {
            tokio::time::sleep_until(due).await;
        }
        self.sent += n as u64;
    }
}

/// Exponential backoff with full jitter between `min` and `max`.
fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let exp = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    let jitter = rand::random::<f64>();
    min + (exp.saturating_sub(min)).mul_f64(jitter)
}

/// Starts the forwarder of `cfg`; returns its stats. It runs until `shutdown`: then it lets a
/// send in flight finish (bounded by the uplink's confirm timeout), advances the cursor over what
/// was confirmed, closes the uplink and returns. So stopping a forwarder (a reload, a shutdown)
/// neither loses nor duplicates anything; aborting its task instead is safe too, but what was in
/// flight is sent again by the next forwarder on that cursor.
pub fn spawn(
    cfg: UplinkConfig,
    gateway_id: String,
    queue: Queue,
    routes: Arc<Routes>,
    dead: DeadLetters,
    shutdown: CancellationToken,
) -> (Arc<ForwarderStats>, tokio::task::JoinHandle<()>) {
    let (_fixed, routes) = watch::channel(routes);
    spawn_with_routes(cfg, gateway_id, queue, routes, dead, shutdown)
}

/// [`spawn`] with routes that can change while it runs (a reload).
pub fn spawn_with_routes(
    cfg: UplinkConfig,
    gateway_id: String,
    queue: Queue,
    routes: watch::Receiver<Arc<Routes>>,
    dead: DeadLetters,
    shutdown: CancellationToken,
) -> (Arc<ForwarderStats>, tokio::task::JoinHandle<()>) {
    let stats = ForwarderStats::new(cfg.name());
    let s = stats.clone();
    let h = tokio::spawn(async move {
        if let Err(error) = run(cfg, gateway_id, queue, routes, dead, s, shutdown).await {
            tracing::error!(%error, "forwarder stopped");
        }
    });
    (stats, h)
}

async fn run(
    cfg: UplinkConfig,
    gateway_id: String,
    queue: Queue,
    routes: watch::Receiver<Arc<Routes>>,
    dead: DeadLetters,
    stats: Arc<ForwarderStats>,
    shutdown: CancellationToken,
) -> Result<(), QueueError> {
    let name = cfg.name().to_string();
    let (backoff_min, backoff_max) = cfg.backoff();
    let max_retries = cfg.max_retries();
    let mut reader = {
        let q = queue.clone();
        let n = name.clone();
        tokio::task::spawn_blocking(move || q.reader(&n))
            .await
            .map_err(|_| QueueError::Closed)??
    };
    let mut attempt = 0u32;
    let mut connected_before = false;
    let mut nacks: HashMap<u64, u32> = HashMap::new();
    // Records already settled (dead-lettered, or confirmed beyond a failed batch's prefix) but
    // not yet behind the cursor, because an earlier record is being retried: never sent or
    // dead-lettered again.
    let mut settled_ahead: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    let mut pace = Pace::new(cfg.max_rate());
    'connect: loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        stats.set(UplinkState::Connecting, None);
        let mut uplink = tokio::select! {
            r = Uplink::connect(&cfg, &gateway_id) => match r {
                Ok(u) => u,
                Err(e) => {
                    stats.set(UplinkState::BackingOff, Some(&e));
                    let wait = backoff(attempt, backoff_min, backoff_max);
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue 'connect,
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
            },
            _ = shutdown.cancelled() => return Ok(()),
        };
        if connected_before {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        connected_before = true;
        attempt = 0;
        stats.set(UplinkState::Connected, None);
        reader.rewind();
        loop {
            let records = tokio::select! {
                r = reader.next_batch(cfg.batch(), 8 << 20) => match r {
                    Ok(r) => r,
                    Err(QueueError::Closed) => { uplink.close().await; return Ok(()); }
                    Err(e) => return Err(e),
                },
                _ = shutdown.cancelled() => { uplink.close().await; return Ok(()); }
            };
            // Kafka `linger`: with fewer than a batch ready, wait once for more, then take what
            // came meanwhile. A sleep and a non-blocking read: `next_batch` under a timeout is
            // not cancel-safe (a read cut short would lose the reader's position).
            let mut records = records;
            let linger = cfg.linger();
            if !linger.is_zero() && records.len() < cfg.batch() {
                tokio::select! {
                    _ = tokio::time::sleep(linger) => {}
                    _ = shutdown.cancelled() => { uplink.close().await; return Ok(()); }
                }
                // Records already durable (page cache): a short read, not worth a thread hop.
                match reader.read_now(cfg.batch() - records.len(), 1 << 20) {
                    Ok(more) => records.extend(more),
                    Err(QueueError::Closed) => {
                        uplink.close().await;
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
            }
            // Prepare: what this uplink sends, what it skips, what cannot be sent at all. The
            // routes are read once per batch: a reload applies from the next batch on.
            let routes = routes.borrow().clone();
            let mut prepared = Vec::new();
            let mut settled_before: Vec<(u64, Option<String>)> = Vec::new();
            for r in records {
                if settled_ahead.contains(&r.seq) {
                    settled_before.push((r.seq, None));
                    continue;
                }
                match routes.at(r.seq).for_uplink(&name, &r.topic) {
                    None => settled_before.push((r.seq, None)),
                    Some(route) => match transcode(route.payload, &r) {
                        Ok((payload, content_type)) => {
                            let (destination, key) = address(&cfg, &r);
                            prepared.push(Prepared {
                                destination,
                                key,
                                payload,
                                content_type,
                                record: r,
                            })
                        }
                        Err(e) => {
                            dead.put(&r, &name, &e.to_string()).await?;
                            stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                            settled_ahead.insert(r.seq);
                            settled_before.push((r.seq, None));
                        }
                    },
                }
            }
            tokio::select! {
                _ = pace.wait(prepared.len()) => {}
                _ = shutdown.cancelled() => { uplink.close().await; return Ok(()); }
            }
            stats
                .sent
                .fetch_add(prepared.len() as u64, Ordering::Relaxed);
            let (outcomes, failure, confirmed_beyond) = if prepared.is_empty() {
                (Vec::new(), None, Vec::new())
            } else {
                // A stop that came meanwhile: send nothing new (what was read stays behind the
                // cursor for the next forwarder).
                if shutdown.is_cancelled() {
                    uplink.close().await;
                    return Ok(());
                }
                // Not cancelled by `shutdown`: the send ends by itself within the confirm
                // timeout, and what it confirmed is acked below, so a stop re-sends nothing.
                match uplink.send(&prepared).await {
                    Ok(o) => (o, None, Vec::new()),
                    Err(f) => (f.settled, Some(f.error), f.confirmed_beyond),
                }
            };
            // Records of this batch without an outcome (the send failed first) are not settled.
            let mut stop_at: Option<u64> = prepared.get(outcomes.len()).map(|m| m.record.seq);
            // Walk in seq order: skipped and prepared records interleave.
            let mut settled = settled_before
                .into_iter()
                .map(|(s, _)| s)
                .collect::<Vec<_>>();
            for (m, o) in prepared.iter().zip(outcomes) {
                let seq = m.record.seq;
                match o {
                    Outcome::Confirmed => {
                        stats.confirmed.fetch_add(1, Ordering::Relaxed);
                        nacks.remove(&seq);
                        settled.push(seq);
                    }
                    Outcome::Returned { code, text } => {
                        stats.returned.fetch_add(1, Ordering::Relaxed);
                        dead.put(
                            &m.record,
                            &name,
                            &format!("returned by the broker: {code} {text}"),
                        )
                        .await?;
                        stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        settled_ahead.insert(seq);
                        settled.push(seq);
                    }
                    Outcome::Nacked => {
                        stats.nacked.fetch_add(1, Ordering::Relaxed);
                        let n = nacks.entry(seq).or_insert(0);
                        *n += 1;
                        if *n > max_retries {
                            nacks.remove(&seq);
                            dead.put(
                                &m.record,
                                &name,
                                &format!("nacked by the broker {} times", max_retries + 1),
                            )
                            .await?;
                            stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                            settled_ahead.insert(seq);
                            settled.push(seq);
                        } else if stop_at.is_none_or(|s| seq < s) {
                            stop_at = Some(seq);
                        }
                    }
                }
            }
            for i in confirmed_beyond {
                if let Some(m) = prepared.get(i) {
                    stats.confirmed.fetch_add(1, Ordering::Relaxed);
                    nacks.remove(&m.record.seq);
                    settled_ahead.insert(m.record.seq);
                    settled.push(m.record.seq);
                }
            }
            // Invariant: the cursor only moves over a contiguous settled prefix.
            settled.sort_unstable();
            let ack_to = match stop_at {
                Some(stop) => settled.iter().take_while(|&&s| s < stop).last().copied(),
                None => settled.last().copied(),
            };
            if let Some(seq) = ack_to {
                reader.ack_through(seq).await?;
                // What the cursor passed needs no memory any more.
                settled_ahead = settled_ahead.split_off(&(seq + 1));
            }
            if let Some(e) = failure {
                let state = if matches!(e, UplinkError::Stalled { .. }) {
                    UplinkState::Stalled
                } else {
                    UplinkState::BackingOff
                };
                stats.set(state, Some(&e));
                reader.rewind();
                tokio::select! {
                    _ = tokio::time::sleep(backoff(0, backoff_min, backoff_max)) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                continue 'connect;
            }
            if stop_at.is_some() {
                // Retry from the first nacked record after a pause.
                reader.rewind();
                tokio::select! {
                    _ = tokio::time::sleep(backoff(1, backoff_min, backoff_max)) => {}
                    _ = shutdown.cancelled() => { uplink.close().await; return Ok(()); }
                }
            }
        }
    }
}

/// Moves records that match no route to the dead letters (cursor `_unrouted`).
pub fn spawn_unrouted(
    queue: Queue,
    routes: watch::Receiver<Arc<Routes>>,
    dead: DeadLetters,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut reader = {
            let q = queue.clone();
            match tokio::task::spawn_blocking(move || q.reader("_unrouted")).await {
                Ok(Ok(r)) => r,
                _ => return,
            }
        };
        loop {
            let records = tokio::select! {
                r = reader.next_batch(1024, 8 << 20) => match r { Ok(r) => r, Err(_) => return },
                _ = shutdown.cancelled() => return,
            };
            let mut last = None;
            let routes = routes.borrow().clone();
            for r in &records {
                if !routes.at(r.seq).any(&r.topic) {
                    if let Err(error) = dead.put(r, "-", "no route matches the topic").await {
                        tracing::error!(%error, "could not dead-letter an unrouted record; will retry");
                        reader.rewind();
                        break;
                    }
                }
                last = Some(r.seq);
            }
            if let Some(seq) = last {
                if reader.ack_through(seq).await.is_err() {
                    return;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pace_keeps_an_uplink_at_its_max_rate() {
        let mut p = Pace::new(Some(100));
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            p.wait(50).await;
        }
        // 500 records at 100/s: the tenth batch may start after 450 records' worth.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(4_490), "{took:?}");
        assert!(took <= Duration::from_millis(4_600), "{took:?}");
        let mut unlimited = Pace::new(None);
        let t = tokio::time::Instant::now();
        unlimited.wait(1_000_000).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
    }
}
