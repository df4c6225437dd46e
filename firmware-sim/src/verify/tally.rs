//! The verifier's accounting, with no I/O: feed it the messages read from upstream, in arrival
//! order; compare with the manifest at the end.
//!
//! Per device, each arrival is classified against what arrived before it:
//! - **duplicate**: its sequence number already arrived (at-least-once allows this);
//! - **out of order**: first arrival of a number lower than the highest seen so far;
//! - otherwise in order.
//!
//! Against the manifest:
//! - **missing**: acknowledged by the broker (manifest `acked`) but never arrived;
//! - **arrived unacked**: arrived although never acknowledged (sent, ack lost; or dropped from
//!   the outbox after it was sent) - allowed;
//! - **unknown**: a device or sequence number the manifest never issued.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::fleet::Latency;
use crate::manifest::Manifest;
use crate::ranges::RangeSet;

/// How many example sequence numbers a report lists per kind and device.
const EXAMPLES: usize = 10;

#[derive(Debug, Default)]
struct DeviceTally {
    received: u64,
    seen: RangeSet,
    max_seq: Option<u64>,
    duplicates: u64,
    duplicate_examples: Vec<u64>,
    out_of_order: u64,
    out_of_order_examples: Vec<OutOfOrder>,
}

/// A message that arrived after a higher sequence number of the same device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OutOfOrder {
    pub seq: u64,
    /// The highest number that had arrived before it.
    pub after: u64,
}

/// Running counts while consuming.
pub struct Tally {
    devices: BTreeMap<String, DeviceTally>,
    undecodable: u64,
    /// Acknowledged readings not yet seen; 0 means the verifier can stop.
    remaining: u64,
    /// Sample time to arrival, in microseconds (`None` only if the histogram cannot be built).
    latency: Option<hdrhistogram::Histogram<u64>>,
}

/// Per-device verdict.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeviceVerdict {
    /// Acknowledged readings (the manifest's `acked`): each must arrive.
    pub expected: u64,
    /// Messages that arrived, duplicates included.
    pub received: u64,
    /// Distinct sequence numbers that arrived.
    pub unique: u64,
    pub missing: u64,
    /// The missing sequence numbers, as ranges (the first few).
    pub missing_ranges: Vec<(u64, u64)>,
    pub duplicates: u64,
    pub duplicate_examples: Vec<u64>,
    pub out_of_order: u64,
    pub out_of_order_examples: Vec<OutOfOrder>,
    /// Arrived without having been acknowledged to the device (allowed).
    pub arrived_unacked: u64,
    /// Sequence numbers this device never used, or the device is not in the manifest.
    pub unknown: u64,
    /// Readings the device itself dropped (full outbox, drop-oldest) and that never arrived.
    pub dropped_on_device: u64,
    /// Readings the device skipped (full outbox, block).
    pub blocked_on_device: u64,
}

/// Sums over all devices.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub devices: usize,
    pub expected: u64,
    pub received: u64,
    pub unique: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub arrived_unacked: u64,
    pub unknown: u64,
    /// Messages that were not telemetry (neither CBOR nor JSON with the payload fields).
    pub undecodable: u64,
    pub dropped_on_device: u64,
    pub blocked_on_device: u64,
}

/// The verifier's answer.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Nothing acknowledged is missing, nothing is out of order, and duplicates are within the
    /// bound (if one was given).
    pub passed: bool,
    /// Why it did not pass.
    pub failures: Vec<String>,
    pub source: String,
    /// The timeout passed before every expected message arrived.
    pub timed_out: bool,
    pub elapsed_s: f64,
    pub total: Totals,
    /// Sample time (device clock) to arrival at the verifier.
    pub latency_ms: Option<Latency>,
    pub devices: BTreeMap<String, DeviceVerdict>,
    /// Whether telemetry was checked (a manifest was given); `false` for a commands-only run.
    pub telemetry_checked: bool,
    /// Messages of a kind not being checked (telemetry in a commands-only run, replies in a
    /// telemetry-only run).
    pub ignored: u64,
    /// Replies to commands, when a command manifest was given.
    pub commands: Option<super::CommandReport>,
}

