//! The live sessions of connected subscribers: who is subscribed to what ([`FilterIndex`]) and
//! each session's [`Outbox`]. The router calls [`Sessions::route`] with records read from the
//! queue; connections attach, subscribe, take what their outbox holds and feed acks back.
//!
//! Locking: one mutex over the index and the session map, taken once per routed batch and per
//! SUBSCRIBE/UNSUBSCRIBE; each outbox has its own mutex, taken by the router to push and by the
//! connection to send and ack. Nothing here waits on a socket, so a stuck subscriber holds up
//! nobody: its outbox fills to its bound and what does not fit is dropped and counted.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::Notify;

use super::index::FilterIndex;
use super::outbox::{Message, Outbox};
use super::store::{Event, Store, StoredMessage, DOWNLINK_SEQ};
use crate::queue::{PendingAppend, Record};

/// Bounds of sessions (from `[sessions]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionBounds {
    /// QoS 1/2 publishes in flight to a subscriber at once (capped by its receive maximum).
    pub max_inflight: u16,
    pub max_queued_messages: usize,
    pub max_queued_bytes: usize,
    /// Bytes queued in all sessions together.
    pub max_bytes: usize,
    /// Sessions kept at once.
    pub max_sessions: usize,
    /// Retained messages kept, by count and by bytes (topic + payload + 32 each, plus a response topic and correlation data).
    pub max_retained_messages: usize,
    pub max_retained_bytes: usize,
}

impl Default for SessionBounds {
    fn default() -> Self {
        SessionBounds {
            max_inflight: 32,
            max_queued_messages: 1000,
            max_queued_bytes: 1 << 20,
            max_bytes: 64 << 20,
            max_sessions: 100_000,
            max_retained_messages: 10_000,
            max_retained_bytes: 16 << 20,
        }
    }
}

impl SessionBounds {
    pub fn from_config(c: &crate::config::SessionsConfig) -> SessionBounds {
        SessionBounds {
            max_inflight: c.max_inflight,
            max_queued_messages: c.max_queued_messages,
            max_queued_bytes: usize::try_from(c.max_queued_bytes).unwrap_or(usize::MAX),
            max_bytes: usize::try_from(c.max_bytes).unwrap_or(usize::MAX),
            max_sessions: c.max_sessions,
            max_retained_messages: c.max_retained_messages,
            max_retained_bytes: usize::try_from(c.max_retained_bytes).unwrap_or(usize::MAX),
        }
    }
}

/// The options a subscription was granted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// MQTT 5 Subscription Identifier (1..=268,435,455), sent with what this subscription
    /// delivers.
    pub id: Option<u32>,
}

/// One client's session: its outbox, kept while the client is connected and, for a persistent
/// session, until it expires.
#[derive(Debug)]
pub struct Slot {
    pub client_id: Arc<str>,
    outbox: Mutex<Outbox>,
    /// Notified when the outbox has something to send (or room in flight again).
    pub wake: Notify,
    /// The registration id of the connection that owns the session; 0 while offline.
    owner: AtomicU64,
    /// The identity the session belongs to (`Identity::owner`): no other may resume it, end it
    /// with a clean start or take its connection over. `None`: stored before identities were
    /// recorded, or attached without one (tests).
    identity: Mutex<Option<Arc<str>>>,
    life: Mutex<Life>,
    /// Bytes and messages queued in every session together (shared with [`Sessions`]).
    total_bytes: Arc<AtomicUsize>,
    total_messages: Arc<AtomicUsize>,
    /// The delivery counters (shared with [`Sessions`]): sends are counted here.
    stats: Arc<DeliveryStats>,
    /// The newest main-queue seq routed into this session (a restarted router skips up to it).
    routed_through: AtomicU64,
    /// The same for the command store's seqs (the downlink router).
    downlink_through: AtomicU64,
    /// Where its events go while the session outlives its connection.
    store: Option<Arc<Store>>,
    /// Commands that expired in the outbox, for the downlink router's dead letters (shared
    /// with [`Sessions`]).
    expired_commands: ExpiredCommands,
}

#[derive(Debug, Clone, Copy)]
struct Life {
    /// Seconds the session outlives its connection (0: it ends with it).
    expiry_secs: u32,
    offline_since: Option<Instant>,
}

impl Slot {
    /// Runs `f` on the outbox, keeping the all-sessions byte and message counts and the
    /// send counters in step.
    pub fn with_outbox<R>(&self, f: impl FnOnce(&mut Outbox) -> R) -> R {
        let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        let (bytes, len, counts) = (outbox.bytes(), outbox.len(), outbox.counts());
        let r = f(&mut outbox);
        follow(&self.total_bytes, bytes, outbox.bytes());
        follow(&self.total_messages, len, outbox.len());
        // An ended session's outbox is replaced (its counts start again): no sends then.
        let expired = outbox.take_expired();
        if !expired.is_empty() {
            // Under the outbox's lock, so that the Done is stored before the packet id can be
            // given to another message.
            if let Some(st) = self.stored() {
                for pkid in expired {
                    st.append(&Event::Done {
                        id: self.client_id.to_string(),
                        pkid,
                    });
                }
            }
        }
        let commands = outbox.take_expired_commands();
        if !commands.is_empty() {
            let mut dead = self
                .expired_commands
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            dead.extend(commands.into_iter().map(|m| (self.client_id.clone(), m)));
        }
        let after = outbox.counts();
        if after.commands_done > counts.commands_done {
            self.stats.commands_done.fetch_add(
                after.commands_done - counts.commands_done,
                Ordering::Relaxed,
            );
            let mut by = self
                .stats
                .commands_done_by
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for origin in outbox.take_done_commands() {
                *by.entry(origin.to_string()).or_default() += 1;
            }
        }
        if after.expired > counts.expired {
            self.stats
                .messages_expired
                .fetch_add(after.expired - counts.expired, Ordering::Relaxed);
        }
        if after.sent > counts.sent {
            self.stats
                .delivered
                .fetch_add(after.sent - counts.sent, Ordering::Relaxed);
        }
        if after.resent > counts.resent {
            self.stats
                .resent
                .fetch_add(after.resent - counts.resent, Ordering::Relaxed);
        }
        r
    }

