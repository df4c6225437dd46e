//! Limits per source address against connection floods and password guessing (`[limits]
//! connect_rate_per_address`, `failed_login_burst`, ...): a bounded table of token buckets, no
//! I/O, the time passed in.
//!
//! - Each new TCP connection takes a token from its address's connection bucket; without one it
//!   is closed before the TLS handshake (the handshake is what costs CPU).
//! - Each password CONNECT takes a token from its address's failure bucket before its password
//!   is checked, and a right password puts it back: so wrong passwords (and unknown users) use
//!   them up, however many CONNECTs are in flight at once. An address without a token has its
//!   password CONNECTs refused unchecked (right or wrong: answering a right one would keep the
//!   guessing going) until the bucket refills. Certificate logins are not affected: there is
//!   nothing to guess.
//!
//! An address is an IPv4 address or an IPv6 /64 (one host usually holds a whole /64). The table
//! holds at most `address_table_size` addresses: when full, those whose buckets are full again
//! (no different from a new entry) go first, then the one seen longest ago.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

use tokio::time::Instant;

use super::rate::Bucket;
use crate::config::LimitsConfig;

#[derive(Debug)]
struct Entry {
    connects: Option<Bucket>,
    failures: Option<Bucket>,
    last_seen: Instant,
}

impl Entry {
    fn is_idle(&mut self, now: Instant) -> bool {
        self.connects.as_mut().is_none_or(|b| b.is_full(now))
            && self.failures.as_mut().is_none_or(|b| b.is_full(now))
    }
}

/// (rate per second, burst) of the connection and failure buckets; `None` where off.
fn settings(l: &LimitsConfig) -> [Option<(f64, f64)>; 2] {
    let connects = (l.connect_rate_per_address > 0).then(|| {
        (
            f64::from(l.connect_rate_per_address),
            f64::from(l.connect_burst_per_address.max(1)),
        )
    });
    let failures = (l.failed_login_burst > 0).then(|| {
        let every = l.failed_login_interval.as_secs_f64().max(0.001);
        (1.0 / every, f64::from(l.failed_login_burst))
    });
    [connects, failures]
}

/// Configures (or creates, full) `bucket` for `setting`.
fn follow(bucket: &mut Option<Bucket>, setting: Option<(f64, f64)>, now: Instant) {
    match (bucket.as_mut(), setting) {
        (_, None) => *bucket = None,
        (None, Some((rate, burst))) => *bucket = Some(Bucket::new(rate, burst, now)),
        (Some(b), Some((rate, burst))) => b.configure(rate, burst),
    }
}

/// The key of an address: IPv4 as is (also when mapped into IPv6), IPv6 by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) & 0xffff_ffff_ffff_ffff_0000_0000_0000_0000,
            )),
        },
    }
}

/// The per-address buckets.
#[derive(Debug, Default)]
pub struct AddressTable {
    entries: HashMap<IpAddr, Entry>,
}

impl AddressTable {
    pub fn new() -> AddressTable {
        AddressTable::default()
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of `ip` (made, with full buckets, when missing), its buckets set to `limits`.
    fn entry(&mut self, ip: IpAddr, now: Instant, limits: &LimitsConfig) -> &mut Entry {
        let k = key(ip);
        if !self.entries.contains_key(&k) {
            self.make_room(limits.address_table_size.max(1), now);
        }
        let e = self.entries.entry(k).or_insert_with(|| Entry {
            connects: None,
            failures: None,
            last_seen: now,
        });
        let [c, f] = settings(limits);
        follow(&mut e.connects, c, now);
        follow(&mut e.failures, f, now);
        e.last_seen = now;
        e
    }

    fn make_room(&mut self, capacity: usize, now: Instant) {
        if self.entries.len() < capacity {
            return;
        }
        self.entries.retain(|_, e| !e.is_idle(now));
        while self.entries.len() >= capacity {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_seen)
                .map(|(k, _)| *k)
            else {
                return;
            };
            self.entries.remove(&oldest);
        }
    }

    /// A new connection from `ip` at `now`: whether it may go on (a token was taken).
    pub fn admit_connection(&mut self, ip: IpAddr, now: Instant, limits: &LimitsConfig) -> bool {
        if limits.connect_rate_per_address == 0 {
            return true;
        }
        self.entry(ip, now, limits)
            .connects
            .as_mut()
            .is_none_or(|b| b.take_one(now))
    }

