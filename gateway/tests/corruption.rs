//! Damage to files at rest: bit flips in segments, damaged cursor files, garbage headers and
//! random garbage. The queue must detect damage, quarantine and count it, deliver every other
//! record in order, and never panic or refuse to open.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;

use common::*;
use gateway::queue::{Queue, Record, RecoveryReport};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SEGMENT: u64 = 4096;
const MAX: u64 = 1 << 20;
/// 64-byte payloads: 41 records per 4 KiB segment.
const SIZE: usize = 64;

fn open(dir: &Path) -> (Queue, RecoveryReport) {
    Queue::open(opts(dir, SEGMENT, MAX)).unwrap()
}

/// Writes records with ids `0..n` in one run and closes; returns (id, seq) of each.
async fn write_closed_queue(dir: &Path, n: u64) -> Vec<(u64, u64)> {
    let (q, _) = open(dir);
    let seqs = append_ids(&q, 0..n, SIZE).await;
    shut(q);
    (0..n).zip(seqs).collect()
}

fn pairs(records: &[Record]) -> Vec<(u64, u64)> {
    records.iter().map(|r| (id_of(r), r.seq)).collect()
}

fn read_fresh(q: &Queue, cursor: &str) -> Vec<Record> {
    let mut r = q.reader(cursor).unwrap();
    read_all(&mut r)
}

fn flip(path: &Path, offset: usize, mask: u8) {
    let mut b = fs::read(path).unwrap();
    b[offset] ^= mask;
    fs::write(path, b).unwrap();
}

/// A place in a frame: its name and its file offset.
type Spot = (&'static str, fn(&FrameAt) -> usize);

/// Where in a frame a bit is flipped.
const FRAME_SPOTS: [Spot; 5] = [
    ("length prefix, low byte", |f| f.offset),
    ("length prefix, high bits", |f| f.offset + 2),
    ("crc", |f| f.offset + 5),
    ("sequence number", |f| f.offset + 9),
    ("payload", |f| f.end() - 3),
];

#[tokio::test]
async fn bit_flip_in_a_sealed_segment_quarantines_only_the_damaged_record() {
    let template = tempfile::tempdir().unwrap();
    let written = write_closed_queue(template.path(), 200).await;
    let bases = segment_bases(template.path());
    assert!(bases.len() >= 4);
    let sealed = bases[1];
    assert!(meta_path(template.path(), sealed).exists());
    let frames = frames_in(&segment_path(template.path(), sealed));
    let victim = frames[frames.len() / 2];

    for (spot, at) in FRAME_SPOTS {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template.path(), dir.path());
        flip(&segment_path(dir.path(), sealed), at(&victim), 0x04);
        let expected: Vec<(u64, u64)> = written
            .iter()
            .copied()
            .filter(|&(_, s)| s != victim.seq)
            .collect();

        let (q, _) = open(dir.path());
        assert!(quarantine_files(dir.path()).len() <= 1, "{spot}");
        let got = read_fresh(&q, "a");
        assert_eq!(pairs(&got), expected, "{spot}");
        let stats = q.stats();
        assert_eq!(stats.quarantined_records, 1, "{spot}");
        assert_eq!(stats.quarantined_ranges, 1, "{spot}");
        let quarantined = quarantine_files(dir.path());
        assert_eq!(quarantined.len(), 1, "{spot}");
        let bytes = fs::read(segment_path(template.path(), sealed)).unwrap();
        let mut damaged = bytes[victim.offset..victim.end()].to_vec();
        damaged[at(&victim) - victim.offset] ^= 0x04;
        assert_eq!(fs::read(&quarantined[0]).unwrap(), damaged, "{spot}");
        shut(q);
    }
}