impl Tally {
    pub fn new(manifest: &Manifest) -> Tally {
        Tally {
            devices: BTreeMap::new(),
            undecodable: 0,
            remaining: manifest.acked(),
            latency: hdrhistogram::Histogram::new_with_bounds(1, 86_400_000_000, 3).ok(),
        }
    }

    /// Every acknowledged reading has arrived.
    pub fn complete(&self) -> bool {
        self.remaining == 0
    }

    /// Acknowledged readings still to arrive.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Messages received so far (duplicates included).
    pub fn received(&self) -> u64 {
        self.devices.values().map(|d| d.received).sum()
    }

    pub fn record_undecodable(&mut self) {
        self.undecodable += 1;
    }

    /// Records one arrival. `latency_us`: sample time to arrival, if known.
    pub fn record(
        &mut self,
        manifest: &Manifest,
        device_id: &str,
        seq: u64,
        latency_us: Option<u64>,
    ) {
        if let (Some(us), Some(h)) = (latency_us, self.latency.as_mut()) {
            h.saturating_record(us.max(1));
        }
        let d = match self.devices.get_mut(device_id) {
            Some(d) => d,
            None => self.devices.entry(device_id.to_owned()).or_default(),
        };
        d.received += 1;
        if !d.seen.insert(seq) {
            d.duplicates += 1;
            if d.duplicate_examples.len() < EXAMPLES {
                d.duplicate_examples.push(seq);
            }
            return;
        }
        match d.max_seq {
            Some(max) if seq < max => {
                d.out_of_order += 1;
                if d.out_of_order_examples.len() < EXAMPLES {
                    d.out_of_order_examples.push(OutOfOrder { seq, after: max });
                }
            }
            _ => d.max_seq = Some(seq),
        }
        if manifest
            .devices
            .get(device_id)
            .is_some_and(|r| r.acked.contains(seq))
        {
            self.remaining = self.remaining.saturating_sub(1);
        }
    }

    /// The verdict against `manifest`.
    pub fn report(
        &self,
        manifest: &Manifest,
        max_duplicates: Option<u64>,
        source: String,
        timed_out: bool,
        elapsed_s: f64,
    ) -> VerifyReport {
        let empty = DeviceTally::default();
        let mut devices = BTreeMap::new();
        let ids = manifest
            .devices
            .keys()
            .chain(self.devices.keys())
            .collect::<std::collections::BTreeSet<_>>();
        for id in ids {
            let t = self.devices.get(id).unwrap_or(&empty);
            let v = match manifest.devices.get(id) {
                Some(r) => {
                    let missing = r.acked.difference(&t.seen);
                    let not_acked = t.seen.difference(&r.acked);
                    let unknown = not_acked
                        .ranges()
                        .iter()
                        .map(|&(a, b)| {
                            let (a, b) = (a.max(r.next_seq), b);
                            if a > b {
                                0
                            } else {
                                b - a + 1
                            }
                        })
                        .sum::<u64>();
                    DeviceVerdict {
                        expected: r.acked.count(),
                        received: t.received,
                        unique: t.seen.count(),
                        missing: missing.count(),
                        missing_ranges: missing.ranges().iter().take(EXAMPLES).copied().collect(),
                        duplicates: t.duplicates,
                        duplicate_examples: t.duplicate_examples.clone(),
                        out_of_order: t.out_of_order,
                        out_of_order_examples: t.out_of_order_examples.clone(),
                        arrived_unacked: not_acked.count() - unknown,
                        unknown,
                        dropped_on_device: r.dropped.difference(&t.seen).count(),
                        blocked_on_device: r.blocked,
                    }
                }
                None => DeviceVerdict {
                    received: t.received,
                    unique: t.seen.count(),
                    duplicates: t.duplicates,
                    duplicate_examples: t.duplicate_examples.clone(),
                    out_of_order: t.out_of_order,
                    out_of_order_examples: t.out_of_order_examples.clone(),
                    unknown: t.seen.count(),
                    ..Default::default()
                },
            };
            devices.insert(id.clone(), v);
        }

        let mut total = Totals {
            devices: devices.len(),
            undecodable: self.undecodable,
            ..Default::default()
        };
        for v in devices.values() {
            total.expected += v.expected;
            total.received += v.received;
            total.unique += v.unique;
            total.missing += v.missing;
            total.duplicates += v.duplicates;
            total.out_of_order += v.out_of_order;
            total.arrived_unacked += v.arrived_unacked;
            total.unknown += v.unknown;
            total.dropped_on_device += v.dropped_on_device;
            total.blocked_on_device += v.blocked_on_device;
        }
        let mut failures = Vec::new();
        if total.missing > 0 {
            failures.push(format!(
                "{} acknowledged message(s) missing{}",
                total.missing,
                if timed_out { " at the timeout" } else { "" }
            ));
        }
        if total.out_of_order > 0 {
            failures.push(format!("{} message(s) out of order", total.out_of_order));
        }
        if let Some(max) = max_duplicates {
            if total.duplicates > max {
                failures.push(format!(
                    "{} duplicate(s), more than --max-duplicates {max}",
                    total.duplicates
                ));
            }
        }
        VerifyReport {
            passed: failures.is_empty(),
            failures,
            source,
            timed_out,
            elapsed_s,
            total,
            latency_ms: self.latency.as_ref().and_then(Latency::from_histogram),
            devices,
            telemetry_checked: true,
            ignored: 0,
            commands: None,
        }
    }
}

