//! The I/O loop of one device: drives its state machine with time and MQTT events, and turns
//! its transmissions into rumqttc requests.
//!
//! Packet ids belong to rumqttc; the loop maps them back to sequence numbers. rumqttc reports
//! each PUBLISH it writes (`Written`), in the order the loop submitted them, so a FIFO of
//! submitted sequence numbers gives each packet id its sequence number; the ack then names the
//! packet id. A closed connection clears both maps (acks never cross connections).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::debug;

use super::link::{self, LinkEvent, LinkOptions, Loop, PollFuture};
use super::{Phase, Shared};
use crate::device::{AckOutcome, Device, DeviceStats, TickOutcome};
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
    // Submitted to rumqttc, not yet written: (seq, submit time).
    let mut submitted: VecDeque<(u64, Instant)> = VecDeque::new();
    // Written, awaiting the ack: (packet id, seq, submit time).
    let mut awaiting: Vec<(u16, u64, Instant)> = Vec::new();
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
        if disconnect_deadline.is_none() && hold_until.is_none() {
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
                submitted.push_back((tx.seq, now));
            }
        }

        let done = device.is_finished() || phase == Phase::Abort;
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
                        device.connected();
                        backoff.reset();
                        c.connects.fetch_add(1, Relaxed);
                        c.online.fetch_add(1, Relaxed);
                    }
                    LinkEvent::Written { pkid } => {
                        if let Some((seq, at)) = submitted.pop_front() {
                            if ctx.qos == 0 {
                                // QoS 0 has no acknowledgement: written is as far as it goes.
                                device.acked(seq);
                                written_qos0.insert(seq);
                            } else {
                                awaiting.push((pkid, seq, at));
                            }
                        }
                    }
                    LinkEvent::Acked { pkid } => {
                        if let Some(i) = awaiting.iter().position(|a| a.0 == pkid) {
                            let (_, seq, at) = awaiting.swap_remove(i);
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
                        if let Some(i) = awaiting.iter().position(|a| a.0 == pkid) {
                            let (_, seq, _) = awaiting.swap_remove(i);
                            debug!(device = %ctx.id, seq, %reason, "publish refused");
                            device.nacked(seq);
                            c.refused.fetch_add(1, Relaxed);
                            hold_until = Some(Instant::now() + refused_backoff.next_delay());
                        }
                    }
                    LinkEvent::DisconnectSent => break,
                    LinkEvent::Closed { error } => {
                        keep_polling = false;
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
                        lp.forget_pending();
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