    /// Whether the connection registered as `owner` owns the session (a connection that was
    /// taken over, or whose session was replaced, no longer does).
    pub fn owned_by(&self, owner: u64) -> bool {
        owner != 0 && self.owner.load(Ordering::Acquire) == owner
    }

    /// The identity the session belongs to (see the field).
    pub fn identity(&self) -> Option<Arc<str>> {
        self.identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn online(&self) -> bool {
        self.owner.load(Ordering::Acquire) != 0
    }

    fn life(&self) -> MutexGuard<'_, Life> {
        self.life.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store, while this session is kept beyond its connection.
    fn stored(&self) -> Option<&Store> {
        let store = self.store.as_deref()?;
        (self.life().expiry_secs > 0).then_some(store)
    }

    /// A PUBACK (QoS 1) or PUBCOMP (QoS 2) for `pkid`: the message is done.
    pub fn on_done(&self, pkid: u16, qos2: bool) -> Result<(), super::outbox::UnknownPacketId> {
        let store = self.stored();
        self.with_outbox(|o| {
            if qos2 {
                o.on_pubcomp(pkid)?;
            } else {
                o.on_puback(pkid)?;
            }
            if let Some(st) = store {
                st.append(&Event::Done {
                    id: self.client_id.to_string(),
                    pkid,
                });
            }
            Ok(())
        })
    }

    /// The session store is durable through `seq`: the messages held until their events were
    /// stored may be sent, and the session's writer is woken for them. (The router wakes only
    /// the sessions that were online when it routed; one that came back meanwhile had already
    /// looked, found them held, and would wait for the next message.)
    pub fn stored_through(&self, seq: u64) {
        self.with_outbox(|o| o.stored_through(seq));
        self.wake.notify_one();
    }

    /// A PUBREC for `pkid`: the PUBREL to send, once the returned append (if any) is durable.
    pub fn on_pubrec(
        &self,
        pkid: u16,
    ) -> Result<(super::outbox::Send, Option<PendingAppend>), super::outbox::UnknownPacketId> {
        let store = self.stored();
        self.with_outbox(|o| {
            let rel = o.on_pubrec(pkid)?;
            let pending = store.and_then(|st| {
                st.append(&Event::Rec {
                    id: self.client_id.to_string(),
                    pkid,
                })
            });
            Ok((rel, pending))
        })
    }
}

/// Moves `total` by the change of one part of it from `before` to `after`.
fn follow(total: &AtomicUsize, before: usize, after: usize) {
    if after > before {
        total.fetch_add(after - before, Ordering::AcqRel);
    } else if before > after {
        total.fetch_sub(before - after, Ordering::AcqRel);
    }
}

/// What [`Sessions::route`] leaves to do once its stored messages are durable.
#[must_use]
#[derive(Default)]
pub struct Routed {
    pub last_append: Option<PendingAppend>,
    pub wake: Vec<Arc<Slot>>,
    /// Sessions (online or not) holding new messages until `last_append` is durable: call
    /// [`Slot::stored_through`] with its seq then.
    pub held: Vec<Arc<Slot>>,
}

impl Routed {
    pub fn merge(&mut self, other: Routed) {
        if other.last_append.is_some() {
            self.last_append = other.last_append;
        }
        for s in other.wake {
            if !self.wake.iter().any(|w| Arc::ptr_eq(w, &s)) {
                self.wake.push(s);
            }
        }
        for s in other.held {
            if !self.held.iter().any(|w| Arc::ptr_eq(w, &s)) {
                self.held.push(s);
            }
        }
    }
}

/// Commands that expired in outboxes, with their sessions' client ids.
type ExpiredCommands = Arc<Mutex<Vec<(Arc<str>, Arc<Message>)>>>;

/// Where a record comes from: the main queue (devices' publishes) or the command store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Queue,
    /// A command. `retry`: it matched no session before (held), so no session has it and the
    /// check against each session's `downlink_through` is skipped.
    Command {
        retry: bool,
    },
}

/// What became of one command ([`Sessions::route_command`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandOutcome {
    /// In every matching session's outbox (or already there before a restart).
    Routed,
    /// No session subscribes to its topic.
    Unmatched,
    /// A matching session's bound (or the all-sessions bound) is full: the sessions before it
    /// have it; route it again later.
    Blocked,
    /// Its expiry had passed.
    Expired,
    /// Larger than a matching session's bound even when empty: it can never be delivered
    /// there (the sessions before it have it).
    TooLarge,
}

/// What pushing a message into one session's outbox did.
enum Push {
    Pushed,
    /// Full (a publish: counted by the outbox).
    Refused,
    /// A command larger than the session's bound even when empty.
    TooLarge,
    /// A command the session's bound (or the all-sessions bound) has no room for now.
    Blocked,
}

