//! The I/O loop of one device: drives its state machine with time and MQTT events, and turns
//! its transmissions into rumqttc requests.
//!
//! Packet ids belong to rumqttc; the loop maps them back to sequence numbers. rumqttc reports
//! each PUBLISH it writes (`Written`), in the order the loop submitted them, so a FIFO of
//! submitted sequence numbers gives each packet id its sequence number; the ack then names the
//! packet id. A closed connection clears both maps (acks never cross connections). Replies to
//! commands share the FIFO, tagged as replies.
//!
//! With commands on, the device subscribes to its command topic after every CONNACK (subscribing
//! again is harmless and covers a broker that lost the session). A command the device cannot take
//! yet (reply outbox full) waits in a backlog, in arrival order, until a reply is acknowledged.
//! A reboot sends DISCONNECT, drops the connection and connects again after [`REBOOT_DELAY`].
//! Commands rumqttc had read (and acknowledged) but the loop had not yet polled when a
//! connection ends join the backlog rather than being dropped with the connection.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::debug;

use super::link::{self, Incoming, LinkEvent, LinkOptions, Loop, PollFuture};
use super::{Phase, Shared};
use crate::device::{AckOutcome, CommandOutcome, Device, DeviceStats, TickOutcome};
use crate::manifest::DeviceRecord;
use crate::ranges::RangeSet;

/// How long a device waits for its DISCONNECT to be written before closing anyway.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);
/// After an MQTT 5 refusal (e.g. "quota exceeded" from a full gateway queue) the device pauses
/// sending for this long, doubling while refusals continue: resending at once would only spin.
const REFUSED_BACKOFF: BackoffConfig = BackoffConfig {
    min: Duration::from_millis(50),
    max: Duration::from_secs(2),
};

/// How long a rebooting device stays offline: long enough to be a real disconnect, short enough
/// not to slow a test.
const REBOOT_DELAY: Duration = Duration::from_millis(100);

/// Exponential reconnect backoff with jitter.
#[derive(Debug, Clone, Copy)]
pub struct BackoffConfig {
    pub min: Duration,
    pub max: Duration,
}

struct Backoff {
    cfg: BackoffConfig,
    current: Duration,
    rng: u64,
}

impl Backoff {
    fn new(cfg: BackoffConfig, seed: u64) -> Self {
        Backoff {
            cfg,
            current: cfg.min,
            rng: seed,
        }
    }

    /// The next delay: uniformly in [d/2, d], then d doubles up to the maximum. The jitter keeps
    /// a fleet that lost its broker at once from reconnecting in lockstep.
    fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (d * 2).min(self.cfg.max);
        let half = d.as_micros() as u64 / 2;
        let jitter = crate::device::splitmix64(&mut self.rng) % (half + 1);
        Duration::from_micros(half + jitter)
    }

    fn reset(&mut self) {
        self.current = self.cfg.min;
    }
}

/// What the fleet runner needs to start one device.
pub struct DeviceCtx {
    pub id: String,
    pub topic: String,
    pub qos: u8,
    pub link: LinkOptions,
    /// First connection attempt (connections are spread over time at start).
    pub start_at: Instant,
    pub backoff: BackoffConfig,
    pub jitter_seed: u64,
    /// `Some`: the device takes commands.
    pub commands: Option<CommandCtx>,
}

/// Where a device takes commands and sends replies.
pub struct CommandCtx {
    /// The command topic with a trailing `/`: `devices/dev-00001/commands/`; the level after
    /// it names the command. The device subscribes to it followed by `#`.
    pub prefix: String,
    /// Replies go here unless the command carried an MQTT 5 response topic.
    pub reply_topic: String,
    /// Finish once this many distinct commands were taken and answered (with nothing else left).
    pub expect: Option<u64>,
}

/// What a submitted PUBLISH carries.
#[derive(Debug, Clone, Copy)]
enum Sent {
    Reading(u64),
    Reply(u64),
}

/// What a device reports when it stops.
pub struct DeviceOutcome {
    pub id: String,
    pub record: DeviceRecord,
    pub stats: DeviceStats,
}