#[tokio::test]
async fn bit_flip_in_the_last_segment_is_quarantined_on_open() {
    let template = tempfile::tempdir().unwrap();
    let written = write_closed_queue(template.path(), 200).await;
    let last = last_nonempty_segment(template.path());
    let frames = frames_in(&segment_path(template.path(), last));
    assert!(frames.len() >= 5);
    let victim = frames[frames.len() / 2];

    for (spot, at) in FRAME_SPOTS {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template.path(), dir.path());
        flip(&segment_path(dir.path(), last), at(&victim), 0x40);
        let expected: Vec<(u64, u64)> = written
            .iter()
            .copied()
            .filter(|&(_, s)| s != victim.seq)
            .collect();

        let (q, report) = open(dir.path());
        assert_eq!(report.quarantined_records, 1, "{spot}");
        assert_eq!(report.quarantined_ranges, 1, "{spot}");
        assert_eq!(report.truncated_bytes, 0, "{spot}");
        assert_eq!(report.records, written.len() as u64 - 1, "{spot}");
        assert_eq!(quarantine_files(dir.path()).len(), 1, "{spot}");
        assert_eq!(q.stats().records, written.len() as u64 - 1, "{spot}");
        assert_eq!(pairs(&read_fresh(&q, "a")), expected, "{spot}");
        assert_eq!(q.stats().quarantined_records, 1, "{spot}");
        // The queue serves on: new records go after the damaged segment.
        let s = q.append(&rec(&payload(500, SIZE))).await.unwrap();
        assert!(s > written.last().unwrap().1);
        shut(q);
    }
}

#[tokio::test]
async fn damage_is_counted_once_across_readers_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_closed_queue(dir.path(), 200).await;
    let bases = segment_bases(dir.path());
    let sealed = bases[1];
    let last = *bases.last().unwrap();
    let f_sealed = frames_in(&segment_path(dir.path(), sealed))[3];
    let f_last = frames_in(&segment_path(dir.path(), last))[2];
    flip(&segment_path(dir.path(), sealed), f_sealed.end() - 1, 1);
    flip(&segment_path(dir.path(), last), f_last.end() - 1, 1);
    let expected: Vec<(u64, u64)> = written
        .iter()
        .copied()
        .filter(|&(_, s)| s != f_sealed.seq && s != f_last.seq)
        .collect();

    let (q, report) = open(dir.path());
    assert_eq!(
        report.quarantined_records, 1,
        "the last segment is scanned on open"
    );
    for name in ["a", "b"] {
        assert_eq!(pairs(&read_fresh(&q, name)), expected, "reader {name}");
        let stats = q.stats();
        assert_eq!(stats.quarantined_records, 2, "after reader {name}");
        assert_eq!(stats.quarantined_ranges, 2, "after reader {name}");
    }
    let mut a = q.reader("a").unwrap();
    a.rewind();
    assert_eq!(pairs(&read_all(&mut a)), expected);
    assert_eq!(q.stats().quarantined_records, 2);
    drop(a);
    shut(q);
    assert_eq!(quarantine_files(dir.path()).len(), 2);

    for round in 0..2 {
        let (q, report) = open(dir.path());
        assert_eq!(report.quarantined_records, 0, "reopen {round}");
        assert_eq!(report.quarantined_ranges, 0, "reopen {round}");
        assert_eq!(pairs(&read_fresh(&q, &format!("c{round}"))), expected);
        assert_eq!(q.stats().quarantined_records, 0, "reopen {round}");
        assert_eq!(quarantine_files(dir.path()).len(), 2);
        shut(q);
    }
}

/// A queue whose cursor "up" confirmed ids 0..10 and then 0..30, and "ok" ids 0..10.
async fn queue_with_two_cursors(dir: &Path) {
    let (q, _) = open(dir);
    let mut up = q.reader("up").unwrap();
    let mut ok = q.reader("ok").unwrap();
    let seqs = append_ids(&q, 0..50, SIZE).await;
    read_all(&mut up);
    up.ack_through(seqs[9]).await.unwrap();
    up.ack_through(seqs[29]).await.unwrap();
    read_all(&mut ok);
    ok.ack_through(seqs[9]).await.unwrap();
    drop((up, ok));
    shut(q);
}

