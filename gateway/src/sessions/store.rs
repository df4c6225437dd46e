//! The durable session store: what persistent sessions hold, as an event log in a queue of its
//! own (`data_dir/sessions`, the main queue's framing, checksums, group commit and fsync policy).
//! Only sessions that outlive their connection (expiry > 0) write events.
//!
//! Events and when they are durable before the gateway acts on them:
//! - `Session` (started or resumed; its expiry and how far the router has routed into it) and
//!   `End` (ended: clean start, expiry, eviction);
//! - `Sub` / `Unsub`: durable before the SUBACK / UNSUBACK;
//! - `Msg`: a QoS 1/2 message queued for the session, with the packet id it will be sent with and
//!   the main queue's seq it came from; durable before the router moves its cursor past that
//!   record and before the message is sent;
//! - `Rec`: a QoS 2 PUBREC came; durable before the PUBREL is sent (so after a restart only PUBREL
//!   goes again, never the PUBLISH);
//! - `Done`: PUBACK / PUBCOMP came (not waited for: losing it sends the message once more).
//!
//! Recovery replays the log from the `replay` cursor. Compaction writes every live session as
//! events (a snapshot) and moves the `replay` cursor to just before them, so the queue frees
//! what came before. Each state change and its event are made under the same lock (the session
//! map's for session events, the session's outbox for message events), so a snapshot never
//! misses a change whose event it cut off.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::outbox::Message;
use super::registry::SubOptions;
use crate::queue::inspect::Inspector;
use crate::queue::{
    FsyncPolicy, NewRecord, PendingAppend, Queue, QueueError, QueueOptions, Record,
};

const REPLAY_CURSOR: &str = "replay";

/// One change to a persistent session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Session {
        id: String,
        expiry_secs: u32,
        routed_through: u64,
        /// The identity the session belongs to (`Identity::owner`; absent in events written
        /// before it was kept, and then any identity that owns the client id may resume it).
        #[serde(default)]
        owner: Option<String>,
    },
    End {
        id: String,
    },
    Sub {
        id: String,
        filter: String,
        qos: u8,
        no_local: bool,
        retain_as_published: bool,
        /// MQTT 5 Subscription Identifier (absent in events written before it was kept).
        #[serde(default)]
        sub_id: Option<u32>,
    },
    Unsub {
        id: String,
        filter: String,
    },
    Msg {
        id: String,
        seq: u64,
        qos: u8,
        pkid: u16,
        message: StoredMessage,
    },
    Rec {
        id: String,
        pkid: u16,
    },
    Done {
        id: String,
        pkid: u16,
    },
    /// A retained message for `topic` (replacing the one before).
    Retain {
        topic: String,
        qos: u8,
        message: StoredMessage,
    },
    /// The retained message of `topic` was cleared.
    Unretain {
        topic: String,
    },
    /// The newest command-store seq routed into session `id` (written with its `Session`
    /// event; a `Msg` whose seq has [`DOWNLINK_SEQ`] set moves it too).
    Downlink {
        id: String,
        through: u64,
    },
}

/// Set in a `Msg` event's seq when the message came from the command store (the downlinks),
/// whose seqs are counted apart from the main queue's.
pub const DOWNLINK_SEQ: u64 = 1 << 63;

