//! One session's delivery state, with no I/O: the messages waiting for a subscriber, the QoS 1/2
//! messages in flight to it, and its packet identifiers. Messages go in with [`Outbox::push`]; the
//! connection asks [`Outbox::next_publish`] what to send while the subscriber's receive maximum
//! allows, and feeds the subscriber's acks back in. On a reconnect [`Outbox::resume`] gives what
//! must be sent again, in the order first sent: PUBLISH with DUP set for what was not acknowledged,
//! PUBREL for QoS 2 messages whose PUBREC came back (so a QoS 2 message reaches the subscriber
//! exactly once across reconnects: after PUBREC it is never published again). A message of a
//! persistent session is held back until its event in the session store is durable
//! ([`Outbox::hold_until_stored`]): only a stored message can be sent again after a crash.
//!
//! Bounds: at most `max_messages` and `max_bytes` waiting (in flight counts). When a push would
//! pass a bound, the oldest waiting QoS 0 messages make room first; if that is not enough, the new
//! message is refused and counted. Nothing here grows without a bound.
//!
//! MQTT 5 message expiry (§3.3.2.3.3): a waiting message whose deadline has passed is never sent;
//! it is dropped (counted, and its packet id reported for the store) when it reaches the front,
//! or earlier by [`Outbox::drop_expired`]. A message already sent is in onward delivery and is
//! completed whatever its expiry (MQTT-3.3.2-5 lets the server delete only a copy whose delivery
//! has not started): [`Outbox::resume`] sends it again after a reconnect.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

/// A message for a subscriber, as the router matched it (shared by every session it goes to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub retain: bool,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub payload_format: Option<u8>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    /// MQTT 5 Subscription Identifiers of the receiving session's matching subscriptions
    /// (empty in the message shared by every session; set in a session's own copy).
    pub subscription_ids: Vec<u32>,
    /// MQTT 5: when the message expires (receive time + its message expiry interval).
    pub expires_at: Option<SystemTime>,
    /// A command: the downlink it came from (`downlink:NAME`). Its acknowledgement and expiry
    /// are counted per downlink, and an expired one becomes a dead letter.
    pub command: Option<Arc<str>>,
}

impl Message {
    /// The bytes this message is counted as against a session's bound (an MQTT 5 response
    /// topic and correlation data count too: they may be as large as a payload).
    pub fn cost(&self) -> usize {
        self.topic.len()
            + self.payload.len()
            + self.response_topic.as_ref().map_or(0, String::len)
            + self.correlation_data.as_ref().map_or(0, Bytes::len)
            + 32
    }

    /// Whether the message's deadline has passed at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// The Message Expiry Interval to send at `now` (MQTT 5 §3.3.2.3.3: what was received minus
    /// the time it waited here), in whole seconds rounded up. At least 1: a message sent after
    /// its deadline is one whose delivery had started before (a resend), and 0 would read as
    /// already gone.
    pub fn remaining_expiry(&self, now: SystemTime) -> Option<u32> {
        let left = self
            .expires_at?
            .duration_since(now)
            .unwrap_or(Duration::ZERO);
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        Some(u32::try_from(secs).unwrap_or(u32::MAX).max(1))
    }
}

/// What to send to the subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Send {
    Publish {
        message: Arc<Message>,
        qos: u8,
        /// 0 for QoS 0.
        pkid: u16,
        dup: bool,
    },
    PubRel {
        pkid: u16,
    },
}

/// Why a message did not go into the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The session's message or byte bound is reached by QoS 1/2 messages.
    Full,
}

/// An ack that matches nothing in flight (a protocol error by the subscriber, or a late
/// duplicate after a reconnect): the caller decides; the outbox is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownPacketId(pub u16);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// QoS 1 sent, waiting for PUBACK; QoS 2 sent, waiting for PUBREC.
    Published,
    /// QoS 2: PUBREC came, PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug)]
