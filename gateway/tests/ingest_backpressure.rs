//! A full queue under `backpressure`: devices are held back (no PUBACK, socket not read), MQTT 5
//! devices get "quota exceeded" after `quota_wait`, and everything flows again once an uplink
//! confirms records and frees space. Nothing acknowledged is lost.
#![allow(clippy::unwrap_used)]

mod ingest_support;

use std::time::Duration;

use ingest_support::raw::{kind, Connect, Publish, RecvError};
use ingest_support::TestGateway;

const DEV: &str = "dev-00001";
const TOPIC: &str = "devices/dev-00001/telemetry";

/// A small queue (64 KiB segments, 256 KiB) that nothing drains until the test says so.
async fn small_queue_gateway() -> TestGateway {
    TestGateway::start(|c, _| {
        c.queue.segment_bytes = 64 << 10;
        c.queue.max_bytes = 256 << 10;
        c.limits.quota_wait = Duration::from_millis(300);
    })
    .await
}

/// Publishes QoS 1 one at a time until the gateway stops acknowledging within `patience`;
/// returns how many were acknowledged and the reply (if any) to the last one.
async fn fill(
    c: &mut ingest_support::raw::TlsRaw,
    v5: bool,
    patience: Duration,
) -> (u16, Result<ingest_support::raw::Packet, RecvError>) {
    let payload = vec![b'x'; 2000];
    let mut pkid = 1u16;
    loop {
        c.publish(&Publish::new(v5, TOPIC, &payload).qos(1, pkid))
            .await;
        let r = c.recv_within(patience).await;
        match &r {
            Ok(p) if p.kind == kind::PUBACK && p.ack_reason() == 0 => pkid += 1,
            _ => return (pkid - 1, r),
        }
        assert!(
            pkid < 1000,
            "a 256 KiB queue took {pkid} x 2 KB without filling"
        );
    }
}

#[tokio::test]
async fn mqtt5_device_gets_quota_exceeded_when_the_queue_stays_full_and_resumes_after_space_is_freed(
) {
    let gw = small_queue_gateway().await;
    let mut c = gw.raw_connected(DEV, &Connect::v5(DEV)).await;
    let (acked, last) = fill(&mut c, true, Duration::from_secs(5)).await;
    assert!(acked > 50, "only {acked} fitted");
    let refusal = last.expect("a reply after the quota wait");
    assert_eq!(refusal.kind, kind::PUBACK);
    assert_eq!(refusal.ack_reason(), 0x97, "quota exceeded: {refusal:?}");
    assert_eq!(
        ingest_support::raw::property_values(&refusal.ack_properties(), 0x1F),
        [b"\x00\x0aqueue full".to_vec()],
        "with a reason string"
    );
    gw.wait_refused("quota", 1).await;
    // Everything acknowledged is stored; the refused one is not.
    assert_eq!(gw.records().len(), usize::from(acked));

    // An uplink confirms everything: segments are deleted and publishing works again.
    let mut r = gw.queue.reader("uplink").unwrap();
    let records = r.read_now(10_000, usize::MAX).unwrap();
    r.ack_through(records.last().unwrap().seq).await.unwrap();
    let again = c
        .publish_qos1(true, TOPIC, acked + 1, b"after space returned")
        .await;
    assert_eq!(again.ack_reason(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn mqtt311_device_is_held_back_while_the_queue_is_full_and_acked_once_space_returns() {
    let gw = small_queue_gateway().await;
    let mut c = gw.raw_connected(DEV, &Connect::v4(DEV)).await;
    // 3.1.1 has no negative ack: past the quota wait the device simply gets no PUBACK yet.
    let (acked, last) = fill(&mut c, false, Duration::from_secs(1)).await;
    assert!(acked > 50, "only {acked} fitted");
    assert!(
        matches!(last, Err(RecvError::Timeout)),
        "expected no reply while full, got {last:?}"
    );
    assert!(
        c.is_open_after(Duration::from_millis(200)).await,
        "held, not closed"
    );

    // Space returns: the held publish is stored and its PUBACK arrives.
    let mut r = gw.queue.reader("uplink").unwrap();
    let records = r.read_now(10_000, usize::MAX).unwrap();
    assert_eq!(records.len(), usize::from(acked));
    r.ack_through(records.last().unwrap().seq).await.unwrap();
    let ack = c.recv_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!(ack.kind, kind::PUBACK);
    assert_eq!(ack.pkid(), acked + 1);
    // The held message is the next record the uplink reads.
    let next = tokio::time::timeout(Duration::from_secs(5), r.next_batch(10, usize::MAX))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].payload.len(), 2000);
    assert!(next[0].seq > records.last().unwrap().seq);
    gw.stop().await;
}
