//! Downlinks: commands from upstream (RabbitMQ, Kafka) to devices, with the uplink's chain of
//! custody mirrored.
//!
//! ```text
//! AMQP queue --consume (manual ack)--> amqp.rs --map()--> command store (a queue in
//!     data_dir/downlink: write + fdatasync) --durable--> basic.ack
//!   command store --router.rs (its own cursor)--> Sessions::route_command --> each subscribed
//!     session's outbox (persistent sessions: the session store) --> PUBLISH QoS 1/2 --> device
//!     PUBACK/PUBCOMP --> done
//! ```
//!
//! - **Upstream ack means durable**: a command is acked upstream only once it is in the command
//!   store under `fsync = "always"` (the store syncs every append, whatever `[queue] fsync`
//!   says: commands are few and each is someone's intent). A crash before that makes the broker
//!   deliver it again.
//! - **The router's cursor moves only past commands that are settled**: in every matching
//!   session's outbox (durable in the session store for persistent sessions), dead-lettered, or
//!   expired. A command that matches no session is held (for the downlink's `hold`), and the
//!   cursor waits behind it; after a restart the router reads from the cursor again and each
//!   session skips the commands it already has (`downlink_through`).
//! - **Bounds**: each session's `[sessions] max_queued_*` per device, `[downlink] max_bytes`
//!   in total. A command for a full session waits there (the router routes nothing after it
//!   until the session has room: each device's commands stay in order), the store fills, and
//!   the downlinks stop consuming: the broker keeps the rest. Counted, never dropped.
//! - **Bad input** (no usable topic, a topic outside `allowed_topics`, an oversized payload, a
//!   bad header) goes to the dead letters with the reason and is acked upstream.
//! - **Duplicates**: a message id seen within the last [`RECENT_IDS`] commands of a downlink
//!   (upstream redelivery after a lost ack) is acked and not stored again.

pub mod amqp;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod map;
pub mod offsets;
pub mod router;

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::forwarder::DeadLetters;
use crate::queue::{FsyncPolicy, FullPolicy, Queue, QueueError, QueueOptions, Record};
use map::{HeaderValue, Upstream};

/// Bytes of a rejected message's payload kept in its dead letter.
pub const REJECTED_PAYLOAD_KEPT: usize = 64 << 10;

/// Message ids remembered per downlink to drop upstream redeliveries.
pub const RECENT_IDS: usize = 65_536;

/// The `device_id` of a command record: which downlink it came from.
pub fn origin(downlink: &str) -> String {
    format!("downlink:{downlink}")
}

/// The command store: a queue of its own under the main queue's data directory.
pub fn open_store(main: &QueueOptions, max_bytes: u64) -> Result<Queue, QueueError> {
    let mut o = QueueOptions::new(main.data_dir.join("downlink"));
    o.segment_bytes = (1 << 20).min(max_bytes / 8).max(64 << 10);
    o.max_bytes = max_bytes;
    o.fsync = FsyncPolicy::Always;
    o.full_policy = FullPolicy::Backpressure;
    o.preallocate = false;
    Queue::open(o).map(|(q, _)| q)
}

/// Whether the command store exists under `data_dir` (for the tools).
pub fn store_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("downlink")
}

/// Stores an upstream message that cannot be a command in the dead letters, with the reason.
/// `source` says where it came from (e.g. `amqp_routing_key`, or a Kafka record's topic,
/// partition, offset and key); the dead letter's topic is the `mqtt_topic` header if it is
/// text, else `topic` (what the downlink's template made of it). Durable when `Ok`.
pub async fn reject(
    dead: &DeadLetters,
    origin: &str,
    m: &Upstream,
    source: Vec<(String, String)>,
    topic: String,
    why: &str,
) -> Result<(), QueueError> {
    let mut props = source;
    if let Some(id) = &m.message_id {
        props.push(("message_id".into(), id.clone()));
    }
    let topic = m
        .headers
        .iter()
        .find(|(k, _)| k == "mqtt_topic")
        .and_then(|(_, v)| match v {
            HeaderValue::Text(t) => Some(t.clone()),
            HeaderValue::Bytes(b) => String::from_utf8(b.clone()).ok(),
            _ => None,
        })
        .unwrap_or(topic);
    let rec = Record {
        seq: 0,
        received_at_us: crate::queue::micros_since_epoch(SystemTime::now()),
        device_id: origin.to_string(),
        username: None,
        topic,
        qos: 1,
        retain: false,
        user_properties: props,
        content_type: m.content_type.clone(),
        payload_format: None,
        message_expiry: None,
        response_topic: None,
        correlation_data: None,
        // Bounded: the dead letters keep the first 64 KiB of a rejected payload (their segments
        // are 1 MiB; a whole oversized payload could not be stored there either).
        payload: m.payload[..m.payload.len().min(REJECTED_PAYLOAD_KEPT)].to_vec(),
    };
    dead.put(&rec, origin, why).await
}

