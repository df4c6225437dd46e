//! One simulated sensor: a state machine that does no I/O.
//!
//! It is written the way microcontroller firmware would be: every buffer is a fixed-size
//! `heapless` container chosen at compile time (`N` bytes per message, `Q` messages in the
//! outbox), nothing allocates after construction, and time comes from the caller.
//!
//! The fleet runner drives it with events and asks it what to do:
//!
//! ```text
//!   events in                              actions out
//!   ---------                              -----------
//!   tick(now_us)        sample if due  ->  TickOutcome (sampled / blocked / dropped oldest)
//!   connected()         queue resends  ->  poll_transmit(): Transmit { seq, payload, dup }
//!   acked(seq)          free the slot          (new readings and, after a reconnect,
//!   nacked(seq)         send it again           everything not acknowledged, in seq order)
//!   disconnected()      stop sending       next_wakeup(): when to call tick again
//!   command(..)         act, queue reply   poll_reply(): ReplyTransmit { key, payload, .. }
//!   reply_acked(key)    free the slot      take_reboot(): disconnect and reconnect now
//! ```
//!
//! Commands (see [`crate::command`]) arrive on the device's command topic. The device parses the
//! JSON, acts (`ping`: nothing; `set_rate`: new sampling interval; `reboot`: once its reply is
//! acknowledged, [`Device::take_reboot`] tells the runner to disconnect and reconnect), and queues
//! a reply in a fixed reply outbox of [`REPLIES`] slots, kept until acknowledged and resent after a
//! reconnect like readings. A full reply outbox answers [`CommandOutcome::Busy`]: the runner keeps
//! the command and offers it again after a reply is acknowledged. Command numbers seen before
//! (within a window of the last 64) are duplicates: answered again, not acted on again.
//!
//! Invariants:
//! - Sequence numbers start at 0, increase by one per reading taken, and are never reused: not
//!   across reconnects, not for dropped readings. A reading skipped by the `block` policy is never
//!   taken, so it consumes no number.
//! - The outbox holds every reading that was taken and neither acknowledged nor dropped, in
//!   sequence order. After a reconnect all of them are sent again, oldest first (`dup` set on
//!   those sent before), so per-device order holds on the wire.
//! - At most `Q` transmissions are unacknowledged on one connection (including ones whose outbox
//!   entry was since dropped), which is also the MQTT client's in-flight window. Replies add at
//!   most [`REPLIES`] more.
//! - Replies leave in the order their commands were taken, and a reboot happens only after its
//!   reply was acknowledged (so the reply is not lost with the connection).

use serde::{Deserialize, Serialize};

use crate::command::{self, CommandError, CommandKind, REPLY_BYTES};
use crate::payload::{self, Reading};

/// Message buffer for payloads up to this many bytes (the default reading is ~105 bytes).
pub const SMALL_MSG: usize = 256;
/// Message buffer for `--payload-bytes` above [`SMALL_MSG`].
pub const LARGE_MSG: usize = 4096;
/// Outbox slots per device (readings kept until acknowledged): 16 x 256 B = 4 KiB of messages,
/// what a small microcontroller can spare; also the largest in-flight window.
pub const OUTBOX: usize = 16;
/// Longest device id a device can hold.
pub const MAX_ID: usize = 32;
/// Reply slots per device (replies kept until acknowledged): commands come one at a time, so a
/// few slots cover the broker's burst after a reconnect; a full outbox holds further commands
/// back rather than dropping their replies.
pub const REPLIES: usize = 8;
/// Longest MQTT 5 response topic a device stores for its reply.
pub const MAX_RESPONSE_TOPIC: usize = 128;
/// Longest MQTT 5 correlation data a device echoes.
pub const MAX_CORRELATION: usize = 64;
/// How many of the latest command numbers a device remembers to recognise duplicates.
const DEDUP_WINDOW: u64 = 64;

/// What a device does when a reading is due and its outbox is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FullPolicy {
    /// Skip the reading (no sequence number is used) and count it as blocked.
    Block,
    /// Evict the oldest unacknowledged reading (its sequence number is lost) and count it.
    DropOldest,
}

/// How a device samples and buffers. Built once per device by the fleet runner.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceConfig {
    /// Seed of the reading walk (combined with the device id, so devices differ).
    pub seed: u64,
    /// Microseconds between readings; 0 samples whenever the outbox has room ("flat out").
    pub interval_us: u64,
    /// Pad each message to at least this many bytes (0: no padding).
    pub payload_bytes: usize,
    pub policy: FullPolicy,
    /// Outbox slots in use, at most `Q`; a smaller outbox makes the full policies easy to reach.
    pub outbox_limit: usize,
    /// Stop after this many readings; `None` samples until [`Device::stop_sampling`].
    pub count: Option<u64>,
}

/// Why a device could not be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DeviceError {
    /// The id does not fit the device's fixed id buffer.
    #[error("device id {id:?} is longer than {MAX_ID} bytes")]
    IdTooLong { id: String },
    /// `outbox_limit` is zero or larger than the compiled outbox.
    #[error("outbox limit {limit} must be between 1 and {capacity}")]
    OutboxLimit { limit: usize, capacity: usize },
    /// A reading padded to `payload_bytes` does not fit the message buffer.
    #[error("a {requested}-byte payload does not fit the {capacity}-byte message buffer")]
    PayloadTooLarge { requested: usize, capacity: usize },
}

/// A message the transport should publish now.
#[derive(Debug, PartialEq, Eq)]
pub struct Transmit<'a> {
    pub seq: u64,
    pub payload: &'a [u8],
    /// Sent before on an earlier connection (MQTT DUP flag).
    pub dup: bool,
}

