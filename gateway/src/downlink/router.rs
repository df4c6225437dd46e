//! The downlink router: follows the command store and hands each command to
//! [`Sessions::route_command`], in store order.
//!
//! Each command read is an entry until it is settled: routed (durable in the persistent
//! sessions' store), dead-lettered, or expired. The router's cursor moves over the settled
//! prefix only, so a restart reads the unsettled ones again (and each session skips what it has
//! by its `downlink_through`). A command that matches no session is *held*: routed again when a
//! subscription is made, dead-lettered after its downlink's `hold`. A command that meets a full
//! session *blocks*: nothing after it is routed until that session has room (retried every
//! [`BLOCKED_RETRY`]), so a device's commands keep their order and none is dropped; the store
//! then fills and the downlinks stop consuming.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::forwarder::DeadLetters;
use crate::queue::{Queue, QueueError, Record};
use crate::sessions::outbox::Message;
use crate::sessions::registry::{CommandOutcome, Routed};
use crate::sessions::Sessions;

/// The router's cursor on the command store.
pub const CURSOR: &str = "router";
/// How often a command blocked by a full session is tried again.
pub const BLOCKED_RETRY: Duration = Duration::from_millis(50);
/// Commands per read.
const BATCH_RECORDS: usize = 256;
const BATCH_BYTES: usize = 1 << 20;
/// How often the cursor is written while commands flow.
const PERSIST_EVERY: Duration = Duration::from_millis(200);

/// Counters of the router (all downlinks together; exact, exported as metrics).
#[derive(Debug, Default)]
pub struct RouterStats {
    /// Commands put into the matching sessions.
    pub routed: AtomicU64,
    /// Commands held now for a session that has not subscribed (gauge).
    pub held: AtomicU64,
    /// Commands read and not yet settled, held ones included (gauge).
    pub pending: AtomicU64,
    /// Times routing stopped at a full session (backpressure).
    pub blocked: AtomicU64,
    /// Dead letters: held past `hold`, expired (before routing or in a session), too large for
    /// a session's bound.
    pub dead_unmatched: AtomicU64,
    pub dead_expired: AtomicU64,
    pub dead_too_large: AtomicU64,
    /// The same by downlink (origin `downlink:NAME`).
    per: Mutex<HashMap<String, PerDownlink>>,
}

/// One downlink's share of the router's counters (`held` and `pending` are gauges, taken once
/// a second).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PerDownlink {
    pub routed: u64,
    pub held: u64,
    pub pending: u64,
    pub dead_unmatched: u64,
    pub dead_expired: u64,
    pub dead_too_large: u64,
}

impl RouterStats {
    fn count(&self, origin: &str, f: impl FnOnce(&mut PerDownlink)) {
        let mut per = self.per.lock().unwrap_or_else(|e| e.into_inner());
        f(per.entry(origin.to_string()).or_default());
    }

    /// The counters of downlink `name`.
    pub fn of(&self, name: &str) -> PerDownlink {
        let per = self.per.lock().unwrap_or_else(|e| e.into_inner());
        per.get(&super::origin(name)).copied().unwrap_or_default()
    }
}

/// Why the router dead-letters a command.
#[derive(Debug, Clone, Copy)]
enum Dead {
    Unmatched,
    Expired,
    TooLarge,
}

/// Each downlink's `hold`, by origin ([`super::origin`]); changed by a reload.
pub type Holds = Arc<RwLock<HashMap<String, Duration>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    New,
    Held,
    Done,
}

struct Entry {
    rec: Record,
    stage: Stage,
}

pub struct Router {
    sessions: Arc<Sessions>,
    dead: DeadLetters,
    holds: Holds,
    stats: Arc<RouterStats>,
    entries: VecDeque<Entry>,
    /// The first entry that may be new (those before it are held or settled).
    first_new: usize,
    /// Entries held, and settled, now.
    held: usize,
    done: usize,
    blocked: bool,
    /// Storing for persistent sessions failed at the last settle: the entries it left new are
    /// routed again to every matching session (a session that has one only in memory must store
    /// it, so its copy survives a crash; a duplicate in memory is the price).
    store_failed: bool,
}

