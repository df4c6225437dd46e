//! One forwarder per uplink: read from the uplink's cursor, prepare each record (route,
//! template, payload: [`prepare`]), send it, and advance the cursor over the contiguous prefix
//! that is settled (confirmed, not routed to this uplink, or dead-lettered with a reason).
//!
//! The bookkeeping is a pure state machine ([`settle::Settle`]); this module is the I/O around
//! it. The window slides: a record goes out as soon as one beyond the persisted cursor is
//! settled, so a long link never idles between batches. It is bounded by records (`window`,
//! counting everything read beyond the persisted cursor, so a crash re-sends at most a window)
//! and by bytes (`window_bytes`). A dropped connection or a stall reconnects (to the next node of
//! a cluster) and sends again from the cursor; a nack pauses and sends again from the cursor:
//! at least once, in queue order, hence in per-device order.
//!
//! Records that match no route at all are moved to the dead letters by a separate task with its
//! own cursor (`_unrouted`), so they are kept and counted, never silently dropped.

pub mod prepare;
pub mod settle;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::future::poll_immediate;
use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::UplinkConfig;
use crate::queue::{FsyncPolicy, FullPolicy, Queue, QueueError, QueueOptions, Reader, Record};
use crate::uplink::{Outcome, Uplink, UplinkError};

use prepare::{prepare, Prep};
pub use prepare::{RouteSet, Routes};
use settle::{Read, Settle, Step};

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
    /// The node the uplink is connected to, or last tried (no password): of a cluster's
    /// `urls`, which one is in use.
    pub node: Mutex<String>,
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
            node: Mutex::new(String::new()),
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

    /// The node in use (see [`ForwarderStats::node`]).
    pub fn node(&self) -> String {
        self.node.lock().unwrap_or_else(|e| e.into_inner()).clone()
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
pub(crate) fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let exp = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    let jitter = rand::random::<f64>();
    min + (exp.saturating_sub(min)).mul_f64(jitter)
}

/// Starts the forwarder of `cfg`; returns its stats. It runs until `shutdown`: then it sends
/// nothing new, waits for the answers to what is in flight (bounded by the uplink's confirm
/// timeout), advances the cursor over what was settled, closes the uplink and returns. So
/// stopping a forwarder (a reload, a shutdown) neither loses nor duplicates anything; aborting
/// its task instead is safe too, but what was in flight is sent again by the next forwarder on
/// that cursor.
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
        let f = Forwarder {
            name: cfg.name().to_string(),
            cfg,
            gateway_id,
            routes,
            dead,
            stats: s,
            shutdown,
        };
        if let Err(error) = f.run(queue).await {
            tracing::error!(%error, "forwarder stopped");
        }
    });
    (stats, h)
}

/// What one forwarder works with.
struct Forwarder {
    name: String,
    cfg: UplinkConfig,
    gateway_id: String,
    routes: watch::Receiver<Arc<Routes>>,
    dead: DeadLetters,
    stats: Arc<ForwarderStats>,
    shutdown: CancellationToken,
}

/// The records the forwarder holds beyond the cursor (sent and unanswered, or waiting for their
/// dead-letter turn), with the bytes they take.
#[derive(Default)]
struct Held {
    records: BTreeMap<u64, (Record, usize)>,
    bytes: usize,
}

impl Held {
    fn insert(&mut self, r: Record, size: usize) {
        self.bytes += size;
        if let Some((_, old)) = self.records.insert(r.seq, (r, size)) {
            self.bytes -= old;
        }
    }

    fn remove(&mut self, seq: u64) {
        if let Some((_, size)) = self.records.remove(&seq) {
            self.bytes -= size;
        }
    }

    /// Forgets everything up to `seq` (the cursor passed it).
    fn release_through(&mut self, seq: u64) {
        let keep = self.records.split_off(&(seq + 1));
        for (_, (_, size)) in std::mem::replace(&mut self.records, keep) {
            self.bytes -= size;
        }
    }
}

/// The cursor writes. One is in flight at a time, beside the sending (a cursor write is an
/// fsync; the loop does not wait for it), and each covers everything settled before it
/// started, so they coalesce by themselves under load.
struct Persisted {
    /// Records the settle cursor has passed, in total.
    settled: u64,
    /// How many of them the last completed cursor write covers. The window counts the
    /// difference: a crash would send those again.
    durable: u64,
    /// The seq the last started write goes up to.
    written: u64,
    /// The write in flight: how many settled records it covers, and the write.
    writing: Option<(u64, BoxFuture<'static, Result<u64, QueueError>>)>,
}

impl Persisted {
    fn unpersisted(&self) -> usize {
        usize::try_from(self.settled - self.durable).unwrap_or(usize::MAX)
    }

