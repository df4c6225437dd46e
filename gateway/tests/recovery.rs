//! Recovery on open: torn and zero-filled tails, missing or damaged sidecars, stray files, and
//! the directory lock.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{self, OpenOptions};
use std::path::Path;

use common::*;
use gateway::queue::{Queue, QueueError};

const SEGMENT: u64 = 4096;
const MAX: u64 = 1 << 20;

fn open(dir: &Path) -> (Queue, gateway::queue::RecoveryReport) {
    Queue::open(opts(dir, SEGMENT, MAX)).unwrap()
}

/// Writes `n` records (ids 0..n, payload sizes varying from 16 to 47 bytes) in one run and closes.
/// Returns (id, seq) of each.
async fn write_closed_queue(dir: &Path, n: u64) -> Vec<(u64, u64)> {
    let (q, _) = open(dir);
    let mut out = Vec::new();
    for id in 0..n {
        let p = payload(id, 16 + (id as usize * 7) % 32);
        out.push((id, q.append(&rec(&p)).await.unwrap()));
    }
    shut(q);
    out
}

/// Reads every record with a fresh cursor.
fn read_everything(q: &Queue, cursor: &str) -> Vec<gateway::queue::Record> {
    let mut r = q.reader(cursor).unwrap();
    read_all(&mut r)
}

#[tokio::test]
async fn torn_tail_at_every_offset_of_the_last_records_is_truncated_on_open() {
    let template = tempfile::tempdir().unwrap();
    let written = write_closed_queue(template.path(), 150).await;
    let max_seq_written = written.last().unwrap().1;
    let last = last_nonempty_segment(template.path());
    assert!(
        segment_bases(template.path()).len() >= 3,
        "want sealed segments before the last"
    );
    let seg_file = segment_path(template.path(), last);
    let file_len = fs::metadata(&seg_file).unwrap().len() as usize;
    let frames = frames_in(&seg_file);
    assert!(frames.len() >= 3);
    assert_eq!(frames.last().unwrap().end(), file_len);
    let first_cut = frames[frames.len() - 3].offset;

    for cut in first_cut..=file_len {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template.path(), dir.path());
        OpenOptions::new()
            .write(true)
            .open(segment_path(dir.path(), last))
            .unwrap()
            .set_len(cut as u64)
            .unwrap();
        let whole: Vec<u64> = frames
            .iter()
            .filter(|f| f.end() <= cut)
            .map(|f| f.seq)
            .collect();
        let kept_end = frames
            .iter()
            .filter(|f| f.end() <= cut)
            .map(|f| f.end())
            .max()
            .unwrap_or(SEGMENT_HEADER);
        let expected: Vec<(u64, u64)> = written
            .iter()
            .copied()
            .filter(|&(_, s)| s < last || whole.contains(&s))
            .collect();

        let (q, report) = open(dir.path());
        assert_eq!(
            report.truncated_bytes,
            (cut - kept_end) as u64,
            "cut at {cut}"
        );
        assert_eq!(report.records, expected.len() as u64, "cut at {cut}");
        assert_eq!(report.quarantined_records, 0, "cut at {cut}");
        let got = read_everything(&q, "check");
        let got_pairs: Vec<(u64, u64)> = got.iter().map(|r| (id_of(r), r.seq)).collect();
        assert_eq!(got_pairs, expected, "cut at {cut}");

        // The queue takes appends again, and never reuses a sequence number of a cut record.
        let p = payload(1000, 20);
        let seq = q.append(&rec(&p)).await.unwrap();
        assert!(seq > max_seq_written, "cut at {cut}: seq {seq} reused");
        let mut r = q.reader("check").unwrap();
        let after = read_all(&mut r);
        assert_eq!(
            ids_of(&after[after.len() - 1..]),
            vec![1000],
            "cut at {cut}"
        );
        drop(r);
        shut(q);
    }
}

#[tokio::test]
async fn zero_filled_tail_is_trimmed_on_open_without_counting_it_as_torn() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_closed_queue(dir.path(), 60).await;
    let last = last_nonempty_segment(dir.path());
    let path = segment_path(dir.path(), last);
    let len = fs::metadata(&path).unwrap().len();
    // What a crash can leave on some file systems: the size grew, the data never arrived.
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len + 3000)
        .unwrap();

    let (q, report) = open(dir.path());
    // Zeros to the end of a segment hold no record: they are what a preallocated segment's unused
    // space looks like, so they are trimmed without being reported as a torn write.
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(report.quarantined_records, 0);
    assert_eq!(fs::metadata(&path).unwrap().len(), len);
    let got = read_everything(&q, "r");
    assert_eq!(
        got.iter().map(|r| (id_of(r), r.seq)).collect::<Vec<_>>(),
        written
    );
    let seq = q.append(&rec(&payload(99, 20))).await.unwrap();
    assert!(seq > written.last().unwrap().1);
}

#[tokio::test]
async fn partial_frame_followed_by_zeros_is_truncated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_closed_queue(dir.path(), 30).await;
    let last = last_nonempty_segment(dir.path());
    let path = segment_path(dir.path(), last);
    let frames = frames_in(&path);
    let f = *frames.last().unwrap();
    // The last frame's first half made it to disk, the rest of the block is zeros.
    let mut bytes = fs::read(&path).unwrap();
    for b in &mut bytes[f.offset + f.len / 2..] {
        *b = 0;
    }
    bytes.extend_from_slice(&[0; 512]);
    fs::write(&path, &bytes).unwrap();

    let (q, report) = open(dir.path());
    assert_eq!(report.truncated_bytes, (bytes.len() - f.offset) as u64);
    let got = read_everything(&q, "r");
    assert_eq!(
        got.iter().map(|r| (id_of(r), r.seq)).collect::<Vec<_>>(),
        written[..written.len() - 1]
    );
}