/// How many problem devices the text report lists.
const LIST_DEVICES: usize = 50;

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "source       {}", self.source)?;
        if !self.telemetry_checked {
            writeln!(
                f,
                "telemetry    not checked (no --expect){}",
                if self.timed_out { "  (timed out)" } else { "" }
            )?;
        } else {
            self.fmt_telemetry(f)?;
        }
        if let Some(c) = &self.commands {
            write!(f, "{c}")?;
        }
        if self.ignored > 0 {
            writeln!(f, "ignored      {} (not being checked)", self.ignored)?;
        }
        if self.passed {
            writeln!(f, "PASS")
        } else {
            writeln!(f, "FAIL: {}", self.failures.join("; "))
        }
    }
}

impl VerifyReport {
    fn fmt_telemetry(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.total;
        writeln!(
            f,
            "devices      {}  expected {}  received {} ({} unique)  in {:.2} s{}",
            t.devices,
            t.expected,
            t.received,
            t.unique,
            self.elapsed_s,
            if self.timed_out { "  (timed out)" } else { "" }
        )?;
        writeln!(
            f,
            "missing      {}  (acknowledged, never arrived)",
            t.missing
        )?;
        writeln!(f, "out of order {}", t.out_of_order)?;
        writeln!(f, "duplicates   {}", t.duplicates)?;
        writeln!(
            f,
            "also         {} arrived unacked, {} unknown, {} undecodable; on device: {} dropped, {} blocked",
            t.arrived_unacked, t.unknown, t.undecodable, t.dropped_on_device, t.blocked_on_device
        )?;
        if let Some(l) = &self.latency_ms {
            writeln!(
                f,
                "latency      p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (sample time to arrival)",
                l.p50, l.p99, l.max
            )?;
        }
        let problems: Vec<_> = self
            .devices
            .iter()
            .filter(|(_, v)| v.missing + v.out_of_order + v.duplicates + v.unknown > 0)
            .collect();
        for (id, v) in problems.iter().take(LIST_DEVICES) {
            write!(f, "  {id}: received {}", v.received)?;
            if v.missing > 0 {
                let ranges: Vec<String> = v
                    .missing_ranges
                    .iter()
                    .map(|&(a, b)| {
                        if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        }
                    })
                    .collect();
                write!(f, ", missing {} [{}]", v.missing, ranges.join(", "))?;
            }
            if v.out_of_order > 0 {
                let ex: Vec<String> = v
                    .out_of_order_examples
                    .iter()
                    .map(|o| format!("{} after {}", o.seq, o.after))
                    .collect();
                write!(f, ", out of order {} [{}]", v.out_of_order, ex.join(", "))?;
            }
            if v.duplicates > 0 {
                let ex: Vec<String> = v.duplicate_examples.iter().map(u64::to_string).collect();
                write!(f, ", duplicates {} [{}]", v.duplicates, ex.join(", "))?;
            }
            if v.unknown > 0 {
                write!(f, ", unknown {}", v.unknown)?;
            }
            writeln!(f)?;
        }
        if problems.len() > LIST_DEVICES {
            writeln!(
                f,
                "  ... and {} more devices (see --json)",
                problems.len() - LIST_DEVICES
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::manifest::{DeviceRecord, RunInfo, VERSION};

    fn manifest(devices: &[(&str, std::ops::Range<u64>)]) -> Manifest {
        Manifest {
            version: VERSION,
            run: RunInfo {
                started_ms: 0,
                devices: devices.len(),
                qos: 1,
                seed: 1,
                topic: "t".into(),
            },
            devices: devices
                .iter()
                .map(|(id, r)| {
                    (
                        id.to_string(),
                        DeviceRecord {
                            next_seq: r.end,
                            acked: r.clone().collect(),
                            ..Default::default()
                        },
                    )
                })
                .collect(),
        }
    }

    fn feed(m: &Manifest, arrivals: &[(&str, u64)]) -> Tally {
        let mut t = Tally::new(m);
        for &(id, seq) in arrivals {
            t.record(m, id, seq, None);
        }
        t
    }

    #[test]
    fn a_clean_stream_passes_and_completes() {
        let m = manifest(&[("a", 0..3), ("b", 0..2)]);
        let t = feed(&m, &[("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2)]);
        assert!(t.complete());
        let r = t.report(&m, Some(0), "test".into(), false, 0.1);
        assert!(r.passed, "{r}");
        assert_eq!(
            (r.total.expected, r.total.received, r.total.missing),
            (5, 5, 0)
        );
    }

    #[test]
    fn gap_duplicate_and_reordering_are_each_reported() {
        let m = manifest(&[("a", 0..6)]);
        // 2 is missing, 1 is duplicated, 5 arrives before 4.
        let t = feed(
            &m,
            &[("a", 0), ("a", 1), ("a", 1), ("a", 3), ("a", 5), ("a", 4)],
        );
        assert!(!t.complete());
        let r = t.report(&m, None, "test".into(), true, 1.0);
        let a = &r.devices["a"];
        assert_eq!((a.missing, a.duplicates, a.out_of_order), (1, 1, 1));
        assert_eq!(a.missing_ranges, [(2, 2)]);
        assert_eq!(a.duplicate_examples, [1]);
        assert_eq!(a.out_of_order_examples, [OutOfOrder { seq: 4, after: 5 }]);
        assert!(!r.passed);
        assert_eq!(r.failures.len(), 2, "{:?}", r.failures);
        let text = r.to_string();
        assert!(text.contains("missing 1 [2]"), "{text}");
        assert!(text.contains("out of order 1 [4 after 5]"), "{text}");
        assert!(text.contains("duplicates 1 [1]"), "{text}");
        assert!(text.contains("FAIL"), "{text}");
    }

    #[test]
    fn duplicates_alone_pass_unless_bounded() {
        let m = manifest(&[("a", 0..2)]);
        // A resend after a reconnect: 0 1 0 1 is duplicates, not reordering.
        let t = feed(&m, &[("a", 0), ("a", 1), ("a", 0), ("a", 1)]);
        let r = t.report(&m, None, "test".into(), false, 0.0);
        assert!(r.passed && r.total.duplicates == 2 && r.total.out_of_order == 0);
        assert!(!t.report(&m, Some(1), "test".into(), false, 0.0).passed);
    }

    #[test]
    fn unacked_arrivals_are_allowed_and_strangers_are_unknown() {
        let mut m = manifest(&[("a", 0..2)]);
        if let Some(r) = m.devices.get_mut("a") {
            r.next_seq = 3;
            r.unacked = [2].into_iter().collect();
        }
        let t = feed(&m, &[("a", 0), ("a", 1), ("a", 2), ("a", 9), ("z", 0)]);
        let r = t.report(&m, None, "test".into(), false, 0.0);
        assert!(r.passed, "{r}");
        assert_eq!(r.devices["a"].arrived_unacked, 1);
        assert_eq!(r.devices["a"].unknown, 1);
        assert_eq!(r.devices["z"].unknown, 1);
        assert_eq!(r.total.unknown, 2);
    }
}
