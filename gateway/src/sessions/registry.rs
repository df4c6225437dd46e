//! The live sessions of connected subscribers: who is subscribed to what ([`FilterIndex`]) and
//! each session's [`Outbox`]. The router calls [`Sessions::route`] with records read from the
//! queue; connections attach, subscribe, take what their outbox holds and feed acks back.
//!
//! Locking: one mutex over the index and the session map, taken once per routed batch and per
//! SUBSCRIBE/UNSUBSCRIBE; each outbox has its own mutex, taken by the router to push and by the
//! connection to send and ack. Nothing here waits on a socket, so a stuck subscriber holds up
//! nobody: its outbox fills to its bound and what does not fit is dropped and counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::index::FilterIndex;
use super::outbox::{Message, Outbox};
use crate::queue::Record;

/// Bounds of one session (from `[sessions]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionBounds {
    /// QoS 1/2 publishes in flight to a subscriber at once (capped by its receive maximum).
    pub max_inflight: u16,
    pub max_queued_messages: usize,
    pub max_queued_bytes: usize,
}

impl Default for SessionBounds {
    fn default() -> Self {
        SessionBounds {
            max_inflight: 32,
            max_queued_messages: 1000,
            max_queued_bytes: 1 << 20,
        }
    }
}

/// The options a subscription was granted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
}

/// One connected subscriber's session.
#[derive(Debug)]
pub struct Slot {
    pub client_id: Arc<str>,
    outbox: Mutex<Outbox>,
    /// Notified when the outbox has something to send (or room in flight again).
    pub wake: Notify,
}

impl Slot {
    pub fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counters of local delivery (exact; exported as metrics).
#[derive(Debug, Default)]
pub struct DeliveryStats {
    /// Records the router read from the queue while someone was subscribed.
    pub routed: AtomicU64,
    /// Messages put into outboxes (one per matching session).
    pub matched: AtomicU64,
    /// QoS 0 messages dropped by full or disconnected sessions.
    pub dropped_qos0: AtomicU64,
    /// QoS 1/2 messages refused by full sessions.
    pub refused_full: AtomicU64,
    /// Messages still in a session's outbox when the session ended.
    pub discarded: AtomicU64,
}

#[derive(Default)]
struct Inner {
    index: FilterIndex<Arc<str>, SubOptions>,
    slots: HashMap<Arc<str>, Arc<Slot>>,
    /// Each session's filters, to remove them when it ends.
    filters: HashMap<Arc<str>, Vec<String>>,
}

/// Every live session; shared by the connections and the router.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
    subscriptions: AtomicUsize,
    bounds: Mutex<SessionBounds>,
    pub stats: DeliveryStats,
}

impl Sessions {
    pub fn new(bounds: SessionBounds) -> Sessions {
        Sessions {
            bounds: Mutex::new(bounds),
            ..Sessions::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bounds for sessions that start from now on (a reload).
    pub fn set_bounds(&self, bounds: SessionBounds) {
        *self.bounds.lock().unwrap_or_else(|e| e.into_inner()) = bounds;
    }

    /// Whether any session subscribes to anything (the router skips reading when none does).
    pub fn has_subscriptions(&self) -> bool {
        self.subscriptions.load(Ordering::Acquire) > 0
    }

    /// (sessions, subscriptions) now.
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.slots.len(), inner.index.len())
    }

    /// A new session for `client_id`, replacing (and ending) any earlier one of that id.
    /// `receive_maximum`: the client's own (MQTT 5), if it sent one.
    pub fn attach(&self, client_id: &str, receive_maximum: Option<u16>) -> Arc<Slot> {
        let b = *self.bounds.lock().unwrap_or_else(|e| e.into_inner());
        let rmax = receive_maximum.map_or(b.max_inflight, |r| r.min(b.max_inflight));
        let id: Arc<str> = client_id.into();
        let slot = Arc::new(Slot {
            client_id: id.clone(),
            outbox: Mutex::new(Outbox::new(rmax, b.max_queued_messages, b.max_queued_bytes)),
            wake: Notify::new(),
        });
        let mut inner = self.lock();
        Self::clear_filters(&mut inner, &id, &self.subscriptions);
        inner.slots.insert(id, slot.clone());
        slot
    }

