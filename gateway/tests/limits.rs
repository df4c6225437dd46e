//! The queue's bounds: `max_bytes` under `backpressure` and `drop-oldest`, `max_age`, and records
//! too large for a segment.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use gateway::queue::{EncodeError, FullPolicy, NewRecord, Queue, QueueError, QueueOptions};

const SEGMENT: u64 = 4096;
const MAX: u64 = 4 * SEGMENT;
/// 200-byte payloads: 229-byte frames, 17 per 4 KiB segment.
const SIZE: usize = 200;
const FRAME: u64 = (FRAME_OVERHEAD + SIZE) as u64;

fn backpressure(dir: &Path) -> QueueOptions {
    opts(dir, SEGMENT, MAX)
}

fn drop_oldest(dir: &Path) -> QueueOptions {
    let mut o = opts(dir, SEGMENT, MAX);
    o.full_policy = FullPolicy::DropOldest;
    o
}

/// Sum of the sizes of the segment files (`*.seg`): what `max_bytes` bounds.
fn segment_file_bytes(dir: &Path) -> u64 {
    segment_bases(dir)
        .iter()
        .map(|&b| std::fs::metadata(segment_path(dir, b)).unwrap().len())
        .sum()
}

fn assert_within_max(dir: &Path, when: &str) {
    let used = segment_file_bytes(dir);
    assert!(
        used <= MAX,
        "{when}: {used} bytes of segment files, max_bytes {MAX}"
    );
}

/// Appends with `try_append` until the queue answers `Full`; returns the durable seqs.
async fn fill(q: &Queue, dir: &Path) -> Vec<u64> {
    let mut seqs = Vec::new();
    for id in 0.. {
        assert!(id < 1000, "never full");
        let p = payload(id, SIZE);
        match q.try_append(&rec(&p)) {
            Ok(pending) => seqs.push(pending.durable().await.unwrap()),
            Err(QueueError::Full { bytes, max_bytes }) => {
                assert_eq!(max_bytes, MAX);
                assert!(bytes + FRAME > MAX, "refused with {bytes} used");
                return seqs;
            }
            Err(e) => panic!("{e}"),
        }
        assert_within_max(dir, &format!("after record {id}"));
    }
    unreachable!()
}

#[tokio::test]
async fn full_queue_refuses_try_append_and_append_waits_until_a_segment_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = Queue::open(backpressure(dir.path())).unwrap();
    let mut r = q.reader("r").unwrap();
    let seqs = fill(&q, dir.path()).await;
    assert!(
        seqs.len() as u64 >= MAX / FRAME - 4,
        "full after {} records",
        seqs.len()
    );
    let err = q.try_append(&rec(&payload(5000, SIZE))).err().unwrap();
    assert!(matches!(err, QueueError::Full { .. }));
    assert!(err.is_retryable());
    assert_eq!(err.as_label(), "full");
    assert_eq!(q.stats().appended_records, seqs.len() as u64);

    let q2 = q.clone();
    let mut waiting =
        tokio::spawn(async move { q2.append(&rec(&payload(10_000, SIZE))).await.unwrap() });
    assert!(eventually(5, || q.stats().waiting_appenders == 1).await);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut waiting)
            .await
            .is_err(),
        "append completed although the queue is full"
    );

    // Confirming part of the first segment frees nothing.
    let got = read_all(&mut r);
    assert_eq!(seqs_of(&got), seqs);
    r.ack_through(seqs[0]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished());
    assert_eq!(q.stats().waiting_appenders, 1);

    // Confirming the whole first segment deletes it, and the waiting append goes through.
    let bases = segment_bases(dir.path());
    r.ack_through(bases[1] - 1).await.unwrap();
    assert_eq!(segment_bases(dir.path()), bases[1..]);
    let seq = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("append still waiting after a segment was freed")
        .unwrap();
    assert!(seq > *seqs.last().unwrap());
    assert_eq!(q.stats().waiting_appenders, 0);
    assert_within_max(dir.path(), "after the waiting append");
    let more = read_all(&mut r);
    assert_eq!(ids_of(&more), vec![10_000]);
}