/// A [`Message`] as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub payload_format: Option<u8>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    /// The session's matching subscriptions' identifiers (absent in older events: none).
    #[serde(default)]
    pub subscription_ids: Vec<u32>,
    /// MQTT 5 deadline, microseconds since the Unix epoch: absolute, so that it holds across a
    /// restart (absent in older events: none).
    #[serde(default)]
    pub expires_at_us: Option<u64>,
    /// A command from a downlink (absent in older events: no).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub command: bool,
    /// The downlink a command came from (`downlink:NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl StoredMessage {
    pub fn of(m: &Message) -> StoredMessage {
        StoredMessage {
            topic: m.topic.to_string(),
            payload: m.payload.to_vec(),
            retain: m.retain,
            user_properties: m.user_properties.clone(),
            content_type: m.content_type.clone(),
            payload_format: m.payload_format,
            response_topic: m.response_topic.clone(),
            correlation_data: m.correlation_data.as_ref().map(|b| b.to_vec()),
            subscription_ids: m.subscription_ids.clone(),
            expires_at_us: m.expires_at.map(crate::queue::micros_since_epoch),
            command: m.command.is_some(),
            origin: m.command.as_deref().map(String::from),
        }
    }

    pub fn into_message(self) -> Message {
        Message {
            topic: self.topic.into(),
            payload: Bytes::from(self.payload),
            retain: self.retain,
            user_properties: self.user_properties,
            content_type: self.content_type,
            payload_format: self.payload_format,
            response_topic: self.response_topic,
            correlation_data: self.correlation_data.map(Bytes::from),
            subscription_ids: self.subscription_ids,
            expires_at: self
                .expires_at_us
                .map(|us| SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(us)),
            command: match (self.command, self.origin) {
                (true, Some(o)) => Some(o.into()),
                (true, None) => Some("downlink".into()),
                (false, _) => None,
            },
        }
    }
}

/// A persistent session as recovered from the store.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub expiry_secs: u32,
    /// The newest main-queue seq routed into this session: the router skips records up to it.
    pub routed_through: u64,
    /// The same for the command store (the downlink router).
    pub downlink_through: u64,
    /// The identity it belongs to (see `Event::Session`).
    pub owner: Option<String>,
    pub subs: BTreeMap<String, SubOptions>,
    /// By packet id, with the order they were queued in: (order, qos, message, released).
    pub msgs: BTreeMap<u16, (u64, u8, Message, bool)>,
}

impl StoredSession {
    /// Messages in the order they were queued.
    pub fn msgs_in_order(&self) -> Vec<(u16, u8, Message, bool)> {
        let mut v: Vec<_> = self
            .msgs
            .iter()
            .map(|(pkid, (order, qos, m, rel))| (*order, *pkid, *qos, m.clone(), *rel))
            .collect();
        v.sort_by_key(|x| x.0);
        v.into_iter().map(|(_, p, q, m, r)| (p, q, m, r)).collect()
    }
}

/// What the store holds: persistent sessions and retained messages.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub sessions: BTreeMap<String, StoredSession>,
    /// Topic to (QoS, message).
    pub retained: BTreeMap<String, (u8, Message)>,
    /// Events replayed so far (orders the messages of each session across batches).
    order: u64,
}