#[tokio::test]
async fn unreadable_cursor_file_resets_that_cursor_to_the_oldest_record() {
    for damage in ["every byte flipped", "empty", "torn inside the first slot"] {
        let dir = tempfile::tempdir().unwrap();
        queue_with_two_cursors(dir.path()).await;
        let path = cursor_path(dir.path(), "up");
        let b = fs::read(&path).unwrap();
        match damage {
            "every byte flipped" => {
                fs::write(&path, b.iter().map(|x| !x).collect::<Vec<u8>>()).unwrap()
            }
            "empty" => fs::write(&path, b"").unwrap(),
            _ => fs::write(&path, &b[..20]).unwrap(),
        }
        let (q, report) = open(dir.path());
        assert_eq!(report.cursors_reset, vec!["up".to_string()], "{damage}");
        let stats = q.stats();
        let up_stats = stats.cursors.iter().find(|c| c.name == "up").unwrap();
        assert_eq!(up_stats.lag_records, 50, "{damage}");
        let mut up = q.reader("up").unwrap();
        // Duplicates, not loss: everything again.
        assert_eq!(
            ids_of(&read_all(&mut up)),
            (0..50).collect::<Vec<_>>(),
            "{damage}"
        );
        let mut ok = q.reader("ok").unwrap();
        assert_eq!(
            ids_of(&read_all(&mut ok)),
            (10..50).collect::<Vec<_>>(),
            "{damage}"
        );
        drop((up, ok));
        shut(q);
        // The reset was persisted: the next open finds nothing to reset.
        let (q, report) = open(dir.path());
        assert!(report.cursors_reset.is_empty(), "{damage}");
        let mut up = q.reader("up").unwrap();
        assert_eq!(read_all(&mut up).len(), 50, "{damage}");
    }
}

/// The cursor file keeps the previous position beside the newest one: damage to either leaves a
/// position that is not ahead of the true one (duplicates, not loss).
#[tokio::test]
async fn damage_to_one_cursor_slot_falls_back_to_a_previous_position() {
    let mut firsts = Vec::new();
    // Flip a byte in the middle of the first 40-byte slot, then of the second.
    for at in [20, 60] {
        let dir = tempfile::tempdir().unwrap();
        queue_with_two_cursors(dir.path()).await;
        flip(&cursor_path(dir.path(), "up"), at, 0x01);
        let (q, report) = open(dir.path());
        assert!(report.cursors_reset.is_empty(), "byte {at}");
        let mut up = q.reader("up").unwrap();
        let got = ids_of(&read_all(&mut up));
        let first = got[0];
        assert_eq!(got, (first..50).collect::<Vec<_>>(), "byte {at}");
        firsts.push(first);
    }
    firsts.sort_unstable();
    // One slot held the newest position (after id 29), the other the one before (after id 9).
    assert_eq!(firsts, vec![10, 30]);
}

/// A garbage header must not panic or stop the queue, nor silently lose records: every record is
/// either delivered or counted as quarantined.
async fn garbage_header_case(which: &str) -> (Vec<(u64, u64)>, Vec<(u64, u64)>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let written = write_closed_queue(dir.path(), 200).await;
    let bases = segment_bases(dir.path());
    let base = match which {
        "sealed" => bases[1],
        _ => *bases.last().unwrap(),
    };
    let path = segment_path(dir.path(), base);
    let mut b = fs::read(&path).unwrap();
    b[..SEGMENT_HEADER].copy_from_slice(b"\xde\xad\xbe\xefGARBAGE\x00\x01\x02\x03\x04");
    fs::write(&path, &b).unwrap();

    let (q, report) = open(dir.path());
    let mut r = q.reader("a").unwrap();
    let got = pairs(&read_all(&mut r));
    assert_strictly_increasing(&got.iter().map(|p| p.1).collect::<Vec<_>>());
    let quarantined = report
        .quarantined_records
        .max(q.stats().quarantined_records);
    // The queue still takes and serves records.
    let s = q.append(&rec(&payload(900, SIZE))).await.unwrap();
    assert_eq!(seqs_of(&read_all(&mut r)), vec![s]);
    (written, got, quarantined)
}

#[tokio::test]
async fn garbage_header_of_a_sealed_segment_is_handled_without_loss() {
    let (written, got, quarantined) = garbage_header_case("sealed").await;
    // Every record is either delivered or counted as quarantined, never silently dropped.
    assert!(got.iter().all(|p| written.contains(p)));
    assert_eq!(got.len() as u64 + quarantined, written.len() as u64);
}

#[tokio::test]
async fn garbage_header_of_the_last_segment_is_handled_without_loss() {
    let (written, got, quarantined) = garbage_header_case("last").await;
    assert!(got.iter().all(|p| written.contains(p)));
    assert_eq!(got.len() as u64 + quarantined, written.len() as u64);
}