/// A downlink's connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownlinkState {
    Connecting = 0,
    Consuming = 1,
    Down = 2,
    /// Not consuming because the command store is full.
    Paused = 3,
}

impl DownlinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            DownlinkState::Connecting => "connecting",
            DownlinkState::Consuming => "consuming",
            DownlinkState::Down => "down",
            DownlinkState::Paused => "paused",
        }
    }
}

/// Counters of one downlink (exact; exported as metrics).
#[derive(Debug, Default)]
pub struct DownlinkStats {
    /// Messages received from upstream.
    pub consumed: AtomicU64,
    /// Commands stored durably (and then acked upstream).
    pub stored: AtomicU64,
    /// Messages acked upstream (stored, dead-lettered or duplicates).
    pub acked: AtomicU64,
    /// Redeliveries of a message id already stored, acked and not stored again.
    pub duplicates: AtomicU64,
    /// Bad messages moved to the dead letters.
    pub dead_lettered: AtomicU64,
    /// Times consuming paused because the command store was full.
    pub backpressure: AtomicU64,
    /// Connections made.
    pub connects: AtomicU64,
    state: AtomicU8,
    node: AtomicU64,
    last_error: Mutex<String>,
}

impl DownlinkStats {
    pub fn state(&self) -> DownlinkState {
        match self.state.load(Ordering::Relaxed) {
            1 => DownlinkState::Consuming,
            2 => DownlinkState::Down,
            3 => DownlinkState::Paused,
            _ => DownlinkState::Connecting,
        }
    }

    pub fn set_state(&self, s: DownlinkState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    /// Which of the configured nodes is in use (index into `urls`).
    pub fn node(&self) -> usize {
        self.node.load(Ordering::Relaxed) as usize
    }

    pub fn set_node(&self, n: usize) {
        self.node.store(n as u64, Ordering::Relaxed);
    }

    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }
}

/// The newest message ids of one downlink (bounded), to recognise a redelivery.
#[derive(Debug, Default)]
pub struct RecentIds {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl RecentIds {
    /// Whether `id` was seen; remembers it (forgetting the oldest beyond [`RECENT_IDS`]).
    pub fn seen(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return true;
        }
        if self.order.len() == RECENT_IDS {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(id.to_string());
        self.order.push_back(id.to_string());
        false
    }

    /// The message ids of downlink `origin`'s commands still in the command store (read-only,
    /// while the store is open): after a crash between storing a command and acking it, the
    /// broker's redelivery is then recognised too. Blocking.
    pub fn from_store(store: &Queue, origin: &str) -> RecentIds {
        let mut r = RecentIds::default();
        let Ok(insp) = crate::queue::inspect::Inspector::open(store.data_dir()) else {
            return r;
        };
        let mut from = 0;
        while let Ok(batch) = insp.records(from, 1024) {
            let Some(last) = batch.last().map(|x| x.seq) else {
                break;
            };
            for rec in batch.iter().filter(|x| x.device_id == origin) {
                if let Some((_, id)) = rec.user_properties.iter().find(|(k, _)| k == "message_id") {
                    r.seen(id);
                }
            }
            from = last + 1;
        }
        r
    }

    /// Forgets `id` (its command could not be stored: a redelivery must be taken).
    pub fn forget(&mut self, id: &str) {
        if self.set.remove(id) {
            self.order.retain(|x| x != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_are_bounded_and_recognised() {
        let mut r = RecentIds::default();
        assert!(!r.seen("a"));
        assert!(r.seen("a"));
        r.forget("a");
        assert!(!r.seen("a"));
        for i in 0..RECENT_IDS {
            r.seen(&i.to_string());
        }
        assert_eq!(r.order.len(), RECENT_IDS);
        assert!(!r.seen("a"), "the oldest id is forgotten first");
    }

    /// After a crash between storing a command and acking it upstream, the broker delivers it
    /// again: the restarted downlink knows its message id from the command store.
    #[tokio::test]
    async fn a_restarted_downlink_recognises_the_ids_of_stored_commands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = QueueOptions::new(dir.path());
        let store = open_store(&main, 8 << 20).expect("open");
        let props = vec![("message_id".to_string(), "m-7".to_string())];
        let mine = origin("cmds");
        let mut rec = crate::queue::NewRecord::new(&mine, "devices/d1/commands/x", b"p");
        rec.user_properties = &props;
        store.append(&rec).await.expect("append");
        let other = origin("other");
        let props2 = vec![("message_id".to_string(), "m-8".to_string())];
        let mut rec = crate::queue::NewRecord::new(&other, "devices/d1/commands/x", b"p");
        rec.user_properties = &props2;
        store.append(&rec).await.expect("append");
        let mut r = RecentIds::from_store(&store, &mine);
        assert!(r.seen("m-7"), "its own stored id is known");
        assert!(!r.seen("m-8"), "another downlink's ids are not");
        store.close();
    }
}
