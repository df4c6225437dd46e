//! A model test of the forwarder's settle state machine (`forwarder::settle`): a simulated
//! queue, link and broker drive it with random orders of answers, nacks, returns, connection
//! failures and process restarts, and the at-least-once promises are checked after every step:
//!
//! - the cursor moves only over a contiguous prefix of settled records (delivered, not for this
//!   uplink, or dead-lettered), and never back;
//! - nothing is dead-lettered twice, restarts included;
//! - the first deliveries of one device are in order (apart from a record the broker refused
//!   with a nack: it comes after the records sent behind it, which the broker took);
//! - the duplicates stay within one window per failure or restart;
//! - at the end, with the faults over, every record is delivered or dead-lettered.
//!
//! The link is one ordered connection (an AMQP channel): messages reach the broker in the order
//! they were sent; the broker's answers come back in any order. A failure loses what is still
//! on the wire and every answer not yet read; what reached the broker stays there.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use gateway::forwarder::settle::{Read, Settle, Step};
use proptest::prelude::*;

/// What a record is to this uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Routed here; the broker takes it (unless it nacks).
    Normal,
    /// Not routed to this uplink.
    NotOurs,
    /// Cannot be prepared (bad payload): dead-lettered without being sent.
    Unsendable,
    /// The broker returns it (unroutable).
    Unroutable,
    /// The broker nacks it every time.
    Refused,
}

#[derive(Debug, Clone)]
struct Rec {
    seq: u64,
    device: u8,
    kind: Kind,
}

#[derive(Debug, Clone, Copy)]
enum Event {
    /// Read up to n records (as room allows), prepare and send them.
    Read(u8),
    /// The oldest message on the wire reaches the broker.
    Arrive,
    /// The broker's answer to the k-th pending answer (mod their number) reaches the forwarder.
    Answer(u8),
    /// The connection fails.
    Fail,
    /// The process restarts (the settle state is rebuilt from the persisted cursor).
    Restart,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (1u8..16).prop_map(Event::Read),
        8 => Just(Event::Arrive),
        8 => any::<u8>().prop_map(Event::Answer),
        1 => Just(Event::Fail),
        1 => Just(Event::Restart),
    ]
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        20 => Just(Kind::Normal),
        2 => Just(Kind::NotOurs),
        1 => Just(Kind::Unsendable),
        1 => Just(Kind::Unroutable),
        1 => Just(Kind::Refused),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Confirm,
    Nack,
    Return,
}

struct Model {
    records: Vec<Rec>,
    window: usize,
    max_retries: u32,
    /// Nack a normal record with this chance in 256, at each arrival.
    nack_chance: u8,
    settle: Settle,
    /// The cursor as persisted (a restart resumes from it).
    persisted: u64,
    /// The reader's next index into `records`.
    next: usize,
    wire: VecDeque<u64>,
    answers: Vec<(u64, Answer)>,
    /// Every message the broker stored, in order.
    delivered: Vec<u64>,
    dead: Vec<u64>,
    /// Records the broker nacked at least once.
    ever_nacked: BTreeSet<u64>,
    faults: u64,
    rng: u64,
}

impl Model {
    fn new(
        records: Vec<Rec>,
        window: usize,
        max_retries: u32,
        nack_chance: u8,
        seed: u64,
    ) -> Model {
        Model {
            records,
            window,
            max_retries,
            nack_chance,
            settle: Settle::new(0, max_retries),
            persisted: 0,
            next: 0,
            wire: VecDeque::new(),
            answers: Vec::new(),
            delivered: Vec::new(),
            dead: Vec::new(),
            ever_nacked: BTreeSet::new(),
            faults: 0,
            rng: seed | 1,
        }
    }

