//! A model test in the spirit of vector's `disk_v2` model tests: random sequences of operations on
//! the real queue, checked step by step against a simple in-memory model of what it must do.
//!
//! The model is the log of records that exist (durable, in order) and, per cursor, the confirmed
//! position and the read position. A crash is modelled as "lose what was not acknowledged": some
//! appends are left in flight, the queue is closed (which writes them), and the active segment is
//! cut at a random point after the last acknowledged record, as a crash mid-write leaves it.
//! Records whose appends were in flight may or may not survive; the ones wholly before the cut do.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::OpenOptions;
use std::path::Path;

use common::*;
use gateway::queue::{Queue, Reader, Record};
use proptest::prelude::*;

const SEGMENT: u64 = 4096;
const MAX: u64 = 64 << 20;
const CURSORS: [&str; 2] = ["amqp", "kafka"];

#[derive(Debug, Clone)]
enum Op {
    Append {
        size: usize,
        device: u8,
    },
    AppendMany {
        count: u8,
        size: usize,
    },
    Read {
        cursor: usize,
        n: usize,
        wait: bool,
    },
    /// Confirm through the `k`-th (modulo) record read but not yet confirmed.
    Ack {
        cursor: usize,
        k: usize,
    },
    Rewind {
        cursor: usize,
    },
    Reopen,
    /// `in_flight` appends not waited for, then a crash that cuts the active segment at the
    /// `cut`-th (modulo) possible offset after the last acknowledged record.
    Crash {
        in_flight: u8,
        cut: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (8usize..600, 0u8..4).prop_map(|(size, device)| Op::Append { size, device }),
        3 => (1u8..20, 8usize..400).prop_map(|(count, size)| Op::AppendMany { count, size }),
        6 => (0..CURSORS.len(), 1usize..25, any::<bool>())
            .prop_map(|(cursor, n, wait)| Op::Read { cursor, n, wait }),
        4 => (0..CURSORS.len(), any::<usize>()).prop_map(|(cursor, k)| Op::Ack { cursor, k }),
        1 => (0..CURSORS.len()).prop_map(|cursor| Op::Rewind { cursor }),
        1 => Just(Op::Reopen),
        1 => (0u8..5, any::<u16>()).prop_map(|(in_flight, cut)| Op::Crash { in_flight, cut }),
    ]
}

#[derive(Debug, Clone, Copy, Default)]
struct CursorModel {
    /// Every record up to this seq is confirmed (0: none).
    acked: u64,
    /// The reader returns records after this seq next.
    read_to: u64,
}

#[derive(Debug, Default)]
struct Model {
    /// (seq, id) of every record that exists or existed and was deleted after every cursor
    /// confirmed it, in order.
    log: Vec<(u64, u64)>,
    cursors: [CursorModel; 2],
    next_id: u64,
}

/// Single appends of an odd id carry the MQTT 5 extras (expiry = the id, a response topic,
/// correlation data = the id's bytes); every other record has none.
fn extras_of(id: u64) -> Option<(u32, String, Vec<u8>)> {
    (id % 2 == 1).then(|| (id as u32, format!("reply/{id}"), id.to_be_bytes().to_vec()))
}

