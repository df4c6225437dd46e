//! Basic append / read / ack behaviour of the queue.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use gateway::queue::{FsyncPolicy, NewRecord, Queue, QueueOptions};

fn opts(dir: &std::path::Path) -> QueueOptions {
    let mut o = QueueOptions::new(dir);
    o.segment_bytes = 64 << 10;
    o.max_bytes = 16 << 20;
    o
}

#[tokio::test]
async fn appended_records_are_read_back_in_order_with_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let (q, report) = Queue::open(opts(dir.path())).unwrap();
    assert_eq!(report.records, 0);
    let props = vec![("unit".to_string(), "C".to_string())];
    let mut seqs = Vec::new();
    for i in 0..100u32 {
        let payload = i.to_le_bytes();
        let mut r = NewRecord::new("dev-1", "site/dev-1/temp", &payload);
        r.username = Some("alice");
        r.user_properties = &props;
        r.content_type = Some("application/cbor");
        seqs.push(q.append(&r).await.unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let mut reader = q.reader("amqp").unwrap();
    let mut got = Vec::new();
    while got.len() < 100 {
        got.extend(reader.next_batch(30, 1 << 20).await.unwrap());
    }
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), seqs);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.payload, (i as u32).to_le_bytes());
        assert_eq!(r.device_id, "dev-1");
        assert_eq!(r.username.as_deref(), Some("alice"));
        assert_eq!(r.user_properties, props);
    }
    q.close();
}

#[tokio::test]
async fn reader_waits_for_new_records() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = Queue::open(opts(dir.path())).unwrap();
    let mut reader = q.reader("k").unwrap();
    let q2 = q.clone();
    let h = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        q2.append(&NewRecord::new("d", "t", b"late")).await.unwrap()
    });
    let batch = tokio::time::timeout(Duration::from_secs(5), reader.next_batch(10, 1 << 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].payload, b"late");
    assert_eq!(batch[0].seq, h.await.unwrap());
}

#[tokio::test]
async fn records_survive_reopen_and_acked_ones_are_not_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.fsync = FsyncPolicy::Interval(Duration::from_millis(10));
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        let mut seqs = Vec::new();
        for i in 0..2000u32 {
            seqs.push(
                q.append(&NewRecord::new("d", "t", &i.to_le_bytes()))
                    .await
                    .unwrap(),
            );
        }
        let mut reader = q.reader("up").unwrap();
        let b = reader.next_batch(500, usize::MAX).await.unwrap();
        assert_eq!(b.len(), 500);
        reader.ack_through(b[499].seq).await.unwrap();
        q.close();
    }
    let (q, report) = Queue::open(o).unwrap();
    assert_eq!(report.records, 2000);
    let mut reader = q.reader("up").unwrap();
    let mut got = Vec::new();
    loop {
        let b = reader.read_now(1000, usize::MAX).unwrap();
        if b.is_empty() {
            break;
        }
        got.extend(b);
    }
    assert_eq!(got.len(), 1500);
    assert_eq!(got[0].payload, 500u32.to_le_bytes());
    // New records get sequence numbers above everything before the restart.
    let s = q.append(&NewRecord::new("d", "t", b"x")).await.unwrap();
    assert!(s > got.last().unwrap().seq);
}

#[tokio::test]
async fn a_cursor_created_while_the_first_append_is_pending_still_gets_it() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = Queue::open(opts(dir.path())).unwrap();
    // The record has its seq but may not be written yet when the uplink's cursor is created.
    let pending = q.try_append(&NewRecord::new("d", "t", b"first")).unwrap();
    let mut reader = q.reader("late").unwrap();
    let seq = pending.durable().await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(5), reader.next_batch(10, 1 << 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch[0].seq, seq);
    assert_eq!(batch[0].payload, b"first");
}

#[tokio::test]
async fn confirmed_segments_give_their_bytes_back_to_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.segment_bytes = 8 << 10;
    o.max_bytes = 32 << 10;
    let (q, _) = Queue::open(o).unwrap();
    let mut reader = q.reader("up").unwrap();
    // Ten times max_bytes goes through as long as the uplink keeps confirming.
    let payload = vec![0u8; 200];
    for _ in 0..1500 {
        let seq = tokio::time::timeout(
            Duration::from_secs(5),
            q.append(&NewRecord::new("d", "t", &payload)),
        )
        .await
        .expect("append must not wait: everything before it was confirmed")
        .unwrap();
        reader.ack_through(seq).await.unwrap();
    }
    assert!(q.stats().bytes <= 32 << 10);
}

#[tokio::test]
async fn preallocated_segments_are_trimmed_when_sealed_and_closed_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = QueueOptions::new(dir.path());
    o.segment_bytes = 1 << 20;
    o.max_bytes = 64 << 20;
    assert!(!o.preallocates(), "preallocation is off unless asked for");
    o.preallocate = true;
    assert!(o.preallocates());
    let (q, _) = Queue::open(o.clone()).unwrap();
    let payload = vec![7u8; 1000];
    let mut seqs = Vec::new();
    // About 3.5 segments: the first is grown, later ones come from pre-zeroed spares.
    for _ in 0..3600 {
        seqs.push(q.append(&NewRecord::new("d", "t", &payload)).await.unwrap());
        if seqs.len() % 500 == 0 {
            // Give the spare preparer a moment (it works in its own thread).
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let q2 = q.clone();
    tokio::task::spawn_blocking(move || q2.close())
        .await
        .unwrap();
    drop(q);
    // Closed: every segment file is exactly as long as its records, no zeros left over.
    let report = gateway::queue::inspect::Inspector::open(dir.path())
        .unwrap()
        .verify()
        .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let insp = gateway::queue::inspect::Inspector::open(dir.path()).unwrap();
    for s in insp.segments() {
        assert_eq!(
            s.file_bytes, s.meta.bytes,
            "segment {} keeps unused space",
            s.meta.base
        );
    }
    let (q, rep) = Queue::open(o).unwrap();
    assert_eq!(rep.truncated_bytes, 0);
    let mut r = q.reader("check").unwrap();
    let mut got = Vec::new();
    loop {
        let b = r.read_now(1000, usize::MAX).unwrap();
        if b.is_empty() {
            break;
        }
        got.extend(b.into_iter().map(|r| r.seq));
    }
    assert_eq!(got, seqs);
}