struct InFlight {
    pkid: u16,
    qos: u8,
    stage: Stage,
    message: Arc<Message>,
}

#[derive(Debug)]
struct Waiting {
    qos: u8,
    /// Given at push for QoS 1/2 (so a durable session can store it with the message).
    pkid: u16,
    /// Sent before (restored after a restart): DUP on its first send from here.
    dup: bool,
    /// The session store's seq of its `Msg` event while that may not be durable yet (0: it
    /// may be sent). Sent before it is stored, a crash would have the router route it again,
    /// as a new message with another packet id: a QoS 2 message delivered twice.
    stored_at: u64,
    message: Arc<Message>,
}

/// Counters a session keeps (exact; the metrics sum them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub sent: u64,
    pub resent: u64,
    pub completed: u64,
    /// QoS 0 messages dropped to make room or refused by a full session.
    pub dropped_qos0: u64,
    /// QoS 1/2 messages refused by a full session.
    pub refused_full: u64,
    /// Messages dropped unsent because their MQTT 5 message expiry passed while they waited.
    pub expired: u64,
    /// Commands (from downlinks) the subscriber acknowledged (PUBACK or PUBCOMP).
    pub commands_done: u64,
}

#[derive(Debug)]
pub struct Outbox {
    waiting: VecDeque<Waiting>,
    in_flight: VecDeque<InFlight>,
    /// Packet ids held by waiting and in-flight messages.
    used: std::collections::HashSet<u16>,
    /// Waiting messages whose `stored_at` is not 0.
    unstored: usize,
    next_pkid: u16,
    receive_maximum: usize,
    max_messages: usize,
    max_bytes: usize,
    bytes: usize,
    counts: Counts,
    /// A message with an expiry was queued since the outbox was last empty (so a scan for
    /// expired ones can find something).
    any_expiry: bool,
    /// Packet ids of QoS 1/2 messages dropped as expired, until [`Outbox::take_expired`].
    expired_pkids: Vec<u16>,
    /// Commands dropped as expired, until [`Outbox::take_expired_commands`] (dead letters).
    expired_commands: Vec<Arc<Message>>,
    /// The downlinks of the commands acknowledged since [`Outbox::take_done_commands`].
    done_commands: Vec<Arc<str>>,
}