/// What a [`Device::tick`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickOutcome {
    /// Nothing was due.
    Idle,
    /// A reading was taken and queued for sending.
    Sampled { seq: u64 },
    /// A reading was due, but the outbox was full (policy `block`): skipped.
    Blocked,
    /// A reading was taken; the outbox was full, so the oldest reading `dropped` was evicted.
    SampledDroppedOldest { seq: u64, dropped: u64 },
}

/// What an acknowledgement referred to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The reading left the outbox.
    Acked,
    /// The reading had already been dropped from a full outbox while it was in flight: it was
    /// delivered after all.
    AckedAfterDrop,
}

/// Counters a device keeps (they fit in a few words, as on a microcontroller).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeviceStats {
    /// Readings taken (= sequence numbers used).
    pub sampled: u64,
    /// First transmissions.
    pub sent: u64,
    /// Retransmissions after a reconnect or a negative acknowledgement.
    pub resent: u64,
    pub acked: u64,
    /// Negative acknowledgements (MQTT 5 reason codes), each followed by a resend.
    pub nacked: u64,
    /// Readings evicted from a full outbox (policy `drop-oldest`).
    pub dropped: u64,
    /// Readings skipped because the outbox was full (policy `block`).
    pub blocked: u64,
    /// Sample slots skipped because the caller ticked too late to catch up (simulator overload).
    pub late: u64,
    /// Readings that failed to encode (never expected; counted rather than panicking).
    pub encode_errors: u64,
    /// Successful connections (the first one included).
    pub connects: u64,
    /// Commands taken, by kind (duplicates included).
    pub commands_ping: u64,
    pub commands_set_rate: u64,
    pub commands_reboot: u64,
    /// Commands whose number had been seen before (answered again, not acted on again).
    pub commands_duplicate: u64,
    /// Commands that could not be parsed or answered (never acted on, never answered).
    pub commands_bad: u64,
    /// First transmissions of replies.
    pub replies_sent: u64,
    /// Retransmissions of replies after a reconnect or a refusal.
    pub replies_resent: u64,
    pub replies_acked: u64,
    /// Reboots done (disconnect and reconnect after a `reboot` command's reply was acknowledged).
    pub reboots: u64,
}

/// What [`Device::command`] did with a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandOutcome {
    /// Taken and a reply queued. `duplicate`: its number had been seen before, so it was answered
    /// again but not acted on again.
    Accepted {
        kind: CommandKind,
        n: u64,
        duplicate: bool,
    },
    /// The reply outbox is full: offer the command again after a reply is acknowledged.
    Busy,
    /// Not acted on and not answered (counted as `commands_bad`).
    Bad(CommandError),
}

/// A reply the transport should publish now (QoS 1).
#[derive(Debug, PartialEq, Eq)]
pub struct ReplyTransmit<'a> {
    /// Names this reply in [`Device::reply_acked`] / [`Device::reply_nacked`].
    pub key: u64,
    /// The command's MQTT 5 response topic; `None`: the runner's default reply topic.
    pub response_topic: Option<&'a str>,
    /// The command's MQTT 5 correlation data, echoed.
    pub correlation: Option<&'a [u8]>,
    pub payload: &'a [u8],
    /// Sent before on an earlier connection.
    pub dup: bool,
}

#[derive(Debug)]
struct ReplyEntry {
    key: u64,
    in_flight: bool,
    sent_before: bool,
    /// A `reboot` reply: reboot once it is acknowledged.
    reboot_after: bool,
    response_topic: Option<heapless::String<MAX_RESPONSE_TOPIC>>,
    correlation: Option<heapless::Vec<u8, MAX_CORRELATION>>,
    payload: heapless::Vec<u8, REPLY_BYTES>,
}

/// Recognises repeated command numbers: the highest number seen and a bitmap of the
/// [`DEDUP_WINDOW`] numbers below it (as an anti-replay window). A number older than the window
/// counts as seen.
#[derive(Debug, Default, Clone, Copy)]
struct Dedup {
    max: Option<u64>,
    /// Bit i: `max - i` was seen.
    window: u64,
}

impl Dedup {
    /// Whether `n` was seen before (and marks it seen).
    fn seen(&mut self, n: u64) -> bool {
        let Some(max) = self.max else {
            self.max = Some(n);
            self.window = 1;
            return false;
        };
        if n > max {
            let shift = n - max;
            self.window = if shift >= DEDUP_WINDOW {
                0
            } else {
                self.window << shift
            } | 1;
            self.max = Some(n);
            return false;
        }
        let back = max - n;
        if back >= DEDUP_WINDOW {
            return true;
        }
        let bit = 1u64 << back;
        let seen = self.window & bit != 0;
        self.window |= bit;
        seen
    }
}

#[derive(Debug)]
struct Entry<const N: usize> {
    seq: u64,
    /// Transmitted on the current connection and not yet acknowledged.
    in_flight: bool,
    /// Transmitted at least once.
    sent_before: bool,
    payload: heapless::Vec<u8, N>,
}

/// The deterministic reading generator: a SplitMix64 stream driving a bounded random walk.
#[derive(Debug, Clone)]
struct Walk {
    rng: u64,
    temp_c: f32,
    humidity_pct: f32,
    battery_v: f32,
}

impl Walk {
    fn new(seed: u64, id: &str) -> Self {
        let mut rng = seed ^ fnv1a(id.as_bytes());
        let mut unit = || unit_f32(splitmix64(&mut rng));
        let (t, h, b) = (unit(), unit(), unit());
        Walk {
            rng,
            temp_c: 15.0 + 10.0 * t,
            humidity_pct: 30.0 + 40.0 * h,
            battery_v: 3.6 + 0.5 * b,
        }
    }

    fn next_u64(&mut self) -> u64 {
        splitmix64(&mut self.rng)
    }