#[tokio::test]
async fn waiting_appenders_are_counted_and_all_proceed_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = Queue::open(backpressure(dir.path())).unwrap();
    let mut r = q.reader("r").unwrap();
    let seqs = fill(&q, dir.path()).await;
    let mut tasks = Vec::new();
    for i in 0..3u64 {
        let q2 = q.clone();
        tasks.push(tokio::spawn(async move {
            q2.append(&rec(&payload(20_000 + i, SIZE))).await.unwrap()
        }));
        let n = i + 1;
        assert!(
            eventually(5, || q.stats().waiting_appenders == n).await,
            "{} waiting, want {n}",
            q.stats().waiting_appenders
        );
    }
    read_all(&mut r);
    r.ack_through(*seqs.last().unwrap()).await.unwrap();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("an appender is still waiting")
            .unwrap();
    }
    assert_eq!(q.stats().waiting_appenders, 0);
    let mut late: Vec<u64> = ids_of(&read_all(&mut r));
    late.sort_unstable();
    assert_eq!(late, vec![20_000, 20_001, 20_002]);
    assert_within_max(dir.path(), "at the end");
}

/// The documented pattern after `Full` is to wait with `wait_for_space`: it must wait until space
/// was freed, not return at once while the next record still does not fit.
#[tokio::test]
async fn wait_for_space_waits_while_the_queue_is_too_full_for_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = Queue::open(backpressure(dir.path())).unwrap();
    let mut r = q.reader("r").unwrap();
    let seqs = fill(&q, dir.path()).await;
    assert!(
        q.is_full(),
        "try_append answered Full but is_full() is false"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), q.wait_for_space())
            .await
            .is_err(),
        "wait_for_space returned while nothing was freed"
    );
    read_all(&mut r);
    let q2 = q.clone();
    let waiter = tokio::spawn(async move { q2.wait_for_space().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    r.ack_through(*seqs.last().unwrap()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(!q.is_full());
    q.try_append(&rec(&payload(1, SIZE)))
        .unwrap()
        .durable()
        .await
        .unwrap();
}

#[tokio::test]
async fn disk_use_stays_within_max_bytes_with_concurrent_appenders_and_a_slow_reader() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = Queue::open(backpressure(dir.path())).unwrap();
    let mut r = q.reader("r").unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let q2 = q.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40u64 {
                q2.append(&rec(&payload(t * 1000 + i, SIZE))).await.unwrap();
            }
        }));
    }
    let mut got = Vec::new();
    while got.len() < 320 {
        assert_within_max(dir.path(), &format!("after {} read", got.len()));
        let batch = tokio::time::timeout(Duration::from_secs(10), r.next_batch(7, usize::MAX))
            .await
            .expect("no progress")
            .unwrap();
        r.ack_through(batch.last().unwrap().seq).await.unwrap();
        got.extend(batch);
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_within_max(dir.path(), "at the end");
    assert_strictly_increasing(&seqs_of(&got));
    // Per appender, records arrive in the order they were appended.
    for t in 0..8u64 {
        let mine: Vec<u64> = ids_of(&got)
            .into_iter()
            .filter(|id| id / 1000 == t)
            .collect();
        assert_eq!(mine, (t * 1000..t * 1000 + 40).collect::<Vec<_>>());
    }
}

