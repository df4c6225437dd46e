//! The local router: follows the queue (a cursorless [`crate::queue::Queue::follower`], so it
//! never holds records back from the uplinks) and hands every record to [`Sessions::route`].
//! Publishers never wait for it: their PUBACK depends on the durable append alone. While nobody
//! is subscribed it reads nothing and only moves its position.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::registry::Sessions;
use crate::queue::{Queue, QueueError};

/// Records per read: large enough to amortise the lock per batch, small enough that a burst
/// does not hold the index lock long.
const BATCH_RECORDS: usize = 256;
const BATCH_BYTES: usize = 1 << 20;

pub async fn run(queue: Queue, sessions: Arc<Sessions>, shutdown: CancellationToken) {
    let mut reader = queue.follower("_local");
    loop {
        let step = async {
            if !sessions.has_subscriptions() {
                let last = reader.wait_readable().await?;
                if !sessions.has_subscriptions() {
                    reader.skip_through(last);
                    return Ok(());
                }
            }
            let batch = reader.next_batch(BATCH_RECORDS, BATCH_BYTES).await?;
            sessions.route(batch);
            Ok::<(), QueueError>(())
        };
        tokio::select! {
            r = step => match r {
                Ok(()) => {}
                Err(QueueError::Closed) => return,
                Err(error) => {
                    // A record that cannot be read is the uplinks' concern (quarantine);
                    // local delivery skips past it rather than stopping.
                    tracing::warn!(%error, "local router could not read the queue; skipping to its end");
                    if let Ok(last) = reader.wait_readable().await {
                        reader.skip_through(last);
                    }
                }
            },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Ends offline sessions as they expire (checked every second).
pub async fn expire(sessions: Arc<Sessions>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                sessions.sweep(std::time::Instant::now());
            }
            _ = shutdown.cancelled() => return,
        }
    }
}