    /// Starts a cursor write up to `settle`'s cursor if it moved and none is in flight.
    fn start(&mut self, reader: &Reader, settle: &Settle) {
        if self.writing.is_none() && settle.cursor() > self.written {
            let acker = reader.acker();
            let seq = settle.cursor();
            self.written = seq;
            self.writing = Some((
                self.settled,
                Box::pin(async move { acker.ack_through(seq).await }),
            ));
        }
    }

    /// The end of the write in flight: `(records it covers, result)`. Pending without one.
    /// Cancel-safe.
    async fn written(&mut self) -> (u64, Result<u64, QueueError>) {
        match &mut self.writing {
            Some((n, w)) => (*n, w.await),
            None => std::future::pending().await,
        }
    }

    fn done(&mut self, reader: &mut Reader, covers: u64, acked: u64) {
        self.writing = None;
        self.durable = self.durable.max(covers);
        reader.note_acked(acked);
    }

    /// Waits for the write in flight, then writes the cursor as it is now. A closed queue
    /// (the gateway is stopping) takes no more writes: not an error here.
    async fn flush(&mut self, reader: &mut Reader, settle: &Settle) -> Result<(), QueueError> {
        for _ in 0..2 {
            if self.writing.is_none() {
                self.start(reader, settle);
            }
            if self.writing.is_some() {
                match self.written().await {
                    (covers, Ok(acked)) => self.done(reader, covers, acked),
                    (_, Err(QueueError::Closed)) => {
                        self.writing = None;
                        return Ok(());
                    }
                    (_, Err(e)) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// Answers taken in one turn of the loop, at most (so reading new records is not starved).
const ANSWERS_AT_ONCE: usize = 1024;

/// How a connected session ended.
enum End {
    /// Stopped (shutdown, or the queue closed): return.
    Stop,
    /// Reconnect after this failure.
    Failed(UplinkError),
}

impl Forwarder {
    async fn run(self, queue: Queue) -> Result<(), QueueError> {
        let (backoff_min, backoff_max) = self.cfg.backoff();
        let mut reader = {
            let q = queue.clone();
            let n = self.name.clone();
            tokio::task::spawn_blocking(move || q.reader(&n))
                .await
                .map_err(|_| QueueError::Closed)??
        };
        let mut settle = Settle::new(reader.acked(), self.cfg.max_retries());
        let mut held = Held::default();
        let mut persisted = Persisted {
            settled: 0,
            durable: 0,
            written: reader.acked(),
            writing: None,
        };
        let mut pace = Pace::new(self.cfg.max_rate());
        let nodes = self.cfg.nodes().max(1);
        let mut node = 0usize;
        // Connection attempts that failed in a row: the backoff grows once per round of nodes.
        let mut attempt = 0u32;
        let mut connected_before = false;
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            self.stats.set(UplinkState::Connecting, None);
            *self.stats.node.lock().unwrap_or_else(|e| e.into_inner()) = self.cfg.node_label(node);
            let connect = Uplink::connect(&self.cfg, node, &self.gateway_id);
            let uplink = tokio::select! {
                r = connect => r,
                _ = self.shutdown.cancelled() => return Ok(()),
            };
            let mut uplink = match uplink {
                Ok(u) => u,
                Err(e) => {
                    self.stats.set(UplinkState::BackingOff, Some(&e));
                    node = (node + 1) % nodes;
                    let wait = backoff(attempt / nodes as u32, backoff_min, backoff_max);
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = self.shutdown.cancelled() => return Ok(()),
                    }
                }
            };
            if connected_before {
                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            connected_before = true;
            attempt = 0;
            self.stats.set(UplinkState::Connected, None);
            reader.rewind_after(settle.cursor());
            let end = self
                .session(
                    &mut uplink,
                    &mut reader,
                    &mut settle,
                    &mut held,
                    &mut persisted,
                    &mut pace,
                )
                .await?;
            match end {
                End::Stop => {
                    uplink.close().await;
                    return Ok(());
                }
                End::Failed(e) => {
                    let state = if matches!(e, UplinkError::Stalled { .. }) {
                        UplinkState::Stalled
                    } else {
                        UplinkState::BackingOff
                    };
                    self.stats.set(state, Some(&e));
                    // A failed connection is dropped, not closed: closing could wait on it.
                    drop(uplink);
                    if nodes > 1 {
                        node = (node + 1) % nodes;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(0, backoff_min, backoff_max)) => {}
                        _ = self.shutdown.cancelled() => return Ok(()),
                    }
                }
            }
        }
    }

    /// Sends and settles on one connection until it fails or the forwarder stops.
    async fn session(
        &self,
        uplink: &mut Uplink,
        reader: &mut Reader,
        settle: &mut Settle,
        held: &mut Held,
        persisted: &mut Persisted,
        pace: &mut Pace,
    ) -> Result<End, QueueError> {
        let window = self.cfg.window();
        let window_bytes = self.cfg.window_bytes();
        let timeout = self.cfg.confirm_timeout();
        let (backoff_min, backoff_max) = self.cfg.backoff();
        // Set at the last answer, or when a send started while nothing was in flight.
        let mut progress = Instant::now();
        let mut stopping = false;
        loop {
            let room = window.saturating_sub(settle.outstanding() + persisted.unpersisted())
                + settle.rereads();
            let can_read = !stopping
                && !settle.holding()
                && !uplink.failed()
                && room > 0
                && held.bytes < window_bytes;
            let waiting = settle.in_flight() > 0 || uplink.failed();
            let mut failure = None;
            let mut answered = Vec::new();
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled(), if !stopping => {
                    // Send nothing new; wait (at most the confirm timeout) for the answers.
                    stopping = true;
                    progress = Instant::now();
                }
                r = uplink.next(), if waiting => {
                    progress = Instant::now();
                    let mut r = Some(r);
                    // Take every answer that is already there (a Kafka request answers many
                    // records at once) before the next cursor write.
                    let mut more = ANSWERS_AT_ONCE;
                    while let Some(answer) = r.take() {
                        match answer {
                            Ok((seq, outcome)) => {
                                self.answer(settle, seq, outcome);
                                answered.push(seq);
                            }
                            Err(e) => {
                                failure = Some(e);
                                break;
                            }
                        }
                        more -= 1;
                        if more > 0 {
                            // Polled with this task's waker (`now_or_never` would leave a no-op
                            // waker with the uplink's futures and lose their next wake-up).
                            r = poll_immediate(uplink.next()).await;
                        }
                    }
                }
                (covers, r) = persisted.written(), if persisted.writing.is_some() => match r {
                    Ok(acked) => persisted.done(reader, covers, acked),
                    Err(QueueError::Closed) => {
                        persisted.writing = None;
                        stopping = true;
                    }
                    Err(e) => return Err(e),
                },
                _ = tokio::time::sleep_until(progress + timeout), if waiting || stopping => {
                    if stopping {
                        persisted.flush(reader, settle).await?;
                        return Ok(End::Stop);
                    }
                    failure = Some(UplinkError::Stalled {
                        uplink: self.name.clone(),
                        secs: timeout.as_secs(),
                    });
                }
                r = reader.readable(), if can_read => match r {
                    Ok(()) => {
                        if settle.in_flight() == 0 {
                            progress = Instant::now();
                        }
                        let max = room.min(self.cfg.batch());
                        let max_bytes = window_bytes - held.bytes;
                        if !self.read_and_send(uplink, reader, settle, held, pace, max, max_bytes).await? {
                            stopping = true;
                        }
                    }
                    Err(QueueError::Closed) => stopping = true,
                    Err(e) => return Err(e),
                },
            }
            let mut retry = false;
            if let Some(e) = failure {
                settle.failed();
                held.records.retain(|&seq, _| settle.needs_record(seq));
                held.bytes = held.records.values().map(|(_, size)| size).sum();
                self.steps(settle, held, persisted, &mut retry).await?;
                persisted.flush(reader, settle).await?;
                if stopping {
                    return Ok(End::Stop);
                }
                return Ok(End::Failed(e));
            }
            self.steps(settle, held, persisted, &mut retry).await?;
            // A record answered ahead of the cursor that is settled (or to be read again) is not
            // needed any more; one the cursor passed was released by its advance.
            for seq in answered {
                if seq > settle.cursor() && !settle.needs_record(seq) {
                    held.remove(seq);
                }
            }
            let idle = settle.in_flight() == 0;
            if stopping && idle {
                persisted.flush(reader, settle).await?;
                return Ok(End::Stop);
            }
            persisted.start(reader, settle);
            if retry {
                // A nack: pause, then send again from the cursor.
                tokio::select! {
                    _ = tokio::time::sleep(backoff(1, backoff_min, backoff_max)) => {}
                    _ = self.shutdown.cancelled() => {
                        persisted.flush(reader, settle).await?;
                        return Ok(End::Stop);
                    }
                }
                reader.rewind_after(settle.cursor());
            }
        }
    }

    /// Counts an answer and gives it to the settle state.
    fn answer(&self, settle: &mut Settle, seq: u64, outcome: Outcome) {
        match outcome {
            Outcome::Confirmed => {
                self.stats.confirmed.fetch_add(1, Ordering::Relaxed);
                settle.confirmed(seq);
            }
            Outcome::Returned { code, text } => {
                self.stats.returned.fetch_add(1, Ordering::Relaxed);
                settle.returned(seq, format!("returned by the broker: {code} {text}"));
            }
            Outcome::Nacked => {
                self.stats.nacked.fetch_add(1, Ordering::Relaxed);
                settle.nacked(seq);
            }
        }
    }

    /// Reads what is ready (up to `max` records, about `max_bytes`), prepares and sends it.
    /// `Ok(false)`: stopped meanwhile (nothing read was sent).
    #[allow(clippy::too_many_arguments)]
    async fn read_and_send(
        &self,
        uplink: &mut Uplink,
        reader: &mut Reader,
        settle: &mut Settle,
        held: &mut Held,
        pace: &mut Pace,
        max: usize,
        max_bytes: usize,
    ) -> Result<bool, QueueError> {
        let mut records = reader.batch_now(max, max_bytes).await?;
        // Kafka `linger`: with fewer than a request's worth ready and nothing in flight (a
        // request in flight batches what comes meanwhile anyway), wait once for more.
        let linger = self.cfg.linger();
        if !linger.is_zero() && records.len() < max && settle.in_flight() == 0 {
            tokio::select! {
                _ = tokio::time::sleep(linger) => {}
                _ = self.shutdown.cancelled() => return Ok(false),
            }
            records.extend(reader.batch_now(max - records.len(), max_bytes).await?);
        }
        if records.is_empty() {
            return Ok(true);
        }
        tokio::select! {
            _ = pace.wait(records.len()) => {}
            _ = self.shutdown.cancelled() => return Ok(false),
        }
        // The routes are read once per read: a reload applies from the next one on.
        let routes = self.routes.borrow().clone();
        for r in records {
            let seq = r.seq;
            if settle.read(seq) == Read::Skip {
                continue;
            }
            match prepare(&self.cfg, &routes, r) {
                Prep::Skip => {
                    settle.skipped(seq);
                    held.remove(seq);
                }
                Prep::Unsendable(r, why) => {
                    held.insert(r, 0);
                    settle.unsendable(seq, why);
                }
                Prep::Send(p) => {
                    held.remove(seq);
                    // After a failure the uplink sends nothing; the record stays in flight
                    // until `next` reports the failure, then goes again after the reconnect.
                    if !uplink.failed() {
                        uplink.send(&p).await;
                        self.stats.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    let size = p.size();
                    held.insert(p.record, size);
                }
            }
        }
        Ok(true)
    }

    /// Performs the settle state's steps: dead letters (durable before the cursor passes
    /// them), cursor advances (released from memory; persisted by [`Self::persist`]), retries.
    async fn steps(
        &self,
        settle: &mut Settle,
        held: &mut Held,
        persisted: &mut Persisted,
        retry: &mut bool,
    ) -> Result<(), QueueError> {
        while let Some(step) = settle.poll() {
            match step {
                Step::DeadLetter { seq, reason } => {
                    match held.records.get(&seq) {
                        Some((r, _)) => self.dead.put(r, &self.name, &reason).await?,
                        None => {
                            tracing::error!(uplink = %self.name, seq, reason, "record to dead-letter is not held (bug); it is not stored");
                        }
                    }
                    // The cursor passes it right after (the next step), and the next cursor
                    // write covers it: a restart does not dead-letter it twice.
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                }
                Step::Advance { seq, records } => {
                    held.release_through(seq);
                    persisted.settled += records as u64;
                }
                Step::Retry => *retry = true,
            }
        }
        Ok(())
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
