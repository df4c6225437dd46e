//! Per-device publish rate limits (`[limits] publish_rate`, `publish_bytes_rate`): token
//! buckets, no I/O, the time passed in.
//!
//! A bucket holds up to `burst` tokens and gains `rate` per second. A publish costs one message
//! token and its payload size in byte tokens, and passes when both buckets hold enough. A publish
//! larger than the byte burst passes when that bucket is full and leaves it in debt, so no size
//! is refused for ever and the long-run rate still holds.
//!
//! The connection decides what "does not pass" means: an MQTT 5 device gets PUBACK/PUBREC 0x97
//! with the reason string "message rate too high" and nothing is stored (0x96, the code of that
//! name, is allowed only in DISCONNECT); a 3.1.1 device, which has no negative ack, is slowed
//! instead: its socket is not read until the tokens are there.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::LimitsConfig;

/// One token bucket (also the per-address buckets of `super::abuse`).
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    /// Tokens per second.
    rate: f64,
    burst: f64,
    /// Tokens now (negative: debt after a publish larger than the burst).
    level: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn new(rate: f64, burst: f64, now: Instant) -> Bucket {
        Bucket {
            rate,
            burst,
            level: burst,
            last: now,
        }
    }

    pub(crate) fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes one token if there is one at `now`.
    pub(crate) fn take_one(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.level >= 1.0 {
            self.level -= 1.0;
            true
        } else {
            false
        }
    }

    /// Puts back a token taken by [`Bucket::take_one`] (up to the burst).
    pub(crate) fn give_back(&mut self) {
        self.level = (self.level + 1.0).min(self.burst);
    }

    /// Whether it is full at `now` (then it is no different from a new one).
    pub(crate) fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.level >= self.burst
    }

    /// How long until `cost` can be taken (zero: now). Call after `refill`.
    fn wait_for(&self, cost: f64) -> Duration {
        let need = cost.min(self.burst) - self.level;
        if need <= 0.0 {
            Duration::ZERO
        } else {
            // At least a millisecond: a wait rounded to zero would spin.
            Duration::from_secs_f64(need / self.rate).max(Duration::from_millis(1))
        }
    }

    /// New settings (a reload): the tokens held are kept, up to the new burst.
    pub(crate) fn configure(&mut self, rate: f64, burst: f64) {
        self.rate = rate;
        self.burst = burst;
        self.level = self.level.min(burst);
    }
}

/// The limits of one device connection: a message bucket and a byte bucket, each optional.
#[derive(Debug, Clone, Default)]
pub struct PublishLimiter {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
}

/// (rate, burst) of the message and byte buckets, from `[limits]`; `None` where off.
fn settings(l: &LimitsConfig) -> [Option<(f64, f64)>; 2] {
    let messages = l.publish_rate.map(|r| {
        let r = f64::from(r);
        (r, l.publish_burst.map_or(r, f64::from))
    });
    let bytes = l.publish_bytes_rate.map(|r| {
        let r = r as f64;
        (r, l.publish_bytes_burst.map_or(r, |b| b as f64))
    });
    [messages, bytes]
}

impl PublishLimiter {
    /// A limiter with `limits`' settings and full buckets.
    pub fn new(limits: &LimitsConfig, now: Instant) -> PublishLimiter {
        let mut l = PublishLimiter::default();
        l.configure(limits, now);
        l
    }

    /// Whether any limit is on.
    pub fn is_on(&self) -> bool {
        self.messages.is_some() || self.bytes.is_some()
    }

    /// Takes up `limits` (at a reload): buckets that stay on keep their tokens, ones turned on
    /// start full.
    pub fn configure(&mut self, limits: &LimitsConfig, now: Instant) {
        let [m, b] = settings(limits);
        for (bucket, setting) in [(&mut self.messages, m), (&mut self.bytes, b)] {
            match (bucket.as_mut(), setting) {
                (_, None) => *bucket = None,
                (None, Some((rate, burst))) => *bucket = Some(Bucket::new(rate, burst, now)),
                (Some(bk), Some((rate, burst))) => bk.configure(rate, burst),
            }
        }
    }