    fn rand(&mut self) -> u8 {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 24) as u8
    }

    fn rec(&self, seq: u64) -> &Rec {
        &self.records[(seq - 1) as usize]
    }

    /// Performs the settle state's steps as the forwarder does, checking each.
    fn steps(&mut self) {
        while let Some(step) = self.settle.poll() {
            match step {
                Step::DeadLetter { seq, reason } => {
                    assert!(!reason.is_empty());
                    assert!(
                        !self.dead.contains(&seq),
                        "record {seq} dead-lettered twice ({reason})"
                    );
                    assert!(seq > self.persisted, "dead letter {seq} behind the cursor");
                    self.dead.push(seq);
                }
                Step::Advance { seq, .. } => {
                    assert!(seq > self.persisted, "the cursor went back to {seq}");
                    for s in self.persisted + 1..=seq {
                        let r = self.rec(s);
                        let settled = r.kind == Kind::NotOurs
                            || self.delivered.contains(&s)
                            || self.dead.contains(&s);
                        assert!(settled, "cursor advanced to {seq} over unsettled {r:?}");
                    }
                    // The model persists at once (the forwarder batches cursor writes and counts
                    // the unpersisted ones in its window).
                    self.persisted = seq;
                }
                Step::Retry => {
                    self.next = self.settle.cursor() as usize;
                }
            }
        }
    }

    fn room(&self) -> usize {
        self.window.saturating_sub(self.settle.outstanding()) + self.settle.rereads()
    }

    fn read(&mut self, n: u8) {
        if self.settle.holding() {
            return;
        }
        let n = (n as usize).min(self.room());
        for _ in 0..n {
            let Some(r) = self.records.get(self.next).cloned() else {
                break;
            };
            self.next += 1;
            if self.settle.read(r.seq) == Read::Skip {
                continue;
            }
            match r.kind {
                Kind::NotOurs => self.settle.skipped(r.seq),
                Kind::Unsendable => self.settle.unsendable(r.seq, "bad payload".into()),
                _ => self.wire.push_back(r.seq),
            }
        }
        self.steps();
    }

    fn arrive(&mut self) {
        let Some(seq) = self.wire.pop_front() else {
            return;
        };
        let kind = self.rec(seq).kind;
        let answer = match kind {
            Kind::Unroutable => Answer::Return,
            Kind::Refused => Answer::Nack,
            _ if self.rand() < self.nack_chance => Answer::Nack,
            _ => Answer::Confirm,
        };
        match answer {
            Answer::Confirm => self.delivered.push(seq),
            Answer::Nack => {
                self.ever_nacked.insert(seq);
            }
            Answer::Return => {}
        }
        self.answers.push((seq, answer));
    }

    fn answer(&mut self, k: u8) {
        if self.answers.is_empty() {
            return;
        }
        let (seq, a) = self.answers.remove(k as usize % self.answers.len());
        match a {
            Answer::Confirm => self.settle.confirmed(seq),
            Answer::Nack => self.settle.nacked(seq),
            Answer::Return => self.settle.returned(seq, "NO_ROUTE".into()),
        }
        self.steps();
        if self.settle.holding() {
            assert!(
                self.settle.in_flight() > 0,
                "holding with nothing in flight"
            );
        }
    }

    fn fail(&mut self) {
        self.wire.clear();
        self.answers.clear();
        self.settle.failed();
        self.faults += 1;
        self.steps();
    }

    fn restart(&mut self) {
        self.wire.clear();
        self.answers.clear();
        self.settle = Settle::new(self.persisted, self.max_retries);
        self.next = self.persisted as usize;
        self.faults += 1;
    }

    fn apply(&mut self, e: Event) {
        match e {
            Event::Read(n) => self.read(n),
            Event::Arrive => self.arrive(),
            Event::Answer(k) => self.answer(k),
            Event::Fail => self.fail(),
            Event::Restart => self.restart(),
        }
        self.check_order_and_duplicates();
    }

    fn check_order_and_duplicates(&self) {
        // First deliveries per device, in order, except records that were nacked.
        let mut seen = BTreeSet::new();
        let mut last: BTreeMap<u8, u64> = BTreeMap::new();
        for &seq in &self.delivered {
            if !seen.insert(seq) || self.ever_nacked.contains(&seq) {
                continue;
            }
            let d = self.rec(seq).device;
            if let Some(&prev) = last.get(&d) {
                assert!(
                    prev < seq,
                    "device {d}: {seq} first delivered after {prev}: {:?}",
                    self.delivered
                );
            }
            last.insert(d, seq);
        }
        let dups = (self.delivered.len() - seen.len()) as u64;
        assert!(
            dups <= self.faults * self.window as u64,
            "{dups} duplicates after {} faults with window {}",
            self.faults,
            self.window
        );
    }

    /// No more faults: run until everything is settled.
    fn finish(&mut self) {
        let mut rounds = 0;
        while (self.persisted as usize) < self.records.len() {
            rounds += 1;
            assert!(
                rounds < 100_000,
                "no progress: cursor {} of {}, in flight {}, holding {}",
                self.persisted,
                self.records.len(),
                self.settle.in_flight(),
                self.settle.holding()
            );
            self.read(16);
            while !self.wire.is_empty() {
                self.arrive();
            }
            while !self.answers.is_empty() {
                self.answer(0);
            }
            self.check_order_and_duplicates();
        }
        for r in &self.records {
            let ok = match r.kind {
                Kind::NotOurs => !self.delivered.contains(&r.seq) && !self.dead.contains(&r.seq),
                Kind::Unsendable | Kind::Unroutable | Kind::Refused => {
                    self.dead.contains(&r.seq) && !self.delivered.contains(&r.seq)
                }
                Kind::Normal => self.delivered.contains(&r.seq) || self.dead.contains(&r.seq),
            };
            assert!(
                ok,
                "{r:?}: delivered {:?}, dead {:?}",
                self.delivered, self.dead
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn settle_keeps_the_at_least_once_promises(
        kinds in prop::collection::vec((kind(), 0u8..4), 1..120),
        events in prop::collection::vec(event(), 0..400),
        window in 1usize..24,
        max_retries in 0u32..3,
        nack_chance in prop_oneof![Just(0u8), 1u8..40],
        seed in any::<u64>(),
    ) {
        let records = kinds
            .into_iter()
            .enumerate()
            .map(|(i, (kind, device))| Rec { seq: i as u64 + 1, device, kind })
            .collect();
        let mut m = Model::new(records, window, max_retries, nack_chance, seed);
        for e in events {
            m.apply(e);
        }
        // Random nacks of normal records may continue; a record nacked more than max_retries
        // times is dead-lettered, which the final check allows for normal records.
        m.finish();
    }
}