/// Counters of local delivery (exact; exported as metrics).
#[derive(Debug, Default)]
pub struct DeliveryStats {
    /// Records the router read from the queue while someone was subscribed.
    pub routed: AtomicU64,
    /// Messages routed to a session (one per matching session), the dropped ones included.
    pub matched: AtomicU64,
    /// PUBLISH packets handed to a subscriber's connection from its outbox (QoS 0 included; a
    /// message restored after a restart is counted when sent again).
    pub delivered: AtomicU64,
    /// PUBLISH (with DUP) and PUBREL packets sent again to a resumed session.
    pub resent: AtomicU64,
    /// QoS 0 messages dropped: full sessions, offline sessions, a disconnect.
    pub dropped_qos0: AtomicU64,
    /// QoS 1/2 messages refused by full sessions (or the all-sessions bound).
    pub refused_full: AtomicU64,
    /// Messages still in a session's outbox when the session ended (clean start, expiry, or
    /// the `max_sessions` bound).
    pub discarded: AtomicU64,
    /// Sessions ended by their expiry, or early by the `max_sessions` bound.
    pub expired: AtomicU64,
    pub evicted: AtomicU64,
    /// Retained messages refused by the `max_retained_*` bounds (a new topic when full).
    pub retained_refused: AtomicU64,
    /// Messages not sent because their MQTT 5 message expiry passed first (routed after it,
    /// or waiting in a session's outbox).
    pub messages_expired: AtomicU64,
    /// Retained messages sent to new subscriptions.
    pub retained_sent: AtomicU64,
    /// Queue records the router could not read and skipped, by sequence numbers (an upper
    /// bound of records: seqs may have gaps). Their messages reached no subscriber.
    pub router_skipped: AtomicU64,
    /// Commands (from downlinks) their devices acknowledged.
    pub commands_done: AtomicU64,
    /// The same by downlink (`downlink:NAME`).
    pub commands_done_by: Mutex<HashMap<String, u64>>,
}

#[derive(Default)]
struct Inner {
    index: FilterIndex<Arc<str>, SubOptions>,
    slots: HashMap<Arc<str>, Arc<Slot>>,
    /// Each session's filters, to remove them when it ends.
    filters: HashMap<Arc<str>, Vec<String>>,
    /// Retained messages by topic, with the QoS they were published with.
    retained: BTreeMap<String, (u8, Arc<Message>)>,
    retained_bytes: usize,
}

/// Every session; shared by the connections and the router.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
    subscriptions: AtomicUsize,
    bounds: Mutex<SessionBounds>,
    total_bytes: Arc<AtomicUsize>,
    total_messages: Arc<AtomicUsize>,
    store: Option<Arc<Store>>,
    /// The newest queue seq of a retained publish (the router reads up to it even when nobody
    /// subscribes, to keep the retained messages).
    retained_upto: AtomicU64,
    /// The newest queue seq the router has routed: a subscription made just after a retained
    /// publish was acknowledged waits (briefly) for the router to keep it before its retained
    /// messages go.
    routed_upto: tokio::sync::watch::Sender<u64>,
    pub stats: Arc<DeliveryStats>,
    /// Notified when a subscription is made (the downlink router retries the commands it
    /// holds for a device that subscribes later).
    pub subscribed: Notify,
    expired_commands: ExpiredCommands,
}

impl Sessions {
    /// Sessions kept in memory only (none survives a restart).
    pub fn new(bounds: SessionBounds) -> Sessions {
        Sessions {
            bounds: Mutex::new(bounds),
            ..Sessions::default()
        }
    }

    /// Sessions whose persistent ones are kept in `store`, starting with the ones it recovered
    /// (offline, their expiry counted from now).
    pub fn with_store(
        bounds: SessionBounds,
        store: Arc<Store>,
        recovered: super::store::Recovered,
    ) -> Sessions {
        let sessions = Sessions {
            bounds: Mutex::new(bounds),
            store: Some(store),
            ..Sessions::default()
        };
        {
            let mut inner = sessions.lock();
            let now = Instant::now();
            for (topic, (qos, m)) in recovered.retained {
                inner.retained_bytes += m.cost();
                inner.retained.insert(topic, (qos, Arc::new(m)));
            }
            for (id, st) in recovered.sessions {
                let slot = sessions.new_slot(&id, 0, st.expiry_secs, bounds.max_inflight, &bounds);
                slot.life().offline_since = Some(now);
                *slot.identity.lock().unwrap_or_else(|e| e.into_inner()) =
                    st.owner.as_deref().map(Arc::from);
                slot.routed_through
                    .store(st.routed_through, Ordering::Release);
                slot.downlink_through
                    .store(st.downlink_through, Ordering::Release);
                slot.with_outbox(|o| {
                    for (pkid, qos, m, released) in st.msgs_in_order() {
                        o.restore(Arc::new(m), qos, pkid, released);
                    }
                });
                for (filter, options) in st.subs {
                    if inner
                        .index
                        .insert(&filter, slot.client_id.clone(), options)
                        .is_none()
                    {
                        sessions.subscriptions.fetch_add(1, Ordering::AcqRel);
                        inner
                            .filters
                            .entry(slot.client_id.clone())
                            .or_default()
                            .push(filter);
                    }
                }
                inner.slots.insert(slot.client_id.clone(), slot);
            }
        }
        sessions
    }

    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    fn new_slot(
        &self,
        client_id: &str,
        owner: u64,
        expiry_secs: u32,
        rmax: u16,
        b: &SessionBounds,
    ) -> Arc<Slot> {
        Arc::new(Slot {
            client_id: client_id.into(),
            outbox: Mutex::new(Outbox::new(rmax, b.max_queued_messages, b.max_queued_bytes)),
            wake: Notify::new(),
            owner: AtomicU64::new(owner),
            identity: Mutex::new(None),
            life: Mutex::new(Life {
                expiry_secs,
                offline_since: None,
            }),
            total_bytes: self.total_bytes.clone(),
            total_messages: self.total_messages.clone(),
            stats: self.stats.clone(),
            routed_through: AtomicU64::new(0),
            downlink_through: AtomicU64::new(0),
            store: self.store.clone(),
            expired_commands: self.expired_commands.clone(),
        })
    }