    /// Ends `slot`'s session (if it is still the live one for its client id): its
    /// subscriptions go, and what its outbox held is dropped (counted).
    pub fn detach(&self, slot: &Arc<Slot>) {
        let mut inner = self.lock();
        if inner
            .slots
            .get(&slot.client_id)
            .is_some_and(|s| Arc::ptr_eq(s, slot))
        {
            inner.slots.remove(&slot.client_id);
            Self::clear_filters(&mut inner, &slot.client_id, &self.subscriptions);
        }
        drop(inner);
        // What an ended session held is gone with it (MQTT's rule for a session that is not
        // kept); counted.
        let left = slot.outbox().len() as u64;
        self.stats.discarded.fetch_add(left, Ordering::Relaxed);
    }

    fn clear_filters(inner: &mut Inner, id: &Arc<str>, count: &AtomicUsize) {
        if let Some(filters) = inner.filters.remove(id) {
            for f in filters {
                if inner.index.remove(&f, id).is_some() {
                    count.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    /// Adds or replaces `slot`'s subscription to `filter`; returns whether it existed.
    pub fn subscribe(&self, slot: &Slot, filter: &str, options: SubOptions) -> bool {
        let mut inner = self.lock();
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
        existed
    }

    /// Removes `slot`'s subscription to `filter`; returns whether it existed.
    pub fn unsubscribe(&self, slot: &Slot, filter: &str) -> bool {
        let mut inner = self.lock();
        let existed = inner.index.remove(filter, &slot.client_id).is_some();
        if existed {
            self.subscriptions.fetch_sub(1, Ordering::AcqRel);
            if let Some(v) = inner.filters.get_mut(&slot.client_id) {
                v.retain(|f| f != filter);
            }
        }
        existed
    }

    /// Puts each record into the outbox of every session with a matching subscription, once per
    /// session at the highest QoS among its matching subscriptions (and never above the QoS it
    /// was published with), then wakes those sessions.
    pub fn route(&self, records: Vec<Record>) {
        let mut woken: Vec<Arc<Slot>> = Vec::new();
        let mut targets: Vec<(Arc<str>, SubOptions)> = Vec::new();
        let inner = self.lock();
        for rec in records {
            self.stats.routed.fetch_add(1, Ordering::Relaxed);
            targets.clear();
            inner.index.for_each_match(&rec.topic, |client, o| {
                if o.no_local && **client == *rec.device_id {
                    return;
                }
                match targets.iter_mut().find(|(c, _)| c == client) {
                    Some((_, t)) => {
                        t.qos = t.qos.max(o.qos);
                        t.retain_as_published |= o.retain_as_published;
                    }
                    None => targets.push((client.clone(), *o)),
                }
            });
            if targets.is_empty() {
                continue;
            }
            let retained = rec.retain;
            let qos = rec.qos;
            let message = Arc::new(Message::from_record(rec, false));
            let as_published = retained.then(|| {
                let mut m = (*message).clone();
                m.retain = true;
                Arc::new(m)
            });
            for (client, o) in &targets {
                let Some(slot) = inner.slots.get(client) else {
                    continue;
                };
                let m = match (&as_published, o.retain_as_published) {
                    (Some(r), true) => r.clone(),
                    _ => message.clone(),
                };
                let mut outbox = slot.outbox();
                let before = outbox.counts();
                let pushed = outbox.push(m, o.qos.min(qos));
                let after = outbox.counts();
                drop(outbox);
                self.stats.matched.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .dropped_qos0
                    .fetch_add(after.dropped_qos0 - before.dropped_qos0, Ordering::Relaxed);
                self.stats
                    .refused_full
                    .fetch_add(after.refused_full - before.refused_full, Ordering::Relaxed);
                if pushed.is_ok() && !woken.iter().any(|s| Arc::ptr_eq(s, slot)) {
                    woken.push(slot.clone());
                }
            }
        }
        drop(inner);
        for slot in woken {
            slot.wake.notify_one();
        }
    }
}

impl Message {
    /// The message a queue record becomes for subscribers. `retain`: the flag to send it with
    /// (live delivery clears it unless the subscription keeps it as published).
    pub fn from_record(rec: Record, retain: bool) -> Message {
        Message {
            topic: rec.topic.into(),
            payload: rec.payload.into(),
            retain,
            user_properties: rec.user_properties,
            content_type: rec.content_type,
            payload_format: rec.payload_format,
            response_topic: None,
            correlation_data: None,
        }
    }
}