impl Model {
    /// An even id: a record without extras (see [`extras_of`]).
    fn next_plain_id(&mut self) -> u64 {
        self.next_id += self.next_id % 2;
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn after(&self, seq: u64) -> impl Iterator<Item = &(u64, u64)> {
        self.log.iter().filter(move |(s, _)| *s > seq)
    }
}

struct Real {
    q: Queue,
    readers: Vec<Reader>,
}

fn open(dir: &Path) -> (Real, gateway::queue::RecoveryReport) {
    let (q, report) = Queue::open(opts(dir, SEGMENT, MAX)).unwrap();
    let readers = CURSORS.iter().map(|n| q.reader(n).unwrap()).collect();
    (Real { q, readers }, report)
}

fn close(real: Real) {
    drop(real.readers);
    shut(real.q);
}

fn device(d: u8) -> String {
    format!("device-{d}")
}

fn pairs(records: &[Record]) -> Vec<(u64, u64)> {
    records.iter().map(|r| (r.seq, id_of(r))).collect()
}

/// The checks that hold between any two operations.
fn check(real: &Real, model: &Model, step: usize) {
    let stats = real.q.stats();
    for (i, name) in CURSORS.iter().enumerate() {
        let c = &model.cursors[i];
        assert_eq!(
            real.readers[i].acked(),
            c.acked,
            "step {step}: {name} acked"
        );
        let cs = stats.cursors.iter().find(|s| s.name == *name).unwrap();
        assert_eq!(cs.acked, c.acked, "step {step}: {name} acked in stats");
        assert_eq!(
            cs.lag_records,
            model.after(c.acked).count() as u64,
            "step {step}: {name} lag"
        );
        assert_eq!(cs.dropped, 0, "step {step}: {name} dropped");
    }
    // Segments go whole, and only once every cursor confirmed all their records: what the queue
    // holds is a suffix of the log that contains everything some cursor has not confirmed.
    let min_acked = model.cursors.iter().map(|c| c.acked).min().unwrap();
    let must_keep = model.after(min_acked).count() as u64;
    assert!(
        stats.records >= must_keep && stats.records <= model.log.len() as u64,
        "step {step}: queue holds {} records, model {} of which {must_keep} unconfirmed",
        stats.records,
        model.log.len()
    );
    match stats.first_seq {
        Some(first) => assert_eq!(
            stats.records,
            model.log.iter().filter(|(s, _)| *s >= first).count() as u64,
            "step {step}: records from first_seq {first} on"
        ),
        None => assert_eq!(stats.records, 0, "step {step}"),
    }
    assert_eq!(stats.dropped_records, 0);
    assert_eq!(stats.quarantined_records, 0);
}

async fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let (mut real, _) = open(dir.path());
    let mut model = Model::default();

    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Append { size, device: d } => {
                let id = model.next_id;
                model.next_id += 1;
                let p = payload(id, size);
                let dev = device(d);
                let mut r = gateway::queue::NewRecord::new(&dev, TOPIC, &p);
                let extras = extras_of(id);
                if let Some((expiry, topic, data)) = &extras {
                    r.message_expiry = Some(*expiry);
                    r.response_topic = Some(topic);
                    r.correlation_data = Some(data);
                }
                let seq = real.q.append(&r).await.unwrap();
                assert!(
                    model.log.last().is_none_or(|(s, _)| *s < seq),
                    "step {step}"
                );
                model.log.push((seq, id));
            }
            Op::AppendMany { count, size } => {
                // Concurrent appends share group commits; each resolves once durable.
                let mut tasks = Vec::new();
                for _ in 0..count {
                    let id = model.next_plain_id();
                    let p = payload(id, size);
                    let pending = real.q.try_append(&rec(&p)).unwrap();
                    tasks.push((id, pending));
                }
                for (id, pending) in tasks {
                    let seq = pending.durable().await.unwrap();
                    assert!(
                        model.log.last().is_none_or(|(s, _)| *s < seq),
                        "step {step}"
                    );
                    model.log.push((seq, id));
                }
            }
            Op::Read { cursor, n, wait } => {
                let c = model.cursors[cursor];
                let expected: Vec<(u64, u64)> = model.after(c.read_to).take(n).copied().collect();
                let reader = &mut real.readers[cursor];
                let got = if wait && !expected.is_empty() {
                    // next_batch returns what is there (at least one), up to n.
                    let mut got = Vec::new();
                    while got.len() < expected.len() {
                        let want = expected.len() - got.len();
                        let b = tokio::time::timeout(
                            std::time::Duration::from_secs(10),
                            reader.next_batch(want, usize::MAX),
                        )
                        .await
                        .expect("next_batch waited although records are there")
                        .unwrap();
                        got.extend(b);
                    }
                    got
                } else {
                    reader.read_now(n, usize::MAX).unwrap()
                };
                assert_eq!(pairs(&got), expected, "step {step}: read {n} from {cursor}");
                for (r, (_, id)) in got.iter().zip(&expected) {
                    assert_eq!(r.payload, payload(*id, r.payload.len()), "step {step}");
                    let extras = r.message_expiry.map(|e| {
                        (
                            e,
                            r.response_topic.clone().unwrap_or_default(),
                            r.correlation_data.clone().unwrap_or_default(),
                        )
                    });
                    assert_eq!(extras, extras_of(*id), "step {step}: extras of {id}");
                }
                if let Some(last) = got.last() {
                    model.cursors[cursor].read_to = last.seq;
                }
            }
            Op::Ack { cursor, k } => {
                let c = model.cursors[cursor];
                let candidates: Vec<u64> = model
                    .after(c.acked)
                    .filter(|(s, _)| *s <= c.read_to)
                    .map(|(s, _)| *s)
                    .collect();
                if candidates.is_empty() {
                    continue;
                }
                let seq = candidates[k % candidates.len()];
                real.readers[cursor].ack_through(seq).await.unwrap();
                model.cursors[cursor].acked = seq;
            }
            Op::Rewind { cursor } => {
                real.readers[cursor].rewind();
                let c = &mut model.cursors[cursor];
                c.read_to = c.acked;
            }
            Op::Reopen => {
                close(real);
                let (r, report) = open(dir.path());
                real = r;
                assert_eq!(report.truncated_bytes, 0, "step {step}: clean close");
                assert_eq!(report.quarantined_ranges, 0, "step {step}");
                assert!(report.cursors_reset.is_empty(), "step {step}");
                for c in &mut model.cursors {
                    c.read_to = c.acked;
                }
            }
            Op::Crash { in_flight, cut } => {
                let mut flying = Vec::new();
                for _ in 0..in_flight {
                    let id = model.next_plain_id();
                    let p = payload(id, 100);
                    let pending = real.q.try_append(&rec(&p)).unwrap();
                    flying.push((pending.seq(), id));
                    drop(pending);
                }
                close(real);
                let last = *segment_bases(dir.path()).last().unwrap();
                let path = segment_path(dir.path(), last);
                let len = std::fs::metadata(&path).unwrap().len() as usize;
                let frames = frames_in(&path);
                let acknowledged_end = frames
                    .iter()
                    .filter(|f| model.log.iter().any(|(s, _)| *s == f.seq))
                    .map(|f| f.end())
                    .max()
                    .unwrap_or(SEGMENT_HEADER);
                let cut_at = acknowledged_end + cut as usize % (len - acknowledged_end + 1);
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(cut_at as u64)
                    .unwrap();
                let lost: Vec<u64> = frames
                    .iter()
                    .filter(|f| f.end() > cut_at)
                    .map(|f| f.seq)
                    .collect();
                let kept_end = frames
                    .iter()
                    .filter(|f| f.end() <= cut_at)
                    .map(|f| f.end())
                    .max()
                    .unwrap_or(SEGMENT_HEADER);
                for (seq, id) in flying {
                    if !lost.contains(&seq) {
                        model.log.push((seq, id));
                    }
                }
                let (r, report) = open(dir.path());
                real = r;
                assert_eq!(
                    report.truncated_bytes,
                    (cut_at - kept_end) as u64,
                    "step {step}: crash cut at {cut_at}"
                );
                assert_eq!(report.quarantined_ranges, 0, "step {step}");
                for c in &mut model.cursors {
                    c.read_to = c.acked;
                }
            }
        }
        check(&real, &model, step);
    }

    // Finally, a new cursor reads exactly the records the queue holds: a suffix of the log that
    // includes everything not confirmed by every cursor, in order, each once.
    let mut probe = real.q.reader("probe").unwrap();
    let got = pairs(&read_all(&mut probe));
    let min_acked = model.cursors.iter().map(|c| c.acked).min().unwrap();
    let must: Vec<(u64, u64)> = model.after(min_acked).copied().collect();
    assert!(got.len() >= must.len());
    assert_eq!(got[..], model.log[model.log.len() - got.len()..]);
    assert_eq!(real.q.stats().records, got.len() as u64);
    drop(probe);
    real.q.remove_cursor("probe").unwrap();
    close(real);
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    })]

    #[test]
    fn queue_behaves_like_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(ops));
    }
}
