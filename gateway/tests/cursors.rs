//! Named cursors: independence, persistence, retention (which segments a cursor keeps), rewind,
//! clamping, and where a new cursor starts.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use gateway::queue::{Queue, QueueError};

const SEGMENT: u64 = 4096;
const MAX: u64 = 1 << 20;
/// 200-byte payloads: 17 records per 4 KiB segment.
const SIZE: usize = 200;

fn open(dir: &std::path::Path) -> Queue {
    Queue::open(opts(dir, SEGMENT, MAX)).unwrap().0
}

#[tokio::test]
async fn two_cursors_each_see_every_record_independently() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let mut a = q.reader("a").unwrap();
    let mut b = q.reader("b").unwrap();
    let seqs = append_ids(&q, 0..100, SIZE).await;

    let got_a = read_all(&mut a);
    assert_eq!(seqs_of(&got_a), seqs);
    assert_eq!(ids_of(&got_a), (0..100).collect::<Vec<_>>());
    a.ack_through(seqs[99]).await.unwrap();

    // a reading and confirming everything moves nothing for b.
    let first = b.read_now(30, usize::MAX).unwrap();
    assert_eq!(ids_of(&first), (0..30).collect::<Vec<_>>());
    b.ack_through(seqs[29]).await.unwrap();
    let rest = read_all(&mut b);
    assert_eq!(ids_of(&rest), (30..100).collect::<Vec<_>>());

    assert!(read_all(&mut a).is_empty());
    let more = append_ids(&q, 100..110, SIZE).await;
    assert_eq!(seqs_of(&read_all(&mut a)), more);
    assert_eq!(seqs_of(&read_all(&mut b)), more);
}

#[tokio::test]
async fn acked_position_and_lag_persist_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let seqs = {
        let q = open(dir.path());
        let mut up = q.reader("up").unwrap();
        let mut other = q.reader("other").unwrap();
        let seqs = append_ids(&q, 0..100, SIZE).await;
        assert_eq!(up.read_now(40, usize::MAX).unwrap().len(), 40);
        up.ack_through(seqs[39]).await.unwrap();
        assert_eq!(other.read_now(10, usize::MAX).unwrap().len(), 10);
        other.ack_through(seqs[9]).await.unwrap();
        shut(q);
        seqs
    };
    let q = open(dir.path());
    let stats = q.stats();
    let by_name = |n: &str| stats.cursors.iter().find(|c| c.name == n).unwrap().clone();
    assert_eq!(by_name("up").acked, seqs[39]);
    assert_eq!(by_name("up").lag_records, 60);
    assert_eq!(by_name("other").acked, seqs[9]);
    assert_eq!(by_name("other").lag_records, 90);

    let mut up = q.reader("up").unwrap();
    assert_eq!(up.acked(), seqs[39]);
    assert_eq!(ids_of(&read_all(&mut up)), (40..100).collect::<Vec<_>>());
    let mut other = q.reader("other").unwrap();
    assert_eq!(ids_of(&read_all(&mut other)), (10..100).collect::<Vec<_>>());
}

#[tokio::test]
async fn segment_is_deleted_only_when_every_cursor_has_passed_it() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let mut a = q.reader("a").unwrap();
    let mut b = q.reader("b").unwrap();
    let seqs = append_ids(&q, 0..100, SIZE).await;
    let bases = segment_bases(dir.path());
    assert!(bases.len() >= 5, "expected several segments, got {bases:?}");
    // Within one run sequence numbers are contiguous and each segment starts at its base.
    let last_of_first = bases[1] - 1;
    assert!(seqs.contains(&last_of_first));

    assert_eq!(read_all(&mut a).len(), 100);
    a.ack_through(seqs[99]).await.unwrap();
    assert_eq!(
        segment_bases(dir.path()),
        bases,
        "b has confirmed nothing yet"
    );

    assert!(!read_all(&mut b).is_empty());
    b.ack_through(last_of_first - 1).await.unwrap();
    assert_eq!(
        segment_bases(dir.path()),
        bases,
        "b has not passed the first segment's last record"
    );

    b.ack_through(last_of_first).await.unwrap();
    assert_eq!(segment_bases(dir.path()), bases[1..]);
    assert!(!meta_path(dir.path(), bases[0]).exists());
    assert!(!segment_path(dir.path(), bases[0]).exists());

    b.ack_through(seqs[99]).await.unwrap();
    // The last segment is never deleted (it may be the one being written).
    assert_eq!(segment_bases(dir.path()), vec![*bases.last().unwrap()]);
    let records_left = q.stats().records;
    let last_segment_records = seqs
        .iter()
        .filter(|&&s| s >= *bases.last().unwrap())
        .count();
    assert_eq!(records_left, last_segment_records as u64);
}

