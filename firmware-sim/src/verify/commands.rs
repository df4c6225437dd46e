//! The verifier's accounting of command replies, with no I/O: feed it the replies read from
//! upstream, in arrival order; compare with the command manifest (`command --manifest`).
//!
//! Per device, the manifest lists the confirmed command ids in send order. Each reply is
//! classified against what arrived before it:
//! - **duplicate**: that command was answered before (at-least-once allows this: a redelivered
//!   command is answered again);
//! - **out of order**: the first answer to a command sent before one already answered;
//! - otherwise in order.
//!
//! At the end:
//! - **missing**: confirmed by the upstream broker but never answered;
//! - **answered unconfirmed**: answered although the broker never confirmed it (allowed);
//! - **unknown**: an id the manifest does not have (another run's reply);
//! - **bad**: a message on a reply topic that is not a reply;
//! - **correlation mismatch**: the `mqtt_correlation_data` header (MQTT 5 devices echo it) is not
//!   the reply's id.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::Serialize;

use crate::manifest::CommandManifest;

/// How many example ids a report lists per kind and device.
const EXAMPLES: usize = 10;

/// Where an id is in the manifest.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Index of the device in `CommandTally::devices`.
    device: usize,
    /// Position in the device's confirmed list; `None` for an unconfirmed command.
    pos: Option<usize>,
}

#[derive(Debug, Default)]
struct DeviceCommands {
    id: String,
    /// The confirmed ids, in send order.
    confirmed: Vec<String>,
    /// Answers per confirmed position.
    answers: Vec<u32>,
    /// Unconfirmed ids answered (first answers).
    answered_unconfirmed: u64,
    /// The latest position answered for the first time.
    max_pos: Option<usize>,
    received: u64,
    duplicates: u64,
    duplicate_examples: Vec<String>,
    out_of_order: u64,
    out_of_order_examples: Vec<ReplyOutOfOrder>,
    /// Unconfirmed ids answered so far.
    seen_unconfirmed: std::collections::HashSet<String>,
}

/// A first answer that came after the answer to a later command of the same device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplyOutOfOrder {
    pub id: String,
    /// The command sent later whose answer had already arrived.
    pub after: String,
}

/// Running counts while consuming.
#[derive(Debug)]
pub struct CommandTally {
    slots: HashMap<String, Slot>,
    devices: Vec<DeviceCommands>,
    /// Confirmed commands not yet answered; 0 means done.
    remaining: u64,
    unknown: u64,
    unknown_examples: Vec<String>,
    bad: u64,
    correlation_mismatch: u64,
    correlation_examples: Vec<String>,
}

/// Per-device verdict.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeviceCommandVerdict {
    pub confirmed: u64,
    /// Replies that arrived, duplicates included.
    pub received: u64,
    /// Confirmed commands answered at least once.
    pub answered: u64,
    pub missing: u64,
    /// The first few missing ids.
    pub missing_examples: Vec<String>,
    pub duplicates: u64,
    pub duplicate_examples: Vec<String>,
    pub out_of_order: u64,
    pub out_of_order_examples: Vec<ReplyOutOfOrder>,
    pub answered_unconfirmed: u64,
}

/// The command part of the verifier's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CommandReport {
    pub devices: usize,
    /// Commands in the manifest (confirmed and unconfirmed).
    pub sent: u64,
    pub confirmed: u64,
    /// Replies received, duplicates included.
    pub received: u64,
    pub answered: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub answered_unconfirmed: u64,
    pub unknown: u64,
    pub unknown_examples: Vec<String>,
    pub bad: u64,
    pub correlation_mismatch: u64,
    pub correlation_examples: Vec<String>,
    /// Devices with a problem (missing, duplicates, out of order).
    pub problems: BTreeMap<String, DeviceCommandVerdict>,
}