    fn step(&mut self) -> (f32, f32, f32) {
        let (t, h, b) = (
            unit_f32(self.next_u64()),
            unit_f32(self.next_u64()),
            unit_f32(self.next_u64()),
        );
        self.temp_c = (self.temp_c + (t - 0.5) * 0.2).clamp(-20.0, 50.0);
        self.humidity_pct = (self.humidity_pct + (h - 0.5)).clamp(0.0, 100.0);
        self.battery_v = (self.battery_v - b * 0.0005).max(3.0);
        (
            round2(self.temp_c),
            round2(self.humidity_pct),
            round3(self.battery_v),
        )
    }
}

/// SplitMix64: tiny, fast, and good enough for sensor noise and jitter.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a, to mix the device id into its seed.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn unit_f32(x: u64) -> f32 {
    // 24 random bits: exact in an f32, uniform in [0, 1).
    (x >> 40) as f32 / (1u64 << 24) as f32
}

fn round2(x: f32) -> f32 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f32) -> f32 {
    (x * 1000.0).round() / 1000.0
}

/// A simulated sensor with `N`-byte message buffers and `Q` outbox slots.
#[derive(Debug)]
pub struct Device<const N: usize, const Q: usize> {
    id: heapless::String<MAX_ID>,
    cfg: DeviceConfig,
    walk: Walk,
    next_seq: u64,
    /// When the next reading is due; `None` before the first tick.
    next_due_us: Option<u64>,
    sampling: bool,
    connected: bool,
    /// Transmissions on this connection not yet acknowledged (dropped entries included).
    in_flight: usize,
    outbox: heapless::Deque<Entry<N>, Q>,
    /// Readings evicted while in flight on this connection: their acknowledgement may still come.
    dropped_in_flight: heapless::Vec<u64, Q>,
    /// Replies to commands, oldest first, until acknowledged.
    replies: heapless::Deque<ReplyEntry, REPLIES>,
    next_reply_key: u64,
    dedup: Dedup,
    /// A reboot reply was acknowledged: the runner should disconnect and reconnect.
    reboot_due: bool,
    stats: DeviceStats,
}