#[tokio::test]
async fn no_segment_is_deleted_while_no_cursor_exists() {
    let dir = tempfile::tempdir().unwrap();
    let seqs = {
        let q = open(dir.path());
        let seqs = append_ids(&q, 0..100, SIZE).await;
        shut(q);
        seqs
    };
    let before = segment_bases(dir.path());
    assert!(before.len() >= 5);
    let q = open(dir.path());
    let after = segment_bases(dir.path());
    assert_eq!(after[..before.len()], before[..]);
    assert_eq!(q.stats().records, 100);
    let mut late = q.reader("late").unwrap();
    assert_eq!(seqs_of(&read_all(&mut late)), seqs);
}

#[tokio::test]
async fn removing_a_lagging_cursor_releases_its_segments() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let mut a = q.reader("a").unwrap();
    let _b = q.reader("b").unwrap();
    let seqs = append_ids(&q, 0..100, SIZE).await;
    let bases = segment_bases(dir.path());
    assert_eq!(read_all(&mut a).len(), 100);
    a.ack_through(seqs[99]).await.unwrap();
    assert_eq!(segment_bases(dir.path()), bases);

    q.remove_cursor("b").unwrap();
    assert_eq!(segment_bases(dir.path()), vec![*bases.last().unwrap()]);
    assert!(!cursor_path(dir.path(), "b").exists());
    let names: Vec<String> = q.stats().cursors.into_iter().map(|c| c.name).collect();
    assert_eq!(names, vec!["a".to_string()]);
    // Readers share the open queue: drop them so that the directory can be opened again.
    drop((a, _b));
    shut(q);

    let q = open(dir.path());
    let names: Vec<String> = q.stats().cursors.into_iter().map(|c| c.name).collect();
    assert_eq!(names, vec!["a".to_string()]);
}

#[tokio::test]
async fn rewind_rereads_from_the_record_after_the_last_ack() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let mut r = q.reader("r").unwrap();
    let seqs = append_ids(&q, 0..50, SIZE).await;
    assert_eq!(
        ids_of(&r.read_now(30, usize::MAX).unwrap()),
        (0..30).collect::<Vec<_>>()
    );
    r.ack_through(seqs[9]).await.unwrap();
    assert_eq!(
        ids_of(&r.read_now(10, usize::MAX).unwrap()),
        (30..40).collect::<Vec<_>>()
    );

    r.rewind();
    assert_eq!(r.position(), seqs[10]);
    assert_eq!(ids_of(&read_all(&mut r)), (10..50).collect::<Vec<_>>());

    // Rewinding twice in a row, or with nothing read, changes nothing.
    r.rewind();
    r.rewind();
    assert_eq!(ids_of(&read_all(&mut r)), (10..50).collect::<Vec<_>>());
}

#[tokio::test]
async fn ack_beyond_the_last_record_is_clamped_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let mut r = q.reader("r").unwrap();
    let seqs = append_ids(&q, 0..10, SIZE).await;
    assert_eq!(read_all(&mut r).len(), 10);
    r.ack_through(u64::MAX).await.unwrap();
    assert_eq!(r.acked(), seqs[9]);
    let stats = q.stats();
    assert_eq!(stats.cursors[0].acked, seqs[9]);
    assert_eq!(stats.cursors[0].lag_records, 0);

    // Records appended later are not covered by the oversized ack.
    let more = append_ids(&q, 10..15, SIZE).await;
    assert_eq!(seqs_of(&read_all(&mut r)), more);
    let mut again = q.reader("r").unwrap();
    assert_eq!(seqs_of(&read_all(&mut again)), more);
    drop((r, again));
    shut(q);

    let q = open(dir.path());
    let mut r = q.reader("r").unwrap();
    assert_eq!(seqs_of(&read_all(&mut r)), more);
}

