//! The forwarder's at-least-once bookkeeping, with no I/O: what was read and sent, what the
//! upstream said about it, and how far the cursor may move. The forwarder's loop (`mod.rs`)
//! feeds it events and performs the [`Step`]s it returns, as `ingest::session` does for MQTT.
//!
//! Every record read from the queue beyond the cursor has an entry, in sequence order:
//!
//! ```text
//! read ──> in flight ──confirm──────────────> settled ─┐
//!   │          │ ──return / too many nacks──> doomed ──┤ (dead letter, once it is first)
//!   │          │ ──nack / failure───────────> unsent ──┘ (sent again after the next Retry)
//!   └─ not for this uplink / cannot be prepared ──> settled / doomed
//! ```
//!
//! Invariants:
//! - The cursor moves only over a contiguous prefix of settled entries ([`Step::Advance`]).
//! - A record is dead-lettered only when it is the first entry, just before the cursor passes
//!   it ([`Step::DeadLetter`] then [`Step::Advance`]): so it is dead-lettered once, even across
//!   a restart, unless the process dies between storing the dead letter and persisting the
//!   cursor.
//! - After a nack nothing new is sent ([`Settle::holding`]) until every record in flight has its
//!   outcome; then [`Step::Retry`] rewinds the reader to the cursor, and the records that were
//!   not settled are sent again in queue order, the settled ones skipped ([`Settle::read`]).
//!   A failure (connection lost, stalled) turns everything in flight into unsent at once.
//! - Entries are only created by reading, so the window (records beyond the cursor, see
//!   [`Settle::outstanding`]) bounds both memory and the duplicates a failure can cause.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// What the forwarder must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Store this record (still held by the forwarder) in the dead letters with the reason,
    /// durably, before performing the next step.
    DeadLetter { seq: u64, reason: String },
    /// Every record up to `seq` is settled: move the cursor there. `records` of them were read
    /// since the last advance.
    Advance { seq: u64, records: usize },
    /// Rewind the reader to the cursor (after a pause or a reconnect) and read again: unsent
    /// records go out again, settled ones are skipped.
    Retry,
}

/// The answer to [`Settle::read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Prepare and send it (it is now in flight), or settle it with [`Settle::skipped`] /
    /// [`Settle::unsendable`].
    Send,
    /// Already settled (before a retry, or behind the cursor): do not send it again.
    Skip,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    InFlight,
    /// Known to exist, not settled, not in flight: sent again after a retry.
    Unsent,
    Settled,
    /// To be dead-lettered with this reason once it is the first entry.
    Doomed(String),
}

/// The settle state of one forwarder (see the module docs).
#[derive(Debug)]
pub struct Settle {
    /// Every record up to this seq is settled (the cursor the forwarder persists).
    cursor: u64,
    /// Records read beyond the cursor. Invariant: every key is above `cursor`.
    entries: BTreeMap<u64, Entry>,
    /// The seqs of the `Unsent` entries (found without a scan of the window).
    unsent: BTreeSet<u64>,
    /// Nacks per record, until it is settled.
    nacks: BTreeMap<u64, u32>,
    max_retries: u32,
    in_flight: usize,
    /// A nack came: send nothing new until the records in flight are answered, then retry.
    holding: bool,
    /// Records passed since the last [`Step::Advance`].
    passed: usize,
    /// The highest seq read since the last retry (the cursor at a retry): entries above it are
    /// still to be read again.
    last_read: u64,
    steps: VecDeque<Step>,
}

impl Settle {
    /// Starts at the persisted cursor; a record nacked more than `max_retries` times goes to
    /// the dead letters.
    pub fn new(cursor: u64, max_retries: u32) -> Settle {
        Settle {
            cursor,
            entries: BTreeMap::new(),
            unsent: BTreeSet::new(),
            nacks: BTreeMap::new(),
            max_retries,
            in_flight: 0,
            holding: false,
            passed: 0,
            last_read: cursor,
            steps: VecDeque::new(),
        }
    }

    /// Every record up to here is settled.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Records sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Records read beyond the cursor (in flight, settled ahead of a gap, or waiting to be sent
    /// again): what the window bounds.
    pub fn outstanding(&self) -> usize {
        self.entries.len()
    }