impl<const N: usize, const Q: usize> Device<N, Q> {
    pub fn new(id: &str, cfg: DeviceConfig) -> Result<Self, DeviceError> {
        let id_buf = heapless::String::try_from(id)
            .map_err(|_| DeviceError::IdTooLong { id: id.to_owned() })?;
        if cfg.outbox_limit == 0 || cfg.outbox_limit > Q {
            return Err(DeviceError::OutboxLimit {
                limit: cfg.outbox_limit,
                capacity: Q,
            });
        }
        // The largest reading this device can produce must fit its buffer.
        let worst = Reading {
            device_id: id,
            seq: u64::MAX,
            sample_time_ms: u64::MAX,
            temp_c: f32::MIN,
            humidity_pct: f32::MIN,
            battery_v: f32::MIN,
        };
        let mut probe = heapless::Vec::<u8, N>::new();
        payload::encode(&worst, cfg.payload_bytes, &mut probe).map_err(|_| {
            DeviceError::PayloadTooLarge {
                requested: cfg.payload_bytes,
                capacity: N,
            }
        })?;
        let walk = Walk::new(cfg.seed, id);
        Ok(Device {
            id: id_buf,
            cfg,
            walk,
            next_seq: 0,
            next_due_us: None,
            sampling: true,
            connected: false,
            in_flight: 0,
            outbox: heapless::Deque::new(),
            dropped_in_flight: heapless::Vec::new(),
            replies: heapless::Deque::new(),
            next_reply_key: 0,
            dedup: Dedup::default(),
            reboot_due: false,
            stats: DeviceStats::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn stats(&self) -> &DeviceStats {
        &self.stats
    }

    /// The next sequence number (= readings taken so far).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Readings waiting in the outbox (unacknowledged, not dropped).
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Sequence numbers still in the outbox, oldest first, with whether each was ever sent.
    pub fn unacked(&self) -> impl Iterator<Item = (u64, bool)> + '_ {
        self.outbox.iter().map(|e| (e.seq, e.sent_before))
    }

    /// Still going to take readings (count not reached and not stopped).
    pub fn is_sampling(&self) -> bool {
        self.sampling && self.cfg.count.is_none_or(|n| self.next_seq < n)
    }

    /// Nothing left to do: no more readings to take and nothing (reading or reply) waiting for
    /// an acknowledgement.
    pub fn is_finished(&self) -> bool {
        !self.is_sampling() && self.outbox.is_empty() && self.replies.is_empty()
    }

    /// The current sampling interval in microseconds (0: flat out); `set_rate` changes it.
    pub fn interval_us(&self) -> u64 {
        self.cfg.interval_us
    }

    /// Replies waiting for an acknowledgement.
    pub fn replies_pending(&self) -> usize {
        self.replies.len()
    }

    /// Stop taking readings (end of a timed run); what is in the outbox is still sent.
    pub fn stop_sampling(&mut self) {
        self.sampling = false;
    }

    fn outbox_full(&self) -> bool {
        self.outbox.len() >= self.cfg.outbox_limit
    }

    /// When [`tick`](Self::tick) should next be called (absolute, microseconds), or `None` if no
    /// reading will be due until something else happens (an ack frees a slot, or never).
    /// Before the first tick it is `now_us`: the first tick places the first reading.
    pub fn next_wakeup(&self, now_us: u64) -> Option<u64> {
        if !self.is_sampling() {
            return None;
        }
        if self.cfg.interval_us == 0 {
            // Flat out: sample as soon as there is room, never evict.
            return (!self.outbox_full()).then_some(now_us);
        }
        Some(self.next_due_us.unwrap_or(now_us))
    }

    /// Advances time: takes at most one reading if one is due. Call it again while
    /// [`next_wakeup`](Self::next_wakeup) is not in the future; each call catches up one slot.
    pub fn tick(&mut self, now_us: u64) -> TickOutcome {
        if !self.is_sampling() {
            return TickOutcome::Idle;
        }
        let interval = self.cfg.interval_us;
        if interval == 0 {
            if self.outbox_full() {
                return TickOutcome::Idle;
            }
            return self.sample(now_us);
        }
        let due = match self.next_due_us {
            Some(due) => due,
            None => {
                // First tick: start at a seed-determined phase within one interval, so a fleet
                // started at once does not sample in lockstep.
                let phase = self.walk.next_u64() % interval;
                self.next_due_us = Some(now_us + phase);
                now_us + phase
            }
        };
        if now_us < due {
            return TickOutcome::Idle;
        }
        // Catch up at most Q slots; beyond that the caller is overloaded: skip and count.
        let behind = (now_us - due) / interval;
        let next = if behind > Q as u64 {
            self.stats.late += behind;
            now_us + interval
        } else {
            due + interval
        };
        self.next_due_us = Some(next);
        if self.outbox_full() && self.cfg.policy == FullPolicy::Block {
            self.stats.blocked += 1;
            return TickOutcome::Blocked;
        }
        self.sample(now_us)
    }

    fn sample(&mut self, now_us: u64) -> TickOutcome {
        let dropped = if self.outbox_full() {
            // Invariant: a full outbox is not empty (outbox_limit >= 1).
            self.outbox.pop_front().map(|e| {
                self.stats.dropped += 1;
                if e.in_flight {
                    // Invariant: at most Q transmissions are in flight, so this has room.
                    let _ = self.dropped_in_flight.push(e.seq);
                }
                e.seq
            })
        } else {
            None
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stats.sampled += 1;
        let (temp_c, humidity_pct, battery_v) = self.walk.step();
        let reading = Reading {
            device_id: &self.id,
            seq,
            sample_time_ms: now_us / 1000,
            temp_c,
            humidity_pct,
            battery_v,
        };
        let mut payload = heapless::Vec::new();
        if payload::encode(&reading, self.cfg.payload_bytes, &mut payload).is_err() {
            // Checked at construction with the largest reading; kept as a counted no-op.
            self.stats.encode_errors += 1;
            return TickOutcome::Idle;
        }
        let entry = Entry {
            seq,
            in_flight: false,
            sent_before: false,
            payload,
        };
        if self.outbox.push_back(entry).is_err() {
            // Unreachable: the outbox had room or we just evicted one.
            self.stats.encode_errors += 1;
            return TickOutcome::Idle;
        }
        match dropped {
            Some(dropped) => TickOutcome::SampledDroppedOldest { seq, dropped },
            None => TickOutcome::Sampled { seq },
        }
    }

    /// The next message to publish, if connected and the in-flight window has room. Call until
    /// `None` after every event.
    pub fn poll_transmit(&mut self) -> Option<Transmit<'_>> {
        if !self.connected || self.in_flight >= Q {
            return None;
        }
        let entry = self.outbox.iter_mut().find(|e| !e.in_flight)?;
        entry.in_flight = true;
        let dup = entry.sent_before;
        entry.sent_before = true;
        if dup {
            self.stats.resent += 1;
        } else {
            self.stats.sent += 1;
        }
        self.in_flight += 1;
        Some(Transmit {
            seq: entry.seq,
            payload: &entry.payload,
            dup,
        })
    }

    /// The transport is connected (CONNACK accepted): everything unacknowledged goes again.
    pub fn connected(&mut self) {
        self.connected = true;
        self.stats.connects += 1;
        self.in_flight = 0;
        self.dropped_in_flight.clear();
        for e in self.outbox.iter_mut() {
            e.in_flight = false;
        }
        for r in self.replies.iter_mut() {
            r.in_flight = false;
        }
    }

    /// The connection is gone: nothing is in flight any more; the outboxes keep everything.
    pub fn disconnected(&mut self) {
        self.connected = false;
        self.in_flight = 0;
        self.dropped_in_flight.clear();
        for e in self.outbox.iter_mut() {
            e.in_flight = false;
        }
        for r in self.replies.iter_mut() {
            r.in_flight = false;
        }
    }

    /// A command arrived on the command topic level `name` (`ping`, `set_rate`, `reboot`), with
    /// the MQTT 5 response topic and correlation data if it carried them. Acts on it and queues
    /// the reply; see [`CommandOutcome`]. Never panics on what the network sent.
    pub fn command(
        &mut self,
        now_us: u64,
        name: &str,
        payload: &[u8],
        response_topic: Option<&str>,
        correlation: Option<&[u8]>,
    ) -> CommandOutcome {
        let cmd = match command::parse_command(name, payload) {
            Ok(cmd) => cmd,
            Err(e) => {
                self.stats.commands_bad += 1;
                return CommandOutcome::Bad(e);
            }
        };
        if self.replies.is_full() {
            return CommandOutcome::Busy;
        }
        let mut entry = ReplyEntry {
            key: self.next_reply_key,
            in_flight: false,
            sent_before: false,
            reboot_after: false,
            response_topic: None,
            correlation: None,
            payload: heapless::Vec::new(),
        };
        let built = (|| {
            if let Some(t) = response_topic {
                let t = heapless::String::try_from(t)
                    .map_err(|_| CommandError::TooLong("response topic"))?;
                entry.response_topic = Some(t);
            }
            if let Some(c) = correlation {
                let c = heapless::Vec::from_slice(c)
                    .map_err(|_| CommandError::TooLong("correlation data"))?;
                entry.correlation = Some(c);
            }
            command::encode_reply(&cmd, &mut entry.payload)
        })();
        if let Err(e) = built {
            self.stats.commands_bad += 1;
            return CommandOutcome::Bad(e);
        }
        let duplicate = self.dedup.seen(cmd.n);
        match cmd.kind {
            CommandKind::Ping => self.stats.commands_ping += 1,
            CommandKind::SetRate => self.stats.commands_set_rate += 1,
            CommandKind::Reboot => self.stats.commands_reboot += 1,
        }
        if duplicate {
            self.stats.commands_duplicate += 1;
        } else {
            match cmd.kind {
                CommandKind::Ping => {}
                CommandKind::SetRate => {
                    if let Some(ms) = cmd.rate_ms {
                        self.set_interval(now_us, ms.saturating_mul(1000));
                    }
                }
                // A repeated reboot is only answered: rebooting again could loop.
                CommandKind::Reboot => entry.reboot_after = true,
            }
        }
        self.next_reply_key += 1;
        // Invariant: checked not full above.
        if self.replies.push_back(entry).is_err() {
            return CommandOutcome::Busy;
        }
        CommandOutcome::Accepted {
            kind: cmd.kind,
            n: cmd.n,
            duplicate,
        }
    }

    /// A new sampling interval from `now_us` on: the next reading is due at most one new
    /// interval from now.
    fn set_interval(&mut self, now_us: u64, interval_us: u64) {
        self.cfg.interval_us = interval_us;
        if let Some(due) = self.next_due_us {
            self.next_due_us = Some(due.min(now_us.saturating_add(interval_us)));
        }
    }

    /// The next reply to publish (oldest first), if connected. Call until `None` after every
    /// event, before [`poll_transmit`](Self::poll_transmit).
    pub fn poll_reply(&mut self) -> Option<ReplyTransmit<'_>> {
        if !self.connected {
            return None;
        }
        let r = self.replies.iter_mut().find(|r| !r.in_flight)?;
        r.in_flight = true;
        let dup = r.sent_before;
        r.sent_before = true;
        if dup {
            self.stats.replies_resent += 1;
        } else {
            self.stats.replies_sent += 1;
        }
        Some(ReplyTransmit {
            key: r.key,
            response_topic: r.response_topic.as_deref(),
            correlation: r.correlation.as_deref(),
            payload: &r.payload,
            dup,
        })
    }

    /// The reply `key` was acknowledged (PUBACK). A stale or repeated ack is ignored.
    pub fn reply_acked(&mut self, key: u64) {
        let Some(reboot) = self
            .replies
            .iter()
            .find(|r| r.key == key && r.in_flight)
            .map(|r| r.reboot_after)
        else {
            return;
        };
        self.replies.retain(|r| r.key != key);
        self.stats.replies_acked += 1;
        if reboot {
            self.reboot_due = true;
        }
    }

    /// The reply `key` was refused (MQTT 5 error reason): it is sent again.
    pub fn reply_nacked(&mut self, key: u64) {
        if let Some(r) = self
            .replies
            .iter_mut()
            .find(|r| r.key == key && r.in_flight)
        {
            r.in_flight = false;
        }
    }

    /// Whether the runner should reboot now (disconnect, then reconnect); true once per
    /// acknowledged `reboot` reply.
    pub fn take_reboot(&mut self) -> bool {
        let due = self.reboot_due;
        if due {
            self.reboot_due = false;
            self.stats.reboots += 1;
        }
        due
    }

    /// The transmission of `seq` on this connection was acknowledged (PUBACK for QoS 1,
    /// PUBCOMP for QoS 2, written to the socket for QoS 0). `None`: not in flight (a stale or
    /// repeated acknowledgement), ignored.
    pub fn acked(&mut self, seq: u64) -> Option<AckOutcome> {
        let before = self.outbox.len();
        self.outbox.retain(|e| !(e.seq == seq && e.in_flight));
        let outcome = if self.outbox.len() < before {
            AckOutcome::Acked
        } else if let Some(i) = self.dropped_in_flight.iter().position(|&s| s == seq) {
            self.dropped_in_flight.swap_remove(i);
            AckOutcome::AckedAfterDrop
        } else {
            return None;
        };
        self.in_flight = self.in_flight.saturating_sub(1);
        self.stats.acked += 1;
        Some(outcome)
    }

    /// The transmission of `seq` was refused (an MQTT 5 PUBACK/PUBREC with an error reason): it
    /// stays in the outbox and is sent again.
    pub fn nacked(&mut self, seq: u64) {
        if let Some(e) = self.outbox.iter_mut().find(|e| e.seq == seq && e.in_flight) {
            e.in_flight = false;
            self.in_flight = self.in_flight.saturating_sub(1);
            self.stats.nacked += 1;
        } else if let Some(i) = self.dropped_in_flight.iter().position(|&s| s == seq) {
            // A dropped reading was refused: it is simply gone.
            self.dropped_in_flight.swap_remove(i);
            self.in_flight = self.in_flight.saturating_sub(1);
            self.stats.nacked += 1;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::payload::decode;

    type Dev = Device<SMALL_MSG, 8>;

    fn cfg(policy: FullPolicy, outbox_limit: usize) -> DeviceConfig {
        DeviceConfig {
            seed: 7,
            interval_us: 1_000,
            payload_bytes: 0,
            policy,
            outbox_limit,
            count: None,
        }
    }

    /// Ticks until one reading was taken (or the policy refused one); returns the outcome.
    fn sample_once(d: &mut Dev, now: &mut u64) -> TickOutcome {
        loop {
            let out = d.tick(*now);
            *now += 1_000;
            if out != TickOutcome::Idle {
                return out;
            }
        }
    }

    fn transmit_all(d: &mut Dev) -> Vec<(u64, bool)> {
        let mut v = Vec::new();
        while let Some(t) = d.poll_transmit() {
            v.push((t.seq, t.dup));
        }
        v
    }

    #[test]
    fn sequence_numbers_start_at_zero_and_survive_reconnects() {
        let mut d = Dev::new("dev-00001", cfg(FullPolicy::Block, 8)).unwrap();
        let mut now = 1_000_000;
        d.connected();
        for expect in 0..3 {
            assert_eq!(
                sample_once(&mut d, &mut now),
                TickOutcome::Sampled { seq: expect }
            );
        }
        assert_eq!(transmit_all(&mut d), [(0, false), (1, false), (2, false)]);
        assert_eq!(d.acked(0), Some(AckOutcome::Acked));
        // The connection drops with 1 and 2 unacknowledged; a reading taken offline waits.
        d.disconnected();
        assert_eq!(
            sample_once(&mut d, &mut now),
            TickOutcome::Sampled { seq: 3 }
        );
        assert_eq!(d.poll_transmit(), None, "nothing is sent while offline");
        // A stale ack from the old connection is ignored.
        assert_eq!(d.acked(1), None);
        d.connected();
        assert_eq!(transmit_all(&mut d), [(1, true), (2, true), (3, false)]);
        for seq in 1..=3 {
            assert_eq!(d.acked(seq), Some(AckOutcome::Acked));
        }
        assert_eq!(d.acked(3), None, "a repeated ack is ignored");
        // Numbers continue after the reconnect, never restart.
        assert_eq!(
            sample_once(&mut d, &mut now),
            TickOutcome::Sampled { seq: 4 }
        );
        let s = d.stats();
        assert_eq!(
            (s.sampled, s.sent, s.resent, s.acked, s.connects),
            (5, 4, 2, 4, 2)
        );
    }

    #[test]
    fn full_outbox_blocks_sampling_and_counts_it() {
        let mut d = Dev::new("dev-00001", cfg(FullPolicy::Block, 3)).unwrap();
        let mut now = 0;
        for seq in 0..3 {
            assert_eq!(sample_once(&mut d, &mut now), TickOutcome::Sampled { seq });
        }
        assert_eq!(sample_once(&mut d, &mut now), TickOutcome::Blocked);
        assert_eq!(sample_once(&mut d, &mut now), TickOutcome::Blocked);
        assert_eq!(d.stats().blocked, 2);
        assert_eq!(d.outbox_len(), 3);
        // A blocked reading uses no sequence number: the next one is 3.
        d.connected();
        assert_eq!(transmit_all(&mut d).len(), 3);
        d.acked(0);
        assert_eq!(
            sample_once(&mut d, &mut now),
            TickOutcome::Sampled { seq: 3 }
        );
        assert_eq!(d.unacked().map(|(s, _)| s).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn full_outbox_drops_the_oldest_and_counts_it() {
        let mut d = Dev::new("dev-00001", cfg(FullPolicy::DropOldest, 3)).unwrap();
        let mut now = 0;
        d.connected();
        for seq in 0..3 {
            sample_once(&mut d, &mut now);
            assert_eq!(transmit_all(&mut d), [(seq, false)]);
        }
        // 0, 1, 2 in flight; the broker is slow. Two more readings evict 0 and 1.
        assert_eq!(
            sample_once(&mut d, &mut now),
            TickOutcome::SampledDroppedOldest { seq: 3, dropped: 0 }
        );
        assert_eq!(
            sample_once(&mut d, &mut now),
            TickOutcome::SampledDroppedOldest { seq: 4, dropped: 1 }
        );
        assert_eq!(d.stats().dropped, 2);
        assert_eq!(d.unacked().map(|(s, _)| s).collect::<Vec<_>>(), [2, 3, 4]);
        // The ack for 0 still arrives: it was delivered after all.
        assert_eq!(d.acked(0), Some(AckOutcome::AckedAfterDrop));
        assert_eq!(transmit_all(&mut d), [(3, false), (4, false)]);
        assert_eq!(d.acked(2), Some(AckOutcome::Acked));
        // After a reconnect, the dropped reading 1 is not resent; 3 and 4 are.
        d.disconnected();
        d.connected();
        assert_eq!(transmit_all(&mut d), [(3, true), (4, true)]);
    }

    #[test]
    fn flat_out_fills_the_outbox_and_never_drops() {
        let mut c = cfg(FullPolicy::DropOldest, 4);
        c.interval_us = 0;
        let mut d = Dev::new("dev-00001", c).unwrap();
        let now = 5_000;
        let mut taken = 0;
        while d.next_wakeup(now).is_some_and(|t| t <= now) {
            assert!(matches!(d.tick(now), TickOutcome::Sampled { .. }));
            taken += 1;
        }
        assert_eq!(taken, 4);
        assert_eq!(d.next_wakeup(now), None, "waits for an ack");
        d.connected();
        transmit_all(&mut d);
        d.acked(0);
        assert_eq!(d.next_wakeup(now), Some(now));
        assert_eq!(d.stats().dropped, 0);
    }

    #[test]
    fn count_limits_readings_and_finishes_when_all_are_acked() {
        let mut c = cfg(FullPolicy::Block, 8);
        c.count = Some(3);
        let mut d = Dev::new("dev-00001", c).unwrap();
        let mut now = 0;
        d.connected();
        while d.is_sampling() {
            d.tick(now);
            now += 500;
        }
        assert_eq!(d.next_seq(), 3);
        assert_eq!(d.next_wakeup(now), None);
        assert!(!d.is_finished());
        for (seq, _) in transmit_all(&mut d) {
            d.acked(seq);
        }
        assert!(d.is_finished());
    }

    #[test]
    fn an_overloaded_caller_skips_slots_and_counts_them_late() {
        let mut d = Dev::new("dev-00001", cfg(FullPolicy::Block, 8)).unwrap();
        sample_once(&mut d, &mut 0);
        let due = d.next_wakeup(0).unwrap();
        // 100 intervals late: more than the outbox can catch up.
        assert!(matches!(d.tick(due + 100_000), TickOutcome::Sampled { .. }));
        assert_eq!(d.stats().late, 100);
        assert_eq!(d.next_wakeup(0), Some(due + 101_000));
    }

    #[test]
    fn nack_resends_in_place() {
        let mut d = Dev::new("dev-00001", cfg(FullPolicy::Block, 8)).unwrap();
        let mut now = 0;
        d.connected();
        sample_once(&mut d, &mut now);
        sample_once(&mut d, &mut now);
        assert_eq!(transmit_all(&mut d), [(0, false), (1, false)]);
        d.nacked(0);
        assert_eq!(transmit_all(&mut d), [(0, true)]);
        assert_eq!(d.stats().nacked, 1);
    }

    #[test]
    fn readings_are_deterministic_for_a_seed() {
        let run = |seed: u64, id: &str| {
            let mut c = cfg(FullPolicy::DropOldest, 8);
            c.seed = seed;
            let mut d = Dev::new(id, c).unwrap();
            d.connected();
            let mut now = 1_700_000_000_000_000;
            let mut out = Vec::new();
            for _ in 0..20 {
                sample_once(&mut d, &mut now);
                while let Some(t) = d.poll_transmit() {
                    let r = decode(t.payload).unwrap();
                    out.push((
                        r.seq,
                        r.sample_time_ms,
                        r.temp_c,
                        r.humidity_pct,
                        r.battery_v,
                    ));
                    let seq = t.seq;
                    d.acked(seq);
                }
            }
            out
        };
        let a = run(42, "dev-00001");
        assert_eq!(a.len(), 20);
        assert_eq!(a, run(42, "dev-00001"), "same seed and id: same readings");
        assert_ne!(a, run(43, "dev-00001"), "another seed: other readings");
        assert_ne!(a, run(42, "dev-00002"), "another device: other readings");
        for (_, _, t, h, b) in &a {
            assert!((-20.0..=50.0).contains(t) && (0.0..=100.0).contains(h));
            assert!((3.0..=4.2).contains(b));
        }
    }

    #[test]
    fn messages_are_cbor_of_the_configured_size() {
        let mut c = cfg(FullPolicy::Block, 8);
        c.payload_bytes = 200;
        let mut d = Dev::new("dev-00009", c).unwrap();
        d.connected();
        sample_once(&mut d, &mut 1_000_000_000);
        let t = d.poll_transmit().unwrap();
        assert_eq!(t.payload.len(), 200);
        let r = decode(t.payload).unwrap();
        assert_eq!((r.device_id.as_str(), r.seq), ("dev-00009", 0));
    }

    #[test]
    fn construction_rejects_what_does_not_fit() {
        let mut c = cfg(FullPolicy::Block, 8);
        c.payload_bytes = SMALL_MSG + 1;
        assert!(matches!(
            Dev::new("dev-1", c),
            Err(DeviceError::PayloadTooLarge { .. })
        ));
        assert!(matches!(
            Dev::new("dev-1", cfg(FullPolicy::Block, 9)),
            Err(DeviceError::OutboxLimit { .. })
        ));
        assert!(matches!(
            Dev::new(&"d".repeat(MAX_ID + 1), cfg(FullPolicy::Block, 1)),
            Err(DeviceError::IdTooLong { .. })
        ));
    }

    fn replies(d: &mut Dev) -> Vec<(u64, String, bool)> {
        let mut v = Vec::new();
        while let Some(r) = d.poll_reply() {
            v.push((r.key, String::from_utf8(r.payload.to_vec()).unwrap(), r.dup));
        }
        v
    }

    fn cmd(d: &mut Dev, name: &str, n: u64) -> CommandOutcome {
        let payload = crate::command::encode_command(
            "dev-00001",
            n,
            CommandKind::from_name(name).unwrap(),
            Some(250),
        );
        d.command(0, name, &payload, None, None)
    }

    #[test]
    fn ping_is_answered_with_its_id_and_correlation_data() {
        let mut d = Dev::new("dev-00001", cfg(FullPolicy::Block, 8)).unwrap();
        let payload = br#"{"id":"dev-00001:0","n":0,"cmd":"ping"}"#;
        let out = d.command(0, "ping", payload, Some("svc/replies/42"), Some(b"corr-1"));
        assert_eq!(
            out,
            CommandOutcome::Accepted {
                kind: CommandKind::Ping,
                n: 0,
                duplicate: false
            }
        );
        assert_eq!(d.poll_reply(), None, "nothing is sent while offline");
        d.connected();
        let r = d.poll_reply().unwrap();
        assert_eq!(r.response_topic, Some("svc/replies/42"));
        assert_eq!(r.correlation, Some(&b"corr-1"[..]));
        assert_eq!(r.payload, br#"{"id":"dev-00001:0","cmd":"ping","n":0}"#);
        assert!(!r.dup);
        let key = r.key;
        assert!(!d.is_finished() || d.is_sampling());
        d.reply_acked(key);
        assert_eq!(d.replies_pending(), 0);
        let s = d.stats();
        assert_eq!(
            (s.commands_ping, s.replies_sent, s.replies_acked),
            (1, 1, 1)
        );
    }

    #[test]
    fn bad_commands_are_counted_and_never_answered() {
        let mut d = Dev::new("dev-00001", cfg(FullPolicy::Block, 8)).unwrap();
        d.connected();
        for (name, payload) in [
            ("ping", &b"hi"[..]),
            ("selfdestruct", &br#"{"id":"a:1","n":1}"#[..]),
            ("set_rate", &br#"{"id":"a:1","n":1}"#[..]),
            ("ping", &b"\xff"[..]),
        ] {
            assert!(matches!(
                d.command(0, name, payload, None, None),
                CommandOutcome::Bad(_)
            ));
        }
        let long_topic = "t".repeat(MAX_RESPONSE_TOPIC + 1);
        let ok = br#"{"id":"a:1","n":1}"#;
        assert!(matches!(
            d.command(0, "ping", ok, Some(&long_topic), None),
            CommandOutcome::Bad(CommandError::TooLong(_))
        ));
        assert!(matches!(
            d.command(0, "ping", ok, None, Some(&[0u8; MAX_CORRELATION + 1])),
            CommandOutcome::Bad(CommandError::TooLong(_))
        ));
        assert_eq!(d.stats().commands_bad, 6);
        assert_eq!(d.poll_reply(), None);
        // A bad command does not mark its number seen: the good one is not a duplicate.
        assert!(matches!(
            d.command(0, "ping", ok, None, None),
            CommandOutcome::Accepted {
                duplicate: false,
                ..
            }
        ));
    }

    #[test]
    fn set_rate_changes_the_sampling_interval() {
        let mut d = Dev::new("dev-00001", cfg(FullPolicy::Block, 8)).unwrap();
        let mut now = 0;
        sample_once(&mut d, &mut now);
        assert_eq!(d.interval_us(), 1_000);
        let p = br#"{"id":"dev-00001:9","n":9,"cmd":"set_rate","rate_ms":250}"#;
        assert!(matches!(
            d.command(now, "set_rate", p, None, None),
            CommandOutcome::Accepted {
                kind: CommandKind::SetRate,
                ..
            }
        ));
        assert_eq!(d.interval_us(), 250_000);
        // The next reading is due within one new interval; the one after, a full interval later.
        let due = d.next_wakeup(now).unwrap();
        assert!(due <= now + 250_000);
        assert!(matches!(d.tick(due), TickOutcome::Sampled { .. }));
        assert_eq!(d.next_wakeup(due), Some(due + 250_000));
    }

    #[test]
    fn reboot_is_due_only_after_its_reply_is_acknowledged() {
        let mut d = Dev::new("dev-00001", cfg(FullPolicy::Block, 8)).unwrap();
        d.connected();
        assert!(matches!(
            cmd(&mut d, "reboot", 0),
            CommandOutcome::Accepted {
                kind: CommandKind::Reboot,
                ..
            }
        ));
        assert!(matches!(
            cmd(&mut d, "ping", 1),
            CommandOutcome::Accepted { .. }
        ));
        let sent = replies(&mut d);
        assert_eq!(sent.len(), 2);
        assert!(!d.take_reboot());
        // The connection drops before the ack: both replies go again, in order, marked dup.
        d.disconnected();
        assert!(!d.take_reboot());
        d.connected();
        let again = replies(&mut d);
        assert_eq!(
            again.iter().map(|r| (r.0, r.2)).collect::<Vec<_>>(),
            [(sent[0].0, true), (sent[1].0, true)]
        );
        d.reply_acked(sent[0].0);
        assert!(d.take_reboot());
        assert!(!d.take_reboot(), "once per reboot command");
        assert_eq!(d.stats().reboots, 1);
        // A repeated reboot command is answered but does not reboot again.
        assert!(matches!(
            cmd(&mut d, "reboot", 0),
            CommandOutcome::Accepted {
                duplicate: true,
                ..
            }
        ));
        let r = replies(&mut d);
        d.reply_acked(sent[1].0);
        d.reply_acked(r[0].0);
        assert!(!d.take_reboot());
        assert_eq!(d.replies_pending(), 0);
    }

    #[test]
    fn duplicates_are_answered_again_and_counted() {
        let mut d = Dev::new("dev-00001", cfg(FullPolicy::Block, 8)).unwrap();
        d.connected();
        for n in [0, 1, 2, 1, 5, 3, 5] {
            assert!(matches!(
                cmd(&mut d, "ping", n),
                CommandOutcome::Accepted { .. }
            ));
            for (key, _, _) in replies(&mut d) {
                d.reply_acked(key);
            }
        }
        assert_eq!(d.stats().commands_duplicate, 2);
        assert_eq!(d.stats().replies_acked, 7);
        // Beyond the window: 100 then 10 (too old to tell) counts as a duplicate.
        cmd(&mut d, "ping", 100);
        assert!(matches!(
            cmd(&mut d, "ping", 10),
            CommandOutcome::Accepted {
                duplicate: true,
                ..
            }
        ));
        assert!(matches!(
            cmd(&mut d, "ping", 99),
            CommandOutcome::Accepted {
                duplicate: false,
                ..
            }
        ));
    }

    #[test]
    fn a_full_reply_outbox_holds_commands_back() {
        let mut d = Dev::new("dev-00001", cfg(FullPolicy::Block, 8)).unwrap();
        d.connected();
        for n in 0..REPLIES as u64 {
            assert!(matches!(
                cmd(&mut d, "ping", n),
                CommandOutcome::Accepted { .. }
            ));
        }
        assert_eq!(cmd(&mut d, "ping", 99), CommandOutcome::Busy);
        let sent = replies(&mut d);
        assert_eq!(sent.len(), REPLIES);
        d.reply_acked(sent[0].0);
        assert!(matches!(
            cmd(&mut d, "ping", 99),
            CommandOutcome::Accepted {
                duplicate: false,
                ..
            }
        ));
        // Busy used no number: 99 was new when it was finally taken.
        assert_eq!(d.stats().commands_duplicate, 0);
        // Not finished while replies wait.
        d.stop_sampling();
        assert!(!d.is_finished());
        for (key, _, _) in sent.iter().skip(1) {
            d.reply_acked(*key);
        }
        for (key, _, _) in replies(&mut d) {
            d.reply_acked(key);
        }
        assert!(d.is_finished());
    }
}