    /// A password CONNECT from `ip` at `now`: whether its password may be checked (a failure
    /// token was taken; [`AddressTable::password_ok`] puts it back).
    pub fn begin_password(&mut self, ip: IpAddr, now: Instant, limits: &LimitsConfig) -> bool {
        if limits.failed_login_burst == 0 {
            return true;
        }
        self.entry(ip, now, limits)
            .failures
            .as_mut()
            .is_none_or(|b| b.take_one(now))
    }

    /// The password begun with [`AddressTable::begin_password`] was right, or was not checked
    /// after all (busy): its token goes back.
    pub fn password_ok(&mut self, ip: IpAddr, now: Instant, limits: &LimitsConfig) {
        if limits.failed_login_burst == 0 {
            return;
        }
        if let Some(b) = self.entry(ip, now, limits).failures.as_mut() {
            b.give_back();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limits() -> LimitsConfig {
        LimitsConfig {
            connect_rate_per_address: 2,
            connect_burst_per_address: 5,
            failed_login_burst: 3,
            failed_login_interval: Duration::from_secs(6),
            address_table_size: 4,
            ..LimitsConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn connections_past_the_burst_are_refused_until_the_rate_refills() {
        let (mut t, l) = (AddressTable::new(), limits());
        let a = ip("192.0.2.1");
        let admitted = (0..20)
            .filter(|_| t.admit_connection(a, Instant::now(), &l))
            .count();
        assert_eq!(admitted, 5);
        assert!(
            t.admit_connection(ip("192.0.2.2"), Instant::now(), &l),
            "another address is not affected"
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(
            t.admit_connection(a, Instant::now(), &l),
            "2/s: one after 0.5 s"
        );
        assert!(!t.admit_connection(a, Instant::now(), &l));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_logins_past_the_burst_stop_password_checks_until_the_interval() {
        let (mut t, l) = (AddressTable::new(), limits());
        let a = ip("192.0.2.1");
        // 50 at once (none has failed yet): the burst is checked, the rest is not.
        let checked = (0..50)
            .filter(|_| t.begin_password(a, Instant::now(), &l))
            .count();
        assert_eq!(checked, 3, "the burst, then no more password checks");
        assert!(t.begin_password(ip("192.0.2.9"), Instant::now(), &l));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(t.begin_password(a, Instant::now(), &l), "one more try");
        assert!(!t.begin_password(a, Instant::now(), &l));
        // Right passwords give their tokens back: a good device logs in as often as it likes.
        let good = ip("192.0.2.20");
        for _ in 0..100 {
            assert!(t.begin_password(good, Instant::now(), &l));
            t.password_ok(good, Instant::now(), &l);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded_and_keeps_the_addresses_that_are_being_limited() {
        let (mut t, l) = (AddressTable::new(), limits());
        let guesser = ip("192.0.2.1");
        for _ in 0..3 {
            t.begin_password(guesser, Instant::now(), &l);
        }
        // A spray of new addresses, each one connection (its bucket not full: kept a while).
        for i in 0..100 {
            tokio::time::advance(Duration::from_millis(1)).await;
            t.admit_connection(ip(&format!("198.51.100.{i}")), Instant::now(), &l);
            assert!(t.len() <= 4);
        }
        // The oldest went first, so the guesser, seen longest ago, is gone: a bounded table
        // cannot stop a spray, which is what the global bound on password checks is for.
        // Idle entries (buckets full again) always go before busy ones:
        let mut t = AddressTable::new();
        for _ in 0..3 {
            t.begin_password(guesser, Instant::now(), &l);
        }
        for i in 0..10 {
            let a = ip(&format!("198.51.100.{i}"));
            t.admit_connection(a, Instant::now(), &l);
            // 0.5 s later its one connection token is back: idle.
            tokio::time::advance(Duration::from_millis(500)).await;
        }
        assert!(
            !t.begin_password(guesser, Instant::now(), &l),
            "the guesser is still limited after 10 other addresses came and went"
        );
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(key(ip("2001:db8:1:2:ffff:1:2:3")), ip("2001:db8:1:2::"));
        assert_eq!(key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(key(ip("192.0.2.7")), ip("192.0.2.7"));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_turns_each_limit_off() {
        let mut t = AddressTable::new();
        let l = LimitsConfig {
            connect_rate_per_address: 0,
            failed_login_burst: 0,
            ..limits()
        };
        let a = ip("192.0.2.1");
        for _ in 0..1000 {
            assert!(t.admit_connection(a, Instant::now(), &l));
            assert!(t.begin_password(a, Instant::now(), &l));
        }
        assert!(t.is_empty(), "nothing tracked when off");
    }
}