#[tokio::test]
async fn ack_below_the_acked_position_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    {
        let q = open(dir.path());
        let mut r = q.reader("r").unwrap();
        let seqs = append_ids(&q, 0..30, SIZE).await;
        assert_eq!(read_all(&mut r).len(), 30);
        r.ack_through(seqs[19]).await.unwrap();
        r.ack_through(seqs[4]).await.unwrap();
        assert_eq!(r.acked(), seqs[19]);
        assert_eq!(q.stats().cursors[0].acked, seqs[19]);
        shut(q);
    }
    let q = open(dir.path());
    let mut r = q.reader("r").unwrap();
    assert_eq!(ids_of(&read_all(&mut r)), (20..30).collect::<Vec<_>>());
}

#[tokio::test]
async fn new_cursor_starts_at_the_oldest_record_present() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let seqs = append_ids(&q, 0..100, SIZE).await;

    let mut late = q.reader("late").unwrap();
    assert_eq!(seqs_of(&read_all(&mut late)), seqs);

    // Once "late" has let the first two segments go, a newer cursor starts at the third.
    let bases = segment_bases(dir.path());
    late.ack_through(bases[2] - 1).await.unwrap();
    assert_eq!(segment_bases(dir.path()), bases[2..]);
    let mut later = q.reader("later").unwrap();
    let got = read_all(&mut later);
    assert_eq!(got[0].seq, bases[2]);
    assert_eq!(
        seqs_of(&got),
        seqs.iter()
            .copied()
            .filter(|&s| s >= bases[2])
            .collect::<Vec<_>>()
    );
    drop((late, later));
    shut(q);

    // After a reopen (which starts a new, empty active segment) too.
    let q = open(dir.path());
    let mut after = q.reader("after-reopen").unwrap();
    assert_eq!(read_all(&mut after)[0].seq, bases[2]);
}

#[tokio::test]
async fn new_cursor_on_an_empty_queue_sees_the_first_record() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let mut r = q.reader("r").unwrap();
    let s = append_ids(&q, [7], SIZE).await;
    assert_eq!(seqs_of(&read_all(&mut r)), s);
}

/// A cursor created while an append is between "sequence number taken" and "durable" must still
/// get that record: the cursor cannot have confirmed it, so skipping it is loss.
#[tokio::test]
async fn new_cursor_created_while_an_append_is_in_flight_sees_that_record() {
    let mut skipped = Vec::new();
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        let p = payload(round, SIZE);
        let pending = q.try_append(&rec(&p)).unwrap();
        let mut r = q.reader("r").unwrap();
        let seq = pending.durable().await.unwrap();
        if seqs_of(&read_all(&mut r)) != vec![seq] {
            skipped.push(round);
        }
    }
    assert!(
        skipped.is_empty(),
        "the new cursor skipped the in-flight record in rounds {skipped:?} of 20"
    );
}

#[tokio::test]
async fn bad_cursor_names_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let too_long = "x".repeat(65);
    for bad in [
        "", ".", "..", "../x", ".hidden", "a/b", "a b", "a\\b", "ü", "a\0b", &too_long,
    ] {
        assert!(
            matches!(q.reader(bad), Err(QueueError::BadCursorName(ref n)) if n == bad),
            "reader({bad:?}) accepted"
        );
        assert!(
            matches!(q.remove_cursor(bad), Err(QueueError::BadCursorName(_))),
            "remove_cursor({bad:?}) accepted"
        );
    }
    assert!(q.stats().cursors.is_empty());
    let files: Vec<_> = std::fs::read_dir(dir.path().join("cursors"))
        .unwrap()
        .collect();
    assert!(files.is_empty(), "a rejected name left a file: {files:?}");
    // Nothing outside the cursors directory was created either.
    assert!(!dir.path().join("x.cursor").exists());

    let longest = "y".repeat(64);
    for good in ["amqp-main_1.eu", "k", &longest] {
        q.reader(good).unwrap();
        assert!(cursor_path(dir.path(), good).exists());
    }
}