impl Outbox {
    /// `receive_maximum`: how many QoS 1/2 publishes may be unacknowledged at the subscriber
    /// (its MQTT 5 receive maximum, capped by the gateway's own setting).
    pub fn new(receive_maximum: u16, max_messages: usize, max_bytes: usize) -> Outbox {
        Outbox {
            waiting: VecDeque::new(),
            in_flight: VecDeque::new(),
            used: std::collections::HashSet::new(),
            unstored: 0,
            next_pkid: 1,
            receive_maximum: usize::from(receive_maximum.max(1)),
            max_messages: max_messages.clamp(1, 60_000),
            max_bytes,
            bytes: 0,
            counts: Counts::default(),
            any_expiry: false,
            expired_pkids: Vec::new(),
            expired_commands: Vec::new(),
            done_commands: Vec::new(),
        }
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Messages held (waiting and in flight) and their bytes.
    pub fn len(&self) -> usize {
        self.waiting.len() + self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether a QoS 1/2 message of `cost` bytes would be taken now (waiting QoS 0 messages
    /// make room, as in [`Outbox::push`]).
    pub fn has_room(&self, cost: usize) -> bool {
        let (n0, b0) = self
            .waiting
            .iter()
            .filter(|w| w.qos == 0)
            .fold((0, 0), |(n, b), w| (n + 1, b + w.message.cost()));
        self.len() - n0 < self.max_messages && self.bytes - b0 + cost <= self.max_bytes
    }

    /// Whether a message of `cost` bytes fits this outbox at all (when empty).
    pub fn fits(&self, cost: usize) -> bool {
        self.max_messages > 0 && cost <= self.max_bytes
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// A new subscriber connection may announce a different receive maximum.
    pub fn set_receive_maximum(&mut self, receive_maximum: u16) {
        self.receive_maximum = usize::from(receive_maximum.max(1));
    }

    /// Queues `message` at `qos` (already the granted QoS: min of subscription and publish).
    /// Returns the packet id it will be sent with (0 for QoS 0): given now, so that a durable
    /// session stores it and a QoS 2 message keeps its id across a restart.
    pub fn push(&mut self, message: Arc<Message>, qos: u8) -> Result<u16, Refused> {
        let cost = message.cost();
        while self.len() >= self.max_messages || self.bytes + cost > self.max_bytes {
            // Room is made from the oldest waiting QoS 0 message, never from QoS 1/2.
            let Some(i) = self.waiting.iter().position(|w| w.qos == 0) else {
                break;
            };
            if let Some(old) = self.waiting.remove(i) {
                self.bytes -= old.message.cost();
                self.counts.dropped_qos0 += 1;
            }
        }
        if self.len() >= self.max_messages || self.bytes + cost > self.max_bytes {
            if qos == 0 {
                self.counts.dropped_qos0 += 1;
            } else {
                self.counts.refused_full += 1;
            }
            return Err(Refused::Full);
        }
        self.bytes += cost;
        self.any_expiry |= message.expires_at.is_some();
        let pkid = if qos > 0 { self.allocate_pkid() } else { 0 };
        self.waiting.push_back(Waiting {
            qos,
            pkid,
            dup: false,
            stored_at: 0,
            message,
        });
        Ok(pkid)
    }

    /// The message just pushed with `pkid` is not sent before the session store's event `seq`
    /// is durable ([`Outbox::stored_through`]). Messages leave in order: the ones after it wait
    /// too.
    pub fn hold_until_stored(&mut self, pkid: u16, seq: u64) {
        if let Some(w) = self.waiting.iter_mut().rev().find(|w| w.pkid == pkid) {
            if w.stored_at == 0 && seq > 0 {
                self.unstored += 1;
            }
            w.stored_at = seq;
        }
    }

    /// The session store is durable through `seq`: the messages held for it may be sent.
    pub fn stored_through(&mut self, seq: u64) {
        // Held messages are the newest ones: look from the back until all are seen.
        let mut left = self.unstored;
        for w in self.waiting.iter_mut().rev() {
            if left == 0 {
                break;
            }
            if w.stored_at != 0 {
                left -= 1;
                if w.stored_at <= seq {
                    w.stored_at = 0;
                    self.unstored -= 1;
                }
            }
        }
    }

    /// Puts back a message a durable session stored (after a restart), with the packet id it
    /// was given; `released`: its PUBREC had come (QoS 2), so only PUBREL is sent again.
    /// Messages go back in the order they were first pushed. Bounds are not applied: what was
    /// stored was within them.
    pub fn restore(&mut self, message: Arc<Message>, qos: u8, pkid: u16, released: bool) {
        if qos == 0 || pkid == 0 || !self.used.insert(pkid) {
            return;
        }
        self.bytes += message.cost();
        self.any_expiry |= message.expires_at.is_some();
        if released {
            self.in_flight.push_back(InFlight {
                pkid,
                qos,
                stage: Stage::Released,
                message,
            });
        } else {
            self.waiting.push_back(Waiting {
                qos,
                pkid,
                dup: true,
                stored_at: 0,
                message,
            });
        }
        self.next_pkid = pkid.checked_add(1).unwrap_or(1);
    }

    /// Every message held, for a snapshot: (message, qos, pkid, released), in order.
    pub fn held(&self) -> Vec<(Arc<Message>, u8, u16, bool)> {
        self.in_flight
            .iter()
            .map(|f| (f.message.clone(), f.qos, f.pkid, f.stage == Stage::Released))
            .chain(
                self.waiting
                    .iter()
                    .filter(|w| w.qos > 0)
                    .map(|w| (w.message.clone(), w.qos, w.pkid, false)),
            )
            .collect()
    }

    /// The next PUBLISH to send now, if the receive maximum allows one (QoS 0 is never held
    /// back by it) and the message is not held until stored. Messages leave in the order they
    /// were pushed; expired ones are dropped.
    pub fn next_publish(&mut self) -> Option<Send> {
        self.next_publish_at(SystemTime::now())
    }

    /// [`Outbox::next_publish`] at `now`.
    pub fn next_publish_at(&mut self, now: SystemTime) -> Option<Send> {
        while self
            .waiting
            .front()
            .is_some_and(|w| w.message.is_expired(now))
        {
            if let Some(w) = self.waiting.pop_front() {
                self.drop_waiting(w);
            }
        }
        let front = self.waiting.front()?;
        if front.stored_at != 0 {
            return None;
        }
        if front.qos > 0 && self.in_flight.len() >= self.receive_maximum {
            return None;
        }
        let w = self.waiting.pop_front()?;
        self.counts.sent += 1;
        if w.qos == 0 {
            self.bytes -= w.message.cost();
            self.counts.completed += 1;
            return Some(Send::Publish {
                message: w.message,
                qos: 0,
                pkid: 0,
                dup: false,
            });
        }
        self.in_flight.push_back(InFlight {
            pkid: w.pkid,
            qos: w.qos,
            stage: Stage::Published,
            message: w.message.clone(),
        });
        Some(Send::Publish {
            message: w.message,
            qos: w.qos,
            pkid: w.pkid,
            dup: w.dup,
        })
    }

    /// Drops every waiting message whose deadline has passed at `now` (an offline session's, or
    /// one behind the receive maximum); returns how many.
    pub fn drop_expired(&mut self, now: SystemTime) -> usize {
        if !self.any_expiry {
            return 0;
        }
        let (expired, keep): (VecDeque<Waiting>, VecDeque<Waiting>) =
            std::mem::take(&mut self.waiting)
                .into_iter()
                .partition(|w| w.message.is_expired(now));
        self.waiting = keep;
        let n = expired.len();
        expired.into_iter().for_each(|w| self.drop_waiting(w));
        self.any_expiry = self.waiting.iter().any(|w| w.message.expires_at.is_some());
        n
    }

    /// Forgets a waiting message that expired: its bytes, its packet id, counted.
    fn drop_waiting(&mut self, w: Waiting) {
        if w.stored_at != 0 {
            self.unstored -= 1;
        }
        self.bytes -= w.message.cost();
        self.counts.expired += 1;
        if w.message.command.is_some() {
            self.expired_commands.push(w.message.clone());
        }
        if w.qos > 0 {
            self.used.remove(&w.pkid);
            self.expired_pkids.push(w.pkid);
        }
    }

    /// Packet ids of QoS 1/2 messages dropped as expired since the last call (a durable
    /// session stores that they are done).
    pub fn take_expired(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.expired_pkids)
    }

    /// The downlinks of the commands acknowledged since the last call.
    pub fn take_done_commands(&mut self) -> Vec<Arc<str>> {
        std::mem::take(&mut self.done_commands)
    }

    /// Commands dropped as expired since the last call.
    pub fn take_expired_commands(&mut self) -> Vec<Arc<Message>> {
        std::mem::take(&mut self.expired_commands)
    }

    /// A packet id no held message has. Bounds keep far fewer than 65,535 messages held, so
    /// one is always free.
    fn allocate_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if self.used.insert(id) {
                return id;
            }
        }
    }

    fn position(&self, pkid: u16, qos: u8, stage: Stage) -> Result<usize, UnknownPacketId> {
        self.in_flight
            .iter()
            .position(|f| f.pkid == pkid && f.qos == qos && f.stage == stage)
            .ok_or(UnknownPacketId(pkid))
    }

    fn complete(&mut self, i: usize) {
        if let Some(done) = self.in_flight.remove(i) {
            self.bytes -= done.message.cost();
            self.used.remove(&done.pkid);
            self.counts.completed += 1;
            if let Some(origin) = &done.message.command {
                self.counts.commands_done += 1;
                self.done_commands.push(origin.clone());
            }
        }
    }

    /// PUBACK for a QoS 1 message.
    pub fn on_puback(&mut self, pkid: u16) -> Result<(), UnknownPacketId> {
        let i = self.position(pkid, 1, Stage::Published)?;
        self.complete(i);
        Ok(())
    }

    /// PUBREC for a QoS 2 message: the subscriber has it; answer PUBREL. A repeated PUBREC
    /// (after a reconnect) is answered with PUBREL again.
    pub fn on_pubrec(&mut self, pkid: u16) -> Result<Send, UnknownPacketId> {
        let i = self
            .position(pkid, 2, Stage::Published)
            .or_else(|_| self.position(pkid, 2, Stage::Released))?;
        if let Some(f) = self.in_flight.get_mut(i) {
            f.stage = Stage::Released;
        }
        Ok(Send::PubRel { pkid })
    }

    /// PUBCOMP for a QoS 2 message.
    pub fn on_pubcomp(&mut self, pkid: u16) -> Result<(), UnknownPacketId> {
        let i = self.position(pkid, 2, Stage::Released)?;
        self.complete(i);
        Ok(())
    }

    /// The subscriber went away: what was in flight stays in flight for [`Outbox::resume`];
    /// waiting QoS 0 messages are dropped (they are for a live subscriber only).
    pub fn on_disconnect(&mut self) {
        let before = self.waiting.len();
        let mut freed = 0;
        self.waiting.retain(|w| {
            let keep = w.qos > 0;
            if !keep {
                freed += w.message.cost();
            }
            keep
        });
        self.bytes -= freed;
        self.counts.dropped_qos0 += (before - self.waiting.len()) as u64;
    }

    /// The subscriber is back on a resumed session: everything in flight, in the order it was
    /// first sent, with DUP set on publishes (MQTT 3.1.1 §4.4, MQTT 5 §4.4).
    pub fn resume(&mut self) -> Vec<Send> {
        self.counts.resent += self.in_flight.len() as u64;
        self.in_flight
            .iter()
            .map(|f| match f.stage {
                Stage::Published => Send::Publish {
                    message: f.message.clone(),
                    qos: f.qos,
                    pkid: f.pkid,
                    dup: true,
                },
                Stage::Released => Send::PubRel { pkid: f.pkid },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn msg(n: u32) -> Arc<Message> {
        Arc::new(Message {
            topic: "t".into(),
            payload: Bytes::from(n.to_be_bytes().to_vec()),
            retain: false,
            user_properties: Vec::new(),
            content_type: None,
            payload_format: None,
            response_topic: None,
            correlation_data: None,
            subscription_ids: Vec::new(),
            expires_at: None,
            command: None,
        })
    }

    fn id(m: &Message) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&m.payload);
        u32::from_be_bytes(b)
    }

    #[test]
    fn receive_maximum_holds_back_qos1_but_not_qos0() {
        let mut o = Outbox::new(1, 100, 1 << 20);
        o.push(msg(1), 1).expect("room");
        o.push(msg(2), 1).expect("room");
        assert!(matches!(
            o.next_publish(),
            Some(Send::Publish { pkid: 1, .. })
        ));
        assert_eq!(o.next_publish(), None, "receive maximum 1 reached");
        o.on_puback(1).expect("in flight");
        assert!(matches!(
            o.next_publish(),
            Some(Send::Publish { qos: 1, .. })
        ));
        assert_eq!(o.on_puback(1), Err(UnknownPacketId(1)), "acked twice");
    }

    #[test]
    fn a_message_held_until_stored_waits_and_so_do_the_ones_after_it() {
        let mut o = Outbox::new(10, 100, 1 << 20);
        o.push(msg(1), 1).expect("room");
        let p2 = o.push(msg(2), 2).expect("room");
        o.hold_until_stored(p2, 7);
        let p3 = o.push(msg(3), 1).expect("room");
        o.hold_until_stored(p3, 9);
        o.push(msg(4), 0).expect("room");
        let next = |o: &mut Outbox| match o.next_publish() {
            Some(Send::Publish { message, .. }) => Some(id(&message)),
            _ => None,
        };
        assert_eq!(next(&mut o), Some(1));
        assert_eq!(next(&mut o), None, "2 is not stored yet");
        o.stored_through(6);
        assert_eq!(next(&mut o), None);
        o.stored_through(7);
        assert_eq!(next(&mut o), Some(2));
        assert_eq!(
            next(&mut o),
            None,
            "3 is not stored yet, and QoS 0 4 waits behind it"
        );
        o.on_disconnect();
        o.stored_through(9);
        assert_eq!(next(&mut o), Some(3));
        assert_eq!(
            next(&mut o),
            None,
            "the QoS 0 message went with the connection"
        );
    }

    #[test]
    fn a_full_session_drops_qos0_first_then_refuses_and_counts() {
        let one = msg(0).cost();
        let mut o = Outbox::new(10, 3, 10 * one);
        o.push(msg(1), 0).expect("room");
        o.push(msg(2), 1).expect("room");
        o.push(msg(3), 0).expect("room");
        o.push(msg(4), 1).expect("room"); // drops 1 (oldest QoS 0)
        o.push(msg(5), 2).expect("room"); // drops 3
        assert_eq!(o.push(msg(6), 1), Err(Refused::Full));
        assert_eq!(o.push(msg(7), 0), Err(Refused::Full));
        let c = o.counts();
        assert_eq!((c.dropped_qos0, c.refused_full), (3, 1));
        let mut sent = Vec::new();
        while let Some(Send::Publish { message, .. }) = o.next_publish() {
            sent.push(id(&message));
        }
        assert_eq!(sent, [2, 4, 5]);
        assert_eq!(o.bytes(), 3 * one);
    }

    #[test]
    fn qos2_after_pubrec_is_released_not_republished_on_resume() {
        let mut o = Outbox::new(10, 10, 1 << 20);
        o.push(msg(1), 2).expect("room");
        o.push(msg(2), 2).expect("room");
        o.next_publish();
        o.next_publish();
        assert_eq!(o.on_pubrec(1), Ok(Send::PubRel { pkid: 1 }));
        o.on_disconnect();
        let again = o.resume();
        assert_eq!(again[0], Send::PubRel { pkid: 1 });
        assert!(matches!(
            &again[1],
            Send::Publish {
                pkid: 2,
                dup: true,
                qos: 2,
                ..
            }
        ));
        o.on_pubcomp(1).expect("released");
        assert_eq!(o.on_pubrec(2), Ok(Send::PubRel { pkid: 2 }));
        assert_eq!(
            o.on_pubrec(2),
            Ok(Send::PubRel { pkid: 2 }),
            "a repeated PUBREC"
        );
        o.on_pubcomp(2).expect("released");
        assert!(o.is_empty());
        assert_eq!(o.bytes(), 0);
    }

    fn expiring(n: u32, at: SystemTime) -> Arc<Message> {
        let mut m = (*msg(n)).clone();
        m.expires_at = Some(at);
        Arc::new(m)
    }

    fn sent_id(s: Option<Send>) -> (u32, u16) {
        match s {
            Some(Send::Publish { message, pkid, .. }) => (id(&message), pkid),
            other => panic!("expected a PUBLISH, got {other:?}"),
        }
    }

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        T0 + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn a_message_that_expires_while_waiting_is_dropped_unsent_and_counted() {
        let mut o = Outbox::new(1, 100, 1 << 20);
        o.push(expiring(1, at(10)), 1).expect("room");
        let behind = o.push(expiring(2, at(5)), 1).expect("room");
        o.push(msg(3), 1).expect("room");
        o.push(expiring(4, at(5)), 0).expect("room");
        let (first, p1) = sent_id(o.next_publish_at(at(0)));
        assert_eq!(first, 1);
        assert_eq!(o.next_publish_at(at(0)), None, "behind the receive maximum");
        o.on_puback(p1).expect("in flight");
        // Message 2 expired while it waited behind the receive maximum: never sent.
        let (third, p3) = sent_id(o.next_publish_at(at(6)));
        assert_eq!(third, 3);
        assert_eq!(o.counts().expired, 1);
        assert_eq!(o.take_expired(), [behind], "its packet id, for the store");
        o.on_puback(p3).expect("in flight");
        // QoS 0 expires too; it had no packet id.
        assert_eq!(o.next_publish_at(at(6)), None);
        assert_eq!(o.counts().expired, 2);
        assert!(o.take_expired().is_empty());
        assert!(o.is_empty());
        assert_eq!(o.bytes(), 0);
        assert_eq!(o.counts().sent, 2);
    }

    #[test]
    fn an_offline_sessions_expired_messages_go_but_what_was_in_flight_is_resent_regardless() {
        let mut o = Outbox::new(10, 100, 1 << 20);
        o.push(expiring(1, at(5)), 1).expect("room");
        let (_, p1) = sent_id(o.next_publish_at(at(0)));
        o.push(expiring(2, at(5)), 1).expect("room");
        o.push(expiring(3, at(50)), 1).expect("room");
        o.on_disconnect();
        assert_eq!(o.drop_expired(at(6)), 1);
        assert_eq!(o.len(), 2);
        // Delivery of message 1 had started: it goes again, past its deadline, with an
        // expiry interval of 1 (never 0).
        let again = o.resume();
        assert!(matches!(
            &again[..],
            [Send::Publish { message, pkid, dup: true, .. }]
                if *pkid == p1 && message.remaining_expiry(at(6)) == Some(1)
        ));
        let (next, _) = sent_id(o.next_publish_at(at(6)));
        assert_eq!(next, 3);
    }

    #[test]
    fn the_remaining_expiry_is_rounded_up_and_absent_without_an_expiry() {
        let m = expiring(1, at(10));
        assert_eq!(m.remaining_expiry(at(0)), Some(10));
        assert_eq!(
            m.remaining_expiry(at(0) + Duration::from_millis(500)),
            Some(10)
        );
        assert_eq!(
            m.remaining_expiry(at(9) + Duration::from_millis(1)),
            Some(1)
        );
        assert_eq!(m.remaining_expiry(at(20)), Some(1));
        assert!(m.is_expired(at(10)) && !m.is_expired(at(9)));
        assert_eq!(msg(1).remaining_expiry(at(0)), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u8),
        Send,
        /// Ack the in-flight message at this index (mod the count), as the subscriber would.
        Ack(usize),
        /// An ack for a random packet id.
        BogusAck(u16),
        Reconnect,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..3).prop_map(Op::Push),
            4 => Just(Op::Send),
            3 => (0usize..64).prop_map(Op::Ack),
            1 => any::<u16>().prop_map(Op::BogusAck),
            1 => Just(Op::Reconnect),
        ]
    }