impl CommandTally {
    pub fn new(manifest: &CommandManifest) -> CommandTally {
        let mut slots = HashMap::new();
        let mut devices = Vec::with_capacity(manifest.devices.len());
        for (d, (id, rec)) in manifest.devices.iter().enumerate() {
            for (pos, cid) in rec.confirmed.iter().enumerate() {
                slots.insert(
                    cid.clone(),
                    Slot {
                        device: d,
                        pos: Some(pos),
                    },
                );
            }
            for cid in &rec.unconfirmed {
                slots.entry(cid.clone()).or_insert(Slot {
                    device: d,
                    pos: None,
                });
            }
            devices.push(DeviceCommands {
                id: id.clone(),
                answers: vec![0; rec.confirmed.len()],
                confirmed: rec.confirmed.clone(),
                ..Default::default()
            });
        }
        CommandTally {
            slots,
            devices,
            remaining: manifest.confirmed(),
            unknown: 0,
            unknown_examples: Vec::new(),
            bad: 0,
            correlation_mismatch: 0,
            correlation_examples: Vec::new(),
        }
    }

    /// Every confirmed command has been answered.
    pub fn complete(&self) -> bool {
        self.remaining == 0
    }

    /// Confirmed commands still to be answered.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Replies received so far (duplicates and unknown ones included).
    pub fn received(&self) -> u64 {
        self.devices.iter().map(|d| d.received).sum::<u64>() + self.unknown
    }

    /// A message on a reply topic that is not a reply.
    pub fn record_bad(&mut self) {
        self.bad += 1;
    }

    /// Records one reply to command `id`; `correlation`: the `mqtt_correlation_data` header, if
    /// the message had one.
    pub fn record(&mut self, id: &str, correlation: Option<&[u8]>) {
        if let Some(c) = correlation {
            if c != id.as_bytes() {
                self.correlation_mismatch += 1;
                if self.correlation_examples.len() < EXAMPLES {
                    self.correlation_examples
                        .push(format!("{id} carried {:?}", String::from_utf8_lossy(c)));
                }
            }
        }
        let Some(slot) = self.slots.get(id).copied() else {
            self.unknown += 1;
            if self.unknown_examples.len() < EXAMPLES {
                self.unknown_examples.push(id.to_owned());
            }
            return;
        };
        let Some(d) = self.devices.get_mut(slot.device) else {
            return;
        };
        d.received += 1;
        let Some(pos) = slot.pos else {
            // Unconfirmed: counted once, never in the order check (its place is not known).
            if d.seen_unconfirmed.insert(id.to_owned()) {
                d.answered_unconfirmed += 1;
            } else {
                d.duplicates += 1;
            }
            return;
        };
        let Some(count) = d.answers.get_mut(pos) else {
            return;
        };
        *count += 1;
        if *count > 1 {
            d.duplicates += 1;
            if d.duplicate_examples.len() < EXAMPLES {
                d.duplicate_examples.push(id.to_owned());
            }
            return;
        }
        self.remaining = self.remaining.saturating_sub(1);
        match d.max_pos {
            Some(max) if pos < max => {
                d.out_of_order += 1;
                if d.out_of_order_examples.len() < EXAMPLES {
                    d.out_of_order_examples.push(ReplyOutOfOrder {
                        id: id.to_owned(),
                        after: d.confirmed.get(max).cloned().unwrap_or_default(),
                    });
                }
            }
            _ => d.max_pos = Some(pos),
        }
    }