/// Applies `events` in order (recovery, and the tests' model).
pub fn replay(state: &mut Recovered, events: impl IntoIterator<Item = Event>) {
    let sessions = &mut state.sessions;
    for e in events {
        state.order += 1;
        let order = state.order;
        match e {
            Event::Session {
                id,
                expiry_secs,
                routed_through,
                owner,
            } => {
                let s = sessions.entry(id).or_default();
                s.expiry_secs = expiry_secs;
                s.owner = owner;
                s.routed_through = s.routed_through.max(routed_through);
            }
            Event::End { id } => {
                sessions.remove(&id);
            }
            Event::Sub {
                id,
                filter,
                qos,
                no_local,
                retain_as_published,
                sub_id,
            } => {
                if let Some(s) = sessions.get_mut(&id) {
                    s.subs.insert(
                        filter,
                        SubOptions {
                            qos,
                            no_local,
                            retain_as_published,
                            id: sub_id,
                        },
                    );
                }
            }
            Event::Unsub { id, filter } => {
                if let Some(s) = sessions.get_mut(&id) {
                    s.subs.remove(&filter);
                }
            }
            Event::Msg {
                id,
                seq,
                qos,
                pkid,
                message,
            } => {
                if let Some(s) = sessions.get_mut(&id) {
                    if seq & DOWNLINK_SEQ != 0 {
                        s.downlink_through = s.downlink_through.max(seq & !DOWNLINK_SEQ);
                    } else {
                        s.routed_through = s.routed_through.max(seq);
                    }
                    // A packet id still held is a snapshot restating the message (a new message
                    // gets an id only after the old one's `Done`, written before it). Replayed
                    // over the old events, which happens when the gateway stopped before the
                    // whole snapshot was durable, it keeps the message's place and stage: taking
                    // the snapshot's place would move it behind messages the cut-off rest of the
                    // snapshot did not restate (delivered out of order), and a `Rec` cut off after
                    // it would send the PUBLISH again instead of PUBREL (a QoS 2 duplicate).
                    let (order, released) = s
                        .msgs
                        .get(&pkid)
                        .map_or((order, false), |(o, _, _, r)| (*o, *r));
                    s.msgs
                        .insert(pkid, (order, qos, message.into_message(), released));
                }
            }
            Event::Rec { id, pkid } => {
                if let Some((_, _, _, rel)) =
                    sessions.get_mut(&id).and_then(|s| s.msgs.get_mut(&pkid))
                {
                    *rel = true;
                }
            }
            Event::Done { id, pkid } => {
                if let Some(s) = sessions.get_mut(&id) {
                    s.msgs.remove(&pkid);
                }
            }
            Event::Retain {
                topic,
                qos,
                message,
            } => {
                state.retained.insert(topic, (qos, message.into_message()));
            }
            Event::Unretain { topic } => {
                state.retained.remove(&topic);
            }
            Event::Downlink { id, through } => {
                if let Some(s) = sessions.get_mut(&id) {
                    s.downlink_through = s.downlink_through.max(through);
                }
            }
        }
    }
}

/// Why the session store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("its opening task ended early")]
    Closed,
    #[error("session store in {dir}: {source}")]
    Queue {
        dir: String,
        #[source]
        source: QueueError,
    },
}

/// The store: append events, replay them at open, compact.
pub struct Store {
    queue: Queue,
    /// Events appended since the last snapshot (to decide when to compact).
    since_snapshot: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store in `dir` and replays it. `max_bytes` bounds its disk use.
    pub fn open(
        dir: &Path,
        fsync: FsyncPolicy,
        max_bytes: u64,
    ) -> Result<(Store, Recovered), StoreError> {
        let err = |source| StoreError::Queue {
            dir: dir.display().to_string(),
            source,
        };
        let mut opts = QueueOptions::new(dir);
        opts.fsync = fsync;
        opts.segment_bytes = 4 << 20;
        opts.max_bytes = max_bytes.max(8 * opts.segment_bytes);
        let (queue, report) = Queue::open(opts).map_err(err)?;
        if report.quarantined_records > 0 {
            tracing::warn!(
                records = report.quarantined_records,
                "session store: damaged events were quarantined; the sessions they belonged to may miss a subscription or a message"
            );
        }
        let mut reader = queue.reader(REPLAY_CURSOR).map_err(err)?;
        let mut state = Recovered::default();
        let mut events = 0u64;
        loop {
            let batch = reader.read_now(4096, 16 << 20).map_err(err)?;
            if batch.is_empty() {
                break;
            }
            let decoded = decode(&batch);
            events += decoded.len() as u64;
            replay(&mut state, decoded);
        }
        Ok((
            Store {
                queue,
                since_snapshot: events.into(),
            },
            state,
        ))
    }

    /// What the store in `dir` holds, read without its lock and without writing (the
    /// operator's `gateway sessions list | inspect`): what a start would recover now. A running
    /// gateway may be appending meanwhile; events it has not written yet are not seen.
    pub fn read_only(dir: &Path) -> Result<Recovered, StoreError> {
        let err = |source| StoreError::Queue {
            dir: dir.display().to_string(),
            source,
        };
        let inspector = Inspector::open(dir).map_err(err)?;
        let mut from = inspector
            .stats()
            .cursors
            .iter()
            .find(|c| c.name == REPLAY_CURSOR)
            .map_or(0, |c| c.acked + 1);
        let mut state = Recovered::default();
        loop {
            let batch = inspector.records(from, 4096).map_err(err)?;
            let Some(last) = batch.last() else {
                break;
            };
            from = last.seq + 1;
            replay(&mut state, decode(&batch));
        }
        Ok(state)
    }