    /// A publish of `bytes` at `now`: `Ok` when it passes (its tokens are taken), `Err(wait)`
    /// with how long until it would (nothing taken).
    pub fn try_take(&mut self, bytes: usize, now: Instant) -> Result<(), Duration> {
        let costs = [1.0, bytes as f64];
        let mut wait = Duration::ZERO;
        for (bucket, cost) in [&mut self.messages, &mut self.bytes].into_iter().zip(costs) {
            if let Some(b) = bucket {
                b.refill(now);
                wait = wait.max(b.wait_for(cost));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        for (bucket, cost) in [&mut self.messages, &mut self.bytes].into_iter().zip(costs) {
            if let Some(b) = bucket {
                b.level -= cost;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn limits(rate: Option<u32>, burst: Option<u32>, bytes: Option<u64>) -> LimitsConfig {
        LimitsConfig {
            publish_rate: rate,
            publish_burst: burst,
            publish_bytes_rate: bytes,
            publish_bytes_burst: None,
            ..LimitsConfig::default()
        }
    }

    /// Publishes `n` of `size` bytes as fast as the limiter lets them through, sleeping (in
    /// paused time) for what it says; returns how long it took.
    async fn drain(l: &mut PublishLimiter, n: usize, size: usize) -> Duration {
        let start = Instant::now();
        for _ in 0..n {
            while let Err(wait) = l.try_take(size, Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        Instant::now() - start
    }

    #[tokio::test(start_paused = true)]
    async fn off_by_default() {
        let mut l = PublishLimiter::new(&LimitsConfig::default(), Instant::now());
        assert!(!l.is_on());
        for _ in 0..100_000 {
            assert!(l.try_take(1 << 20, Instant::now()).is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_at_once_then_the_rate_holds() {
        let mut l = PublishLimiter::new(&limits(Some(10), Some(5), None), Instant::now());
        for _ in 0..5 {
            assert!(l.try_take(10, Instant::now()).is_ok());
        }
        let wait = l.try_take(10, Instant::now()).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // 100 more at 10/s: 10 s (the burst is spent).
        let took = drain(&mut l, 100, 10).await;
        assert_eq!(took.as_millis(), 10_000);
        // Idle refills up to the burst, not beyond.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..5 {
            assert!(l.try_take(10, Instant::now()).is_ok());
        }
        assert!(l.try_take(10, Instant::now()).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_are_limited_and_a_publish_larger_than_the_burst_passes_into_debt() {
        // 1000 bytes/s, burst 1000 (a second's worth by default).
        let mut l = PublishLimiter::new(&limits(None, None, Some(1000)), Instant::now());
        assert!(
            l.try_take(4000, Instant::now()).is_ok(),
            "a full bucket lets it through"
        );
        // Now 3000 in debt: the next byte waits 3 s plus its own cost.
        let wait = l.try_take(100, Instant::now()).unwrap_err();
        assert_eq!(wait, Duration::from_millis(3100));
        let took = drain(&mut l, 10, 500).await;
        assert_eq!(
            took.as_millis(),
            8000,
            "3 s of debt, then 5000 bytes at 1000/s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn both_buckets_must_pass_and_a_refusal_takes_nothing() {
        let mut l = PublishLimiter::new(&limits(Some(100), Some(3), Some(1000)), Instant::now());
        // The bytes run out first: 1000 bytes are two publishes of 500.
        assert!(l.try_take(500, Instant::now()).is_ok());
        assert!(l.try_take(500, Instant::now()).is_ok());
        let wait = l.try_take(500, Instant::now()).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // The refusal spent no message token: one is left, then the messages run out.
        assert!(l.try_take(0, Instant::now()).is_ok());
        let wait = l.try_take(0, Instant::now()).unwrap_err();
        assert_eq!(wait, Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_changes_the_rate_and_keeps_the_tokens_up_to_the_new_burst() {
        let mut l = PublishLimiter::new(&limits(Some(10), Some(10), None), Instant::now());
        for _ in 0..4 {
            l.try_take(0, Instant::now()).unwrap();
        }
        // 6 left; the new burst is 3.
        l.configure(&limits(Some(1), Some(3), None), Instant::now());
        for _ in 0..3 {
            l.try_take(0, Instant::now()).unwrap();
        }
        assert_eq!(
            l.try_take(0, Instant::now()).unwrap_err(),
            Duration::from_secs(1)
        );
        // Off again: everything passes.
        l.configure(&limits(None, None, None), Instant::now());
        assert!(!l.is_on());
        assert!(l.try_take(0, Instant::now()).is_ok());
    }
}