    /// The verdict.
    pub fn report(&self, manifest: &CommandManifest) -> CommandReport {
        let mut r = CommandReport {
            devices: self.devices.len(),
            sent: manifest
                .devices
                .values()
                .map(|d| (d.confirmed.len() + d.unconfirmed.len()) as u64)
                .sum(),
            confirmed: manifest.confirmed(),
            unknown: self.unknown,
            unknown_examples: self.unknown_examples.clone(),
            bad: self.bad,
            correlation_mismatch: self.correlation_mismatch,
            correlation_examples: self.correlation_examples.clone(),
            received: self.received(),
            ..Default::default()
        };
        for d in &self.devices {
            let answered = d.answers.iter().filter(|&&n| n > 0).count() as u64;
            let missing_ids: Vec<&String> = d
                .confirmed
                .iter()
                .zip(&d.answers)
                .filter(|(_, &n)| n == 0)
                .map(|(id, _)| id)
                .collect();
            let v = DeviceCommandVerdict {
                confirmed: d.confirmed.len() as u64,
                received: d.received,
                answered,
                missing: missing_ids.len() as u64,
                missing_examples: missing_ids
                    .iter()
                    .take(EXAMPLES)
                    .map(|s| (*s).clone())
                    .collect(),
                duplicates: d.duplicates,
                duplicate_examples: d.duplicate_examples.clone(),
                out_of_order: d.out_of_order,
                out_of_order_examples: d.out_of_order_examples.clone(),
                answered_unconfirmed: d.answered_unconfirmed,
            };
            r.answered += v.answered;
            r.missing += v.missing;
            r.duplicates += v.duplicates;
            r.out_of_order += v.out_of_order;
            r.answered_unconfirmed += v.answered_unconfirmed;
            if v.missing + v.duplicates + v.out_of_order > 0 {
                r.problems.insert(d.id.clone(), v);
            }
        }
        r
    }
}

impl CommandReport {
    /// Why it fails (empty: it passes). Duplicates fail only above `max_duplicates`.
    pub fn failures(&self, timed_out: bool, max_duplicates: Option<u64>) -> Vec<String> {
        let mut f = Vec::new();
        if self.missing > 0 {
            f.push(format!(
                "{} confirmed command(s) never answered{}",
                self.missing,
                if timed_out { " at the timeout" } else { "" }
            ));
        }
        if self.out_of_order > 0 {
            f.push(format!(
                "{} command(s) answered out of order",
                self.out_of_order
            ));
        }
        if self.correlation_mismatch > 0 {
            f.push(format!(
                "{} reply(ies) with correlation data that is not their command's id",
                self.correlation_mismatch
            ));
        }
        if let Some(max) = max_duplicates {
            if self.duplicates > max {
                f.push(format!(
                    "{} duplicate answer(s), more than --max-duplicates {max}",
                    self.duplicates
                ));
            }
        }
        f
    }
}

/// How many problem devices the text report lists.
const LIST_DEVICES: usize = 50;

