//! Log lines for failures that repeat per message (a full disk fails every append of every
//! device until space is freed): the first is logged at once, then at most one per interval,
//! carrying how many were left out since. The counters in `/metrics` stay exact; this only keeps
//! the log readable and its size bounded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct LogThrottle {
    start: Instant,
    every_ms: u64,
    /// Milliseconds since `start` before which nothing is logged (0: log the next one).
    quiet_until_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    pub fn new(every: Duration) -> LogThrottle {
        LogThrottle {
            start: Instant::now(),
            every_ms: u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1),
            quiet_until_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this occurrence should be logged, `n` being how many were left out since
    /// the last logged one; `None` when it should not (it is counted instead).
    pub fn admit(&self) -> Option<u64> {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let until = self.quiet_until_ms.load(Ordering::Relaxed);
        if now >= until
            && self
                .quiet_until_ms
                .compare_exchange(
                    until,
                    now.saturating_add(self.every_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl LogThrottle {
    /// Ends a spell: `Some(n)` when a line was admitted since the last reset (`n` left out
    /// since), `None` when there was nothing to end. The next occurrence is logged at once.
    pub fn reset(&self) -> Option<u64> {
        if self.quiet_until_ms.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.quiet_until_ms.store(0, Ordering::Relaxed);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

impl Default for LogThrottle {
    /// One line per 10 s.
    fn default() -> LogThrottle {
        LogThrottle::new(Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_is_logged_then_one_per_interval_with_the_count_left_out() {
        let t = LogThrottle::new(Duration::from_millis(200));
        assert_eq!(t.admit(), Some(0));
        for _ in 0..5 {
            assert_eq!(t.admit(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.admit(), Some(5));
        assert_eq!(t.admit(), None);
    }

    #[test]
    fn a_reset_ends_the_spell_with_its_count_and_the_next_is_logged_at_once() {
        let t = LogThrottle::new(Duration::from_secs(3600));
        assert_eq!(t.reset(), None, "nothing to end");
        assert_eq!(t.admit(), Some(0));
        assert_eq!(t.admit(), None);
        assert_eq!(t.admit(), None);
        assert_eq!(t.reset(), Some(2));
        assert_eq!(t.reset(), None);
        assert_eq!(t.admit(), Some(0), "a new spell starts with a line");
    }

    #[test]
    fn concurrent_callers_admit_exactly_one_per_interval() {
        let t = std::sync::Arc::new(LogThrottle::new(Duration::from_secs(3600)));
        let admitted: u64 = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || (0..1000).filter(|_| t.admit().is_some()).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().map_or(0, |n| n as u64))
            .sum();
        assert_eq!(admitted, 1);
        assert_eq!(t.suppressed.load(Ordering::Relaxed), 3999);
    }
}