/// Appends are also held back (`Full`) while too many bytes wait for the writer (the pending
/// cap, 16 MiB here), long before `max_bytes`. Such an append must go through once the writer has
/// drained the backlog, whether or not that sealed a segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_held_back_by_the_pending_cap_proceeds_once_the_writer_drains() {
    let big = vec![7u8; 1 << 20];
    let mut provoked = 0;
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        // 16 MiB segments: the backlog that hits the cap fits in the first segment (no roll).
        let (q, _) = Queue::open(opts(dir.path(), 16 << 20, 1 << 30)).unwrap();
        let mut pending = Vec::new();
        let mut refused = false;
        // 16 records of 1 MiB exceed the cap only while the writer has written none of them.
        for _ in 0..16 {
            match q.try_append(&rec(&big)) {
                Ok(p) => pending.push(p),
                Err(QueueError::Full { bytes, max_bytes }) => {
                    assert!(bytes < max_bytes / 2, "round {round}: {bytes} used");
                    refused = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        if refused {
            provoked += 1;
            let done = tokio::time::timeout(Duration::from_secs(5), q.append(&rec(&big))).await;
            assert!(
                done.is_ok(),
                "round {round}: append still waiting 5 s after the cap refused it"
            );
        }
        for p in pending {
            p.durable().await.unwrap();
        }
        shut(q);
        if provoked >= 5 {
            break;
        }
    }
    assert!(
        provoked > 0,
        "the writer always kept up: the cap was never reached"
    );
}

/// `max_bytes` bounds the disk the queue uses: segment files, including the header of a segment
/// that a record starts, and the sidecars of sealed segments.
#[tokio::test]
async fn files_in_segments_dir_never_exceed_max_bytes() {
    // 200-byte payloads only overshoot by the sidecars; 220-byte ones make a roll's header
    // overshoot too (the record fits by the books, the new segment's header does not).
    for size in [200, 220] {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = Queue::open(backpressure(dir.path())).unwrap();
        let _r = q.reader("r").unwrap();
        for id in 0..1000 {
            let p = payload(id, size);
            match q.try_append(&rec(&p)) {
                Ok(pending) => {
                    pending.durable().await.unwrap();
                }
                Err(QueueError::Full { .. }) => break,
                Err(e) => panic!("{e}"),
            }
            let seg = segment_file_bytes(dir.path());
            let all = disk_usage(dir.path());
            assert!(
                seg <= MAX,
                "payload {size}, record {id}: segment files hold {seg} bytes, max_bytes {MAX}"
            );
            assert!(
                all <= MAX,
                "payload {size}, record {id}: segments/ holds {all} bytes, max_bytes {MAX}"
            );
        }
    }
}

#[tokio::test]
async fn drop_oldest_never_blocks_and_charges_each_cursor_exactly_what_it_missed() {
    let dir = tempfile::tempdir().unwrap();
    const N: u64 = 500;
    let (dropped_a, dropped_b) = {
        let (q, _) = Queue::open(drop_oldest(dir.path())).unwrap();
        let mut a = q.reader("a").unwrap();
        let mut b = q.reader("b").unwrap();
        let first = append_ids(&q, 0..10, SIZE).await;
        assert_eq!(read_all(&mut a).len(), 10);
        a.ack_through(first[9]).await.unwrap();

        for id in 10..N {
            let p = payload(id, SIZE);
            let pending = q.try_append(&rec(&p)).unwrap();
            tokio::time::timeout(Duration::from_secs(5), pending.durable())
                .await
                .expect("append blocked under drop-oldest")
                .unwrap();
            assert_eq!(q.stats().waiting_appenders, 0);
            assert_within_max(dir.path(), &format!("after record {id}"));
        }
        let stats = q.stats();
        assert!(stats.dropped_records > 0);
        assert_eq!(stats.dropped_records + stats.records, N);

        // Each cursor gets the newest records, contiguous; what it lost were the oldest ones.
        let got_a = ids_of(&read_all(&mut a));
        let got_b = ids_of(&read_all(&mut b));
        assert_eq!(got_a, (N - got_a.len() as u64..N).collect::<Vec<_>>());
        assert_eq!(got_b, (N - got_b.len() as u64..N).collect::<Vec<_>>());
        assert!(got_a.len() < (N - 10) as usize);

        let by_name = |n: &str| stats.cursors.iter().find(|c| c.name == n).unwrap().dropped;
        // a received 0..10 before the drops, then the suffix; b only the suffix.
        assert_eq!(by_name("a"), N - 10 - got_a.len() as u64);
        assert_eq!(by_name("b"), N - got_b.len() as u64);
        assert_eq!(by_name("b"), stats.dropped_records);
        let dropped = (by_name("a"), by_name("b"));
        drop((a, b));
        shut(q);
        dropped
    };
    let (q, _) = Queue::open(drop_oldest(dir.path())).unwrap();
    let stats = q.stats();
    let by_name = |n: &str| stats.cursors.iter().find(|c| c.name == n).unwrap().dropped;
    assert_eq!((by_name("a"), by_name("b")), (dropped_a, dropped_b));
}

fn old_record(p: &[u8]) -> NewRecord<'_> {
    let mut r = rec(p);
    r.received_at = SystemTime::now() - Duration::from_secs(3600);
    r
}

#[tokio::test]
async fn records_older_than_max_age_are_dropped_by_the_writer_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), SEGMENT, 1 << 20);
    o.max_age = Some(Duration::from_secs(600));
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        let mut r = q.reader("r").unwrap();
        let mut old = Vec::new();
        for id in 0..60 {
            let p = payload(id, SIZE);
            old.push(q.append(&old_record(&p)).await.unwrap());
        }
        let fresh = append_ids(&q, 60..65, SIZE).await;
        // Whole segments expire: the one holding both old and fresh records stays.
        let bases = segment_bases(dir.path());
        let boundary = *bases.iter().filter(|&&b| b <= fresh[0]).max().unwrap();
        let expected = old.iter().filter(|&&s| s < boundary).count() as u64;
        assert!(expected >= 40, "{expected}");

        assert!(
            eventually(5, || q.stats().dropped_records == expected).await,
            "dropped {} of {expected} expired records",
            q.stats().dropped_records
        );
        // Another check later drops nothing fresh.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let stats = q.stats();
        assert_eq!(stats.dropped_records, expected);
        assert_eq!(stats.cursors[0].dropped, expected);
        assert_eq!(stats.records, 65 - expected);
        assert!(segment_bases(dir.path())[0] >= boundary);
        let got = read_all(&mut r);
        assert_eq!(
            seqs_of(&got),
            old.iter()
                .chain(&fresh)
                .copied()
                .filter(|&s| s >= boundary)
                .collect::<Vec<_>>()
        );
        drop(r);
        shut(q);
    }
    let (q, _) = Queue::open(o).unwrap();
    assert!(q.stats().cursors[0].dropped >= 40);
}