impl fmt::Display for CommandReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "commands     {} devices  sent {}  confirmed {}  replies {}  answered {}",
            self.devices, self.sent, self.confirmed, self.received, self.answered
        )?;
        writeln!(
            f,
            "  missing      {}  (confirmed, never answered)",
            self.missing
        )?;
        writeln!(f, "  out of order {}", self.out_of_order)?;
        writeln!(f, "  duplicates   {}", self.duplicates)?;
        writeln!(
            f,
            "  also         {} answered unconfirmed, {} unknown, {} bad, {} correlation mismatch",
            self.answered_unconfirmed, self.unknown, self.bad, self.correlation_mismatch
        )?;
        for (id, v) in self.problems.iter().take(LIST_DEVICES) {
            write!(f, "  {id}: replies {}", v.received)?;
            if v.missing > 0 {
                write!(
                    f,
                    ", missing {} [{}]",
                    v.missing,
                    v.missing_examples.join(", ")
                )?;
            }
            if v.out_of_order > 0 {
                let ex: Vec<String> = v
                    .out_of_order_examples
                    .iter()
                    .map(|o| format!("{} after {}", o.id, o.after))
                    .collect();
                write!(f, ", out of order {} [{}]", v.out_of_order, ex.join(", "))?;
            }
            if v.duplicates > 0 {
                write!(
                    f,
                    ", duplicates {} [{}]",
                    v.duplicates,
                    v.duplicate_examples.join(", ")
                )?;
            }
            writeln!(f)?;
        }
        if self.problems.len() > LIST_DEVICES {
            writeln!(
                f,
                "  ... and {} more devices (see --json)",
                self.problems.len() - LIST_DEVICES
            )?;
        }
        if !self.correlation_examples.is_empty() {
            writeln!(
                f,
                "  correlation mismatches: {}",
                self.correlation_examples.join("; ")
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::manifest::{CommandRecord, CommandRunInfo, COMMANDS_KIND, VERSION};

    fn manifest(devices: &[(&str, u64, &[u64])]) -> CommandManifest {
        CommandManifest {
            version: VERSION,
            kind: COMMANDS_KIND.into(),
            run: CommandRunInfo {
                started_ms: 0,
                devices: devices.len(),
                count: 0,
                target: "test".into(),
            },
            devices: devices
                .iter()
                .map(|&(id, n, unconfirmed)| {
                    let rec = CommandRecord {
                        confirmed: (0..n)
                            .filter(|k| !unconfirmed.contains(k))
                            .map(|k| format!("{id}:{k}"))
                            .collect(),
                        unconfirmed: unconfirmed.iter().map(|k| format!("{id}:{k}")).collect(),
                    };
                    (id.to_owned(), rec)
                })
                .collect(),
        }
    }

    fn feed(m: &CommandManifest, ids: &[&str]) -> CommandTally {
        let mut t = CommandTally::new(m);
        for id in ids {
            t.record(id, Some(id.as_bytes()));
        }
        t
    }

    #[test]
    fn every_command_answered_in_order_passes() {
        let m = manifest(&[("a", 3, &[]), ("b", 2, &[])]);
        let t = feed(&m, &["a:0", "b:0", "a:1", "b:1", "a:2"]);
        assert!(t.complete());
        let r = t.report(&m);
        assert!(r.failures(false, Some(0)).is_empty(), "{r}");
        assert_eq!((r.sent, r.confirmed, r.answered, r.received), (5, 5, 5, 5));
    }

    #[test]
    fn missing_duplicate_and_out_of_order_answers_are_each_reported() {
        let m = manifest(&[("a", 5, &[])]);
        // a:1 is never answered, a:0 twice, a:3 before a:2.
        let t = feed(&m, &["a:0", "a:0", "a:3", "a:2", "a:4"]);
        assert!(!t.complete());
        assert_eq!(t.remaining(), 1);
        let r = t.report(&m);
        assert_eq!((r.missing, r.duplicates, r.out_of_order), (1, 1, 1));
        let a = &r.problems["a"];
        assert_eq!(a.missing_examples, ["a:1"]);
        assert_eq!(a.duplicate_examples, ["a:0"]);
        assert_eq!(
            a.out_of_order_examples,
            [ReplyOutOfOrder {
                id: "a:2".into(),
                after: "a:3".into()
            }]
        );
        let failures = r.failures(true, None);
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert!(failures[0].contains("at the timeout"));
        let text = r.to_string();
        assert!(text.contains("missing 1 [a:1]"), "{text}");
        assert!(text.contains("out of order 1 [a:2 after a:3]"), "{text}");
        assert!(text.contains("duplicates 1 [a:0]"), "{text}");
        // Duplicates fail only when bounded.
        assert_eq!(r.failures(false, Some(0)).len(), 3);
    }

    #[test]
    fn a_redelivery_after_later_answers_is_a_duplicate_not_a_reordering() {
        let m = manifest(&[("a", 3, &[])]);
        let t = feed(&m, &["a:0", "a:1", "a:2", "a:0", "a:1", "a:2"]);
        let r = t.report(&m);
        assert_eq!((r.duplicates, r.out_of_order, r.missing), (3, 0, 0));
        assert!(r.failures(false, None).is_empty());
    }

    #[test]
    fn unconfirmed_unknown_bad_and_mismatched_correlation_are_counted() {
        let m = manifest(&[("a", 3, &[1])]);
        let mut t = CommandTally::new(&m);
        assert_eq!(t.remaining(), 2);
        t.record("a:0", None);
        t.record("a:1", None);
        t.record("a:1", None);
        t.record("a:2", Some(b"a:9"));
        t.record("z:0", None);
        t.record_bad();
        assert!(t.complete());
        let r = t.report(&m);
        assert_eq!(r.answered_unconfirmed, 1);
        assert_eq!(r.unknown_examples, ["z:0"]);
        assert_eq!((r.unknown, r.bad, r.correlation_mismatch), (1, 1, 1));
        let f = r.failures(false, None);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].contains("correlation"));
        assert!(r.to_string().contains("a:2 carried \"a:9\""));
    }
}