#[tokio::test]
async fn missing_or_damaged_sidecars_are_rebuilt_by_scanning() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_closed_queue(dir.path(), 400).await;
    let bases = segment_bases(dir.path());
    assert!(bases.len() >= 6, "{bases:?}");
    // Every segment but the last was sealed with a sidecar.
    for b in &bases[..bases.len() - 1] {
        assert!(meta_path(dir.path(), *b).exists());
    }
    // Missing.
    fs::remove_file(meta_path(dir.path(), bases[0])).unwrap();
    // A flipped bit.
    let mut m = fs::read(meta_path(dir.path(), bases[1])).unwrap();
    m[20] ^= 0x10;
    fs::write(meta_path(dir.path(), bases[1]), &m).unwrap();
    // Torn.
    let m = fs::read(meta_path(dir.path(), bases[2])).unwrap();
    fs::write(meta_path(dir.path(), bases[2]), &m[..m.len() / 2]).unwrap();
    // Intact, but another segment's.
    fs::copy(
        meta_path(dir.path(), bases[4]),
        meta_path(dir.path(), bases[3]),
    )
    .unwrap();

    let (q, report) = open(dir.path());
    assert_eq!(report.records, written.len() as u64);
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(report.quarantined_records, 0);
    assert_eq!(q.stats().records, written.len() as u64);
    let got = read_everything(&q, "r");
    assert_eq!(
        got.iter().map(|r| (id_of(r), r.seq)).collect::<Vec<_>>(),
        written
    );
    // The scan wrote fresh sidecars, so the next open trusts them.
    for b in &bases {
        assert!(meta_path(dir.path(), *b).exists(), "no sidecar for {b}");
    }
    let stats_before = q.stats();
    drop(got);
    shut(q);
    let (q, report) = open(dir.path());
    assert_eq!(report.records, written.len() as u64);
    assert_eq!(q.stats().records, stats_before.records);
    assert_eq!(read_everything(&q, "r2").len(), written.len());
}

#[tokio::test]
async fn stray_empty_segment_files_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_closed_queue(dir.path(), 100).await;
    let bases = segment_bases(dir.path());
    let last = *bases.last().unwrap();
    let last_seq = written.last().unwrap().1;
    // A roll cut off by a crash (empty file after the last segment), a zero-length file between
    // two segments, and one holding just a valid header.
    let after = last_seq + 1;
    let between = bases[1] + 1;
    let header_only = last_seq + 50;
    fs::write(segment_path(dir.path(), after), b"").unwrap();
    fs::write(segment_path(dir.path(), between), b"").unwrap();
    let mut header = b"EGWQSEG1".to_vec();
    header.extend_from_slice(&header_only.to_le_bytes());
    fs::write(segment_path(dir.path(), header_only), &header).unwrap();

    let (q, report) = open(dir.path());
    assert_eq!(report.records, written.len() as u64);
    assert_eq!(report.quarantined_ranges, 0);
    assert!(report.next_seq > last_seq);
    // Left: the old segments and the new, empty active one.
    let mut expected = bases.clone();
    expected.push(report.next_seq);
    assert_eq!(segment_bases(dir.path()), expected);
    assert!(last < report.next_seq);
    let active_len = fs::metadata(segment_path(dir.path(), report.next_seq))
        .unwrap()
        .len();
    assert_eq!(active_len, SEGMENT_HEADER as u64);
    let got = read_everything(&q, "r");
    assert_eq!(
        got.iter().map(|r| (id_of(r), r.seq)).collect::<Vec<_>>(),
        written
    );
}

#[tokio::test]
async fn stats_after_reopen_describe_the_records_present() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_closed_queue(dir.path(), 100).await;
    let (q, report) = open(dir.path());
    assert_eq!(report.records, 100);
    let stats = q.stats();
    assert_eq!(stats.records, 100);
    assert_eq!(stats.first_seq, Some(written[0].1));
    // The new active segment is empty: the last record is still the one written before.
    assert_eq!(stats.last_seq, Some(written[99].1));
    let first = read_everything(&q, "r")[0].received_at_us;
    assert_eq!(stats.oldest_time_us, Some(first));
}

#[tokio::test]
async fn second_open_of_an_open_directory_fails_with_locked_naming_the_pid() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = open(dir.path());
    let err = Queue::open(opts(dir.path(), SEGMENT, MAX)).unwrap_err();
    let pid = std::process::id().to_string();
    match &err {
        QueueError::Locked { holder, dir: d } => {
            assert_eq!(holder, &pid);
            assert_eq!(d, dir.path());
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    assert!(err.to_string().contains(&format!("pid {pid}")), "{err}");
    assert!(!err.is_retryable());
    // The failed open touched nothing: the first queue still works.
    let s = q.append(&rec(&payload(1, 20))).await.unwrap();
    let mut r = q.reader("r").unwrap();
    assert_eq!(seqs_of(&read_all(&mut r)), vec![s]);
    drop(r);

    shut(q);
    let (q, report) = open(dir.path());
    assert_eq!(report.records, 1);
    drop(q);
}

/// `close` stops the writer; the directory should then be free for the next `open`, as for a
/// process that exited, even if some clone or reader of the closed queue is still around.
#[tokio::test]
async fn close_releases_the_lock_while_handles_still_exist() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = open(dir.path());
    let reader = q.reader("r").unwrap();
    q.append(&rec(&payload(1, 20))).await.unwrap();
    q.close();
    let reopened = Queue::open(opts(dir.path(), SEGMENT, MAX));
    assert!(reopened.is_ok(), "{:?}", reopened.err());
    drop((q, reader));
}