    /// Appends `event` (its durability is the returned append's); `None` when it could not be
    /// appended (logged: a full or failing disk).
    pub fn append(&self, event: &Event) -> Option<PendingAppend> {
        let mut payload = Vec::with_capacity(128);
        if let Err(error) = ciborium::into_writer(event, &mut payload) {
            tracing::error!(%error, "session store: could not encode an event");
            return None;
        }
        let id = match event {
            Event::Session { id, .. }
            | Event::End { id }
            | Event::Sub { id, .. }
            | Event::Unsub { id, .. }
            | Event::Msg { id, .. }
            | Event::Rec { id, .. }
            | Event::Done { id, .. }
            | Event::Downlink { id, .. } => id.as_str(),
            Event::Retain { .. } | Event::Unretain { .. } => "",
        };
        let rec = NewRecord {
            received_at: SystemTime::now(),
            device_id: id,
            username: None,
            topic: "session",
            qos: 1,
            retain: false,
            user_properties: &[],
            content_type: None,
            payload_format: None,
            message_expiry: None,
            response_topic: None,
            correlation_data: None,
            payload: &payload,
        };
        match self.queue.try_append(&rec) {
            Ok(p) => {
                self.since_snapshot
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Some(p)
            }
            Err(error) => {
                tracing::warn!(%error, "session store: could not append an event");
                None
            }
        }
    }