/// Waits for the poll in progress, or forever if there is none.
async fn next_event(poll: &mut Option<PollFuture>) -> (Loop, LinkEvent) {
    match poll {
        Some(fut) => fut.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

pub async fn run_device<const N: usize, const Q: usize>(
    ctx: DeviceCtx,
    mut device: Box<Device<N, Q>>,
    shared: Arc<Shared>,
    mut phase_rx: watch::Receiver<Phase>,
) -> DeviceOutcome {
    let c = &shared.counters;
    let (client, lp) = link::open(&ctx.link);
    let mut idle_loop: Option<Loop> = Some(lp);
    let mut poll: Option<PollFuture> = None;
    let mut connect_at = Some(ctx.start_at);
    let mut backoff = Backoff::new(ctx.backoff, ctx.jitter_seed);
    let mut refused_backoff = Backoff::new(REFUSED_BACKOFF, !ctx.jitter_seed);
    // No transmissions before this instant (set by refusals).
    let mut hold_until: Option<Instant> = None;
    // Submitted to rumqttc, not yet written: (what, submit time).
    let mut submitted: VecDeque<(Sent, Instant)> = VecDeque::new();
    // Written, awaiting the ack: (packet id, what, submit time).
    let mut awaiting: Vec<(u16, Sent, Instant)> = Vec::new();
    // Commands received that the device could not take yet (reply outbox full), in order.
    let mut backlog: VecDeque<Box<Incoming>> = VecDeque::new();
    // Distinct commands taken.
    let mut commands_taken = 0u64;
    // A reboot's DISCONNECT is queued.
    let mut rebooting = false;
    let mut acked = RangeSet::new();
    let mut written_qos0 = RangeSet::new();
    let mut dropped = RangeSet::new();
    let mut phase = *phase_rx.borrow();
    let mut disconnect_deadline: Option<Instant> = None;

    loop {
        if phase != Phase::Running {
            device.stop_sampling();
        }
        let now = Instant::now();
        let now_us = shared.clock.micros_at(now);
        while device.next_wakeup(now_us).is_some_and(|t| t <= now_us) {
            match device.tick(now_us) {
                TickOutcome::Idle => break,
                TickOutcome::Sampled { .. } => {
                    c.sampled.fetch_add(1, Relaxed);
                }
                TickOutcome::Blocked => {
                    c.blocked.fetch_add(1, Relaxed);
                }
                TickOutcome::SampledDroppedOldest { dropped: seq, .. } => {
                    c.sampled.fetch_add(1, Relaxed);
                    c.dropped.fetch_add(1, Relaxed);
                    dropped.insert(seq);
                }
            }
        }
        if hold_until.is_some_and(|t| now >= t) {
            hold_until = None;
        }
        // Received commands go to the device until its reply outbox is full; the rest wait for
        // an acknowledged reply.
        while let Some(m) = backlog.front() {
            match offer(&ctx, device.as_mut(), now_us, m, &shared) {
                CommandOutcome::Busy => break,
                outcome => {
                    commands_taken += taken(&outcome);
                    backlog.pop_front();
                }
            }
        }
        if device.is_connected() && disconnect_deadline.is_none() && device.take_reboot() {
            debug!(device = %ctx.id, "rebooting");
            rebooting = client.disconnect().is_ok();
        }
        if disconnect_deadline.is_none() && hold_until.is_none() && !rebooting {
            if let Some(cmds) = &ctx.commands {
                while let Some(r) = device.poll_reply() {
                    let topic = r.response_topic.unwrap_or(&cmds.reply_topic);
                    if let Err(e) = client.publish_reply(topic, r.payload.to_vec(), r.correlation) {
                        shared.note_error(&ctx.id, &e.to_string());
                        phase = Phase::Abort;
                        break;
                    }
                    submitted.push_back((Sent::Reply(r.key), now));
                }
            }
            while let Some(tx) = device.poll_transmit() {
                if let Err(e) = client.publish(&ctx.topic, ctx.qos, tx.payload.to_vec()) {
                    // Only if the event loop is gone, which cannot happen while we own it.
                    shared.note_error(&ctx.id, &e.to_string());
                    phase = Phase::Abort;
                    break;
                }
                if tx.dup {
                    c.resent.fetch_add(1, Relaxed);
                } else {
                    c.sent.fetch_add(1, Relaxed);
                }
                submitted.push_back((Sent::Reading(tx.seq), now));
            }
        }

        let commands_done = match &ctx.commands {
            None => true,
            // Taking commands keeps a device online until the run ends, or until it took the
            // number it was told to expect.
            Some(cmds) => {
                backlog.is_empty()
                    && (phase != Phase::Running || cmds.expect.is_some_and(|e| commands_taken >= e))
            }
        };
        let done = (device.is_finished() && commands_done) || phase == Phase::Abort;
        if done && disconnect_deadline.is_none() {
            if device.is_connected() && client.disconnect().is_ok() {
                disconnect_deadline = Some(now + DISCONNECT_GRACE);
            } else {
                break;
            }
        }
        if disconnect_deadline.is_some_and(|d| now >= d) {
            break;
        }
        if poll.is_none() && connect_at.is_some_and(|t| now >= t) {
            if let Some(lp) = idle_loop.take() {
                poll = Some(lp.next());
                connect_at = None;
            }
        }

        let wake_device = device
            .next_wakeup(now_us)
            .map(|us| shared.clock.instant_at(us));
        let wake = [
            wake_device,
            connect_at.filter(|_| poll.is_none()),
            disconnect_deadline,
            hold_until,
        ]
        .into_iter()
        .flatten()
        .min();

        tokio::select! {
            (lp, ev) = next_event(&mut poll) => {
                poll = None;
                let mut lp = lp;
                let mut keep_polling = true;
                match ev {
                    LinkEvent::Connected => {
                        debug!(device = %ctx.id, "connected");
                        if let Some(cmds) = &ctx.commands {
                            if let Err(e) = client.subscribe(&format!("{}#", cmds.prefix)) {
                                shared.note_error(&ctx.id, &e.to_string());
                            }
                        }
                        device.connected();
                        backoff.reset();
                        c.connects.fetch_add(1, Relaxed);
                        c.online.fetch_add(1, Relaxed);
                    }
                    LinkEvent::Written { pkid } => match submitted.pop_front() {
                        Some((Sent::Reply(key), at)) => awaiting.push((pkid, Sent::Reply(key), at)),
                        Some((Sent::Reading(seq), at)) => {
                            if ctx.qos == 0 {
                                // QoS 0 has no acknowledgement: written is as far as it goes.
                                device.acked(seq);
                                written_qos0.insert(seq);
                            } else {
                                awaiting.push((pkid, Sent::Reading(seq), at));
                            }
                        }
                        None => {}
                    },
                    LinkEvent::Acked { pkid } => {
                        let found = awaiting.iter().position(|a| a.0 == pkid).map(|i| awaiting.swap_remove(i));
                        if let Some((_, Sent::Reply(key), _)) = found {
                            refused_backoff.reset();
                            device.reply_acked(key);
                            c.replies_acked.fetch_add(1, Relaxed);
                        } else if let Some((_, Sent::Reading(seq), at)) = found {
                            refused_backoff.reset();
                            if let Some(outcome) = device.acked(seq) {
                                acked.insert(seq);
                                c.acked.fetch_add(1, Relaxed);
                                if outcome == AckOutcome::AckedAfterDrop {
                                    c.acked_after_drop.fetch_add(1, Relaxed);
                                }
                                shared.record_ack(at);
                            }
                        }
                    }
                    LinkEvent::Refused { pkid, reason } => {
                        let found = awaiting.iter().position(|a| a.0 == pkid).map(|i| awaiting.swap_remove(i));
                        if let Some((_, Sent::Reply(key), _)) = found {
                            debug!(device = %ctx.id, key, %reason, "reply refused");
                            device.reply_nacked(key);
                            c.refused.fetch_add(1, Relaxed);
                            hold_until = Some(Instant::now() + refused_backoff.next_delay());
                        } else if let Some((_, Sent::Reading(seq), _)) = found {
                            debug!(device = %ctx.id, seq, %reason, "publish refused");
                            device.nacked(seq);
                            c.refused.fetch_add(1, Relaxed);
                            hold_until = Some(Instant::now() + refused_backoff.next_delay());
                        }
                    }
                    LinkEvent::Message(m) => {
                        // Handed to the device at the top of the loop, in arrival order.
                        if ctx.commands.is_some() {
                            c.commands.fetch_add(1, Relaxed);
                            backlog.push_back(m);
                        }
                    }
                    LinkEvent::DisconnectSent if rebooting && disconnect_deadline.is_none() => {
                        // The reboot: the session stays on the broker, the connection goes.
                        rebooting = false;
                        keep_polling = false;
                        let unread = lp.reset_connection();
                        take_unread(&ctx, &mut backlog, unread, c);
                        if device.is_connected() {
                            c.online.fetch_sub(1, Relaxed);
                        }
                        c.reboots.fetch_add(1, Relaxed);
                        device.disconnected();
                        submitted.clear();
                        awaiting.clear();
                        connect_at = Some(Instant::now() + REBOOT_DELAY);
                    }
                    LinkEvent::DisconnectSent => break,
                    LinkEvent::Closed { error } => {
                        keep_polling = false;
                        rebooting = false;
                        if device.is_connected() {
                            c.online.fetch_sub(1, Relaxed);
                            c.connection_losses.fetch_add(1, Relaxed);
                        } else {
                            c.connect_errors.fetch_add(1, Relaxed);
                        }
                        debug!(device = %ctx.id, %error, "connection closed");
                        shared.note_error(&ctx.id, &error);
                        device.disconnected();
                        submitted.clear();
                        awaiting.clear();
                        let unread = lp.forget_pending();
                        take_unread(&ctx, &mut backlog, unread, c);
                        if disconnect_deadline.is_some() {
                            break;
                        }
                        connect_at = Some(Instant::now() + backoff.next_delay());
                    }
                    LinkEvent::Other => {}
                }
                if keep_polling {
                    poll = Some(lp.next());
                } else {
                    idle_loop = Some(lp);
                }
            }
            _ = sleep_until(wake) => {}
            changed = phase_rx.changed() => {
                phase = match changed {
                    Ok(()) => *phase_rx.borrow_and_update(),
                    Err(_) => Phase::Abort,
                };
            }
        }
    }

    if device.is_connected() {
        c.online.fetch_sub(1, Relaxed);
    }
    let mut unacked = written_qos0;
    let mut unsent = RangeSet::new();
    for (seq, sent_before) in device.unacked() {
        if sent_before {
            unacked.insert(seq);
        } else {
            unsent.insert(seq);
        }
    }
    let stats = *device.stats();
    DeviceOutcome {
        id: ctx.id,
        record: DeviceRecord {
            next_seq: device.next_seq(),
            // A reading dropped while in flight and acknowledged later counts as acked.
            dropped: dropped.difference(&acked),
            acked,
            unacked,
            unsent,
            blocked: stats.blocked,
        },
        stats,
    }
}

/// Hands one received command to the device; logs and counts what it refused.
fn offer<const N: usize, const Q: usize>(
    ctx: &DeviceCtx,
    device: &mut Device<N, Q>,
    now_us: u64,
    m: &Incoming,
    shared: &Shared,
) -> CommandOutcome {
    // The level after the command prefix names the command; any other topic is refused by
    // name (the device subscribed only to its own command topic, so this is a broker's doing).
    let name = ctx
        .commands
        .as_ref()
        .and_then(|c| m.topic.strip_prefix(c.prefix.as_str()))
        .unwrap_or(&m.topic);
    let outcome = device.command(
        now_us,
        name,
        &m.payload,
        m.response_topic.as_deref(),
        m.correlation.as_deref(),
    );
    match &outcome {
        CommandOutcome::Bad(e) => {
            debug!(device = %ctx.id, topic = %m.topic, error = %e, "bad command");
            shared.counters.commands_bad.fetch_add(1, Relaxed);
        }
        CommandOutcome::Accepted {
            duplicate: true, n, ..
        } => {
            debug!(device = %ctx.id, n, "duplicate command");
            shared.counters.commands_duplicate.fetch_add(1, Relaxed);
        }
        _ => {}
    }
    outcome
}

/// Commands received on a connection that is gone, not yet handed to the device: they join the
/// backlog (in order, after what waits there) and go to the device at the top of the next pass.
fn take_unread(
    ctx: &DeviceCtx,
    backlog: &mut VecDeque<Box<Incoming>>,
    unread: Vec<Incoming>,
    c: &super::Counters,
) {
    if ctx.commands.is_some() {
        for m in unread {
            c.commands.fetch_add(1, Relaxed);
            backlog.push_back(Box::new(m));
        }
    }
}

/// 1 for a command taken for the first time.
fn taken(outcome: &CommandOutcome) -> u64 {
    u64::from(matches!(
        outcome,
        CommandOutcome::Accepted {
            duplicate: false,
            ..
        }
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_resets() {
        let cfg = BackoffConfig {
            min: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let mut b = Backoff::new(cfg, 1);
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        let caps = [100, 200, 400, 800, 1000, 1000];
        for (d, cap) in delays.iter().zip(caps) {
            let cap = Duration::from_millis(cap);
            assert!(
                *d >= cap / 2 && *d <= cap,
                "{d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
