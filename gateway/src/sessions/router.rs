//! The local router: follows the main queue and hands every record to [`Sessions::route`].
//! Publishers never wait for it: their PUBACK depends on the durable append alone. While nobody
//! is subscribed it reads nothing and only moves its position.
//!
//! With a session store the router reads through the cursor [`CURSOR`], moved only past records
//! whose messages for persistent sessions are durable in the store, so a crash makes it route
//! those records again (each session skips what it already has: `routed_through`). The cursor is
//! written at most once a second; the queue never frees a record for this cursor alone (see
//! `queue::freeable_through`). Without a store it follows the queue without a cursor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::registry::Sessions;
use crate::queue::{Queue, QueueError, Reader};

/// The router's cursor on the main queue.
pub const CURSOR: &str = crate::queue::SESSIONS_CURSOR;

/// Records per read: large enough to amortise the lock per batch, small enough that a burst
/// does not hold the index lock long.
const BATCH_RECORDS: usize = 256;
const BATCH_BYTES: usize = 1 << 20;
/// How often the cursor is written while records flow.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

pub async fn run(queue: Queue, sessions: Arc<Sessions>, shutdown: CancellationToken) {
    let cursor = sessions.store().is_some();
    let mut reader = if cursor {
        let q = queue.clone();
        match tokio::task::spawn_blocking(move || q.reader(CURSOR)).await {
            Ok(Ok(r)) => r,
            Ok(Err(error)) => {
                tracing::error!(%error, "local router: cannot open its cursor; persistent sessions will miss what is published until a restart");
                queue.follower(CURSOR)
            }
            Err(_) => return,
        }
    } else {
        queue.follower(CURSOR)
    };
    let mut routed_through = reader.acked();
    let mut persisted = Instant::now();
    loop {
        // Wait for records (cancel-safe), writing the cursor once due meanwhile: the queue frees
        // nothing this cursor has not passed, so it must not lag while the queue is idle or full.
        let due = cursor && routed_through > reader.acked();
        let wait = tokio::time::sleep_until((persisted + PERSIST_EVERY).into());
        tokio::select! {
            r = reader.wait_readable() => match r {
                Ok(_) => {}
                Err(_) => break,
            },
            _ = wait, if due => {
                persisted = Instant::now();
                if let Err(error) = reader.ack_through(routed_through).await {
                    tracing::warn!(%error, "local router could not write its cursor");
                }
                continue;
            }
            _ = shutdown.cancelled() => break,
        }
        // Records are readable: route them. A reader may report a seq as readable where nothing
        // is left to read (an empty segment after a restart), and then waits for the next
        // record: shutdown must not wait with it (cancelling only repeats this batch's routing
        // at the next start, which `routed_through` makes harmless).
        let routed = tokio::select! {
            r = step(&mut reader, &sessions) => r,
            _ = shutdown.cancelled() => break,
        };
        match routed {
            Ok(Some(last)) => {
                routed_through = last;
                sessions.note_routed(last);
            }
            Ok(None) => {}
            Err(QueueError::Closed) => break,
            Err(error) => {
                // A record that cannot be read is the uplinks' concern (quarantine); local
                // delivery skips past it rather than stopping.
                if let Ok(last) = reader.wait_readable().await {
                    let skipped = (last + 1).saturating_sub(reader.position());
                    tracing::warn!(%error, skipped, "local router could not read the queue; subscribers miss the records up to its end");
                    sessions
                        .stats
                        .router_skipped
                        .fetch_add(skipped, std::sync::atomic::Ordering::Relaxed);
                    reader.skip_through(last);
                    routed_through = last;
                    sessions.note_routed(last);
                }
            }
        }
        if cursor && persisted.elapsed() >= PERSIST_EVERY && routed_through > reader.acked() {
            persisted = Instant::now();
            if let Err(error) = reader.ack_through(routed_through).await {
                tracing::warn!(%error, "local router could not write its cursor");
            }
        }
    }
    if cursor && routed_through > reader.acked() {
        let _ = reader.ack_through(routed_through).await;
    }
}

/// Routes one batch (or skips what arrived while nobody subscribes); returns the last seq
/// done, with everything stored for persistent sessions durable.
async fn step(reader: &mut Reader, sessions: &Sessions) -> Result<Option<u64>, QueueError> {
    if !sessions.has_subscriptions() {
        let last = reader.wait_readable().await?;
        // Retained publishes are read even then (they are kept for later subscribers).
        if !sessions.has_subscriptions() && sessions.retained_upto() < reader.position() {
            reader.skip_through(last);
            return Ok(Some(last));
        }
    }
    let batch = reader.next_batch(BATCH_RECORDS, BATCH_BYTES).await?;
    let Some(last) = batch.last().map(|r| r.seq) else {
        return Ok(None);
    };
    let routed = sessions.route(batch);
    if let Some(p) = routed.last_append {
        let seq = p.seq();
        let durable = p.durable().await;
        // The messages held until stored may go now; also when storing failed: delivered from
        // memory then, as a session kept in memory only would be.
        for s in &routed.held {
            s.stored_through(seq);
        }
        if let Err(error) = durable {
            // Not durable: do not move the cursor past these records (a restart routes them
            // again); the sessions have them in memory meanwhile.
            tracing::warn!(%error, "local router: messages for persistent sessions could not be stored");
            for s in routed.wake {
                s.wake.notify_one();
            }
            return Ok(None);
        }
    }
    for s in routed.wake {
        s.wake.notify_one();
    }
    Ok(Some(last))
}

/// Ends offline sessions as they expire (checked every second) and compacts the session store
/// when enough has been written since its last snapshot.
pub async fn expire(sessions: Arc<Sessions>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                sessions.sweep(Instant::now(), std::time::SystemTime::now());
                compact_if_due(&sessions).await;
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Events written since the last snapshot before one is taken.
const SNAPSHOT_AFTER_EVENTS: u64 = 20_000;

async fn compact_if_due(sessions: &Sessions) {
    let Some(store) = sessions.store() else {
        return;
    };
    let big = store.queue().stats().bytes > store.queue().options().max_bytes / 2;
    if store.since_snapshot() < SNAPSHOT_AFTER_EVENTS && !big {
        return;
    }
    let Some((first, last, events)) = sessions.snapshot() else {
        return;
    };
    match last.durable().await {
        Ok(_) => {
            if let Err(error) = store.snapshot_done(first, events).await {
                tracing::warn!(%error, "session store: could not move past the old events");
            }
        }
        Err(error) => tracing::warn!(%error, "session store: snapshot not stored"),
    }
}