/// One random change to a queue directory.
fn mutate(rng: &mut StdRng, dir: &Path, bases: &[u64]) -> String {
    let seg_dir = segments_dir(dir);
    let random_bytes = |rng: &mut StdRng, max: usize| -> Vec<u8> {
        let n = rng.gen_range(0..=max);
        (0..n).map(|_| rng.gen()).collect()
    };
    let existing = bases[rng.gen_range(0..bases.len())];
    match rng.gen_range(0..11) {
        0 => {
            let base = match rng.gen_range(0..3) {
                0 => rng.gen_range(1..bases[bases.len() - 1] + 100),
                1 => existing,
                _ => rng.gen_range(1..u64::MAX / 2),
            };
            let mut content = Vec::new();
            if rng.gen_bool(0.5) {
                content.extend_from_slice(b"EGWQSEG1");
                content.extend_from_slice(&base.to_le_bytes());
            }
            content.extend(random_bytes(rng, 3000));
            fs::write(segment_path(dir, base), content).unwrap();
            format!("garbage segment {base}")
        }
        1 => {
            let p = segment_path(dir, existing);
            let mut b = fs::read(&p).unwrap();
            let n = rng.gen_range(1..64);
            let at = rng.gen_range(0..b.len());
            for x in b.iter_mut().skip(at).take(n) {
                *x = rng.gen();
            }
            fs::write(&p, b).unwrap();
            format!("{n} random bytes at {at} of segment {existing}")
        }
        2 => {
            let p = segment_path(dir, existing);
            let len = fs::metadata(&p).unwrap().len();
            let to = rng.gen_range(0..=len);
            fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(to)
                .unwrap();
            format!("segment {existing} truncated to {to}")
        }
        3 => {
            let p = segment_path(dir, existing);
            let mut b = fs::read(&p).unwrap();
            b.extend(random_bytes(rng, 500));
            fs::write(&p, b).unwrap();
            format!("random bytes appended to segment {existing}")
        }
        4 => {
            let mut m = Vec::new();
            if rng.gen_bool(0.5) {
                m.extend_from_slice(b"EGWQMET1");
            }
            m.extend(random_bytes(rng, 80));
            fs::write(meta_path(dir, existing), m).unwrap();
            format!("random sidecar for {existing}")
        }
        5 => {
            let name = ["a", "b", "new-one"][rng.gen_range(0..3)];
            let mut c = Vec::new();
            if rng.gen_bool(0.5) {
                c.extend_from_slice(b"EGWQCUR1");
            }
            c.extend(random_bytes(rng, 40));
            fs::write(cursor_path(dir, name), c).unwrap();
            format!("random cursor file {name}")
        }
        6 => {
            let mut r = Vec::new();
            if rng.gen_bool(0.5) {
                r.extend_from_slice(b"EGWQRES1");
            }
            r.extend(random_bytes(rng, 30));
            fs::write(dir.join("seq.reserved"), r).unwrap();
            "random seq.reserved".to_string()
        }
        7 => {
            // Names that parse as numbers without the queue's zero padding ("5.seg") are covered
            // by segment_like_file_names_without_zero_padding_do_not_stop_open.
            let name = [
                "notes.txt",
                "x.seg.tmp",
                ".seg",
                "abc.seg",
                "-1.seg",
                "1.meta.bak",
            ][rng.gen_range(0..6)];
            fs::write(seg_dir.join(name), random_bytes(rng, 100)).unwrap();
            format!("stray file {name}")
        }
        8 => {
            let to = rng.gen_range(1..bases[bases.len() - 1] + 1000);
            fs::copy(segment_path(dir, existing), segment_path(dir, to)).unwrap();
            format!("segment {existing} copied as {to}")
        }
        9 => {
            fs::remove_file(meta_path(dir, existing)).ok();
            let p = segment_path(dir, existing);
            let mut b = fs::read(&p).unwrap();
            let at = rng.gen_range(0..b.len());
            b[at] ^= 1 << rng.gen_range(0..8);
            fs::write(&p, b).unwrap();
            format!("bit flip at {at} of segment {existing} without sidecar")
        }
        _ => {
            fs::write(dir.join("LOCK"), random_bytes(rng, 20)).unwrap();
            fs::write(
                dir.join("quarantine")
                    .join(format!("{existing:020}-16.bin")),
                b"x",
            )
            .unwrap();
            "random LOCK and quarantine files".to_string()
        }
    }
}