    /// Entries still to be read again after a retry: reading them takes no room in the window,
    /// so `window - outstanding + rereads` records may be read.
    pub fn rereads(&self) -> usize {
        match self.entries.last_key_value() {
            Some((&last, _)) if last > self.last_read => {
                self.entries.range(self.last_read + 1..).count()
            }
            _ => 0,
        }
    }

    /// Whether the forwarder must keep the record: it is in flight (a return dead-letters it)
    /// or waits for its dead-letter turn. Otherwise it is settled, or is read again later.
    pub fn needs_record(&self, seq: u64) -> bool {
        matches!(
            self.entries.get(&seq),
            Some(Entry::InFlight | Entry::Doomed(_))
        )
    }

    /// Whether new records must wait (a nack is being retried).
    pub fn holding(&self) -> bool {
        self.holding
    }

    /// The next step to perform, if any.
    pub fn poll(&mut self) -> Option<Step> {
        self.steps.pop_front()
    }

    /// A record read from the queue (in sequence order, from the cursor on after a retry).
    pub fn read(&mut self, seq: u64) -> Read {
        if seq <= self.cursor {
            return Read::Skip;
        }
        self.last_read = self.last_read.max(seq);
        // Records that were waiting to be sent again but were not read again are gone from the
        // queue (dropped by its byte limit, or quarantined): nothing is left to send.
        let rest = self.unsent.split_off(&seq);
        for s in std::mem::replace(&mut self.unsent, rest) {
            self.entries.insert(s, Entry::Settled);
            self.nacks.remove(&s);
        }
        let read = match self.entries.get(&seq) {
            Some(Entry::Settled | Entry::Doomed(_) | Entry::InFlight) => Read::Skip,
            Some(Entry::Unsent) | None => {
                self.unsent.remove(&seq);
                self.entries.insert(seq, Entry::InFlight);
                self.in_flight += 1;
                Read::Send
            }
        };
        self.advance();
        read
    }

    /// The record is not for this uplink (no route sends it here): settled as it is.
    pub fn skipped(&mut self, seq: u64) {
        self.answer(seq, Entry::Settled);
    }

    /// The record cannot be sent (e.g. its payload cannot be transcoded).
    pub fn unsendable(&mut self, seq: u64, reason: String) {
        self.answer(seq, Entry::Doomed(reason));
    }

    /// The upstream stored it.
    pub fn confirmed(&mut self, seq: u64) {
        self.answer(seq, Entry::Settled);
    }

    /// The upstream returned it as unroutable.
    pub fn returned(&mut self, seq: u64, reason: String) {
        self.answer(seq, Entry::Doomed(reason));
    }

    /// The upstream refused it: sent again after a pause, until `max_retries` is used up.
    pub fn nacked(&mut self, seq: u64) {
        if self.entries.get(&seq) != Some(&Entry::InFlight) {
            return;
        }
        let n = self.nacks.entry(seq).or_insert(0);
        *n += 1;
        if *n > self.max_retries {
            let reason = format!("nacked by the broker {} times", self.max_retries + 1);
            self.answer(seq, Entry::Doomed(reason));
        } else {
            self.holding = true;
            self.answer(seq, Entry::Unsent);
        }
    }

    /// The connection failed (lost, stalled): nothing in flight will be answered.
    pub fn failed(&mut self) {
        for (&seq, e) in self.entries.iter_mut() {
            if *e == Entry::InFlight {
                *e = Entry::Unsent;
                self.unsent.insert(seq);
            }
        }
        self.in_flight = 0;
        self.holding = false;
        self.retry();
    }

    fn retry(&mut self) {
        self.last_read = self.cursor;
        self.steps.push_back(Step::Retry);
    }

    fn answer(&mut self, seq: u64, to: Entry) {
        match self.entries.get_mut(&seq) {
            Some(e) if *e == Entry::InFlight => {
                if to == Entry::Unsent {
                    self.unsent.insert(seq);
                } else {
                    self.nacks.remove(&seq);
                }
                *e = to;
                self.in_flight -= 1;
            }
            // Not in flight: an answer after a failure, or twice. Ignored: after a failure the
            // record is sent again anyway.
            _ => return,
        }
        self.advance();
        if self.holding && self.in_flight == 0 {
            self.holding = false;
            self.retry();
        }
    }