    proptest! {
        /// Against a subscriber that acks in any order and reconnects at any time: QoS 1/2
        /// messages are first sent in push order; every accepted QoS 1/2 message completes
        /// exactly once when all is acked; a QoS 2 message is never published again after its
        /// PUBREC; packet ids in flight are unique and within the receive maximum; bytes add up.
        #[test]
        fn delivery_model(ops in prop::collection::vec(op(), 1..200), rmax in 1u16..6) {
            let mut o = Outbox::new(rmax, 8, 1 << 20);
            let mut n = 0u32;
            let mut accepted: BTreeSet<u32> = BTreeSet::new();
            let mut first_sent: Vec<u32> = Vec::new();
            let mut completed: BTreeSet<u32> = BTreeSet::new();
            // pkid -> (message, qos, PUBREC seen)
            let mut at_sub: BTreeMap<u16, (u32, u8, bool)> = BTreeMap::new();
            let handle = |s: Send, at_sub: &mut BTreeMap<u16, (u32, u8, bool)>, first_sent: &mut Vec<u32>| -> Result<(), TestCaseError> {
                if let Send::Publish { message, qos, pkid, dup } = s {
                    let m = id(&message);
                    if qos > 0 {
                        if let Some(&(prev, _, rec)) = at_sub.get(&pkid) {
                            prop_assert_eq!(prev, m, "pkid reused while in flight");
                            prop_assert!(!rec, "QoS 2 message {} published after its PUBREC", m);
                            prop_assert!(dup);
                        } else {
                            prop_assert!(!dup);
                            first_sent.push(m);
                        }
                        at_sub.insert(pkid, (m, qos, false));
                    }
                }
                Ok(())
            };
            for op in ops {
                match op {
                    Op::Push(qos) => {
                        n += 1;
                        if o.push(msg(n), qos).is_ok() && qos > 0 {
                            accepted.insert(n);
                        }
                    }
                    Op::Send => {
                        if let Some(s) = o.next_publish() {
                            handle(s, &mut at_sub, &mut first_sent)?;
                        }
                    }
                    Op::Ack(i) => {
                        if at_sub.is_empty() { continue; }
                        let pkid = *at_sub.keys().nth(i % at_sub.len()).expect("nonempty");
                        let (m, qos, rec) = at_sub[&pkid];
                        if qos == 1 {
                            prop_assert_eq!(o.on_puback(pkid), Ok(()));
                            at_sub.remove(&pkid);
                            prop_assert!(completed.insert(m));
                        } else if !rec {
                            prop_assert_eq!(o.on_pubrec(pkid), Ok(Send::PubRel { pkid }));
                            at_sub.insert(pkid, (m, qos, true));
                        } else {
                            prop_assert_eq!(o.on_pubcomp(pkid), Ok(()));
                            at_sub.remove(&pkid);
                            prop_assert!(completed.insert(m));
                        }
                    }
                    Op::BogusAck(pkid) => {
                        if !at_sub.contains_key(&pkid) {
                            prop_assert_eq!(o.on_puback(pkid), Err(UnknownPacketId(pkid)));
                            prop_assert_eq!(o.on_pubcomp(pkid), Err(UnknownPacketId(pkid)));
                        }
                    }
                    Op::Reconnect => {
                        o.on_disconnect();
                        for s in o.resume() {
                            match s {
                                Send::PubRel { pkid } => prop_assert!(at_sub[&pkid].2),
                                s => handle(s, &mut at_sub, &mut first_sent)?,
                            }
                        }
                    }
                }
                prop_assert!(o.in_flight() <= usize::from(rmax));
                prop_assert_eq!(o.in_flight(), at_sub.len());
                prop_assert!(o.len() <= 8);
            }
            let mut sorted = first_sent.clone();
            sorted.sort_unstable();
            prop_assert_eq!(&first_sent, &sorted, "first sends out of push order");
            // Drain: send everything and ack everything.
            loop {
                while let Some(s) = o.next_publish() {
                    handle(s, &mut at_sub, &mut first_sent)?;
                }
                let Some((&pkid, &(m, qos, rec))) = at_sub.iter().next() else { break };
                if qos == 2 && !rec {
                    o.on_pubrec(pkid).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
                }
                if qos == 1 { o.on_puback(pkid) } else { o.on_pubcomp(pkid) }
                    .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
                at_sub.remove(&pkid);
                prop_assert!(completed.insert(m));
            }
            prop_assert_eq!(&completed, &accepted, "every accepted QoS 1/2 message completes once");
            prop_assert!(o.is_empty());
            prop_assert_eq!(o.bytes(), 0);
        }
    }
}