    /// Writes every persistent session as events (a snapshot) and returns the first one's seq,
    /// the last append and how many, for [`Store::snapshot_done`] once the last is durable.
    pub fn snapshot(&self) -> Option<(u64, PendingAppend, u64)> {
        let store = self.store.as_ref()?;
        let inner = self.lock();
        let mut first = None;
        let mut last = None;
        let mut count = 0u64;
        let mut put = |e: Event| -> Option<()> {
            let p = store.append(&e)?;
            first.get_or_insert(p.seq());
            last = Some(p);
            count += 1;
            Some(())
        };
        for (topic, (qos, m)) in &inner.retained {
            put(Event::Retain {
                topic: topic.clone(),
                qos: *qos,
                message: StoredMessage::of(m),
            })?;
        }
        for slot in inner.slots.values() {
            Self::store_whole(&inner, slot, &mut put)?;
        }
        // No session is kept: one harmless event marks where replay starts.
        put(Event::End { id: String::new() })?;
        drop(inner);
        Some((first?, last?, count))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bounds(&self) -> SessionBounds {
        *self.bounds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bounds for sessions that start from now on, and the all-sessions bound at once (a
    /// reload).
    pub fn set_bounds(&self, bounds: SessionBounds) {
        *self.bounds.lock().unwrap_or_else(|e| e.into_inner()) = bounds;
    }

    /// Whether any session subscribes to anything (the router skips reading when none does).
    pub fn has_subscriptions(&self) -> bool {
        self.subscriptions.load(Ordering::Acquire) > 0
    }

    /// Sessions now: (connected, offline, subscriptions, queued bytes).
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let inner = self.lock();
        let online = inner.slots.values().filter(|s| s.online()).count();
        (
            online,
            inner.slots.len() - online,
            inner.index.len(),
            self.total_bytes.load(Ordering::Acquire),
        )
    }

    /// Messages queued in every session now (waiting and in flight).
    pub fn queued_messages(&self) -> usize {
        self.total_messages.load(Ordering::Acquire)
    }

    /// Starts the session of `client_id` for the connection registered as `owner`. With
    /// `clean_start` any stored session of that id ends and a new one starts; otherwise a stored
    /// one is resumed (its subscriptions and undelivered messages kept). Returns the session and
    /// whether one was resumed (CONNACK's session present). `receive_maximum`: the client's own.
    pub fn attach(
        &self,
        client_id: &str,
        owner: u64,
        clean_start: bool,
        expiry_secs: u32,
        receive_maximum: Option<u16>,
    ) -> (Arc<Slot>, bool) {
        self.attach_as(
            client_id,
            owner,
            None,
            clean_start,
            expiry_secs,
            receive_maximum,
        )
    }

    /// The identity (`Identity::owner`) that owns the session of `client_id`, if one is kept
    /// and says so. The connection checks it before [`Sessions::attach_as`]: a session is
    /// resumed, or ended by a clean start, only by the identity it belongs to.
    pub fn identity_of(&self, client_id: &str) -> Option<Arc<str>> {
        self.lock().slots.get(client_id).and_then(|s| s.identity())
    }

    /// [`Sessions::attach`] for `identity`, which the session then belongs to.
    pub fn attach_as(
        &self,
        client_id: &str,
        owner: u64,
        identity: Option<&str>,
        clean_start: bool,
        expiry_secs: u32,
        receive_maximum: Option<u16>,
    ) -> (Arc<Slot>, bool) {
        let b = self.bounds();
        let rmax = receive_maximum.map_or(b.max_inflight, |r| r.min(b.max_inflight));
        let mut inner = self.lock();
        if let Some(old) = inner.slots.get(client_id).cloned() {
            if !clean_start {
                old.owner.store(owner, Ordering::Release);
                let claimed = identity.is_some() && old.identity().as_deref() != identity;
                if claimed {
                    *old.identity.lock().unwrap_or_else(|e| e.into_inner()) =
                        identity.map(Arc::from);
                }
                let was = std::mem::replace(
                    &mut *old.life(),
                    Life {
                        expiry_secs,
                        offline_since: None,
                    },
                );
                if was.expiry_secs == 0 && expiry_secs > 0 {
                    // Kept from now on: store all of it, not just that it lives.
                    if let Some(store) = &self.store {
                        let _ =
                            Self::store_whole(&inner, &old, &mut |e| store.append(&e).map(|_| ()));
                    }
                } else if was.expiry_secs != expiry_secs || (claimed && expiry_secs > 0) {
                    self.record_session(&old, expiry_secs);
                }
                old.with_outbox(|o| o.set_receive_maximum(rmax));
                return (old, true);
            }
            self.end(&mut inner, &old);
        }
        if inner.slots.len() >= b.max_sessions {
            self.evict_oldest_offline(&mut inner);
        }
        let slot = self.new_slot(client_id, owner, expiry_secs, rmax, &b);
        *slot.identity.lock().unwrap_or_else(|e| e.into_inner()) = identity.map(Arc::from);
        if expiry_secs > 0 {
            self.record_session(&slot, expiry_secs);
        }
        inner.slots.insert(slot.client_id.clone(), slot.clone());
        (slot, false)
    }

    /// Writes `slot`'s whole session (if it outlives its connection) through `put`: the session,
    /// its subscriptions, its messages.
    fn store_whole(
        inner: &Inner,
        slot: &Slot,
        put: &mut impl FnMut(Event) -> Option<()>,
    ) -> Option<()> {
        let expiry_secs = slot.life().expiry_secs;
        if expiry_secs == 0 {
            return Some(());
        }
        let id = slot.client_id.to_string();
        put(Event::Session {
            id: id.clone(),
            expiry_secs,
            routed_through: slot.routed_through.load(Ordering::Acquire),
            owner: slot.identity().map(|o| o.to_string()),
        })?;
        let through = slot.downlink_through.load(Ordering::Acquire);
        if through > 0 {
            put(Event::Downlink {
                id: id.clone(),
                through,
            })?;
        }
        for f in inner.filters.get(&slot.client_id).into_iter().flatten() {
            let Some(o) = inner.index.get(f, &slot.client_id) else {
                continue;
            };
            put(Event::Sub {
                id: id.clone(),
                filter: f.clone(),
                qos: o.qos,
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                sub_id: o.id,
            })?;
        }
        // Under the outbox's lock: an ack made after this is written after these events.
        slot.with_outbox(|o| {
            for (m, qos, pkid, released) in o.held() {
                put(Event::Msg {
                    id: id.clone(),
                    seq: 0,
                    qos,
                    pkid,
                    message: StoredMessage::of(&m),
                })?;
                if released {
                    put(Event::Rec {
                        id: id.clone(),
                        pkid,
                    })?;
                }
            }
            Some(())
        })
    }

    /// Stores that `slot`'s session lives, with this expiry (0: it ends with its connection).
    fn record_session(&self, slot: &Slot, expiry_secs: u32) {
        if let Some(store) = &self.store {
            let id = slot.client_id.to_string();
            if expiry_secs == 0 {
                store.append(&Event::End { id });
            } else {
                store.append(&Event::Session {
                    id: id.clone(),
                    expiry_secs,
                    routed_through: slot.routed_through.load(Ordering::Acquire),
                    owner: slot.identity().map(|o| o.to_string()),
                });
                let through = slot.downlink_through.load(Ordering::Acquire);
                if through > 0 {
                    store.append(&Event::Downlink { id, through });
                }
            }
        }
    }

    /// The connection registered as `owner` ended. A session that outlives its connection
    /// stays (offline: QoS 0 messages are no longer queued for it, QoS 1/2 are, up to its
    /// bounds); one that does not ends. Nothing happens if another connection owns it now.
    pub fn detach(&self, slot: &Arc<Slot>, owner: u64) {
        let mut inner = self.lock();
        if !slot.owned_by(owner) {
            return;
        }
        slot.owner.store(0, Ordering::Release);
        let mut life = slot.life();
        if life.expiry_secs == 0 {
            drop(life);
            self.end(&mut inner, slot);
            return;
        }
        life.offline_since = Some(Instant::now());
        drop(life);
        drop(inner);
        let dropped = slot.with_outbox(|o| {
            let before = o.counts().dropped_qos0;
            o.on_disconnect();
            o.counts().dropped_qos0 - before
        });
        self.stats
            .dropped_qos0
            .fetch_add(dropped, Ordering::Relaxed);
    }

    /// Ends offline sessions whose expiry has passed at `now`; returns how many. Also drops
    /// the messages whose MQTT 5 expiry has passed at `wall`: queued ones (counted) and
    /// retained ones.
    pub fn sweep(&self, now: Instant, wall: SystemTime) -> usize {
        let mut inner = self.lock();
        let _ = self.drop_expired_retained(&mut inner, wall);
        for slot in inner.slots.values() {
            slot.with_outbox(|o| o.drop_expired(wall));
        }
        let expired: Vec<Arc<Slot>> = inner
            .slots
            .values()
            .filter(|s| {
                let life = s.life();
                life.offline_since.is_some_and(|t| {
                    now.saturating_duration_since(t).as_secs() >= u64::from(life.expiry_secs)
                })
            })
            .cloned()
            .collect();
        for s in &expired {
            self.end(&mut inner, s);
        }
        self.stats
            .expired
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        expired.len()
    }

    fn evict_oldest_offline(&self, inner: &mut Inner) {
        let oldest = inner
            .slots
            .values()
            .filter_map(|s| s.life().offline_since.map(|t| (t, s.clone())))
            .min_by_key(|(t, _)| *t)
            .map(|(_, s)| s);
        if let Some(s) = oldest {
            tracing::warn!(client_id = %s.client_id, "sessions.max_sessions reached: the session offline longest ends early");
            self.end(inner, &s);
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes `slot`'s session: its subscriptions and what its outbox held (counted).
    fn end(&self, inner: &mut Inner, slot: &Arc<Slot>) {
        if inner
            .slots
            .get(&slot.client_id)
            .is_some_and(|s| Arc::ptr_eq(s, slot))
        {
            inner.slots.remove(&slot.client_id);
        }
        // A connection still holding it (a clean start replaced it) stops sending from it.
        slot.owner.store(0, Ordering::Release);
        let mut life = slot.life();
        if life.expiry_secs > 0 {
            life.expiry_secs = 0;
            drop(life);
            if let Some(store) = &self.store {
                store.append(&Event::End {
                    id: slot.client_id.to_string(),
                });
            }
        } else {
            drop(life);
        }
        if let Some(filters) = inner.filters.remove(&slot.client_id) {
            for f in filters {
                if inner.index.remove(&f, &slot.client_id).is_some() {
                    self.subscriptions.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
        let left = slot.with_outbox(|o| {
            let left = o.len();
            *o = Outbox::new(1, 1, 0);
            left
        });
        self.stats
            .discarded
            .fetch_add(left as u64, Ordering::Relaxed);
    }

    /// The newest queue seq of a retained publish noted so far.
    pub fn retained_upto(&self) -> u64 {
        self.retained_upto.load(Ordering::Acquire)
    }

    /// Ingest appended a retained publish as record `seq`.
    pub fn note_retained(&self, seq: u64) {
        self.retained_upto.fetch_max(seq, Ordering::AcqRel);
    }

    /// The router has routed everything up to `seq`.
    pub fn note_routed(&self, seq: u64) {
        self.routed_upto.send_if_modified(|v| {
            let newer = seq > *v;
            if newer {
                *v = seq;
            }
            newer
        });
    }

    /// Waits until the router has kept every retained publish acknowledged so far, for at most
    /// `bound` (a router that lags longer delays retained messages no further: they go as
    /// they are then).
    pub async fn retained_settled(&self, bound: Duration) {
        let target = self.retained_upto();
        if target == 0 || *self.routed_upto.borrow() >= target {
            return;
        }
        let mut rx = self.routed_upto.subscribe();
        let _ = tokio::time::timeout(bound, rx.wait_for(|v| *v >= target)).await;
    }

    /// Retained messages now: (count, bytes).
    pub fn retained_counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.retained.len(), inner.retained_bytes)
    }

    /// Keeps (or, with an empty payload, clears) the retained message of `rec`'s topic, within
    /// the bounds; returns the store append.
    fn keep_retained(
        &self,
        inner: &mut Inner,
        rec: &Record,
        b: &SessionBounds,
    ) -> Option<PendingAppend> {
        if rec.payload.is_empty() {
            let (_, old) = inner.retained.remove(&rec.topic)?;
            inner.retained_bytes -= old.cost();
            return self.store.as_ref().and_then(|st| {
                st.append(&Event::Unretain {
                    topic: rec.topic.clone(),
                })
            });
        }
        let m = Message::from_record(rec.clone(), true);
        let old_cost = inner.retained.get(&rec.topic).map_or(0, |(_, o)| o.cost());
        let is_new = old_cost == 0;
        if (is_new && inner.retained.len() >= b.max_retained_messages)
            || inner.retained_bytes - old_cost + m.cost() > b.max_retained_bytes
        {
            self.stats.retained_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        inner.retained_bytes = inner.retained_bytes - old_cost + m.cost();
        let p = self.store.as_ref().and_then(|st| {
            st.append(&Event::Retain {
                topic: rec.topic.clone(),
                qos: rec.qos,
                message: StoredMessage::of(&m),
            })
        });
        inner
            .retained
            .insert(rec.topic.clone(), (rec.qos, Arc::new(m)));
        p
    }

    /// After the SUBACK of a new or renewed subscription: the retained messages its filter
    /// matches go into `slot`'s outbox (retain flag set, at the lower of both QoS), unless
    /// the subscription's retain handling says not to (1: only for a new subscription, 2:
    /// never). Returns the store append to await for a persistent session; the messages are
    /// held until then: call [`Slot::stored_through`] with its seq, then wake the session.
    pub fn send_retained(
        &self,
        slot: &Slot,
        filter: &str,
        options: SubOptions,
        retain_handling: u8,
        is_new: bool,
    ) -> Option<PendingAppend> {
        if retain_handling == 2 || (retain_handling == 1 && !is_new) {
            return None;
        }
        let mut inner = self.lock();
        let mut last = self.drop_expired_retained(&mut inner, SystemTime::now());
        let store = slot.stored();
        let mut sent = 0u64;
        // `$` topics are matched only by filters that name them (topic::matches).
        for (topic, (qos, m)) in &inner.retained {
            if !crate::topic::matches(filter, topic) {
                continue;
            }
            let qos = (*qos).min(options.qos);
            let m = with_subscription_ids(m, options.id.into_iter().collect());
            slot.with_outbox(|o| {
                if let Ok(pkid) = o.push(m.clone(), qos) {
                    sent += 1;
                    if let (Some(st), true) = (store, qos > 0) {
                        let p = st.append(&Event::Msg {
                            id: slot.client_id.to_string(),
                            seq: 0,
                            qos,
                            pkid,
                            message: StoredMessage::of(&m),
                        });
                        if let Some(p) = p {
                            // Sent once stored: the caller calls `Slot::stored_through`.
                            o.hold_until_stored(pkid, p.seq());
                            last = Some(p);
                        }
                    }
                }
            });
        }
        self.stats.retained_sent.fetch_add(sent, Ordering::Relaxed);
        last
    }

    /// Removes the retained messages whose MQTT 5 expiry has passed at `now` (they are never
    /// sent again); returns the store append of their removal.
    fn drop_expired_retained(&self, inner: &mut Inner, now: SystemTime) -> Option<PendingAppend> {
        let expired: Vec<String> = inner
            .retained
            .iter()
            .filter(|(_, (_, m))| m.is_expired(now))
            .map(|(t, _)| t.clone())
            .collect();
        let mut last = None;
        for topic in expired {
            if let Some((_, old)) = inner.retained.remove(&topic) {
                inner.retained_bytes -= old.cost();
            }
            if let Some(st) = &self.store {
                last = st.append(&Event::Unretain { topic }).or(last);
            }
        }
        last
    }

    /// Adds or replaces `slot`'s subscription to `filter`; returns whether it existed and, for
    /// a persistent session, the append to await before the SUBACK.
    pub fn subscribe(
        &self,
        slot: &Slot,
        filter: &str,
        options: SubOptions,
    ) -> (bool, Option<PendingAppend>) {
        let mut inner = self.lock();
        let pending = slot.stored().and_then(|st| {
            st.append(&Event::Sub {
                id: slot.client_id.to_string(),
                filter: filter.to_string(),
                qos: options.qos,
                no_local: options.no_local,
                retain_as_published: options.retain_as_published,
                sub_id: options.id,
            })
        });
        let existed = inner
            .index
            .insert(filter, slot.client_id.clone(), options)
            .is_some();
        if !existed {
            self.subscriptions.fetch_add(1, Ordering::AcqRel);
            inner
                .filters
                .entry(slot.client_id.clone())
                .or_default()
                .push(filter.to_string());
        }
        drop(inner);
        self.subscribed.notify_one();
        (existed, pending)
    }

    /// Removes `slot`'s subscription to `filter`; returns whether it existed and, for a
    /// persistent session, the append to await before the UNSUBACK.
    pub fn unsubscribe(&self, slot: &Slot, filter: &str) -> (bool, Option<PendingAppend>) {
        let mut inner = self.lock();
        let existed = inner.index.remove(filter, &slot.client_id).is_some();
        let mut pending = None;
        if existed {
            pending = slot.stored().and_then(|st| {
                st.append(&Event::Unsub {
                    id: slot.client_id.to_string(),
                    filter: filter.to_string(),
                })
            });
            self.subscriptions.fetch_sub(1, Ordering::AcqRel);
            if let Some(v) = inner.filters.get_mut(&slot.client_id) {
                v.retain(|f| f != filter);
            }
        }
        (existed, pending)
    }

    /// Puts each record into the outbox of every session with a matching subscription, once per
    /// session at the highest QoS among its matching subscriptions (and never above the QoS it
    /// was published with), and wakes the sessions kept in memory only. An offline session gets
    /// QoS 1/2 only. For persistent sessions each message is stored (`Msg`) and the sessions to
    /// wake are returned with the last append: wake them once it is durable. A record at or
    /// below a session's `routed_through` was routed into it before a restart and is skipped.
    pub fn route(&self, records: Vec<Record>) -> Routed {
        let mut routed = Routed::default();
        let mut scratch = Scratch {
            bounds: self.bounds(),
            ..Scratch::default()
        };
        let now = SystemTime::now();
        let mut inner = self.lock();
        for rec in records {
            self.route_one(
                &mut inner,
                rec,
                Source::Queue,
                now,
                &mut scratch,
                &mut routed,
            );
        }
        drop(inner);
        for slot in scratch.woken {
            slot.wake.notify_one();
        }
        routed
    }

    /// Routes one command from the command store like [`Sessions::route`] does a record, with
    /// two differences: a full session is not skipped but stops the command there
    /// ([`CommandOutcome::Blocked`]: the downlink router waits and routes it again, which
    /// keeps each device's commands in order and drops none), and each session remembers the
    /// newest command seq it got (`downlink_through`), stored with its persistent sessions.
    pub fn route_command(&self, rec: Record, retry: bool) -> (Routed, CommandOutcome) {
        let mut routed = Routed::default();
        let mut scratch = Scratch {
            bounds: self.bounds(),
            ..Scratch::default()
        };
        let now = SystemTime::now();
        let mut inner = self.lock();
        let outcome = self.route_one(
            &mut inner,
            rec,
            Source::Command { retry },
            now,
            &mut scratch,
            &mut routed,
        );
        drop(inner);
        for slot in scratch.woken {
            slot.wake.notify_one();
        }
        (routed, outcome)
    }

    fn route_one(
        &self,
        inner: &mut Inner,
        rec: Record,
        source: Source,
        now: SystemTime,
        scratch: &mut Scratch,
        routed: &mut Routed,
    ) -> CommandOutcome {
        let command = matches!(source, Source::Command { .. });
        let Scratch {
            targets,
            at,
            woken,
            bounds,
        } = scratch;
        let max_bytes = bounds.max_bytes;
        self.stats.routed.fetch_add(1, Ordering::Relaxed);
        if rec.retain && !command {
            if let Some(p) = self.keep_retained(inner, &rec, bounds) {
                routed.last_append = Some(p);
            }
        }
        targets.clear();
        at.clear();
        inner.index.for_each_match(&rec.topic, |client, o| {
            if o.no_local && **client == *rec.device_id {
                return;
            }
            match at.get(client) {
                Some(&i) => {
                    let (_, t, ids) = &mut targets[i];
                    t.qos = t.qos.max(o.qos);
                    t.retain_as_published |= o.retain_as_published;
                    ids.extend(o.id);
                }
                None => {
                    at.insert(client.clone(), targets.len());
                    targets.push((client.clone(), *o, o.id.into_iter().collect()));
                }
            }
        });
        if targets.is_empty() {
            return CommandOutcome::Unmatched;
        }
        let retained = rec.retain && !command;
        let published_qos = rec.qos;
        let seq = rec.seq;
        let origin: Option<Arc<str>> = command.then(|| rec.device_id.as_str().into());
        let mut message = Message::from_record(rec, false);
        message.command = origin;
        let message = Arc::new(message);
        if command && message.is_expired(now) {
            self.stats.messages_expired.fetch_add(1, Ordering::Relaxed);
            return CommandOutcome::Expired;
        }
        let as_published = retained.then(|| {
            let mut m = (*message).clone();
            m.retain = true;
            Arc::new(m)
        });
        let mut outcome = CommandOutcome::Routed;
        for (client, o, ids) in targets.iter_mut() {
            let Some(slot) = inner.slots.get(client) else {
                continue;
            };
            let store = slot.stored();
            let through = match source {
                Source::Queue => &slot.routed_through,
                Source::Command { .. } => &slot.downlink_through,
            };
            let skip = match source {
                Source::Queue => store.is_some() && seq <= through.load(Ordering::Acquire),
                Source::Command { retry } => !retry && seq <= through.load(Ordering::Acquire),
            };
            if skip {
                continue;
            }
            self.stats.matched.fetch_add(1, Ordering::Relaxed);
            if message.is_expired(now) {
                // Its expiry passed before it was routed (the router caught up late).
                self.stats.messages_expired.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let qos = o.qos.min(published_qos);
            let over_total = self.total_bytes.load(Ordering::Acquire) + message.cost() > max_bytes;
            // A QoS 0 publish is not kept for an offline session, nor past the bound. A QoS 0
            // command is: it waits in the outbox like the others (in memory only, being at
            // most once: a restart loses it), and a full bound blocks it as it blocks them.
            if qos == 0 && !command && (!slot.online() || over_total) {
                self.stats.dropped_qos0.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if over_total && !command {
                self.stats.refused_full.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let m = match (&as_published, o.retain_as_published) {
                (Some(r), true) => r.clone(),
                _ => message.clone(),
            };
            ids.sort_unstable();
            let m = with_subscription_ids(&m, std::mem::take(ids));
            let stored_seq = if command { seq | DOWNLINK_SEQ } else { seq };
            // One lock of the outbox: a command's bound checked, then the push.
            let (pushed, before, after) = slot.with_outbox(|ob| {
                let before = ob.counts();
                if command && !ob.fits(m.cost()) {
                    return (Push::TooLarge, before, before);
                }
                if command && (over_total || !ob.has_room(m.cost())) {
                    return (Push::Blocked, before, before);
                }
                let pushed = match ob.push(m.clone(), qos) {
                    Ok(pkid) => {
                        if command || (store.is_some() && qos > 0) {
                            through.fetch_max(seq, Ordering::AcqRel);
                        }
                        if let (Some(st), true) = (store, qos > 0) {
                            let p = st.append(&Event::Msg {
                                id: slot.client_id.to_string(),
                                seq: stored_seq,
                                qos,
                                pkid,
                                message: StoredMessage::of(&m),
                            });
                            if let Some(p) = p {
                                // Not sent before it is stored (see `Outbox::hold_until_stored`).
                                ob.hold_until_stored(pkid, p.seq());
                                if !routed.held.iter().any(|s| Arc::ptr_eq(s, slot)) {
                                    routed.held.push(slot.clone());
                                }
                                routed.last_append = Some(p);
                            }
                        }
                        Push::Pushed
                    }
                    Err(_) => Push::Refused,
                };
                (pushed, before, ob.counts())
            });
            let pushed = match pushed {
                Push::Pushed => true,
                Push::Refused => false,
                Push::TooLarge => {
                    outcome = CommandOutcome::TooLarge;
                    continue;
                }
                Push::Blocked => {
                    // The sessions before this one have it (and skip it when it comes again).
                    outcome = CommandOutcome::Blocked;
                    break;
                }
            };
            self.stats
                .dropped_qos0
                .fetch_add(after.dropped_qos0 - before.dropped_qos0, Ordering::Relaxed);
            self.stats
                .refused_full
                .fetch_add(after.refused_full - before.refused_full, Ordering::Relaxed);
            let list = if store.is_some() && qos > 0 {
                &mut routed.wake
            } else {
                &mut *woken
            };
            if pushed && slot.online() && !list.iter().any(|s| Arc::ptr_eq(s, slot)) {
                list.push(slot.clone());
            }
        }
        outcome
    }

    /// Commands that expired in sessions' outboxes since the last call, with their client ids.
    pub fn take_expired_commands(&self) -> Vec<(Arc<str>, Arc<Message>)> {
        std::mem::take(
            &mut *self
                .expired_commands
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }
}

/// Buffers [`Sessions::route`] reuses from record to record.
#[derive(Default)]
struct Scratch {
    /// Each matching session once: its options merged, and every matching subscription's id.
    targets: Vec<(Arc<str>, SubOptions, Vec<u32>)>,
    /// Where each session is in `targets`: a linear search made a record for 10,000
    /// subscribed sessions cost 50 million comparisons.
    at: HashMap<Arc<str>, usize>,
    /// Sessions kept in memory only, to wake at the end.
    woken: Vec<Arc<Slot>>,
    bounds: SessionBounds,
}

/// `m` as sent for subscriptions with these identifiers: `m` itself (shared) when there are
/// none, else a copy that carries them.
fn with_subscription_ids(m: &Arc<Message>, ids: Vec<u32>) -> Arc<Message> {
    if ids.is_empty() {
        return m.clone();
    }
    let mut own = (**m).clone();
    own.subscription_ids = ids;
    Arc::new(own)
}

impl Message {
    /// The message a queue record becomes for subscribers. `retain`: the flag to send it with
    /// (live delivery clears it unless the subscription keeps it as published).
    pub fn from_record(rec: Record, retain: bool) -> Message {
        let expires_at = rec.expires_at();
        Message {
            topic: rec.topic.into(),
            payload: rec.payload.into(),
            retain,
            user_properties: rec.user_properties,
            content_type: rec.content_type,
            payload_format: rec.payload_format,
            response_topic: rec.response_topic,
            correlation_data: rec.correlation_data.map(Bytes::from),
            subscription_ids: Vec::new(),
            expires_at,
            command: None,
        }
    }
}