pub async fn run(
    store: Queue,
    sessions: Arc<Sessions>,
    dead: DeadLetters,
    holds: Holds,
    stats: Arc<RouterStats>,
    shutdown: CancellationToken,
) {
    let q = store.clone();
    let mut reader = match tokio::task::spawn_blocking(move || q.reader(CURSOR)).await {
        Ok(Ok(r)) => r,
        Ok(Err(error)) => {
            tracing::error!(%error, "downlink router: cannot open its cursor on the command store; commands are not delivered until a restart");
            return;
        }
        Err(_) => return,
    };
    let mut router = Router {
        sessions,
        dead,
        holds,
        stats,
        entries: VecDeque::new(),
        first_new: 0,
        store_failed: false,
        held: 0,
        done: 0,
        blocked: false,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut persisted = Instant::now();
    let mut settled_through = reader.acked();
    loop {
        let retry = tokio::time::sleep(BLOCKED_RETRY);
        let mut retry_held = false;
        tokio::select! {
            // Cancel-safe, and it does not report again where the last read found nothing (the
            // store may say a seq is readable where no record is: its seq reservation after a
            // restart), so the loop never waits inside a read: sweeps, held retries and the
            // stop go on.
            r = reader.readable() => match r {
                Ok(()) => match reader.batch_now(BATCH_RECORDS, BATCH_BYTES).await {
                    Ok(batch) => router.entries.extend(batch.into_iter().map(|rec| Entry {
                        rec,
                        stage: Stage::New,
                    })),
                    Err(QueueError::Closed) => break,
                    Err(error) => {
                        // A command that cannot be read is lost to the devices: say so loudly
                        // and go on with the next (the quarantine keeps the bytes).
                        if let Ok(last) = reader.wait_readable().await {
                            tracing::error!(%error, through = last, "downlink router could not read the command store; skipping to its end");
                            reader.skip_through(last);
                        }
                    }
                },
                Err(_) => break,
            },
            _ = router.sessions.subscribed.notified() => retry_held = true,
            _ = tick.tick() => router.sweep().await,
            _ = retry, if router.blocked => {}
            _ = shutdown.cancelled() => break,
        }
        if retry_held {
            router.retry_held().await;
        }
        router.route_new().await;
        if let Some(seq) = router.settled_prefix() {
            settled_through = seq;
        }
        if settled_through > reader.acked() && persisted.elapsed() >= PERSIST_EVERY {
            persisted = Instant::now();
            if let Err(error) = reader.ack_through(settled_through).await {
                tracing::warn!(%error, "downlink router could not write its cursor");
            }
        }
        router.publish_gauges();
    }
    if settled_through > reader.acked() {
        let _ = reader.ack_through(settled_through).await;
    }
}

impl Router {
    fn hold_of(&self, rec: &Record) -> Duration {
        self.holds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&rec.device_id)
            .copied()
            .unwrap_or(crate::config::DEFAULT_HOLD)
    }

    /// Routes the new entries in order, stopping at one that blocks; marks them settled once
    /// what went to persistent sessions is durable.
    async fn route_new(&mut self) {
        let mut acc = Routed::default();
        let mut routed = Vec::new();
        let was_blocked = self.blocked;
        self.blocked = false;
        let now = SystemTime::now();
        // Entries before `first_new` are held or settled: not scanned again.
        let start = self.first_new.min(self.entries.len());
        let mut stop = self.entries.len();
        for i in start..self.entries.len() {
            if self.entries[i].stage != Stage::New {
                continue;
            }
            let rec = &self.entries[i].rec;
            let outcome = if rec.expires_at().is_some_and(|t| t <= now) {
                CommandOutcome::Expired
            } else {
                let retry = self.store_failed;
                let (r, outcome) = self.sessions.route_command(rec.clone(), retry);
                acc.merge(r);
                outcome
            };
            match outcome {
                CommandOutcome::Routed => routed.push(i),
                CommandOutcome::Unmatched => self.set_stage(i, Stage::Held),
                CommandOutcome::Blocked => {
                    if !was_blocked {
                        self.stats.blocked.fetch_add(1, Ordering::Relaxed);
                    }
                    self.blocked = true;
                    stop = i;
                    break;
                }
                CommandOutcome::Expired => {
                    let why = "expired before any session took it";
                    self.dead_letter(i, why, Dead::Expired).await;
                }
                CommandOutcome::TooLarge => {
                    let why =
                        "larger than a subscribed session's bound ([sessions] max_queued_bytes)";
                    self.dead_letter(i, why, Dead::TooLarge).await;
                }
            }
        }
        self.settle(acc, routed).await;
        // What is still new before `stop` (its store or dead letter failed) is tried again.
        self.first_new = (start..stop)
            .find(|&j| self.entries[j].stage == Stage::New)
            .unwrap_or(stop);
    }

    fn set_stage(&mut self, i: usize, stage: Stage) {
        let was = std::mem::replace(&mut self.entries[i].stage, stage);
        self.held -= usize::from(was == Stage::Held);
        self.held += usize::from(stage == Stage::Held);
        self.done -= usize::from(was == Stage::Done);
        self.done += usize::from(stage == Stage::Done);
    }

    /// Waits until what went to persistent sessions is durable, then lets those sessions send
    /// and wakes them, and marks the entries `routed` settled. When storing failed they stay as
    /// they were and are routed again (the sessions that have them skip them).
    async fn settle(&mut self, acc: Routed, routed: Vec<usize>) {
        let mut ok = true;
        if let Some(p) = acc.last_append {
            let seq = p.seq();
            let durable = p.durable().await;
            for s in &acc.held {
                s.stored_through(seq);
            }
            if let Err(error) = durable {
                tracing::warn!(%error, "downlink router: commands for persistent sessions could not be stored");
                ok = false;
            }
        }
        self.store_failed = !ok;
        for s in acc.wake {
            s.wake.notify_one();
        }
        if ok {
            self.stats
                .routed
                .fetch_add(routed.len() as u64, Ordering::Relaxed);
            for i in routed {
                self.stats
                    .count(&self.entries[i].rec.device_id, |d| d.routed += 1);
                self.set_stage(i, Stage::Done);
            }
        }
    }

    /// A subscription was made: held commands that match a session now go there.
    async fn retry_held(&mut self) {
        let mut acc = Routed::default();
        let mut routed = Vec::new();
        for i in 0..self.entries.len() {
            if self.entries[i].stage != Stage::Held {
                continue;
            }
            let (r, outcome) = self
                .sessions
                .route_command(self.entries[i].rec.clone(), true);
            acc.merge(r);
            if matches!(outcome, CommandOutcome::Routed) {
                routed.push(i);
            }
        }
        self.settle(acc, routed).await;
    }

    /// Once a second: held commands past their hold or expiry, and commands that expired in
    /// sessions, go to the dead letters; each downlink's held and pending counts are taken.
    async fn sweep(&mut self) {
        let now = SystemTime::now();
        let mut gauges: HashMap<&str, (u64, u64)> = HashMap::new();
        for e in &self.entries {
            let g = gauges.entry(e.rec.device_id.as_str()).or_default();
            g.0 += u64::from(e.stage == Stage::Held);
            g.1 += u64::from(e.stage != Stage::Done);
        }
        {
            let mut per = self.stats.per.lock().unwrap_or_else(|e| e.into_inner());
            for d in per.values_mut() {
                (d.held, d.pending) = (0, 0);
            }
            for (origin, (held, pending)) in gauges {
                let d = per.entry(origin.to_string()).or_default();
                (d.held, d.pending) = (held, pending);
            }
        }
        for i in 0..self.entries.len() {
            if self.entries[i].stage != Stage::Held {
                continue;
            }
            let rec = &self.entries[i].rec;
            if rec.expires_at().is_some_and(|t| t <= now) {
                let why = "expired while no session subscribed to its topic";
                self.dead_letter(i, why, Dead::Expired).await;
                continue;
            }
            let hold = self.hold_of(rec);
            if rec.received_at() + hold <= now {
                let why = format!(
                    "no session subscribed to its topic within hold ({})",
                    humantime::format_duration(hold)
                );
                self.dead_letter(i, &why, Dead::Unmatched).await;
            }
        }
        for (client, m) in self.sessions.take_expired_commands() {
            let rec = record_of(&client, &m);
            let why = format!("expired in the session of {client} before it was sent");
            let origin = m.command.as_deref().unwrap_or("downlink");
            match self.dead.put(&rec, origin, &why).await {
                Ok(()) => {
                    self.stats.dead_expired.fetch_add(1, Ordering::Relaxed);
                    self.stats.count(origin, |d| d.dead_expired += 1);
                }
                Err(error) => {
                    tracing::error!(%error, client = %client, topic = %m.topic, "an expired command could not be stored in the dead letters; it is lost");
                }
            }
        }
    }

    /// Moves entry `i` to the dead letters and counts it as `kind`; true when stored (else it
    /// stays, tried again).
    async fn dead_letter(&mut self, i: usize, why: &str, kind: Dead) -> bool {
        let rec = &self.entries[i].rec;
        let origin = rec.device_id.clone();
        match self.dead.put(rec, &origin, why).await {
            Ok(()) => {
                self.set_stage(i, Stage::Done);
                let (total, per): (&AtomicU64, fn(&mut PerDownlink)) = match kind {
                    Dead::Unmatched => (&self.stats.dead_unmatched, |d| d.dead_unmatched += 1),
                    Dead::Expired => (&self.stats.dead_expired, |d| d.dead_expired += 1),
                    Dead::TooLarge => (&self.stats.dead_too_large, |d| d.dead_too_large += 1),
                };
                total.fetch_add(1, Ordering::Relaxed);
                self.stats.count(&origin, per);
                true
            }
            Err(error) => {
                tracing::warn!(%error, seq = rec.seq, "downlink router: could not store a dead letter; trying again");
                false
            }
        }
    }

    /// Drops the settled entries at the front; returns the last seq dropped.
    fn settled_prefix(&mut self) -> Option<u64> {
        let mut last = None;
        while self.entries.front().is_some_and(|e| e.stage == Stage::Done) {
            last = self.entries.pop_front().map(|e| e.rec.seq);
            self.done -= 1;
            self.first_new = self.first_new.saturating_sub(1);
        }
        last
    }

    fn publish_gauges(&self) {
        let pending = self.entries.len() - self.done;
        self.stats.held.store(self.held as u64, Ordering::Relaxed);
        self.stats.pending.store(pending as u64, Ordering::Relaxed);
    }
}

/// A command that expired in `client`'s session, as a record for the dead letters.
fn record_of(client: &str, m: &Message) -> Record {
    Record {
        seq: 0,
        received_at_us: crate::queue::micros_since_epoch(SystemTime::now()),
        device_id: client.to_string(),
        username: None,
        topic: m.topic.to_string(),
        qos: 1,
        retain: false,
        user_properties: m.user_properties.clone(),
        content_type: m.content_type.clone(),
        payload_format: m.payload_format,
        message_expiry: None,
        response_topic: m.response_topic.clone(),
        correlation_data: m.correlation_data.as_ref().map(|b| b.to_vec()),
        payload: m.payload.to_vec(),
    }
}
