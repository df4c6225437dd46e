//! The session figures the operator sees (`/metrics`, the status page) stay exact: queued
//! messages and bytes follow every push, send, ack and end; deliveries, resends and drops are
//! counted once each. Real TLS clients against an in-process gateway.

#![allow(clippy::unwrap_used)]

mod ingest_support;

use std::sync::atomic::Ordering;

use gateway::config::AclRule;
use ingest_support::raw::{self, Connect, Publish, WAIT};
use ingest_support::TestGateway;

const DEVICE: &str = "dev-00001";
const DASHBOARD: &str = "dev-00005";
const TOPIC: &str = "devices/dev-00001/telemetry";

/// Bytes one message of `payload_len` counts as: topic + payload + 32.
fn cost(payload_len: usize) -> usize {
    TOPIC.len() + payload_len + 32
}

#[tokio::test]
async fn queued_delivered_resent_and_dropped_follow_each_message() {
    let gw = TestGateway::start(|c, _| {
        c.acl = vec![
            AclRule {
                identity: "*".into(),
                publish: vec!["devices/%c/#".into()],
                subscribe: vec![],
            },
            AclRule {
                identity: DASHBOARD.into(),
                publish: vec![],
                subscribe: vec!["devices/+/telemetry".into()],
            },
        ];
    })
    .await;
    let s = gw.sessions.clone();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::SeqCst);
    let persistent = Connect::v4(DASHBOARD).persistent(0);
    let mut dash = gw.raw_connected(DASHBOARD, &persistent).await;
    dash.send(&raw::subscribe_with(
        false,
        1,
        &[("devices/+/telemetry", 1)],
    ))
    .await
    .unwrap();
    assert_eq!(dash.recv().await.suback_codes(false), [1]);
    let mut dev = gw.raw_connected(DEVICE, &Connect::v4(DEVICE)).await;

    // Three received and not yet acknowledged: sent, still held.
    for i in 0..3u16 {
        dev.publish_qos1(false, TOPIC, i + 1, b"m").await;
    }
    let mut pkids = Vec::new();
    for _ in 0..3 {
        pkids.push(dash.recv().await.publish(false).pkid);
    }
    gw.wait_until("three deliveries", WAIT, |_| load(&s.stats.delivered) == 3)
        .await;
    assert_eq!(s.queued_messages(), 3);
    assert_eq!(s.counts().3, 3 * cost(1));
    dash.send(&raw::puback(pkids[0])).await.unwrap();
    gw.wait_until("the ack to free one", WAIT, |_| s.queued_messages() == 2)
        .await;
    assert_eq!(s.counts().3, 2 * cost(1));

    // Offline: QoS 0 is dropped (counted), QoS 1 is kept.
    drop(dash);
    gw.wait_until("the session offline", WAIT, |_| s.counts().1 == 1)
        .await;
    dev.publish(&Publish::new(false, TOPIC, b"q0")).await;
    dev.publish_qos1(false, TOPIC, 9, b"kept").await;
    gw.wait_until("the QoS 0 drop and the QoS 1 kept", WAIT, |_| {
        load(&s.stats.dropped_qos0) == 1 && s.queued_messages() == 3
    })
    .await;
    assert_eq!(s.counts().3, 2 * cost(1) + cost(4));

    // Back: the two in flight are resent, the kept one delivered; all acknowledged.
    let mut dash = gw.raw_connected(DASHBOARD, &persistent).await;
    for _ in 0..3 {
        let p = dash.recv().await.publish(false);
        dash.send(&raw::puback(p.pkid)).await.unwrap();
    }
    gw.wait_until("everything acknowledged", WAIT, |_| {
        s.queued_messages() == 0
    })
    .await;
    assert_eq!(s.counts().3, 0);
    assert_eq!(load(&s.stats.resent), 2);
    assert_eq!(load(&s.stats.delivered), 4);
    assert_eq!(
        load(&s.stats.matched),
        5,
        "routed: the dropped QoS 0 one too"
    );

    // One left behind when a clean start ends the session: discarded.
    drop(dash);
    gw.wait_until("the session offline again", WAIT, |_| s.counts().1 == 1)
        .await;
    dev.publish_qos1(false, TOPIC, 10, b"left").await;
    gw.wait_until("one queued", WAIT, |_| s.queued_messages() == 1)
        .await;
    let _dash = gw.raw_connected(DASHBOARD, &Connect::v4(DASHBOARD)).await;
    gw.wait_until("the stored session ended", WAIT, |_| {
        load(&s.stats.discarded) == 1
    })
    .await;
    assert_eq!((s.queued_messages(), s.counts().3), (0, 0));
    assert_eq!(
        (s.counts().2, load(&s.stats.refused_full)),
        (0, 0),
        "no subscription left, nothing refused"
    );
    gw.stop().await;
}