    /// Moves the cursor over the settled prefix, dead-lettering doomed records on the way.
    fn advance(&mut self) {
        let before = self.cursor;
        while let Some(mut first) = self.entries.first_entry() {
            match first.get_mut() {
                Entry::Settled => {}
                Entry::Doomed(reason) => {
                    let reason = std::mem::take(reason);
                    self.steps.push_back(Step::DeadLetter {
                        seq: *first.key(),
                        reason,
                    });
                }
                Entry::InFlight | Entry::Unsent => break,
            }
            let (seq, _) = first.remove_entry();
            self.cursor = seq;
            self.passed += 1;
        }
        if self.cursor != before {
            self.steps.push_back(Step::Advance {
                seq: self.cursor,
                records: std::mem::take(&mut self.passed),
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn steps(s: &mut Settle) -> Vec<Step> {
        std::iter::from_fn(|| s.poll()).collect()
    }

    #[test]
    fn cursor_waits_for_the_first_record_and_then_jumps_over_what_was_confirmed_ahead() {
        let mut s = Settle::new(10, 2);
        for seq in 11..=13 {
            assert_eq!(s.read(seq), Read::Send);
        }
        s.confirmed(13);
        s.confirmed(12);
        assert_eq!(steps(&mut s), vec![]);
        s.confirmed(11);
        assert_eq!(
            steps(&mut s),
            vec![Step::Advance {
                seq: 13,
                records: 3
            }]
        );
        assert_eq!(s.outstanding(), 0);
    }

    #[test]
    fn a_failure_resends_only_what_was_not_settled() {
        let mut s = Settle::new(0, 2);
        for seq in 1..=4 {
            assert_eq!(s.read(seq), Read::Send);
        }
        s.confirmed(3);
        s.failed();
        assert_eq!(steps(&mut s), vec![Step::Retry]);
        assert_eq!(s.read(1), Read::Send);
        assert_eq!(s.read(2), Read::Send);
        assert_eq!(s.read(3), Read::Skip);
        assert_eq!(s.read(4), Read::Send);
        for seq in [1, 2, 4] {
            s.confirmed(seq);
        }
        assert_eq!(s.cursor(), 4);
    }

    #[test]
    fn a_nack_holds_new_sends_until_the_window_is_answered_then_retries() {
        let mut s = Settle::new(0, 1);
        for seq in 1..=3 {
            s.read(seq);
        }
        s.nacked(1);
        assert!(s.holding());
        s.confirmed(2);
        assert_eq!(steps(&mut s), vec![]);
        s.confirmed(3);
        assert_eq!(steps(&mut s), vec![Step::Retry]);
        assert!(!s.holding());
        assert_eq!(s.read(1), Read::Send);
        assert_eq!(s.read(2), Read::Skip);
        s.nacked(1);
        assert_eq!(
            steps(&mut s),
            vec![
                Step::DeadLetter {
                    seq: 1,
                    reason: "nacked by the broker 2 times".into()
                },
                Step::Advance { seq: 3, records: 3 }
            ]
        );
    }

    #[test]
    fn a_returned_record_is_dead_lettered_when_it_is_first_not_before() {
        let mut s = Settle::new(0, 1);
        s.read(1);
        s.read(2);
        s.returned(2, "no route".into());
        assert_eq!(steps(&mut s), vec![]);
        s.failed();
        assert_eq!(steps(&mut s), vec![Step::Retry]);
        assert_eq!(s.read(1), Read::Send);
        assert_eq!(s.read(2), Read::Skip, "returned once, not sent again");
        s.confirmed(1);
        assert_eq!(
            steps(&mut s),
            vec![
                Step::DeadLetter {
                    seq: 2,
                    reason: "no route".into()
                },
                Step::Advance { seq: 2, records: 2 }
            ]
        );
    }

    #[test]
    fn records_gone_from_the_queue_before_the_retry_do_not_block_the_cursor() {
        let mut s = Settle::new(0, 1);
        s.read(1);
        s.read(2);
        s.failed();
        steps(&mut s);
        // 1 was dropped by the queue's byte limit meanwhile.
        assert_eq!(s.read(2), Read::Send);
        s.confirmed(2);
        assert_eq!(s.cursor(), 2);
    }
}