    /// Events appended since the last snapshot.
    pub fn since_snapshot(&self) -> u64 {
        self.since_snapshot
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// After a snapshot starting at `first_seq` is durable: replay starts there from now on,
    /// and what came before is freed.
    pub async fn snapshot_done(&self, first_seq: u64, events: u64) -> Result<(), QueueError> {
        let q = self.queue.clone();
        let mut reader = tokio::task::spawn_blocking(move || q.reader(REPLAY_CURSOR))
            .await
            .map_err(|_| QueueError::Closed)??;
        reader.ack_through(first_seq.saturating_sub(1)).await?;
        self.since_snapshot
            .store(events, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    pub fn close(&self) {
        self.queue.close();
    }
}

/// The events of `records`; one that does not decode is skipped (logged).
fn decode(records: &[Record]) -> Vec<Event> {
    records
        .iter()
        .filter_map(|r| match ciborium::from_reader::<Event, _>(&r.payload[..]) {
            Ok(e) => Some(e),
            Err(error) => {
                tracing::warn!(seq = r.seq, %error, "session store: an event that does not decode is skipped");
                None
            }
        })
        .collect()
}

/// A shared store handle, or none (no persistent sessions are kept: tests of live delivery).
pub type SharedStore = Option<Arc<Store>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(t: &str) -> StoredMessage {
        StoredMessage {
            topic: t.into(),
            payload: b"p".to_vec(),
            retain: false,
            user_properties: vec![("k".into(), "v".into())],
            content_type: None,
            payload_format: None,
            response_topic: Some("r".into()),
            correlation_data: Some(b"c".to_vec()),
            subscription_ids: vec![3],
            expires_at_us: Some(1_700_000_000_123_456),
            command: false,
            origin: None,
        }
    }

    #[test]
    fn replay_rebuilds_subscriptions_messages_and_their_stage() {
        let id = || "d1".to_string();
        let events = vec![
            Event::Session {
                id: id(),
                expiry_secs: 60,
                routed_through: 0,
                owner: None,
            },
            Event::Sub {
                id: id(),
                filter: "a/#".into(),
                qos: 2,
                no_local: false,
                retain_as_published: true,
                sub_id: Some(7),
            },
            Event::Sub {
                id: id(),
                filter: "b".into(),
                qos: 1,
                no_local: false,
                retain_as_published: false,
                sub_id: None,
            },
            Event::Unsub {
                id: id(),
                filter: "b".into(),
            },
            Event::Msg {
                id: id(),
                seq: 7,
                qos: 2,
                pkid: 5,
                message: msg("a/1"),
            },
            Event::Msg {
                id: id(),
                seq: 9,
                qos: 1,
                pkid: 3,
                message: msg("a/2"),
            },
            Event::Msg {
                id: id(),
                seq: 11,
                qos: 1,
                pkid: 4,
                message: msg("a/3"),
            },
            Event::Rec { id: id(), pkid: 5 },
            Event::Done { id: id(), pkid: 4 },
            // Events for a session that was never started (or has ended) change nothing.
            Event::Sub {
                id: "gone".into(),
                filter: "x".into(),
                qos: 0,
                no_local: false,
                retain_as_published: false,
                sub_id: None,
            },
        ];
        let mut state = Recovered::default();
        replay(&mut state, events);
        let s = &state.sessions;
        let d1 = &s["d1"];
        assert_eq!(s.len(), 1);
        assert_eq!((d1.expiry_secs, d1.routed_through), (60, 11));
        assert_eq!(d1.subs.keys().collect::<Vec<_>>(), ["a/#"]);
        let msgs: Vec<_> = d1
            .msgs_in_order()
            .into_iter()
            .map(|(p, q, m, r)| (p, q, m.topic.to_string(), r))
            .collect();
        assert_eq!(
            msgs,
            [
                (5, 2, "a/1".to_string(), true),
                (3, 1, "a/2".to_string(), false)
            ]
        );
        replay(&mut state, [Event::End { id: id() }]);
        assert!(state.sessions.is_empty());
        replay(
            &mut state,
            [
                Event::Retain {
                    topic: "a/b".into(),
                    qos: 1,
                    message: msg("a/b"),
                },
                Event::Retain {
                    topic: "a/c".into(),
                    qos: 0,
                    message: msg("a/c"),
                },
                Event::Unretain {
                    topic: "a/b".into(),
                },
            ],
        );
        assert_eq!(state.retained.keys().collect::<Vec<_>>(), ["a/c"]);
    }

    /// Events as written before subscription identifiers (and message deadlines) were kept.
    #[derive(Serialize)]
    enum OldEvent {
        Sub {
            id: String,
            filter: String,
            qos: u8,
            no_local: bool,
            retain_as_published: bool,
        },
        Msg {
            id: String,
            seq: u64,
            qos: u8,
            pkid: u16,
            message: OldMessage,
        },
    }

    #[derive(Serialize)]
    struct OldMessage {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        user_properties: Vec<(String, String)>,
        content_type: Option<String>,
        payload_format: Option<u8>,
        response_topic: Option<String>,
        correlation_data: Option<Vec<u8>>,
    }

    fn roundtrip_old(old: &OldEvent) -> Event {
        let mut b = Vec::new();
        ciborium::into_writer(old, &mut b).expect("encodes");
        ciborium::from_reader::<Event, _>(&b[..]).expect("an old event still decodes")
    }

    #[test]
    fn events_written_before_the_new_fields_read_as_none() {
        let e = roundtrip_old(&OldEvent::Sub {
            id: "d1".into(),
            filter: "a/#".into(),
            qos: 1,
            no_local: false,
            retain_as_published: true,
        });
        assert_eq!(
            e,
            Event::Sub {
                id: "d1".into(),
                filter: "a/#".into(),
                qos: 1,
                no_local: false,
                retain_as_published: true,
                sub_id: None,
            }
        );
        let e = roundtrip_old(&OldEvent::Msg {
            id: "d1".into(),
            seq: 3,
            qos: 1,
            pkid: 2,
            message: OldMessage {
                topic: "t".into(),
                payload: b"p".to_vec(),
                retain: false,
                user_properties: vec![],
                content_type: None,
                payload_format: None,
                response_topic: None,
                correlation_data: None,
            },
        });
        let Event::Msg { message, .. } = e else {
            panic!("not a Msg: {e:?}")
        };
        assert!(message.subscription_ids.is_empty());
        assert_eq!(message.expires_at_us, None);
    }

    /// A kill before a whole snapshot is durable: the next start replays the old events and
    /// then the part of the snapshot that made it. The messages keep their order and stage.
    #[test]
    fn a_snapshot_cut_off_halfway_keeps_the_order_and_stage_of_messages() {
        let id = || "d1".to_string();
        let m = |pkid: u16, qos: u8| Event::Msg {
            id: id(),
            seq: 0,
            qos,
            pkid,
            message: msg(&format!("a/{pkid}")),
        };
        let session = Event::Session {
            id: id(),
            expiry_secs: 60,
            routed_through: 30,
            owner: None,
        };
        // Before the snapshot: 1 (QoS 2, PUBREC came), 2, 3, 4, queued in that order.
        let mut old = vec![session.clone(), m(1, 2), m(2, 1), m(3, 1), m(4, 1)];
        old.push(Event::Rec { id: id(), pkid: 1 });
        // The snapshot restates all four; the kill leaves its first two Msg events, without
        // the Rec that follows message 1 in it.
        let partial = vec![session, m(1, 2), m(2, 1)];
        let mut state = Recovered::default();
        replay(&mut state, old.into_iter().chain(partial));
        let got: Vec<_> = state.sessions["d1"]
            .msgs_in_order()
            .into_iter()
            .map(|(p, _, _, r)| (p, r))
            .collect();
        assert_eq!(got, [(1, true), (2, false), (3, false), (4, false)]);
    }

    #[test]
    fn events_survive_a_reopen_and_a_snapshot_frees_what_came_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (store, s) = Store::open(dir.path(), FsyncPolicy::Always, 64 << 20).expect("open");
            assert!(s.sessions.is_empty());
            let start = Event::Session {
                id: "d1".into(),
                expiry_secs: 5,
                routed_through: 0,
                owner: None,
            };
            let _ = store.append(&start).expect("append");
            let p = store
                .append(&Event::Msg {
                    id: "d1".into(),
                    seq: 3,
                    qos: 1,
                    pkid: 1,
                    message: msg("t"),
                })
                .expect("append");
            p.durable().await.expect("durable");
            store.close();
            drop(store);
            let (store, s) =
                Store::open(dir.path(), FsyncPolicy::Always, 64 << 20).expect("reopen");
            assert_eq!(s.sessions["d1"].msgs.len(), 1);
            // A snapshot: the live state again, then replay starts there.
            let first = store
                .append(&Event::Session {
                    id: "d1".into(),
                    expiry_secs: 5,
                    routed_through: 3,
                    owner: None,
                })
                .expect("append");
            let first_seq = first.seq();
            first.durable().await.expect("durable");
            store.snapshot_done(first_seq, 1).await.expect("snapshot");
            store.close();
            drop(store);
            // The operator's read-only view starts at the same place.
            let seen = Store::read_only(dir.path()).expect("read only");
            let (store, s) =
                Store::open(dir.path(), FsyncPolicy::Always, 64 << 20).expect("reopen");
            assert_eq!(s.sessions["d1"].routed_through, 3);
            assert!(
                s.sessions["d1"].msgs.is_empty(),
                "the message was before the snapshot"
            );
            assert_eq!(seen.sessions, s.sessions);
            // And it reads while the store is open, without disturbing it.
            let p = store
                .append(&Event::End { id: "d1".into() })
                .expect("append");
            p.durable().await.expect("durable");
            assert!(Store::read_only(dir.path())
                .expect("read only while open")
                .sessions
                .is_empty());
            store.close();
        });
    }
}