#[tokio::test]
async fn random_garbage_never_makes_open_panic_or_fail() {
    let template = tempfile::tempdir().unwrap();
    {
        let (q, _) = open(template.path());
        let mut a = q.reader("a").unwrap();
        let _b = q.reader("b").unwrap();
        let seqs = append_ids(&q, 0..150, SIZE).await;
        read_all(&mut a);
        a.ack_through(seqs[20]).await.unwrap();
        drop((a, _b));
        shut(q);
    }
    let bases = segment_bases(template.path());
    let mut rng = StdRng::seed_from_u64(0x5eed_f00d);
    for case in 0..200 {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template.path(), dir.path());
        let changes: Vec<String> = (0..rng.gen_range(1..=3))
            .map(|_| mutate(&mut rng, dir.path(), &bases))
            .collect();
        let ctx = format!("case {case}: {changes:?}");

        let (q, _) = match Queue::open(opts(dir.path(), SEGMENT, MAX)) {
            Ok(x) => x,
            Err(e) => panic!("{ctx}: open failed: {e}"),
        };
        let mut readers = Vec::new();
        for name in ["a", "b", "fresh"] {
            let mut r = q.reader(name).unwrap();
            let mut got = Vec::new();
            loop {
                let batch = r
                    .read_now(64, usize::MAX)
                    .unwrap_or_else(|e| panic!("{ctx}: read failed: {e}"));
                if batch.is_empty() {
                    break;
                }
                got.extend(batch);
            }
            assert_strictly_increasing(&seqs_of(&got));
            // Damage may lose records, but never invents or alters one.
            for r in &got {
                let id = id_of(r);
                assert!(id < 150, "{ctx}: unknown record {r:?}");
                assert_eq!(r.payload, payload(id, SIZE), "{ctx}");
                assert_eq!((r.device_id.as_str(), r.topic.as_str()), (DEVICE, TOPIC));
            }
            readers.push(r);
        }
        let s = q
            .append(&rec(&payload(7777, SIZE)))
            .await
            .unwrap_or_else(|e| panic!("{ctx}: append failed: {e}"));
        for r in &mut readers {
            assert_eq!(seqs_of(&read_all(r)), vec![s], "{ctx}: reader {}", r.name());
        }
        drop(readers);
        shut(q);

        // Recovery leaves a directory that the next open accepts as it is.
        let (q, report) = Queue::open(opts(dir.path(), SEGMENT, MAX))
            .unwrap_or_else(|e| panic!("{ctx}: second open failed: {e}"));
        assert_eq!(report.truncated_bytes, 0, "{ctx}");
        assert_eq!(report.quarantined_ranges, 0, "{ctx}");
        assert!(report.cursors_reset.is_empty(), "{ctx}");
        let mut r = q.reader("fresh2").unwrap();
        let all = read_all(&mut r);
        assert_strictly_increasing(&seqs_of(&all));
        assert_eq!(all.last().map(|r| r.seq), Some(s), "{ctx}");
        drop(r);
        shut(q);
    }
}

/// A file in `segments/` named like a segment but not by the queue's own naming (no zero
/// padding, a sign) is not one of its segments and must not stop the queue.
#[tokio::test]
async fn segment_like_file_names_without_zero_padding_do_not_stop_open() {
    for name in ["5.seg", "+1.seg", "0001.seg"] {
        let dir = tempfile::tempdir().unwrap();
        let written = write_closed_queue(dir.path(), 100).await;
        fs::write(segments_dir(dir.path()).join(name), b"stray").unwrap();
        let (q, report) = match Queue::open(opts(dir.path(), SEGMENT, MAX)) {
            Ok(x) => x,
            Err(e) => panic!("{name}: open failed: {e}"),
        };
        assert_eq!(report.records, written.len() as u64, "{name}");
        assert_eq!(pairs(&read_fresh(&q, "a")), written, "{name}");
        shut(q);
    }
}