#[tokio::test]
async fn expired_active_segment_is_sealed_and_dropped_when_appends_stop() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), SEGMENT, 1 << 20);
    o.max_age = Some(Duration::from_secs(600));
    let (q, _) = Queue::open(o).unwrap();
    let mut r = q.reader("r").unwrap();
    for id in 0..5 {
        let p = payload(id, SIZE);
        q.append(&old_record(&p)).await.unwrap();
    }
    assert!(
        eventually(5, || q.stats().dropped_records == 5).await,
        "dropped {}",
        q.stats().dropped_records
    );
    let stats = q.stats();
    assert_eq!(stats.records, 0);
    assert_eq!(stats.cursors[0].dropped, 5);
    assert_eq!(stats.cursors[0].lag_records, 0);
    assert!(read_all(&mut r).is_empty());
    // The queue takes records after that as usual.
    let s = append_ids(&q, [77], SIZE).await;
    assert_eq!(seqs_of(&read_all(&mut r)), s);
}

/// Under steady traffic (an append at least every second) expired records must still go.
#[tokio::test]
async fn max_age_is_enforced_while_appends_keep_arriving() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), SEGMENT, 1 << 20);
    o.max_age = Some(Duration::from_secs(600));
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        for id in 0..40 {
            let p = payload(id, SIZE);
            q.append(&old_record(&p)).await.unwrap();
        }
        shut(q);
    }
    let (q, _) = Queue::open(o).unwrap();
    let q2 = q.clone();
    let trickle = tokio::spawn(async move {
        for id in 100.. {
            let p = payload(id, 16);
            q2.append(&rec(&p)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let expired = eventually(5, || q.stats().dropped_records == 40).await;
    trickle.abort();
    assert!(expired, "dropped {} of 40", q.stats().dropped_records);
}

#[tokio::test]
async fn record_too_large_for_a_segment_is_refused_without_consuming_anything() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = Queue::open(backpressure(dir.path())).unwrap();
    let mut r = q.reader("r").unwrap();
    let before = append_ids(&q, [1], SIZE).await[0];
    let stats_before = q.stats();

    let fits = SEGMENT as usize - SEGMENT_HEADER - FRAME_OVERHEAD;
    let too_big = vec![7u8; fits + 1];
    let err = q.append(&rec(&too_big)).await.unwrap_err();
    match &err {
        QueueError::Encode(EncodeError::TooLarge { size, limit }) => {
            assert_eq!(*size, fits + 1 + FRAME_OVERHEAD);
            assert_eq!(*limit, SEGMENT);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(!err.is_retryable());
    assert!(matches!(
        q.try_append(&rec(&too_big)),
        Err(QueueError::Encode(EncodeError::TooLarge { .. }))
    ));
    let mut bad_qos = rec(b"12345678");
    bad_qos.qos = 3;
    assert!(matches!(
        q.try_append(&bad_qos),
        Err(QueueError::Encode(EncodeError::BadQos(3)))
    ));
    let stats = q.stats();
    assert_eq!(stats.appended_records, stats_before.appended_records);
    assert_eq!(stats.records, stats_before.records);
    assert_eq!(stats.bytes, stats_before.bytes);

    // No sequence number was taken; the largest record that fits is stored whole.
    let mut exact = payload(2, 8);
    exact.resize(fits, 0xab);
    let seq = q.append(&rec(&exact)).await.unwrap();
    assert_eq!(seq, before + 1);
    let got = read_all(&mut r);
    assert_eq!(seqs_of(&got), vec![before, seq]);
    assert_eq!(got[1].payload, exact);
    let len = std::fs::metadata(segment_path(dir.path(), seq))
        .unwrap()
        .len();
    assert_eq!(len, SEGMENT, "the record fills its segment exactly");
}
